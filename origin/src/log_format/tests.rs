use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tracing_subscriber::layer::SubscriberExt;

use super::*;

/// What a layer wrote, line by line.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn lines(&self) -> Vec<Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// Events of every field kind, in no span, one span and two (one field recorded late).
fn log_everything() {
    tracing::info!(target: "gateway_origin::request", "outside any span");
    let request = tracing::info_span!(
        "request",
        route = "chat.completions",
        trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736",
    );
    let _entered = request.enter();
    tracing::info!(
        target: "gateway_origin::request",
        status = 200u16,
        tenant = "acme \"quoted\"\n\t\u{1}é",
        collapsed = false,
        delta = -7i64,
        total_ms = 0.33,
        whole = 1.0,
        not_a_number = f64::NAN,
        shown = %"display",
        debugged = ?Some("debug"),
        "request {}", 42
    );
    let attempt = tracing::info_span!(
        "provider.attempt",
        provider = "mock",
        attempt = tracing::field::Empty
    );
    attempt.record("attempt", 2u32);
    let _inner = attempt.enter();
    tracing::warn!(error = %"timed out", "provider failed");
}

#[test]
fn lines_match_tracing_subscribers_json_formatter_field_for_field() {
    let ours = Sink::default();
    let theirs = Sink::default();
    let subscriber = tracing_subscriber::registry()
        .with(json_lines().with_writer({
            let ours = ours.clone();
            move || ours.clone()
        }))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(false)
                .with_writer({
                    let theirs = theirs.clone();
                    move || theirs.clone()
                }),
        );
    tracing::subscriber::with_default(subscriber, log_everything);

    let (ours, theirs) = (ours.lines(), theirs.lines());
    assert_eq!(ours.len(), 3);
    assert_eq!(ours.len(), theirs.len());
    for (mut a, mut b) in ours.into_iter().zip(theirs) {
        let (ta, tb) = (a["timestamp"].take(), b["timestamp"].take());
        let (ta, tb) = (ta.as_str().unwrap(), tb.as_str().unwrap());
        assert_eq!(ta.len(), tb.len(), "{ta} against {tb}");
        assert_eq!(ta[..16], tb[..16], "the same minute: {ta} against {tb}");
        assert_eq!(a, b);
    }
}

#[test]
fn each_line_is_one_json_object_with_the_request_spans_trace_id() {
    let sink = Sink::default();
    let subscriber = tracing_subscriber::registry().with(json_lines().with_writer({
        let sink = sink.clone();
        move || sink.clone()
    }));
    tracing::subscriber::with_default(subscriber, log_everything);
    let lines = sink.lines();
    assert!(lines[0].get("spans").is_none(), "{}", lines[0]);
    for line in &lines[1..] {
        assert_eq!(line["spans"][0]["name"], "request");
        assert_eq!(
            line["spans"][0]["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
    assert_eq!(lines[1]["fields"]["message"], "request 42");
    assert_eq!(lines[1]["fields"]["tenant"], "acme \"quoted\"\n\t\u{1}é");
    assert_eq!(lines[1]["fields"]["not_a_number"], Value::Null);
    assert_eq!(lines[2]["spans"][1]["attempt"], 2);
    assert_eq!(lines[2]["level"], "WARN");
}

#[test]
fn timestamps_are_rfc_3339_utc_with_microseconds() {
    let at = |secs: u64, micros: u64| {
        let mut out = String::new();
        write_timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros),
        );
        out
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
    assert_eq!(at(951_825_600, 7), "2000-02-29T12:00:00.000007Z");
    assert_eq!(at(1_709_251_199, 999_999), "2024-02-29T23:59:59.999999Z");
    assert_eq!(at(1_764_559_144, 522_295), "2025-12-01T03:19:04.522295Z");
    assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000000Z");
}

#[tokio::test]
async fn a_request_in_a_scope_is_written_as_its_request_span_before_any_span_it_opens() {
    let sink = Sink::default();
    let subscriber = tracing_subscriber::registry().with(json_lines().with_writer({
        let sink = sink.clone();
        move || sink.clone()
    }));
    let _default = tracing::subscriber::set_default(subscriber);
    let scope = crate::request_scope::RequestScope {
        route: "chat.completions",
        trace_id: [
            0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
            0x47, 0x36,
        ],
    };
    crate::request_scope::run(scope, async {
        tracing::info!(status = 200u16, "request");
        let attempt = tracing::info_span!("provider.attempt", provider = "mock");
        let _inner = attempt.enter();
        tracing::warn!("provider failed");
    })
    .await;
    tracing::info!("after the request");

    // The same members, in the same order, as the request span `log_everything` opens.
    let lines = sink.lines();
    let request = serde_json::json!({
        "route": "chat.completions",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "name": "request",
    });
    assert_eq!(lines[0]["spans"], serde_json::json!([request]));
    assert_eq!(
        lines[1]["spans"],
        serde_json::json!([request, {"provider": "mock", "name": "provider.attempt"}])
    );
    assert!(lines[2].get("spans").is_none(), "{}", lines[2]);
    let raw = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert!(
        raw.lines().next().unwrap().contains(
            r#""spans":[{"route":"chat.completions","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","name":"request"}]"#
        ),
        "{raw}"
    );
}
