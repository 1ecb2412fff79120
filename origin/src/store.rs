//! The origin cache store: a small byte-level trait, its Redis implementation (pooled, every
//! call bounded, errors counted and logged at a limited rate) and an in-memory one for tests.
//! A store never calls up into the service, and never decides policy: callers treat errors as misses.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;

use crate::breaker::Breaker;
use crate::metrics::Metrics;
use crate::settings::{RedisSettings, ms};

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
    /// The ops in one round trip; one value per op, in order.
    fn counters<'a>(&'a self, ops: &'a [CounterOp]) -> StoreResult<'a, Vec<u64>>;
    /// [`Store::get`] and [`Store::counters`] together: a request's cache read and its budget
    /// counters. Redis runs them in one round trip; an error fails both (callers treat it as
    /// a miss with the counters unknown, and fail open).
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

/// Pools multiplexed connections without deadpool-redis's PING-per-checkout recycle (which
/// would double every round trip); a connection that fails with an I/O error is detached
/// instead, so the next checkout opens a fresh one.
struct RedisManager {
    client: redis::Client,
    config: redis::AsyncConnectionConfig,
}

impl deadpool::managed::Manager for RedisManager {
    type Type = MultiplexedConnection;
    type Error = redis::RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        self.client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
    }

    async fn recycle(
        &self,
        _conn: &mut MultiplexedConnection,
        _metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<redis::RedisError> {
        Ok(())
    }
}

type Pool = deadpool::managed::Pool<RedisManager>;

/// The Redis store. Each call: breaker check, pooled connection (bounded by the pool wait and
/// connect timeouts), one round trip bounded by the response timeout.
pub struct RedisStore {
    pool: Pool,
    response_timeout: Duration,
    breaker: Breaker,
    metrics: Metrics,
    log: ThrottledLog,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error("redis.url: {0}")]
    Url(String),
    #[error("redis pool: {0}")]
    Pool(String),
}

impl RedisStore {
    /// Builds the pool; connects lazily, so a Redis that is down at start-up is not an error.
    pub fn new(settings: &RedisSettings, metrics: Metrics) -> Result<RedisStore, RedisSetupError> {
        let client = redis::Client::open(settings.url.expose())
            // The parse error may quote the URL, which may hold a password.
            .map_err(|e| RedisSetupError::Url(format!("{:?}", e.kind())))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(ms(settings.connect_timeout_ms))
            .set_response_timeout(ms(settings.response_timeout_ms));
        let pool = Pool::builder(RedisManager { client, config })
            .max_size(settings.pool_size)
            .wait_timeout(Some(ms(settings.pool_wait_timeout_ms)))
            .create_timeout(Some(ms(settings.connect_timeout_ms)))
            .recycle_timeout(Some(ms(settings.response_timeout_ms)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| RedisSetupError::Pool(e.to_string()))?;
        Ok(RedisStore {
            pool,
            response_timeout: ms(settings.response_timeout_ms),
            breaker: Breaker::new(
                settings.breaker_failure_threshold,
                ms(settings.breaker_cooldown_ms),
            ),
            metrics,
            log: ThrottledLog::new(Duration::from_secs(settings.error_log_interval_secs)),
        })
    }

    /// Runs one round trip built by `call` on a pooled connection, with every bound, metric
    /// and log applied. `op` labels the metrics. Other modules that keep state in Redis (the
    /// replication log) call through here too.
    pub(crate) async fn run<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            self.metrics
                .redis_errors
                .with_label_values(&[op, "skipped"])
                .inc();
            return Err(StoreError::Skipped);
        }
        let start = Instant::now();
        let result = self.attempt(call).await;
        self.metrics
            .redis_duration
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        if !matches!(result, Err(StoreError::PoolBusy)) {
            self.breaker.record(result.is_ok());
        }
        if let Err(error) = &result {
            self.metrics
                .redis_errors
                .with_label_values(&[op, error.kind()])
                .inc();
            if let Some(suppressed) = self.log.admit() {
                tracing::warn!(op, error = %error, suppressed, "redis call failed; serving as a miss");
            }
        }
        result
    }

    async fn attempt<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let object = self.pool.get().await.map_err(|e| match e {
            deadpool::managed::PoolError::Timeout(deadpool::managed::TimeoutType::Wait) => {
                StoreError::PoolBusy
            }
            deadpool::managed::PoolError::Timeout(_) => StoreError::Timeout,
            other => StoreError::Pool(other.to_string()),
        })?;
        // A multiplexed connection is a cheap handle; the pooled object stays checked out
        // until the call ends, so the pool still bounds concurrency.
        let conn = (*object).clone();
        match tokio::time::timeout(self.response_timeout, call(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error()
                    || e.is_timeout()
                {
                    drop(deadpool::managed::Object::take(object));
                }
                Err(StoreError::Redis(e.to_string()))
            }
            // The late reply is discarded by the multiplexer; the connection stays usable.
            Err(_) => Err(StoreError::Timeout),
        }
    }
}

