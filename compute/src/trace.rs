//! The edge's place in a trace: accepts the client's W3C `traceparent` (or starts a trace when
//! there is none or it is malformed), names the edge's own span, and hands the origin a
//! `traceparent` whose parent is that span. Ids come from the host's randomness (WASI). The
//! span itself travels in the usage record (the edge has no OTLP client); its trace id is kept
//! for the request's error lines ([`edge_log!`]).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use fastly::Request;
use gateway_common::traceparent::{TRACEPARENT, TraceContext};
use gateway_common::usage::SpanRecord;

/// The edge's span of one request.
#[derive(Debug, Clone, Copy)]
pub struct EdgeSpan {
    /// The context the origin receives: the client's trace (or a new one), parent = this span.
    pub downstream: TraceContext,
    /// The client's span, when it sent a valid `traceparent`.
    pub client_parent: Option<[u8; 8]>,
    /// Unix nanoseconds when the request arrived (0 if the clock is before 1970).
    pub start_unix_ns: u64,
}

impl EdgeSpan {
    /// The trace id, for the log line.
    pub fn trace_id(&self) -> String {
        self.downstream.trace_id_hex()
    }

    /// The span as the usage record carries it.
    pub fn record(&self) -> SpanRecord {
        SpanRecord {
            trace_id: self.downstream.trace_id_hex(),
            span_id: self.downstream.parent_id_hex(),
            parent_id: self.client_parent.map(hex).unwrap_or_default(),
            sampled: self.downstream.flags & 1 == 1,
            // A zero start is refused by the origin; one nanosecond marks a broken clock.
            start_unix_ns: self.start_unix_ns.max(1),
        }
    }
}

thread_local! {
    /// The trace id of the request this instance serves (one request per instance), for
    /// [`edge_log!`]; empty before [`enter`].
    static CURRENT: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The trace id of the request in scope, `-` before one is.
pub fn current() -> String {
    CURRENT.with(|id| match id.borrow().as_str() {
        "" => "-".to_owned(),
        id => id.to_owned(),
    })
}

/// An `edge: ...` line on stderr ending with the trace id of the request in scope, so an
/// operator finds a request's errors from its trace.
macro_rules! edge_log {
    ($($arg:tt)*) => {
        eprintln!("edge: {} trace_id={}", format_args!($($arg)*), $crate::trace::current())
    };
}
pub(crate) use edge_log;

fn hex(id: [u8; 8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Joins the client's trace or starts one, and sets the `traceparent` the origin will get on
/// `req` (replacing the client's, whose parent is the client's span, not the edge's).
pub fn enter(req: &mut Request) -> EdgeSpan {
    let start_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let span_id = random_id::<8>();
    let incoming = req
        .get_header_str(TRACEPARENT)
        .and_then(TraceContext::parse);
    let client_parent = incoming.map(|client| client.parent_id);
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
    CURRENT.with(|id| *id.borrow_mut() = downstream.trace_id_hex());
    EdgeSpan {
        downstream,
        client_parent,
        start_unix_ns,
    }
}

/// `N` random bytes, never all zero (an all-zero id is invalid in W3C Trace Context).
fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    if getrandom::fill(&mut id).is_err() || id == [0u8; N] {
        id[N - 1] = 1;
    }
    id
}
