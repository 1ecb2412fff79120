//! The replication log in Redis, shared by every replica: what replicas offered for the edge
//! tier and every accepted purge, as two Redis Streams read through one consumer group (each
//! record goes to one replica; a dead replica's records are claimed by a live one), and the
//! Fastly API request budget all replicas spend from. Every key carries the `{repl}` hash
//! tag, so on a Redis Cluster they share one slot. Holds no policy: the lanes decide.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Value;

use crate::store::{Batch, RedisStore, StoreError};

/// Offered writes: field `k` is the entry's Redis key (the entry itself stays in Redis and is
/// read when the write is sent, so the newest entry is what gets written).
pub(super) const WRITES: &str = "gw:{repl}:writes";
/// Accepted purges: `op` = `key` (field `k` a KV key) or `gen` (field `t` a tenant, `g` its
/// new purge generation).
pub(super) const PURGES: &str = "gw:{repl}:purges";
const GROUP: &str = "replicas";
const BUDGET: &str = "gw:{repl}:budget";

/// One stream record: its id and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) id: String,
    pub(super) fields: HashMap<String, String>,
}

/// Refuses when the log already holds ARGV[2] records (2); otherwise `SET seen NX PX window`
/// and, only if it was set, `XADD` (1), else 0: one round trip per offer, and the same entry
/// offered by several replicas within the window is logged once.
const OFFER: &str = r"
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then
  return 2
end
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', 'k', ARGV[3])
  return 1
end
return 0";

/// What [`Log::offer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Offered {
    Logged,
    /// The same entry was logged within the window.
    Duplicate,
    /// The log holds its maximum: the offer is dropped (and counted by the caller).
    Full,
}

/// A token bucket in one hash (`tokens`, `at` in ms, `hold` until ms), refilled from Redis's
/// own clock so replicas with skewed clocks agree. Returns 0 when a request is available (and
/// taken, unless ARGV[3] is `peek`), or how many ms to wait.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'hold')
local tokens = tonumber(b[1]) or cap
local at = tonumber(b[2]) or now
local hold = tonumber(b[3]) or 0
tokens = math.min(cap, tokens + math.max(0, now - at) * per_ms)
local wait = 0
if now < hold then
  wait = hold - now
elseif tokens >= 1 then
  if ARGV[3] ~= 'peek' then tokens = tokens - 1 end
else
  wait = math.ceil((1 - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], 7200000)
return wait";

/// Holds every replica's requests for ARGV[1] ms (never shortening a longer hold) and, when
/// ARGV[2] is not empty, caps the tokens at it (the API's `Fastly-RateLimit-Remaining`).
const HOLD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local hold = tonumber(redis.call('HGET', KEYS[1], 'hold')) or 0
if until_ms > hold then redis.call('HSET', KEYS[1], 'hold', until_ms) end
if ARGV[2] ~= '' then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
  if tokens == nil or tokens > tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'tokens', ARGV[2], 'at', now)
  end
end
redis.call('PEXPIRE', KEYS[1], 7200000)
return 0";

/// The SHA-1 of the value at KEYS[1], or false: what a sender compares with what it wrote.
const DIGEST: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return redis.sha1hex(v) end
return false";

/// The log. What the request path logs (an offer, a purge) goes through the cache's own pool
/// and bounds; what the lanes do (batches of hundreds of entries) through a pool of its own
/// with longer timeouts, so neither waits on the other.
pub(crate) struct Log {
    requests: Arc<RedisStore>,
    redis: Arc<RedisStore>,
    /// This replica's consumer name in the group.
    consumer: String,
    offer: redis::Script,
    take: redis::Script,
    hold: redis::Script,
}

impl Log {
    pub(crate) fn new(requests: Arc<RedisStore>, lanes: Arc<RedisStore>, consumer: String) -> Log {
        Log {
            requests,
            redis: lanes,
            consumer,
            offer: redis::Script::new(OFFER),
            take: redis::Script::new(TAKE),
            hold: redis::Script::new(HOLD),
        }
    }

