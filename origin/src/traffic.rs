//! The last hour of traffic, per minute, per tenant and tier, kept in Redis so every replica's
//! dashboard shows the same numbers: answers, cache hits, tokens and estimated cost saved, and
//! a coarse latency histogram. Counted in memory, added to Redis once a second (one pipeline);
//! a failed flush keeps its counts for the next. Observational only: nothing here limits or
//! decides anything.

use foldhash::{HashMap, HashMapExt};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_common::usage::Tier;

use crate::store::{CounterOp, Store};

/// Minutes the dashboard shows, and (with a margin) how long Redis keeps them.
pub const WINDOW_MINUTES: u64 = 60;
const KEY_TTL_SECS: u64 = 2 * 3600;

/// Upper bounds of the latency buckets, milliseconds; the last bucket is everything slower.
pub const LATENCY_BOUNDS_MS: [f64; 6] = [1.0, 5.0, 25.0, 100.0, 500.0, 2500.0];

/// The tenant name under which every tenant's traffic is also counted (not a valid tenant id,
/// so it cannot collide with one).
pub const ALL_TENANTS: &str = "*";

/// One minute of one tenant's traffic in one tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    pub answers: u64,
    /// Answers from a cache (hit or stale).
    pub hits: u64,
    pub saved_tokens: u64,
    /// Estimated cost saved, micro-dollars.
    pub saved_micro_usd: u64,
    /// Sum of latencies, microseconds.
    pub latency_us: u64,
    /// Counts per [`LATENCY_BOUNDS_MS`] bucket, plus one for slower.
    pub latency_buckets: [u64; LATENCY_BOUNDS_MS.len() + 1],
}

const FIELDS: [&str; 5] = ["answers", "hits", "saved", "cost", "lat_us"];

impl Cell {
    pub fn add(&mut self, other: &Cell) {
        self.answers += other.answers;
        self.hits += other.hits;
        self.saved_tokens = self.saved_tokens.saturating_add(other.saved_tokens);
        self.saved_micro_usd = self.saved_micro_usd.saturating_add(other.saved_micro_usd);
        self.latency_us = self.latency_us.saturating_add(other.latency_us);
        for (a, b) in self.latency_buckets.iter_mut().zip(other.latency_buckets) {
            *a += b;
        }
    }

    /// (field name, value) for every counter, buckets as `le0`..`le6`.
    fn fields(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = FIELDS
            .iter()
            .zip([
                self.answers,
                self.hits,
                self.saved_tokens,
                self.saved_micro_usd,
                self.latency_us,
            ])
            .map(|(name, v)| ((*name).to_owned(), v))
            .collect();
        for (i, v) in self.latency_buckets.iter().enumerate() {
            out.push((format!("le{i}"), *v));
        }
        out
    }

    fn from_values(values: &[u64]) -> Cell {
        let get = |i: usize| values.get(i).copied().unwrap_or(0);
        let mut cell = Cell {
            answers: get(0),
            hits: get(1),
            saved_tokens: get(2),
            saved_micro_usd: get(3),
            latency_us: get(4),
            latency_buckets: [0; LATENCY_BOUNDS_MS.len() + 1],
        };
        for (i, b) in cell.latency_buckets.iter_mut().enumerate() {
            *b = get(FIELDS.len() + i);
        }
        cell
    }

    /// The latency below which `q` (0..=1) of the answers fell, as a bucket bound in ms
    /// (`None` without answers; `f64::INFINITY` past the last bound).
    pub fn latency_quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// What one answer adds.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub hit: bool,
    pub saved_tokens: u64,
    pub saved_micro_usd: u64,
    /// `None` for an answer counted without a latency (e.g. savings of a coalesced wait).
    pub latency_ms: Option<f64>,
    /// How many answers this sample stands for (0 for savings alone).
    pub answers: u64,
}

type Slot = (u64, String, Tier);
/// Tenant → (minute, tier) → counts: looked up by `&str`, so a request allocates nothing once
/// its tenant has been seen in the flush period.
type Pending = HashMap<String, HashMap<(u64, Tier), Cell>>;

/// The in-memory counts awaiting their flush, and the Redis they go to.
pub struct Traffic {
    store: Arc<dyn Store>,
    pending: Mutex<Pending>,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic").finish_non_exhaustive()
    }
}

