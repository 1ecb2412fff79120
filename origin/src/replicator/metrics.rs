//! The replicator's Prometheus metrics (prefix `gateway_replication_`), in the origin's registry.

use prometheus::{
    Counter, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
};

use crate::metrics::Metrics;

/// The replicator's metrics, registered in the origin's registry (prefix `gateway_`).
#[derive(Clone)]
pub(super) struct ReplicationMetrics {
    pub(super) queued: IntCounter,
    pub(super) deduplicated: IntCounter,
    pub(super) written: IntCounter,
    /// reason: rate_limited | <status> | timeout | connection
    pub(super) retried: IntCounterVec,
    /// reason: queue_full | retries_exhausted | rejected | unauthorized | too_large | expired |
    /// unencodable | purged | invalid | stopped | shutdown | purge_failed | purge_shutdown
    pub(super) dropped: IntCounterVec,
    /// KV keys deleted by purges.
    pub(super) purged: IntCounter,
    pub(super) queue_depth: IntGauge,
    /// Purge slots waiting (a tenant purge one, a key purge one per key).
    pub(super) purge_queue_depth: IntGauge,
    /// Purges folded into one of the same tenant already waiting.
    pub(super) purges_merged: IntCounter,
    /// Purges queued in this process because Redis could not log them.
    pub(super) purges_local: IntCounter,
    /// Tenant purge generations written to the Config Store.
    pub(super) generations: IntCounter,
    /// Batches or purges left in the log after the API failed, for a later retry.
    pub(super) deferred: IntCounter,
    /// Follow-ups after a write raced a purge or a newer entry: kind = delete | rewrite.
    pub(super) followups: IntCounterVec,
    pub(super) batch_entries: HistogramVec,
    pub(super) lag: Histogram,
    /// kind: batch | put | list | delete; status: HTTP status | timeout | connection | malformed
    pub(super) api_requests: IntCounterVec,
    pub(super) budget_wait: Counter,
}

impl ReplicationMetrics {
    /// Counts `n` entries (or purges) given up for `reason`.
    pub(super) fn count_dropped(&self, reason: &str, n: u64) {
        self.dropped.with_label_values(&[reason]).inc_by(n);
    }

    /// Registers every replication metric through `registry`, which remembers their names.
    pub(super) fn register(registry: &Metrics) -> Result<ReplicationMetrics, prometheus::Error> {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Metrics,
            c: C,
        ) -> Result<C, prometheus::Error> {
            registry.register(c)
        }
        Ok(ReplicationMetrics {
            queued: reg(
                registry,
                IntCounter::new(
                    "replication_queued_total",
                    "Entries accepted into the edge replication queue",
                )?,
            )?,
            deduplicated: reg(
                registry,
                IntCounter::new(
                    "replication_deduplicated_total",
                    "Offers skipped because the same entry was queued or written within the dedup window",
                )?,
            )?,
            written: reg(
                registry,
                IntCounter::new(
                    "replication_written_total",
                    "Entries the Fastly KV API confirmed",
                )?,
            )?,
            retried: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "replication_retries_total",
                        "Fastly API requests retried, by reason",
                    ),
                    &["reason"],
                )?,
            )?,
            dropped: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "replication_dropped_total",
                        "Entries (or purges) given up, by reason",
                    ),
                    &["reason"],
                )?,
            )?,
            purged: reg(
                registry,
                IntCounter::new("replication_purged_keys_total", "KV keys deleted by purges")?,
            )?,
            queue_depth: reg(
                registry,
                IntGauge::new(
                    "replication_queue_depth",
                    "Writes in the shared replication log (any replica's), as last seen",
                )?,
            )?,
            purge_queue_depth: reg(
                registry,
                IntGauge::new(
                    "replication_purge_queue_depth",
                    "Purges waiting for the Fastly API (a tenant purge counts once, a key purge once per key)",
                )?,
            )?,
            purges_merged: reg(
                registry,
                IntCounter::new(
                    "replication_purges_merged_total",
                    "Purges merged into a waiting purge of the same tenant",
                )?,
            )?,
            purges_local: reg(
                registry,
                IntCounter::new(
                    "replication_purges_local_total",
                    "Purges queued in this replica because Redis could not log them",
                )?,
            )?,
            generations: reg(
                registry,
                IntCounter::new(
                    "replication_generations_total",
                    "Tenant purge generations written to the Config Store",
                )?,
            )?,
            deferred: reg(
                registry,
                IntCounter::new(
                    "replication_deferred_total",
                    "Work left in the replication log after the Fastly API failed, retried later",
                )?,
            )?,
            followups: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "replication_followups_total",
                        "Writes that raced a purge (kind=delete) or a newer entry (kind=rewrite)",
                    ),
                    &["kind"],
                )?,
            )?,
            batch_entries: reg(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "replication_batch_entries",
                        "Entries per write request to the Fastly KV API",
                    )
                    .buckets(vec![
                        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
                        5000.0, 10000.0,
                    ]),
                    &["kind"],
                )?,
            )?,
            lag: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "replication_lag_seconds",
                        "Time from offer to the API's confirmation of the write",
                    )
                    .buckets(vec![
                        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                        3600.0,
                    ]),
                )?,
            )?,
            api_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "replication_api_requests_total",
                        "Requests to the Fastly KV API by kind and status",
                    ),
                    &["kind", "status"],
                )?,
            )?,
            budget_wait: reg(
                registry,
                Counter::new(
                    "replication_budget_wait_seconds_total",
                    "Time spent waiting for the hourly request budget or the API's rate limit",
                )?,
            )?,
        })
    }
}