    pub(super) fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Creates both streams and the group if missing (any replica may be first).
    pub(super) async fn ensure_group(&self) -> Result<(), StoreError> {
        for stream in [WRITES, PURGES] {
            let created = self
                .redis
                .run("repl_group", move |mut c| async move {
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(stream)
                        .arg(GROUP)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            match created {
                Ok(()) => {}
                Err(StoreError::Redis(e)) if e.contains("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Logs an offered entry unless the same one (`seen`) was logged within `window_ms`, or
    /// the log holds `max_len` records already.
    pub(super) async fn offer(
        &self,
        redis_key: &str,
        seen: &str,
        window_ms: u64,
        max_len: usize,
    ) -> Result<Offered, StoreError> {
        let script = &self.offer;
        self.requests
            .run("repl_offer", move |mut c| async move {
                script
                    .key(seen)
                    .key(WRITES)
                    .arg(window_ms.max(1))
                    .arg(max_len.max(1))
                    .arg(redis_key)
                    .invoke_async::<u8>(&mut c)
                    .await
                    .map(|n| match n {
                        1 => Offered::Logged,
                        2 => Offered::Full,
                        _ => Offered::Duplicate,
                    })
            })
            .await
    }

    /// Appends a record to `stream` (on the request path's pool: purges are logged there).
    pub(super) async fn append(
        &self,
        stream: &'static str,
        fields: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        self.requests
            .run("repl_append", move |mut c| async move {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(stream).arg("*");
                for (name, value) in fields {
                    cmd.arg(*name).arg(*value);
                }
                cmd.query_async::<String>(&mut c).await.map(|_| ())
            })
            .await
    }

    /// Up to `count` records of `stream` no replica has been given yet, now given to this one.
    pub(super) async fn read(
        &self,
        stream: &'static str,
        count: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let consumer = self.consumer.as_str();
        let reply: Value = self
            .redis
            .run("repl_read", move |mut c| async move {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count.max(1))
                    .arg("STREAMS")
                    .arg(stream)
                    .arg(">")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        // [[stream, [[id, [f, v, ...]], ...]]] or nil.
        let records = match reply {
            Value::Array(streams) => streams
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                    _ => None,
                })
                .flat_map(parse_records)
                .collect(),
            _ => Vec::new(),
        };
        Ok(records)
    }

    /// Up to `count` records of `stream` given to some replica that has not acknowledged them
    /// for `min_idle`, now given to this one (a crashed replica's work).
    pub(super) async fn claim(
        &self,
        stream: &'static str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let consumer = self.consumer.as_str();
        let reply: Value = self
            .redis
            .run("repl_claim", move |mut c| async move {
                redis::cmd("XAUTOCLAIM")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(min_idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count.max(1))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        // [next-id, [[id, [f, v, ...]], ...], [deleted ids]]
        Ok(match reply {
            Value::Array(parts) => parts
                .into_iter()
                .nth(1)
                .map(parse_records)
                .unwrap_or_default(),
            _ => Vec::new(),
        })
    }

    /// Records in `stream`, given to a replica or not.
    pub(super) async fn len(&self, stream: &'static str) -> Result<usize, StoreError> {
        self.redis
            .run("repl_len", move |mut c| async move {
                redis::cmd("XLEN").arg(stream).query_async(&mut c).await
            })
            .await
    }

    /// Done with `ids`: acknowledged and removed from the stream.
    pub(super) async fn ack(&self, stream: &'static str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.redis
            .run("repl_ack", move |mut c| async move {
                redis::pipe()
                    .cmd("XACK")
                    .arg(stream)
                    .arg(GROUP)
                    .arg(ids)
                    .ignore()
                    .cmd("XDEL")
                    .arg(stream)
                    .arg(ids)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    /// The values at `keys` and the counters at `numbers` (0 when absent), in one round trip.
    pub(super) async fn values(
        &self,
        keys: &[String],
        numbers: &[String],
    ) -> Result<(Vec<Option<Vec<u8>>>, Vec<u64>), StoreError> {
        // One batch: one round trip on a node; on a cluster the entries spread over the
        // slots, so one pipeline per slot, concurrently.
        let mut batch = Batch::new();
        for key in keys.iter().chain(numbers) {
            let mut get = redis::cmd("GET");
            get.arg(key);
            batch.push(key, get);
        }
        let values = self.redis.run_batch("repl_values", batch).await?;
        let values: Vec<Option<Vec<u8>>> = values
            .iter()
            .map(|v| redis::from_redis_value(v).unwrap_or(None))
            .collect();
        let (entries, numbers) = values.split_at(keys.len().min(values.len()));
        let numbers = numbers
            .iter()
            .map(|v| {
                v.as_deref()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        Ok((entries.to_vec(), numbers))
    }

    /// The SHA-1 (hex) of the value at each of `keys`, `None` where there is none.
    pub(super) async fn digests(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        // One script call per key: each touches one key, so the batch can be split by slot on
        // a cluster. EVAL, not EVALSHA: a pipeline cannot fall back when the script is not
        // loaded yet, and the script is a few bytes.
        let mut batch = Batch::new();
        for key in keys {
            let mut eval = redis::cmd("EVAL");
            eval.arg(DIGEST).arg(1).arg(key);
            batch.push(key, eval);
        }
        let values = self.redis.run_batch("repl_digests", batch).await?;
        Ok(values
            .iter()
            .map(|v| redis::from_redis_value(v).unwrap_or(None))
            .collect())
    }

    /// Takes one API request from the shared budget (`Ok(None)`; with `spend` false only
    /// looks), or says how long until one may be taken.
    pub(super) async fn take_budget(
        &self,
        capacity: f64,
        per_sec: f64,
        spend: bool,
    ) -> Result<Option<Duration>, StoreError> {
        let script = &self.take;
        let wait: u64 = self
            .redis
            .run("repl_budget", move |mut c| async move {
                script
                    .key(BUDGET)
                    .arg(capacity)
                    .arg(per_sec / 1000.0)
                    .arg(if spend { "take" } else { "peek" })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok((wait > 0).then(|| Duration::from_millis(wait)))
    }

    /// Holds every replica's API requests for `wait` and caps the shared tokens at `remaining`.
    pub(super) async fn hold_budget(
        &self,
        wait: Duration,
        remaining: Option<u64>,
    ) -> Result<(), StoreError> {
        let script = &self.hold;
        self.redis
            .run("repl_budget", move |mut c| async move {
                script
                    .key(BUDGET)
                    .arg(wait.as_millis() as u64)
                    .arg(remaining.map(|r| r.to_string()).unwrap_or_default())
                    .invoke_async::<()>(&mut c)
                    .await
            })
            .await
    }
}

/// The records a lane has taken and not yet acknowledged, kept looking alive: every
/// `every` their idle time is reset (`XCLAIM ... JUSTID` to their own consumer), so other
/// replicas take over only the records of a replica that stopped (crashed, or stuck far
/// longer than `claim_idle_ms`), never those of one that is lingering or waiting on the API.
pub(super) struct Held {
    ids: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Held {
    pub(super) fn add<'a>(&self, ids: impl IntoIterator<Item = &'a String>) {
        self.ids().extend(ids.into_iter().cloned());
    }

    /// No longer held (acknowledged, or left for another attempt by any replica).
    pub(super) fn remove<'a>(&self, ids: impl IntoIterator<Item = &'a String>) {
        let mut held = self.ids();
        for id in ids {
            held.remove(id);
        }
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // A set of ids: a poisoned lock is still consistent.
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Log {
    /// Starts keeping `stream` records alive for this replica; see [`Held`].
    pub(super) fn hold(self: &Arc<Self>, stream: &'static str, every: Duration) -> Held {
        let ids: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let (log, held) = (Arc::clone(self), Arc::clone(&ids));
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let ids: Vec<String> = held
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .cloned()
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let consumer = log.consumer.as_str();
                let ids = &ids;
                let _ = log
                    .redis
                    .run("repl_touch", move |mut c| async move {
                        redis::cmd("XCLAIM")
                            .arg(stream)
                            .arg(GROUP)
                            .arg(consumer)
                            .arg(0)
                            .arg(ids)
                            .arg("JUSTID")
                            .query_async::<Value>(&mut c)
                            .await
                    })
                    .await;
            }
        });
        Held { ids, task }
    }
}

/// `[[id, [field, value, ...]], ...]` → records; anything malformed is skipped.
fn parse_records(value: Value) -> Vec<Record> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut parts) = entry else {
                return None;
            };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let id = redis::from_redis_value::<String>(&parts.pop()?).ok()?;
            let flat: Vec<String> = match fields {
                Value::Array(items) => items
                    .iter()
                    .filter_map(|v| redis::from_redis_value::<String>(v).ok())
                    .collect(),
                // A record claimed after XDEL has nil fields.
                _ => Vec::new(),
            };
            let fields = flat
                .chunks(2)
                .filter_map(|pair| match pair {
                    [name, value] => Some((name.clone(), value.clone())),
                    _ => None,
                })
                .collect();
            Some(Record { id, fields })
        })
        .collect()
}