impl Store for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreResult<'a, Option<Vec<u8>>> {
        self.run("get", move |mut c| async move {
            redis::cmd("GET").arg(key).query_async(&mut c).await
        })
        .boxed()
    }

    fn set_ex<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl_secs: u64) -> StoreResult<'a, ()> {
        self.run("set", move |mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(ttl_secs.max(1))
                .query_async::<()>(&mut c)
                .await
        })
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreResult<'a, bool> {
        self.run("del", move |mut c| async move {
            redis::cmd("UNLINK")
                .arg(key)
                .query_async::<u64>(&mut c)
                .await
                .map(|n| n > 0)
        })
        .boxed()
    }

    fn purge<'a>(&'a self, pattern: &'a str, generation: u64) -> StoreResult<'a, u64> {
        async move {
            let mut cursor: u64 = 0;
            let mut deleted = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .run("scan", move |mut c| async move {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut c)
                            .await
                    })
                    .await?;
                if !keys.is_empty() {
                    deleted += self
                        .run("unlink", move |mut c| async move {
                            // One script per key, pipelined: each touches one key (a cluster
                            // routes them one by one), and an entry a request wrote since the
                            // purge (the current generation) is kept.
                            let mut pipe = redis::pipe();
                            for key in &keys {
                                pipe.cmd("EVAL")
                                    .arg(UNLINK_OLDER)
                                    .arg(1)
                                    .arg(key)
                                    .arg(generation);
                            }
                            let deleted: Vec<u64> = pipe.query_async(&mut c).await?;
                            Ok(deleted.into_iter().sum::<u64>())
                        })
                        .await?;
                }
                if next == 0 {
                    return Ok(deleted);
                }
                cursor = next;
            }
        }
        .boxed()
    }

    fn counters<'a>(&'a self, ops: &'a [CounterOp]) -> StoreResult<'a, Vec<u64>> {
        self.run("counters", move |mut c| async move {
            let mut pipe = redis::pipe();
            push_counter_ops(&mut pipe, ops);
            let values: Vec<Option<String>> = pipe.query_async(&mut c).await?;
            Ok(values.into_iter().map(counter_value).collect())
        })
        .boxed()
    }

    // Labelled "get": it is the cache read, with the budget counters riding along. One
    // round trip instead of two (GET, then the counters on another pooled connection) halves
    // the pool checkouts, timers and socket wake-ups of a hit, in the origin and in Redis.
    fn get_with_counters<'a>(
        &'a self,
        key: &'a str,
        ops: &'a [CounterOp],
    ) -> StoreResult<'a, (Option<Vec<u8>>, Vec<u64>)> {
        self.run("get", move |mut c| async move {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(key);
            push_counter_ops(&mut pipe, ops);
            let values: Vec<redis::Value> = pipe.query_async(&mut c).await?;
            let mut values = values.iter();
            let value = match values.next() {
                Some(v) => redis::from_redis_value::<Option<Vec<u8>>>(v)?,
                None => None,
            };
            let counters = values
                .map(|v| counter_value(redis::from_redis_value::<Option<String>>(v).ok().flatten()))
                .collect();
            Ok((value, counters))
        })
        .boxed()
    }

    fn ping(&self) -> StoreResult<'_, ()> {
        self.run("ping", |mut c| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| ())
        })
        .boxed()
    }
}

/// Deletes the entry at KEYS[1] if its envelope's purge generation (absent = 0) is below
/// ARGV[1]; 1 if it did. An entry is `<envelope JSON>\n<body>` (`common::entry`).
const UNLINK_OLDER: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local nl = string.find(v, '\n', 1, true)
local ok, env = pcall(cjson.decode, string.sub(v, 1, (nl or 1) - 1))
local g = 0
if ok and type(env) == 'table' then g = tonumber(env['generation']) or 0 end
if g < tonumber(ARGV[1]) then
  redis.call('UNLINK', KEYS[1])
  return 1
end
return 0";

/// `INCRBY` + `EXPIRE` (the expiry's reply ignored) or `GET` per op: one reply per op.
fn push_counter_ops(pipe: &mut redis::Pipeline, ops: &[CounterOp]) {
    for op in ops {
        match op {
            CounterOp::Incr { key, by, ttl_secs } => {
                pipe.cmd("INCRBY").arg(key).arg(*by);
                pipe.cmd("EXPIRE").arg(key).arg(*ttl_secs).ignore();
            }
            CounterOp::Get { key } => {
                pipe.cmd("GET").arg(key);
            }
        }
    }
}

