//! The edge tier under Viceroy against a real origin, Redis and the mock provider.

use std::time::{Duration, Instant};

use gateway_common::entry::ENTRY_VERSION;
use gateway_common::route::Route;
use gateway_e2e::edge::KvSeed;
use gateway_e2e::entry::{completion, kv_seed, now};
use gateway_e2e::stack::{ACME, GLOBEX, Stack, StackOptions, chat_body, header, key_for};
use serde_json::{Value, json};

async fn content(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("a JSON body");
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_identical_requests_are_answered_by_provider_then_origin_then_edge() {
    let stack = Stack::start().await.expect("stack starts");

    let first = stack.edge_chat(ACME, "walk the tiers").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(header(&first, "x-cache-layer"), "upstream");
    assert!(
        header(&first, "cache-status").contains("gateway-edge; fwd=miss"),
        "{}",
        header(&first, "cache-status")
    );
    let timing = header(&first, "server-timing");
    for step in ["auth", "kv", "origin", "upstream"] {
        assert!(
            timing.contains(step),
            "server-timing {timing:?} lacks {step}"
        );
    }
    let answer = content(first).await;
    stack.settle().await;

    let second = stack.edge_chat(ACME, "walk the tiers").await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert_eq!(header(&second, "x-cache-layer"), "origin");
    assert!(header(&second, "cache-status").contains("stored"));
    assert_eq!(content(second).await, answer);
    // The edge stores the origin's hit after it has answered.
    stack.settle().await;

    let before = stack.origin_requests();
    let third = stack.edge_chat(ACME, "walk the tiers").await;
    assert_eq!(header(&third, "x-cache"), "HIT");
    assert_eq!(header(&third, "x-cache-layer"), "edge");
    assert!(header(&third, "cache-status").starts_with("gateway-edge; hit; ttl="));
    assert_eq!(
        header(&third, "x-cache-key"),
        key_for("acme", Route::ChatCompletions, &chat_body("walk the tiers")).hex()
    );
    assert!(!header(&third, "age").is_empty());
    assert_eq!(content(third).await, answer);
    assert_eq!(
        stack.origin_requests(),
        before,
        "an edge hit never crosses to the origin"
    );
    assert_eq!(
        stack.provider.calls(),
        1,
        "the provider saw exactly one call"
    );

    let other = stack.edge_chat(GLOBEX, "walk the tiers").await;
    assert_eq!(
        header(&other, "x-cache"),
        "MISS",
        "another tenant never shares an entry"
    );
    assert_eq!(header(&other, "x-cache-layer"), "upstream");
    assert_eq!(stack.provider.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_request_is_answered_at_the_edge_from_a_cached_completion() {
    let stack = Stack::start().await.expect("stack starts");
    for _ in 0..2 {
        let resp = stack.edge_chat(ACME, "stream me later").await;
        assert_eq!(resp.status(), 200);
        stack.settle().await;
    }
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "stream me later"}],
                      "stream": true, "stream_options": {"include_usage": true}});
    let resp = stack
        .edge_post("/v1/chat/completions", ACME, &body, &[])
        .await;
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let text = resp.text().await.expect("body");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        text.contains("\"usage\""),
        "include_usage adds a usage chunk"
    );
    assert_eq!(stack.provider.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_entries_that_do_not_belong_to_the_request_are_never_served() {
    let t = now();
    let good = completion("acme", "control", t, 3600, "seeded-good");

    let mut other_tenant = completion("acme", "other tenant", t, 3600, "seeded-bad");
    other_tenant.envelope.tenant = "globex".to_owned();
    let unknown_version = completion("acme", "unknown version", t, 3600, "seeded-bad");
    let expired = completion("acme", "expired", t - 7200, 3600, "seeded-bad");

    let mut seeds: Vec<KvSeed> = [&good, &expired].into_iter().map(kv_seed).collect();
    let mut future = kv_seed(&unknown_version);
    let metadata = future.metadata.take().unwrap_or_default();
    future.metadata = Some(metadata.replacen(
        &format!("\"v\":{ENTRY_VERSION}"),
        &format!("\"v\":{}", ENTRY_VERSION + 1),
        1,
    ));
    seeds.push(future);
    // Metadata naming another tenant, stored under acme's key.
    let mut misfiled = kv_seed(&other_tenant);
    misfiled.key = format!("v1/acme/{}", other_tenant.envelope.key);
    seeds.push(misfiled);
    let corrupt_key = key_for("acme", Route::ChatCompletions, &chat_body("corrupt"));
    seeds.push(KvSeed {
        key: corrupt_key.kv_key(),
        data: b"{\"choices\":[".to_vec(),
        metadata: Some("{not json".to_owned()),
    });
    let bare = completion("acme", "no metadata", t, 3600, "seeded-bad");
    seeds.push(KvSeed {
        metadata: None,
        ..kv_seed(&bare)
    });

    let stack = Stack::start_with(StackOptions {
        kv: seeds,
        ..StackOptions::default()
    })
    .await
    .expect("stack");

    let resp = stack.edge_chat(ACME, "control").await;
    assert_eq!(
        header(&resp, "x-cache-layer"),
        "edge",
        "the well-formed seed is served"
    );
    assert_eq!(content(resp).await, "seeded-good");

    for prompt in [
        "other tenant",
        "unknown version",
        "expired",
        "corrupt",
        "no metadata",
    ] {
        let resp = stack.edge_chat(ACME, prompt).await;
        assert_eq!(resp.status(), 200, "{prompt}");
        assert_ne!(
            header(&resp, "x-cache-layer"),
            "edge",
            "{prompt} must not be served from the edge"
        );
        let text = content(resp).await;
        assert!(
            text.starts_with("echo:"),
            "{prompt}: answered by the provider, got {text:?}"
        );
    }
    assert_eq!(stack.provider.calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_origin_down_the_edge_serves_fresh_then_stale_then_a_clean_503() {
    let t = now();
    let fresh = completion("acme", "fresh while down", t, 3600, "seeded-fresh");
    // Expired by its own created-at + TTL, but inside acme's stale-if-error window.
    let stale = completion("acme", "stale while down", t - 7200, 3600, "seeded-stale");
    let seeds = vec![kv_seed(&fresh), kv_seed(&stale)];
    let mut stack = Stack::start_with(StackOptions {
        kv: seeds,
        ..StackOptions::default()
    })
    .await
    .expect("stack");
    stack.stop_origin().await;

    let resp = stack.edge_chat(ACME, "fresh while down").await;
    assert_eq!(header(&resp, "x-cache"), "HIT");
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    assert_eq!(content(resp).await, "seeded-fresh");

    let resp = stack.edge_chat(ACME, "stale while down").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "STALE");
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    assert_eq!(content(resp).await, "seeded-stale");

    let started = Instant::now();
    let resp = stack.edge_chat(ACME, "nothing cached").await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("JSON error");
    assert_eq!(body["error"]["type"], "api_error");
    assert!(body["error"]["message"].is_string());
    // Functional bound, not a benchmark: far below the 1 s connect timeout plus slack.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered within the connect timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_api_key_is_refused_at_the_edge_without_reaching_the_origin() {
    let stack = Stack::start().await.expect("stack starts");
    for key in ["sk-not-a-tenant", ""] {
        let resp = stack.edge_chat(key, "who am i").await;
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    let resp = stack
        .edge_post(
            "/v1/chat/completions",
            ACME,
            &json!({"model": "gpt-4o", "messages": []}),
            &[],
        )
        .await;
    assert_eq!(resp.status(), 400, "bad bodies are refused at the edge too");
    let resp = stack
        .edge_post(
            "/v1/chat/completions",
            ACME,
            &json!({"model": "gpt-4-secret", "messages": [{"role": "user", "content": "x"}]}),
            &[],
        )
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(stack.origin_requests(), 0, "the origin saw no request");
    assert_eq!(stack.provider.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_endpoints_pass_through_the_edge_unchanged() {
    let stack = Stack::start().await.expect("stack starts");
    let resp = stack
        .http
        .get(format!("{}/v1/models", stack.edge.url()))
        .bearer_auth(ACME)
        .send()
        .await
        .expect("models");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("JSON");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini"), "{ids:?}");

    let resp = stack
        .edge_post(
            "/v1/embeddings",
            ACME,
            &json!({"model": "text-embedding-3-small", "input": "edge"}),
            &[],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(stack.origin_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_control_no_store_bypasses_the_edge_and_no_cache_skips_its_read() {
    let stack = Stack::start().await.expect("stack starts");
    for _ in 0..2 {
        stack.edge_chat(ACME, "directives").await;
        stack.settle().await;
    }
    let body = chat_body("directives");
    let resp = stack
        .edge_post("/v1/chat/completions", ACME, &body, &[])
        .await;
    assert_eq!(header(&resp, "x-cache-layer"), "edge");

    let resp = stack
        .edge_post(
            "/v1/chat/completions",
            ACME,
            &body,
            &[("cache-control", "no-cache")],
        )
        .await;
    assert_ne!(
        header(&resp, "x-cache-layer"),
        "edge",
        "no-cache skips the edge read"
    );
    assert!(header(&resp, "cache-status").contains("gateway-edge; fwd=request"));

    let resp = stack
        .edge_post(
            "/v1/chat/completions",
            ACME,
            &body,
            &[("cache-control", "no-store")],
        )
        .await;
    assert_eq!(header(&resp, "x-cache"), "BYPASS");
    assert!(header(&resp, "cache-status").contains("gateway-edge; fwd=bypass"));
}
