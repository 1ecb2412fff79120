//! The dual-write to the edge tier. The request path offers entries and purges (never
//! blocking: a full write queue drops and counts; a full purge queue refuses, so the caller
//! hears it); two background lanes send them to the Fastly KV API within one shared request
//! budget: writes in batches, purges merged per tenant. On shutdown both are drained.
//!
//! Ordering: a purge removes the writes of its scope still queued, strikes them from a batch
//! being gathered, and its delete waits until no batch filtered before it is in flight, so a
//! write offered before a purge never lands after it. An entry read before a purge and
//! offered after it is refused by [`dedup::Dedup`].

mod budget;
mod caller;
mod dedup;
mod metrics;
mod purges;
mod writes;

pub use budget::{RequestBudget, backoff};
pub use dedup::{Admission, Dedup, PURGE_GUARD};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use gateway_common::entry::Entry;
use gateway_common::key::CacheKey;
use tokio::sync::{Notify, watch};

use crate::budget::unix_now;
use crate::kv_api::{KvApi, KvApiSetupError, MAX_VALUE_BYTES};
use crate::metrics::Metrics;
use crate::replicate::{Drained, PurgeRefused, Replicator};
use crate::settings::{ReplicationSettings, ms};
use crate::store::ThrottledLog;
use crate::tenants::Tenants;
use budget::{Lane, SharedBudget};
use caller::{Caller, RetryConfig};
use metrics::ReplicationMetrics;
use purges::{Job, PurgeLane, PurgeQueue, Scope};
use writes::{Batch, Ready, WriteLane};

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

/// The real [`Replicator`]: see the module doc. Cloning shares the queues and the lanes; when
/// the last clone is dropped the lanes send what they hold and stop.
#[derive(Clone)]
pub struct KvReplicator {
    shared: Arc<Shared>,
    _lifeline: Arc<Lifeline>,
}

impl std::fmt::Debug for KvReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("KvReplicator")
            .field("queued", &state.writes.len())
            .field("purges", &state.purges.len())
            .field("capacity", &self.shared.capacity)
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

/// An offered entry waiting in the write queue.
pub(crate) struct Pending {
    entry: Arc<Entry>,
    kv_key: String,
    offered_at: Instant,
}

/// What the request path and the two lanes share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// One permit per wake-up of the write lane (a new write, a flush, the close).
    write_ready: Notify,
    purge_ready: Notify,
    /// The purge number a batch was filtered at while it is in flight, `None` when none is:
    /// a purge's deletes wait until no batch filtered before it can still land.
    sending: watch::Sender<Option<u64>>,
    /// Writes allowed to wait; beyond it offers are dropped and counted.
    capacity: usize,
    metrics: ReplicationMetrics,
    unconstrained: Arc<AtomicBool>,
}

/// Everything a purge must change atomically with the writes it supersedes.
struct State {
    dedup: Dedup,
    writes: VecDeque<Pending>,
    /// The write lane holds a batch (or a carried write) taken from the queue, not yet sent.
    holding: bool,
    /// Writes in the lane's hands: the batch being gathered or sent, and the carry.
    in_hand: usize,
    /// Purges recorded while `holding`: applied to the batch before it is sent.
    hand_purges: Vec<Scope>,
    /// Purges recorded so far; each gets the next number.
    purge_seq: u64,
    purges: PurgeQueue,
    /// The purge lane is sending a job.
    purging: bool,
    /// Send what is queued now: no linger (shutdown).
    flushing: bool,
    /// Every handle is gone: the lanes stop once idle.
    closed: bool,
}

impl State {
    fn idle(&self, sending: bool) -> bool {
        self.writes.is_empty()
            && !self.holding
            && !sending
            && self.purges.is_empty()
            && !self.purging
    }
}

