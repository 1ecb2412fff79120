//! The dual-write to the edge tier: a bounded queue the request path offers entries and purges
//! to (never blocking: a full queue drops and counts), drained by one background task that
//! batches writes to the Fastly KV API within a request budget, with jittered backoff.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_common::entry::Entry;
use gateway_common::key::CacheKey;
use prometheus::{
    Counter, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
};
use tokio::sync::mpsc;

use crate::budget::unix_now;
use crate::kv_api::{
    Answered, Item, KvApi, KvApiError, KvApiSetupError, MAX_VALUE_BYTES, RateLimit, RequestKind,
    encode_batch,
};
use crate::metrics::Metrics;
use crate::replicate::Replicator;
use crate::settings::{ReplicationSettings, ms};
use crate::store::ThrottledLog;
use crate::tenants::Tenants;

/// Channel slots beyond `queue_capacity` that only purges may use, so a queue full of writes
/// never loses a purge.
const PURGE_HEADROOM: usize = 1024;

/// The longest the replicator waits on the API's word (`Retry-After`, a rate-limit reset).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// After the batch endpoint is refused as unsupported, single-key writes are used this long
/// before the batch endpoint is tried again.
const BATCH_REFUSED_FOR: Duration = Duration::from_secs(600);

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

/// The real [`Replicator`]: see the module doc. Cloning shares the queue and the task; when
/// the last clone is dropped the task writes what it holds and stops.
#[derive(Clone)]
pub struct KvReplicator {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KvReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReplicator")
            .field("queued", &self.shared.queued.load(Ordering::Relaxed))
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

/// What the request path and the background task share (not the sender: the task must not
/// keep its own channel open).
struct Shared {
    /// Writes in the channel; purges are not counted (they use [`PURGE_HEADROOM`]).
    queued: AtomicUsize,
    capacity: usize,
    dedup: Mutex<Dedup>,
    metrics: ReplicationMetrics,
    /// The last API request succeeded and no budget or rate-limit wait is under way: a full
    /// queue then means this replica cannot keep up, which `/readyz` reports.
    unconstrained: AtomicBool,
}

impl Shared {
    fn dedup(&self) -> MutexGuard<'_, Dedup> {
        // Dedup state is a cache of recent keys: a panic mid-update loses nothing that matters.
        self.dedup.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one write given up for `reason` and forgets it in dedup, so a later offer of
    /// the same entry is not taken for a duplicate.
    fn drop_write(&self, kv_key: &str, reason: &str) {
        self.dedup().forget(kv_key);
        self.metrics.count_dropped(reason, 1);
    }
}

enum Command {
    Write(Pending),
    /// A KV key (`v1/<tenant>/<hex>`).
    PurgeKey(String),
    /// A tenant id.
    PurgeTenant(String),
}

struct Pending {
    entry: Arc<Entry>,
    kv_key: String,
    offered_at: Instant,
}

impl KvReplicator {
    /// Starts the background task on the current Tokio runtime. The tenants give each
    /// tenant's stale-if-error window, which extends the KV TTL (see `Entry::kv_expiry`).
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
        let (tx, rx) = mpsc::channel(settings.queue_capacity + PURGE_HEADROOM);
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            capacity: settings.queue_capacity,
            dedup: Mutex::new(Dedup::new(
                ms(settings.dedup_window_ms),
                settings.queue_capacity.max(1024) * 2,
            )),
            metrics,
            unconstrained: AtomicBool::new(true),
        });
        let stale_windows = tenants
            .iter()
            .map(|t| (t.id.clone(), t.stale_if_error_secs))
            .collect();
        let worker = Worker {
            rx,
            shared: Arc::clone(&shared),
            api,
            budget: RequestBudget::new(settings.hourly_request_budget, Instant::now()),
            config: WorkerConfig::from(settings),
            stale_windows,
            carry: None,
            batch_refused_until: None,
            log: ThrottledLog::new(Duration::from_secs(10)),
        };
        runtime.spawn(worker.run());
        Ok(KvReplicator { tx, shared })
    }

    /// Writes waiting in the queue (not counting the batch being sent).
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    fn send_purge(&self, command: Command) {
        if self.tx.try_send(command).is_err() {
            // More than PURGE_HEADROOM purges waiting: the KV copies stay until their TTL.
            self.shared.metrics.count_dropped("purge_queue_full", 1);
            tracing::warn!("replication: purge queue full; KV entries will expire by TTL instead");
        }
    }
}

