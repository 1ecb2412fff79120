//! What several replicas must agree on, end to end with real processes: a purge or a refresh
//! through one replica wins over a write another was holding, a killed replica's queued work
//! is sent by another, one API budget for all, and a rolling restart loses nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_common::tenant::Tenant;
use gateway_e2e::replica_stack::{ReplicaStack, ReplicaStackOptions};
use gateway_e2e::replicas::SettingsHook;
use gateway_e2e::stack::{ACME, chat_body, fixture_tenants, header, key_for};
use gateway_e2e::{eventually, eventually_async};
use gateway_fixtures::fastly_api::Fault;
use serde_json::Value;

const EDGE_MISS: (&str, &str) = ("x-gateway-edge-miss", "1");

/// The fixture tenants without request-rate or token limits (these tests send thousands).
fn unlimited_tenants() -> Vec<Tenant> {
    fixture_tenants(|t| {
        t.requests_per_second = None;
        t.monthly_token_budget = None;
    })
}

fn settings(
    hook: impl Fn(usize, &mut gateway_e2e::origin_config::OriginConfig) + Send + Sync + 'static,
) -> Option<SettingsHook> {
    Some(Box::new(hook))
}

/// An edge miss straight to replica `index` (as the edge would forward it): the answer's id.
async fn edge_miss(
    stack: &ReplicaStack,
    index: usize,
    prompt: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut headers = vec![EDGE_MISS];
    headers.extend_from_slice(extra);
    let resp = stack
        .replica_post(
            index,
            "/v1/chat/completions",
            ACME,
            &chat_body(prompt),
            &headers,
        )
        .await;
    assert_eq!(resp.status(), 200, "{prompt}");
    let body: Value = resp.json().await.expect("JSON");
    body["id"].as_str().expect("an id").to_string()
}

/// The `id` of the answer the fake KV store holds under `key`.
fn kv_id(stack: &ReplicaStack, key: &CacheKey) -> Option<String> {
    let item = stack.fastly_api.get(&key.kv_key())?;
    let entry = gateway_e2e::entry::open_kv(key, &item.value, item.metadata.as_deref())?;
    let body: Value = serde_json::from_slice(&entry.body).ok()?;
    body["id"].as_str().map(str::to_string)
}

async fn delete(stack: &ReplicaStack, index: usize, path: &str) -> reqwest::Response {
    stack
        .http
        .delete(format!("{}{path}", stack.replicas.url(index)))
        .bearer_auth(ACME)
        .send()
        .await
        .expect("the replica answers")
}

/// How long the fake Fastly API may hold the first write before answering it anyway; the
/// tests release it as soon as the racing operation has landed, well before this.
const HOLD_MS: u64 = 20_000;

/// Two replicas (no local populate) whose fake Fastly API holds its next request (the write of
/// the first entry) until [`release`] (or [`HOLD_MS`]). Their Fastly API timeout is longer than
/// the hold, so the held write is answered, never abandoned and retried.
async fn two_replicas_holding_the_next_write() -> ReplicaStack {
    let stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 2,
        populate_on_fallback: false,
        settings: settings(|_, config| {
            config.set(
                "replication",
                "request_timeout_ms",
                (HOLD_MS + 10_000).to_string(),
            );
        }),
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    stack
        .fastly_api
        .set_fault(Fault::Hang { ms: Some(HOLD_MS) }, Some(1));
    stack
}

/// Lets the held write through: it lands after whatever raced it.
fn release(stack: &ReplicaStack) {
    stack.fastly_api.clear_faults();
}

