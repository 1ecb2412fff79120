//! Single-flight: identical concurrent misses make one provider call.

use std::sync::Arc;

use futures_util::future::join_all;
use gateway_fixtures::provider::Fault;
use serde_json::Value;

use crate::harness::{ACME, Options, Stack, header, mock_config};

fn unlimited() -> Options {
    Options {
        // Slow enough that every request arrives while the first is still at the provider.
        providers: vec![mock_config("mock", 500)],
        // The fixture tenants allow 100 requests per second; this test sends 200 at once.
        tenants: Box::new(|t| t.requests_per_second = None),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_identical_concurrent_requests_on_a_cold_key_reach_the_provider_once() {
    let stack = Arc::new(Stack::start_with(unlimited()).await);
    let requests = (0..200).map(|_| {
        let stack = Arc::clone(&stack);
        async move {
            let response = stack.chat(ACME, "everyone asks this at once").await;
            let status = response.status().as_u16();
            let cache = header(&response, "x-cache").to_string();
            let body: Value = response.json().await.unwrap();
            (status, cache, body)
        }
    });
    let answers = join_all(requests).await;
    assert_eq!(
        stack.provider_calls(),
        1,
        "one provider call for 200 identical requests"
    );
    assert!(answers.iter().all(|(status, _, _)| *status == 200));
    let first = &answers[0].2;
    assert!(
        answers.iter().all(|(_, _, body)| body == first),
        "every waiter gets the same answer"
    );
    let waiters = stack.metric("gateway_coalesced_waiters_total");
    let hits = answers
        .iter()
        .filter(|(_, cache, _)| cache == "HIT")
        .count() as f64;
    assert_eq!(waiters + hits, 199.0, "all but the leader waited or hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_fails_its_waiters_share_the_failure_instead_of_stampeding() {
    let stack = Arc::new(
        Stack::start_with(Options {
            // Long enough for all 20 to arrive while the leader waits, on a loaded machine.
            settings: Box::new(|s| s.providers[0].timeout_ms = 3_000),
            ..unlimited()
        })
        .await,
    );
    // The leader's call hangs past its timeout, so every other request arrives while it is
    // still in flight.
    stack.provider().set_fault(Fault::Hang { ms: None }, None);
    let requests = (0..20).map(|_| {
        let stack = Arc::clone(&stack);
        async move { stack.chat(ACME, "this will fail").await.status().as_u16() }
    });
    let statuses = join_all(requests).await;
    stack.provider().clear_faults();
    assert!(statuses.iter().all(|s| *s == 504), "{statuses:?}");
    assert_eq!(
        stack.provider_calls(),
        1,
        "the waiters did not retry on their own"
    );
    stack.settle().await;
    assert_eq!(stack.redis.entries(), 0, "errors are never cached");
}
