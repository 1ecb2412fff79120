//! The tenant's cache policy through the edge: sampled answers (for a tenant that wants fresh
//! draws) and `store: true` requests bypass both tiers, cost no KV read, are not reported to
//! the origin as edge misses, and leave what is cached for plain requests untouched.

use gateway_common::headers::X_EDGE_MISS;
use gateway_common::route::Route;
use gateway_e2e::stack::{ACME, Stack, StackOptions, chat_body, header, key_for, many_tenants};
use serde_json::{Value, json};

/// `chat_body(prompt)` with the fields of `extra` added.
fn with(prompt: &str, extra: Value) -> Value {
    let mut body = chat_body(prompt);
    for (name, value) in extra.as_object().into_iter().flatten() {
        body[name] = value.clone();
    }
    body
}

/// What the client saw of one answer.
struct Answer {
    cache: String,
    layer: String,
    cache_status: String,
    timing: String,
    body: Value,
}

/// One chat request through the edge, asserted to succeed; returns once the stack has settled.
async fn ask(stack: &Stack, api_key: &str, body: &Value) -> Answer {
    let resp = stack
        .edge_post("/v1/chat/completions", api_key, body, &[])
        .await;
    assert_eq!(resp.status(), 200);
    let answer = Answer {
        cache: header(&resp, "x-cache"),
        layer: header(&resp, "x-cache-layer"),
        cache_status: header(&resp, "cache-status"),
        timing: header(&resp, "server-timing"),
        body: Value::Null,
    };
    let body = resp.json().await.expect("a JSON body");
    stack.settle().await;
    Answer { body, ..answer }
}

/// Asserts that `answer` (to `body`, from `tenant`) bypassed both tiers for `reason` and that
/// the edge did not read its KV store for it.
async fn assert_bypassed(stack: &Stack, tenant: &str, body: &Value, answer: &Answer, reason: &str) {
    assert_eq!(answer.cache, "BYPASS");
    assert_eq!(answer.layer, "upstream");
    assert_eq!(
        answer.cache_status,
        format!(
            "gateway-origin; fwd=bypass; detail={reason}, gateway-edge; fwd=bypass; detail={reason}"
        )
    );
    assert!(
        !answer
            .timing
            .split(',')
            .any(|step| step.trim().starts_with("kv")),
        "no KV read in Server-Timing: {}",
        answer.timing
    );
    let key = key_for(tenant, Route::ChatCompletions, body);
    let line = stack.edge_log_line(&key).await;
    assert_eq!(
        line["kv"],
        Value::Null,
        "the edge logged no KV read: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sampled_answers_bypass_both_tiers_for_a_tenant_that_wants_fresh_draws() {
    let mut tenants = many_tenants(1);
    tenants[0].cache_sampled = false;
    let stack = Stack::start_with(StackOptions {
        tenants: Some(tenants),
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");

    // No temperature: the provider's default (1) samples.
    let sampled = chat_body("roll a die");
    for _ in 0..2 {
        let answer = ask(&stack, "sk-t00", &sampled).await;
        assert_bypassed(&stack, "t00", &sampled, &answer, "sampled").await;
    }
    assert_eq!(
        stack.provider.calls(),
        2,
        "each sampled ask reached the provider"
    );
    assert_eq!(stack.origin_requests(), 2);
    assert_eq!(
        stack.origin_requests_with_header(X_EDGE_MISS),
        0,
        "a bypassed request is not an edge miss to replicate"
    );
    assert!(stack.redis.keys("gw:v1:*").expect("keys").is_empty());

    // Temperature 0 is deterministic: the normal walk.
    let exact = with("roll a die", json!({"temperature": 0}));
    for expected in [("MISS", "upstream"), ("HIT", "origin"), ("HIT", "edge")] {
        let answer = ask(&stack, "sk-t00", &exact).await;
        assert_eq!((answer.cache.as_str(), answer.layer.as_str()), expected);
    }
    assert_eq!(stack.provider.calls(), 3);
    assert_eq!(
        stack.origin_requests_with_header(X_EDGE_MISS),
        2,
        "the two asks the edge missed told the origin so"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_request_bypasses_both_tiers_and_leaves_the_cached_answer_to_plain_requests() {
    let stack = Stack::start().await.expect("stack starts");
    let plain = chat_body("keep this");
    let mut first = Value::Null;
    for expected in [("MISS", "upstream"), ("HIT", "origin"), ("HIT", "edge")] {
        let answer = ask(&stack, ACME, &plain).await;
        assert_eq!((answer.cache.as_str(), answer.layer.as_str()), expected);
        if first.is_null() {
            first = answer.body;
        }
    }
    assert_eq!(stack.provider.calls(), 1);
    let edge_misses = stack.origin_requests_with_header(X_EDGE_MISS);

    let stored = with("keep this", json!({"store": true}));
    for n in 1..=2 {
        let answer = ask(&stack, ACME, &stored).await;
        assert_bypassed(&stack, "acme", &stored, &answer, "store").await;
        assert_eq!(
            stack.provider.calls(),
            1 + n,
            "the provider saw store request {n}"
        );
    }
    assert_eq!(
        stack.origin_requests_with_header(X_EDGE_MISS),
        edge_misses,
        "a bypassed request is not an edge miss to replicate"
    );

    let answer = ask(&stack, ACME, &plain).await;
    assert_eq!(
        (answer.cache.as_str(), answer.layer.as_str()),
        ("HIT", "edge")
    );
    assert_eq!(
        answer.body["id"], first["id"],
        "the plain answer cached first is still the one served"
    );
    assert_eq!(stack.provider.calls(), 3);
}
