//! The replicator against a real Redis and the fake Fastly KV API: batching, the shared log
//! (several replicas, a crashed one), purges racing writes, the shared budget, the drain.

use super::*;
use crate::settings::Secret;
use crate::store::Store;
use gateway_common::entry::{ENTRY_VERSION, Envelope};
use gateway_fixtures::FakeFastlyApi;
use gateway_fixtures::fastly_api::Fault;
use gateway_fixtures::redis::RedisServer;

const SEC: Duration = Duration::from_secs(1);

/// What a test replicates through: Redis (the log and the entries) and the fake API.
struct Rig {
    redis: RedisServer,
    api: FakeFastlyApi,
    settings: ReplicationSettings,
    store: Arc<RedisStore>,
}

impl Rig {
    async fn start(tune: impl FnOnce(&mut ReplicationSettings)) -> Rig {
        let redis = RedisServer::start().unwrap();
        let api = FakeFastlyApi::start(Default::default()).await.unwrap();
        let mut settings = crate::settings::Settings::for_tests().replication;
        settings.enabled = true;
        settings.api_base_url = api.base_url();
        settings.store_id = api.store_id().to_string();
        settings.api_token = Some(Secret::new(api.token()));
        settings.linger_ms = 100;
        settings.poll_ms = 20;
        settings.backoff_base_ms = 10;
        settings.backoff_max_ms = 50;
        tune(&mut settings);
        let store = Arc::new(redis_store(&redis));
        Rig {
            redis,
            api,
            settings,
            store,
        }
    }

    /// A replica: its own replicator on the shared Redis and API.
    fn replica(&self) -> (Metrics, KvReplicator) {
        let metrics = Metrics::new().unwrap();
        let requests = Arc::new(redis_store(&self.redis));
        let lanes = Arc::new(redis_store(&self.redis));
        let replicator = KvReplicator::start(
            &self.settings,
            &Tenants::default(),
            &metrics,
            requests,
            lanes,
        )
        .unwrap();
        (metrics, replicator)
    }

    /// Stores `entry` in Redis as the origin does (before offering it).
    async fn put(&self, entry: &Entry) {
        let key = CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key).unwrap();
        let seal = test_seal_key();
        let nonce: [u8; 24] = rand::random();
        let bytes = entry
            .seal(&seal.tenant_key(&entry.envelope.tenant), &nonce)
            .unwrap();
        self.store
            .set_ex(&key.redis_key(), bytes, 60)
            .await
            .unwrap();
    }

    async fn delete(&self, entry: &Entry) {
        let key = CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key).unwrap();
        self.store.delete(&key.redis_key()).await.unwrap();
    }

    /// The body the fake KV store holds under `entry`'s key, opened as the edge opens it
    /// (the store holds it sealed, as `put` wrote it to Redis).
    fn kv_body(&self, entry: &Entry) -> Option<Vec<u8>> {
        let item = self.api.get(&kv_key(entry))?;
        let key = CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key).unwrap();
        let ring = gateway_common::seal::Keyring::new(test_seal_key(), None).unwrap();
        let opened = Entry::decode_kv(
            &item.value,
            item.metadata.as_deref().map(str::as_bytes),
            &key,
            &ring,
        )
        .expect("the KV copy opens");
        Some(opened.body)
    }
}

/// The key `put` seals with.
fn test_seal_key() -> gateway_common::seal::SealKey {
    gateway_common::seal::SealKey::new("t1", b"test seal secret").unwrap()
}

fn redis_store(redis: &RedisServer) -> RedisStore {
    let mut settings = crate::settings::Settings::for_tests().redis;
    settings.url = Secret::new(redis.url());
    RedisStore::new(&settings.for_replication(), Metrics::new().unwrap()).unwrap()
}

