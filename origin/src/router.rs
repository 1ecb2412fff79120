//! The provider router: picks OpenAI-compatible providers for a model (priority, then weight),
//! fails over on retryable failures before anything reached the client, skips providers whose
//! circuit breaker is open, and bounds failovers with a retry budget. Knows nothing of caching.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_common::route::Route;
use rand::Rng;
use serde_json::value::RawValue;

use crate::breaker::Breaker;
use crate::metrics::Metrics;
use crate::provider_api::{self, Passthrough, ProviderApi};
use crate::settings::{ProviderSettings, RouterSettings, Secret, ms};

/// Why one attempt failed. All of these are retryable on another provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("answered {status}")]
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    #[error("answer broken: {0}")]
    Body(String),
}

impl AttemptError {
    fn outcome(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect",
            AttemptError::Timeout => "timeout",
            AttemptError::Status { status: 429, .. } => "status_429",
            AttemptError::Status { .. } => "status_5xx",
            AttemptError::Body(_) => "body",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("no provider is configured for model {0}")]
    NoProvider(String),
    #[error("every provider for this model is unavailable (circuit open)")]
    AllOpen,
    #[error("the provider answer exceeds {0} bytes")]
    TooLarge(usize),
    #[error("provider failed after {attempts} attempt(s): {last}")]
    Exhausted { attempts: u32, last: AttemptError },
}

/// What a provider answered.
#[derive(Debug)]
pub struct Upstream {
    pub provider: Arc<str>,
    pub status: u16,
    pub content_type: String,
    /// The whole answer, or a live event stream (only for a `stream` request answered 200
    /// with `text/event-stream`).
    pub body: UpstreamBody,
}

#[derive(Debug)]
pub enum UpstreamBody {
    Full(Bytes),
    Stream(reqwest::Response),
}

struct Provider {
    name: Arc<str>,
    base_url: String,
    api_key: Option<Secret>,
    models: BTreeMap<String, String>,
    apis: Vec<ProviderApi>,
    priority: u32,
    weight: u32,
    timeout: Duration,
    client: reqwest::Client,
    breaker: Breaker,
}

impl Provider {
    /// The provider's model for a client model, if it serves it.
    fn model_for<'a>(&'a self, model: &'a str) -> Option<&'a str> {
        self.models
            .get(model)
            .map(String::as_str)
            .or_else(|| self.models.get("*").map(|_| model))
    }

    fn url(&self, route: Route) -> String {
        let path = route.path();
        let tail = path.strip_prefix("/v1").unwrap_or(path);
        format!("{}{}", self.base_url.trim_end_matches('/'), tail)
    }
}

