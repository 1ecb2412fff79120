//! One trace across the tiers: a client's W3C `traceparent` (or one the edge starts) reaches the
//! provider through the origin, and its trace id is in the edge's and the origin's log lines.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use gateway_e2e::stack::{ACME, Stack, chat_body, post};

/// The in-process origin's log output, shared by every test of this binary that runs it.
fn origin_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter("gateway_origin=info")
            .with_writer(move || Capture(Arc::clone(&sink)))
            .finish();
        // Another test may have installed one first: then this test fails on missing lines,
        // loudly, rather than silently passing.
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn origin_lines_with(trace_id: &str) -> Vec<String> {
    let logs = origin_logs();
    let logs = logs.lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(trace_id))
        .map(str::to_owned)
        .collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_reaches_the_provider_and_every_tiers_log_line() {
    origin_logs();
    let stack = Stack::start().await.expect("stack starts");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let response = post(
        &http,
        &stack.edge.url(),
        "/v1/chat/completions",
        ACME,
        &chat_body("a traced question"),
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(response.status(), 200);
    stack.settle().await;

    let upstream = stack
        .provider
        .last_header("traceparent")
        .expect("the provider got a traceparent");
    let parts: Vec<&str> = upstream.split('-').collect();
    assert_eq!(parts[1], TRACE_ID, "{upstream}");
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "the provider's parent is the origin's attempt, not the client's span"
    );

    let edge_lines: Vec<_> = stack
        .edge
        .log_lines()
        .into_iter()
        .filter(|l| l["route"] == "chat.completions")
        .collect();
    assert!(!edge_lines.is_empty());
    for line in &edge_lines {
        assert_eq!(line["trace_id"], TRACE_ID, "{line}");
    }
    let origin = origin_lines_with(TRACE_ID);
    assert!(
        origin.iter().any(|l| l.contains("\"message\":\"request\"")),
        "the origin's request line carries the trace id: {origin:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_traceparent_the_edge_starts_a_trace_the_provider_joins() {
    origin_logs();
    let stack = Stack::start().await.expect("stack starts");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = post(
        &http,
        &stack.edge.url(),
        "/v1/chat/completions",
        ACME,
        &chat_body("an untraced question"),
        &[("traceparent", "not a traceparent")],
    )
    .await;
    assert_eq!(response.status(), 200);
    stack.settle().await;
    let upstream = stack.provider.last_header("traceparent").unwrap();
    let trace_id = upstream.split('-').nth(1).unwrap().to_owned();
    assert_eq!(trace_id.len(), 32);
    let edge_line = stack
        .edge
        .log_lines()
        .into_iter()
        .rfind(|l| l["route"] == "chat.completions")
        .unwrap();
    assert_eq!(edge_line["trace_id"], trace_id.as_str());
    assert!(!origin_lines_with(&trace_id).is_empty());
}
