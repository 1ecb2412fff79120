//! The dual-write to the edge tier, shared by every replica. Offered entries and accepted
//! purges go to a replication log in Redis (two streams read through one consumer group, see
//! `log.rs`), so they survive the replica that logged them and are sent by whichever replica
//! is alive; the Fastly API request budget is shared there too. Each replica runs two lanes:
//! writes in batches (`writes.rs`) and purges merged per tenant (`purges.rs`).
//!
//! Nothing older or purged stays in the KV store: a write sends the entry Redis holds when it
//! is sent (skipping one from before the tenant's purge generation), then checks that Redis
//! still holds exactly that; if a purge or a newer entry raced it, a delete or the newer entry
//! follows. Writers of Redis (a refresh, a purge) change Redis before they log, so either the
//! check sees the change or the change's own record is sent after the write.
//!
//! When Redis does not answer, purges fall back to a queue in this process (sent by the same
//! purge lane), and offers are dropped: without Redis nothing is cached to replicate.

mod budget;
mod caller;
mod log;
mod metrics;
mod purges;
mod writes;

pub use budget::{RequestBudget, backoff};

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use gateway_common::entry::Entry;
use gateway_common::key::CacheKey;
use sha2::Digest;
use tokio::sync::Notify;

use crate::config_api::ConfigStoreApi;
use crate::kv_api::{KvApi, KvApiSetupError, MAX_VALUE_BYTES};
use crate::metrics::Metrics;
use crate::replicate::{Drained, PurgeRefused, Replicator};
use crate::settings::{ReplicationSettings, ms};
use crate::store::{RedisStore, ThrottledLog};
use crate::tenants::Tenants;
use budget::{Lane, SharedBudget};
use caller::{Caller, RetryConfig};
use metrics::ReplicationMetrics;
use purges::{PurgeLane, PurgeQueue, Scope};
use writes::WriteLane;

pub(crate) use log::Log;

/// Why the replicator could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error(transparent)]
    Api(#[from] KvApiSetupError),
    #[error("replication: the API token is missing (replication.api_token_env)")]
    NoToken,
    #[error("replication metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("replication: must be started inside a Tokio runtime")]
    NoRuntime,
}

/// The real [`Replicator`]: see the module doc. Cloning shares the lanes; when the last clone
/// is dropped the lanes finish what they hold and stop.
#[derive(Clone)]
pub struct KvReplicator {
    shared: Arc<Shared>,
    _lifeline: Arc<Lifeline>,
}

impl std::fmt::Debug for KvReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReplicator")
            .field("consumer", &self.shared.log.consumer())
            .field("local_purges", &self.shared.lock().purges.len())
            .finish_non_exhaustive()
    }
}

/// Closes the lanes when the last [`KvReplicator`] handle goes (the lanes hold `Shared`, not
/// this, so they cannot keep themselves alive).
struct Lifeline(Arc<Shared>);