impl Traffic {
    pub fn new(store: Arc<dyn Store>) -> Traffic {
        Traffic {
            store,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Counts `sample` for `tenant` in `tier` at unix second `at` (and under [`ALL_TENANTS`]).
    pub fn record(&self, tenant: &str, tier: Tier, at: u64, sample: Sample) {
        let mut cell = Cell {
            answers: sample.answers,
            hits: if sample.hit { sample.answers } else { 0 },
            saved_tokens: sample.saved_tokens,
            saved_micro_usd: sample.saved_micro_usd,
            ..Cell::default()
        };
        if let Some(ms) = sample.latency_ms {
            cell.latency_us = (ms * 1000.0).round().max(0.0) as u64;
            let bucket = LATENCY_BOUNDS_MS
                .iter()
                .position(|bound| ms <= *bound)
                .unwrap_or(LATENCY_BOUNDS_MS.len());
            cell.latency_buckets[bucket] = sample.answers.max(1);
        }
        let minute = at / 60;
        let mut pending = self.lock();
        for name in [tenant, ALL_TENANTS] {
            let cells = match pending.get_mut(name) {
                Some(cells) => cells,
                None => pending.entry(name.to_owned()).or_default(),
            };
            cells.entry((minute, tier)).or_default().add(&cell);
        }
    }

    /// Adds the pending counts to Redis in one round trip; kept for the next flush on failure.
    pub async fn flush(&self) {
        let drained: Vec<(Slot, Cell)> = self
            .lock()
            .drain()
            .flat_map(|(tenant, cells)| {
                cells
                    .into_iter()
                    .map(move |((minute, tier), cell)| ((minute, tenant.clone(), tier), cell))
            })
            .collect();
        if drained.is_empty() {
            return;
        }
        let mut ops = Vec::new();
        for ((minute, tenant, tier), cell) in &drained {
            for (field, by) in cell.fields() {
                if by > 0 {
                    ops.push(CounterOp::Incr {
                        key: series_key(*minute, tenant, *tier, &field),
                        by,
                        ttl_secs: KEY_TTL_SECS,
                    });
                }
            }
        }
        if self.store.counters(&ops).await.is_err() {
            let mut pending = self.lock();
            for ((minute, tenant, tier), cell) in drained {
                pending
                    .entry(tenant)
                    .or_default()
                    .entry((minute, tier))
                    .or_default()
                    .add(&cell);
            }
        }
    }

    /// Flushes every `interval` until the traffic is dropped everywhere else.
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) {
        crate::periodic::every(
            self,
            interval,
            |traffic| async move { traffic.flush().await },
        );
    }

    /// The last [`WINDOW_MINUTES`] minutes up to the one holding unix second `now`, oldest
    /// first, for `tenant` (or [`ALL_TENANTS`]): one cell per tier per minute. One Redis round
    /// trip; `None` when Redis does not answer.
    pub async fn read(&self, tenant: &str, now: u64) -> Option<Vec<(u64, [Cell; 3])>> {
        let last = now / 60;
        let first = last + 1 - WINDOW_MINUTES;
        let per_cell = FIELDS.len() + LATENCY_BOUNDS_MS.len() + 1;
        let mut ops = Vec::new();
        for minute in first..=last {
            for tier in Tier::ALL {
                for (field, _) in Cell::default().fields() {
                    ops.push(CounterOp::Get {
                        key: series_key(minute, tenant, tier, &field),
                    });
                }
            }
        }
        let values = self.store.counters(&ops).await.ok()?;
        let mut chunks = values.chunks(per_cell);
        let mut out = Vec::with_capacity(WINDOW_MINUTES as usize);
        for minute in first..=last {
            let mut cells: [Cell; 3] = Default::default();
            for cell in &mut cells {
                *cell = Cell::from_values(chunks.next().unwrap_or(&[]));
            }
            out.push((minute * 60, cells));
        }
        Some(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `gw:traffic:<minute>:{<tenant>}:<tier>:<field>`: a tenant's counters share a cluster slot.
fn series_key(minute: u64, tenant: &str, tier: Tier, field: &str) -> String {
    format!("gw:traffic:{minute}:{{{tenant}}}:{}:{field}", tier.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn sample(hit: bool, latency_ms: f64) -> Sample {
        Sample {
            hit,
            saved_tokens: if hit { 7 } else { 0 },
            saved_micro_usd: if hit { 3 } else { 0 },
            latency_ms: Some(latency_ms),
            answers: 1,
        }
    }

    #[tokio::test]
    async fn flushed_minutes_read_back_per_tenant_and_for_everyone() {
        let store = Arc::new(MemoryStore::new());
        let traffic = Traffic::new(store.clone());
        let now = 1_800_000_000;
        traffic.record("acme", Tier::Edge, now, sample(true, 0.8));
        traffic.record("acme", Tier::Edge, now, sample(true, 3.0));
        traffic.record("globex", Tier::Upstream, now - 120, sample(false, 300.0));
        traffic.flush().await;

        let acme = traffic.read("acme", now).await.unwrap();
        assert_eq!(acme.len(), WINDOW_MINUTES as usize);
        let (at, cells) = acme.last().unwrap();
        assert_eq!(*at, now / 60 * 60);
        assert_eq!(cells[0].answers, 2);
        assert_eq!(cells[0].hits, 2);
        assert_eq!(cells[0].saved_tokens, 14);
        assert_eq!(cells[0].latency_quantile_ms(0.5), Some(1.0));
        assert_eq!(cells[0].latency_quantile_ms(0.99), Some(5.0));
        assert_eq!(cells[2], Cell::default());

        let all = traffic.read(ALL_TENANTS, now).await.unwrap();
        let upstream: u64 = all.iter().map(|(_, c)| c[2].answers).sum();
        assert_eq!(upstream, 1);
        assert_eq!(
            all[all.len() - 3].1[2].latency_quantile_ms(0.5),
            Some(500.0)
        );
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_its_counts_for_the_next() {
        let store = Arc::new(MemoryStore::new());
        let traffic = Traffic::new(store.clone());
        let now = 1_800_000_000;
        store.set_failing(true);
        traffic.record("acme", Tier::Origin, now, sample(true, 2.0));
        traffic.flush().await;
        store.set_failing(false);
        traffic.record("acme", Tier::Origin, now, sample(true, 2.0));
        traffic.flush().await;
        let read = traffic.read("acme", now).await.unwrap();
        assert_eq!(read.last().unwrap().1[1].answers, 2);
    }
}
