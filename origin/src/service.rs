//! The request flow: authenticate, parse, apply tenant policy, read the cache, coalesce misses,
//! call the provider router, write the cache and hand the answer to the replication seam.
//! Never sees an HTTP type: routes translate requests in and replies out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_common::canonical::parse_request;
use gateway_common::entry::{ENTRY_VERSION, Entry, Envelope, Usage};
use gateway_common::error::ApiError;
use gateway_common::headers::{CacheOutcome, CacheStatusMember, Fwd, Layer};
use gateway_common::key::{CacheKey, bearer_token};
use gateway_common::policy::{self, Bypass, Freshness};
use gateway_common::route::Route;
use gateway_common::sse::replay_chat;
use gateway_common::tenant::Tenant;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::budget::{Budget, Rejection, unix_now};
use crate::coalesce::{Coalescer, Joined, Leader, WaitError, Waiter};
use crate::metrics::Metrics;
use crate::replicate::Replicator;
use crate::router::{AttemptError, Router, RouterError, Upstream, UpstreamBody};
use crate::settings::{Secret, Settings, ms};
use crate::store::{CounterOp, Store, ThrottledLog};
use crate::stream::{self, ClientStream};
use crate::tenants::Tenants;
use purge::PurgeLimiter;

mod purge;

/// The name this tier uses in `Cache-Status`.
pub const CACHE_NAME: &str = "gateway-origin";

/// An API request as the service sees it.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub route: Route,
    /// Already authorized by [`Service::authorize`] (before the body was read).
    pub tenant: Arc<Tenant>,
    /// `x-gateway-edge-miss: 1`: the edge missed and wants the entry replicated.
    pub edge_miss: bool,
    pub cache_control: Option<String>,
    pub pragma: Option<String>,
    pub body: Bytes,
}

/// What happened, for the response headers and the request log line.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    pub tenant: Option<String>,
    pub cache: Option<CacheOutcome>,
    pub layer: Option<Layer>,
    /// The key's hex.
    pub key: Option<String>,
    pub provider: Option<Arc<str>>,
    /// The rendered `Cache-Status` member of this tier.
    pub cache_status: Option<String>,
    /// Seconds, on a hit.
    pub age: Option<u64>,
    pub redis_ms: Option<f64>,
    pub upstream_ms: Option<f64>,
    /// Answered by another request's provider call.
    pub collapsed: bool,
}

pub enum ReplyBody {
    Full(Bytes),
    /// Forwarded chunk by chunk as the provider produces it.
    Stream(ClientStream),
}

impl std::fmt::Debug for ReplyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyBody::Full(b) => write!(f, "Full({} bytes)", b.len()),
            ReplyBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: ReplyBody,
}

/// An error answer, with `Retry-After` for 429s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: ApiError,
    pub retry_after_secs: Option<u64>,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Refusal {
        Refusal {
            error,
            retry_after_secs: None,
        }
    }
}

#[derive(Debug)]
pub struct Outcome {
    pub trace: Trace,
    pub result: Result<Reply, Refusal>,
}

impl Outcome {
    pub fn refused(trace: Trace, refusal: Refusal) -> Outcome {
        Outcome {
            trace,
            result: Err(refusal),
        }
    }
}

/// A provider's answer, shared between the leader and its coalesced waiters.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Bytes,
    provider: Arc<str>,
    usage: Option<Usage>,
    upstream_ms: f64,
    /// Present when the answer is cacheable and will be written.
    entry: Option<Arc<Entry>>,
}

type Shared = Result<Arc<Answer>, Refusal>;

/// A live stream handed from the fetch task to the leading request.
struct Live {
    provider: Arc<str>,
    upstream_ms: f64,
    stream: ClientStream,
}

/// One provider call, run in a task of its own so a client that disconnects cannot strand
/// the waiters coalesced behind it.
struct Job {
    tenant: Arc<Tenant>,
    route: Route,
    model: String,
    /// What the provider is sent (the client's body, with usage requested for chat streams).
    body: Bytes,
    stream: bool,
    /// Assemble a streamed chat answer (for the cache, the waiters and the token count).
    assemble: bool,
    /// The client did not ask for the usage chunk requested for accounting: hide it.
    hide_usage: bool,
    /// Where to write a cacheable answer; `None` when the plan does not write.
    key: Option<CacheKey>,
    /// Why the plan neither reads nor writes (for `Cache-Status`).
    bypass: Option<Bypass>,
    edge_miss: bool,
}

