//! The write lane: takes offered writes from the shared log (a crashed replica's too, once
//! unacknowledged for `claim_idle_ms`), reads the entries they name from Redis as they are
//! now, writes them to the Fastly KV API in batches, then checks Redis still holds what was
//! written: a purge or a newer entry that raced the write gets a follow-up (a delete, or the
//! newer entry), so nothing older or purged stays in the KV store. Purges are the other lane's.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gateway_common::entry;
use gateway_common::key::CacheKey;
use gateway_common::policy;
use sha1::{Digest, Sha1};

use super::budget::Lane;
use super::caller::Caller;
use super::log::{self, Held, Record};
use super::{Shared, Timing};
use crate::budget::unix_now;
use crate::kv_api::{Item, KvApiError, RequestKind, encode_batch};
use crate::settings::{ReplicationSettings, ms};

/// After the batch endpoint is refused as unsupported, single-key writes are used this long
/// before the batch endpoint is tried again.
const BATCH_REFUSED_FOR: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
pub(super) struct BatchConfig {
    max_entries: usize,
    max_bytes: usize,
    linger: Duration,
}

impl From<&ReplicationSettings> for BatchConfig {
    fn from(s: &ReplicationSettings) -> BatchConfig {
        BatchConfig {
            max_entries: s.batch_max_entries,
            max_bytes: s.batch_max_bytes,
            linger: ms(s.linger_ms),
        }
    }
}

/// A write ready to send: the KV item and what is needed to finish it.
pub(super) struct Ready {
    pub(super) item: Item,
    /// The entry's key in Redis, checked again after the write.
    redis_key: String,
    /// SHA-1 (hex) of the Redis value written, as Redis's `sha1hex` renders it.
    digest: String,
    /// Unix seconds; the TTL sent is what is left of it at send time.
    expires_unix: u64,
    /// When it was logged, in unix milliseconds (from its record id).
    logged_ms: u64,
}

/// The task that writes entries; the only writer to the KV store.
pub(super) struct WriteLane {
    pub(super) shared: Arc<Shared>,
    pub(super) caller: Caller,
    pub(super) config: BatchConfig,
    pub(super) timing: Timing,
    /// Tenant → its stale-if-error window, which extends the KV TTL (`Entry::kv_expiry`).
    pub(super) stale_windows: HashMap<String, u64>,
    pub(super) batch_refused_until: Option<Instant>,
}

/// How the sent part of a batch ended.
#[derive(Default)]
struct Sent {
    /// Confirmed by the API: checked against Redis afterwards.
    written: Vec<Ready>,
    /// The API failed past the retries: left in the log for a later attempt.
    deferred: bool,
}

impl WriteLane {
    pub(super) async fn run(mut self) {
        let mut next_claim = Instant::now();
        let held = self
            .shared
            .log
            .hold(log::WRITES, self.timing.claim_idle / 3);
        loop {
            // Take no work that would then wait for the budget: records held unacknowledged
            // that long would look abandoned to the other replicas. Waiting in turn with the
            // purge lane, so purges cannot take every request while writes wait.
            let budget = Arc::clone(&self.caller.budget);
            let turn = budget.ready(Lane::Writes).await;
            let records = self.gather(&mut next_claim, &held).await;
            drop(turn);
            if records.is_empty() {
                let closed = {
                    let mut state = self.shared.lock();
                    state.writes_idle = true;
                    state.closed
                };
                if closed {
                    return;
                }
                self.pause(self.timing.poll).await;
                continue;
            }
            let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            self.send(records).await;
            held.remove(&ids);
        }
    }