fn entry(tenant: &str, i: u64, body: &str) -> Arc<Entry> {
    Arc::new(Entry {
        envelope: Envelope {
            v: ENTRY_VERSION,
            tenant: tenant.into(),
            key: format!("{i:064x}"),
            created: crate::budget::unix_now(),
            ttl: 60,
            status: 200,
            content_type: "application/json".into(),
            model: "m".into(),
            provider: "p".into(),
            usage: None,
            generation: 0,
        },
        body: body.as_bytes().to_vec(),
    })
}

fn kv_key(entry: &Entry) -> String {
    format!("v1/{}/{}", entry.envelope.tenant, entry.envelope.key)
}

fn cache_key(entry: &Entry) -> CacheKey {
    CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key).unwrap()
}

async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + 10 * SEC;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sample(metrics: &Metrics, name: &str) -> f64 {
    let page = String::from_utf8(metrics.render()).unwrap();
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn a_batch_refused_as_invalid_is_halved_and_every_entry_still_written() {
    // One batch of four, whatever the machine's speed: it is full before the linger ends.
    let rig = Rig::start(|s| {
        s.linger_ms = 60_000;
        s.batch_max_entries = 4;
    })
    .await;
    let (metrics, replicator) = rig.replica();
    // The API refuses the first batch as a whole (it never says which line).
    rig.api
        .set_fault(Fault::RefuseBatch { status: 400 }, Some(1));
    for i in 0..4 {
        let e = entry("acme", i, "{}");
        rig.put(&e).await;
        assert!(replicator.offer(e).await);
    }
    until("four entries written", || {
        sample(&metrics, "gateway_replication_written_total") == 4.0
    })
    .await;
    let stats = rig.api.stats();
    assert_eq!(
        stats.batch, 3,
        "the refused batch and its two halves: {stats:?}"
    );
    assert_eq!(rig.api.entries().len(), 4);
    // 60 s of freshness, no stale window (an unknown tenant has none).
    assert!(
        rig.api
            .entries()
            .iter()
            .all(|e| e.ttl_sec.is_some_and(|t| (59..=60).contains(&t)))
    );
}

#[tokio::test]
async fn a_wrong_token_drops_the_batch_as_unauthorized_and_says_so() {
    let rig = Rig::start(|s| s.api_token = Some(Secret::new("not-the-token"))).await;
    let (metrics, replicator) = rig.replica();
    let e = entry("acme", 1, "{}");
    rig.put(&e).await;
    assert!(replicator.offer(Arc::clone(&e)).await);
    let dropped = r#"gateway_replication_dropped_total{reason="unauthorized"}"#;
    until("the drop", || sample(&metrics, dropped) == 1.0).await;
    assert_eq!(rig.api.stats().unauthorized, 1, "401 is not retried");
    assert!(rig.api.entries().is_empty());
    assert!(!format!("{replicator:?}").contains("not-the-token"));
}

#[tokio::test]
async fn the_same_entry_offered_by_three_replicas_is_logged_and_written_once() {
    let rig = Rig::start(|_| {}).await;
    let replicas: Vec<_> = (0..3).map(|_| rig.replica()).collect();
    let e = entry("acme", 1, "{}");
    rig.put(&e).await;
    for (_, replicator) in &replicas {
        assert!(replicator.offer(Arc::clone(&e)).await);
    }
    until("the write", || rig.api.entries().len() == 1).await;
    for (_, replicator) in &replicas {
        assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    }
    let stats = rig.api.stats();
    assert_eq!(stats.batch + stats.put, 1, "{stats:?}");
}

#[tokio::test]
async fn dropping_every_handle_stops_the_lanes_after_they_wrote_what_was_logged() {
    let rig = Rig::start(|s| s.linger_ms = 60_000).await;
    let (_metrics, replicator) = rig.replica();
    let e = entry("acme", 7, "{}");
    rig.put(&e).await;
    assert!(replicator.offer(e).await);
    drop(replicator);
    // The lanes close, the long linger ends early, and the entry is written.
    until("the last write", || rig.api.entries().len() == 1).await;
}

#[tokio::test]
async fn what_a_crashed_replica_took_from_the_log_is_sent_by_another() {
    let rig = Rig::start(|s| s.claim_idle_ms = 300).await;
    // A replica that took records and died before acknowledging them.
    let dead = Log::new(
        Arc::new(redis_store(&rig.redis)),
        Arc::new(redis_store(&rig.redis)),
        "dead-replica".into(),
    );
    dead.ensure_group().await.unwrap();
    let entries: Vec<_> = (0..3).map(|i| entry("acme", i, "{}")).collect();
    for e in &entries {
        rig.put(e).await;
        let seen = format!("seen-{}", e.envelope.key);
        assert_eq!(
            dead.offer(&cache_key(e).redis_key(), &seen, 60_000, 100)
                .await
                .unwrap(),
            log::Offered::Logged
        );
    }
    assert_eq!(dead.read(log::WRITES, 10).await.unwrap().len(), 3);
    let (_metrics, replicator) = rig.replica();
    until("the dead replica's writes", || rig.api.entries().len() == 3).await;
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    assert_eq!(
        dead.len(log::WRITES).await.unwrap(),
        0,
        "acknowledged and removed"
    );
}

#[tokio::test]
async fn a_purged_entry_is_not_written_and_its_key_is_deleted() {
    let rig = Rig::start(|s| s.linger_ms = 60_000).await;
    let (metrics, replicator) = rig.replica();
    let entries: Vec<_> = [("acme", 1), ("acme", 2), ("acme", 3), ("globex", 1)]
        .into_iter()
        .map(|(t, i)| entry(t, i, "{}"))
        .collect();
    for e in &entries {
        rig.put(e).await;
        assert!(replicator.offer(Arc::clone(e)).await);
    }
    // As the service purges: Redis first, then the log.
    for e in &entries[..2] {
        rig.delete(e).await;
        replicator.purge_key(&cache_key(e)).await.unwrap();
    }
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    let mut written: Vec<String> = rig.api.entries().into_iter().map(|e| e.key).collect();
    written.sort();
    assert_eq!(written, [kv_key(&entries[2]), kv_key(&entries[3])]);
    assert_eq!(
        sample(
            &metrics,
            r#"gateway_replication_dropped_total{reason="gone"}"#
        ),
        2.0
    );
    assert_eq!(rig.api.stats().delete, 2);
}

#[tokio::test]
async fn a_purge_racing_a_write_in_flight_leaves_no_copy_behind() {
    let rig = Rig::start(|s| s.linger_ms = 10).await;
    let (metrics, replicator) = rig.replica();
    // The next request (the batch) takes 600 ms to be answered.
    rig.api.set_fault(Fault::Latency { ms: 600 }, Some(1));
    let e = entry("acme", 1, "{}");
    rig.put(&e).await;
    assert!(replicator.offer(Arc::clone(&e)).await);
    until("the batch in flight", || rig.api.stats().batch == 1).await;
    // The purge's delete lands before the write it races.
    rig.delete(&e).await;
    replicator.purge_key(&cache_key(&e)).await.unwrap();
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    assert!(
        rig.kv_body(&e).is_none(),
        "the write landed after the purge's delete and stayed"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"gateway_replication_followups_total{kind="delete"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn an_older_write_overtaken_by_a_newer_one_on_another_replica_is_corrected() {
    let rig = Rig::start(|s| s.linger_ms = 10).await;
    let (_, slow) = rig.replica();
    let (_, fast) = rig.replica();
    rig.api.set_fault(Fault::Latency { ms: 800 }, Some(1));
    let old = entry("acme", 1, r#"{"answer":"old"}"#);
    rig.put(&old).await;
    assert!(slow.offer(Arc::clone(&old)).await);
    until("the old write in flight", || rig.api.stats().batch == 1).await;
    // A no-cache refresh: the newer entry in Redis, written through another replica first.
    let mut newer = (*old).clone();
    newer.body = br#"{"answer":"new"}"#.to_vec();
    let newer = Arc::new(newer);
    rig.put(&newer).await;
    assert!(fast.offer(Arc::clone(&newer)).await);
    for replicator in [&slow, &fast] {
        assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    }
    assert_eq!(
        rig.kv_body(&old).as_deref(),
        Some(&br#"{"answer":"new"}"#[..]),
        "the older answer must not stay in the KV store"
    );
}

#[tokio::test]
async fn a_tenant_generation_older_than_the_purge_is_never_written() {
    let rig = Rig::start(|_| {}).await;
    let (metrics, replicator) = rig.replica();
    let e = entry("acme", 1, "{}");
    rig.put(&e).await;
    rig.store
        .counters(&[crate::store::CounterOp::Incr {
            key: crate::generation::key("acme"),
            by: 1,
            ttl_secs: 60,
        }])
        .await
        .unwrap();
    assert!(replicator.offer(e).await);
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    assert!(rig.api.entries().is_empty());
    assert_eq!(
        sample(
            &metrics,
            r#"gateway_replication_dropped_total{reason="purged"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn a_purge_flood_from_one_tenant_leaves_another_tenants_write_on_time() {
    // A budget the flood cannot spend: this is about the lanes, not the budget (that the
    // lanes take turns when the budget is short is `budget.rs`'s test).
    let rig = Rig::start(|s| {
        s.linger_ms = 100;
        s.hourly_request_budget = 36_000;
    })
    .await;
    let (metrics, replicator) = rig.replica();
    for i in 0..50 {
        let e = entry("globex", i, "{}");
        rig.put(&e).await;
        assert!(replicator.offer(e).await);
    }
    until("globex's entries", || rig.api.entries().len() == 50).await;
    let before = rig.api.stats();
    for i in 0..300 {
        if i % 3 == 0 {
            replicator.purge_tenant("globex", Some(i)).await.unwrap();
        } else {
            replicator
                .purge_key(&cache_key(&entry("globex", i, "{}")))
                .await
                .unwrap();
        }
    }
    let e = entry("acme", 1, "{}");
    rig.put(&e).await;
    let offered = Instant::now();
    assert!(replicator.offer(Arc::clone(&e)).await);
    until("acme's entry", || rig.kv_body(&e).is_some()).await;
    let took = offered.elapsed();
    // The linger plus a request, not the purge backlog; generous for a loaded machine.
    assert!(took < 3 * SEC, "acme's write took {took:?}");
    assert_eq!(replicator.drain(20 * SEC).await, Drained::default());
    assert!(sample(&metrics, "gateway_replication_purges_merged_total") > 0.0);
    assert!(
        rig.api
            .entries()
            .iter()
            .all(|e| !e.key.starts_with("v1/globex/")),
        "without a Config Store, a tenant purge lists and deletes"
    );
    // How many merge depends on how fast they arrive; never more than one listing per
    // tenant purge (100 of the 300).
    let lists = rig.api.stats().list - before.list;
    assert!(lists <= 100, "{lists} listings");
}

#[tokio::test]
async fn with_redis_down_a_purge_is_queued_here_and_refused_when_that_queue_is_full() {
    let mut rig = Rig::start(|s| s.purge_queue_capacity = 1).await;
    let (_metrics, replicator) = rig.replica();
    rig.api.set_fault(Fault::Hang { ms: None }, None);
    rig.redis.kill();
    let key = |i| cache_key(&entry("acme", i, "{}"));
    replicator.purge_key(&key(1)).await.unwrap();
    // The first is taken by the lane (and hangs on the API), the second waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicator.purge_key(&key(2)).await.unwrap();
    assert_eq!(replicator.purge_key(&key(3)).await, Err(PurgeRefused::Full));
    // Merging into what waits never needs room.
    replicator.purge_tenant("acme", None).await.unwrap();
    rig.api.clear_faults();
}

#[tokio::test]
async fn a_drain_sends_what_is_logged_without_waiting_for_the_linger() {
    let rig = Rig::start(|s| s.linger_ms = 60_000).await;
    let (_metrics, replicator) = rig.replica();
    for i in 0..3 {
        let e = entry("acme", i, "{}");
        rig.put(&e).await;
        assert!(replicator.offer(e).await);
    }
    replicator
        .purge_key(&cache_key(&entry("globex", 9, "{}")))
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    assert!(started.elapsed() < 5 * SEC);
    assert_eq!(rig.api.entries().len(), 3);
    assert_eq!(rig.api.stats().delete, 1);
}

#[tokio::test]
async fn a_drain_reports_what_it_leaves_in_the_log_for_the_next_replica() {
    let rig = Rig::start(|s| s.linger_ms = 10).await;
    let (_metrics, replicator) = rig.replica();
    rig.api.set_fault(Fault::Hang { ms: None }, None);
    for i in 1..=2 {
        let e = entry("acme", i, "{}");
        rig.put(&e).await;
        assert!(replicator.offer(e).await);
    }
    replicator.purge_tenant("globex", Some(1)).await.unwrap();
    let left = replicator.drain(Duration::from_millis(300)).await;
    assert_eq!(left.writes, 2, "{left:?}");
    assert_eq!(left.purges, 1, "{left:?}");
    rig.api.clear_faults();
}

#[tokio::test]
async fn replicas_share_one_request_budget_in_redis() {
    let rig = Rig::start(|_| {}).await;
    let log = |name: &str| {
        let store = Arc::new(redis_store(&rig.redis));
        Arc::new(Log::new(Arc::clone(&store), store, name.into()))
    };
    // 36 an hour: a burst of 3.6, then one every 100 s.
    let budgets: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|name| SharedBudget::new(RequestBudget::new(36, Instant::now()), Some(log(name))))
        .collect();
    for budget in &budgets {
        assert!(budget.ready_in().await.is_zero());
    }
    for budget in budgets.iter().cycle().take(3) {
        budget.take(Lane::Writes).await;
    }
    for budget in &budgets {
        let wait = budget.ready_in().await;
        assert!(
            wait > 30 * SEC,
            "three replicas spent the one burst between them: {wait:?}"
        );
    }
    // A 429 seen by one replica holds every replica.
    let fresh = Rig::start(|_| {}).await;
    let log = |name: &str| {
        let store = Arc::new(redis_store(&fresh.redis));
        Arc::new(Log::new(Arc::clone(&store), store, name.into()))
    };
    let a = SharedBudget::new(RequestBudget::new(3600, Instant::now()), Some(log("a")));
    let b = SharedBudget::new(RequestBudget::new(3600, Instant::now()), Some(log("b")));
    a.hold(20 * SEC).await;
    assert!(b.ready_in().await > 15 * SEC);
}

#[tokio::test]
async fn records_a_live_replica_holds_are_not_taken_over_however_long_it_lingers() {
    // Another replica may take over records unacknowledged for 300 ms; these linger 2 s.
    let rig = Rig::start(|s| {
        s.claim_idle_ms = 300;
        s.linger_ms = 2_000;
    })
    .await;
    let replicas: Vec<_> = (0..2).map(|_| rig.replica()).collect();
    // The first takes them all and lingers; the second, idle, looks for abandoned records.
    for i in 0..6 {
        let e = entry("acme", i, "{}");
        rig.put(&e).await;
        assert!(replicas[0].1.offer(e).await);
    }
    until("six entries", || rig.api.entries().len() == 6).await;
    for (_, replicator) in &replicas {
        assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    }
    assert_eq!(
        rig.api.stats().entries_written,
        6,
        "each entry written once: {:?}",
        rig.api.stats()
    );
}
