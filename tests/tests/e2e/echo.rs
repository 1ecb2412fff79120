//! Responses answers served from cache show the asking request's echoed members (`metadata`,
//! `user`, ...), not those of the request the entry was written for: at the origin and at the
//! edge, as JSON and in a replayed stream's `response.created` / `response.completed`.

use gateway_e2e::stack::{ACME, Stack, header};
use serde_json::{Value, json};

fn responses_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "input": "what does a cached answer echo",
        "store": false,
    });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    body
}

async fn ask(stack: &Stack, extra: Value) -> (String, String) {
    let response = stack
        .edge_post("/v1/responses", ACME, &responses_body(extra), &[])
        .await;
    assert_eq!(response.status(), 200);
    let at = (
        header(&response, "x-cache"),
        header(&response, "x-cache-layer"),
    );
    let text = response.text().await.unwrap();
    stack.settle().await;
    (format!("{} {}", at.0, at.1), text)
}

/// The `response` objects of a typed stream's `response.created` and `response.completed`.
fn streamed_responses(sse: &str) -> Vec<Value> {
    sse.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter(|event| {
            matches!(
                event["type"].as_str(),
                Some("response.created" | "response.completed")
            )
        })
        .map(|event| event["response"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_response_shows_its_own_requests_metadata_and_user_at_both_tiers() {
    let stack = Stack::start().await.expect("stack starts");

    let (at, first) = ask(&stack, json!({"metadata": {"run": "a"}, "user": "alice"})).await;
    assert_eq!(at, "MISS upstream");
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        (&first["metadata"], &first["user"]),
        (&json!({"run": "a"}), &json!("alice")),
        "the mock provider echoes like the API"
    );

    let (at, second) = ask(&stack, json!({"metadata": {"run": "b"}, "user": "bob"})).await;
    assert_eq!(at, "HIT origin");
    let second: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["metadata"], json!({"run": "b"}));
    assert_eq!(second["user"], "bob");
    assert_eq!(second["output"], first["output"], "the same cached answer");

    let (at, third) = ask(&stack, json!({"metadata": {"run": "c"}})).await;
    assert_eq!(at, "HIT edge");
    let third: Value = serde_json::from_str(&third).unwrap();
    assert_eq!(third["metadata"], json!({"run": "c"}));
    assert_eq!(third["user"], Value::Null, "absent: the API's default");

    let (at, stream) = ask(&stack, json!({"stream": true, "user": "dora"})).await;
    assert_eq!(at, "HIT edge");
    let responses = streamed_responses(&stream);
    assert_eq!(responses.len(), 2, "{stream}");
    for response in &responses {
        assert_eq!(response["metadata"], json!({}), "{response}");
        assert_eq!(response["user"], "dora", "{response}");
    }
    assert_eq!(stack.provider.calls(), 1, "one provider call for all four");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_stream_from_the_origin_shows_the_asking_requests_values() {
    let stack = Stack::start().await.expect("stack starts");
    let (at, _) = ask(&stack, json!({"metadata": {"run": "a"}, "user": "alice"})).await;
    assert_eq!(at, "MISS upstream");
    // The first repeat is the origin's hit (the edge stores it afterwards).
    let (at, stream) = ask(
        &stack,
        json!({"stream": true, "metadata": {"run": "s"}, "user": "sam"}),
    )
    .await;
    assert_eq!(at, "HIT origin");
    let responses = streamed_responses(&stream);
    assert_eq!(responses.len(), 2, "{stream}");
    for response in &responses {
        assert_eq!(response["metadata"], json!({"run": "s"}), "{response}");
        assert_eq!(response["user"], "sam", "{response}");
    }
}
