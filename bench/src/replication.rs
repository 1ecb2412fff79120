//! The dual-write replicator driven directly: `KvReplicator` with the origin's default batching
//! and its log in a real Redis offers distinct entries (stored in Redis first, as the origin
//! does) as fast as the log takes them, to the in-process fake Fastly KV API; measures entries
//! per second and API requests per entry. The request budget is lifted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use gateway_common::entry::{ENTRY_VERSION, Entry, Envelope, Usage};
use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_common::tenant::Tenant;
use gateway_e2e::entry::now;
use gateway_fixtures::{FakeFastlyApi, FastlyApiConfig, RedisServer};
use gateway_origin::metrics::Metrics;
use gateway_origin::replicate::Replicator;
use gateway_origin::replicator::KvReplicator;
use gateway_origin::settings::{Secret, Settings};
use gateway_origin::store::{RedisStore, Store};
use gateway_origin::tenants::Tenants;

use crate::viceroy::HIT_BODY;

/// What this part measured.
#[derive(Debug, Clone)]
pub struct Replication {
    pub entries: u64,
    pub elapsed: Duration,
    pub api_requests: u64,
    pub batch_max_entries: usize,
    pub linger_ms: u64,
    pub dropped: u64,
}

impl Replication {
    pub fn entries_per_sec(&self) -> f64 {
        self.entries as f64 / self.elapsed.as_secs_f64()
    }

    pub fn requests_per_entry(&self) -> f64 {
        self.api_requests as f64 / self.entries as f64
    }
}

fn entry(i: u64, created: u64) -> Entry {
    let key = CacheKey::derive(
        b"bench-replication-secret",
        "acme",
        Route::ChatCompletions,
        format!("{{\"prompt\":{i}}}").as_bytes(),
    );
    Entry {
        envelope: Envelope {
            v: ENTRY_VERSION,
            tenant: "acme".to_owned(),
            key: key.hex().to_owned(),
            created,
            ttl: 3600,
            status: 200,
            content_type: "application/json".to_owned(),
            model: "gpt-4o-mini".to_owned(),
            provider: "mock".to_owned(),
            usage: Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 40,
                total_tokens: 52,
            }),
            generation: 0,
        },
        body: HIT_BODY.to_vec(),
    }
}

pub async fn run(entries: u64) -> anyhow::Result<Replication> {
    let api = FakeFastlyApi::start(FastlyApiConfig {
        hourly_budget: u32::MAX,
        ..FastlyApiConfig::default()
    })
    .await?;
    let mut settings = Settings::for_tests().replication;
    settings.enabled = true;
    settings.api_base_url = api.base_url();
    settings.store_id = api.store_id().to_owned();
    settings.api_token = Some(Secret::new(api.token()));
    // The default budget (~900 requests/h) is the production limit; the bench measures the
    // replicator's own pace, so it is lifted here and on the fake.
    settings.hourly_request_budget = u32::MAX;
    let tenant = Tenant {
        id: "acme".to_owned(),
        api_key_sha256: Vec::new(),
        allowed_models: Vec::new(),
        cache_ttl_secs: 3600,
        stale_if_error_secs: 86_400,
        monthly_token_budget: None,
        requests_per_second: None,
        cache_sampled: true,
        cache_store_requests: false,
        purge_generation: 0,
        semantic: Default::default(),
    };
    let redis = RedisServer::start()?;
    let mut redis_settings = Settings::for_tests().redis;
    redis_settings.url = Secret::new(redis.url());
    redis_settings.response_timeout_ms = 1_000;
    let metrics = Metrics::new()?;
    let requests = Arc::new(RedisStore::new(&redis_settings, metrics.clone())?);
    let lanes = Arc::new(RedisStore::new(
        &redis_settings.for_replication(),
        metrics.clone(),
    )?);
    // A log as long as the run: a full log drops, which is not what is measured.
    settings.queue_capacity = entries as usize + 1;
    let replicator = KvReplicator::start(
        &settings,
        &Tenants::new(vec![tenant]),
        &metrics,
        Arc::clone(&requests),
        lanes,
    )?;
    let created = now();
    let batch: Vec<Arc<Entry>> = (0..entries).map(|i| Arc::new(entry(i, created))).collect();
    for entry in &batch {
        let key = CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key)
            .ok_or_else(|| anyhow::anyhow!("a bench key is 64 hex digits"))?;
        requests
            .set_ex(
                &key.redis_key(),
                gateway_e2e::entry::redis_sealed(entry),
                3600,
            )
            .await
            .map_err(|e| anyhow::anyhow!("storing the bench entries: {e}"))?;
    }

    let started = Instant::now();
    let mut dropped = 0;
    for entry in batch {
        if !replicator.offer(entry).await {
            dropped += 1;
        }
    }
    let deadline = started + Duration::from_secs(120);
    while api.stats().entries_written < entries - dropped {
        if Instant::now() > deadline {
            bail!(
                "the replicator wrote {} of {entries} entries in 120 s",
                api.stats().entries_written
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let stats = api.stats();
    drop(replicator);
    api.stop().await;
    drop(redis);
    Ok(Replication {
        entries: stats.entries_written,
        elapsed,
        api_requests: stats.requests,
        batch_max_entries: settings.batch_max_entries,
        linger_ms: settings.linger_ms,
        dropped,
    })
}
