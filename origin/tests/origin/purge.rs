//! Purges as a hostile or unlucky tenant meets them: a flood is rate-limited and merged and
//! never holds up another tenant's dual-write; the edge purge is queued even when Redis is
//! down; a purge that cannot be queued is an error, never a 200.

use std::time::{Duration, Instant};

use gateway_fixtures::fastly_api::Fault;
use serde_json::Value;

use crate::harness::{ACME, GLOBEX, Stack, eventually, header, openai_error};
use crate::replication::{edge_miss, fake_api, replicating_to, until_kv_holds};

#[allow(
    clippy::expect_used,
    reason = "test helper: a failed expectation is a failed test"
)]
async fn delete(stack: &Stack, path: &str, key: &str) -> reqwest::Response {
    stack
        .http
        .delete(format!("{}{path}", stack.url))
        .bearer_auth(key)
        .send()
        .await
        .expect("origin answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_flood_is_limited_and_leaves_another_tenants_new_entry_replicated_on_time() {
    let api = fake_api().await;
    // The default linger (1 s) and purge limits: what production runs with.
    let stack = Stack::start_with(replicating_to(&api, |r| r.linger_ms = 1_000)).await;
    edge_miss(&stack, GLOBEX, "globex had this").await;
    until_kv_holds(&api, 1, Duration::from_secs(10)).await;

    let mut statuses = Vec::new();
    for _ in 0..300 {
        let response = delete(&stack, "/v1/cache", GLOBEX).await;
        if response.status() == 429 {
            assert!(header(&response, "retry-after").parse::<u64>().unwrap() >= 1);
        }
        statuses.push(response.status().as_u16());
    }
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(accepted + limited, 300, "{statuses:?}");
    assert!(
        (10..=13).contains(&accepted),
        "the burst (10) and what refilled: {accepted}"
    );

    let asked = Instant::now();
    let (key, _) = edge_miss(&stack, ACME, "acme's new answer").await;
    eventually(
        "acme's entry in the KV store",
        Duration::from_secs(10),
        || async { api.get(&key.kv_key()).is_some() },
    )
    .await;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the linger (1 s) and a request, not the purge backlog: {took:?}"
    );
    // Each accepted purge costs at most one listing (merged ones none).
    assert!(api.stats().list as usize <= accepted, "{:?}", api.stats());
    assert_eq!(stack.metric_sum("gateway_replication_dropped_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_edge_purge_is_still_queued_and_the_caller_told_to_retry() {
    let api = fake_api().await;
    let mut stack = Stack::start_with(replicating_to(&api, |_| {})).await;
    let (key, _) = edge_miss(&stack, ACME, "purge me while redis is down").await;
    until_kv_holds(&api, 1, Duration::from_secs(10)).await;
    stack.settle().await;
    stack.redis.kill();

    let response = delete(&stack, &format!("/v1/cache/{}", key.hex()), ACME).await;
    assert_eq!(response.status(), 503);
    openai_error(response).await;
    eventually(
        "the KV delete despite Redis",
        Duration::from_secs(10),
        || async { api.get(&key.kv_key()).is_none() },
    )
    .await;
    let response = delete(&stack, "/v1/cache", ACME).await;
    assert_eq!(response.status(), 503);
    stack.redis.restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_that_cannot_be_queued_is_refused_not_acknowledged() {
    let api = fake_api().await;
    let mut stack = Stack::start_with(replicating_to(&api, |r| r.purge_queue_capacity = 1)).await;
    api.set_fault(Fault::Hang { ms: None }, None);
    // Without Redis, purges cannot be logged for the replicas: this replica queues them.
    stack.redis.kill();
    let hex = |i: u8| format!("{i:02x}").repeat(32);
    let message = |body: &Value| body["error"]["message"].as_str().unwrap().to_string();
    // The first is taken by the purge lane (and hangs on the API), the second waits. Both
    // are 503 all the same: Redis could not be purged, but the edge purge is queued.
    for i in [1, 2] {
        let queued = delete(&stack, &format!("/v1/cache/{}", hex(i)), ACME).await;
        assert_eq!(queued.status(), 503);
        let body = openai_error(queued).await;
        assert!(message(&body).contains("edge purge is queued"), "{body}");
        if i == 1 {
            // The lane has taken it: its request hangs at the API.
            eventually(
                "the purge lane took it",
                Duration::from_secs(10),
                || async { api.stats().delete > 0 },
            )
            .await;
        }
    }
    let refused = delete(&stack, &format!("/v1/cache/{}", hex(3)), ACME).await;
    assert_eq!(refused.status(), 503);
    assert!(!header(&refused, "retry-after").is_empty());
    let body: Value = openai_error(refused).await;
    assert!(message(&body).contains("nothing was purged"), "{body}");
    api.clear_faults();
    stack.redis.restart();
}
