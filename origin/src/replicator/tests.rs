//! The replicator against the fake Fastly KV API: batching, purges and their ordering with
//! writes, the two lanes sharing the budget, and the shutdown drain.

use super::*;
use gateway_common::entry::{ENTRY_VERSION, Envelope};
use gateway_fixtures::fastly_api::Fault;

const SEC: Duration = Duration::from_secs(1);

fn entry(created: u64, ttl: u64) -> Entry {
    Entry {
        envelope: Envelope {
            v: ENTRY_VERSION,
            tenant: "acme".into(),
            key: "ab".repeat(32),
            created,
            ttl,
            status: 200,
            content_type: "application/json".into(),
            model: "m".into(),
            provider: "p".into(),
            usage: None,
        },
        body: b"{}".to_vec(),
    }
}

/// A fake Fastly API and a replicator writing to it with short timings, adjusted by `tune`.
async fn replicating(
    tune: impl FnOnce(&mut ReplicationSettings),
) -> (gateway_fixtures::FakeFastlyApi, Metrics, KvReplicator) {
    let api = gateway_fixtures::FakeFastlyApi::start(Default::default())
        .await
        .unwrap();
    let mut settings = crate::settings::Settings::for_tests().replication;
    settings.enabled = true;
    settings.api_base_url = api.base_url();
    settings.store_id = api.store_id().to_string();
    settings.api_token = Some(crate::settings::Secret::new(api.token()));
    settings.linger_ms = 100;
    settings.backoff_base_ms = 10;
    settings.backoff_max_ms = 50;
    tune(&mut settings);
    let metrics = Metrics::new().unwrap();
    let replicator = KvReplicator::start(&settings, &Tenants::default(), &metrics).unwrap();
    (api, metrics, replicator)
}

fn fresh(i: u64) -> Arc<Entry> {
    let mut entry = entry(unix_now(), 60);
    entry.envelope.key = format!("{i:064x}");
    Arc::new(entry)
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
    let (api, metrics, replicator) = replicating(|s| {
        s.linger_ms = 60_000;
        s.batch_max_entries = 4;
    })
    .await;
    // The API refuses the first batch as a whole (it never says which line).
    api.set_fault(Fault::RefuseBatch { status: 400 }, Some(1));
    for i in 0..4 {
        assert!(replicator.offer(fresh(i)));
    }
    until("four entries", || api.entries().len() == 4).await;
    let stats = api.stats();
    assert_eq!(
        stats.batch, 3,
        "the refused batch and its two halves: {stats:?}"
    );
    assert_eq!(sample(&metrics, "gateway_replication_written_total"), 4.0);
    // 60 s of freshness, no stale window (an unknown tenant has none).
    assert!(
        api.entries()
            .iter()
            .all(|e| e.ttl_sec.is_some_and(|t| (59..=60).contains(&t)))
    );
}

#[tokio::test]
async fn a_wrong_token_drops_the_batch_as_unauthorized_and_says_so() {
    let (api, metrics, replicator) = replicating(|s| {
        s.api_token = Some(crate::settings::Secret::new("not-the-token"));
    })
    .await;
    assert!(replicator.offer(fresh(1)));
    let dropped = r#"gateway_replication_dropped_total{reason="unauthorized"}"#;
    until("the drop", || sample(&metrics, dropped) == 1.0).await;
    assert_eq!(api.stats().unauthorized, 1, "401 is not retried");
    assert!(api.entries().is_empty());
    // A dropped write is forgotten by dedup: the next offer of it is queued again.
    assert!(replicator.offer(fresh(1)));
    until("the second drop", || sample(&metrics, dropped) == 2.0).await;
    assert!(!format!("{replicator:?}").contains("not-the-token"));
}

#[tokio::test]
async fn dropping_every_handle_stops_the_task_after_it_wrote_what_it_held() {
    let (api, _metrics, replicator) = replicating(|s| s.linger_ms = 60_000).await;
    assert!(replicator.offer(fresh(7)));
    drop(replicator);
    // The lanes close, the long linger ends early, and the entry is written.
    until("the last write", || api.entries().len() == 1).await;
}

/// An entry of `tenant` with the key `i`.
fn of(tenant: &str, i: u64) -> Arc<Entry> {
    let mut entry = entry(unix_now(), 60);
    entry.envelope.tenant = tenant.into();
    entry.envelope.key = format!("{i:064x}");
    Arc::new(entry)
}

fn kv_key(tenant: &str, i: u64) -> String {
    format!("v1/{tenant}/{i:064x}")
}

fn key(tenant: &str, i: u64) -> CacheKey {
    CacheKey::from_hex(tenant, &format!("{i:064x}")).unwrap()
}

