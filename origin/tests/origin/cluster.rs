//! The origin on a real six-node Redis Cluster: the store's behaviours across slots (the same
//! as on one node), then the faults a cluster has under steady load through the origin: a
//! primary killed with `kill -9`, and a slot migration. Requests never fail in either.
#![allow(
    clippy::expect_used,
    reason = "test helpers: a failed expectation is a failed test"
)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway_fixtures::RedisCluster;
use gateway_origin::metrics::Metrics;
use gateway_origin::settings::{RedisMode, RedisPool, RedisSettings, Secret, Settings};
use gateway_origin::store::{Claim, CounterOp, RedisStore, Store};

use crate::harness::{ACME, Options, Stack, header};

fn start_cluster() -> RedisCluster {
    match RedisCluster::start() {
        Ok(cluster) => cluster,
        Err(e) => panic!("these tests need redis-server and redis-cli: {e:#}"),
    }
}

fn cluster_settings(cluster: &RedisCluster, pool: RedisPool) -> RedisSettings {
    let mut settings = Settings::for_tests().redis;
    settings.mode = RedisMode::Cluster;
    settings.cluster_urls = cluster.urls().into_iter().map(Secret::new).collect();
    settings.pool = pool;
    // Generous: the first call also discovers the topology.
    settings.response_timeout_ms = 1000;
    settings
}

fn store(cluster: &RedisCluster, pool: RedisPool) -> RedisStore {
    RedisStore::new(
        &cluster_settings(cluster, pool),
        Metrics::new().expect("metrics"),
    )
    .expect("cluster store builds")
}

/// A hex key of 64 digits from a number (entries of one tenant, spread over the slots).
fn hex(n: u32) -> String {
    format!("{n:064x}")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_behaves_on_a_cluster_as_on_one_node() {
    let cluster = start_cluster();
    for pool in [RedisPool::Multiplexed, RedisPool::DeadpoolRedis] {
        let s = store(&cluster, pool);
        s.ping().await.expect("ping");
        let keys: Vec<String> = (0..40)
            .map(|n| format!("gw:v1:acme:{{{}}}", hex(n)))
            .collect();
        for key in &keys {
            s.set_ex(key, key.as_bytes().to_vec(), 60)
                .await
                .expect("set");
        }
        // A tenant's entries spread over every primary (no tenant-wide tag).
        let nodes: BTreeSet<u16> = keys
            .iter()
            .map(|k| cluster.primary_for_key(k).expect("slot owner"))
            .collect();
        assert_eq!(nodes.len(), 3, "entries of one tenant on {nodes:?}");
        for key in &keys {
            assert_eq!(
                s.get(key).await.expect("get"),
                Some(key.as_bytes().to_vec())
            );
        }
        // The hit read: an entry and the tenant's counters, two slots, one call.
        let ops = [
            CounterOp::Incr {
                key: "gw:rate:{acme}:1".into(),
                by: 1,
                ttl_secs: 5,
            },
            CounterOp::Get {
                key: "gw:gen:{acme}".into(),
            },
            CounterOp::Incr {
                key: "gw:rate:{globex}:1".into(),
                by: 4,
                ttl_secs: 5,
            },
        ];
        let (value, counters) = s.get_with_counters(&keys[3], &ops).await.expect("read");
        assert_eq!(value, Some(keys[3].as_bytes().to_vec()));
        assert_eq!(counters.len(), 3);
        assert_eq!(counters[1], 0);
        let again = s.counters(&ops).await.expect("counters");
        assert_eq!((again[0] - counters[0], again[2] - counters[2]), (1, 4));

        // The flight lock and result live with the entry they guard.
        let entry = format!("gw:v1:acme:{{{}}}", hex(1000));
        let lock = format!("gw:flight:acme:{{{}}}:lock", hex(1000));
        let result = format!("gw:flight:acme:{{{}}}:result", hex(1000));
        assert_eq!(
            cluster.primary_for_key(&entry).expect("slot"),
            cluster.primary_for_key(&lock).expect("slot")
        );
        let claim = |holder: &'static str| s.claim_flight(&entry, &lock, holder, 5000);
        assert_eq!(claim("a").await.expect("claim"), Claim::Lead);
        assert_eq!(claim("b").await.expect("claim"), Claim::Held);
        let watched = s.watch_flight(&entry, &result, &lock).await.expect("watch");
        assert!(watched.held && watched.entry.is_none());
        s.set_px(&result, b"r".to_vec(), 5000)
            .await
            .expect("publish");
        s.keep_flight(&lock, "a", None).await.expect("release");
        let watched = s.watch_flight(&entry, &result, &lock).await.expect("watch");
        assert_eq!((watched.held, watched.result), (false, Some(b"r".to_vec())));

        // A purge visits every primary; entries of the current generation stay.
        assert_eq!(s.purge("gw:v1:acme:*", 1).await.expect("purge"), 40);
        assert!(cluster.keys("gw:v1:acme:*").expect("keys").is_empty());
        assert!(s.delete(&keys[0]).await.is_ok());
        assert_eq!(s.get(&keys[0]).await.expect("get"), None);
        let _ = s.delete(&result).await;
        let _ = s.delete(&lock).await;
    }
}

/// Steady load through the origin: `workers` tasks each asking the same `prompts` in turn
/// (all cached beforehand) until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Milliseconds since `start` of every request that was not a hit.
    misses: Arc<std::sync::Mutex<Vec<u64>>>,
    start: Instant,
}

