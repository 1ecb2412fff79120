//! The origin cache store: a small byte-level trait, its Redis implementation (pooled, every
//! call bounded, errors counted and logged at a limited rate) and an in-memory one for tests.
//! A store never calls up into the service, and never decides policy: callers treat errors as misses.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;

use crate::breaker::Breaker;

mod memory;

use crate::metrics::Metrics;
use crate::settings::{RedisSettings, ms};
pub use memory::MemoryStore;

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

    /// `SET key value <unit> ttl` (`EX` seconds or `PX` milliseconds; at least 1).
    async fn set_expiring(
        &self,
        key: &str,
        value: Vec<u8>,
        unit: &'static str,
        ttl: u64,
    ) -> Result<(), StoreError> {
        self.run("set", move |mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg(unit)
                .arg(ttl.max(1))
                .query_async::<()>(&mut c)
                .await
        })
        .await
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
        self.set_expiring(key, value, "EX", ttl_secs).boxed()
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

    fn claim_flight<'a>(
        &'a self,
        entry_key: &'a str,
        lock_key: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreResult<'a, Claim> {
        async move {
            // A pipeline, not a script: the entry and the lock need not share a slot.
            let (entry, locked): (Option<Vec<u8>>, Option<String>) = self
                .run("flight", move |mut c| async move {
                    redis::pipe()
                        .cmd("GET")
                        .arg(entry_key)
                        .cmd("SET")
                        .arg(lock_key)
                        .arg(holder)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms.max(1))
                        .query_async(&mut c)
                        .await
                })
                .await?;
            match (entry, locked.is_some()) {
                (Some(entry), took) => {
                    if took {
                        // Not needed after all: let the next miss lead.
                        let _ = self.keep_flight(lock_key, holder, None).await;
                    }
                    Ok(Claim::Entry(entry))
                }
                (None, true) => Ok(Claim::Lead),
                (None, false) => Ok(Claim::Held),
            }
        }
        .boxed()
    }

    fn watch_flight<'a>(
        &'a self,
        entry_key: &'a str,
        result_key: &'a str,
        lock_key: &'a str,
    ) -> StoreResult<'a, Watched> {
        self.run("flight", move |mut c| async move {
            let (entry, result, held): (Option<Vec<u8>>, Option<Vec<u8>>, bool) = redis::pipe()
                .cmd("GET")
                .arg(entry_key)
                .cmd("GET")
                .arg(result_key)
                .cmd("EXISTS")
                .arg(lock_key)
                .query_async(&mut c)
                .await?;
            Ok(Watched {
                entry,
                result,
                held,
            })
        })
        .boxed()
    }

    fn keep_flight<'a>(
        &'a self,
        lock_key: &'a str,
        holder: &'a str,
        ttl_ms: Option<u64>,
    ) -> StoreResult<'a, ()> {
        self.run("flight", move |mut c| async move {
            redis::cmd("EVAL")
                .arg(KEEP_FLIGHT)
                .arg(1)
                .arg(lock_key)
                .arg(holder)
                .arg(ttl_ms.unwrap_or(0))
                .query_async::<()>(&mut c)
                .await
        })
        .boxed()
    }

    fn set_px<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl_ms: u64) -> StoreResult<'a, ()> {
        self.set_expiring(key, value, "PX", ttl_ms).boxed()
    }

    fn index_add<'a>(
        &'a self,
        sets: &'a [String],
        member: &'a str,
        value_key: &'a str,
        value: Vec<u8>,
        ttl_secs: u64,
    ) -> StoreResult<'a, ()> {
        self.run("semantic_add", move |mut c| async move {
            let ttl = ttl_secs.max(1);
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(value_key)
                .arg(value)
                .arg("EX")
                .arg(ttl)
                .ignore();
            for set in sets {
                pipe.cmd("SADD").arg(set).arg(member).ignore();
                // A new set has no expiry (NX sets it); an older one keeps the later of the
                // two (GT): a bucket outlives every vector it names. Redis 7.0 options.
                pipe.cmd("EXPIRE").arg(set).arg(ttl).arg("NX").ignore();
                pipe.cmd("EXPIRE").arg(set).arg(ttl).arg("GT").ignore();
            }
            pipe.query_async::<()>(&mut c).await
        })
        .boxed()
    }

    fn index_union<'a>(&'a self, sets: &'a [String]) -> StoreResult<'a, Vec<String>> {
        self.run("semantic_union", move |mut c| async move {
            redis::cmd("SUNION").arg(sets).query_async(&mut c).await
        })
        .boxed()
    }

    fn index_remove<'a>(
        &'a self,
        sets: &'a [String],
        members: &'a [String],
    ) -> StoreResult<'a, ()> {
        self.run("semantic_remove", move |mut c| async move {
            let mut pipe = redis::pipe();
            for set in sets {
                pipe.cmd("SREM").arg(set).arg(members).ignore();
            }
            pipe.query_async::<()>(&mut c).await
        })
        .boxed()
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> StoreResult<'a, Vec<Option<Vec<u8>>>> {
        self.run("semantic_get", move |mut c| async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            redis::cmd("MGET").arg(keys).query_async(&mut c).await
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

/// Extends (ARGV[2] ms > 0) or releases (0) the lock at KEYS[1], only while ARGV[1] holds it.
const KEEP_FLIGHT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1";

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
