//! The dual-write to the edge tier against the fake Fastly KV API: what is written, how few
//! requests it takes, how an API outage is absorbed (and what is dropped), and purges.
#![allow(
    clippy::expect_used,
    reason = "test helpers: a failed expectation is a failed test"
)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway_common::entry::Entry;
use gateway_common::key::CacheKey;
use gateway_fixtures::fastly_api::Fault;
use gateway_fixtures::{FakeFastlyApi, FastlyApiConfig};
use gateway_origin::settings::{ReplicationSettings, Secret};
use serde_json::Value;

use crate::harness::{ACME, GLOBEX, Options, Stack, chat_body, dev_keys, eventually, header};

pub(crate) const EDGE_MISS: [(&str, &str); 1] = [("x-gateway-edge-miss", "1")];

pub(crate) async fn fake_api() -> FakeFastlyApi {
    FakeFastlyApi::start(FastlyApiConfig::default())
        .await
        .expect("the fake Fastly API starts")
}

/// Options that point the origin's replicator at `api`, with short timings for tests, then
/// `tweak`. Tenants get no request-rate or token limit (some tests send a thousand requests).
pub(crate) fn replicating_to(
    api: &FakeFastlyApi,
    tweak: impl FnOnce(&mut ReplicationSettings) + 'static,
) -> Options {
    let base_url = api.base_url();
    let store_id = api.store_id().to_string();
    let token = api.token().to_string();
    Options {
        settings: Box::new(move |s| {
            // Offers are Redis commands on the request path: on a loaded 2-core machine running
            // these tests side by side, the default 50 ms would drop some, which these tests
            // count as losses.
            s.redis.response_timeout_ms = 1_000;
            s.redis.pool_wait_timeout_ms = 1_000;
            let r = &mut s.replication;
            r.enabled = true;
            r.api_base_url = base_url;
            r.store_id = store_id;
            r.api_token = Some(Secret::new(token));
            r.linger_ms = 50;
            r.request_timeout_ms = 1_000;
            r.backoff_base_ms = 20;
            r.backoff_max_ms = 200;
            tweak(r);
        }),
        tenants: Box::new(|t| {
            t.requests_per_second = None;
            t.monthly_token_budget = None;
        }),
        ..Options::default()
    }
}

/// Waits until the fake KV store holds exactly `n` items.
pub(crate) async fn until_kv_holds(api: &FakeFastlyApi, n: usize, within: Duration) {
    eventually(&format!("{n} KV entries"), within, || async {
        api.entries().len() == n
    })
    .await;
}

async fn redis_get(url: &str, key: &str) -> Option<Vec<u8>> {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connects");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("redis GET")
}

/// An edge-miss chat request; returns its cache key and latency after checking a 200.
pub(crate) async fn edge_miss(stack: &Stack, key: &str, prompt: &str) -> (CacheKey, Duration) {
    let start = Instant::now();
    let response = stack
        .post_with("/v1/chat/completions", key, &chat_body(prompt), &EDGE_MISS)
        .await;
    let elapsed = start.elapsed();
    assert_eq!(response.status(), 200, "{prompt}");
    let tenant = if key == ACME { "acme" } else { "globex" };
    let hex = header(&response, "x-cache-key").to_string();
    let _ = response.bytes().await.expect("a body");
    (
        CacheKey::from_hex(tenant, &hex).expect("a 64-hex cache key"),
        elapsed,
    )
}

