//! Every streamed answer is counted against the tenant's token budget, in whatever form it was
//! asked for, and no stream can grow a buffer without bound.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::time::Duration;

use gateway_fixtures::provider::{Fault, ProviderConfig};
use serde_json::{Value, json};

use crate::harness::{ACME, Options, Stack, chat_body, header};

const USED: &str = r#"gateway_tokens_used_total{tenant="acme"}"#;

/// Sends `body` to `path` past the cache (each request reaches the provider); the body text.
async fn uncached(stack: &Stack, path: &str, body: &Value) -> String {
    let response = stack
        .post_with(path, ACME, body, &[("cache-control", "no-store")])
        .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    stack.settle().await;
    text
}

/// What the tokens-used counter grew by for the request `f` makes. The provider call's tokens
/// are added (to Redis, then the metric) as the call ends, after the answer went out: wait for
/// that one step, at most 5 s (0 if it never comes).
async fn tokens_used_by<F: std::future::Future<Output = String>>(
    stack: &Stack,
    f: F,
) -> (f64, String) {
    let before = stack.metric(USED);
    let text = f.await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stack.metric(USED) == before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (stack.metric(USED) - before, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_are_counted_in_every_form_they_are_asked_in() {
    let stack = Stack::start().await;
    let chat = chat_body("count every token");
    let (expected, json_text) =
        tokens_used_by(&stack, uncached(&stack, "/v1/chat/completions", &chat)).await;
    let reported: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(
        expected,
        reported["usage"]["total_tokens"].as_f64().unwrap()
    );
    assert!(expected > 0.0);

    let mut plain = chat.clone();
    plain["stream"] = json!(true);
    let mut null_options = plain.clone();
    null_options["stream_options"] = Value::Null;
    for body in [&plain, &null_options] {
        let (used, text) =
            tokens_used_by(&stack, uncached(&stack, "/v1/chat/completions", body)).await;
        assert_eq!(used, expected, "{body}");
        assert!(
            !text.contains(r#""choices":[]"#),
            "the client did not ask for usage"
        );
    }

    let completion = json!({"model": "gpt-4o-mini", "prompt": "count every token"});
    let (expected, json_text) =
        tokens_used_by(&stack, uncached(&stack, "/v1/completions", &completion)).await;
    let reported: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(
        expected,
        reported["usage"]["total_tokens"].as_f64().unwrap()
    );
    let mut streamed = completion.clone();
    streamed["stream"] = json!(true);
    let (used, text) = tokens_used_by(&stack, uncached(&stack, "/v1/completions", &streamed)).await;
    assert_eq!(used, expected);
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert!(!text.contains(r#""choices":[]"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_cannot_be_assembled_is_still_counted_and_never_cached() {
    let stack = Stack::start().await;
    stack.provider().set_fault(Fault::DropFinish, Some(1));
    let mut body = chat_body("no finish reason");
    body["stream"] = json!(true);
    let before = stack.metric(USED);
    let response = stack.post("/v1/chat/completions", ACME, &body).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"));
    stack.settle().await;
    assert!(stack.metric(USED) > before, "counted from the usage chunk");
    assert_eq!(
        stack.redis.entries(),
        0,
        "an unassembled stream is not cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_the_answer_limit_ends_with_an_error_event_and_nothing_is_cached() {
    let stack = Stack::start_with(Options {
        providers: vec![ProviderConfig {
            chunk_delay_ms: 1,
            ..ProviderConfig::default()
        }],
        settings: Box::new(|s| s.server.max_upstream_body_bytes = 64 * 1024),
        ..Options::default()
    })
    .await;
    for (prompt, fault) in [
        // One event that never ends: the partial-event buffer would grow forever.
        ("endless event", Fault::Endless { bytes: 1 << 20 }),
    ] {
        stack.provider().set_fault(fault, Some(1));
        let mut body = chat_body(prompt);
        body["stream"] = json!(true);
        let response = stack.post("/v1/chat/completions", ACME, &body).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-cache"), "MISS");
        let text = tokio::time::timeout(Duration::from_secs(10), response.text())
            .await
            .expect("the stream ends")
            .unwrap();
        assert!(
            text.len() < 80 * 1024,
            "{} bytes reached the client",
            text.len()
        );
        let last = text.trim_end().lines().last().unwrap_or_default();
        assert!(last.contains(r#""error""#), "{last}");
        assert!(last.contains("exceeds 65536 bytes"), "{last}");
        stack.settle().await;
        assert_eq!(stack.redis.entries(), 0);
    }
}
