//! The Responses API and the Messages API at the origin: cached like chat (stream-agnostic,
//! counted in provider calls), Responses requests on provider-kept state never cached, the
//! Anthropic credential and version headers, and errors in each API's shape.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use serde_json::{Value, json};

use crate::harness::{ACME, PROVIDER_KEY, Stack, header, openai_error};

fn response_body(prompt: &str, stream: bool) -> Value {
    json!({ "model": "gpt-4o-mini", "input": prompt, "store": false, "stream": stream, "temperature": 0 })
}

fn message_body(prompt: &str, stream: bool) -> Value {
    json!({
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{ "role": "user", "content": prompt }],
        "stream": stream,
    })
}

/// `(event name, data)` of each event of a typed SSE body.
fn typed_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').expect("an event and a data line");
            let name = name
                .strip_prefix("event: ")
                .expect("an event line")
                .to_owned();
            let data = data.strip_prefix("data: ").expect("a data line");
            (name, serde_json::from_str(data).expect("JSON data"))
        })
        .collect()
}

/// The text deltas of a Responses stream, and the usage of its `response.completed`.
fn responses_stream(text: &str) -> (String, Value) {
    let events = typed_events(text);
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
        .collect();
    let (last, data) = events.last().expect("events");
    assert_eq!(last, "response.completed");
    (deltas, data["response"]["usage"].clone())
}

/// The text deltas of a Messages stream, and the output tokens of its `message_delta`.
fn messages_stream(text: &str) -> (String, Value) {
    let events = typed_events(text);
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events.last().unwrap().0, "message_stop");
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    (deltas, delta.1["usage"]["output_tokens"].clone())
}

async fn messages(stack: &Stack, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/v1/messages", stack.url))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_response_is_cached_and_answers_the_stream_form_from_the_cache() {
    let stack = Stack::start().await;
    let first = stack
        .post("/v1/responses", ACME, &response_body("cache me", false))
        .await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    let plain: Value = first.json().await.unwrap();
    stack.settle().await;

    let hit = stack
        .post("/v1/responses", ACME, &response_body("cache me", true))
        .await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert_eq!(header(&hit, "x-cache-layer"), "origin");
    assert!(header(&hit, "content-type").starts_with("text/event-stream"));
    let (text, usage) = responses_stream(&hit.text().await.unwrap());
    assert_eq!(
        text,
        plain["output"][0]["content"][0]["text"].as_str().unwrap()
    );
    assert_eq!(usage, plain["usage"]);
    assert_eq!(stack.provider().stats().responses, 1);
}

#[tokio::test]
async fn a_streamed_response_is_stored_when_completed_and_answers_the_plain_form() {
    let stack = Stack::start().await;
    let live = stack
        .post("/v1/responses", ACME, &response_body("stream me", true))
        .await;
    assert_eq!(header(&live, "x-cache"), "MISS");
    let (live_text, live_usage) = responses_stream(&live.text().await.unwrap());
    stack.settle().await;

    let hit = stack
        .post("/v1/responses", ACME, &response_body("stream me", false))
        .await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    let plain: Value = hit.json().await.unwrap();
    assert_eq!(plain["output"][0]["content"][0]["text"], live_text.as_str());
    assert_eq!(plain["usage"], live_usage);
    let replay = stack
        .post("/v1/responses", ACME, &response_body("stream me", true))
        .await;
    assert_eq!(header(&replay, "x-cache"), "HIT");
    assert_eq!(
        responses_stream(&replay.text().await.unwrap()),
        (live_text, live_usage)
    );
    assert_eq!(stack.provider().stats().responses, 1);
}

#[tokio::test]
async fn a_message_is_cached_both_ways_with_the_anthropic_headers_sent_upstream() {
    let stack = Stack::start().await;
    let live = messages(&stack, ACME, &message_body("hello claude", true)).await;
    assert_eq!(live.status(), 200);
    assert_eq!(header(&live, "x-cache"), "MISS");
    let (live_text, live_output) = messages_stream(&live.text().await.unwrap());
    // The provider got its own key the Anthropic way and the client's API version.
    assert_eq!(
        stack.provider().last_header("x-api-key").as_deref(),
        Some(PROVIDER_KEY)
    );
    assert_eq!(
        stack.provider().last_header("anthropic-version").as_deref(),
        Some("2023-06-01")
    );
    assert_eq!(stack.provider().last_authorization(), None);
    stack.settle().await;

    let hit = messages(&stack, ACME, &message_body("hello claude", false)).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    let message: Value = hit.json().await.unwrap();
    assert_eq!(message["content"][0]["text"], live_text.as_str());
    assert_eq!(message["usage"]["output_tokens"], live_output);
    let replay = messages(&stack, ACME, &message_body("hello claude", true)).await;
    assert_eq!(header(&replay, "x-cache"), "HIT");
    assert_eq!(
        messages_stream(&replay.text().await.unwrap()),
        (live_text, live_output)
    );
    assert_eq!(stack.provider().stats().messages, 1);
}

#[tokio::test]
async fn responses_on_provider_kept_state_or_stored_by_default_are_never_cached() {
    let stack = Stack::start().await;
    let cases = [
        (
            json!({ "previous_response_id": "resp_1" }),
            "previous-response-id",
        ),
        (json!({ "conversation": "conv_1" }), "conversation"),
        (json!({ "background": true }), "background"),
        // `store` absent: OpenAI keeps the response, and ACME does not answer those from cache.
        (json!({ "store": null }), "store"),
    ];
    for (extra, detail) in cases {
        let mut body = response_body("state", false);
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        for _ in 0..2 {
            let response = stack.post("/v1/responses", ACME, &body).await;
            assert_eq!(response.status(), 200);
            assert_eq!(header(&response, "x-cache"), "BYPASS");
            let status = header(&response, "cache-status");
            assert!(status.contains(&format!("detail={detail}")), "{status}");
        }
    }
    assert_eq!(stack.provider().stats().responses, 8);
}

#[tokio::test]
async fn bad_messages_get_anthropic_errors_and_bad_responses_openai_ones() {
    let stack = Stack::start().await;
    let anthropic = |body: Value, status: u16, kind: &'static str| (body, status, kind);
    let cases = [
        anthropic(
            json!({ "model": "claude-haiku-4-5", "messages": [{ "role": "user", "content": "x" }] }),
            400,
            "invalid_request_error",
        ),
        anthropic(
            json!({ "model": "claude-opus-9", "max_tokens": 5, "messages": [{ "role": "user", "content": "x" }] }),
            403,
            "permission_error",
        ),
        anthropic(json!([1, 2]), 400, "invalid_request_error"),
    ];
    for (body, status, kind) in cases {
        let response = messages(&stack, ACME, &body).await;
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], kind, "{error}");
        assert!(error["error"]["message"].is_string());
    }
    let unknown = messages(&stack, "sk-nobody", &message_body("x", false)).await;
    assert_eq!(unknown.status(), 401);
    let error: Value = unknown.json().await.unwrap();
    assert_eq!(error["error"]["type"], "authentication_error");

    let bad = stack
        .post(
            "/v1/responses",
            ACME,
            &json!({ "model": "gpt-4o-mini", "input": 7 }),
        )
        .await;
    assert_eq!(bad.status(), 400);
    let error = openai_error(bad).await;
    assert_eq!(error["error"]["param"], "input");
    assert_eq!(stack.provider_calls(), 0);
}
