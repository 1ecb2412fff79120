//! Operations: health, readiness, metrics, models, tenant budgets and the edge shared secret.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{ACME, GLOBEX, Options, Stack, chat_body, header, openai_error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_always_ok_and_readiness_follows_redis_and_the_replication_queue() {
    let mut stack = Stack::start().await;
    let get = |path: &str| stack.http.get(format!("{}{path}", stack.url)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);

    stack.replicator.set_saturated(true);
    let saturated = get("/readyz").await.unwrap();
    assert_eq!(saturated.status(), 503);
    assert!(saturated.text().await.unwrap().contains("replication"));
    stack.replicator.set_saturated(false);

    stack.redis.kill();
    let get = |path: &str| stack.http.get(format!("{}{path}", stack.url)).send();
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    stack.redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = stack
            .http
            .get(format!("{}/readyz", stack.url))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_requests_cache_results_redis_providers_and_tokens() {
    let stack = Stack::start().await;
    stack.chat(ACME, "count me").await;
    stack.settle().await;
    stack.chat(ACME, "count me").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = stack
        .http
        .get(format!("{}/metrics", stack.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"gateway_requests_total{route="chat.completions",status="200"} 2"#,
        r#"gateway_cache_results_total{layer="origin",outcome="hit"} 1"#,
        r#"gateway_cache_results_total{layer="upstream",outcome="miss"} 1"#,
        r#"gateway_redis_duration_seconds_count{op="get"}"#,
        r#"gateway_provider_requests_total{outcome="ok",provider="mock"} 1"#,
        r#"gateway_provider_breaker_state{provider="mock"} 0"#,
        r#"gateway_tokens_used_total{tenant="acme"}"#,
        r#"gateway_tokens_saved_total{tenant="acme",tier="origin"}"#,
        r#"gateway_answers_total{outcome="hit",tenant="acme",tier="origin"} 1"#,
        r#"gateway_answers_total{outcome="miss",tenant="acme",tier="upstream"} 1"#,
        r#"gateway_cache_writes_total{outcome="stored"} 1"#,
    ] {
        assert!(page.contains(needle), "missing {needle} in\n{page}");
    }
    let used = stack.metric(r#"gateway_tokens_used_total{tenant="acme"}"#);
    assert!(used > 0.0);
    assert_eq!(
        stack.metric(r#"gateway_tokens_saved_total{tenant="acme",tier="origin"}"#),
        used
    );
    // The monthly counters reached Redis.
    assert_eq!(stack.redis.keys("gw:usage:{acme}:*").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_what_the_tenant_may_use_in_openai_shape() {
    let stack = Stack::start().await;
    let response = stack
        .http
        .get(format!("{}/v1/models", stack.url))
        .bearer_auth(GLOBEX)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["gpt-4o-mini", "text-embedding-3-small", "claude-haiku-4-5"]
    );
    assert_eq!(body["data"][0]["object"], "model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_rate_limit_requests_get_429_with_retry_after() {
    let stack = Stack::start_with(Options {
        tenants: Box::new(|t| t.requests_per_second = Some(3)),
        ..Options::default()
    })
    .await;
    let mut limited = None;
    for i in 0..12 {
        let response = stack.chat(ACME, &format!("rate {}", i % 2)).await;
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
    }
    let response = limited.expect("a 429 within 12 quick requests at 3 per second");
    assert_eq!(header(&response, "retry-after"), "1");
    let body = openai_error(response).await;
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(stack.metric(r#"gateway_budget_rejections_total{reason="rate",tenant="acme"}"#) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_token_budget_misses_get_429_but_hits_are_still_served() {
    let stack = Stack::start_with(Options {
        tenants: Box::new(|t| t.monthly_token_budget = Some(1)),
        ..Options::default()
    })
    .await;
    assert_eq!(stack.chat(ACME, "spend it").await.status(), 200);
    stack.settle().await;
    let refused = stack.chat(ACME, "one more please").await;
    assert_eq!(refused.status(), 429);
    assert!(header(&refused, "retry-after").parse::<u64>().unwrap() > 0);
    let body = openai_error(refused).await;
    assert_eq!(body["error"]["code"], "insufficient_quota");
    let hit = stack.chat(ACME, "spend it").await;
    assert_eq!(hit.status(), 200, "a hit costs no tokens");
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_required_the_edge_shared_secret_must_be_present_and_right() {
    let stack = Stack::start_with(Options {
        settings: Box::new(|s| {
            s.security.require_edge_secret = true;
            s.security.edge_secret =
                Some(gateway_origin::settings::Secret::new("edge-shared-secret"));
        }),
        ..Options::default()
    })
    .await;
    let body = chat_body("from the edge");
    let missing = stack.post("/v1/chat/completions", ACME, &body).await;
    assert_eq!(missing.status(), 401);
    let known = openai_error(missing).await;
    assert_eq!(known["error"]["code"], "edge_secret_missing");
    // No key oracle: without the secret, an unknown key gets the very same answer.
    let unknown = stack
        .post("/v1/chat/completions", "sk-not-a-tenant", &body)
        .await;
    assert_eq!(unknown.status(), 401);
    assert_eq!(openai_error(unknown).await, known);
    let wrong = stack
        .post_with(
            "/v1/chat/completions",
            ACME,
            &body,
            &[("x-gateway-edge-secret", "guess")],
        )
        .await;
    assert_eq!(wrong.status(), 403);
    openai_error(wrong).await;
    let right = stack
        .post_with(
            "/v1/chat/completions",
            ACME,
            &body,
            &[("x-gateway-edge-secret", "edge-shared-secret")],
        )
        .await;
    assert_eq!(right.status(), 200);
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_metrics_require_it() {
    let stack = Stack::start_with(Options {
        settings: Box::new(|s| {
            s.security.admin_token = Some(gateway_origin::settings::Secret::new("admin-t"))
        }),
        ..Options::default()
    })
    .await;
    let url = format!("{}/metrics", stack.url);
    assert_eq!(stack.http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        stack
            .http
            .get(&url)
            .bearer_auth("admin-t")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn the_binary_refuses_to_start_with_the_development_defaults_outside_dev_mode() {
    let dir = std::env::temp_dir().join(format!("gateway-prod-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("origin.toml");
    std::fs::write(
        &config,
        r#"[server]
listen = "127.0.0.1:0"
[cache]
key_secret = "0123456789abcdef-key"
[[providers]]
name = "p"
base_url = "http://127.0.0.1:9/v1"
models = { "m" = "m" }
"#,
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gateway-origin"))
        .arg("--config")
        .arg(&config)
        .env_clear()
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!output.status.success(), "it started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in [
        "tenants.file",
        "security.require_edge_secret",
        "security.edge_secret",
        "security.admin_token",
        "seal.current",
    ] {
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}