/// `gateway_replication_followups_total{kind}` over both replicas.
async fn followups(stack: &ReplicaStack, kind: &str) -> f64 {
    let label = format!("kind=\"{kind}\"");
    let mut total = 0.0;
    for index in 0..2 {
        let page = stack
            .replicas
            .metrics(index)
            .await
            .expect("the metrics page");
        total += gateway_e2e::replicas::metric_where(
            &page,
            "gateway_replication_followups_total",
            &[&label],
        );
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_through_one_replica_wins_over_a_write_another_replica_was_holding() {
    let stack = two_replicas_holding_the_next_write().await;
    let prompt = "purged while its write was held";
    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));
    edge_miss(&stack, 0, prompt, &[]).await;
    let before = stack.fastly_api.stats();
    eventually("the write in flight", Duration::from_secs(10), || {
        stack.fastly_api.stats().batch > 0
    })
    .await;
    // The purge through the other replica: its delete lands while the write is held.
    let purged = delete(&stack, 1, &format!("/v1/cache/{}", key.hex())).await;
    assert_eq!(purged.status(), 200);
    eventually("the purge's delete", Duration::from_secs(10), || {
        stack.fastly_api.stats().delete > before.delete
    })
    .await;
    release(&stack);
    eventually_async(
        "the held write, then its follow-up delete",
        Duration::from_secs(15),
        || async {
            followups(&stack, "delete").await >= 1.0
                && stack.fastly_api.stats().delete >= before.delete + 2
                && stack.fastly_api.get(&key.kv_key()).is_none()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        stack.fastly_api.get(&key.kv_key()).is_none(),
        "the purged entry came back"
    );
    // A new POP does not hold it either.
    let pop = stack.start_pop().await.expect("a new POP");
    let resp = gateway_e2e::stack::post(
        &stack.http,
        &pop.url(),
        "/v1/chat/completions",
        ACME,
        &chat_body(prompt),
        &[],
    )
    .await;
    assert_ne!(header(&resp, "x-cache-layer"), "edge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_through_one_replica_wins_over_an_older_write_another_was_holding() {
    let stack = two_replicas_holding_the_next_write().await;
    let prompt = "refreshed while the older write was held";
    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));
    let older = edge_miss(&stack, 0, prompt, &[]).await;
    eventually("the older write in flight", Duration::from_secs(10), || {
        stack.fastly_api.stats().batch > 0
    })
    .await;
    let newer = edge_miss(&stack, 1, prompt, &[("cache-control", "no-cache")]).await;
    assert_ne!(older, newer, "the refresh got a new answer");
    eventually("the newer write", Duration::from_secs(15), || {
        kv_id(&stack, &key).as_deref() == Some(&newer)
    })
    .await;
    // The older write lands last, over the newer one, and is corrected.
    release(&stack);
    eventually_async(
        "the older write landed and was corrected",
        Duration::from_secs(15),
        || async {
            followups(&stack, "rewrite").await >= 1.0
                && kv_id(&stack, &key).as_deref() == Some(&newer)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        kv_id(&stack, &key),
        Some(newer.clone()),
        "the older answer stayed"
    );
    let pop = stack.start_pop().await.expect("a new POP");
    let resp = gateway_e2e::stack::post(
        &stack.http,
        &pop.url(),
        "/v1/chat/completions",
        ACME,
        &chat_body(prompt),
        &[],
    )
    .await;
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["id"], newer.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replicas_queued_writes_and_purge_are_sent_by_another() {
    let mut stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 2,
        populate_on_fallback: false,
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    // Only replica 0 runs while the work is queued.
    stack.replicas.stop(1).await.expect("replica 1 stops");
    edge_miss(&stack, 0, "to be purged", &[]).await;
    let purged_key = key_for("acme", Route::ChatCompletions, &chat_body("to be purged"));
    eventually("the first write", Duration::from_secs(10), || {
        stack.fastly_api.get(&purged_key.kv_key()).is_some()
    })
    .await;

    stack.fastly_api.set_fault(Fault::Hang { ms: None }, None);
    let prompts = ["queued one", "queued two", "queued three"];
    for prompt in prompts {
        edge_miss(&stack, 0, prompt, &[]).await;
    }
    let purge = delete(&stack, 0, &format!("/v1/cache/{}", purged_key.hex())).await;
    assert_eq!(purge.status(), 200);
    // Replica 0 logged the four writes (it offers each after its answer), took the work and
    // is stuck on the API with it; then it dies.
    eventually_async(
        "replica 0 logged its writes",
        Duration::from_secs(10),
        || async {
            stack
                .metric(0, "gateway_replication_queued_total")
                .await
                .expect("the metrics page")
                >= 4.0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.replicas.kill(0);
    stack.fastly_api.clear_faults();
    stack.replicas.restart(1).await.expect("replica 1 starts");

    let redis_keys = |stack: &ReplicaStack| -> BTreeSet<String> {
        stack
            .redis
            .keys("gw:v1:*")
            .expect("redis keys")
            .into_iter()
            .map(|k| {
                let rest = k.trim_start_matches("gw:v1:");
                let (tenant, hex) = rest.split_once(':').expect("gw:v1:<tenant>:{<hex>}");
                let hex = hex.trim_start_matches('{').trim_end_matches('}');
                format!("v1/{tenant}/{hex}")
            })
            .collect()
    };
    let kv_keys = |stack: &ReplicaStack| -> BTreeSet<String> {
        stack
            .fastly_api
            .entries()
            .into_iter()
            .map(|e| e.key)
            .collect()
    };
    eventually(
        "the KV store holding exactly what Redis holds",
        Duration::from_secs(20),
        || kv_keys(&stack) == redis_keys(&stack),
    )
    .await;
    assert_eq!(kv_keys(&stack).len(), 3, "{:?}", kv_keys(&stack));
    assert!(stack.fastly_api.get(&purged_key.kv_key()).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_spend_one_api_budget_and_write_each_entry_once() {
    const N: usize = 3_000;
    let stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 3,
        tenants: Some(unlimited_tenants()),
        populate_on_fallback: false,
        settings: settings(|_, config| {
            config
                .set("replication", "hourly_request_budget", "30")
                // Each of the three lanes gathers what it takes of the 3,000 records for the
                // whole linger (the misses take well under it), then sends one batch.
                .set("replication", "batch_max_entries", "3000")
                .set("replication", "linger_ms", "30000");
        }),
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    let stack = Arc::new(stack);
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..24)
        .map(|w| {
            let (stack, next) = (Arc::clone(&stack), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    if i >= N {
                        return;
                    }
                    edge_miss(&stack, (i + w) % 3, &format!("budget {i}"), &[]).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    eventually(
        "3000 entries in the KV store",
        Duration::from_secs(120),
        || stack.fastly_api.stats().entries_written as usize >= N,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = stack.fastly_api.stats();
    println!(
        "shared budget: {N} entries from 3 replicas in {} API requests ({} batch) under a budget of 30 an hour",
        stats.requests, stats.batch
    );
    assert!(stats.requests <= 30, "{stats:?}");
    assert_eq!(
        stats.entries_written as usize, N,
        "each entry written once: {stats:?}"
    );
    assert_eq!(stack.fastly_api.entries().len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_fails_no_request_and_loses_no_write() {
    let mut stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 3,
        tenants: Some(unlimited_tenants()),
        populate_on_fallback: false,
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    let proxy = stack.replicas.proxy_url();
    let client = stack.fresh.clone();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let running = Arc::clone(&running);
        tokio::spawn(async move {
            let (mut sent, mut failed, mut prompts) = (0u64, 0u64, Vec::new());
            while running.load(Ordering::SeqCst) {
                let prompt = format!("rolling {sent}");
                let ok = client
                    .post(format!("{proxy}/v1/chat/completions"))
                    .bearer_auth(ACME)
                    .header(EDGE_MISS.0, EDGE_MISS.1)
                    .json(&chat_body(&prompt))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                sent += 1;
                if ok {
                    prompts.push(prompt);
                } else {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (sent, failed, prompts)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for index in 0..3 {
        // As a deployment would: out of the balancer, SIGTERM (it finishes and drains), back.
        stack.replicas.proxy().take_out(index);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = stack.replicas.stop(index).await.expect("a clean stop");
        assert!(status.success(), "{}", stack.replicas.log_tail(index, 20));
        stack.replicas.restart(index).await.expect("restarts");
        stack.replicas.proxy().put_back(index);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    running.store(false, Ordering::SeqCst);
    let (sent, failed, prompts) = load.await.expect("the load");
    println!("rolling restart: {sent} requests, {failed} failed");
    assert_eq!(failed, 0, "of {sent}");
    assert!(sent > 50, "enough load to mean something: {sent}");
    let keys: Vec<CacheKey> = prompts
        .iter()
        .map(|p| key_for("acme", Route::ChatCompletions, &chat_body(p)))
        .collect();
    eventually(
        "every answered edge miss in the KV store",
        Duration::from_secs(20),
        || {
            keys.iter()
                .all(|k| stack.fastly_api.get(&k.kv_key()).is_some())
        },
    )
    .await;
}