    /// Sleeps `wait`, or less when woken (a local offer, a flush, the close).
    async fn pause(&self, wait: Duration) {
        tokio::select! {
            () = self.shared.write_ready.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Up to a batch of records: a dead replica's first (when due), then new ones, lingering
    /// for more unless the replicator flushes. Empty when the log has nothing.
    async fn gather(&mut self, next_claim: &mut Instant, held: &Held) -> Vec<Record> {
        let log = &self.shared.log;
        let max = self.config.max_entries;
        let mut records = Vec::new();
        if Instant::now() >= *next_claim {
            *next_claim = Instant::now() + self.timing.claim_idle / 2;
            records = log
                .claim(log::WRITES, self.timing.claim_idle, max)
                .await
                .unwrap_or_default();
            held.add(records.iter().map(|r| &r.id));
        }
        let started = Instant::now();
        loop {
            if records.len() < max {
                let read = log
                    .read(log::WRITES, max - records.len())
                    .await
                    .unwrap_or_default();
                held.add(read.iter().map(|r| &r.id));
                records.extend(read);
            }
            if records.is_empty() || records.len() >= max {
                return records;
            }
            let linger_end = if self.shared.flushing() {
                started
            } else {
                started + self.config.linger
            };
            let now = Instant::now();
            if now >= linger_end {
                return records;
            }
            self.pause((linger_end - now).min(self.timing.poll)).await;
        }
    }

    /// Writes what the records name (as Redis holds it now), checks it afterwards, and
    /// acknowledges the records unless the API failed them.
    async fn send(&mut self, records: Vec<Record>) {
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let Some(items) = self.prepare(&records).await else {
            // Redis did not answer: the records stay in the log and come back.
            self.pause(self.timing.poll).await;
            return;
        };
        let sent = self.write(items).await;
        self.check(sent.written).await;
        if sent.deferred {
            self.caller.metrics.deferred.inc();
            return;
        }
        let _ = self.shared.log.ack(log::WRITES, &ids).await;
        if let Ok(depth) = self.shared.log.len(log::WRITES).await {
            self.caller.metrics.queue_depth.set(depth as i64);
        }
    }

    /// The KV items for `records`: each entry read from Redis now, one per key, skipping
    /// what is gone, purged by a newer tenant generation, or expired. `None` if Redis failed.
    async fn prepare(&self, records: &[Record]) -> Option<Vec<Ready>> {
        let mut keys: Vec<(CacheKey, String, u64)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for record in records {
            let parsed = record
                .fields
                .get("k")
                .and_then(|k| parse_redis_key(k).map(|key| (key, k.clone())));
            match parsed {
                Some((key, redis_key)) if seen.insert(redis_key.clone()) => {
                    keys.push((key, redis_key, logged_ms(&record.id)));
                }
                Some(_) => self.caller.metrics.deduplicated.inc(),
                None => self.caller.metrics.count_dropped("invalid", 1),
            }
        }
        let mut tenants: Vec<String> = keys
            .iter()
            .map(|(k, _, _)| k.tenant().to_string())
            .collect();
        tenants.sort_unstable();
        tenants.dedup();
        let generation_keys: Vec<String> =
            tenants.iter().map(|t| crate::generation::key(t)).collect();
        let redis_keys: Vec<String> = keys.iter().map(|(_, k, _)| k.clone()).collect();
        let (values, generations) = self
            .shared
            .log
            .values(&redis_keys, &generation_keys)
            .await
            .ok()?;
        let generation: HashMap<String, u64> = tenants.into_iter().zip(generations).collect();
        let now = unix_now();
        let mut items = Vec::new();
        for ((key, redis_key, logged_ms), value) in keys.into_iter().zip(values) {
            let Some(value) = value else {
                // Purged, expired or evicted since it was offered: nothing to write.
                self.caller.metrics.count_dropped("gone", 1);
                continue;
            };
            // Copied as stored, never opened: the KV form is the Redis form's two pieces, so
            // the replicator needs no seal key and a sealed entry stays sealed on the way.
            let Ok(stored) = entry::split(&value, &key) else {
                self.caller.metrics.count_dropped("invalid", 1);
                continue;
            };
            let tenant_generation = generation.get(key.tenant()).copied().unwrap_or(0);
            if policy::purged(stored.header.generation, tenant_generation) {
                self.caller.metrics.count_dropped("purged", 1);
                continue;
            }
            let (body, metadata) = (stored.value.to_vec(), stored.metadata.to_owned());
            let stale = self.stale_windows.get(key.tenant()).copied().unwrap_or(0);
            let expires_unix = stored.header.kv_expiry(stale);
            if expires_unix <= now {
                self.caller.metrics.count_dropped("expired", 1);
                continue;
            }
            items.push(Ready {
                item: Item {
                    key: key.kv_key(),
                    value: body,
                    metadata,
                    ttl_secs: 1,
                },
                redis_key,
                digest: hex::encode(Sha1::digest(&value)),
                expires_unix,
                logged_ms,
            });
        }
        Some(items)
    }

    /// After the write: Redis must still hold exactly what was written. Where a purge deleted
    /// it meanwhile, the KV copy is deleted again; where a newer entry replaced it, that one is
    /// logged to be written. (Whatever changed Redis after this check logs its own record,
    /// which is sent after this write.)
    async fn check(&self, written: Vec<Ready>) {
        if written.is_empty() {
            return;
        }
        let keys: Vec<String> = written.iter().map(|r| r.redis_key.clone()).collect();
        let Ok(now) = self.shared.log.digests(&keys).await else {
            // Unknown: the written entries stay until their TTL or the next purge.
            return;
        };
        for (ready, digest) in written.iter().zip(now) {
            let tenant = ready.item.key.split('/').nth(1).unwrap_or_default();
            let (kind, stream, fields) = match digest {
                Some(d) if d == ready.digest => continue,
                None => (
                    "delete",
                    log::PURGES,
                    vec![("op", "key"), ("t", tenant), ("k", ready.item.key.as_str())],
                ),
                Some(_) => (
                    "rewrite",
                    log::WRITES,
                    vec![("k", ready.redis_key.as_str())],
                ),
            };
            if self.shared.log.append(stream, &fields).await.is_ok() {
                if kind == "delete" {
                    self.shared.logged_purge();
                }
                self.caller
                    .metrics
                    .followups
                    .with_label_values(&[kind])
                    .inc();
            }
        }
    }

    /// Sends `items`: batches, split on a refused batch, single-key writes where batches are
    /// not supported or an entry is too large for one.
    async fn write(&mut self, items: Vec<Ready>) -> Sent {
        let mut sent = Sent::default();
        // Batches of at most `max_bytes` (an entry larger than that goes alone).
        let mut parts: VecDeque<Vec<Ready>> = VecDeque::new();
        let mut bytes = 0;
        for ready in items {
            let size = ready.item.line_len_bound();
            match parts.back_mut() {
                Some(part) if bytes + size <= self.config.max_bytes => part.push(ready),
                _ => {
                    bytes = 0;
                    parts.push_back(vec![ready]);
                }
            }
            bytes += size;
        }
        while let Some(part) = parts.pop_front() {
            let now_unix = unix_now();
            let (mut part, expired): (Vec<Ready>, Vec<Ready>) =
                part.into_iter().partition(|r| r.expires_unix > now_unix);
            self.caller
                .metrics
                .count_dropped("expired", expired.len() as u64);
            if part.is_empty() {
                continue;
            }
            for ready in &mut part {
                ready.item.ttl_secs = ready.expires_unix.saturating_sub(now_unix).max(1);
            }
            let alone = part.len() == 1 && part[0].item.line_len_bound() > self.config.max_bytes;
            let refused = self
                .batch_refused_until
                .is_some_and(|until| Instant::now() < until);
            if alone || refused {
                for ready in part {
                    self.write_one(ready, &mut sent).await;
                }
                continue;
            }
            let body = Bytes::from(encode_batch(part.iter().map(|r| &r.item)));
            self.caller
                .metrics
                .batch_entries
                .with_label_values(&["batch"])
                .observe(part.len() as f64);
            let result = self
                .caller
                .call(RequestKind::Batch, |api| {
                    let body = body.clone();
                    async move { api.put_batch(body).await.map(|a| ((), a)) }
                })
                .await;
            match result {
                Ok(()) => {
                    self.count_written(&part);
                    sent.written.extend(part);
                }
                // The API does not say which line it refused: halve until the bad one is alone
                // (about 2·log2(n) extra requests), so one bad entry does not sink its batch.
                Err(e) if matches!(e.status(), Some(400 | 413)) && part.len() > 1 => {
                    let second = part.split_off(part.len() / 2);
                    parts.push_front(second);
                    parts.push_front(part);
                }
                Err(e) if matches!(e.status(), Some(404 | 405 | 415 | 501)) => {
                    if let Some(suppressed) = self.caller.log.admit() {
                        tracing::warn!(error = %e, suppressed, "replication: the batch endpoint was refused; writing keys one by one for a while");
                    }
                    self.batch_refused_until = Some(Instant::now() + BATCH_REFUSED_FOR);
                    for ready in part {
                        self.write_one(ready, &mut sent).await;
                    }
                }
                Err(e) => sent.deferred |= self.give_up(&part, &e),
            }
        }
        sent
    }

    async fn write_one(&mut self, ready: Ready, sent: &mut Sent) {
        self.caller
            .metrics
            .batch_entries
            .with_label_values(&["put"])
            .observe(1.0);
        let item = &ready.item;
        let result = self
            .caller
            .call(RequestKind::Put, |api| async move {
                api.put_key(item).await.map(|a| ((), a))
            })
            .await;
        match result {
            Ok(()) => {
                self.count_written(std::slice::from_ref(&ready));
                sent.written.push(ready);
            }
            Err(e) => sent.deferred |= self.give_up(std::slice::from_ref(&ready), &e),
        }
    }

    fn count_written(&self, written: &[Ready]) {
        let metrics = &self.caller.metrics;
        metrics.written.inc_by(written.len() as u64);
        let now_ms = unix_ms();
        for ready in written {
            let lag_ms = now_ms.saturating_sub(ready.logged_ms);
            metrics.lag.observe(lag_ms as f64 / 1000.0);
        }
    }

    /// The API failed `items` for good: `true` when it may succeed later (they stay in the
    /// log), `false` when it refused them (dropped and counted).
    fn give_up(&self, items: &[Ready], error: &KvApiError) -> bool {
        let reason = match error.status() {
            Some(401 | 403) => "unauthorized",
            _ if error.is_retryable() => {
                if let Some(suppressed) = self.caller.log.admit() {
                    tracing::warn!(error = %error, entries = items.len(), suppressed, "replication: the Fastly API kept failing; the entries stay in the log for a later attempt");
                }
                return true;
            }
            _ => "rejected",
        };
        if let Some(suppressed) = self.caller.log.admit() {
            tracing::warn!(error = %error, entries = items.len(), reason, suppressed, "replication: entries not written to the edge tier");
        }
        self.caller
            .metrics
            .count_dropped(reason, items.len() as u64);
        false
    }
}

/// `gw:v1:<tenant>:{<hex>}` → the cache key; `None` for anything else (an entry of the
/// untagged format written before the cluster change is not replicated: it expires).
fn parse_redis_key(redis_key: &str) -> Option<CacheKey> {
    let rest = redis_key.strip_prefix("gw:v1:")?;
    let (tenant, tagged) = rest.split_once(':')?;
    let hex = tagged.strip_prefix('{')?.strip_suffix('}')?;
    CacheKey::from_hex(tenant, hex)
}

/// A record id's time part (`<unix ms>-<seq>`).
fn logged_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(unix_ms)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_key_names_its_cache_key_and_nothing_else_does() {
        let hex = "ab".repeat(32);
        let key = parse_redis_key(&format!("gw:v1:acme:{{{hex}}}")).unwrap();
        assert_eq!((key.tenant(), key.hex()), ("acme", hex.as_str()));
        assert_eq!(parse_redis_key(&key.redis_key()), Some(key));
        assert!(parse_redis_key(&format!("gw:v1:acme:{hex}")).is_none());
        assert!(parse_redis_key("gw:v1:acme:short").is_none());
        assert!(parse_redis_key(&format!("gw:v2:acme:{{{hex}}}")).is_none());
        assert_eq!(logged_ms("1700000000123-4"), 1_700_000_000_123);
    }
}