impl Replicator for KvReplicator {
    fn offer(&self, entry: Arc<Entry>) -> bool {
        let Some(key) = CacheKey::from_hex(&entry.envelope.tenant, &entry.envelope.key) else {
            self.shared.metrics.count_dropped("invalid", 1);
            return false;
        };
        let kv_key = key.kv_key();
        if entry.body.len() > MAX_VALUE_BYTES {
            // The KV Store refuses it; better not to hold it in the queue at all.
            self.shared.metrics.count_dropped("too_large", 1);
            return false;
        }
        let now = Instant::now();
        let admission = self
            .shared
            .dedup()
            .admit(&kv_key, entry.envelope.created, now);
        match admission {
            Admission::Admit => {}
            Admission::Duplicate => {
                self.shared.metrics.deduplicated.inc();
                return true;
            }
            Admission::Purged => {
                self.shared.metrics.count_dropped("purged", 1);
                return false;
            }
        }
        let shared = &self.shared;
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= shared.capacity {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            shared.drop_write(&kv_key, "queue_full");
            return false;
        }
        let pending = Pending {
            entry,
            kv_key: kv_key.clone(),
            offered_at: now,
        };
        match self.tx.try_send(Command::Write(pending)) {
            Ok(()) => {
                shared.metrics.queued.inc();
                shared
                    .metrics
                    .queue_depth
                    .set(shared.queued.load(Ordering::Relaxed) as i64);
                true
            }
            Err(error) => {
                shared.queued.fetch_sub(1, Ordering::AcqRel);
                let reason = match error {
                    mpsc::error::TrySendError::Full(_) => "queue_full",
                    mpsc::error::TrySendError::Closed(_) => "stopped",
                };
                shared.drop_write(&kv_key, reason);
                false
            }
        }
    }

    fn purge_key(&self, key: &CacheKey) {
        let kv_key = key.kv_key();
        // Recorded before the purge is queued: a newer entry offered after this point is
        // queued behind the delete and written again; an older one is refused.
        self.shared
            .dedup()
            .purge(&kv_key, Instant::now(), unix_now());
        self.send_purge(Command::PurgeKey(kv_key));
    }

    fn purge_tenant(&self, tenant: &str) {
        self.shared
            .dedup()
            .purge(&CacheKey::kv_prefix(tenant), Instant::now(), unix_now());
        self.send_purge(Command::PurgeTenant(tenant.to_string()));
    }

    /// Full while the API is healthy and within budget: this replica is the bottleneck, and a
    /// load balancer should prefer others. When the API fails or the budget is spent, every
    /// replica is in the same state (they share the API and the token), so readiness is kept:
    /// marking them all unready would turn an edge-tier problem into an outage.
    fn saturated(&self) -> bool {
        self.shared.queued.load(Ordering::Relaxed) >= self.shared.capacity
            && self.shared.unconstrained.load(Ordering::Relaxed)
    }
}

/// Jittered exponential backoff for retry `attempt` (1-based): half of `base · 2^(attempt-1)`
/// (capped at `max`) plus `jitter` (0..=1) of the other half, so replicas that failed together
/// do not retry together, and no retry comes sooner than half the nominal delay.
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let nominal = base.saturating_mul(1u32 << exponent).min(max);
    let half = nominal / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// A token bucket of API requests: `hourly` per hour, refilled continuously, holding at most a
/// tenth of an hour's worth, so no sliding hour sees more than 1.1 × `hourly` requests (990 for
/// the default 900, under Fastly's ~1000). The API's own rate-limit headers can hold it longer.
#[derive(Debug, Clone)]
pub struct RequestBudget {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    updated: Instant,
    held_until: Option<Instant>,
}

impl RequestBudget {
    /// Starts full (a burst of `hourly / 10` requests).
    pub fn new(hourly: u32, now: Instant) -> RequestBudget {
        let hourly = f64::from(hourly.max(1));
        let capacity = (hourly / 10.0).max(1.0);
        RequestBudget {
            capacity,
            per_sec: hourly / 3600.0,
            tokens: capacity,
            updated: now,
            held_until: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// Spends one request if one is available now (and no hold is in force).
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.held_until.is_some_and(|until| now < until) || self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// When a request will next be allowed (`now` if one is).
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let refilled = if self.tokens >= 1.0 {
            now
        } else {
            now + Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec)
        };
        match self.held_until {
            Some(until) if until > refilled => until,
            _ => refilled,
        }
    }

