//! The write lane: takes offered entries from the shared queue, batches them (by count, bytes
//! and a linger that grows while the budget waits) and writes them to the Fastly KV API.
//! Writes purged while queued or in hand are never sent; purges themselves are the other lane's.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::caller::Caller;
use super::{Pending, Shared};
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
    pub(super) tenant: String,
    /// Unix seconds; the TTL sent is what is left of it at send time.
    expires_unix: u64,
    offered_at: Instant,
}

/// Writes gathered for one request, one per KV key (a newer offer replaces an older one).
#[derive(Default)]
pub(super) struct Batch {
    items: Vec<Ready>,
    index: HashMap<String, usize>,
    bytes: usize,
}

impl Batch {
    pub(super) fn len(&self) -> usize {
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

    pub(super) fn into_items(self) -> Vec<Ready> {
        self.items
    }
}

/// The task that writes entries; the only writer to the KV store.
pub(super) struct WriteLane {
    pub(super) shared: Arc<Shared>,
    pub(super) caller: Caller,
    pub(super) config: BatchConfig,
    /// Tenant → its stale-if-error window, which extends the KV TTL (`Entry::kv_expiry`).
    pub(super) stale_windows: HashMap<String, u64>,
    /// A write that did not fit the previous batch.
    pub(super) carry: Option<Ready>,
    pub(super) batch_refused_until: Option<Instant>,
}

impl WriteLane {
    pub(super) async fn run(mut self) {
        loop {
            let mut batch = Batch::default();
            match self.carry.take() {
                Some(ready) => {
                    batch.push(ready);
                }
                None => match self.shared.next_write().await {
                    None => return,
                    Some(pending) => self.add(&mut batch, pending),
                },
            }
            self.gather(&mut batch).await;
            // Purges that arrived while the batch was in hand take effect here, under the same
            // lock that marks the batch as sent (see `Shared::seal`).
            let items = self.shared.seal(batch, &mut self.carry);
            if !items.is_empty() {
                self.write(items).await;
            }
            self.shared.sent(self.carry.is_some());
        }
    }

    /// Fills `batch` until it is full, or the linger time has passed (at once while the
    /// replicator flushes) and the budget allows a request; a waiting budget thus makes
    /// batches larger instead of the queue longer.
    async fn gather(&mut self, batch: &mut Batch) {
        let started = Instant::now();
        while batch.len() < self.config.max_entries && self.carry.is_none() {
            if let Some(pending) = self.shared.try_next_write() {
                self.add(batch, pending);
                continue;
            }
            let linger_end = if self.shared.flushing() {
                started
            } else {
                started + self.config.linger
            };
            let send_at = linger_end.max(self.caller.budget.ready_at());
            if send_at <= Instant::now() {
                return;
            }
            tokio::select! {
                () = self.shared.write_ready.notified() => {}
                () = tokio::time::sleep_until(send_at.into()) => return,
            }
        }
    }

    /// Encodes `pending` into `batch` (or the carry when the batch is full by bytes).
    fn add(&mut self, batch: &mut Batch, pending: Pending) {
        let Some(ready) = self.prepare(pending) else {
            return;
        };
        let size = ready.item.line_len_bound();
        if !batch.is_empty() && batch.bytes + size > self.config.max_bytes {
            self.carry = Some(ready);
            return;
        }
        if batch.push(ready).is_some() {
            // Two offers of one key in one batch: only the newer is sent.
            self.caller.metrics.deduplicated.inc();
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

    /// Sends `items`: batches, split on a refused batch, single-key writes where batches are
    /// not supported or an entry is too large for one.
    async fn write(&mut self, items: Vec<Ready>) {
        let mut parts: VecDeque<Vec<Ready>> = VecDeque::from([items]);
        while let Some(part) = parts.pop_front() {
            let now_unix = unix_now();
            let (mut part, expired): (Vec<Ready>, Vec<Ready>) =
                part.into_iter().partition(|r| r.expires_unix > now_unix);
            self.shared.count_dropped(&expired, "expired", true);
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
                    self.write_one(ready).await;
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
                Ok(()) => self.count_written(&part),
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
                        self.write_one(ready).await;
                    }
                }
                Err(e) => self.give_up(&part, &e),
            }
        }
    }

    async fn write_one(&mut self, ready: Ready) {
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
            Ok(()) => self.count_written(std::slice::from_ref(&ready)),
            Err(e) => self.give_up(std::slice::from_ref(&ready), &e),
        }
    }

    fn count_written(&self, written: &[Ready]) {
        let metrics = &self.caller.metrics;
        metrics.written.inc_by(written.len() as u64);
        for ready in written {
            metrics
                .lag
                .observe(ready.offered_at.elapsed().as_secs_f64());
        }
    }

    fn give_up(&self, items: &[Ready], error: &KvApiError) {
        let reason = match error.status() {
            Some(401 | 403) => "unauthorized",
            _ if error.is_retryable() => "retries_exhausted",
            _ => "rejected",
        };
        if let Some(suppressed) = self.caller.log.admit() {
            tracing::warn!(error = %error, entries = items.len(), reason, suppressed, "replication: entries not written to the edge tier");
        }
        self.shared.count_dropped(items, reason, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