impl KvReplicator {
    /// Starts both lanes on the current Tokio runtime. The tenants give each tenant's
    /// stale-if-error window, which extends the KV TTL (see `Entry::kv_expiry`).
    pub fn start(
        settings: &ReplicationSettings,
        tenants: &Tenants,
        metrics: &Metrics,
    ) -> Result<KvReplicator, ReplicatorError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| ReplicatorError::NoRuntime)?;
        let token = settings
            .api_token
            .as_ref()
            .ok_or(ReplicatorError::NoToken)?;
        let api = KvApi::new(
            &settings.api_base_url,
            &settings.store_id,
            token,
            ms(settings.request_timeout_ms),
        )?;
        let metrics = ReplicationMetrics::register(metrics.registry())?;
        let unconstrained = Arc::new(AtomicBool::new(true));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dedup: Dedup::new(
                    ms(settings.dedup_window_ms),
                    settings.queue_capacity.max(1024) * 2,
                ),
                writes: VecDeque::new(),
                holding: false,
                in_hand: 0,
                hand_purges: Vec::new(),
                purge_seq: 0,
                purges: PurgeQueue::new(settings.purge_queue_capacity),
                purging: false,
                flushing: false,
                closed: false,
            }),
            write_ready: Notify::new(),
            purge_ready: Notify::new(),
            sending: watch::channel(None).0,
            capacity: settings.queue_capacity,
            metrics: metrics.clone(),
            unconstrained: Arc::clone(&unconstrained),
        });
        let caller = Caller {
            api,
            budget: SharedBudget::new(RequestBudget::new(
                settings.hourly_request_budget,
                Instant::now(),
            )),
            lane: Lane::Writes,
            retry: RetryConfig::from(settings),
            metrics,
            unconstrained,
            log: Arc::new(ThrottledLog::new(Duration::from_secs(10))),
        };
        let writes = WriteLane {
            shared: Arc::clone(&shared),
            caller: caller.clone(),
            config: writes::BatchConfig::from(settings),
            stale_windows: tenants
                .iter()
                .map(|t| (t.id.clone(), t.stale_if_error_secs))
                .collect(),
            carry: None,
            batch_refused_until: None,
        };
        let purges = PurgeLane {
            shared: Arc::clone(&shared),
            caller: Caller {
                lane: Lane::Purges,
                ..caller
            },
        };
        runtime.spawn(writes.run());
        runtime.spawn(purges.run());
        Ok(KvReplicator {
            _lifeline: Arc::new(Lifeline(Arc::clone(&shared))),
            shared,
        })
    }

    /// Writes waiting in the queue (not counting the batch in the write lane's hands).
    pub fn queued(&self) -> usize {
        self.shared.lock().writes.len()
    }

    /// Records a purge of `scope` and queues it for the purge lane; see the module doc.
    fn purge(&self, scope: Scope) -> Result<(), PurgeRefused> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if state.closed {
            return Err(PurgeRefused::Stopped);
        }
        let seq = state.purge_seq + 1;
        let merged = state
            .purges
            .push(&scope, seq)
            .map_err(|_| PurgeRefused::Full)?;
        state.purge_seq = seq;
        // Recorded before anything else: a newer entry offered after this point is written
        // again; an older one (read before the purge) is refused.
        state
            .dedup
            .purge(&scope.prefix(), Instant::now(), unix_now());
        let before = state.writes.len();
        state
            .writes
            .retain(|p| !scope.covers(&p.entry.envelope.tenant, &p.kv_key));
        let superseded = before - state.writes.len();
        if state.holding {
            state.hand_purges.push(scope);
        }
        let (depth, purge_depth) = (state.writes.len(), state.purges.len());
        drop(state);
        let metrics = &shared.metrics;
        metrics.count_dropped("purged", superseded as u64);
        metrics.queue_depth.set(depth as i64);
        metrics.purge_queue_depth.set(purge_depth as i64);
        if merged {
            metrics.purges_merged.inc();
        }
        shared.purge_ready.notify_one();
        Ok(())
    }
}