#[derive(Debug)]
struct Hit {
    entry: Entry,
    age: u64,
    remaining: u64,
}

/// What a cache read found: a fresh hit, how long Redis took, and whether an entry was there
/// but too old (`Cache-Status: fwd=stale`).
struct Looked {
    hit: Option<Hit>,
    redis_ms: f64,
    stale: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Router(#[from] crate::router::RouterSetupError),
}

pub struct Service {
    tenants: Tenants,
    store: Arc<dyn Store>,
    router: Router,
    coalescer: Arc<Coalescer<Shared>>,
    budget: Arc<Budget>,
    replicator: Arc<dyn Replicator>,
    metrics: Metrics,
    key_secret: Vec<u8>,
    max_body_bytes: usize,
    ttl_cap_secs: u64,
    wait_limit: Duration,
    edge_secret: Option<Secret>,
    admin_token: Option<Secret>,
    decode_log: ThrottledLog,
    purge_limiter: PurgeLimiter,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(
        settings: &Settings,
        tenants: Tenants,
        store: Arc<dyn Store>,
        replicator: Arc<dyn Replicator>,
        metrics: Metrics,
    ) -> Result<Arc<Service>, ServiceError> {
        let router = Router::new(
            &settings.providers,
            &settings.router,
            settings.server.max_upstream_body_bytes,
            metrics.clone(),
        )?;
        let budget = Arc::new(Budget::new(Arc::clone(&store), metrics.clone()));
        Ok(Arc::new(Service {
            tenants,
            store,
            router,
            coalescer: Coalescer::new(),
            budget,
            replicator,
            metrics,
            key_secret: settings.cache_key_secret(),
            max_body_bytes: settings.server.max_body_bytes,
            ttl_cap_secs: settings.cache.ttl_cap_secs,
            wait_limit: ms(settings.cache.coalesce_wait_timeout_ms),
            edge_secret: settings
                .security
                .require_edge_secret
                .then(|| settings.security.edge_secret.clone())
                .flatten(),
            admin_token: settings.security.admin_token.clone(),
            decode_log: ThrottledLog::new(Duration::from_secs(
                settings.redis.error_log_interval_secs,
            )),
            purge_limiter: PurgeLimiter::new(&settings.purge),
        }))
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Keys whose provider call (or the cache write after it) is still running. Tests wait
    /// for 0 before asserting a hit; operators could export it.
    pub fn in_flight(&self) -> usize {
        self.coalescer.in_flight()
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Serves one authorized API request; never panics on bad input, every failure is a
    /// [`Refusal`].
    pub async fn handle(self: &Arc<Self>, request: ApiRequest) -> Outcome {
        let mut trace = Trace::default();
        let result = self.serve(request, &mut trace).await;
        Outcome { trace, result }
    }

    async fn serve(
        self: &Arc<Self>,
        request: ApiRequest,
        trace: &mut Trace,
    ) -> Result<Reply, Refusal> {
        let tenant = Arc::clone(&request.tenant);
        trace.tenant = Some(tenant.id.clone());
        let parsed = parse_request(request.route, &request.body, self.max_body_bytes)
            .map_err(|e| Refusal::from(e.to_api_error()))?;
        if !tenant.allows_model(&parsed.model) {
            return Err(ApiError::forbidden_model(&parsed.model).into());
        }
        let directives = policy::parse_cache_control(
            request.cache_control.as_deref(),
            request.pragma.as_deref(),
        );
        let plan = policy::plan(directives, &parsed, &tenant);
        let key = match &parsed.canonical {
            Some(canonical) if plan.read || plan.write => Some(CacheKey::derive(
                &self.key_secret,
                &tenant.id,
                request.route,
                canonical,
            )),
            _ => None,
        };
        trace.key = key.as_ref().map(|k| k.hex().to_string());
        let now = unix_now();

        // The budget counters ride in the cache read's round trip: one Redis call, not two.
        let (standing, looked) = match &key {
            Some(key) if plan.read => {
                let ops = self.budget.counter_ops(&tenant, now);
                let (values, looked) = self.lookup(key, now, plan.max_age, &ops).await;
                (self.budget.standing(&tenant, now, values), Some(looked))
            }
            _ => (self.budget.check(&tenant, now).await, None),
        };
        if let Some(rejection) = standing.rate {
            return Err(self.refuse_budget(&tenant.id, rejection));
        }
        let mut fwd = if plan.read {
            Fwd::Uri_Miss
        } else if plan.write {
            Fwd::Request
        } else {
            Fwd::Bypass
        };
        if let Some(Looked {
            hit,
            redis_ms,
            stale,
        }) = looked
        {
            trace.redis_ms = Some(redis_ms);
            if stale {
                fwd = Fwd::Stale;
            }
            if let Some(Hit {
                entry,
                age,
                remaining,
            }) = hit
            {
                // Only an edge miss needs the entry after the reply; otherwise its body moves
                // into the reply uncopied.
                let offered = request.edge_miss.then(|| Arc::new(entry.clone()));
                let provider = Arc::from(entry.envelope.provider.as_str());
                let saved = entry.envelope.usage.as_ref().map(|u| u.total_tokens);
                if let Some(reply) =
                    render_entry(entry, request.route, parsed.stream, parsed.include_usage)
                {
                    trace.cache = Some(CacheOutcome::Hit);
                    trace.layer = Some(Layer::Origin);
                    trace.age = Some(age);
                    trace.provider = Some(provider);
                    trace.cache_status =
                        Some(CacheStatusMember::hit(CACHE_NAME, remaining).render());
                    if let Some(tokens) = saved {
                        self.budget.record_saved(&tenant.id, tokens);
                    }
                    if let Some(entry) = offered {
                        self.offer(entry);
                    }
                    return Ok(reply);
                }
            }
        }
        if let Some(rejection) = standing.tokens {
            return Err(self.refuse_budget(&tenant.id, rejection));
        }

        trace.cache = Some(if plan.read || plan.write {
            CacheOutcome::Miss
        } else {
            CacheOutcome::Bypass
        });
        trace.layer = Some(Layer::Upstream);
        let chat_stream = parsed.stream && request.route == Route::ChatCompletions;
        // A stream reports its tokens only when asked; ask, so the budget sees every token.
        let with_usage = (chat_stream && !parsed.include_usage)
            .then(|| stream::with_usage_requested(&request.body))
            .flatten();
        let job = Job {
            tenant: Arc::clone(&tenant),
            route: request.route,
            model: parsed.model.clone(),
            hide_usage: with_usage.is_some(),
            body: with_usage.unwrap_or_else(|| request.body.clone()),
            stream: parsed.stream,
            assemble: chat_stream,
            key: if plan.write { key.clone() } else { None },
            bypass: plan.bypass,
            edge_miss: request.edge_miss,
        };
        let shared = match &key {
            Some(key) if plan.read => match self.coalescer.join(&key.redis_key()) {
                Joined::Leader(leader) => match self.lead(job, Some(leader), fwd, trace).await {
                    Led::Live(reply) => return Ok(reply),
                    Led::Done(shared) => shared,
                },
                Joined::Waiter(waiter) => {
                    trace.collapsed = true;
                    self.metrics.coalesced_waiters.inc();
                    let shared = self.wait(waiter).await;
                    if let Ok(answer) = &shared {
                        if let Some(usage) = &answer.usage {
                            self.budget.record_saved(&tenant.id, usage.total_tokens);
                        }
                        if request.edge_miss
                            && let Some(entry) = &answer.entry
                        {
                            self.offer(Arc::clone(entry));
                        }
                    }
                    shared
                }
            },
            _ => match self.lead(job, None, fwd, trace).await {
                Led::Live(reply) => return Ok(reply),
                Led::Done(shared) => shared,
            },
        };
        let answer = shared?;
        trace.provider = Some(Arc::clone(&answer.provider));
        trace.upstream_ms = Some(answer.upstream_ms);
        trace.cache_status = Some(cache_status(
            fwd,
            plan.bypass,
            answer.entry.is_some(),
            trace.collapsed,
        ));
        Ok(render_answer(
            &answer,
            request.route,
            parsed.stream,
            parsed.include_usage,
        ))
    }

    /// Starts the provider call in its own task and waits for it: for a stream, until the
    /// provider's stream starts (then the reply is live); otherwise until the whole answer.
    async fn lead(
        self: &Arc<Self>,
        job: Job,
        leader: Option<Leader<Shared>>,
        fwd: Fwd,
        trace: &mut Trace,
    ) -> Led {
        let (done_tx, done_rx) = oneshot::channel();
        let (live_tx, live_rx) = oneshot::channel();
        let streaming = job.stream;
        let job_bypass = job.bypass;
        tokio::spawn(Arc::clone(self).fetch(job, leader, streaming.then_some(live_tx), done_tx));
        if streaming && let Ok(live) = live_rx.await {
            trace.provider = Some(live.provider);
            trace.upstream_ms = Some(live.upstream_ms);
            trace.cache_status = Some(cache_status(fwd, job_bypass, false, false));
            return Led::Live(Reply {
                status: 200,
                content_type: "text/event-stream".into(),
                body: ReplyBody::Stream(live.stream),
            });
        }
        Led::Done(match tokio::time::timeout(self.wait_limit, done_rx).await {
            Ok(Ok(shared)) => shared,
            Ok(Err(_)) => Err(ApiError::internal().into()),
            Err(_) => Err(ApiError::gateway_timeout("the provider did not answer in time").into()),
        })
    }

    async fn wait(&self, waiter: Waiter<Shared>) -> Shared {
        match waiter.wait(self.wait_limit).await {
            Ok(shared) => shared,
            Err(WaitError::Abandoned) => {
                Err(ApiError::bad_gateway("the provider call was abandoned").into())
            }
            Err(WaitError::TimedOut) => {
                Err(ApiError::gateway_timeout("the provider did not answer in time").into())
            }
        }
    }

    /// The provider call and everything after it: publish to the waiters, then (off every
    /// response path) count tokens, write the cache, offer the entry for replication, and
    /// only then free the coalescing slot.
    async fn fetch(
        self: Arc<Self>,
        job: Job,
        leader: Option<Leader<Shared>>,
        live_tx: Option<oneshot::Sender<Live>>,
        done_tx: oneshot::Sender<Shared>,
    ) {
        let start = Instant::now();
        let sent = self
            .router
            .send(job.route, &job.model, &job.body, job.stream)
            .await;
        let upstream_ms = start.elapsed().as_secs_f64() * 1000.0;
        let shared: Shared = match sent {
            Err(error) => {
                drop(live_tx);
                Err(refusal_for(&error))
            }
            Ok(Upstream {
                provider,
                body: UpstreamBody::Stream(response),
                ..
            }) => {
                let (client_tx, client_stream) = stream::client_channel();
                if let Some(live_tx) = live_tx {
                    let _ = live_tx.send(Live {
                        provider: Arc::clone(&provider),
                        upstream_ms,
                        stream: client_stream,
                    });
                }
                let filter = job.hide_usage.then(stream::UsageFilter::default);
                match stream::forward(
                    response,
                    client_tx,
                    job.assemble,
                    filter,
                    self.router.stream_idle_timeout,
                )
                .await
                {
                    Ok(Some(completion)) => {
                        let body = Bytes::from(completion);
                        Ok(self.answer(
                            &job,
                            200,
                            "application/json".into(),
                            body,
                            provider,
                            upstream_ms,
                        ))
                    }
                    Ok(None) => {
                        Err(ApiError::bad_gateway("the streamed answer cannot be shared").into())
                    }
                    Err(error) => {
                        tracing::debug!(%error, provider = %provider, "stream ended badly; not cached");
                        Err(ApiError::bad_gateway(error.to_string()).into())
                    }
                }
            }
            Ok(Upstream {
                provider,
                status,
                content_type,
                body: UpstreamBody::Full(body),
            }) => {
                drop(live_tx);
                Ok(self.answer(&job, status, content_type, body, provider, upstream_ms))
            }
        };
        if let Some(leader) = &leader {
            leader.publish(shared.clone());
        }
        let _ = done_tx.send(shared.clone());

        if let Ok(answer) = &shared {
            if let Some(usage) = &answer.usage {
                self.budget.record_used(&job.tenant.id, usage.total_tokens);
            }
            if let (Some(entry), Some(key)) = (&answer.entry, &job.key) {
                if job.edge_miss {
                    self.offer(Arc::clone(entry));
                }
                self.write(key, entry).await;
            }
        }
        drop(leader);
    }

    fn answer(
        &self,
        job: &Job,
        status: u16,
        content_type: String,
        body: Bytes,
        provider: Arc<str>,
        upstream_ms: f64,
    ) -> Arc<Answer> {
        let usage = if (200..300).contains(&status) {
            extract_usage(&body)
        } else {
            None
        };
        let entry = match &job.key {
            Some(key) if policy::is_cacheable_response(status, &content_type, &body) => {
                Some(Arc::new(Entry {
                    envelope: Envelope {
                        v: ENTRY_VERSION,
                        tenant: job.tenant.id.clone(),
                        key: key.hex().to_string(),
                        created: unix_now(),
                        ttl: policy::effective_ttl(job.tenant.cache_ttl_secs, self.ttl_cap_secs),
                        status,
                        content_type: content_type.clone(),
                        model: job.model.clone(),
                        provider: provider.to_string(),
                        usage: usage.clone(),
                    },
                    body: body.to_vec(),
                }))
            }
            _ => None,
        };
        if job.key.is_some() && entry.is_none() {
            self.metrics
                .cache_writes
                .with_label_values(&["uncacheable"])
                .inc();
        }
        Arc::new(Answer {
            status,
            content_type,
            body,
            provider,
            usage,
            upstream_ms,
            entry,
        })
    }

    async fn write(&self, key: &CacheKey, entry: &Entry) {
        let bytes = match entry.encode() {
            Ok(bytes) => bytes,
            Err(error) => {
                self.metrics
                    .cache_writes
                    .with_label_values(&["uncacheable"])
                    .inc();
                tracing::debug!(%error, "entry not encodable; not cached");
                return;
            }
        };
        let outcome = match self
            .store
            .set_ex(&key.redis_key(), bytes, entry.envelope.ttl)
            .await
        {
            Ok(()) => "stored",
            Err(_) => "failed",
        };
        self.metrics
            .cache_writes
            .with_label_values(&[outcome])
            .inc();
    }

    /// The values of the budget counter `ops` (`None` when Redis did not answer) and what the
    /// cache read found for `key`.
    async fn lookup(
        &self,
        key: &CacheKey,
        now: u64,
        max_age: Option<u64>,
        ops: &[CounterOp],
    ) -> (Option<Vec<u64>>, Looked) {
        let start = Instant::now();
        let redis_key = key.redis_key();
        let got = if ops.is_empty() {
            self.store.get(&redis_key).await.map(|v| (v, Vec::new()))
        } else {
            self.store.get_with_counters(&redis_key, ops).await
        };
        let redis_ms = start.elapsed().as_secs_f64() * 1000.0;
        let (got, values) = match got {
            Ok((got, values)) => (got, Some(values)),
            Err(_) => (None, None),
        };
        let (hit, stale) = self.decode(key, got, now, max_age);
        (
            values,
            Looked {
                hit,
                redis_ms,
                stale,
            },
        )
    }

    /// The entry read for `key` as a fresh hit, or why not (see [`Service::lookup`]).
    fn decode(
        &self,
        key: &CacheKey,
        got: Option<Vec<u8>>,
        now: u64,
        max_age: Option<u64>,
    ) -> (Option<Hit>, bool) {
        let Some(bytes) = got else {
            return (None, false);
        };
        match Entry::decode(&bytes, key) {
            Ok(entry) => {
                let env = &entry.envelope;
                match policy::freshness(env.created, env.ttl, now, max_age, 0) {
                    Freshness::Fresh { age, remaining } => (
                        Some(Hit {
                            entry,
                            age,
                            remaining,
                        }),
                        false,
                    ),
                    Freshness::Stale { .. } | Freshness::Expired => (None, true),
                }
            }
            Err(error) => {
                self.metrics.cache_decode_errors.inc();
                if let Some(suppressed) = self.decode_log.admit() {
                    tracing::warn!(%error, suppressed, "cache entry did not decode; serving as a miss");
                }
                (None, false)
            }
        }
    }

    fn offer(&self, entry: Arc<Entry>) {
        let outcome = if self.replicator.offer(entry) {
            "offered"
        } else {
            "dropped"
        };
        self.metrics.replication.with_label_values(&[outcome]).inc();
    }

    fn refuse_budget(&self, tenant: &str, rejection: Rejection) -> Refusal {
        self.budget.count_rejection(tenant, rejection);
        match rejection {
            Rejection::Rate { retry_after_secs } => Refusal {
                error: ApiError::rate_limited("Rate limit reached for requests per second."),
                retry_after_secs: Some(retry_after_secs),
            },
            Rejection::Tokens { retry_after_secs } => Refusal {
                error: ApiError::budget_exceeded(),
                retry_after_secs: Some(retry_after_secs),
            },
        }
    }

    /// The edge shared secret when this origin requires it, then bearer key → tenant. The
    /// secret comes first: a caller without it learns nothing, not even whether a key is valid.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        edge_secret: Option<&str>,
    ) -> Result<Arc<Tenant>, Refusal> {
        if let Some(expected) = &self.edge_secret {
            match edge_secret {
                None => {
                    return Err(ApiError {
                        status: 401,
                        message: "This origin only accepts requests through the gateway edge."
                            .into(),
                        kind: "authentication_error",
                        code: Some("edge_secret_missing"),
                        param: None,
                    }
                    .into());
                }
                Some(given) if constant_time_eq(given, expected.expose()) => {}
                Some(_) => {
                    return Err(ApiError {
                        status: 403,
                        message: "The edge shared secret is not valid.".into(),
                        kind: "permission_error",
                        code: Some("edge_secret_invalid"),
                        param: None,
                    }
                    .into());
                }
            }
        }
        authorization
            .and_then(bearer_token)
            .and_then(|key| self.tenants.authenticate(key))
            .ok_or_else(|| Refusal::from(ApiError::unauthorized()))
    }

    /// `GET /v1/models`: the models the tenant may use, in OpenAI's list shape.
    pub fn models(
        &self,
        authorization: Option<&str>,
        edge_secret: Option<&str>,
    ) -> Result<Bytes, Refusal> {
        let tenant = self.authorize(authorization, edge_secret)?;
        let ids = if tenant.allowed_models.iter().any(|m| m == "*") {
            self.router.models()
        } else {
            tenant.allowed_models.clone()
        };
        let data: Vec<serde_json::Value> = ids
            .into_iter()
            .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "gateway"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data});
        Ok(Bytes::from(body.to_string()))
    }

