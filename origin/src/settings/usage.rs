//! Settings of the edge usage ingest (`[usage]`) and the price list that turns saved tokens
//! into an estimated cost saved (`[pricing]`). Checked with the rest at start-up.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Secret, SettingsError, invalid};

/// `POST /ingest/edge-usage`: where Fastly's HTTPS log endpoint delivers the edge's usage
/// records in batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSettings {
    /// The ingest route requires `Authorization: Bearer <ingest_token>` (the log endpoint's
    /// `header_name`/`header_value`). Without it the route refuses everything; edge hits then
    /// go unmetered (logged at start-up). Its own token, never the admin token: it sits in the
    /// Fastly service configuration.
    #[serde(default)]
    pub ingest_token: Option<Secret>,
    /// Largest batch accepted (413 past it; the sender splits). Fastly's HTTPS endpoint sends at
    /// most `request_max_bytes`, which the README sets below this.
    pub max_batch_bytes: usize,
    /// Fastly service ids allowed to log here: `GET /.well-known/fastly/logging/challenge`
    /// answers their sha256, as Fastly checks before it delivers to an HTTPS endpoint. Empty:
    /// the challenge answers 404.
    #[serde(default)]
    pub fastly_service_ids: Vec<String>,
}

/// Price of one model's tokens, US dollars per million, for the estimate of what the cache
/// saved (`gateway_cost_saved_dollars_total`, the dashboard). A model not listed saves tokens
/// but no estimated cost.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub prompt_per_million: f64,
    pub completion_per_million: f64,
}

/// Model name (as the answer names it, e.g. `gpt-4o-mini`) → price.
pub type Pricing = BTreeMap<String, ModelPrice>;

impl UsageSettings {
    pub(super) fn validate(&self, dev_mode: bool) -> Result<(), SettingsError> {
        if let Some(token) = &self.ingest_token {
            super::validate::check_token("usage.ingest_token", token, dev_mode)?;
        }
        if self.max_batch_bytes < 64 * 1024 {
            return Err(invalid("usage.max_batch_bytes", "must be at least 65536"));
        }
        for id in &self.fastly_service_ids {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(invalid(
                    "usage.fastly_service_ids",
                    "each is a Fastly service id (letters and digits)",
                ));
            }
        }
        Ok(())
    }
}

pub(super) fn validate_pricing(pricing: &Pricing) -> Result<(), SettingsError> {
    for (model, price) in pricing {
        let ok = |p: f64| p.is_finite() && p >= 0.0;
        if !ok(price.prompt_per_million) || !ok(price.completion_per_million) {
            return Err(invalid(
                format!("pricing.{model}"),
                "prices are dollars per million tokens, finite and not negative",
            ));
        }
    }
    Ok(())
}
