//! Hit and miss through Redis: the header vocabulary, tenant scoping, cache-control, purges
//! and the replication seam.

use serde_json::{Value, json};

use std::time::Duration;

use crate::harness::{ACME, GLOBEX, Stack, chat_body, eventually, header};

/// A chat completion request for `body` from acme with extra `headers`.
async fn chat_with(stack: &Stack, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    stack
        .post_with("/v1/chat/completions", ACME, body, headers)
        .await
}

/// An acme `DELETE` of `path`.
#[allow(
    clippy::expect_used,
    reason = "test helper: a failed expectation is a failed test"
)]
async fn delete(stack: &Stack, path: &str) -> reqwest::Response {
    stack
        .http
        .delete(format!("{}{path}", stack.url))
        .bearer_auth(ACME)
        .send()
        .await
        .expect("origin answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_identical_request_is_an_origin_hit_and_the_provider_saw_one_call() {
    let stack = Stack::start().await;
    let first = stack.chat(ACME, "What is a cache?").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(header(&first, "x-cache-layer"), "upstream");
    assert_eq!(
        header(&first, "cache-status"),
        "gateway-origin; fwd=uri-miss; stored"
    );
    assert_eq!(header(&first, "x-upstream-provider"), "mock");
    let key = header(&first, "x-cache-key").to_string();
    assert_eq!(key.len(), 64);
    let first_body: Value = first.json().await.unwrap();
    stack.settle().await;

    let second = stack.chat(ACME, "What is a cache?").await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert_eq!(header(&second, "x-cache-layer"), "origin");
    assert!(header(&second, "cache-status").starts_with("gateway-origin; hit; ttl="));
    assert_eq!(header(&second, "x-cache-key"), key);
    assert!(header(&second, "age").parse::<u64>().is_ok());
    let timing = header(&second, "server-timing");
    assert!(
        timing.contains("redis;dur=") && timing.contains("total;dur="),
        "{timing}"
    );
    assert_eq!(header(&second, "x-upstream-provider"), "mock");
    let second_body: Value = second.json().await.unwrap();
    assert_eq!(first_body, second_body);
    assert_eq!(stack.provider_calls(), 1);
    assert_eq!(
        stack.metric(r#"gateway_cache_results_total{layer="origin",outcome="hit"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_prompt_from_another_tenant_is_a_miss() {
    let stack = Stack::start().await;
    let acme = stack.chat(ACME, "Same words").await;
    let acme_key = header(&acme, "x-cache-key").to_string();
    stack.settle().await;
    let globex = stack.chat(GLOBEX, "Same words").await;
    assert_eq!(globex.status(), 200);
    assert_eq!(header(&globex, "x-cache"), "MISS");
    assert_ne!(header(&globex, "x-cache-key"), acme_key);
    assert_eq!(stack.provider_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_that_do_not_change_the_answer_share_one_entry() {
    let stack = Stack::start().await;
    stack.chat(ACME, "hello").await;
    stack.settle().await;
    let mut body = chat_body("hello");
    body["user"] = json!("someone");
    let again = stack.post("/v1/chat/completions", ACME, &body).await;
    assert_eq!(header(&again, "x-cache"), "HIT");
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_bypasses_the_cache_and_no_cache_refreshes_it() {
    let stack = Stack::start().await;
    let body = chat_body("directives");
    let bypass = chat_with(&stack, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(header(&bypass, "x-cache"), "BYPASS");
    assert_eq!(
        header(&bypass, "cache-status"),
        "gateway-origin; fwd=bypass; detail=no-store"
    );
    stack.settle().await;
    assert_eq!(stack.redis.entries(), 0, "no-store writes nothing");

    let refresh = chat_with(&stack, &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(header(&refresh, "x-cache"), "MISS");
    assert_eq!(
        header(&refresh, "cache-status"),
        "gateway-origin; fwd=request; stored"
    );
    stack.settle().await;
    let hit = stack.post("/v1/chat/completions", ACME, &body).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert_eq!(stack.provider_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_in_flight_until_its_write_has_landed() {
    // A `no-cache` refresh leads no coalesced flight, yet its provider call and its write are
    // work in flight: `settle` (and an operator) must see them.
    let stack = Stack::start_with(crate::harness::Options {
        providers: vec![crate::harness::mock_config("mock", 500)],
        ..crate::harness::Options::default()
    })
    .await;
    let body = chat_body("refreshed while watched");
    let refresh = {
        let (http, url) = (stack.http.clone(), stack.url.clone());
        let body = body.clone();
        tokio::spawn(async move {
            http.post(format!("{url}/v1/chat/completions"))
                .bearer_auth(ACME)
                .header("cache-control", "no-cache")
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    eventually("the refresh in flight", Duration::from_secs(10), || async {
        stack.service.in_flight() > 0
    })
    .await;
    assert_eq!(refresh.await.ok().and_then(Result::ok), Some(200));
    stack.settle().await;
    assert_eq!(stack.redis.entries(), 1, "settled means written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_cached_like_completions() {
    let stack = Stack::start().await;
    let body = json!({"model": "text-embedding-3-small", "input": "embed me"});
    let first = stack.post("/v1/embeddings", ACME, &body).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    stack.settle().await;
    let second = stack.post("/v1/embeddings", ACME, &body).await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    let json: Value = second.json().await.unwrap();
    assert_eq!(json["object"], "list");
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_deletes_one_key_and_purges_only_its_own_entries() {
    let stack = Stack::start().await;
    let one = stack.chat(ACME, "one").await;
    let key = header(&one, "x-cache-key").to_string();
    stack.chat(ACME, "two").await;
    stack.chat(GLOBEX, "one").await;
    stack.settle().await;
    assert_eq!(stack.redis.entries(), 3);

    let deleted = delete(&stack, &format!("/v1/cache/{key}")).await;
    assert_eq!(deleted.status(), 200);
    let json: Value = deleted.json().await.unwrap();
    assert_eq!(json["deleted"], true);
    assert_eq!(header(&stack.chat(ACME, "one").await, "x-cache"), "MISS");
    stack.settle().await;

    let purged = delete(&stack, "/v1/cache").await;
    assert_eq!(purged.status(), 200);
    let json: Value = purged.json().await.unwrap();
    assert_eq!(
        json["generation"], 1,
        "a tenant purge is one generation bump"
    );
    // Unservable at once, whatever Redis still holds; removed from Redis soon after.
    assert_eq!(header(&stack.chat(ACME, "two").await, "x-cache"), "MISS");
    stack.settle().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while stack.redis.keys("gw:v1:acme:*").len() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "old entries not removed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let again = stack.chat(ACME, "two").await;
    assert_eq!(
        header(&again, "x-cache"),
        "HIT",
        "the entry written since the purge is kept"
    );
    assert_eq!(header(&stack.chat(GLOBEX, "one").await, "x-cache"), "HIT");
    assert_eq!(
        stack.replicator.purges(),
        vec![format!("key:{key}"), "tenant:acme@1".to_string()]
    );

    let bad = delete(&stack, "/v1/cache/not-a-key").await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_answered_for_an_edge_miss_are_offered_for_replication() {
    let stack = Stack::start().await;
    let edge_miss = [("x-gateway-edge-miss", "1")];
    let miss = chat_with(&stack, &chat_body("replicate me"), &edge_miss).await;
    let key = header(&miss, "x-cache-key").to_string();
    stack.settle().await;
    assert_eq!(stack.replicator.offered_keys(), vec![key.clone()]);

    // A hit for an edge miss is offered too (the edge lacked it); a plain hit is not.
    let hit = chat_with(&stack, &chat_body("replicate me"), &edge_miss).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    stack.chat(ACME, "replicate me").await;
    stack.chat(ACME, "not for the edge").await;
    stack.settle().await;
    assert_eq!(stack.replicator.offered_keys(), vec![key.clone(), key]);
}
