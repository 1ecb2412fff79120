//! The request a task works for (its route and trace id), kept in a task-local instead of a
//! tracing span when the origin writes JSON lines and exports no spans: the JSON layer writes it
//! as the `request` span of each line, the same members a span would have. Must not carry
//! anything but what every log line of a request needs.
//!
//! Why not always a span: a span costs the subscriber a slab slot, a field pass, and an enter
//! and an exit on every poll of the request; on a cache hit that is ~2k instructions of ~170k
//! (callgrind), for lines that only need two members. A span is still made when spans are
//! exported (OpenTelemetry parents hang off it) and for the text format (its formatter reads
//! only spans).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::Either;
use tracing::Instrument;

/// What the JSON lines of a request show as its `request` span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestScope {
    /// The route's name (`chat.completions`).
    pub route: &'static str,
    /// The W3C trace id, written as 32 lowercase hex digits.
    pub trace_id: [u8; 16],
}

tokio::task_local! {
    static SCOPE: RequestScope;
}

/// Set once at start-up by the binary when the JSON layer is the log output and no span is
/// exported: the one place that decides between a scope and a span.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Requests run in a [`RequestScope`] rather than a span from now on. Only for a process whose
/// log output is the JSON layer (which reads the scope) and which exports no spans.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether a request may run in a scope instead of a span.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The scope of the task running now; `None` outside a request (or when requests use spans).
pub fn current() -> Option<RequestScope> {
    SCOPE.try_with(|scope| *scope).ok()
}

/// Runs `future` (a request's work) in `scope`.
pub async fn run<F: Future>(scope: RequestScope, future: F) -> F::Output {
    SCOPE.scope(scope, future).await
}

/// `future`, to be spawned on behalf of the current request, with what its log lines need:
/// the current span, and the current scope when there is one.
pub fn carry<F: Future>(future: F) -> impl Future<Output = F::Output> {
    let future = future.in_current_span();
    match current() {
        Some(scope) => Either::Left(SCOPE.scope(scope, future)),
        None => Either::Right(future),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spawned_future_keeps_the_scope_of_the_request_that_spawned_it() {
        let scope = RequestScope {
            route: "chat.completions",
            trace_id: [7; 16],
        };
        assert_eq!(current(), None);
        let seen = run(scope, async {
            let inner = tokio::spawn(carry(async { current() }));
            let bare = tokio::spawn(async { current() });
            (current(), inner.await.unwrap(), bare.await.unwrap())
        })
        .await;
        assert_eq!(seen, (Some(scope), Some(scope), None));
        assert_eq!(current(), None);
    }
}
