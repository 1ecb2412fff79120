//! The edge's place in a trace: accepts the client's W3C `traceparent` (or starts a trace when
//! there is none or it is malformed), names the edge's own span, and hands the origin a
//! `traceparent` whose parent is that span. Ids come from the host's randomness (WASI).

use fastly::Request;
use gateway_common::traceparent::{TRACEPARENT, TraceContext};

/// The edge's span of one request.
#[derive(Debug, Clone, Copy)]
pub struct EdgeSpan {
    /// The context the origin receives: the client's trace (or a new one), parent = this span.
    pub downstream: TraceContext,
}

impl EdgeSpan {
    /// The trace id, for the log line.
    pub fn trace_id(&self) -> String {
        self.downstream.trace_id_hex()
    }
}

/// Joins the client's trace or starts one, and sets the `traceparent` the origin will get on
/// `req` (replacing the client's, whose parent is the client's span, not the edge's).
pub fn enter(req: &mut Request) -> EdgeSpan {
    let span_id = random_id::<8>();
    let incoming = req
        .get_header_str(TRACEPARENT)
        .and_then(TraceContext::parse);
    let downstream = match incoming {
        Some(client) => client.child(span_id),
        None => TraceContext::start(random_id::<16>(), span_id).unwrap_or(TraceContext {
            // The host's randomness failed twice over: a fixed, valid id still links the
            // tiers' log lines for this request.
            trace_id: [1; 16],
            parent_id: [1; 8],
            flags: 1,
        }),
    };
    req.set_header(TRACEPARENT, downstream.to_string());
    EdgeSpan { downstream }
}

/// `N` random bytes, never all zero (an all-zero id is invalid in W3C Trace Context).
fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    if getrandom::fill(&mut id).is_err() || id == [0u8; N] {
        id[N - 1] = 1;
    }
    id
}