    /// `Ok` when Redis answers a PING in time and the replication queue is not saturated.
    pub async fn readiness(&self) -> Result<(), &'static str> {
        if self.replicator.saturated() {
            return Err("replication queue saturated");
        }
        self.store.ping().await.map_err(|_| "redis unreachable")
    }

    /// The Prometheus page (tenant ids and usage); requires the admin token. Only a
    /// `dev_mode` origin runs without one (validation refuses that elsewhere), and then the
    /// page is open.
    pub fn metrics_page(&self, authorization: Option<&str>) -> Result<Vec<u8>, Refusal> {
        if self.admin_token.is_some() && !self.is_admin(authorization) {
            return Err(ApiError::unauthorized().into());
        }
        Ok(self.metrics.render())
    }

    /// The bearer token is the configured, non-empty admin token. False without one.
    fn is_admin(&self, authorization: Option<&str>) -> bool {
        match (&self.admin_token, authorization.and_then(bearer_token)) {
            (Some(token), Some(given)) if !token.expose().is_empty() => {
                constant_time_eq(given, token.expose())
            }
            _ => false,
        }
    }
}

enum Led {
    Live(Reply),
    Done(Shared),
}

fn constant_time_eq(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

fn cache_status(fwd: Fwd, bypass: Option<Bypass>, stored: bool, collapsed: bool) -> String {
    let mut member = CacheStatusMember::fwd(CACHE_NAME, fwd, stored);
    if let Some(reason) = bypass {
        member = member.with_detail(reason.as_str());
    }
    let mut member = member.render();
    if collapsed {
        // RFC 9211 `collapsed`: answered by a request made for another client.
        member.push_str("; collapsed");
    }
    member
}

/// A cached entry as the client asked for it: SSE for a chat stream, otherwise the stored body.
/// `None` when a stream was asked and the entry cannot be replayed (then it is a miss).
fn render_entry(entry: Entry, route: Route, stream: bool, include_usage: bool) -> Option<Reply> {
    if stream {
        if route != Route::ChatCompletions {
            return None;
        }
        let sse = replay_chat(&entry.body, include_usage).ok()?;
        return Some(Reply {
            status: 200,
            content_type: "text/event-stream".into(),
            body: ReplyBody::Full(Bytes::from(sse)),
        });
    }
    Some(Reply {
        status: entry.envelope.status,
        content_type: entry.envelope.content_type,
        body: ReplyBody::Full(Bytes::from(entry.body)),
    })
}

/// A provider answer as this client asked for it (a waiter may want SSE from a JSON answer).
fn render_answer(answer: &Answer, route: Route, stream: bool, include_usage: bool) -> Reply {
    if stream
        && route == Route::ChatCompletions
        && answer.status == 200
        && let Ok(sse) = replay_chat(&answer.body, include_usage)
    {
        return Reply {
            status: 200,
            content_type: "text/event-stream".into(),
            body: ReplyBody::Full(Bytes::from(sse)),
        };
    }
    Reply {
        status: answer.status,
        content_type: answer.content_type.clone(),
        body: ReplyBody::Full(answer.body.clone()),
    }
}

fn refusal_for(error: &RouterError) -> Refusal {
    match error {
        RouterError::NoProvider(model) => {
            ApiError::bad_gateway(format!("No provider is configured for model {model}.")).into()
        }
        RouterError::AllOpen => {
            ApiError::bad_gateway("No provider is available for this model right now.").into()
        }
        RouterError::TooLarge(_) => {
            ApiError::bad_gateway("The provider's answer is too large.").into()
        }
        RouterError::Exhausted {
            last: AttemptError::Timeout,
            ..
        } => ApiError::gateway_timeout("The provider did not answer in time.").into(),
        RouterError::Exhausted {
            last:
                AttemptError::Status {
                    status: 429,
                    retry_after,
                },
            ..
        } => Refusal {
            error: ApiError::rate_limited(
                "The providers for this model are rate limiting; retry later.",
            ),
            retry_after_secs: Some(
                retry_after
                    .as_deref()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(1),
            ),
        },
        RouterError::Exhausted { last, .. } => {
            ApiError::bad_gateway(format!("The provider failed: {last}.")).into()
        }
    }
}

/// The `usage` object of an OpenAI answer; embeddings have no completion tokens.
fn extract_usage(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Probe {
        usage: Option<RawUsage>,
    }
    #[derive(serde::Deserialize)]
    struct RawUsage {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
        #[serde(default)]
        total_tokens: u64,
    }
    let usage = serde_json::from_slice::<Probe>(body).ok()?.usage?;
    let total = if usage.total_tokens > 0 {
        usage.total_tokens
    } else {
        usage.prompt_tokens + usage.completion_tokens
    };
    Some(Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_chat_and_embedding_answers() {
        let chat = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(extract_usage(chat).unwrap().total_tokens, 7);
        let emb = br#"{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert_eq!(extract_usage(emb).unwrap().completion_tokens, 0);
        assert!(extract_usage(b"{}").is_none());
        assert!(extract_usage(b"not json").is_none());
    }

    #[test]
    fn the_cache_status_marks_collapsed_requests() {
        assert_eq!(
            cache_status(Fwd::Uri_Miss, None, true, true),
            "gateway-origin; fwd=uri-miss; stored; collapsed"
        );
        assert_eq!(
            cache_status(Fwd::Bypass, None, false, false),
            "gateway-origin; fwd=bypass"
        );
        assert_eq!(
            cache_status(Fwd::Bypass, Some(Bypass::Sampled), false, false),
            "gateway-origin; fwd=bypass; detail=sampled"
        );
    }
}
