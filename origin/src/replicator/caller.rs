//! One Fastly API request as the replicator makes it: within the shared budget, obeying the
//! API's rate-limit headers, retried with jittered backoff. Both lanes call through it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::budget::{Lane, MAX_WAIT, SharedBudget, backoff};
use super::metrics::ReplicationMetrics;
use crate::budget::unix_now;
use crate::kv_api::{Answered, KvApi, KvApiError, RequestKind};
use crate::settings::{ReplicationSettings, ms};
use crate::store::ThrottledLog;

#[derive(Debug, Clone, Copy)]
pub(super) struct RetryConfig {
    pub(super) max_retries: u32,
    pub(super) backoff_base: Duration,
    pub(super) backoff_max: Duration,
}

impl From<&ReplicationSettings> for RetryConfig {
    fn from(s: &ReplicationSettings) -> RetryConfig {
        RetryConfig {
            max_retries: s.max_retries,
            backoff_base: ms(s.backoff_base_ms),
            backoff_max: ms(s.backoff_max_ms),
        }
    }
}

/// A lane's way to the API. Cheap to clone: the client, budget and flags are shared.
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) api: KvApi,
    pub(super) budget: Arc<SharedBudget>,
    pub(super) lane: Lane,
    pub(super) retry: RetryConfig,
    pub(super) metrics: ReplicationMetrics,
    pub(super) log: Arc<ThrottledLog>,
}

impl Caller {
    /// One API request with the budget, the rate-limit headers and retries: 5xx, timeouts and
    /// broken connections are retried up to `max_retries` with backoff (at least
    /// `Retry-After`); a 429 waits for as long as the API says without using up a retry (the
    /// entries are not at fault, and waiting is what lets the queue absorb the outage).
    pub(super) async fn call<T, F, Fut>(
        &self,
        kind: RequestKind,
        mut op: F,
    ) -> Result<T, KvApiError>
    where
        F: FnMut(KvApi) -> Fut,
        Fut: Future<Output = Result<(T, Answered), KvApiError>>,
    {
        let mut failures = 0u32;
        let mut retries = 0u32;
        loop {
            self.take_budget().await;
            let result = op(self.api.clone()).await;
            let metrics = &self.metrics;
            let error = match result {
                Ok((value, answered)) => {
                    metrics
                        .api_requests
                        .with_label_values(&[kind.as_str(), &answered.status.to_string()])
                        .inc();
                    self.budget.observe(answered.rate_limit, unix_now()).await;
                    return Ok(value);
                }
                Err(error) => error,
            };
            metrics
                .api_requests
                .with_label_values(&[kind.as_str(), &error.label()])
                .inc();
            self.budget.observe(error.rate_limit(), unix_now()).await;
            if !error.is_retryable() {
                return Err(error);
            }
            failures += 1;
            let backoff = backoff(
                failures,
                self.retry.backoff_base,
                self.retry.backoff_max,
                rand::random::<f64>(),
            );
            let wait = if error.status() == Some(429) {
                let until_reset = error
                    .rate_limit()
                    .reset_unix
                    .map(|reset| Duration::from_secs(reset.saturating_sub(unix_now())));
                metrics.retried.with_label_values(&["rate_limited"]).inc();
                error.retry_after().or(until_reset).unwrap_or(backoff)
            } else {
                if retries >= self.retry.max_retries {
                    return Err(error);
                }
                retries += 1;
                metrics.retried.with_label_values(&[&error.label()]).inc();
                backoff.max(error.retry_after().unwrap_or_default())
            }
            .min(MAX_WAIT);
            if let Some(suppressed) = self.log.admit() {
                tracing::warn!(kind = kind.as_str(), error = %error, wait_ms = wait.as_millis() as u64, suppressed, "replication: Fastly API request failed; retrying");
            }
            self.budget.hold(wait).await;
        }
    }

    /// Waits until the shared budget gives this lane one request.
    async fn take_budget(&self) {
        let waited = self.budget.take(self.lane).await;
        self.metrics.budget_wait.inc_by(waited.as_secs_f64());
    }
}
