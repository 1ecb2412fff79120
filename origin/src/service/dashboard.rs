//! What the dashboard shows, gathered: the last hour of traffic per tenant and tier from the
//! shared series in Redis (`traffic.rs`), and the replication queue and lag from this
//! replica's metrics. No HTML here (`dashboard.rs` renders), no HTTP types.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use gateway_common::error::ApiError;
use gateway_common::usage::Tier;
use serde::Serialize;

use super::access::constant_time_eq;
use super::{Refusal, Service};
use crate::budget::unix_now;
use crate::traffic::{ALL_TENANTS, Cell};

/// Tenants listed in the summary at most (each costs one series read).
const MAX_TENANTS: usize = 50;

#[derive(Debug, Clone, Serialize)]
pub struct Dashboard {
    /// Unix seconds the data was read.
    pub now: u64,
    /// The tenant the charts show; `*` for everyone.
    pub selected: String,
    /// One row per tenant: the hour's totals.
    pub tenants: Vec<TenantRow>,
    /// The selected tenant's minutes, oldest first.
    pub minutes: Vec<Minute>,
    /// Latency by tier over the hour for the selected tenant (edge, origin, upstream).
    pub latency: Vec<TierLatency>,
    pub replication: Replication,
    /// False when Redis did not answer (the page says so; the numbers are then empty).
    pub series_available: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantRow {
    pub tenant: String,
    /// Answers by tier: edge, origin, upstream.
    pub answers: [u64; 3],
    pub hits: [u64; 3],
    pub saved_tokens: u64,
    pub saved_dollars: f64,
}

impl TenantRow {
    pub fn total(&self) -> u64 {
        self.answers.iter().sum()
    }

    /// The edge's share of all answers, 0..=1 (0 without answers).
    pub fn edge_share(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            total => self.answers[0] as f64 / total as f64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Minute {
    /// Unix seconds at the minute's start.
    pub at: u64,
    pub answers: [u64; 3],
    pub saved_tokens: u64,
    pub saved_dollars: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TierLatency {
    pub tier: &'static str,
    pub answers: u64,
    pub mean_ms: Option<f64>,
    /// Upper bound of the bucket holding the median / the 99th percentile.
    pub p50_le_ms: Option<f64>,
    pub p99_le_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Replication {
    pub queue_depth: i64,
    pub purge_queue_depth: i64,
    pub lag_count: u64,
    pub lag_mean_secs: Option<f64>,
    pub written: u64,
    pub dropped: u64,
}

impl Service {
    /// The admin token as a bearer token, or as the password of HTTP Basic credentials (so a
    /// browser can open the dashboard: it asks for them on a 401 with `WWW-Authenticate`).
    pub fn authorize_dashboard(&self, authorization: Option<&str>) -> Result<(), Refusal> {
        if self.admin_token.is_none() || self.is_admin(authorization) {
            return Ok(());
        }
        let basic = authorization
            .and_then(|v| v.trim().strip_prefix("Basic "))
            .and_then(|b64| STANDARD.decode(b64.trim()).ok())
            .and_then(|raw| String::from_utf8(raw).ok());
        let password = basic
            .as_deref()
            .and_then(|s| s.split_once(':'))
            .map(|(_, p)| p);
        match (&self.admin_token, password) {
            (Some(token), Some(given))
                if !token.expose().is_empty() && constant_time_eq(given, token.expose()) =>
            {
                Ok(())
            }
            _ => Err(ApiError::unauthorized().into()),
        }
    }

    /// The dashboard's data for `selected` (a tenant id; anything unknown shows everyone).
    pub async fn dashboard(&self, selected: Option<&str>) -> Dashboard {
        let now = unix_now();
        let traffic = self.meter.traffic();
        let selected = selected
            .filter(|id| self.tenants.get(id).is_some())
            .unwrap_or(ALL_TENANTS)
            .to_owned();
        let series = traffic.read(&selected, now).await;
        let series_available = series.is_some();
        let series = series.unwrap_or_default();

        let mut tenants = Vec::new();
        for tenant in self.tenants.iter().take(MAX_TENANTS) {
            let Some(rows) = traffic.read(&tenant.id, now).await else {
                break;
            };
            tenants.push(summarize(&tenant.id, rows.iter().map(|(_, cells)| cells)));
        }

        let minutes = series
            .iter()
            .map(|(at, cells)| Minute {
                at: *at,
                answers: [cells[0].answers, cells[1].answers, cells[2].answers],
                saved_tokens: cells.iter().map(|c| c.saved_tokens).sum(),
                saved_dollars: cells.iter().map(|c| c.saved_micro_usd).sum::<u64>() as f64 / 1e6,
            })
            .collect();
        let latency = Tier::ALL
            .iter()
            .enumerate()
            .map(|(i, tier)| {
                let mut hour = Cell::default();
                for (_, cells) in &series {
                    hour.add(&cells[i]);
                }
                TierLatency {
                    tier: tier.as_str(),
                    answers: hour.answers,
                    mean_ms: (hour.answers > 0)
                        .then(|| hour.latency_us as f64 / 1000.0 / hour.answers as f64),
                    p50_le_ms: hour.latency_quantile_ms(0.5),
                    p99_le_ms: hour.latency_quantile_ms(0.99),
                }
            })
            .collect();
        Dashboard {
            now,
            selected,
            tenants,
            minutes,
            latency,
            replication: self.replication_now(),
            series_available,
        }
    }

    /// This replica's view of the replication log (the queue is shared, so any replica's is
    /// the cluster's), from its registry.
    fn replication_now(&self) -> Replication {
        let mut out = Replication::default();
        for family in self.metrics.registry().gather() {
            let metric = family.get_metric();
            let sum_counter = || {
                metric
                    .iter()
                    .map(|m| m.get_counter().get_value())
                    .sum::<f64>() as u64
            };
            match family.name() {
                "gateway_replication_queue_depth" => {
                    out.queue_depth = metric
                        .first()
                        .map_or(0, |m| m.get_gauge().get_value() as i64)
                }
                "gateway_replication_purge_queue_depth" => {
                    out.purge_queue_depth = metric
                        .first()
                        .map_or(0, |m| m.get_gauge().get_value() as i64)
                }
                "gateway_replication_lag_seconds" => {
                    let (count, sum) = metric.iter().fold((0u64, 0.0), |(c, s), m| {
                        let h = m.get_histogram();
                        (c + h.get_sample_count(), s + h.get_sample_sum())
                    });
                    out.lag_count = count;
                    out.lag_mean_secs = (count > 0).then(|| sum / count as f64);
                }
                "gateway_replication_written_total" => out.written = sum_counter(),
                "gateway_replication_dropped_total" => out.dropped = sum_counter(),
                _ => {}
            }
        }
        out
    }
}

fn summarize<'a>(tenant: &str, minutes: impl Iterator<Item = &'a [Cell; 3]>) -> TenantRow {
    let mut row = TenantRow {
        tenant: tenant.to_owned(),
        ..TenantRow::default()
    };
    let mut micro_usd = 0u64;
    for cells in minutes {
        for (i, cell) in cells.iter().enumerate() {
            row.answers[i] += cell.answers;
            row.hits[i] += cell.hits;
            row.saved_tokens += cell.saved_tokens;
            micro_usd += cell.saved_micro_usd;
        }
    }
    row.saved_dollars = micro_usd as f64 / 1e6;
    row
}