/// A counter's reply: 0 when absent or not a number.
fn counter_value(reply: Option<String>) -> u64 {
    reply.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// Key → (value, expiry).
type MemoryMap = HashMap<String, (Vec<u8>, Option<Instant>)>;

/// An in-memory [`Store`] **for tests**: no eviction, a coarse TTL, a switch that makes every
/// call fail. Not for production (it is per process, so replicas would not share it).
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<MemoryMap>,
    failing: AtomicBool,
    calls: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// While on, every call fails with [`StoreError::Unavailable`].
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// How many calls were made (including failed ones).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable)
        } else {
            Ok(())
        }
    }

    fn live(&self, key: &str) -> Option<Vec<u8>> {
        let mut map = self.lock();
        match map.get(key) {
            Some((_, Some(expiry))) if *expiry <= Instant::now() => {
                map.remove(key);
                None
            }
            Some((value, _)) => Some(value.clone()),
            None => None,
        }
    }
}

/// `prefix*` patterns only (the only kind the origin uses).
/// The purge generation in an entry's envelope line (0 when absent or unreadable).
fn entry_generation(value: &[u8]) -> u64 {
    let line = value.split(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|envelope| envelope.get("generation").and_then(|g| g.as_u64()))
        .unwrap_or(0)
}

fn pattern_matches(pattern: &str, key: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => key == pattern,
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreResult<'a, Option<Vec<u8>>> {
        async move {
            self.check()?;
            Ok(self.live(key))
        }
        .boxed()
    }

    fn set_ex<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl_secs: u64) -> StoreResult<'a, ()> {
        async move {
            self.check()?;
            let expiry = Instant::now() + Duration::from_secs(ttl_secs.max(1));
            self.lock().insert(key.to_string(), (value, Some(expiry)));
            Ok(())
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreResult<'a, bool> {
        async move {
            self.check()?;
            Ok(self.lock().remove(key).is_some())
        }
        .boxed()
    }

    fn purge<'a>(&'a self, pattern: &'a str, generation: u64) -> StoreResult<'a, u64> {
        async move {
            self.check()?;
            let mut map = self.lock();
            let before = map.len();
            map.retain(|k, (value, _)| {
                !pattern_matches(pattern, k) || entry_generation(value) >= generation
            });
            Ok((before - map.len()) as u64)
        }
        .boxed()
    }

    fn counters<'a>(&'a self, ops: &'a [CounterOp]) -> StoreResult<'a, Vec<u64>> {
        async move {
            self.check()?;
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    CounterOp::Incr { key, by, ttl_secs } => {
                        let current = self
                            .live(key)
                            .and_then(|v| String::from_utf8(v).ok())
                            .and_then(|s| s.parse::<u64>().ok())
                            .unwrap_or(0);
                        let next = current.saturating_add(*by);
                        let expiry = Instant::now() + Duration::from_secs((*ttl_secs).max(1));
                        self.lock()
                            .insert(key.clone(), (next.to_string().into_bytes(), Some(expiry)));
                        out.push(next);
                    }
                    CounterOp::Get { key } => out.push(
                        self.live(key)
                            .and_then(|v| String::from_utf8(v).ok())
                            .and_then(|s| s.parse::<u64>().ok())
                            .unwrap_or(0),
                    ),
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn ping(&self) -> StoreResult<'_, ()> {
        async move { self.check() }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_store_round_trips_and_purges_by_prefix() {
        let s = MemoryStore::new();
        s.set_ex("gw:v1:acme:aa", b"x".to_vec(), 60).await.unwrap();
        s.set_ex("gw:v1:acme:bb", b"y".to_vec(), 60).await.unwrap();
        s.set_ex("gw:v1:globex:aa", b"z".to_vec(), 60)
            .await
            .unwrap();
        s.set_ex(
            "gw:v1:acme:cc",
            br#"{"generation":2}
body"#
                .to_vec(),
            60,
        )
        .await
        .unwrap();
        assert_eq!(s.get("gw:v1:acme:aa").await.unwrap(), Some(b"x".to_vec()));
        assert_eq!(s.purge("gw:v1:acme:*", 2).await.unwrap(), 2);
        assert_eq!(s.get("gw:v1:acme:bb").await.unwrap(), None);
        assert!(
            s.delete("gw:v1:acme:cc").await.unwrap(),
            "written since: kept"
        );
        assert!(s.delete("gw:v1:globex:aa").await.unwrap());
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn memory_counters_increment_and_read() {
        let s = MemoryStore::new();
        let ops = [
            CounterOp::Incr {
                key: "a".into(),
                by: 5,
                ttl_secs: 10,
            },
            CounterOp::Get { key: "b".into() },
        ];
        assert_eq!(s.counters(&ops).await.unwrap(), vec![5, 0]);
        assert_eq!(s.counters(&ops).await.unwrap(), vec![10, 0]);
    }

    #[tokio::test]
    async fn a_failing_memory_store_errors() {
        let s = MemoryStore::new();
        s.set_failing(true);
        assert!(s.get("k").await.is_err());
        assert!(s.ping().await.is_err());
    }

    #[test]
    fn the_throttled_log_admits_one_line_per_interval() {
        let log = ThrottledLog::new(Duration::from_secs(3600));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
    }
}
