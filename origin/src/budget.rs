//! Tenant budgets in Redis, shared by every replica: requests per second (a per-second window
//! counter) and tokens per calendar month (UTC), plus the ledger of tokens used and tokens
//! saved by the cache. Tokens used are added to Redis as each provider call ends; tokens saved
//! are batched (they limit nothing). Fails open: when Redis cannot answer, the request is
//! allowed and usage is kept for the next flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway_common::tenant::Tenant;
use prometheus::IntCounterVec;

use crate::metrics::Metrics;
use crate::store::{CounterOp, Store};

/// Why a request is refused; both become 429 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Rate { retry_after_secs: u64 },
    Tokens { retry_after_secs: u64 },
}

/// A tenant's standing for one request. Rate applies to every request; tokens only to a
/// request that needs a provider call (a cache hit costs no tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub rate: Option<Rejection>,
    pub tokens: Option<Rejection>,
}

impl Standing {
    pub const ALLOWED: Standing = Standing {
        rate: None,
        tokens: None,
    };
}

#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    used: u64,
    saved: u64,
}

pub struct Budget {
    store: Arc<dyn Store>,
    metrics: Metrics,
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").finish_non_exhaustive()
    }
}

impl Budget {
    pub fn new(store: Arc<dyn Store>, metrics: Metrics) -> Budget {
        Budget {
            store,
            metrics,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// One Redis round trip at most (none for a tenant without limits). `now` is unix seconds.
    pub async fn check(&self, tenant: &Tenant, now: u64) -> Standing {
        let ops = self.counter_ops(tenant, now);
        if ops.is_empty() {
            return Standing::ALLOWED;
        }
        let values = self.store.counters(&ops).await.ok();
        self.standing(tenant, now, values)
    }

    /// The counter ops [`Budget::check`] runs for `tenant` (they count this request against
    /// the rate limit); empty for a tenant without limits. A caller that runs them itself, in
    /// the round trip of its cache read, passes their values to [`Budget::standing`].
    pub fn counter_ops(&self, tenant: &Tenant, now: u64) -> Vec<CounterOp> {
        let mut ops = Vec::new();
        if tenant.requests_per_second.is_some() {
            ops.push(CounterOp::Incr {
                key: rate_key(&tenant.id, now),
                by: 1,
                ttl_secs: 2,
            });
        }
        if tenant.monthly_token_budget.is_some() {
            ops.push(CounterOp::Get {
                key: usage_key("usage", &tenant.id, now),
            });
        }
        ops
    }

    /// Counts `requests` the edge answered for `tenant` in the current rate window (`now`,
    /// unix seconds), so the origin's next check includes them: they arrive batched, so they
    /// land in the window of their arrival, at most the delivery delay after they were made.
    /// `None` for a tenant without a rate limit.
    pub fn edge_requests_op(&self, tenant: &Tenant, requests: u64, now: u64) -> Option<CounterOp> {
        tenant.requests_per_second?;
        Some(CounterOp::Incr {
            key: rate_key(&tenant.id, now),
            by: requests,
            ttl_secs: 2,
        })
    }

    /// The tenant's standing from the values of [`Budget::counter_ops`], in order; `None`
    /// (Redis did not answer) allows the request: budgets fail open.
    pub fn standing(&self, tenant: &Tenant, now: u64, values: Option<Vec<u64>>) -> Standing {
        let Some(values) = values else {
            return Standing::ALLOWED;
        };
        let mut values = values.into_iter();
        let mut standing = Standing::ALLOWED;
        if let Some(limit) = tenant.requests_per_second
            && values.next().is_some_and(|count| count > u64::from(limit))
        {
            standing.rate = Some(Rejection::Rate {
                retry_after_secs: 1,
            });
        }
        if let Some(budget) = tenant.monthly_token_budget {
            let pending = self.lock().get(&tenant.id).map_or(0, |p| p.used);
            let used = values.next().unwrap_or(0).saturating_add(pending);
            if used >= budget {
                standing.tokens = Some(Rejection::Tokens {
                    retry_after_secs: secs_until_next_month(now).max(1),
                });
            }
        }
        standing
    }

    /// Count a rejection in the metrics.
    pub fn count_rejection(&self, tenant: &str, rejection: Rejection) {
        let reason = match rejection {
            Rejection::Rate { .. } => "rate",
            Rejection::Tokens { .. } => "tokens",
        };
        self.metrics
            .budget_rejections
            .with_label_values(&[tenant, reason])
            .inc();
    }

    /// Tokens a provider call consumed for `tenant`, kept here until the next flush.
    pub fn record_used(&self, tenant: &str, tokens: u64) {
        self.record(Some(&self.metrics.tokens_used), tenant, tokens, |p| {
            &mut p.used
        });
    }

    /// Tokens a provider call consumed for `tenant`, added to the shared monthly counter in
    /// Redis at once (one command, off the response path), so every replica's next check
    /// sees them; kept for the next flush only when Redis does not answer. `now` is unix
    /// seconds.
    pub async fn spend(&self, tenant: &str, tokens: u64, now: u64) {
        if tokens == 0 {
            return;
        }
        let op = CounterOp::Incr {
            key: usage_key("usage", tenant, now),
            by: tokens,
            ttl_secs: secs_until_next_month(now) + 35 * 86_400,
        };
        if self.store.counters(&[op]).await.is_ok() {
            self.metrics
                .tokens_used
                .with_label_values(&[tenant])
                .inc_by(tokens);
        } else {
            self.record_used(tenant, tokens);
        }
    }

    /// Tokens a cache hit (or a coalesced wait) saved `tenant`, for the monthly saved ledger in
    /// Redis (the metrics by tier are `Meter::saved`'s).
    pub fn record_saved(&self, tenant: &str, tokens: u64) {
        self.record(None, tenant, tokens, |p| &mut p.saved);
    }

    /// Counts `tokens` in `counter` and in the tenant's pending `field`. Runs once or twice
    /// per request, so the tenant id is copied only the first time a flush period sees it.
    fn record(
        &self,
        counter: Option<&IntCounterVec>,
        tenant: &str,
        tokens: u64,
        field: fn(&mut Pending) -> &mut u64,
    ) {
        if tokens == 0 {
            return;
        }
        if let Some(counter) = counter {
            counter.with_label_values(&[tenant]).inc_by(tokens);
        }
        let mut pending = self.lock();
        // Provider-supplied counts: a hostile or broken provider must not overflow them.
        let slot = match pending.get_mut(tenant) {
            Some(p) => field(p),
            None => field(pending.entry(tenant.to_owned()).or_default()),
        };
        *slot = slot.saturating_add(tokens);
    }

    /// Writes the pending counts to Redis in one round trip; on failure they are kept for the
    /// next flush, so a Redis outage delays the monthly counts but does not lose them.
    pub async fn flush(&self, now: u64) {
        let drained: Vec<(String, Pending)> = self.lock().drain().collect();
        if drained.is_empty() {
            return;
        }
        let ttl_secs = secs_until_next_month(now) + 35 * 86_400;
        let mut ops = Vec::new();
        for (tenant, p) in &drained {
            for (kind, by) in [("usage", p.used), ("saved", p.saved)] {
                if by > 0 {
                    ops.push(CounterOp::Incr {
                        key: usage_key(kind, tenant, now),
                        by,
                        ttl_secs,
                    });
                }
            }
        }
        if self.store.counters(&ops).await.is_err() {
            let mut pending = self.lock();
            for (tenant, p) in drained {
                let entry = pending.entry(tenant).or_default();
                entry.used = entry.used.saturating_add(p.used);
                entry.saved = entry.saved.saturating_add(p.saved);
            }
        }
    }

    /// Flushes every `interval` until the budget is dropped everywhere else.
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) {
        crate::periodic::every(self, interval, |budget| async move {
            budget.flush(unix_now()).await
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `gw:rate:{<tenant>}:<now>`: the tenant's request counter for the second `now`. Built on
/// every request: joined, not formatted.
fn rate_key(tenant: &str, now: u64) -> String {
    ["gw:rate:{", tenant, "}:", itoa::Buffer::new().format(now)].concat()
}

/// `gw:<kind>:{<tenant>}:<YYYY-MM>` for the UTC month containing `now` (tagged by the tenant,
/// like the rate counter and the purge generation: one cluster slot per tenant).
pub fn usage_key(kind: &str, tenant: &str, now: u64) -> String {
    let (year, month, _) = civil_from_days((now / 86_400) as i64);
    format!("gw:{kind}:{{{tenant}}}:{year:04}-{month:02}")
}

/// Seconds from `now` to 00:00 UTC on the first day of the next month.
pub fn secs_until_next_month(now: u64) -> u64 {
    let (year, month, _) = civil_from_days((now / 86_400) as i64);
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let start = days_from_civil(ny, nm, 1) as u64 * 86_400;
    start.saturating_sub(now)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31). Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn tenant(rps: Option<u32>, budget: Option<u64>) -> Tenant {
        Tenant {
            id: "acme".into(),
            api_key_sha256: vec![],
            allowed_models: vec!["*".into()],
            cache_ttl_secs: 60,
            stale_if_error_secs: 0,
            monthly_token_budget: budget,
            requests_per_second: rps,
            cache_sampled: true,
            cache_store_requests: false,
            purge_generation: 0,
            semantic: Default::default(),
        }
    }

    #[test]
    fn months_are_computed_in_utc() {
        // 2024-02-29T12:00:00Z
        let now = 1_709_208_000;
        assert_eq!(usage_key("usage", "acme", now), "gw:usage:{acme}:2024-02");
        assert_eq!(secs_until_next_month(now), 12 * 3600);
        // 2023-12-31T23:59:59Z
        assert_eq!(
            usage_key("usage", "t", 1_704_067_199),
            "gw:usage:{t}:2023-12"
        );
        assert_eq!(secs_until_next_month(1_704_067_199), 1);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[tokio::test]
    async fn the_rate_limit_refuses_past_the_limit_within_one_second() {
        let budget = Budget::new(Arc::new(MemoryStore::new()), Metrics::new().unwrap());
        let t = tenant(Some(2), None);
        assert_eq!(budget.check(&t, 100).await, Standing::ALLOWED);
        assert_eq!(budget.check(&t, 100).await, Standing::ALLOWED);
        assert_eq!(
            budget.check(&t, 100).await.rate,
            Some(Rejection::Rate {
                retry_after_secs: 1
            })
        );
        assert_eq!(budget.check(&t, 101).await, Standing::ALLOWED);
    }

    #[tokio::test]
    async fn the_token_budget_counts_pending_and_flushed_usage() {
        let budget = Budget::new(Arc::new(MemoryStore::new()), Metrics::new().unwrap());
        let t = tenant(None, Some(100));
        budget.record_used("acme", 60);
        assert_eq!(budget.check(&t, 1_709_208_000).await.tokens, None);
        budget.flush(1_709_208_000).await;
        budget.record_used("acme", 40);
        assert!(matches!(
            budget.check(&t, 1_709_208_000).await.tokens,
            Some(Rejection::Tokens {
                retry_after_secs: 43_200
            })
        ));
    }

    #[tokio::test]
    async fn spent_tokens_count_at_once_for_every_replica_and_wait_when_redis_is_down() {
        let store = Arc::new(MemoryStore::new());
        let (one, two) = (
            Budget::new(store.clone(), Metrics::new().unwrap()),
            Budget::new(store.clone(), Metrics::new().unwrap()),
        );
        let t = tenant(None, Some(100));
        one.spend("acme", 100, 1_709_208_000).await;
        assert!(
            two.check(&t, 1_709_208_000).await.tokens.is_some(),
            "another replica sees the spend without a flush"
        );
        store.set_failing(true);
        one.spend("acme", 5, 1_709_208_000).await;
        store.set_failing(false);
        one.flush(1_709_208_000).await;
        let got = store
            .counters(&[CounterOp::Get {
                key: usage_key("usage", "acme", 1_709_208_000),
            }])
            .await
            .unwrap();
        assert_eq!(got, vec![105], "kept, then flushed");
    }

    #[tokio::test]
    async fn provider_counts_saturate_instead_of_overflowing() {
        let budget = Budget::new(Arc::new(MemoryStore::new()), Metrics::new().unwrap());
        let t = tenant(None, Some(u64::MAX));
        budget.record_used("acme", u64::MAX - 1);
        budget.record_used("acme", 7);
        assert!(budget.check(&t, 5).await.tokens.is_some(), "at the maximum");
    }

    #[tokio::test]
    async fn budgets_fail_open_and_keep_usage_while_the_store_is_down() {
        let store = Arc::new(MemoryStore::new());
        let budget = Budget::new(store.clone(), Metrics::new().unwrap());
        let t = tenant(Some(0), Some(0));
        store.set_failing(true);
        assert_eq!(budget.check(&t, 5).await, Standing::ALLOWED);
        budget.record_used("acme", 7);
        budget.flush(5).await;
        store.set_failing(false);
        budget.flush(5).await;
        let got = store
            .counters(&[CounterOp::Get {
                key: usage_key("usage", "acme", 5),
            }])
            .await
            .unwrap();
        assert_eq!(got, vec![7]);
    }
}