    /// No request before `until` (a `Retry-After`, a backoff, a rate-limit reset).
    pub fn hold_until(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    /// Applies the API's `Fastly-RateLimit-*` headers: never plan on more requests than the
    /// account has left, and none at all until the reset once it has none.
    pub fn observe(&mut self, limit: RateLimit, now_unix: u64, now: Instant) {
        self.refill(now);
        match limit.remaining {
            Some(0) => {
                let wait = limit
                    .reset_unix
                    .map_or(Duration::from_secs(60), |reset| {
                        Duration::from_secs(reset.saturating_sub(now_unix).max(1))
                    })
                    .min(MAX_WAIT);
                self.tokens = 0.0;
                self.hold_until(now + wait);
            }
            Some(remaining) => self.tokens = self.tokens.min(remaining as f64),
            None => {}
        }
    }

    /// Requests available now (fractional).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

/// How long after a purge an offer of an entry created no later than the purge is refused: a
/// request that read the entry from Redis just before the purge must not write it back to KV
/// just after. (An entry created in the purge's own second waits this long to be re-offered.)
pub const PURGE_GUARD: Duration = Duration::from_secs(10);

/// What [`Dedup::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// The same entry was admitted within the window.
    Duplicate,
    /// The entry predates a purge of its key or tenant made within [`PURGE_GUARD`].
    Purged,
}

/// Recently admitted writes, by KV key: an offer of the same entry (same `created`) within the
/// window is a duplicate; a newer entry for the key (after `no-cache`, or expiry) is admitted.
/// Also remembers recent purges, so an entry read before a purge is not written after it.
#[derive(Debug)]
pub struct Dedup {
    window: Duration,
    /// Pruned of expired records when it grows past this.
    prune_at: usize,
    seen: HashMap<String, (Instant, u64)>,
    /// A KV key or a tenant prefix (`v1/<tenant>/`) → when it was purged (and in unix seconds).
    purges: HashMap<String, (Instant, u64)>,
}

impl Dedup {
    pub fn new(window: Duration, prune_at: usize) -> Dedup {
        Dedup {
            window,
            prune_at: prune_at.max(1),
            seen: HashMap::new(),
            purges: HashMap::new(),
        }
    }

    /// Whether an offer of the entry `created` at that unix second under `kv_key` goes ahead
    /// (then it is recorded).
    pub fn admit(&mut self, kv_key: &str, created: u64, now: Instant) -> Admission {
        if !self.purges.is_empty() {
            // `v1/<tenant>/<hex>` → `v1/<tenant>/`
            let prefix = kv_key.match_indices('/').nth(1).map(|(i, _)| &kv_key[..=i]);
            let purged = [Some(kv_key), prefix].into_iter().flatten().any(|scope| {
                self.purges.get(scope).is_some_and(|(at, unix)| {
                    now.saturating_duration_since(*at) < PURGE_GUARD && created <= *unix
                })
            });
            if purged {
                return Admission::Purged;
            }
        }
        if self.window.is_zero() {
            return Admission::Admit;
        }
        if let Some((at, seen_created)) = self.seen.get(kv_key)
            && now.saturating_duration_since(*at) < self.window
            && *seen_created >= created
        {
            return Admission::Duplicate;
        }
        if self.seen.len() >= self.prune_at {
            let window = self.window;
            self.seen
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < window);
        }
        self.seen.insert(kv_key.to_string(), (now, created));
        Admission::Admit
    }

    /// The write was dropped: the next offer must not be taken for a duplicate.
    pub fn forget(&mut self, kv_key: &str) {
        self.seen.remove(kv_key);
    }

    /// A purge of a KV key or of a tenant prefix, at `now` (`now_unix` in unix seconds): the
    /// next offer of a newer entry is written again, an older one is refused for a while.
    pub fn purge(&mut self, scope: &str, now: Instant, now_unix: u64) {
        self.seen.retain(|key, _| !key.starts_with(scope));
        self.purges
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < PURGE_GUARD);
        self.purges.insert(scope.to_string(), (now, now_unix));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The replicator's metrics, registered in the origin's registry (prefix `gateway_`).
#[derive(Clone)]
struct ReplicationMetrics {
    queued: IntCounter,
    deduplicated: IntCounter,
    written: IntCounter,
    /// reason: rate_limited | <status> | timeout | connection
    retried: IntCounterVec,
    /// reason: queue_full | retries_exhausted | rejected | unauthorized | too_large | expired |
    /// unencodable | purged | invalid | stopped | purge_queue_full | purge_failed
    dropped: IntCounterVec,
    /// KV keys deleted by purges.
    purged: IntCounter,
    queue_depth: IntGauge,
    batch_entries: HistogramVec,
    lag: Histogram,
    /// kind: batch | put | list | delete; status: HTTP status | timeout | connection | malformed
    api_requests: IntCounterVec,
    budget_wait: Counter,
}

impl ReplicationMetrics {
    /// Counts `n` entries (or purges) given up for `reason`.
    fn count_dropped(&self, reason: &str, n: u64) {
        self.dropped.with_label_values(&[reason]).inc_by(n);
    }

