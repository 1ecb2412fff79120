//! [`RedisStore`]: the [`Store`] on a Redis node or a Redis Cluster, through the same code
//! paths (a [`Conn`] and [`Batch`]es). Each call: breaker check, pooled connection (bounded by
//! the pool wait and connect timeouts), one round trip bounded by the response timeout.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use redis::Value;

use super::batch::Batch;
use super::conn::Conn;
use super::pool::{Pool, PoolSetupError};
use super::scripts::KEEP_FLIGHT;
use super::{Claim, CounterOp, Store, StoreError, StoreResult, ThrottledLog, Watched};
use crate::breaker::Breaker;
use crate::metrics::Metrics;
use crate::settings::{RedisSettings, ms};

pub struct RedisStore {
    pool: Pool,
    cluster: bool,
    response_timeout: Duration,
    breaker: Breaker,
    metrics: Metrics,
    log: ThrottledLog,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    #[error(transparent)]
    Pool(#[from] PoolSetupError),
}

impl RedisStore {
    /// Builds the pool; connects lazily, so a Redis that is down at start-up is not an error.
    pub fn new(settings: &RedisSettings, metrics: Metrics) -> Result<RedisStore, RedisSetupError> {
        Ok(RedisStore {
            pool: Pool::new(settings)?,
            cluster: settings.mode == crate::settings::RedisMode::Cluster,
            response_timeout: ms(settings.response_timeout_ms),
            breaker: Breaker::new(
                settings.breaker_failure_threshold,
                ms(settings.breaker_cooldown_ms),
            ),
            metrics,
            log: ThrottledLog::new(Duration::from_secs(settings.error_log_interval_secs)),
        })
    }

    /// Whether this store speaks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Runs one round trip built by `call` on a pooled connection, with every bound, metric
    /// and log applied. `op` labels the metrics. Other modules that keep state in Redis (the
    /// replication log) call through here too.
    pub(crate) async fn run<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
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

    /// A [`Batch`] in one [`RedisStore::run`]: one pipeline, or one per slot on a cluster.
    pub(crate) async fn run_batch(
        &self,
        op: &'static str,
        batch: Batch<'_>,
    ) -> Result<Vec<Value>, StoreError> {
        self.run(op, move |c| async move { batch.query(&c).await })
            .await
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
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let lease = self.pool.lease().await?;
        // A connection is a cheap handle; the lease stays checked out until the call ends, so
        // the pool still bounds concurrency.
        match tokio::time::timeout(self.response_timeout, call(lease.conn())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error()
                    || e.is_timeout()
                    || (self.cluster && e.is_cluster_error())
                {
                    lease.detach();
                    self.pool.failed();
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
        self.purge_older(pattern, generation).boxed()
    }

    fn counters<'a>(&'a self, ops: &'a [CounterOp]) -> StoreResult<'a, Vec<u64>> {
        async move {
            let mut batch = Batch::new();
            push_counter_ops(&mut batch, ops);
            let values = self.run_batch("counters", batch).await?;
            Ok(values.iter().map(counter_value).collect())
        }
        .boxed()
    }

    // Labelled "get": it is the cache read, with the budget counters riding along. On one node
    // one round trip instead of two halves the pool checkouts, timers and socket wake-ups of a
    // hit; on a cluster the entry's slot and the tenant's slot are asked concurrently.
    fn get_with_counters<'a>(
        &'a self,
        key: &'a str,
        ops: &'a [CounterOp],
    ) -> StoreResult<'a, (Option<Vec<u8>>, Vec<u64>)> {
        async move {
            let mut batch = Batch::new();
            batch.push(key, cmd1("GET", key));
            push_counter_ops(&mut batch, ops);
            let mut values = self.run_batch("get", batch).await?.into_iter();
            let value = match values.next() {
                // The entry's bytes are taken out of the reply, not copied.
                Some(Value::BulkString(bytes)) => Some(bytes),
                Some(v) => redis::from_redis_value::<Option<Vec<u8>>>(&v)
                    .map_err(|e| StoreError::Redis(e.to_string()))?,
                None => None,
            };
            Ok((value, values.map(|v| counter_value(&v)).collect()))
        }
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
            // A batch, not a script: with the entry and its lock tagged alike (the key's hex)
            // it is one pipeline on one node, and it stays correct for keys that are not.
            let mut batch = Batch::new();
            batch.push(entry_key, cmd1("GET", entry_key));
            let mut set = cmd1("SET", lock_key);
            set.arg(holder).arg("NX").arg("PX").arg(ttl_ms.max(1));
            batch.push(lock_key, set);
            let values = self.run_batch("flight", batch).await?;
            let (entry, locked): (Option<Vec<u8>>, Option<String>) = match values.as_slice() {
                [entry, locked] => (from_value(entry)?, from_value(locked)?),
                _ => return Err(StoreError::Redis("short flight reply".into())),
            };
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
        async move {
            let mut batch = Batch::new();
            batch
                .push(entry_key, cmd1("GET", entry_key))
                .push(result_key, cmd1("GET", result_key))
                .push(lock_key, cmd1("EXISTS", lock_key));
            let values = self.run_batch("flight", batch).await?;
            match values.as_slice() {
                [entry, result, held] => Ok(Watched {
                    entry: from_value(entry)?,
                    result: from_value(result)?,
                    held: from_value(held)?,
                }),
                _ => Err(StoreError::Redis("short flight reply".into())),
            }
        }
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
                .query_async::<Value>(&mut c)
                .await
                .map(|_| ())
        })
        .boxed()
    }
}

/// `<name> <key>`.
pub(super) fn cmd1(name: &str, key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd(name);
    cmd.arg(key);
    cmd
}

fn from_value<T: redis::FromRedisValue>(value: &Value) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|e| StoreError::Redis(e.to_string()))
}

/// `INCRBY` + `EXPIRE` (the expiry's reply ignored) or `GET` per op: one reply per op.
fn push_counter_ops<'k>(batch: &mut Batch<'k>, ops: &'k [CounterOp]) {
    for op in ops {
        match op {
            CounterOp::Incr { key, by, ttl_secs } => {
                let mut incr = cmd1("INCRBY", key);
                incr.arg(*by);
                let mut expire = cmd1("EXPIRE", key);
                expire.arg(*ttl_secs);
                batch.push(key, incr).push_ignored(key, expire);
            }
            CounterOp::Get { key } => {
                batch.push(key, cmd1("GET", key));
            }
        }
    }
}

/// A counter's reply: 0 when absent or not a number.
fn counter_value(reply: &Value) -> u64 {
    redis::from_redis_value::<Option<String>>(reply)
        .ok()
        .flatten()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
}
