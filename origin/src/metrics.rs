//! Prometheus metrics: one registry per running app (so tests in one process never mix), every
//! counter an operator or a test needs. Owns no logic beyond counting.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The registry's prefix: every family is exposed as `gateway_<name>`.
const PREFIX: &str = "gateway";

/// Histogram buckets in seconds, from 100 µs (a Redis hit) to 60 s (a long completion).
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The exposed name of every family registered so far, whether or not it has a sample yet
    /// (`Registry::gather` leaves out labelled families with no children).
    families: Arc<Mutex<BTreeSet<String>>>,
    /// route, status
    pub requests: IntCounterVec,
    /// route
    pub request_duration: HistogramVec,
    /// layer (origin|upstream), outcome (hit|miss|bypass)
    pub cache_results: IntCounterVec,
    /// op
    pub redis_duration: HistogramVec,
    /// op, kind (timeout|pool|io|skipped)
    pub redis_errors: IntCounterVec,
    /// outcome (stored|failed|uncacheable)
    pub cache_writes: IntCounterVec,
    /// Entries read from Redis that failed to decode (treated as misses).
    pub cache_decode_errors: IntCounter,
    /// reason (unknown_key_id|unopenable): sealed entries that did not open here (a changed
    /// byte, an entry moved under another tenant's or key's name, a key id this origin does
    /// not hold). Each is also a decode error, served as a miss.
    pub seal_open_failures: IntCounterVec,
    /// reason (`EntryError::reason`, or `other`): KV entries the edge refused and served as
    /// misses, as its usage records report them (the edge has no counters of its own).
    pub edge_kv_rejects: IntCounterVec,
    /// outcome (hit|miss|error|not_semantic), reason: what a semantic-cache lookup found
    /// (`service/semantic.rs`); errors and refusals are served as exact misses.
    pub semantic_lookups: IntCounterVec,
    /// embedder (local|provider): time to embed one question.
    pub semantic_embed_duration: HistogramVec,
    /// provider
    pub provider_duration: HistogramVec,
    /// provider, outcome (ok|status_4xx|status_429|status_5xx|timeout|connect|body)
    pub provider_requests: IntCounterVec,
    /// provider; 0 closed, 1 half-open, 2 open
    pub breaker_state: IntGaugeVec,
    /// Retries refused because the retry budget was spent.
    pub retry_budget_exhausted: IntCounter,
    /// tenant, reason (rate|tokens)
    pub budget_rejections: IntCounterVec,
    /// tenant
    pub tokens_used: IntCounterVec,
    /// tenant, tier (edge|origin|upstream: the tier whose cache answer or coalesced call
    /// saved them)
    pub tokens_saved: IntCounterVec,
    /// tenant, tier: estimated dollars saved, from `[pricing]` (`meter.rs`)
    pub cost_saved: CounterVec,
    /// tenant, tier (edge|origin|upstream), outcome (`usage::Outcome`): every answer, by the
    /// tier that produced it; the edge's own arrive through the usage ingest
    pub answers: IntCounterVec,
    /// tier: request-to-response-head time at the edge, by the tier that answered
    pub edge_duration: HistogramVec,
    /// outcome (accepted|rejected): usage ingest lines
    pub usage_lines: IntCounterVec,
    /// outcome (accepted|partial|refused|unauthorized|too_large): usage ingest batches
    pub usage_batches: IntCounterVec,
    /// How late an edge usage record arrived (ingest time − the edge's answer time).
    pub usage_delay: Histogram,
    /// Requests that waited for another request's provider call instead of making their own.
    pub coalesced_waiters: IntCounter,
    /// Misses answered by another replica's flight (`service/flight_lock.rs`).
    pub coalesced_remote: IntCounter,
    /// outcome (offered|dropped) — the dual-write seam.
    pub replication: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new_custom(Some(PREFIX.into()), None)?;
        let families = Arc::new(Mutex::new(BTreeSet::new()));
        let register = |c: Box<dyn Collector>| register(&registry, &families, c);
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                    labels,
                )?;
                register(Box::new(h.clone()))?;
                Ok(h)
            };
        let single = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            register(Box::new(c.clone()))?;
            Ok(c)
        };
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "provider_breaker_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            ),
            &["provider"],
        )?;
        register(Box::new(breaker_state.clone()))?;
        Ok(Metrics {
            requests: counter(
                "requests_total",
                "HTTP requests by route and status",
                &["route", "status"],
            )?,
            request_duration: histogram(
                "request_duration_seconds",
                "Time to the response head, by route",
                &["route"],
            )?,
            cache_results: counter(
                "cache_results_total",
                "Cache results by the layer that produced the body and the outcome",
                &["layer", "outcome"],
            )?,
            redis_duration: histogram("redis_duration_seconds", "Redis command latency", &["op"])?,
            redis_errors: counter(
                "redis_errors_total",
                "Redis failures (each one served as a miss / failed open)",
                &["op", "kind"],
            )?,
            cache_writes: counter(
                "cache_writes_total",
                "Cache writes by outcome",
                &["outcome"],
            )?,
            cache_decode_errors: single(
                "cache_decode_errors_total",
                "Entries that did not decode or did not match the request (served as misses)",
            )?,
            seal_open_failures: counter(
                "seal_open_failures_total",
                "Sealed entries that did not open (served as misses), by reason",
                &["reason"],
            )?,
            edge_kv_rejects: counter(
                "edge_kv_rejects_total",
                "KV entries the edge refused (served as misses), by reason, from its usage records",
                &["reason"],
            )?,
            semantic_lookups: counter(
                "semantic_lookups_total",
                "Semantic-cache lookups by outcome and reason (errors are served as exact misses)",
                &["outcome", "reason"],
            )?,
            semantic_embed_duration: histogram(
                "semantic_embed_duration_seconds",
                "Time to embed one question for the semantic cache, by embedder",
                &["embedder"],
            )?,
            provider_duration: histogram(
                "provider_duration_seconds",
                "Provider attempt latency (to the full answer, or the stream head)",
                &["provider"],
            )?,
            provider_requests: counter(
                "provider_requests_total",
                "Provider attempts by outcome",
                &["provider", "outcome"],
            )?,
            breaker_state,
            retry_budget_exhausted: single(
                "retry_budget_exhausted_total",
                "Failovers refused because the retry budget was spent",
            )?,
            budget_rejections: counter(
                "budget_rejections_total",
                "Requests refused with 429 by tenant and reason",
                &["tenant", "reason"],
            )?,
            tokens_used: counter(
                "tokens_used_total",
                "Provider tokens used per tenant",
                &["tenant"],
            )?,
            tokens_saved: counter(
                "tokens_saved_total",
                "Provider tokens saved by cache hits and coalescing, by tenant and the tier that saved them",
                &["tenant", "tier"],
            )?,
            cost_saved: {
                let c = CounterVec::new(
                    Opts::new(
                        "cost_saved_dollars_total",
                        "Estimated provider cost saved (US dollars, from [pricing]) by tenant and tier",
                    ),
                    &["tenant", "tier"],
                )?;
                register(Box::new(c.clone()))?;
                c
            },
            answers: counter(
                "answers_total",
                "Answers by tenant, the tier that produced them (edge, origin, upstream) and outcome",
                &["tenant", "tier", "outcome"],
            )?,
            edge_duration: histogram(
                "edge_duration_seconds",
                "Time at the edge to the response head, by the tier that answered (from usage records)",
                &["tier"],
            )?,
            usage_lines: counter(
                "usage_lines_total",
                "Edge usage record lines received by the ingest route, by outcome",
                &["outcome"],
            )?,
            usage_batches: counter(
                "usage_batches_total",
                "Edge usage batches received by the ingest route, by outcome",
                &["outcome"],
            )?,
            usage_delay: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "usage_delay_seconds",
                        "How late an edge usage record reached the origin (batching and delivery)",
                    )
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
                )?;
                register(Box::new(h.clone()))?;
                h
            },
            coalesced_waiters: single(
                "coalesced_waiters_total",
                "Requests answered by another request's provider call",
            )?,
            coalesced_remote: single(
                "coalesced_remote_total",
                "Misses answered by another replica's provider call (single flight across replicas)",
            )?,
            replication: counter(
                "replication_total",
                "Entries offered to the edge replicator by outcome",
                &["outcome"],
            )?,
            registry,
            families,
        })
    }

    /// The registry, to read every family back (the dashboard's replication figures).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a collector of another part (the replicator) in this registry, and returns it.
    pub fn register<C: Collector + Clone + 'static>(&self, c: C) -> Result<C, prometheus::Error> {
        register(&self.registry, &self.families, Box::new(c.clone()))?;
        Ok(c)
    }

    /// The exposed name (`gateway_…`) of every family registered so far, sorted, including
    /// labelled families that have no sample yet. Histograms are named without their
    /// `_bucket`/`_sum`/`_count` suffixes.
    pub fn family_names(&self) -> Vec<String> {
        self.families
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families; an error would only
        // mean a partial page, which is better than none.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Registers `c` and remembers the exposed names of its families.
fn register(
    registry: &Registry,
    families: &Mutex<BTreeSet<String>>,
    c: Box<dyn Collector>,
) -> Result<(), prometheus::Error> {
    let names: Vec<String> = c
        .desc()
        .iter()
        .map(|d| format!("{PREFIX}_{}", d.fq_name))
        .collect();
    registry.register(c)?;
    families
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(names);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_the_gateway_prefix() {
        let m = Metrics::new().unwrap();
        m.requests
            .with_label_values(&["chat.completions", "200"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("gateway_requests_total{route=\"chat.completions\",status=\"200\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn family_names_include_labelled_families_without_samples() {
        let m = Metrics::new().unwrap();
        let names = m.family_names();
        // No request has been counted: `render` leaves these out, `family_names` does not.
        for name in ["gateway_requests_total", "gateway_request_duration_seconds"] {
            assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
            assert!(!String::from_utf8(m.render()).unwrap().contains(name));
        }
        let extra = m
            .register(IntCounter::new("probe_total", "a probe").unwrap())
            .unwrap();
        extra.inc();
        assert!(m.family_names().iter().any(|n| n == "gateway_probe_total"));
    }
}
