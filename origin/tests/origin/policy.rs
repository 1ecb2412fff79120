//! The tenant's cache policy: sampled answers and `store: true` requests use the cache only
//! when the tenant chose it, and the bypass says why in `Cache-Status`.

use serde_json::{Value, json};

use crate::harness::{ACME, Options, Stack, chat_body, header};

async fn ask(stack: &Stack, body: &Value) -> reqwest::Response {
    let response = stack.post("/v1/chat/completions", ACME, body).await;
    assert_eq!(response.status(), 200);
    stack.settle().await;
    response
}

fn with(prompt: &str, extra: Value) -> Value {
    let mut body = chat_body(prompt);
    for (name, value) in extra.as_object().into_iter().flatten() {
        body[name] = value.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_request_goes_to_the_provider_uncached_unless_the_tenant_opts_in() {
    let stack = Stack::start().await;
    ask(&stack, &chat_body("keep this")).await;
    assert_eq!(stack.provider_calls(), 1);
    let stored = ask(&stack, &with("keep this", json!({"store": true}))).await;
    assert_eq!(header(&stored, "x-cache"), "BYPASS");
    assert_eq!(
        header(&stored, "cache-status"),
        "gateway-origin; fwd=bypass; detail=store"
    );
    assert_eq!(
        stack.provider_calls(),
        2,
        "the provider saw the store request"
    );
    let plain = ask(&stack, &chat_body("keep this")).await;
    assert_eq!(header(&plain, "x-cache"), "HIT", "the entry is untouched");

    let opted_in = Stack::start_with(Options {
        tenants: Box::new(|t| t.cache_store_requests = true),
        ..Options::default()
    })
    .await;
    ask(&opted_in, &chat_body("keep this")).await;
    let stored = ask(&opted_in, &with("keep this", json!({"store": true}))).await;
    assert_eq!(header(&stored, "x-cache"), "HIT");
    assert_eq!(opted_in.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_answers_bypass_the_cache_for_a_tenant_that_wants_fresh_draws() {
    let stack = Stack::start_with(Options {
        tenants: Box::new(|t| t.cache_sampled = false),
        ..Options::default()
    })
    .await;
    for _ in 0..2 {
        let sampled = ask(&stack, &chat_body("roll a die")).await;
        assert_eq!(header(&sampled, "x-cache"), "BYPASS");
        assert_eq!(
            header(&sampled, "cache-status"),
            "gateway-origin; fwd=bypass; detail=sampled"
        );
    }
    assert_eq!(stack.provider_calls(), 2);
    assert_eq!(stack.redis.entries(), 0, "nothing written");

    // Deterministic asks are still cached: temperature 0, or a seed.
    for extra in [json!({"temperature": 0}), json!({"seed": 42})] {
        let body = with("roll a die", extra);
        assert_eq!(header(&ask(&stack, &body).await, "x-cache"), "MISS");
        assert_eq!(header(&ask(&stack, &body).await, "x-cache"), "HIT");
    }
    assert_eq!(stack.provider_calls(), 4);

    // The default (cache_sampled: true) replays one sample.
    let default = Stack::start().await;
    ask(&default, &chat_body("roll a die")).await;
    assert_eq!(
        header(&ask(&default, &chat_body("roll a die")).await, "x-cache"),
        "HIT"
    );
}