impl Load {
    fn start(stack: &Stack, prompts: &[String], workers: usize) -> Load {
        let load = Load {
            stop: Arc::default(),
            tasks: Vec::new(),
            sent: Arc::default(),
            failed: Arc::default(),
            misses: Arc::default(),
            start: Instant::now(),
        };
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (http, url) = (stack.http.clone(), stack.url.clone());
            let (stop, sent, failed, misses) = (
                load.stop.clone(),
                load.sent.clone(),
                load.failed.clone(),
                load.misses.clone(),
            );
            let prompts = prompts.to_vec();
            let start = load.start;
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let prompt = &prompts[i % prompts.len()];
                    i += 1;
                    let response = http
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(ACME)
                        .header("content-type", "application/json")
                        .body(crate::harness::chat_body(prompt).to_string())
                        .send()
                        .await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match response {
                        Ok(r) if r.status().is_success() => {
                            if header(&r, "x-cache") != "HIT" {
                                let at = start.elapsed().as_millis() as u64;
                                misses.lock().unwrap_or_else(|p| p.into_inner()).push(at);
                            }
                            let _ = r.bytes().await;
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Load { tasks, ..load }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Stops the load: (requests sent, requests failed, miss times in ms).
    async fn finish(self) -> (u64, u64, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let misses = self
            .misses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            misses,
        )
    }
}

/// An origin on `cluster`, with `prompts` cached; the Redis key of each prompt's entry.
async fn warm_stack(cluster: &RedisCluster, prompts: &[String]) -> (Stack, Vec<String>) {
    let redis = cluster_settings(cluster, RedisPool::Multiplexed);
    let stack = Stack::start_with(Options {
        settings: Box::new(move |s| {
            let breaker = s.redis.breaker_cooldown_ms;
            s.redis = redis;
            s.redis.response_timeout_ms = 100;
            s.redis.breaker_cooldown_ms = breaker;
        }),
        tenants: Box::new(|t| t.requests_per_second = None),
        ..Options::default()
    })
    .await;
    let mut keys = Vec::new();
    for prompt in prompts {
        let first = stack.chat(ACME, prompt).await;
        assert_eq!(first.status(), 200);
        keys.push(format!("gw:v1:acme:{{{}}}", header(&first, "x-cache-key")));
        stack.settle().await;
    }
    // Every prompt is a hit before the fault.
    for prompt in prompts {
        let again = stack.chat(ACME, prompt).await;
        assert_eq!(header(&again, "x-cache"), "HIT", "{prompt}");
    }
    (stack, keys)
}

fn prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("cluster load prompt {i}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_primary_under_load_fails_no_request_and_hits_resume() {
    let mut cluster = start_cluster();
    let prompts = prompts(24);
    let (stack, keys) = warm_stack(&cluster, &prompts).await;
    let victim = cluster.primary_for_key(&keys[0]).expect("slot owner");
    // Let the replicas catch up with the warm-up writes before the crash.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let load = Load::start(&stack, &prompts, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = load.now_ms();
    cluster.kill(victim).expect("kill -9");
    let cluster = tokio::task::spawn_blocking(move || {
        cluster
            .wait_failover(victim, Duration::from_secs(30))
            .map(|_| cluster)
            .expect("a replica is promoted")
    })
    .await
    .expect("wait");
    let promoted_at = load.now_ms();
    // Hits must be back: keep the load on for a while after the promotion.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ended_at = load.now_ms();
    let (sent, failed, misses) = load.finish().await;
    let last_miss = misses.iter().copied().filter(|&m| m >= killed_at).max();
    let lost_ms = last_miss.map(|m| m - killed_at).unwrap_or(0);
    println!(
        "kill -9 of a primary: {sent} requests, {failed} failed, {} misses; replica promoted \
         after {} ms; hits lost for {lost_ms} ms",
        misses.len(),
        promoted_at - killed_at
    );
    assert_eq!(failed, 0, "no request may fail");
    assert!(
        last_miss.is_none_or(|m| m + 1000 < ended_at),
        "hits resumed well before the end (last miss at {last_miss:?} ms, end {ended_at} ms)"
    );
    // A request now is a hit again, whatever node its entry is on.
    for prompt in &prompts {
        assert_eq!(stack.chat(ACME, prompt).await.status(), 200);
    }
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_migration_under_load_fails_no_request() {
    let cluster = start_cluster();
    let prompts = prompts(24);
    let (stack, keys) = warm_stack(&cluster, &prompts).await;
    let from = cluster.primary_for_key(&keys[0]).expect("slot owner");
    let to = cluster
        .primaries()
        .expect("primaries")
        .into_iter()
        .find(|&p| p != from)
        .expect("another primary");

    let load = Load::start(&stack, &prompts, 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.reshard(from, to, 2000).expect("reshard");
        cluster
    })
    .await
    .expect("reshard");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, failed, misses) = load.finish().await;
    println!(
        "reshard of 2000 slots under load: {sent} requests, {failed} failed, {} misses",
        misses.len()
    );
    assert_eq!(failed, 0, "no request may fail");
    assert!(sent > 0);
    let moved: Vec<&String> = keys
        .iter()
        .filter(|k| cluster.primary_for_key(k).ok() == Some(to))
        .collect();
    // Entries that moved are still hits on their new node.
    for prompt in &prompts {
        assert_eq!(
            header(&stack.chat(ACME, prompt).await, "x-cache"),
            "HIT",
            "{prompt} (entries moved: {})",
            moved.len()
        );
    }
}