impl Replicator for KvReplicator {
    fn offer(&self, entry: Arc<Entry>) -> bool {
        let shared = &self.shared;
        let Some(key) = CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key) else {
            shared.metrics.count_dropped("invalid", 1);
            return false;
        };
        if entry.body.len() > MAX_VALUE_BYTES {
            // The KV Store refuses it; better not to hold it in the queue at all.
            shared.metrics.count_dropped("too_large", 1);
            return false;
        }
        let kv_key = key.kv_key();
        let now = Instant::now();
        let mut state = shared.lock();
        let reason = if state.closed {
            "stopped"
        } else {
            match state.dedup.admit(&kv_key, entry.envelope.created, now) {
                Admission::Duplicate => {
                    drop(state);
                    shared.metrics.deduplicated.inc();
                    return true;
                }
                Admission::Purged => "purged",
                Admission::Admit if state.writes.len() >= shared.capacity => {
                    state.dedup.forget(&kv_key);
                    "queue_full"
                }
                Admission::Admit => {
                    state.writes.push_back(Pending {
                        entry,
                        kv_key,
                        offered_at: now,
                    });
                    let depth = state.writes.len();
                    drop(state);
                    shared.metrics.queued.inc();
                    shared.metrics.queue_depth.set(depth as i64);
                    shared.write_ready.notify_one();
                    return true;
                }
            }
        };
        drop(state);
        shared.metrics.count_dropped(reason, 1);
        false
    }

    fn purge_key(&self, key: &CacheKey) -> Result<(), PurgeRefused> {
        self.purge(Scope::Key {
            tenant: key.tenant().to_string(),
            kv_key: key.kv_key(),
        })
    }

    fn purge_tenant(&self, tenant: &str) -> Result<(), PurgeRefused> {
        self.purge(Scope::Tenant(tenant.to_string()))
    }

    /// Full while the API is healthy and within budget: this replica is the bottleneck, and a
    /// load balancer should prefer others. When the API fails or the budget is spent, every
    /// replica is in the same state (they share the API and the token), so readiness is kept:
    /// marking them all unready would turn an edge-tier problem into an outage.
    fn saturated(&self) -> bool {
        self.shared.lock().writes.len() >= self.shared.capacity
            && self.shared.unconstrained.load(Ordering::Relaxed)
    }

    fn drain(&self, within: Duration) -> BoxFuture<'_, Drained> {
        self.shared.drain(within).boxed()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent between statements, so a poisoned lock
        // (a panic elsewhere) is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flushing(&self) -> bool {
        self.lock().flushing
    }

    /// The next queued write, waiting for one; `None` once closed and idle.
    async fn next_write(&self) -> Option<Pending> {
        loop {
            {
                let mut state = self.lock();
                if let Some(pending) = self.pop_write(&mut state) {
                    return Some(pending);
                }
                if state.closed {
                    return None;
                }
            }
            self.write_ready.notified().await;
        }
    }

    fn try_next_write(&self) -> Option<Pending> {
        let mut state = self.lock();
        self.pop_write(&mut state)
    }

    fn pop_write(&self, state: &mut State) -> Option<Pending> {
        let pending = state.writes.pop_front()?;
        if !state.holding {
            state.holding = true;
            state.hand_purges.clear();
        }
        state.in_hand += 1;
        self.metrics.queue_depth.set(state.writes.len() as i64);
        Some(pending)
    }

    /// The batch's writes minus those purged while it was gathered (the carry too), marked as
    /// in flight under the lock purges take, so a purge either struck a write from this batch
    /// or waits for it (see [`Shared::settled`]).
    fn seal(&self, batch: Batch, carry: &mut Option<Ready>) -> Vec<Ready> {
        let mut state = self.lock();
        let mut items = batch.into_items();
        let before = items.len();
        let purged =
            |r: &Ready, purges: &[Scope]| purges.iter().any(|p| p.covers(&r.tenant, &r.item.key));
        items.retain(|r| !purged(r, &state.hand_purges));
        let mut dropped = before - items.len();
        if carry
            .as_ref()
            .is_some_and(|r| purged(r, &state.hand_purges))
        {
            *carry = None;
            dropped += 1;
        }
        state.hand_purges.clear();
        state.holding = carry.is_some();
        state.in_hand = items.len() + usize::from(carry.is_some());
        self.sending.send_replace(Some(state.purge_seq));
        drop(state);
        self.metrics.count_dropped("purged", dropped as u64);
        items
    }

    /// The batch sealed last is done (written, or given up).
    fn sent(&self, carrying: bool) {
        let mut state = self.lock();
        state.in_hand = usize::from(carrying);
        self.sending.send_replace(None);
    }

    /// Waits until no batch filtered before purge number `seq` is in flight.
    async fn settled(&self, seq: u64) {
        let mut sending = self.sending.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = sending
            .wait_for(|filtered_at| filtered_at.is_none_or(|at| at >= seq))
            .await;
    }

    /// The next tenant's purge job, waiting for one; `None` once closed and idle.
    async fn next_purge(&self) -> Option<(String, Job)> {
        loop {
            {
                let mut state = self.lock();
                if let Some(job) = state.purges.pop() {
                    state.purging = true;
                    self.metrics
                        .purge_queue_depth
                        .set(state.purges.len() as i64);
                    return Some(job);
                }
                if state.closed {
                    return None;
                }
            }
            self.purge_ready.notified().await;
        }
    }

    fn purge_done(&self) {
        self.lock().purging = false;
    }

    /// Counts `items` as dropped; `forget` lets a later offer of the same entry try again.
    fn count_dropped(&self, items: &[Ready], reason: &str, forget: bool) {
        if items.is_empty() {
            return;
        }
        self.metrics.count_dropped(reason, items.len() as u64);
        if forget {
            let mut state = self.lock();
            for ready in items {
                state.dedup.forget(&ready.item.key);
            }
        }
    }

    /// Counts one write given up for `reason` and forgets it in dedup, so a later offer of
    /// the same entry is not taken for a duplicate.
    fn drop_write(&self, kv_key: &str, reason: &str) {
        self.lock().dedup.forget(kv_key);
        self.metrics.count_dropped(reason, 1);
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

    /// Sends what is queued now (no linger) and waits until both lanes are idle, at most
    /// `within`; reports (logs and counts) what is left unsent.
    async fn drain(&self, within: Duration) -> Drained {
        self.lock().flushing = true;
        self.wake_lanes();
        let deadline = Instant::now() + within;
        loop {
            let left = {
                let state = self.lock();
                let sending = self.sending.borrow().is_some();
                if state.idle(sending) {
                    return Drained::default();
                }
                Drained {
                    writes: state.writes.len() + state.in_hand,
                    purges: state.purges.len() + usize::from(state.purging),
                }
            };
            if Instant::now() >= deadline {
                self.metrics.count_dropped("shutdown", left.writes as u64);
                self.metrics
                    .count_dropped("purge_shutdown", left.purges as u64);
                tracing::warn!(
                    writes = left.writes,
                    purges = left.purges,
                    within_ms = within.as_millis() as u64,
                    "replication: shutting down with work the Fastly API did not take in time; those KV entries stay until their TTL"
                );
                return left;
            }
            // Shutdown only: a short poll is simpler than a third notification path.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests;