    fn register(registry: &prometheus::Registry) -> Result<ReplicationMetrics, prometheus::Error> {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            registry: &prometheus::Registry,
            c: C,
        ) -> Result<C, prometheus::Error> {
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        }
        Ok(ReplicationMetrics {
            queued: reg(
                registry,
                IntCounter::new(
                    "replication_queued_total",
                    "Entries accepted into the edge replication queue",
                )?,
            )?,
            deduplicated: reg(
                registry,
                IntCounter::new(
                    "replication_deduplicated_total",
                    "Offers skipped because the same entry was queued or written within the dedup window",
                )?,
            )?,
            written: reg(
                registry,
                IntCounter::new(
                    "replication_written_total",
                    "Entries the Fastly KV API confirmed",
                )?,
            )?,
            retried: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "replication_retries_total",
                        "Fastly API requests retried, by reason",
                    ),
                    &["reason"],
                )?,
            )?,
            dropped: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "replication_dropped_total",
                        "Entries (or purges) given up, by reason",
                    ),
                    &["reason"],
                )?,
            )?,
            purged: reg(
                registry,
                IntCounter::new("replication_purged_keys_total", "KV keys deleted by purges")?,
            )?,
            queue_depth: reg(
                registry,
                IntGauge::new(
                    "replication_queue_depth",
                    "Entries waiting in the replication queue",
                )?,
            )?,
            batch_entries: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "replication_batch_entries",
                        "Entries per write request to the Fastly KV API",
                    )
                    .buckets(vec![
                        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
                        5000.0, 10000.0,
                    ]),
                    &["kind"],
                )?,
            )?,
            lag: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "replication_lag_seconds",
                        "Time from offer to the API's confirmation of the write",
                    )
                    .buckets(vec![
                        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                        3600.0,
                    ]),
                )?,
            )?,
            api_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "replication_api_requests_total",
                        "Requests to the Fastly KV API by kind and status",
                    ),
                    &["kind", "status"],
                )?,
            )?,
            budget_wait: reg(
                registry,
                Counter::new(
                    "replication_budget_wait_seconds_total",
                    "Time spent waiting for the hourly request budget or the API's rate limit",
                )?,
            )?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct WorkerConfig {
    batch_max_entries: usize,
    batch_max_bytes: usize,
    linger: Duration,
    max_retries: u32,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl From<&ReplicationSettings> for WorkerConfig {
    fn from(s: &ReplicationSettings) -> WorkerConfig {
        WorkerConfig {
            batch_max_entries: s.batch_max_entries,
            batch_max_bytes: s.batch_max_bytes,
            linger: ms(s.linger_ms),
            max_retries: s.max_retries,
            backoff_base: ms(s.backoff_base_ms),
            backoff_max: ms(s.backoff_max_ms),
        }
    }
}

/// A write ready to send: the KV item and what is needed to finish it.
struct Ready {
    item: Item,
    tenant: String,
    /// Unix seconds; the TTL sent is what is left of it at send time.
    expires_unix: u64,
    offered_at: Instant,
}

/// Writes gathered for one request, one per KV key (a newer offer replaces an older one).
#[derive(Default)]
struct Batch {
    items: Vec<Ready>,
    index: HashMap<String, usize>,
    bytes: usize,
}

impl Batch {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds `ready`; `Some(superseded)` when it replaced an older write of the same key.
    fn push(&mut self, ready: Ready) -> Option<Ready> {
        let size = ready.item.line_len_bound();
        if let Some(&i) = self.index.get(&ready.item.key) {
            self.bytes = self.bytes - self.items[i].item.line_len_bound() + size;
            return Some(std::mem::replace(&mut self.items[i], ready));
        }
        self.index.insert(ready.item.key.clone(), self.items.len());
        self.items.push(ready);
        self.bytes += size;
        None
    }

    fn into_items(self) -> Vec<Ready> {
        self.items
    }
}

/// The background task. Owns the API client and the budget; the only writer to the KV store.
struct Worker {
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    api: KvApi,
    budget: RequestBudget,
    config: WorkerConfig,
    stale_windows: HashMap<String, u64>,
    /// A write that did not fit the previous batch.
    carry: Option<Ready>,
    batch_refused_until: Option<Instant>,
    log: ThrottledLog,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let mut batch = Batch::default();
            let mut purge = None;
            match self.carry.take() {
                Some(ready) => {
                    batch.push(ready);
                }
                None => match self.recv().await {
                    None => return,
                    Some(Command::Write(pending)) => self.add(&mut batch, pending),
                    Some(other) => purge = Some(other),
                },
            }
            if purge.is_none() {
                purge = self.gather(&mut batch).await;
            }
            let mut items = batch.into_items();
            if let Some(purge) = &purge {
                items = self.supersede(items, purge);
            }
            if !items.is_empty() {
                self.write(items).await;
            }
            if let Some(purge) = purge {
                self.purge(purge).await;
            }
        }
    }

    async fn recv(&mut self) -> Option<Command> {
        let command = self.rx.recv().await?;
        if matches!(command, Command::Write(_)) {
            let left = self.shared.queued.fetch_sub(1, Ordering::AcqRel) - 1;
            self.shared.metrics.queue_depth.set(left as i64);
        }
        Some(command)
    }

    /// Fills `batch` until it is full, or the linger time has passed and the budget allows a
    /// request; a waiting budget thus makes batches larger instead of the queue longer. Stops
    /// early at a purge, which is returned.
    async fn gather(&mut self, batch: &mut Batch) -> Option<Command> {
        let linger_end = Instant::now() + self.config.linger;
        while batch.len() < self.config.batch_max_entries && self.carry.is_none() {
            let send_at = linger_end.max(self.budget.ready_at(Instant::now()));
            tokio::select! {
                biased;
                command = self.recv() => match command {
                    None => return None,
                    Some(Command::Write(pending)) => self.add(batch, pending),
                    Some(other) => return Some(other),
                },
                () = tokio::time::sleep_until(send_at.into()) => return None,
            }
        }
        None
    }

    /// Encodes `pending` into `batch` (or the carry when the batch is full by bytes).
    fn add(&mut self, batch: &mut Batch, pending: Pending) {
        let Some(ready) = self.prepare(pending) else {
            return;
        };
        let size = ready.item.line_len_bound();
        if !batch.is_empty() && batch.bytes + size > self.config.batch_max_bytes {
            self.carry = Some(ready);
            return;
        }
        if batch.push(ready).is_some() {
            // Two offers of one key in one batch: only the newer is sent.
            self.shared.metrics.deduplicated.inc();
        }
    }

    fn prepare(&self, pending: Pending) -> Option<Ready> {
        let (value, metadata) = match pending.entry.encode_kv() {
            Ok(parts) => parts,
            Err(_) => {
                self.shared.drop_write(&pending.kv_key, "unencodable");
                return None;
            }
        };
        let tenant = pending.entry.envelope.tenant.clone();
        let stale = self.stale_windows.get(&tenant).copied().unwrap_or(0);
        let expires_unix = pending.entry.kv_expiry(stale);
        if expires_unix <= unix_now() {
            self.shared.drop_write(&pending.kv_key, "expired");
            return None;
        }
        Some(Ready {
            item: Item {
                key: pending.kv_key,
                value,
                metadata,
                ttl_secs: 1,
            },
            tenant,
            expires_unix,
            offered_at: pending.offered_at,
        })
    }

    /// Writes offered before a purge of their key or tenant are not sent: the purge deletes
    /// them anyway, and sending them would cost requests.
    fn supersede(&self, items: Vec<Ready>, purge: &Command) -> Vec<Ready> {
        let (kept, purged): (Vec<Ready>, Vec<Ready>) =
            items.into_iter().partition(|r| match purge {
                Command::PurgeKey(key) => r.item.key != *key,
                Command::PurgeTenant(tenant) => r.tenant != *tenant,
                Command::Write(_) => true,
            });
        self.count_dropped(&purged, "purged", false);
        kept
    }

    /// Sends `items`: batches, split on a refused batch, single-key writes where batches are
    /// not supported or an entry is too large for one.
    async fn write(&mut self, items: Vec<Ready>) {
        let mut parts: VecDeque<Vec<Ready>> = VecDeque::from([items]);
        while let Some(part) = parts.pop_front() {
            let now_unix = unix_now();
            let (mut part, expired): (Vec<Ready>, Vec<Ready>) =
                part.into_iter().partition(|r| r.expires_unix > now_unix);
            self.count_dropped(&expired, "expired", true);
            if part.is_empty() {
                continue;
            }
            for ready in &mut part {
                ready.item.ttl_secs = ready.expires_unix.saturating_sub(now_unix).max(1);
            }
            let alone =
                part.len() == 1 && part[0].item.line_len_bound() > self.config.batch_max_bytes;
            let refused = self
                .batch_refused_until
                .is_some_and(|until| Instant::now() < until);
            if alone || refused {
                for ready in part {
                    self.write_one(ready).await;
                }
                continue;
            }
            let body = Bytes::from(encode_batch(part.iter().map(|r| &r.item)));
            self.shared
                .metrics
                .batch_entries
                .with_label_values(&["batch"])
                .observe(part.len() as f64);
            let result = self
                .call(RequestKind::Batch, |api| {
                    let body = body.clone();
                    async move { api.put_batch(body).await.map(|a| ((), a)) }
                })
                .await;
            match result {
                Ok(()) => self.count_written(&part),
                // The API does not say which line it refused: halve until the bad one is alone
                // (about 2·log2(n) extra requests), so one bad entry does not sink its batch.
                Err(e) if matches!(e.status(), Some(400 | 413)) && part.len() > 1 => {
                    let second = part.split_off(part.len() / 2);
                    parts.push_front(second);
                    parts.push_front(part);
                }
                Err(e) if matches!(e.status(), Some(404 | 405 | 415 | 501)) => {
                    if let Some(suppressed) = self.log.admit() {
                        tracing::warn!(error = %e, suppressed, "replication: the batch endpoint was refused; writing keys one by one for a while");
                    }
                    self.batch_refused_until = Some(Instant::now() + BATCH_REFUSED_FOR);
                    for ready in part {
                        self.write_one(ready).await;
                    }
                }
                Err(e) => self.give_up(&part, &e),
            }
        }
    }

    async fn write_one(&mut self, ready: Ready) {
        self.shared
            .metrics
            .batch_entries
            .with_label_values(&["put"])
            .observe(1.0);
        let item = ready.item.clone();
        let result = self
            .call(RequestKind::Put, |api| {
                let item = item.clone();
                async move { api.put_key(&item).await.map(|a| ((), a)) }
            })
            .await;
        match result {
            Ok(()) => self.count_written(std::slice::from_ref(&ready)),
            Err(e) => self.give_up(std::slice::from_ref(&ready), &e),
        }
    }

    /// Deletes a key, or every key under a tenant's prefix (listed first, then deleted one by
    /// one: the API has no bulk delete). Each request is under the budget like any write.
    async fn purge(&mut self, purge: Command) {
        let keys = match purge {
            Command::Write(_) => return,
            Command::PurgeKey(key) => vec![key],
            Command::PurgeTenant(tenant) => match self.list_tenant(&tenant).await {
                Ok(keys) => keys,
                Err((keys, e)) => {
                    // Delete what was listed; the rest expires by TTL.
                    self.shared.metrics.count_dropped("purge_failed", 1);
                    tracing::warn!(tenant = %tenant, error = %e, listed = keys.len(), "replication: listing a tenant's KV keys for a purge failed");
                    keys
                }
            },
        };
        for key in keys {
            let result = self
                .call(RequestKind::Delete, |api| {
                    let key = key.clone();
                    async move { api.delete(&key).await.map(|a| ((), a)) }
                })
                .await;
            match result {
                Ok(()) => self.shared.metrics.purged.inc(),
                Err(e) => {
                    self.shared.metrics.count_dropped("purge_failed", 1);
                    if let Some(suppressed) = self.log.admit() {
                        tracing::warn!(key = %key, error = %e, suppressed, "replication: a KV delete failed; the entry expires by TTL");
                    }
                }
            }
        }
    }

    /// Every KV key of `tenant`. On failure, the keys listed so far and the error.
    async fn list_tenant(
        &mut self,
        tenant: &str,
    ) -> Result<Vec<String>, (Vec<String>, KvApiError)> {
        let prefix = CacheKey::kv_prefix(tenant);
        let mut keys = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .call(RequestKind::List, |api| {
                    let prefix = prefix.clone();
                    let cursor = cursor.clone();
                    async move { api.list(&prefix, cursor.as_deref()).await }
                })
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) => return Err((keys, e)),
            };
            // Never trust the listing to have honoured the prefix: a purge must not reach
            // another tenant's keys.
            keys.extend(page.keys.into_iter().filter(|k| k.starts_with(&prefix)));
            match page.next_cursor {
                Some(next) if cursor.as_deref() != Some(next.as_str()) => cursor = Some(next),
                _ => return Ok(keys),
            }
        }
    }

    /// One API request with the budget, the rate-limit headers and retries: 5xx, timeouts and
    /// broken connections are retried up to `max_retries` with backoff (at least `Retry-After`);
    /// a 429 waits for as long as the API says without using up a retry (the entries are not at
    /// fault, and waiting is what lets the queue absorb the outage).
    async fn call<T, F, Fut>(&mut self, kind: RequestKind, mut op: F) -> Result<T, KvApiError>
    where
        F: FnMut(KvApi) -> Fut,
        Fut: Future<Output = Result<(T, Answered), KvApiError>>,
    {
        let mut failures = 0u32;
        let mut retries = 0u32;
        loop {
            self.take_budget().await;
            let result = op(self.api.clone()).await;
            let now = Instant::now();
            let metrics = &self.shared.metrics;
            let error = match result {
                Ok((value, answered)) => {
                    metrics
                        .api_requests
                        .with_label_values(&[kind.as_str(), &answered.status.to_string()])
                        .inc();
                    self.budget.observe(answered.rate_limit, unix_now(), now);
                    self.shared.unconstrained.store(true, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(error) => error,
            };
            metrics
                .api_requests
                .with_label_values(&[kind.as_str(), &error.label()])
                .inc();
            self.budget.observe(error.rate_limit(), unix_now(), now);
            if !error.is_retryable() {
                return Err(error);
            }
            failures += 1;
            let backoff = backoff(
                failures,
                self.config.backoff_base,
                self.config.backoff_max,
                rand::random::<f64>(),
            );
            let wait = if error.status() == Some(429) {
                let until_reset = error
                    .rate_limit()
                    .reset_unix
                    .map(|reset| Duration::from_secs(reset.saturating_sub(unix_now())));
                metrics.retried.with_label_values(&["rate_limited"]).inc();
                error.retry_after().or(until_reset).unwrap_or(backoff)
            } else {
                if retries >= self.config.max_retries {
                    return Err(error);
                }
                retries += 1;
                metrics.retried.with_label_values(&[&error.label()]).inc();
                backoff.max(error.retry_after().unwrap_or_default())
            }
            .min(MAX_WAIT);
            self.shared.unconstrained.store(false, Ordering::Relaxed);
            if let Some(suppressed) = self.log.admit() {
                tracing::warn!(kind = kind.as_str(), error = %error, wait_ms = wait.as_millis() as u64, suppressed, "replication: Fastly API request failed; retrying");
            }
            self.budget.hold_until(now + wait);
        }
    }

    /// Waits until the budget allows one request, and spends it.
    async fn take_budget(&mut self) {
        loop {
            let now = Instant::now();
            if self.budget.try_take(now) {
                return;
            }
            let at = self.budget.ready_at(now);
            let wait = at.saturating_duration_since(now);
            if wait > Duration::from_secs(1) {
                // A long wait is the budget or the API's limit, not ordinary pacing.
                self.shared.unconstrained.store(false, Ordering::Relaxed);
            }
            self.shared.metrics.budget_wait.inc_by(wait.as_secs_f64());
            tokio::time::sleep_until(at.into()).await;
        }
    }

    fn count_written(&self, written: &[Ready]) {
        let metrics = &self.shared.metrics;
        metrics.written.inc_by(written.len() as u64);
        let lag = &metrics.lag;
        for ready in written {
            lag.observe(ready.offered_at.elapsed().as_secs_f64());
        }
    }

    fn give_up(&self, items: &[Ready], error: &KvApiError) {
        let reason = match error.status() {
            Some(401 | 403) => "unauthorized",
            _ if error.is_retryable() => "retries_exhausted",
            _ => "rejected",
        };
        if let Some(suppressed) = self.log.admit() {
            tracing::warn!(error = %error, entries = items.len(), reason, suppressed, "replication: entries not written to the edge tier");
        }
        self.count_dropped(items, reason, true);
    }

    /// Counts `items` as dropped; `forget` lets a later offer of the same entry try again.
    fn count_dropped(&self, items: &[Ready], reason: &str, forget: bool) {
        if items.is_empty() {
            return;
        }
        self.shared
            .metrics
            .count_dropped(reason, items.len() as u64);
        if forget {
            let mut dedup = self.shared.dedup();
            for ready in items {
                dedup.forget(&ready.item.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::entry::{ENTRY_VERSION, Envelope};

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap_with_half_of_it_jittered() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(1, base, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(2, base, max, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(4, base, max, 0.5), Duration::from_millis(600));
        assert_eq!(backoff(5, base, max, 1.0), Duration::from_millis(1600));
        assert_eq!(backoff(6, base, max, 1.0), max);
        assert_eq!(backoff(60, base, max, 1.0), max);
        assert_eq!(backoff(u32::MAX, base, max, 0.0), max / 2);
        // Out-of-range jitter is clamped, never a negative or oversized delay.
        assert_eq!(backoff(1, base, max, 7.0), Duration::from_millis(100));
        assert_eq!(backoff(1, base, max, -1.0), Duration::from_millis(50));
    }

    #[test]
    fn the_budget_allows_a_tenth_of_an_hour_at_once_then_paces_to_the_hourly_rate() {
        let t0 = Instant::now();
        let mut budget = RequestBudget::new(900, t0);
        for i in 0..90 {
            assert!(budget.try_take(t0), "request {i} of the burst");
        }
        assert!(!budget.try_take(t0));
        // 900 per hour is one every 4 s.
        assert_eq!(budget.ready_at(t0), t0 + 4 * SEC);
        assert!(!budget.try_take(t0 + 3 * SEC));
        assert!(budget.try_take(t0 + 4 * SEC));
        // An hour of steady use stays within 1.1 × the budget.
        let mut budget = RequestBudget::new(900, t0);
        let mut spent = 0;
        for s in 0..3600 {
            while budget.try_take(t0 + s * SEC) {
                spent += 1;
            }
        }
        assert!((900..=990).contains(&spent), "{spent}");
    }

    #[test]
    fn the_budget_obeys_the_api_rate_limit_headers_and_holds() {
        let t0 = Instant::now();
        let mut budget = RequestBudget::new(900, t0);
        budget.observe(
            RateLimit {
                remaining: Some(3),
                reset_unix: Some(1_000),
            },
            900,
            t0,
        );
        assert_eq!(budget.available(t0), 3.0);
        budget.observe(
            RateLimit {
                remaining: Some(0),
                reset_unix: Some(1_030),
            },
            1_000,
            t0,
        );
        assert!(!budget.try_take(t0 + 29 * SEC));
        assert_eq!(budget.ready_at(t0), t0 + 30 * SEC);
        assert!(budget.try_take(t0 + 30 * SEC));
        // Absent headers change nothing; a hold is never shortened by a later, shorter one.
        let mut budget = RequestBudget::new(900, t0);
        budget.observe(RateLimit::default(), 0, t0);
        assert_eq!(budget.available(t0), 90.0);
        budget.hold_until(t0 + 10 * SEC);
        budget.hold_until(t0 + 2 * SEC);
        assert_eq!(budget.ready_at(t0), t0 + 10 * SEC);
    }

    #[test]
    fn dedup_skips_the_same_entry_within_the_window_but_not_a_newer_one() {
        use Admission::*;
        let t0 = Instant::now();
        let mut dedup = Dedup::new(10 * SEC, 100);
        assert_eq!(dedup.admit("v1/acme/a", 100, t0), Admit);
        assert_eq!(dedup.admit("v1/acme/a", 100, t0 + 9 * SEC), Duplicate);
        assert_eq!(dedup.admit("v1/acme/b", 100, t0), Admit, "another key");
        assert_eq!(dedup.admit("v1/acme/a", 101, t0 + SEC), Admit, "newer");
        assert_eq!(dedup.admit("v1/acme/a", 100, t0 + 2 * SEC), Duplicate);
        assert_eq!(dedup.admit("v1/acme/a", 101, t0 + 12 * SEC), Admit, "later");
        dedup.forget("v1/acme/a");
        assert_eq!(
            dedup.admit("v1/acme/a", 101, t0 + 13 * SEC),
            Admit,
            "dropped"
        );
        assert_eq!(Dedup::new(Duration::ZERO, 1).admit("k", 1, t0), Admit);
    }

    #[test]
    fn after_a_purge_an_older_entry_is_refused_and_a_newer_one_admitted() {
        use Admission::*;
        let t0 = Instant::now();
        let mut dedup = Dedup::new(30 * SEC, 100);
        assert_eq!(dedup.admit("v1/acme/a", 100, t0), Admit);
        assert_eq!(dedup.admit("v1/acme2/a", 100, t0), Admit);
        dedup.purge("v1/acme/a", t0 + SEC, 105);
        // An offer in flight across the purge (read from Redis before it) is refused ...
        assert_eq!(dedup.admit("v1/acme/a", 100, t0 + 2 * SEC), Purged);
        // ... a new entry is written again, past the dedup record the purge cleared ...
        assert_eq!(dedup.admit("v1/acme/a", 106, t0 + 2 * SEC), Admit);
        // ... and after the guard an entry of the purge's own second can be re-offered.
        dedup.purge("v1/acme/", t0 + 3 * SEC, 110);
        assert_eq!(dedup.admit("v1/acme/b", 110, t0 + 4 * SEC), Purged);
        assert_eq!(
            dedup.admit("v1/acme/b", 110, t0 + 3 * SEC + PURGE_GUARD),
            Admit
        );
        // Another tenant, even one whose id extends this one's, is untouched.
        assert_eq!(dedup.admit("v1/acme2/a", 100, t0 + 4 * SEC), Duplicate);
        assert_eq!(dedup.admit("v1/acme2/b", 100, t0 + 4 * SEC), Admit);
    }

    #[test]
    fn dedup_forgets_expired_records_when_it_grows() {
        let t0 = Instant::now();
        let mut dedup = Dedup::new(SEC, 4);
        for i in 0..4 {
            assert_eq!(dedup.admit(&format!("k{i}"), 1, t0), Admission::Admit);
        }
        assert_eq!(dedup.len(), 4);
        assert_eq!(dedup.admit("k4", 1, t0 + 2 * SEC), Admission::Admit);
        assert_eq!(dedup.len(), 1);
    }

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

    #[test]
    fn a_batch_keeps_one_write_per_key_the_newest() {
        let ready = |key: &str, body: &[u8]| Ready {
            item: Item {
                key: key.into(),
                value: body.to_vec(),
                metadata: "{}".into(),
                ttl_secs: 1,
            },
            tenant: "acme".into(),
            expires_unix: 10,
            offered_at: Instant::now(),
        };
        let mut batch = Batch::default();
        assert!(batch.push(ready("a", b"1")).is_none());
        assert!(batch.push(ready("b", b"22")).is_none());
        let bytes = batch.bytes;
        let old = batch.push(ready("a", b"333333")).unwrap();
        assert_eq!(old.item.value, b"1");
        assert_eq!(batch.len(), 2);
        assert!(batch.bytes > bytes);
        let items = batch.into_items();
        assert_eq!(items[0].item.value, b"333333");
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
        use gateway_fixtures::fastly_api::Fault;
        let (api, metrics, replicator) = replicating(|_| {}).await;
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
        // The channel closes, the long linger ends early, and the entry is written.
        until("the last write", || api.entries().len() == 1).await;
    }
}
