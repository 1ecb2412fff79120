//! The origin cache store: a small byte-level trait, its Redis implementation (a single node
//! or a Redis Cluster; pooled, every call bounded, errors counted and logged at a limited rate)
//! and an in-memory one for tests. A store never calls up into the service, and never decides
//! policy: callers treat errors as misses.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

mod batch;
mod conn;
mod memory;
mod pool;
mod redis;
mod scan;
mod scripts;

pub(crate) use batch::Batch;
pub use batch::slot;
pub use conn::Conn;
pub use memory::MemoryStore;
pub use pool::PoolSetupError;
pub use redis::{RedisSetupError, RedisStore};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("redis call timed out")]
    Timeout,
    /// Every pooled connection was busy for the whole pool wait: local saturation, not a sign
    /// that Redis is unwell, so it does not count toward the breaker.
    #[error("no free redis connection within the pool wait")]
    PoolBusy,
    #[error("no redis connection: {0}")]
    Pool(String),
    #[error("redis: {0}")]
    Redis(String),
    /// The Redis breaker is open after repeated failures; the call was not attempted.
    #[error("redis skipped while its breaker is open")]
    Skipped,
    /// The in-memory store's failure switch is on (tests).
    #[error("store unavailable")]
    Unavailable,
}

impl StoreError {
    fn kind(&self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::PoolBusy => "pool_busy",
            StoreError::Pool(_) => "pool",
            StoreError::Redis(_) => "io",
            StoreError::Skipped => "skipped",
            StoreError::Unavailable => "unavailable",
        }
    }
}

/// One counter operation of a batch sent in a single round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CounterOp {
    /// `INCRBY key by` then `EXPIRE key ttl_secs`; yields the new value.
    Incr { key: String, by: u64, ttl_secs: u64 },
    /// `GET key`; yields the value, 0 when absent or not a number.
    Get { key: String },
}

pub type StoreResult<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// What [`Store::claim_flight`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody was fetching the key: the caller holds the flight's lock and must fetch.
    Lead,
    /// The entry is there after all (written since the caller's read).
    Entry(Vec<u8>),
    /// Another replica (or request) holds the lock.
    Held,
}

/// What a follower of another replica's flight sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    pub entry: Option<Vec<u8>>,
    /// An answer the leader published because it will not be cached (an error, say).
    pub result: Option<Vec<u8>>,
    /// The leader still holds the lock.
    pub held: bool,
}

/// Bytes in, bytes out. Every method is bounded in time by the implementation.
pub trait Store: Send + Sync + 'static {
    /// `Ok(None)` is a miss.
    fn get<'a>(&'a self, key: &'a str) -> StoreResult<'a, Option<Vec<u8>>>;
    /// `SET key value EX ttl_secs`.
    fn set_ex<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl_secs: u64) -> StoreResult<'a, ()>;
    /// Whether the key existed.
    fn delete<'a>(&'a self, key: &'a str) -> StoreResult<'a, bool>;
    /// Delete every cache entry matching a `prefix*` pattern that was written under a purge
    /// generation below `generation` (entries of the current one stay); the number deleted.
    fn purge<'a>(&'a self, pattern: &'a str, generation: u64) -> StoreResult<'a, u64>;
    /// The ops in one round trip (on a cluster, one per slot they touch, concurrently); one
    /// value per op, in order.
    fn counters<'a>(&'a self, ops: &'a [CounterOp]) -> StoreResult<'a, Vec<u64>>;
    /// [`Store::get`] and [`Store::counters`] together: a request's cache read and its budget
    /// counters. A single Redis node runs them in one round trip; a cluster runs the entry's
    /// and the tenant's parts concurrently (two slots). An error fails both (callers treat it
    /// as a miss with the counters unknown, and fail open).
    fn get_with_counters<'a>(
        &'a self,
        key: &'a str,
        ops: &'a [CounterOp],
    ) -> StoreResult<'a, (Option<Vec<u8>>, Vec<u64>)> {
        async move {
            let value = self.get(key).await?;
            let counters = self.counters(ops).await?;
            Ok((value, counters))
        }
        .boxed()
    }
    fn ping(&self) -> StoreResult<'_, ()>;

    /// The single flight across replicas, in one round trip: the entry at `entry_key` if it
    /// landed since the caller's read; else the lock at `lock_key` for `holder` (for
    /// `ttl_ms`) if nobody holds it.
    fn claim_flight<'a>(
        &'a self,
        entry_key: &'a str,
        lock_key: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreResult<'a, Claim>;
    /// The entry, the published result and whether the lock is held, in one round trip.
    fn watch_flight<'a>(
        &'a self,
        entry_key: &'a str,
        result_key: &'a str,
        lock_key: &'a str,
    ) -> StoreResult<'a, Watched>;
    /// While `holder` holds the lock: extends it to `ttl_ms` from now, or releases it (`None`).
    fn keep_flight<'a>(
        &'a self,
        lock_key: &'a str,
        holder: &'a str,
        ttl_ms: Option<u64>,
    ) -> StoreResult<'a, ()>;
    /// `SET key value PX ttl_ms`: a short-lived value (a flight's published result).
    fn set_px<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl_ms: u64) -> StoreResult<'a, ()>;
    /// The semantic index's write, in one round trip: `SET value_key value EX ttl_secs`, and
    /// `member` added to each of `sets`, whose expiry is pushed to at least `ttl_secs` from
    /// now. Every key must share one hash tag (a cluster runs the pipeline on one node).
    fn index_add<'a>(
        &'a self,
        sets: &'a [String],
        member: &'a str,
        value_key: &'a str,
        value: Vec<u8>,
        ttl_secs: u64,
    ) -> StoreResult<'a, ()>;
    /// `SUNION sets`: the members of any of them (one hash tag).
    fn index_union<'a>(&'a self, sets: &'a [String]) -> StoreResult<'a, Vec<String>>;
    /// `SREM set members…` for each of `sets` (one hash tag).
    fn index_remove<'a>(&'a self, sets: &'a [String], members: &'a [String])
    -> StoreResult<'a, ()>;
    /// `MGET keys`: one value (or `None`) per key, in order (one hash tag).
    fn get_many<'a>(&'a self, keys: &'a [String]) -> StoreResult<'a, Vec<Option<Vec<u8>>>>;
}

/// At most one log line per interval for a recurring failure; the rest are only counted.
#[derive(Debug)]
pub struct ThrottledLog {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl ThrottledLog {
    pub fn new(interval: Duration) -> ThrottledLog {
        ThrottledLog {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many were suppressed
    /// since the last line; `None` when it should only be counted.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttled_log_admits_one_line_per_interval() {
        let log = ThrottledLog::new(Duration::from_secs(3600));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
    }
}