impl Drop for Lifeline {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What the request path and the two lanes share.
pub(crate) struct Shared {
    log: Arc<Log>,
    state: Mutex<State>,
    /// Wakes the write lane (a local offer, a flush, the close).
    write_ready: Notify,
    purge_ready: Notify,
    /// Offers of the same entry within this window are logged once (across replicas).
    dedup_window: Duration,
    /// The write log's bound: past it offers are dropped and counted.
    max_log: usize,
    /// Tenant id → its record, for the Config Store update of a purge generation.
    tenants: Tenants,
    metrics: ReplicationMetrics,
}

/// What this replica's lanes are doing, for `drain`, plus the purge queue they share.
struct State {
    /// Purges merged per tenant: from the log, and those logged locally while Redis was down.
    purges: PurgeQueue,
    /// The write lane found the log empty on its last look and holds nothing.
    writes_idle: bool,
    /// The purge lane found nothing to do on its last look.
    purges_idle: bool,
    /// Send what is logged now: no linger (shutdown).
    flushing: bool,
    /// Every handle is gone: the lanes stop once idle.
    closed: bool,
}

impl KvReplicator {
    /// Starts both lanes on the current Tokio runtime. The request path logs through
    /// `requests` (the cache's pool), the lanes work through `lanes` (a pool of their own, see
    /// `Log`). The tenants give each tenant's stale-if-error window, which extends the KV TTL,
    /// and its Config Store records.
    pub fn start(
        settings: &ReplicationSettings,
        tenants: &Tenants,
        metrics: &Metrics,
        requests: Arc<RedisStore>,
        lanes: Arc<RedisStore>,
    ) -> Result<KvReplicator, ReplicatorError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| ReplicatorError::NoRuntime)?;
        let token = settings
            .api_token
            .as_ref()
            .ok_or(ReplicatorError::NoToken)?;
        let timeout = ms(settings.request_timeout_ms);
        let api = KvApi::new(&settings.api_base_url, &settings.store_id, token, timeout)?;
        let config_api = match settings.config_store_id.as_str() {
            "" => None,
            id => Some(ConfigStoreApi::new(
                &settings.api_base_url,
                id,
                token,
                timeout,
            )?),
        };
        let metrics = ReplicationMetrics::register(metrics)?;
        let log = Arc::new(Log::new(requests, lanes, consumer_name()));
        let shared = Arc::new(Shared {
            log: Arc::clone(&log),
            state: Mutex::new(State {
                purges: PurgeQueue::new(settings.purge_queue_capacity),
                writes_idle: false,
                purges_idle: false,
                flushing: false,
                closed: false,
            }),
            write_ready: Notify::new(),
            purge_ready: Notify::new(),
            dedup_window: ms(settings.dedup_window_ms),
            max_log: settings.queue_capacity,
            tenants: tenants.clone(),
            metrics: metrics.clone(),
        });
        let caller = Caller {
            api,
            budget: SharedBudget::new(
                RequestBudget::new(settings.hourly_request_budget, Instant::now()),
                Some(Arc::clone(&log)),
            ),
            lane: Lane::Writes,
            retry: RetryConfig::from(settings),
            metrics,
            log: Arc::new(ThrottledLog::new(Duration::from_secs(10))),
        };
        let timing = Timing {
            claim_idle: ms(settings.claim_idle_ms),
            poll: ms(settings.poll_ms),
        };
        let writes = WriteLane {
            shared: Arc::clone(&shared),
            caller: caller.clone(),
            config: writes::BatchConfig::from(settings),
            timing,
            stale_windows: tenants
                .iter()
                .map(|t| (t.id.clone(), t.stale_if_error_secs))
                .collect(),
            batch_refused_until: None,
        };
        let purges = PurgeLane {
            shared: Arc::clone(&shared),
            caller: Caller {
                lane: Lane::Purges,
                ..caller
            },
            config_api,
            timing,
        };
        runtime.spawn(async move {
            // Any replica may be the first: the streams and the group are made on demand.
            // Until Redis answers, the lanes' reads fail and they retry.
            if let Err(error) = log.ensure_group().await {
                tracing::warn!(%error, "replication: the log in Redis is not reachable yet");
            }
            tokio::join!(writes.run(), purges.run());
        });
        Ok(KvReplicator {
            _lifeline: Arc::new(Lifeline(Arc::clone(&shared))),
            shared,
        })
    }

    /// Queues `scope` in this process: Redis could not log it.
    fn purge_locally(&self, scope: Scope) -> Result<(), PurgeRefused> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if state.closed {
            return Err(PurgeRefused::Stopped);
        }
        let merged = state
            .purges
            .push(&scope, None)
            .map_err(|_| PurgeRefused::Full)?;
        state.purges_idle = false;
        let depth = state.purges.len();
        drop(state);
        shared.metrics.purge_queue_depth.set(depth as i64);
        shared.metrics.purges_local.inc();
        if merged {
            shared.metrics.purges_merged.inc();
        }
        shared.purge_ready.notify_one();
        Ok(())
    }

    /// Logs a purge record, or queues it here when Redis cannot take it.
    async fn purge(&self, fields: &[(&str, &str)], scope: Scope) -> Result<(), PurgeRefused> {
        if self.shared.lock().closed {
            return Err(PurgeRefused::Stopped);
        }
        match self.shared.log.append(log::PURGES, fields).await {
            Ok(()) => {
                self.shared.logged_purge();
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, "replication: the purge could not be logged in Redis; this replica sends it");
                self.purge_locally(scope)
            }
        }
    }
}

/// How the lanes look at the shared log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Take over records unacknowledged this long.
    claim_idle: Duration,
    /// Look for new records this often when idle.
    poll: Duration,
}

