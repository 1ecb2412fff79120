//! Redis failing open: killed or paused, every request is still answered from the provider
//! within the Redis bound plus the provider's time, and hits resume when Redis is back.

use std::time::{Duration, Instant};

use crate::harness::{ACME, Options, Stack, header, mock_config};

/// Provider latency in these tests.
const PROVIDER_MS: u64 = 50;
/// Scheduling slack for a loaded 2-core machine; far below the 2 s a stuck Redis would cost.
const SLACK_MS: u64 = 500;

/// The production Redis bound (the harness loosens it for the other tests).
fn options() -> Options {
    Options {
        providers: vec![mock_config("mock", PROVIDER_MS)],
        settings: Box::new(|s| {
            s.redis.response_timeout_ms = 50;
            s.redis.pool_wait_timeout_ms = 20;
        }),
        ..Options::default()
    }
}

/// The longest a request may wait on Redis: a pool wait or a connect, then one round trip.
fn redis_bound(stack: &Stack) -> Duration {
    let r = &stack.settings.redis;
    Duration::from_millis(r.pool_wait_timeout_ms.max(r.connect_timeout_ms) + r.response_timeout_ms)
}

/// Sends a few requests (repeats and new prompts); each must succeed within the bound.
async fn every_request_succeeds_in_time(stack: &Stack, round: &str) {
    let limit = redis_bound(stack) + Duration::from_millis(PROVIDER_MS + SLACK_MS);
    for i in 0..8 {
        let prompt = if i % 2 == 0 {
            "warm".to_string()
        } else {
            format!("{round} {i}")
        };
        let started = Instant::now();
        let response = stack.chat(ACME, &prompt).await;
        let took = started.elapsed();
        assert_eq!(response.status(), 200, "{round} request {i}");
        assert_ne!(
            header(&response, "x-cache"),
            "HIT",
            "{round} request {i}: Redis cannot serve now"
        );
        assert!(
            took < limit,
            "{round} request {i} took {took:?}, over {limit:?}"
        );
        let _ = response.bytes().await;
    }
}

/// Polls until `prompt` is a Redis hit again (after storing it once if needed).
async fn hits_resume(stack: &Stack, prompt: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = stack.chat(ACME, prompt).await;
        assert_eq!(response.status(), 200);
        if header(&response, "x-cache") == "HIT" {
            return;
        }
        stack.settle().await;
        assert!(Instant::now() < deadline, "hits did not resume within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn warm(stack: &Stack) {
    stack.chat(ACME, "warm").await;
    stack.settle().await;
    assert_eq!(header(&stack.chat(ACME, "warm").await, "x-cache"), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_every_request_succeeds_and_hits_resume_after_a_restart() {
    let mut stack = Stack::start_with(options()).await;
    warm(&stack).await;
    stack.redis.kill();
    every_request_succeeds_in_time(&stack, "killed").await;
    assert!(
        stack.metric_sum("gateway_redis_errors_total") > 0.0,
        "the failures are counted"
    );
    let before = stack.provider_calls();
    stack.redis.restart();
    hits_resume(&stack, "after the restart").await;
    assert!(stack.provider_calls() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_frozen_by_sigstop_every_request_succeeds_and_hits_resume_after() {
    let stack = Stack::start_with(options()).await;
    warm(&stack).await;
    stack.redis.freeze();
    every_request_succeeds_in_time(&stack, "frozen").await;
    stack.redis.thaw();
    hits_resume(&stack, "warm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_paused_by_client_pause_every_request_succeeds_and_hits_resume_after() {
    let stack = Stack::start_with(options()).await;
    warm(&stack).await;
    // Long enough to cover the eight requests on a loaded machine; the hits resume after it.
    assert_eq!(stack.redis.cli(&["CLIENT", "PAUSE", "8000", "ALL"]), "OK");
    every_request_succeeds_in_time(&stack, "paused").await;
    hits_resume(&stack, "warm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_during_a_freeze_all_succeed() {
    let stack = std::sync::Arc::new(Stack::start_with(options()).await);
    stack.redis.freeze();
    let requests = (0..40).map(|i| {
        let stack = std::sync::Arc::clone(&stack);
        async move {
            stack
                .chat(ACME, &format!("burst {}", i % 5))
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    stack.redis.thaw();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Without Redis an answer cannot be stored, so later arrivals may call again; concurrent
    // ones still coalesce.
    assert!(
        stack.provider_calls() < 40,
        "coalescing still works without Redis"
    );
}
