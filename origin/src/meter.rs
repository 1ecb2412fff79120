//! Metering by tier: every answer counted per tenant and per tier that produced it (the edge,
//! the origin, a provider), with the tokens and the estimated cost a cache answer saved. The
//! origin counts its own answers as they happen; the edge's arrive as usage records through
//! the ingest route (`ingest.rs`), and only those the edge answered itself are counted here,
//! so no answer is counted twice. Feeds `/metrics`, the budget's saved-tokens ledger and the
//! dashboard's traffic series.

use std::sync::Arc;

use gateway_common::entry::Usage;
use gateway_common::usage::{Outcome, Tier};

use crate::budget::Budget;
use crate::metrics::Metrics;
use crate::settings::Pricing;
use crate::traffic::{Sample, Traffic};

/// Counts answers and savings; cheap to call on every request (no I/O: Redis sees the counts
/// in the flushes of the budget and the traffic series).
pub struct Meter {
    metrics: Metrics,
    pricing: Pricing,
    budget: Arc<Budget>,
    traffic: Arc<Traffic>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").finish_non_exhaustive()
    }
}

/// What a cache answer saved: the entry's model and recorded usage, `times` over (a coalesced
/// provider call saves once per waiter).
#[derive(Debug, Clone, Copy)]
pub struct Saving<'a> {
    pub model: &'a str,
    pub usage: &'a Usage,
    pub times: u64,
}

impl Meter {
    pub fn new(
        metrics: Metrics,
        pricing: Pricing,
        budget: Arc<Budget>,
        traffic: Arc<Traffic>,
    ) -> Meter {
        Meter {
            metrics,
            pricing,
            budget,
            traffic,
        }
    }

    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// One answer by `tier` for `tenant` at unix second `at`, `latency_ms` after its request
    /// arrived (at the tier that measured it).
    pub fn answer(&self, tenant: &str, tier: Tier, outcome: Outcome, at: u64, latency_ms: f64) {
        self.metrics
            .answers
            .with_label_values(&[tenant, tier.as_str(), outcome.as_str()])
            .inc();
        self.traffic.record(
            tenant,
            tier,
            at,
            Sample {
                hit: matches!(outcome, Outcome::Hit | Outcome::Stale),
                saved_tokens: 0,
                saved_micro_usd: 0,
                latency_ms: Some(latency_ms),
                answers: 1,
            },
        );
    }

    /// What a cache answer (or a coalesced wait) by `tier` saved `tenant`: tokens in the
    /// metrics and the tenant's monthly saved ledger, and the estimated cost.
    pub fn saved(&self, tenant: &str, tier: Tier, at: u64, saving: Saving<'_>) {
        let tokens = saving.usage.total_tokens.saturating_mul(saving.times);
        if tokens == 0 {
            return;
        }
        self.metrics
            .tokens_saved
            .with_label_values(&[tenant, tier.as_str()])
            .inc_by(tokens);
        self.budget.record_saved(tenant, tokens);
        let dollars = self.cost(saving.model, saving.usage) * saving.times as f64;
        if dollars > 0.0 {
            self.metrics
                .cost_saved
                .with_label_values(&[tenant, tier.as_str()])
                .inc_by(dollars);
        }
        self.traffic.record(
            tenant,
            tier,
            at,
            Sample {
                hit: false,
                saved_tokens: tokens,
                saved_micro_usd: (dollars * 1e6).round() as u64,
                latency_ms: None,
                answers: 0,
            },
        );
    }

    /// Estimated dollars `usage` costs on `model`: the price listed for the model, or for the
    /// longest listed name it starts with (`gpt-4o-mini` prices `gpt-4o-mini-2024-07-18`);
    /// 0 when none is listed.
    pub fn cost(&self, model: &str, usage: &Usage) -> f64 {
        let price = self.pricing.get(model).or_else(|| {
            self.pricing
                .iter()
                .filter(|(name, _)| model.starts_with(name.as_str()))
                .max_by_key(|(name, _)| name.len())
                .map(|(_, price)| price)
        });
        price.map_or(0.0, |p| {
            (usage.prompt_tokens as f64 * p.prompt_per_million
                + usage.completion_tokens as f64 * p.completion_per_million)
                / 1e6
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::ModelPrice;
    use crate::store::MemoryStore;

    fn meter() -> (Meter, Metrics) {
        let metrics = Metrics::new().unwrap();
        let store = Arc::new(MemoryStore::new());
        let mut pricing = Pricing::new();
        pricing.insert(
            "gpt-4o".into(),
            ModelPrice {
                prompt_per_million: 2.5,
                completion_per_million: 10.0,
            },
        );
        pricing.insert(
            "gpt-4o-mini".into(),
            ModelPrice {
                prompt_per_million: 0.15,
                completion_per_million: 0.6,
            },
        );
        let budget = Arc::new(Budget::new(store.clone(), metrics.clone()));
        let traffic = Arc::new(Traffic::new(store));
        (
            Meter::new(metrics.clone(), pricing, budget, traffic),
            metrics,
        )
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }

    #[test]
    fn the_longest_listed_model_name_prices_a_dated_model() {
        let (meter, _) = meter();
        let u = usage(1_000_000, 1_000_000);
        assert!((meter.cost("gpt-4o-mini-2024-07-18", &u) - 0.75).abs() < 1e-9);
        assert!((meter.cost("gpt-4o-2024-08-06", &u) - 12.5).abs() < 1e-9);
        assert_eq!(meter.cost("claude-3", &u), 0.0);
    }

    #[test]
    fn savings_count_tokens_and_cost_per_tier_times_the_waiters() {
        let (meter, metrics) = meter();
        let u = usage(100, 50);
        meter.saved(
            "acme",
            Tier::Upstream,
            0,
            Saving {
                model: "gpt-4o-mini",
                usage: &u,
                times: 3,
            },
        );
        assert_eq!(
            metrics
                .tokens_saved
                .with_label_values(&["acme", "upstream"])
                .get(),
            450
        );
        let cost = metrics
            .cost_saved
            .with_label_values(&["acme", "upstream"])
            .get();
        assert!((cost - 3.0 * (100.0 * 0.15 + 50.0 * 0.6) / 1e6).abs() < 1e-12);
        meter.answer("acme", Tier::Edge, Outcome::Hit, 0, 1.0);
        assert_eq!(
            metrics
                .answers
                .with_label_values(&["acme", "edge", "hit"])
                .get(),
            1
        );
    }
}
