//! The edge's place in a trace: accepts the client's W3C `traceparent` (or starts a trace when
//! there is none or it is malformed), names the edge's own span, and gives the origin's
//! `traceparent` (whose parent is that span). Ids come from the host's randomness (WASI). The
//! span itself travels in the usage record (the edge has no OTLP client); its trace id is kept
//! for the request's error lines ([`edge_log!`]).

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use fastly::Request;

use crate::names::TRACEPARENT;
use gateway_common::key::lower_hex;
use gateway_common::traceparent::TraceContext;
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
    /// The span as the usage record carries it.
    pub fn record(&self) -> SpanRecord {
        SpanRecord {
            trace_id: self.downstream.trace_id_hex(),
            span_id: self.downstream.parent_id_hex(),
            parent_id: self
                .client_parent
                .map_or_else(String::new, |id| lower_hex(&id)),
            sampled: self.downstream.flags & 1 == 1,
            // A zero start is refused by the origin; one nanosecond marks a broken clock.
            start_unix_ns: self.start_unix_ns.max(1),
        }
    }
}

thread_local! {
    /// The trace id of the request this instance serves (one request per instance), for
    /// [`edge_log!`]; `None` before [`enter`]. Kept as bytes: only an error line formats it.
    static CURRENT: Cell<Option<[u8; 16]>> = const { Cell::new(None) };
}

/// The trace id of the request in scope, `-` before one is.
pub fn current() -> String {
    CURRENT.with(|id| id.get().map_or_else(|| "-".to_owned(), hex::encode))
}

/// An `edge: ...` line on stderr ending with the trace id of the request in scope, so an
/// operator finds a request's errors from its trace.
macro_rules! edge_log {
    ($($arg:tt)*) => {
        eprintln!("edge: {} trace_id={}", format_args!($($arg)*), $crate::trace::current())
    };
}
pub(crate) use edge_log;

/// Joins the client's trace or starts one. Reads `req` only: the `traceparent` the origin
/// gets ([`EdgeSpan::downstream`], parent = the edge's span) is set by `origin::send`, so a
/// hit never pays for a header it does not send anywhere.
pub fn enter(req: &Request) -> EdgeSpan {
    let start_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    // One call to the host's randomness for both ids.
    let ids = random_id::<24>();
    let (span_id, trace_id) = ids.split_at(8);
    let span_id: [u8; 8] = nonzero(span_id);
    // Not `get_header_str`, which panics on a value that is not UTF-8: that is a new trace.
    let incoming = crate::header(req, &TRACEPARENT).and_then(TraceContext::parse);
    let client_parent = incoming.map(|client| client.parent_id);
    let downstream = match incoming {
        Some(client) => client.child(span_id),
        None => TraceContext::start(nonzero(trace_id), span_id).unwrap_or(TraceContext {
            // The host's randomness failed twice over: a fixed, valid id still links the
            // tiers' log lines for this request.
            trace_id: [1; 16],
            parent_id: [1; 8],
            flags: 1,
        }),
    };
    CURRENT.with(|id| id.set(Some(downstream.trace_id)));
    EdgeSpan {
        downstream,
        client_parent,
        start_unix_ns,
    }
}

/// `bytes` as an id of `N` bytes, never all zero (an all-zero id is invalid in W3C Trace
/// Context).
fn nonzero<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut id = [0u8; N];
    id.copy_from_slice(&bytes[..N]);
    if id == [0u8; N] {
        id[N - 1] = 1;
    }
    id
}

/// `N` random bytes, never all zero (an all-zero id is invalid in W3C Trace Context).
fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    if getrandom::fill(&mut id).is_err() || id == [0u8; N] {
        id[N - 1] = 1;
    }
    id
}
