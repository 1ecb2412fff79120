//! Replicas behind the round-robin proxy coalesce identical misses into one provider call, and
//! a tenant's monthly token budget holds across them within the bound the README states.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use gateway_common::tenant::Tenant;
use gateway_e2e::replica_stack::{ReplicaStack, ReplicaStackOptions};
use gateway_e2e::stack::{ACME, fixture_tenants};
use gateway_fixtures::ProviderConfig;
use serde_json::Value;

/// The fixture tenants without a rate limit, with a monthly token `budget`.
fn tenants(budget: Option<u64>) -> Vec<Tenant> {
    fixture_tenants(|t| {
        t.requests_per_second = None;
        t.monthly_token_budget = budget;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ninety_identical_misses_over_three_replicas_make_one_provider_call() {
    let stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 3,
        tenants: Some(tenants(None)),
        provider: ProviderConfig {
            latency_ms: 500,
            ..ProviderConfig::default()
        },
        // This is about a healthy Redis: on a machine busy with other tests, a Redis call (or
        // one of the 30 connections each replica opens at once, cold) past the default bound
        // makes a replica fall back to its own single flight (by design: a clean CI run saw
        // one call per replica so), which is not what is measured here.
        settings: Some(Box::new(|_, config| {
            config
                .set("redis", "response_timeout_ms", "2000")
                .set("redis", "pool_wait_timeout_ms", "2000")
                .set("redis", "connect_timeout_ms", "2000");
        })),
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    let stack = Arc::new(stack);
    let requests = (0..90).map(|_| {
        let stack = Arc::clone(&stack);
        async move {
            let resp = stack.proxy_chat(ACME, "ninety at once").await;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("JSON");
            (status, body["id"].clone())
        }
    });
    let answers = join_all(requests).await;
    let served: Vec<u64> = stack
        .replicas
        .proxy()
        .stats()
        .iter()
        .map(|s| s.connections)
        .collect();
    println!(
        "single flight: 90 requests over replicas {served:?}, {} provider call(s)",
        stack.provider.calls()
    );
    assert!(
        served.iter().all(|&n| n >= 20),
        "spread over every replica: {served:?}"
    );
    assert!(answers.iter().all(|(status, _)| *status == 200));
    if stack.provider.calls() != 1 {
        // What each replica did, for the failure message.
        for i in 0..3 {
            let page = stack.replicas.metrics(i).await.unwrap_or_default();
            for line in page.lines().filter(|l| {
                l.starts_with("gateway_coalesced")
                    || l.starts_with("gateway_redis_errors")
                    || l.starts_with("gateway_provider_requests")
            }) {
                println!("replica {i}: {line}");
            }
            for line in stack.replicas.log(i).lines().filter(|l| l.contains("WARN")) {
                println!("replica {i} log: {line}");
            }
        }
    }
    assert!(
        answers.iter().all(|(_, id)| *id == answers[0].1),
        "one answer for all"
    );
    assert_eq!(stack.provider.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_at_its_token_budget_overshoots_only_by_the_calls_in_flight() {
    const BUDGET: u64 = 2_000;
    const CONCURRENCY: u64 = 4;
    let stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 3,
        tenants: Some(tenants(Some(BUDGET))),
        provider: ProviderConfig {
            latency_ms: 50,
            ..ProviderConfig::default()
        },
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    let stack = Arc::new(stack);
    let (next, refused, largest) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    // CONCURRENCY clients per replica, distinct prompts (every one a provider call), until
    // the budget refuses them.
    let workers = (0..3 * CONCURRENCY).map(|w| {
        let (stack, next, refused, largest) = (
            Arc::clone(&stack),
            Arc::clone(&next),
            Arc::clone(&refused),
            Arc::clone(&largest),
        );
        async move {
            let replica = (w % 3) as usize;
            while !refused.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let resp = stack
                    .replica_chat(replica, ACME, &format!("spend tokens {i}"))
                    .await;
                match resp.status().as_u16() {
                    200 => {
                        let body: Value = resp.json().await.expect("JSON");
                        let tokens = body["usage"]["total_tokens"].as_u64().expect("usage");
                        largest.fetch_max(tokens, Ordering::SeqCst);
                    }
                    429 => refused.store(true, Ordering::SeqCst),
                    other => panic!("unexpected {other}"),
                }
            }
        }
    });
    join_all(workers).await;
    // Each replica flushes what Redis did not take at once within its flush interval.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let month = stack
        .redis
        .keys("gw:usage:{acme}:*")
        .expect("redis keys")
        .pop()
        .expect("the usage counter");
    let used: u64 = stack
        .redis
        .cli(&["GET", &month])
        .expect("GET")
        .trim()
        .parse()
        .expect("a number");
    let bound = 3 * CONCURRENCY * largest.load(Ordering::SeqCst);
    println!(
        "token budget across 3 replicas: budget {BUDGET}, used {used}, overshoot {} (bound {bound}: the calls in flight)",
        used.saturating_sub(BUDGET)
    );
    assert!(used >= BUDGET, "the budget was reached: {used}");
    assert!(used <= BUDGET + bound, "{used} > {BUDGET} + {bound}");
}