#[tokio::test]
async fn a_purge_strikes_the_queued_writes_of_its_scope_and_no_other() {
    let (api, metrics, replicator) = replicating(|s| s.linger_ms = 60_000).await;
    for (tenant, i) in [("acme", 1), ("acme", 2), ("acme", 3), ("globex", 1)] {
        assert!(replicator.offer(of(tenant, i)));
    }
    // The first write is already in the lane's hands, the rest still queued: both kinds go.
    replicator.purge_key(&key("acme", 1)).unwrap();
    replicator.purge_key(&key("acme", 2)).unwrap();
    assert_eq!(replicator.queued(), 2);
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    let mut written: Vec<String> = api.entries().into_iter().map(|e| e.key).collect();
    written.sort();
    assert_eq!(written, [kv_key("acme", 3), kv_key("globex", 1)]);
    assert_eq!(
        sample(
            &metrics,
            r#"gateway_replication_dropped_total{reason="purged"}"#
        ),
        2.0
    );
    // An entry read before the purge and offered after it is refused.
    assert!(!replicator.offer(of("acme", 1)));
}

#[tokio::test]
async fn a_purge_flood_from_one_tenant_leaves_another_tenants_write_on_time() {
    let (api, metrics, replicator) = replicating(|s| s.linger_ms = 100).await;
    for i in 0..50 {
        assert!(replicator.offer(of("globex", i)));
    }
    until("globex's entries", || api.entries().len() == 50).await;
    let before = api.stats();
    for i in 0..300 {
        if i % 3 == 0 {
            replicator.purge_tenant("globex").unwrap();
        } else {
            replicator.purge_key(&key("globex", i)).unwrap();
        }
    }
    let offered = Instant::now();
    assert!(replicator.offer(of("acme", 1)));
    until("acme's entry", || api.get(&kv_key("acme", 1)).is_some()).await;
    let took = offered.elapsed();
    // The linger plus a request, not the purge backlog; generous for a loaded machine.
    assert!(took < 3 * SEC, "acme's write took {took:?}");
    assert!(sample(&metrics, "gateway_replication_purges_merged_total") >= 290.0);
    until("globex purged", || {
        api.entries()
            .iter()
            .all(|e| !e.key.starts_with("v1/globex/"))
    })
    .await;
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    let lists = api.stats().list - before.list;
    assert!(
        lists <= 3,
        "300 purges merged into a few listings, not {lists}"
    );
}

#[tokio::test]
async fn a_delete_waits_for_the_write_in_flight_so_it_lands_last() {
    let (api, _metrics, replicator) = replicating(|s| s.linger_ms = 10).await;
    // The next request (the batch) takes 600 ms to be answered.
    api.set_fault(Fault::Latency { ms: 600 }, Some(1));
    assert!(replicator.offer(of("acme", 1)));
    until("the batch in flight", || {
        replicator.shared.sending.borrow().is_some()
    })
    .await;
    replicator.purge_key(&key("acme", 1)).unwrap();
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    assert!(
        api.get(&kv_key("acme", 1)).is_none(),
        "the delete was sent before the write it purges had landed"
    );
}

#[tokio::test]
async fn a_full_purge_queue_refuses_a_purge_instead_of_losing_it() {
    let (api, _metrics, replicator) = replicating(|s| s.purge_queue_capacity = 1).await;
    api.set_fault(Fault::Hang { ms: None }, None);
    replicator.purge_key(&key("acme", 1)).unwrap();
    until("the first purge being sent", || {
        replicator.shared.lock().purging
    })
    .await;
    replicator.purge_key(&key("acme", 2)).unwrap();
    assert_eq!(
        replicator.purge_key(&key("acme", 3)),
        Err(PurgeRefused::Full)
    );
    assert_eq!(replicator.purge_tenant("globex"), Err(PurgeRefused::Full));
    // Merging into what waits never needs room.
    replicator.purge_tenant("acme").unwrap();
    replicator.purge_key(&key("acme", 4)).unwrap();
    api.clear_faults();
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
}

#[tokio::test]
async fn a_drain_sends_what_is_queued_without_waiting_for_the_linger() {
    let (api, _metrics, replicator) = replicating(|s| s.linger_ms = 60_000).await;
    for i in 0..3 {
        assert!(replicator.offer(of("acme", i)));
    }
    replicator.purge_key(&key("globex", 9)).unwrap();
    let started = Instant::now();
    assert_eq!(replicator.drain(10 * SEC).await, Drained::default());
    assert!(started.elapsed() < 5 * SEC);
    assert_eq!(api.entries().len(), 3);
    assert_eq!(api.stats().delete, 1);
}

#[tokio::test]
async fn a_drain_reports_and_counts_what_the_api_did_not_take_in_time() {
    let (api, metrics, replicator) = replicating(|s| s.linger_ms = 10).await;
    api.set_fault(Fault::Hang { ms: None }, None);
    assert!(replicator.offer(of("acme", 1)));
    assert!(replicator.offer(of("acme", 2)));
    replicator.purge_tenant("globex").unwrap();
    let left = replicator.drain(Duration::from_millis(300)).await;
    assert_eq!(
        left,
        Drained {
            writes: 2,
            purges: 1
        }
    );
    assert_eq!(
        sample(
            &metrics,
            r#"gateway_replication_dropped_total{reason="shutdown"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"gateway_replication_dropped_total{reason="purge_shutdown"}"#
        ),
        1.0
    );
    api.clear_faults();
}
