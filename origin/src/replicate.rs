//! The seam toward the edge tier's dual-write: the service offers every cacheable entry it
//! answered for an edge miss (`x-gateway-edge-miss: 1`) and every purge. The real replicator
//! (a log in Redis shared by the replicas, drained in batches to the Fastly API) plugs in here.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use gateway_common::entry::Entry;
use gateway_common::key::CacheKey;

/// Receives what the edge tier should hold. `offer` and the purges take at most one Redis
/// command (the shared replication log); a replicator that cannot log an entry drops (and
/// counts) it rather than slow a response, and refuses a purge rather than accept one it will
/// not carry out.
pub trait Replicator: Send + Sync + 'static {
    /// An entry the origin answered for an edge miss. `false` when it was dropped.
    fn offer(&self, entry: Arc<Entry>) -> BoxFuture<'_, bool>;
    /// A tenant deleted one of its keys (already deleted from Redis, or Redis failed).
    /// `Err`: not queued; the caller must say so.
    fn purge_key(&self, key: &CacheKey) -> BoxFuture<'_, Result<(), PurgeRefused>>;
    /// A tenant purged all of its keys: `generation` is its new purge generation (recorded
    /// in Redis), `None` when Redis could not record one (then every KV key of the tenant is
    /// listed and deleted). `Err`: not queued; the caller must say so.
    fn purge_tenant(
        &self,
        tenant: &str,
        generation: Option<u64>,
    ) -> BoxFuture<'_, Result<(), PurgeRefused>>;
    /// True while the queue is saturated; `/readyz` then answers 503 so a load balancer sends
    /// traffic to replicas that can still replicate.
    fn saturated(&self) -> bool;
    /// Shutdown: send what is queued now and wait at most `within` for it; what is left.
    fn drain(&self, within: Duration) -> BoxFuture<'_, Drained>;
}

/// Why a purge was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PurgeRefused {
    #[error("the purge queue is full")]
    Full,
    #[error("the replicator has stopped")]
    Stopped,
}

/// Work a drain left unsent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Entries not written.
    pub writes: usize,
    /// Purge slots not sent (a tenant purge counts once, a key purge once per key).
    pub purges: usize,
}

/// Replicates nothing, never saturated: the default until the KV replicator exists.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopReplicator;

impl Replicator for NoopReplicator {
    fn offer(&self, _entry: Arc<Entry>) -> BoxFuture<'_, bool> {
        async { true }.boxed()
    }
    fn purge_key(&self, _key: &CacheKey) -> BoxFuture<'_, Result<(), PurgeRefused>> {
        async { Ok(()) }.boxed()
    }
    fn purge_tenant(
        &self,
        _tenant: &str,
        _generation: Option<u64>,
    ) -> BoxFuture<'_, Result<(), PurgeRefused>> {
        async { Ok(()) }.boxed()
    }
    fn saturated(&self) -> bool {
        false
    }
    fn drain(&self, _within: Duration) -> BoxFuture<'_, Drained> {
        async { Drained::default() }.boxed()
    }
}

/// Records what it is offered, **for tests**; its saturation is a switch.
#[derive(Debug, Default)]
pub struct RecordingReplicator {
    offered: Mutex<Vec<Arc<Entry>>>,
    purged: Mutex<Vec<String>>,
    saturated: AtomicBool,
}

impl RecordingReplicator {
    pub fn new() -> RecordingReplicator {
        RecordingReplicator::default()
    }

    /// Keys (hex) of the entries offered so far, in order.
    pub fn offered_keys(&self) -> Vec<String> {
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| e.envelope.key.clone())
            .collect()
    }

    /// Purges seen so far: `key:<hex>`, `tenant:<id>@<generation>` or `tenant:<id>`.
    pub fn purges(&self) -> Vec<String> {
        self.purged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_saturated(&self, saturated: bool) {
        self.saturated.store(saturated, Ordering::SeqCst);
    }
}

impl Replicator for RecordingReplicator {
    fn offer(&self, entry: Arc<Entry>) -> BoxFuture<'_, bool> {
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(entry);
        async { true }.boxed()
    }
    fn purge_key(&self, key: &CacheKey) -> BoxFuture<'_, Result<(), PurgeRefused>> {
        self.purged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("key:{}", key.hex()));
        async { Ok(()) }.boxed()
    }
    fn purge_tenant(
        &self,
        tenant: &str,
        generation: Option<u64>,
    ) -> BoxFuture<'_, Result<(), PurgeRefused>> {
        self.purged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(match generation {
                Some(g) => format!("tenant:{tenant}@{g}"),
                None => format!("tenant:{tenant}"),
            });
        async { Ok(()) }.boxed()
    }
    fn saturated(&self) -> bool {
        self.saturated.load(Ordering::SeqCst)
    }
    fn drain(&self, _within: Duration) -> BoxFuture<'_, Drained> {
        async { Drained::default() }.boxed()
    }
}