/// A token bucket of retries: each request deposits `ratio`, a floor refills per second, each
/// failover withdraws one. Bounds the extra load an outage can cause to `ratio` plus the floor.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<(f64, Instant)>,
    ratio: f64,
    floor_per_sec: f64,
    cap: f64,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_sec: f64) -> RetryBudget {
        RetryBudget {
            state: Mutex::new((floor_per_sec, Instant::now())),
            ratio,
            floor_per_sec,
            cap: 100.0 + 10.0 * floor_per_sec,
        }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let now = Instant::now();
        let elapsed = now.duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.floor_per_sec).min(self.cap);
        state.1 = now;
    }

    pub fn deposit(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state);
        state.0 = (state.0 + self.ratio).min(self.cap);
    }

    pub fn try_withdraw(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Router {
    providers: Vec<Arc<Provider>>,
    retry_budget: RetryBudget,
    metrics: Metrics,
    max_body_bytes: usize,
    /// Longest silence allowed between two chunks of a stream (used by the stream forwarder).
    pub stream_idle_timeout: Duration,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.providers.iter().map(|p| &*p.name).collect();
        f.debug_struct("Router")
            .field("providers", &names)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("provider {name}: {reason}")]
pub struct RouterSetupError {
    name: String,
    reason: String,
}

impl Router {
    pub fn new(
        providers: &[ProviderSettings],
        settings: &RouterSettings,
        max_body_bytes: usize,
        metrics: Metrics,
    ) -> Result<Router, RouterSetupError> {
        let providers = providers
            .iter()
            .map(|p| {
                let client = reqwest::Client::builder()
                    .connect_timeout(ms(p.connect_timeout_ms))
                    .pool_idle_timeout(Duration::from_secs(60))
                    .tcp_nodelay(true)
                    .build()
                    .map_err(|e| RouterSetupError {
                        name: p.name.clone(),
                        reason: e.to_string(),
                    })?;
                metrics
                    .breaker_state
                    .with_label_values(&[p.name.as_str()])
                    .set(0);
                Ok(Arc::new(Provider {
                    name: Arc::from(p.name.as_str()),
                    base_url: p.base_url.clone(),
                    api_key: p.api_key.clone(),
                    models: p.models.clone(),
                    apis: p.apis.clone(),
                    priority: p.priority,
                    weight: p.weight,
                    timeout: ms(p.timeout_ms),
                    client,
                    breaker: Breaker::new(
                        settings.breaker_failure_threshold,
                        ms(settings.breaker_cooldown_ms),
                    ),
                }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Router {
            providers,
            retry_budget: RetryBudget::new(
                settings.retry_budget_ratio,
                settings.retry_budget_min_per_sec,
            ),
            metrics,
            max_body_bytes,
            stream_idle_timeout: ms(settings.stream_idle_timeout_ms),
        })
    }

    /// Every client model some provider maps explicitly (for `/v1/models` with a `*` tenant).
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .providers
            .iter()
            .flat_map(|p| p.models.keys().filter(|m| *m != "*").cloned())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Sends the client's `body` (already validated) to the best provider for `model`,
    /// failing over on retryable failures. A non-retryable answer (e.g. a 400) is returned
    /// as is. `stream` asks for a live event stream when the provider answers with one.
    pub async fn send(
        &self,
        route: Route,
        model: &str,
        body: &Bytes,
        stream: bool,
        passthrough: &Passthrough,
    ) -> Result<Upstream, RouterError> {
        let candidates = self.candidates(ProviderApi::for_route(route), model);
        if candidates.is_empty() {
            return Err(RouterError::NoProvider(model.to_string()));
        }
        self.retry_budget.deposit();
        let mut attempts = 0u32;
        let mut last = None;
        for provider in candidates {
            if attempts > 0 && !self.retry_budget.try_withdraw() {
                self.metrics.retry_budget_exhausted.inc();
                break;
            }
            if !provider.breaker.allow() {
                if attempts > 0 {
                    // The withdrawn retry was not used; deposits are fractional, so give it back.
                    self.retry_budget.give_back();
                }
                continue;
            }
            self.publish_breaker(&provider);
            attempts += 1;
            let provider_model = provider.model_for(model).unwrap_or(model);
            let start = Instant::now();
            let result = self
                .attempt(
                    &provider,
                    attempts,
                    provider_model,
                    model,
                    Call {
                        route,
                        body,
                        stream,
                        passthrough,
                    },
                )
                .await;
            self.metrics
                .provider_duration
                .with_label_values(&[&*provider.name])
                .observe(start.elapsed().as_secs_f64());
            match result {
                Ok(upstream) => {
                    let outcome = if upstream.status < 400 {
                        "ok"
                    } else {
                        "status_4xx"
                    };
                    self.metrics
                        .provider_requests
                        .with_label_values(&[&*provider.name, outcome])
                        .inc();
                    provider.breaker.record(true);
                    self.publish_breaker(&provider);
                    return Ok(upstream);
                }
                Err(Failure::TooLarge) => {
                    self.metrics
                        .provider_requests
                        .with_label_values(&[&*provider.name, "too_large"])
                        .inc();
                    provider.breaker.record(true);
                    self.publish_breaker(&provider);
                    return Err(RouterError::TooLarge(self.max_body_bytes));
                }
                Err(Failure::Retryable(error)) => {
                    self.metrics
                        .provider_requests
                        .with_label_values(&[&*provider.name, error.outcome()])
                        .inc();
                    provider.breaker.record(false);
                    self.publish_breaker(&provider);
                    tracing::debug!(provider = %provider.name, %error, "provider attempt failed");
                    last = Some(error);
                }
            }
        }
        match last {
            Some(last) => Err(RouterError::Exhausted { attempts, last }),
            None => Err(RouterError::AllOpen),
        }
    }

    fn publish_breaker(&self, provider: &Provider) {
        self.metrics
            .breaker_state
            .with_label_values(&[&*provider.name])
            .set(provider.breaker.state().gauge());
    }

    /// Providers serving `model`: by priority, and within one priority in a weighted random
    /// order (so weights split the traffic and failover goes to a sibling first).
    fn candidates(&self, api: ProviderApi, model: &str) -> Vec<Arc<Provider>> {
        let mut serving: Vec<Arc<Provider>> = self
            .providers
            .iter()
            .filter(|p| p.apis.contains(&api) && p.model_for(model).is_some())
            .cloned()
            .collect();
        serving.sort_by_key(|p| p.priority);
        let mut ordered = Vec::with_capacity(serving.len());
        let mut rng = rand::rng();
        while !serving.is_empty() {
            let priority = serving[0].priority;
            let same = serving
                .iter()
                .take_while(|p| p.priority == priority)
                .count();
            let mut group: Vec<Arc<Provider>> = serving.drain(..same).collect();
            while !group.is_empty() {
                let total: u64 = group.iter().map(|p| u64::from(p.weight)).sum();
                let mut pick = rng.random_range(0..total.max(1));
                let index = group
                    .iter()
                    .position(|p| {
                        let w = u64::from(p.weight);
                        if pick < w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .unwrap_or(0);
                ordered.push(group.remove(index));
            }
        }
        ordered
    }

    /// One provider attempt, a span of its own (`attempt` counts the failovers before it).
    #[tracing::instrument(
        name = "provider.attempt",
        skip_all,
        fields(provider = %provider.name, route = call.route.as_str(), attempt)
    )]
    async fn attempt(
        &self,
        provider: &Provider,
        attempt: u32,
        provider_model: &str,
        client_model: &str,
        call: Call<'_>,
    ) -> Result<Upstream, Failure> {
        tracing::Span::current().record("attempt", attempt);
        let Call {
            route,
            body,
            stream,
            passthrough,
        } = call;
        let payload = if provider_model == client_model {
            body.clone()
        } else {
            rewrite_model(body, provider_model)
                .map_err(|e| Failure::Retryable(AttemptError::Body(e)))?
        };
        let request = provider
            .client
            .post(provider.url(route))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(payload);
        // Only the provider's own key ever leaves: the client's key is never forwarded.
        let request = provider_api::decorate(
            request,
            ProviderApi::for_route(route),
            provider.api_key.as_ref().map(|k| k.expose()),
            passthrough,
            // The provider's parent is this attempt: its exported span when spans are
            // exported, otherwise an id of its own.
            crate::telemetry::span_id(&tracing::Span::current()).unwrap_or_else(rand::random),
        );
        let exchange = async {
            let response = request
                .send()
                .await
                .map_err(|e| Failure::Retryable(transport(&e)))?;
            let status = response.status().as_u16();
            if status == 429 || status >= 500 {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                return Err(Failure::Retryable(AttemptError::Status {
                    status,
                    retry_after,
                }));
            }
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_string();
            let upstream = |body| Upstream {
                provider: Arc::clone(&provider.name),
                status,
                content_type: content_type.clone(),
                body,
            };
            if stream && status == 200 && content_type.starts_with("text/event-stream") {
                return Ok(upstream(UpstreamBody::Stream(response)));
            }
            let body = read_limited(response, self.max_body_bytes).await?;
            Ok(upstream(UpstreamBody::Full(body)))
        };
        match tokio::time::timeout(provider.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Retryable(AttemptError::Timeout)),
        }
    }
}

impl RetryBudget {
    fn give_back(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = (state.0 + 1.0).min(self.cap);
    }
}

/// What one attempt sends, the same for every provider tried.
#[derive(Clone, Copy)]
struct Call<'a> {
    route: Route,
    body: &'a Bytes,
    stream: bool,
    passthrough: &'a Passthrough,
}

enum Failure {
    Retryable(AttemptError),
    TooLarge,
}

fn transport(error: &reqwest::Error) -> AttemptError {
    if error.is_timeout() {
        AttemptError::Timeout
    } else {
        // Connection refused, reset, or closed before a complete response head.
        AttemptError::Connect(without_url(error))
    }
}

/// reqwest errors print the URL; provider URLs are configuration, but keep logs lean.
fn without_url(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    if let Some(url) = error.url() {
        message = message.replace(url.as_str(), "<provider>");
    }
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, Failure> {
    let mut buffer = bytes::BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buffer.len() + chunk.len() > limit {
                    return Err(Failure::TooLarge);
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buffer.freeze()),
            Err(e) => return Err(Failure::Retryable(AttemptError::Body(without_url(&e)))),
        }
    }
}

/// The same JSON object with `model` replaced; every other member is kept byte for byte (raw),
/// so numbers are never re-encoded.
fn rewrite_model(body: &[u8], model: &str) -> Result<Bytes, String> {
    let mut object: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let model = serde_json::to_string(model).map_err(|e| e.to_string())?;
    let model = RawValue::from_string(model).map_err(|e| e.to_string())?;
    object.insert("model".to_string(), model);
    serde_json::to_vec(&object)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
