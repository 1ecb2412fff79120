//! Streaming: a streamed miss is forwarded as it is produced and cached once complete; a hit
//! answers either form.

use std::time::Duration;

use futures_util::StreamExt;
use gateway_fixtures::provider::{Fault, ProviderConfig};
use serde_json::{Value, json};

use crate::harness::{ACME, Options, Stack, chat_body, header};

fn slow_chunks() -> Options {
    Options {
        providers: vec![ProviderConfig {
            name: "mock".into(),
            chunk_delay_ms: 100,
            ..ProviderConfig::default()
        }],
        ..Options::default()
    }
}

fn stream_body(prompt: &str) -> Value {
    let mut body = chat_body(prompt);
    body["stream"] = json!(true);
    body
}

/// The content of a chat completion, or of the deltas of an SSE text.
fn content_of_json(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn content_of_sse(text: &str) -> String {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_miss_arrives_incrementally_and_a_later_non_stream_request_is_a_hit() {
    let stack = Stack::start_with(slow_chunks()).await;
    let response = stack
        .post(
            "/v1/chat/completions",
            ACME,
            &stream_body("Tell me a story about caches"),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    assert_eq!(header(&response, "x-cache"), "MISS");

    let mut chunks = response.bytes_stream();
    let first = chunks.next().await.expect("a first chunk").unwrap();
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    assert!(
        !text.contains("[DONE]"),
        "the first chunk reached the client before the provider produced the last one"
    );
    let mut reads = 1;
    while let Some(chunk) = chunks.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        reads += 1;
    }
    assert!(
        reads > 2,
        "forwarded in pieces, not buffered ({reads} reads)"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let streamed = content_of_sse(&text);
    assert!(!streamed.is_empty());

    stack.settle().await;
    let hit = stack.chat(ACME, "Tell me a story about caches").await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert!(header(&hit, "content-type").starts_with("application/json"));
    let body: Value = hit.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(content_of_json(&body), streamed);
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_stream_miss_is_replayed_as_sse_for_a_later_stream_request() {
    let stack = Stack::start().await;
    let miss = stack.chat(ACME, "replay me").await;
    let body: Value = miss.json().await.unwrap();
    stack.settle().await;

    let hit = stack
        .post("/v1/chat/completions", ACME, &stream_body("replay me"))
        .await;
    assert_eq!(hit.status(), 200);
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert!(header(&hit, "content-type").starts_with("text/event-stream"));
    let text = hit.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"));
    assert_eq!(content_of_sse(&text), content_of_json(&body));
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_stream_is_forwarded_but_never_cached() {
    let stack = Stack::start_with(slow_chunks()).await;
    stack
        .provider()
        .set_fault(Fault::TruncateStream { after_chunks: 2 }, Some(1));
    let response = stack
        .post("/v1/chat/completions", ACME, &stream_body("cut short"))
        .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains("[DONE]"));
    stack.settle().await;
    assert_eq!(stack.redis.entries(), 0);
    let again = stack.chat(ACME, "cut short").await;
    assert_eq!(header(&again, "x-cache"), "MISS");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_stream_request_waiting_on_a_streamed_miss_gets_json() {
    let stack = std::sync::Arc::new(Stack::start_with(slow_chunks()).await);
    let streamer = {
        let stack = std::sync::Arc::clone(&stack);
        tokio::spawn(async move {
            let r = stack
                .post("/v1/chat/completions", ACME, &stream_body("shared stream"))
                .await;
            r.text().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let waiter = stack.chat(ACME, "shared stream").await;
    assert_eq!(waiter.status(), 200);
    assert!(header(&waiter, "content-type").starts_with("application/json"));
    let body: Value = waiter.json().await.unwrap();
    let text = streamer.await.unwrap();
    assert_eq!(content_of_json(&body), content_of_sse(&text));
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_always_reports_its_tokens_but_shows_the_usage_chunk_only_when_asked() {
    let stack = Stack::start().await;
    let plain = stack
        .post(
            "/v1/chat/completions",
            ACME,
            &stream_body("count my tokens"),
        )
        .await
        .text()
        .await
        .unwrap();
    let sent = stack.provider().last_request().unwrap();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "usage is requested upstream"
    );
    assert!(
        !plain.contains(r#""choices":[]"#),
        "but not shown to a client that did not ask"
    );
    assert!(plain.trim_end().ends_with("data: [DONE]"));
    stack.settle().await;
    assert!(stack.metric(r#"gateway_tokens_used_total{tenant="acme"}"#) > 0.0);

    let mut asked = stream_body("count my tokens");
    asked["stream_options"] = json!({"include_usage": true});
    let replayed = stack.post("/v1/chat/completions", ACME, &asked).await;
    assert_eq!(header(&replayed, "x-cache"), "HIT");
    let text = replayed.text().await.unwrap();
    assert!(
        text.contains(r#""choices":[]"#) && text.contains("total_tokens"),
        "{text}"
    );
}
