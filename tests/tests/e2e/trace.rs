//! One trace across the tiers: a client's W3C `traceparent` (or one the edge starts) reaches the
//! provider through the origin, and its trace id is in the edge's and the origin's log lines.
//! The edge's own span reaches the receiver through its usage records (exported by the origin).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gateway_e2e::stack::{ACME, Stack, StackOptions, chat_body, header, post};
use gateway_fixtures::{OtlpReceiver, ReceivedSpan};
use gateway_origin::log_format::json_lines;
use gateway_origin::telemetry::Telemetry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// What the in-process origin emits, shared by every test of this binary: its log lines and
/// the spans it exports to an OTLP/HTTP receiver (on a thread of its own, so it outlives any
/// one test's runtime).
struct Observed {
    logs: Arc<Mutex<Vec<u8>>>,
    receiver: OtlpReceiver,
    telemetry: Telemetry,
}

fn observed() -> &'static Observed {
    static OBSERVED: OnceLock<Observed> = OnceLock::new();
    OBSERVED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let receiver = OtlpReceiver::start("127.0.0.1:0".parse().unwrap())
                    .await
                    .unwrap();
                tx.send(receiver).unwrap();
                std::future::pending::<()>().await;
            });
        });
        let receiver = rx.recv().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let (telemetry, otel) = Telemetry::otlp(&receiver.url(), "gateway-origin").unwrap();
        // Another test may have installed one first: then this test fails on missing lines,
        // loudly, rather than silently passing.
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("gateway_origin=info"))
            .with(json_lines().with_writer(move || Capture(Arc::clone(&sink))))
            .with(otel)
            .try_init();
        Observed {
            logs,
            receiver,
            telemetry,
        }
    })
}

fn origin_logs() -> Arc<Mutex<Vec<u8>>> {
    Arc::clone(&observed().logs)
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
    // Sent past the stack's helpers: count it, so settle waits for its edge log line.
    stack.count_edge_requests(1);
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

    // The exported spans: the origin's request span is a child of the edge's span (the
    // parent in the traceparent the edge sent), and the provider's parent is the attempt.
    let spans = spans_of(
        TRACE_ID,
        &["request", "cache.read", "provider.attempt", "cache.write"],
    );
    let span = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    let request = span("request");
    assert_eq!(request.service, "gateway-origin");
    assert!(
        !request.parent_span_id.is_empty() && request.parent_span_id != CLIENT_SPAN,
        "the request span's parent is the edge's span: {request:?}"
    );
    for child in ["cache.read", "provider.attempt", "cache.write"] {
        assert_eq!(span(child).parent_span_id, request.span_id, "{child}");
    }
    assert_eq!(parts[2], span("provider.attempt").span_id);
}

/// The spans of `trace_id` at the receiver once every one of `names` arrived (10 s at most).
fn spans_of(trace_id: &str, names: &[&str]) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        observed().telemetry.flush();
        let spans: Vec<ReceivedSpan> = observed()
            .receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return spans;
        }
        assert!(Instant::now() < deadline, "spans of {trace_id}: {spans:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    // Sent past the stack's helpers: count it, so settle waits for its edge log line.
    stack.count_edge_requests(1);
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

/// A stack whose edge forwards its usage records to the origin (the edge spans' path).
async fn stack_with_usage() -> Stack {
    Stack::start_with(StackOptions {
        usage: true,
        ..StackOptions::default()
    })
    .await
    .expect("stack starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_span_arrives_under_the_clients_trace_and_parents_the_origins_request_span() {
    const TRACE: &str = "5ce929d0e0e47364bf92f3577b34da6a";
    const CLIENT: &str = "b7ad6b7169203331";
    origin_logs();
    let stack = stack_with_usage().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let traceparent = format!("00-{TRACE}-{CLIENT}-01");
    let response = post(
        &http,
        &stack.edge.url(),
        "/v1/chat/completions",
        ACME,
        &chat_body("a question the edge span covers"),
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(response.status(), 200);
    stack.settle().await;

    let spans = spans_of(TRACE, &["edge", "request"]);
    let edge = spans.iter().find(|s| s.name == "edge").unwrap();
    let request = spans.iter().find(|s| s.name == "request").unwrap();
    assert_eq!(edge.service, "gateway-edge", "{edge:?}");
    assert_eq!(edge.kind, 2, "a server span: {edge:?}");
    assert_eq!(
        edge.parent_span_id, CLIENT,
        "the client's span is the parent"
    );
    assert_eq!(
        request.parent_span_id, edge.span_id,
        "the origin's request span is the edge span's child"
    );
    assert_eq!(edge.attribute("route"), Some("chat.completions"));
    assert_eq!(edge.attribute("layer"), Some("upstream"));
    assert_eq!(edge.attribute("cache"), Some("miss"));
    assert_eq!(edge.attribute("http.response.status_code"), Some("200"));
    let upstream = stack.provider.last_header("traceparent").unwrap();
    assert!(upstream.contains(TRACE), "{upstream}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_hit_with_a_client_traceparent_leaves_its_edge_span_through_the_usage_path() {
    const TRACE: &str = "a3ce929d0e0e47364bf92f3577b34da6";
    const CLIENT: &str = "53ce929d0e0e4736";
    origin_logs();
    let stack = stack_with_usage().await;
    let prompt = "an edge hit that is traced";
    // MISS, then an origin HIT the edge stores locally: the third is an edge hit.
    for _ in 0..2 {
        let warm = stack.edge_chat(ACME, prompt).await;
        assert_eq!(warm.status(), 200);
        stack.settle().await;
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let traceparent = format!("00-{TRACE}-{CLIENT}-01");
    let hit = post(
        &http,
        &stack.edge.url(),
        "/v1/chat/completions",
        ACME,
        &chat_body(prompt),
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(header(&hit, "x-cache-layer"), "edge");

    let spans = spans_of(TRACE, &["edge"]);
    let edge = spans.iter().find(|s| s.name == "edge").unwrap();
    assert_eq!(edge.parent_span_id, CLIENT);
    assert_eq!(edge.kind, 2);
    assert_eq!(edge.attribute("layer"), Some("edge"));
    assert_eq!(edge.attribute("cache"), Some("hit"));
    assert!(
        spans.iter().all(|s| s.name == "edge"),
        "an edge hit never reached the origin: {spans:?}"
    );
}
