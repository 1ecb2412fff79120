//! The edge usage ingest: a batch of usage records (one JSON line each, as Fastly's HTTPS log
//! endpoint posts them) judged line by line. A bad line is reported and dropped, never the
//! batch: the good lines are counted whatever their neighbours hold. Accepted records feed the
//! meter (answers the edge produced itself, what they saved, the latency seen at the edge) and
//! the tenants' rate windows, in one Redis round trip per batch. A record's edge span is handed
//! to the span exporter (`edge_span`).

use std::collections::HashMap;

use gateway_common::entry::{EntryError, Usage};
use gateway_common::error::ApiError;
use gateway_common::key::bearer_token;
use gateway_common::usage::{Tier, UsageRecord};
use serde::Serialize;

use super::access::constant_time_eq;
use super::{Refusal, Service};
use crate::budget::unix_now;
use crate::meter::Saving;

/// Rejected lines listed in an answer at most; the rest are only counted.
const MAX_LISTED_REJECTIONS: usize = 100;

/// What became of a batch: the answer's body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngestReport {
    pub accepted: u64,
    /// Lines refused, 1-based, with the reason (the first [`MAX_LISTED_REJECTIONS`]).
    pub rejected: Vec<RejectedLine>,
    /// All refused lines, listed or not.
    pub rejected_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedLine {
    pub line: usize,
    pub error: String,
}

impl Service {
    /// The ingest token, checked in constant time; without one configured nothing is accepted.
    pub fn authorize_ingest(&self, authorization: Option<&str>) -> Result<(), Refusal> {
        let given = authorization.and_then(bearer_token);
        match (&self.usage_ingest_token, given) {
            (Some(token), Some(given))
                if !token.expose().is_empty() && constant_time_eq(given, token.expose()) =>
            {
                Ok(())
            }
            _ => {
                self.metrics
                    .usage_batches
                    .with_label_values(&["unauthorized"])
                    .inc();
                Err(ApiError::unauthorized().into())
            }
        }
    }

    /// Folds one authorized batch in. `Err` only when no line was accepted (400, with the
    /// report as its message's detail), so a sender that retries failures never counts a good
    /// line twice.
    pub async fn ingest_usage(&self, batch: &[u8]) -> Result<IngestReport, (u16, IngestReport)> {
        let now = unix_now();
        let mut report = IngestReport::default();
        let mut edge_answers: HashMap<String, u64> = HashMap::new();
        for (i, line) in batch.split(|b| *b == b'\n').enumerate() {
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let record = UsageRecord::parse_line(line)
                .map_err(|e| e.to_string())
                .and_then(|r| match self.tenants.get(&r.tenant) {
                    Some(_) => Ok(r),
                    None => Err(format!("tenant {} is not known here", r.tenant)),
                });
            match record {
                Ok(record) => {
                    self.fold(&record, now);
                    crate::edge_span::export(&record);
                    if record.layer == Tier::Edge {
                        *edge_answers.entry(record.tenant).or_default() += 1;
                    }
                    report.accepted += 1;
                }
                Err(error) => {
                    report.rejected_total += 1;
                    if report.rejected.len() < MAX_LISTED_REJECTIONS {
                        report.rejected.push(RejectedLine { line: i + 1, error });
                    }
                }
            }
        }
        let lines = &self.metrics.usage_lines;
        lines
            .with_label_values(&["accepted"])
            .inc_by(report.accepted);
        lines
            .with_label_values(&["rejected"])
            .inc_by(report.rejected_total);

        let ops: Vec<_> = edge_answers
            .iter()
            .filter_map(|(id, n)| {
                let tenant = self.tenants.get(id)?;
                self.budget.edge_requests_op(tenant, *n, now)
            })
            .collect();
        // Fails open like every budget call: the edge enforces the rate itself.
        if !ops.is_empty() {
            let _ = self.store.counters(&ops).await;
        }

        let outcome = match (report.accepted, report.rejected_total) {
            (0, 0) | (_, 0) => "accepted",
            (0, _) => "refused",
            _ => "partial",
        };
        self.metrics
            .usage_batches
            .with_label_values(&[outcome])
            .inc();
        if report.accepted == 0 && report.rejected_total > 0 {
            return Err((400, report));
        }
        Ok(report)
    }

    /// One accepted record: the edge's latency by tier and the KV entry it refused, for every
    /// record; the answer and its savings only for what the edge answered itself (the origin
    /// counted the rest when it answered).
    fn fold(&self, record: &UsageRecord, now: u64) {
        if !record.kv_reject.is_empty() {
            let reason = EntryError::REASONS
                .into_iter()
                .find(|r| *r == record.kv_reject)
                .unwrap_or("other");
            self.metrics
                .edge_kv_rejects
                .with_label_values(&[reason])
                .inc();
        }
        self.metrics
            .edge_duration
            .with_label_values(&[record.layer.as_str()])
            .observe(record.total_ms / 1000.0);
        self.metrics
            .usage_delay
            .observe(now.saturating_sub(record.ts) as f64);
        if record.layer != Tier::Edge {
            return;
        }
        // The edge's clock: a record from the future counts now, never in a minute to come.
        let at = record.ts.min(now);
        self.meter.answer(
            &record.tenant,
            Tier::Edge,
            record.outcome,
            at,
            record.total_ms,
        );
        let usage = Usage {
            prompt_tokens: record.saved_prompt_tokens,
            completion_tokens: record.saved_completion_tokens,
            total_tokens: record.saved_tokens(),
        };
        let saving = Saving {
            model: &record.model,
            usage: &usage,
            times: 1,
        };
        self.meter.saved(&record.tenant, Tier::Edge, at, saving);
    }

    /// `GET /.well-known/fastly/logging/challenge`: the sha256 hex of each Fastly service id
    /// allowed to log here, one per line, as Fastly checks before delivering to an HTTPS
    /// endpoint. `None` when none is configured (404).
    pub fn logging_challenge(&self) -> Option<String> {
        (!self.logging_challenge.is_empty()).then(|| self.logging_challenge.join("\n") + "\n")
    }
}