/// `<host>-<pid>-<random>`: unique per process, so a restarted replica is a new consumer and
/// its predecessor's records are claimed like any dead replica's.
fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "origin".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Replicator for KvReplicator {
    fn offer(&self, entry: Arc<Entry>) -> BoxFuture<'_, bool> {
        async move {
            let shared = &self.shared;
            let Some(key) = CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key) else {
                shared.metrics.count_dropped("invalid", 1);
                return false;
            };
            if entry.body.len() > MAX_VALUE_BYTES {
                // The KV Store refuses it; better not to log it at all.
                shared.metrics.count_dropped("too_large", 1);
                return false;
            }
            if shared.lock().closed {
                shared.metrics.count_dropped("stopped", 1);
                return false;
            }
            // The same entry (key, creation and body) offered again, by any replica, within
            // the window is logged once.
            let body = hex::encode(&sha2::Sha256::digest(&entry.body)[..8]);
            let seen = format!(
                "gw:{{repl}}:seen:{}:{}:{}",
                key.kv_key(),
                entry.envelope.created,
                body
            );
            let window = shared.dedup_window.as_millis() as u64;
            match shared
                .log
                .offer(&key.redis_key(), &seen, window, shared.max_log)
                .await
            {
                Ok(log::Offered::Logged) => {
                    shared.metrics.queued.inc();
                    shared.write_ready.notify_one();
                    true
                }
                Ok(log::Offered::Duplicate) => {
                    shared.metrics.deduplicated.inc();
                    true
                }
                Ok(log::Offered::Full) => {
                    shared.metrics.count_dropped("queue_full", 1);
                    false
                }
                Err(_) => {
                    // Without Redis the entry is not cached either: nothing to replicate.
                    shared.metrics.count_dropped("redis", 1);
                    false
                }
            }
        }
        .boxed()
    }

    fn purge_key(&self, key: &CacheKey) -> BoxFuture<'_, Result<(), PurgeRefused>> {
        let tenant = key.tenant().to_string();
        let kv_key = key.kv_key();
        async move {
            let fields = [
                ("op", "key"),
                ("t", tenant.as_str()),
                ("k", kv_key.as_str()),
            ];
            let scope = Scope::Key {
                tenant: tenant.clone(),
                kv_key: kv_key.clone(),
            };
            self.purge(&fields, scope).await
        }
        .boxed()
    }

    fn purge_tenant(
        &self,
        tenant: &str,
        generation: Option<u64>,
    ) -> BoxFuture<'_, Result<(), PurgeRefused>> {
        let tenant = tenant.to_string();
        async move {
            match generation {
                Some(generation) => {
                    let g = generation.to_string();
                    let fields = [("op", "gen"), ("t", tenant.as_str()), ("g", g.as_str())];
                    let scope = Scope::Generation {
                        tenant: tenant.clone(),
                        generation,
                    };
                    self.purge(&fields, scope).await
                }
                // No generation (Redis is down): list and delete the tenant's KV keys.
                None => self.purge_locally(Scope::Tenant(tenant)),
            }
        }
        .boxed()
    }

    /// Never saturated: the log lives in Redis and any replica drains it; a full log drops
    /// (and counts) new offers, whichever replica makes them.
    fn saturated(&self) -> bool {
        false
    }

    fn drain(&self, within: Duration) -> BoxFuture<'_, Drained> {
        self.shared.drain(within).boxed()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Flags and a queue, consistent between statements: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flushing(&self) -> bool {
        self.lock().flushing
    }

    /// A purge record was logged here: the purge lane has work (and is not idle for `drain`).
    fn logged_purge(&self) {
        self.lock().purges_idle = false;
        self.purge_ready.notify_one();
    }

    fn wake_lanes(&self) {
        self.write_ready.notify_one();
        self.purge_ready.notify_one();
    }

    fn close(&self) {
        {
            let mut state = self.lock();
            state.closed = true;
            state.flushing = true;
        }
        self.wake_lanes();
    }

    /// Sends what is logged now (no linger) and waits until both lanes find nothing left, at
    /// most `within`; reports (logs and counts) what is left. What this replica leaves in the
    /// log is not lost: another replica, or this one restarted, sends it.
    async fn drain(&self, within: Duration) -> Drained {
        {
            let mut state = self.lock();
            state.flushing = true;
            state.writes_idle = false;
            state.purges_idle = false;
        }
        self.wake_lanes();
        let deadline = Instant::now() + within;
        loop {
            let (idle, local) = {
                let state = self.lock();
                (
                    state.writes_idle && state.purges_idle && state.purges.is_empty(),
                    state.purges.len(),
                )
            };
            if idle {
                return Drained::default();
            }
            if Instant::now() >= deadline {
                let left = Drained {
                    writes: self.log.len(log::WRITES).await.unwrap_or(0),
                    purges: local + self.log.len(log::PURGES).await.unwrap_or(0),
                };
                // Only the local purges are lost with this process; the log's records wait
                // for the next replica to take them.
                self.metrics.count_dropped("purge_shutdown", local as u64);
                tracing::warn!(
                    logged_writes = left.writes,
                    purges = left.purges,
                    local_purges = local,
                    within_ms = within.as_millis() as u64,
                    "replication: stopping with work left; what is in the Redis log is sent by another replica, local purges are lost (their KV entries expire by TTL)"
                );
                return left;
            }
            // Shutdown only: a short poll is simpler than another notification path.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// This tenant's Config Store items carrying `generation`: one per API key digest (the
    /// edge looks tenants up by key). Empty for a tenant this replica does not know.
    fn tenant_records(&self, tenant: &str, generation: u64) -> Vec<(String, String)> {
        let Some(record) = self.tenants.iter().find(|t| t.id == tenant) else {
            return Vec::new();
        };
        let mut record = (**record).clone();
        record.purge_generation = generation;
        let Ok(json) = serde_json::to_string(&record) else {
            return Vec::new();
        };
        record
            .api_key_sha256
            .iter()
            .map(|digest| (digest.clone(), json.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
