//! Provider router: failover within a request, circuit breakers, and credentials.

use std::time::{Duration, Instant};

use gateway_fixtures::provider::Fault;

use crate::harness::{ACME, Options, PROVIDER_KEY, Stack, header, mock_config};

fn two_providers(first_timeout_ms: u64) -> Options {
    Options {
        providers: vec![mock_config("first", 0), mock_config("second", 0)],
        settings: Box::new(move |s| {
            s.providers[0].timeout_ms = first_timeout_ms;
            s.router.breaker_failure_threshold = 3;
        }),
        ..Options::default()
    }
}

/// A status fault without `Retry-After`.
fn status(status: u16) -> Fault {
    Fault::Status {
        status,
        retry_after_secs: None,
    }
}

/// Sends a chat and asserts which provider answered it.
async fn assert_answered_by(stack: &Stack, prompt: &str, provider: &str) {
    let response = stack.chat(ACME, prompt).await;
    assert_eq!(
        header(&response, "x-upstream-provider"),
        provider,
        "{prompt}"
    );
}

fn first_breaker_state(stack: &Stack) -> f64 {
    stack.metric(r#"gateway_provider_breaker_state{provider="first"}"#)
}

async fn assert_skipped(fault: Fault) {
    let stack = Stack::start_with(two_providers(300)).await;
    stack.providers[0].set_fault(fault.clone(), None);
    let started = Instant::now();
    let response = stack.chat(ACME, "fail over please").await;
    assert_eq!(response.status(), 200, "{fault:?}");
    assert_eq!(
        header(&response, "x-upstream-provider"),
        "second",
        "{fault:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{fault:?} took {:?}",
        started.elapsed()
    );
    assert_eq!(stack.providers[0].calls(), 1);
    assert_eq!(stack.providers[1].calls(), 1);
    stack.providers[0].clear_faults();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_provider_answering_500_is_skipped_within_the_request() {
    assert_skipped(status(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_provider_resetting_the_connection_is_skipped_within_the_request() {
    assert_skipped(Fault::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_provider_hanging_past_its_timeout_is_skipped_within_the_request() {
    assert_skipped(Fault::Hang { ms: None }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_provider_answering_429_is_skipped_within_the_request() {
    assert_skipped(Fault::Status {
        status: 429,
        retry_after_secs: Some(1),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_error_from_the_provider_is_returned_not_retried_and_not_cached() {
    let stack = Stack::start_with(two_providers(300)).await;
    stack.providers[0].set_fault(status(400), None);
    let response = stack.chat(ACME, "bad for the provider").await;
    assert_eq!(response.status(), 400);
    assert_eq!(stack.providers[1].calls(), 0);
    stack.settle().await;
    assert_eq!(stack.redis.entries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_repeated_failures_the_breaker_opens_and_later_closes_again() {
    // A cool-down long enough that the request "while open" comes within it on a loaded
    // machine.
    let stack = Stack::start_with(Options {
        settings: Box::new(|s| {
            s.providers[0].timeout_ms = 300;
            s.router.breaker_failure_threshold = 3;
            s.router.breaker_cooldown_ms = 3_000;
        }),
        ..two_providers(300)
    })
    .await;
    let first = &stack.providers[0];
    first.set_fault(status(503), None);
    for i in 0..3 {
        assert_answered_by(&stack, &format!("trip {i}"), "second").await;
    }
    assert_eq!(first.calls(), 3);
    assert_eq!(first_breaker_state(&stack), 2.0, "open");

    // Open: the first provider is not even tried.
    assert_answered_by(&stack, "while open", "second").await;
    assert_eq!(first.calls(), 3);

    // After the cool-down one probe goes through; it succeeds and the breaker closes.
    first.clear_faults();
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert_answered_by(&stack, "probe", "first").await;
    assert_eq!(first.calls(), 4);
    assert_eq!(first_breaker_state(&stack), 0.0, "closed");
    assert_answered_by(&stack, "closed again", "first").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_provider_fails_the_client_gets_a_502_in_openai_shape() {
    let stack = Stack::start_with(two_providers(300)).await;
    for p in &stack.providers {
        p.set_fault(status(500), None);
    }
    let response = stack.chat(ACME, "nobody can answer").await;
    assert_eq!(response.status(), 502);
    let body = crate::harness::openai_error(response).await;
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_gets_its_own_key_never_the_clients() {
    let stack = Stack::start().await;
    stack.chat(ACME, "who am I").await;
    let seen = stack.provider().last_authorization().unwrap_or_default();
    assert_eq!(seen, format!("Bearer {PROVIDER_KEY}"));
    assert!(!seen.contains(ACME));
}