/// `n` edge misses with distinct prompts, `concurrency` at a time; their latencies.
async fn edge_misses(
    stack: &Stack,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> Vec<(CacheKey, Duration)> {
    futures_util::stream::iter(0..n)
        .map(|i| {
            let prompt = format!("{prefix} {i}");
            async move { edge_miss(stack, ACME, &prompt).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

fn p99(latencies: &[(CacheKey, Duration)]) -> Duration {
    let mut sorted: Vec<Duration> = latencies.iter().map(|(_, d)| *d).collect();
    sorted.sort();
    let rank = (sorted.len() * 99).div_ceil(100).max(1);
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_miss_is_written_to_kv_once_with_the_entrys_value_metadata_and_ttl() {
    let api = fake_api().await;
    let stack = Stack::start_with(replicating_to(&api, |_| {})).await;

    let (key, _) = edge_miss(&stack, ACME, "replicate me").await;
    // Seen in the store, and its answer counted by the replicator (which it is only after the
    // API has replied).
    eventually("the KV write", Duration::from_secs(10), || async {
        api.get(&key.kv_key()).is_some() && stack.metric("gateway_replication_written_total") == 1.0
    })
    .await;
    stack.settle().await;

    // The same entry offered again (an edge miss answered from Redis) is deduplicated, and an
    // answer for a client that is not the edge is not replicated at all.
    let again = stack
        .post_with(
            "/v1/chat/completions",
            ACME,
            &chat_body("replicate me"),
            &EDGE_MISS,
        )
        .await;
    assert_eq!(header(&again, "x-cache"), "HIT");
    stack.chat(ACME, "not through the edge").await;
    stack.settle().await;
    assert_eq!(stack.metric("gateway_replication_deduplicated_total"), 1.0);
    assert_eq!(stack.metric("gateway_replication_queued_total"), 1.0);
    assert_eq!(stack.metric("gateway_replication_queue_depth"), 0.0);
    let stats = api.stats();
    assert_eq!(stats.entries_written, 1, "{stats:?}");
    assert_eq!(api.entries().len(), 1);

    // What the edge will read equals what Redis holds.
    let item = api.get(&key.kv_key()).expect("the KV item");
    let from_kv = Entry::decode_kv(
        &item.value,
        item.metadata.as_deref().map(str::as_bytes),
        &key,
        &dev_keys(),
    )
    .expect("the KV item decodes as the edge decodes it");
    let stored = redis_get(&stack.redis.url(), &key.redis_key())
        .await
        .expect("the Redis entry");
    let from_redis = Entry::decode(&stored, &key, &dev_keys()).expect("the Redis entry decodes");
    // Stored sealed, and copied to KV as it is: the same bytes in both tiers.
    let stored_kv = [
        item.metadata.as_deref().unwrap_or_default().as_bytes(),
        b"\n",
        &item.value[..],
    ]
    .concat();
    assert_eq!(stored, stored_kv);
    assert!(!String::from_utf8_lossy(&stored).contains("deterministic mock answer"));
    assert_eq!(from_kv, from_redis);
    // The KV TTL: the entry's freshness plus the tenant's stale-if-error window, counted from
    // its creation (acme: 3600 + 86400).
    let now = gateway_origin::budget::unix_now();
    let expected = from_redis.envelope.created + from_redis.envelope.ttl + 86_400;
    let ttl = item.ttl_sec.expect("a TTL");
    assert!(
        (expected.saturating_sub(now)..=expected.saturating_sub(now) + 5).contains(&ttl),
        "ttl {ttl}, expected about {}",
        expected - now
    );
    assert_eq!(stack.metric("gateway_replication_written_total"), 1.0);
    assert_eq!(stack.metric("gateway_replication_lag_seconds_count"), 1.0);
    assert_eq!(
        stack.metric(r#"gateway_replication_api_requests_total{kind="batch",status="200"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_distinct_misses_are_written_in_far_fewer_api_requests() {
    let api = fake_api().await;
    // Production batching: a one-second linger and the default batch limits.
    let stack = Stack::start_with(replicating_to(&api, |r| r.linger_ms = 1_000)).await;

    let keys = edge_misses(&stack, "thousand", 1_000, 32).await;
    assert_eq!(keys.len(), 1_000);
    until_kv_holds(&api, 1_000, Duration::from_secs(60)).await;
    for (key, _) in &keys {
        assert!(api.get(&key.kv_key()).is_some());
    }
    let stats = api.stats();
    let requests = stats.requests;
    println!(
        "replication: 1000 entries in {requests} API requests ({} batch, {} single): {:.1} entries per request, {:.4} requests per entry",
        stats.batch,
        stats.put,
        1000.0 / requests as f64,
        requests as f64 / 1000.0
    );
    assert_eq!(stats.entries_written, 1_000, "{stats:?}");
    assert!(
        requests * 20 <= 1_000,
        "{requests} requests for 1000 entries"
    );
    assert_eq!(stack.metric_sum("gateway_replication_dropped_total"), 0.0);
    assert_eq!(stack.metric("gateway_replication_written_total"), 1000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_does_not_touch_responses_and_every_queued_entry_is_written_after_it() {
    let api = fake_api().await;
    let stack = Stack::start_with(replicating_to(&api, |r| {
        r.request_timeout_ms = 300;
        r.max_retries = 1_000;
    }))
    .await;
    const N: usize = 200;

    let healthy = edge_misses(&stack, "healthy", N, 4).await;
    until_kv_holds(&api, N, Duration::from_secs(20)).await;

    // The outage, in three phases of misses: 429s with reset headers, then 503s, then
    // requests that hang past the timeout. Each phase lasts until the replicator met it.
    let retried = |reason: &str| {
        stack.metric(&format!(
            r#"gateway_replication_retries_total{{reason="{reason}"}}"#
        ))
    };
    let phases = [
        (
            Fault::RateLimited {
                retry_after_secs: 1,
            },
            "rate_limited",
        ),
        (Fault::Status { status: 503 }, "503"),
        (Fault::Hang { ms: None }, "timeout"),
    ];
    let mut outage = Vec::new();
    for (i, (fault, reason)) in phases.into_iter().enumerate() {
        api.set_fault(fault, None);
        outage.extend(edge_misses(&stack, &format!("outage {i}"), N / 4, 4).await);
        eventually(reason, Duration::from_secs(10), || async {
            retried(reason) >= 1.0
        })
        .await;
    }
    outage.extend(edge_misses(&stack, "outage 3", N - outage.len(), 4).await);
    // Still failing: nothing from the outage has been written.
    let ready = stack
        .http
        .get(format!("{}/readyz", stack.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "an API outage must not make the origin unready"
    );
    assert_eq!(api.entries().len(), N);
    api.clear_faults();

    until_kv_holds(&api, 2 * N, Duration::from_secs(30)).await;
    for (key, _) in healthy.iter().chain(&outage) {
        assert!(api.get(&key.kv_key()).is_some());
    }
    let (p99_healthy, p99_outage) = (p99(&healthy), p99(&outage));
    println!(
        "replication outage: p99 of {N} edge misses {:.2} ms with the API healthy, {:.2} ms during the outage (429 → 503 → hang)",
        p99_healthy.as_secs_f64() * 1000.0,
        p99_outage.as_secs_f64() * 1000.0
    );
    assert!(retried("rate_limited") >= 1.0);
    assert!(retried("503") >= 1.0);
    assert!(retried("timeout") >= 1.0);
    assert_eq!(stack.metric_sum("gateway_replication_dropped_total"), 0.0);
    assert_eq!(
        stack.metric("gateway_replication_written_total"),
        (2 * N) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_queue_bound_offers_are_dropped_and_counted_never_hidden() {
    let api = fake_api().await;
    let stack = Stack::start_with(replicating_to(&api, |r| {
        r.queue_capacity = 5;
        r.batch_max_entries = 10;
        r.request_timeout_ms = 60_000;
    }))
    .await;
    api.set_fault(Fault::Hang { ms: None }, None);

    const N: usize = 60;
    let served = edge_misses(&stack, "flood", N, 4).await;
    assert_eq!(served.len(), N);
    stack.settle().await;

    let queued = stack.metric("gateway_replication_queued_total");
    let dropped = stack.metric(r#"gateway_replication_dropped_total{reason="queue_full"}"#);
    println!(
        "replication with a queue of 5 and the API hanging: {N} offers, {queued} queued, {dropped} dropped"
    );
    assert!(dropped >= 1.0, "some offers must have been dropped");
    assert_eq!(queued + dropped, N as f64, "every offer is accounted for");
    // The service's own seam counter agrees.
    assert_eq!(
        stack.metric(r#"gateway_replication_total{outcome="dropped"}"#),
        dropped
    );
    // At most the queue plus the batch stuck in flight was accepted.
    assert!(queued <= 5.0 + 10.0, "{queued}");

    api.clear_faults();
    eventually(
        "the queued entries after recovery",
        Duration::from_secs(20),
        || async { stack.metric("gateway_replication_written_total") == queued },
    )
    .await;
    assert_eq!(api.entries().len() as f64, queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_remove_entries_from_redis_and_kv_and_the_next_request_is_a_miss() {
    let api = fake_api().await;
    let mut options = replicating_to(&api, |_| {});
    let settings = options.settings;
    options.settings = Box::new(move |s| {
        settings(s);
        s.security.admin_token = Some(Secret::new("admin-token-for-tests"));
    });
    let stack = Stack::start_with(options).await;

    let (a, _) = edge_miss(&stack, ACME, "purge a").await;
    let (b, _) = edge_miss(&stack, ACME, "purge b").await;
    let (c, _) = edge_miss(&stack, ACME, "purge c").await;
    let (g, _) = edge_miss(&stack, GLOBEX, "purge g").await;
    until_kv_holds(&api, 4, Duration::from_secs(10)).await;
    stack.settle().await;
    let delete = |path: String, token: &str| {
        stack
            .http
            .delete(format!("{}{path}", stack.url))
            .bearer_auth(token)
            .send()
    };

    // One key.
    let deleted = delete(format!("/v1/cache/{}", a.hex()), ACME)
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(stack.redis.keys(&a.redis_key()).len(), 0);
    eventually(
        "the KV delete of one key",
        Duration::from_secs(10),
        || async { api.get(&a.kv_key()).is_none() },
    )
    .await;
    assert!(api.get(&b.kv_key()).is_some());
    let next = stack.chat(ACME, "purge a").await;
    assert_eq!(header(&next, "x-cache"), "MISS");
    stack.settle().await;

    // The caller's tenant.
    let purged = delete("/v1/cache".into(), ACME).await.unwrap();
    assert_eq!(purged.status(), 200);
    eventually(
        "acme's Redis entries removed",
        Duration::from_secs(10),
        || async { stack.redis.keys("gw:v1:acme:*").is_empty() },
    )
    .await;
    eventually("the KV purge of acme", Duration::from_secs(10), || async {
        api.entries()
            .iter()
            .all(|item| !item.key.starts_with("v1/acme/"))
    })
    .await;
    assert!(api.get(&c.kv_key()).is_none());
    assert!(
        api.get(&g.kv_key()).is_some(),
        "another tenant is untouched"
    );
    let next = stack.chat(ACME, "purge b").await;
    assert_eq!(header(&next, "x-cache"), "MISS");

    // An operator purges a tenant with the admin token, and only with it.
    let path = "/admin/tenants/globex/cache".to_string();
    assert_eq!(delete(path.clone(), ACME).await.unwrap().status(), 401);
    assert_eq!(delete(path.clone(), "wrong").await.unwrap().status(), 401);
    let bad = delete(
        "/admin/tenants/Not%20A%20Tenant/cache".into(),
        "admin-token-for-tests",
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    let admin = delete(path, "admin-token-for-tests").await.unwrap();
    assert_eq!(admin.status(), 200);
    let body: Value = admin.json().await.unwrap();
    assert_eq!(body["tenant"], "globex");
    assert_eq!(body["generation"], 1);
    eventually(
        "globex's Redis entries removed",
        Duration::from_secs(10),
        || async { stack.redis.keys("gw:v1:globex:*").is_empty() },
    )
    .await;
    eventually(
        "the admin KV purge of globex",
        Duration::from_secs(10),
        || async { api.get(&g.kv_key()).is_none() },
    )
    .await;
    let next = stack.chat(GLOBEX, "purge g").await;
    assert_eq!(header(&next, "x-cache"), "MISS");
    assert!(stack.metric("gateway_replication_purged_keys_total") >= 4.0);
    assert_eq!(stack.metric_sum("gateway_replication_dropped_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_endpoint_falls_back_to_single_key_writes() {
    let api = fake_api().await;
    let stack = Stack::start_with(replicating_to(&api, |_| {})).await;
    api.set_fault(Fault::RefuseBatch { status: 405 }, None);

    let keys = edge_misses(&stack, "one by one", 3, 1).await;
    until_kv_holds(&api, 3, Duration::from_secs(10)).await;
    let stats = api.stats();
    // One refused batch, then single PUTs (the batch endpoint is not retried for a while).
    assert_eq!((stats.batch, stats.put), (1, 3), "{stats:?}");
    for (key, _) in &keys {
        let item = api.get(&key.kv_key()).expect("the KV item");
        assert!(item.ttl_sec.is_some_and(|ttl| ttl > 3600));
        let entry = Entry::decode_kv(
            &item.value,
            item.metadata.as_deref().map(str::as_bytes),
            key,
            &dev_keys(),
        )
        .expect("a single-key write decodes like a batch line");
        assert_eq!(entry.envelope.tenant, "acme");
    }
    assert_eq!(
        stack.metric(r#"gateway_replication_api_requests_total{kind="batch",status="405"}"#),
        1.0
    );
}
