//! The request flow: authenticate, parse, apply tenant policy, read the cache, coalesce misses,
//! call the provider router, write the cache and hand the answer to the replication seam.
//! Never sees an HTTP type: routes translate requests in and replies out.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_common::canonical::{ParsedRequest, parse_request};
use gateway_common::echo;
use gateway_common::entry::Entry;
use gateway_common::error::ApiError;
use gateway_common::headers::{CacheOutcome, CacheStatusMember, Fwd, Layer};
use gateway_common::key::{CacheKey, KeySecret};
use gateway_common::policy::{self, Freshness};
use gateway_common::route::Route;
use gateway_common::sse;
use gateway_common::tenant::Tenant;
use gateway_common::usage::Tier;
use sha2::{Digest, Sha256};

use crate::budget::{Budget, Rejection, unix_now};
use crate::coalesce::Coalescer;
use crate::generation;
use crate::meter::{Meter, Saving};
use crate::metrics::Metrics;
use crate::peers::{PeerMetrics, Peers};
use crate::provider_api::Passthrough;
use crate::replicate::Replicator;
use crate::router::Router;
use crate::seal::Sealer;
use crate::settings::{Secret, Settings, ms};
use crate::store::{CounterOp, Store, ThrottledLog};
use crate::stream::ClientStream;
use crate::tenants::Tenants;
use crate::traffic::Traffic;
pub use dashboard::{Dashboard, Minute, Replication, TenantRow, TierLatency};
use flight::{Flight, Miss};
use flight_lock::Holders;
pub use ingest::{IngestReport, RejectedLine};
use purge::PurgeLimiter;
use tracing::Instrument;

mod access;
mod dashboard;
mod flight;
mod flight_lock;
mod ingest;
mod peer_purge;
mod purge;
mod semantic;

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
    /// `x-semantic-cache: off`: no semantic lookup for this request.
    pub semantic_off: bool,
    pub body: Bytes,
    /// Client headers the provider gets (`anthropic-version`); empty for chat.
    pub passthrough: Passthrough,
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
    /// A semantic hit: the similarity, and the key (hex) of the entry that answered.
    pub similarity: Option<f32>,
    pub semantic_key: Option<String>,
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
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
}

pub struct Service {
    tenants: Tenants,
    store: Arc<dyn Store>,
    router: Router,
    coalescer: Arc<Coalescer<Flight>>,
    /// Provider calls whose task is still running (see [`flight::Fetching`]).
    fetching: Arc<AtomicUsize>,
    budget: Arc<Budget>,
    meter: Arc<Meter>,
    replicator: Arc<dyn Replicator>,
    metrics: Metrics,
    key_secret: KeySecret,
    max_body_bytes: usize,
    /// Most bytes read from a provider answer, streamed or not.
    max_upstream_body_bytes: usize,
    ttl_cap_secs: u64,
    wait_limit: Duration,
    edge_secret: Option<Secret>,
    admin_token: Option<Secret>,
    /// `usage.ingest_token`: the edge usage ingest's credential.
    usage_ingest_token: Option<Secret>,
    /// sha256 hex of each `usage.fastly_service_ids` (Fastly's logging challenge).
    logging_challenge: Vec<String>,
    usage_max_batch_bytes: usize,
    decode_log: ThrottledLog,
    purge_limiter: PurgeLimiter,
    /// How long a tenant's purge generation is kept after its last bump (`generation.rs`).
    generation_ttl_secs: u64,
    /// Names this replica's flight locks (`flight_lock.rs`).
    holders: Holders,
    /// `region.name`.
    region: String,
    /// `region.peer_token`: what a peer region must present on the internal purge route.
    peer_token: Option<Secret>,
    /// The outboxes toward the peer regions; `None` for a region without peers.
    peers: Option<Arc<Peers>>,
    peer_metrics: PeerMetrics,
    /// The semantic cache (`service/semantic.rs`).
    semantic: semantic::Semantic,
    /// Seals what this service writes to Redis and opens what it reads (`[seal]`).
    sealer: Sealer,
}

/// This origin's region, for the service: its peers' outboxes and its metrics.
pub struct RegionParts {
    pub peers: Option<Arc<Peers>>,
    pub metrics: PeerMetrics,
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
        region: RegionParts,
    ) -> Result<Arc<Service>, ServiceError> {
        let router = Router::new(
            &settings.providers,
            &settings.router,
            settings.server.max_upstream_body_bytes,
            metrics.clone(),
        )?;
        let budget = Arc::new(Budget::new(Arc::clone(&store), metrics.clone()));
        let meter = Arc::new(Meter::new(
            metrics.clone(),
            settings.pricing.clone(),
            Arc::clone(&budget),
            Arc::new(Traffic::new(Arc::clone(&store))),
        ));
        let longest_stale = tenants.iter().map(|t| t.stale_if_error_secs).max();
        let tenants_using_local = tenants
            .iter()
            .filter(|t| {
                t.semantic.enabled
                    && t.semantic.embedder == gateway_common::tenant::SemanticEmbedder::Local
            })
            .count();
        let generation_ttl_secs =
            generation::ttl_secs(settings.cache.ttl_cap_secs, longest_stale.unwrap_or(0));
        let sealer = Sealer::new(settings.seal.keyring(settings.dev_mode)?);
        Ok(Arc::new(Service {
            sealer,
            tenants,
            store,
            router,
            coalescer: Coalescer::new(),
            fetching: Arc::default(),
            budget,
            meter,
            replicator,
            metrics,
            key_secret: KeySecret::new(&settings.cache_key_secret()),
            max_body_bytes: settings.server.max_body_bytes,
            max_upstream_body_bytes: settings.server.max_upstream_body_bytes,
            ttl_cap_secs: settings.cache.ttl_cap_secs,
            wait_limit: ms(settings.cache.coalesce_wait_timeout_ms),
            edge_secret: settings
                .security
                .require_edge_secret
                .then(|| settings.security.edge_secret.clone())
                .flatten(),
            admin_token: settings.security.admin_token.clone(),
            usage_ingest_token: settings.usage.ingest_token.clone(),
            logging_challenge: settings
                .usage
                .fastly_service_ids
                .iter()
                .map(|id| hex::encode(Sha256::digest(id.as_bytes())))
                .collect(),
            usage_max_batch_bytes: settings.usage.max_batch_bytes,
            decode_log: ThrottledLog::new(Duration::from_secs(
                settings.redis.error_log_interval_secs,
            )),
            purge_limiter: PurgeLimiter::new(&settings.purge),
            generation_ttl_secs,
            holders: Holders::new(),
            region: settings.region.name.clone(),
            peer_token: settings.region.peer_token.clone(),
            peers: region.peers,
            peer_metrics: region.metrics,
            semantic: semantic::Semantic::new(
                semantic::load_local_model(settings, &tenants_using_local),
                settings.semantic.default_threshold,
            ),
        }))
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `region.name`.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Provider calls still running, with the cache write and the offer after them: those a
    /// request leads for identical ones, and those made alone (a `no-cache` refresh, a
    /// bypass). Tests wait for 0 before asserting a hit; operators could export it.
    pub fn in_flight(&self) -> usize {
        // A coalesced flight's slot lives within its provider call's task: counting the tasks
        // counts them too.
        self.fetching.load(Ordering::Relaxed)
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Largest usage batch the ingest route reads.
    pub fn usage_max_batch_bytes(&self) -> usize {
        self.usage_max_batch_bytes
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
            Some(canonical) if plan.read || plan.write => {
                Some(self.key_secret.derive(&tenant.id, request.route, canonical))
            }
            _ => None,
        };
        trace.key = key.as_ref().map(|k| k.hex().to_string());
        let now = unix_now();

        // The tenant's purge generation (when the cache is used) and its budget counters ride
        // in the cache read's round trip: one Redis call, not two.
        let cached = plan.read || plan.write;
        let mut ops = Vec::with_capacity(3);
        if cached {
            ops.push(CounterOp::Get {
                key: generation::key(&tenant.id),
            });
        }
        ops.extend(self.budget.counter_ops(&tenant, now));
        let (values, looked) = match &key {
            Some(key) if plan.read => {
                // Its own span only for an exporter: nobody else reads it, and every span
                // costs the log layer a formatting pass on the hit path.
                let read = self.lookup(key, &ops);
                let (values, looked) = if crate::telemetry::exporting() {
                    read.instrument(tracing::info_span!("cache.read")).await
                } else {
                    read.await
                };
                (values, Some(looked))
            }
            _ if ops.is_empty() => (Some(Vec::new()), None),
            _ => (self.store.counters(&ops).await.ok(), None),
        };
        // Unknown when Redis did not answer: then nothing was read, and an entry written with
        // generation 0 is at worst refused later.
        let (generation, counters) = match values {
            Some(values) if cached => (
                values.first().copied().unwrap_or(0),
                Some(values.into_iter().skip(1).collect()),
            ),
            values => (0, values),
        };
        let standing = self.budget.standing(&tenant, now, counters);
        let looked = looked.map(|(got, redis_ms)| {
            let (hit, stale) = match &key {
                Some(key) => self.decode(key, got, now, plan.max_age, generation),
                None => (None, false),
            };
            Looked {
                hit,
                redis_ms,
                stale,
            }
        });
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
                let saved = entry
                    .envelope
                    .usage
                    .clone()
                    .map(|usage| (entry.envelope.model.clone(), usage));
                if let Some(reply) = render_entry(entry, request.route, &parsed) {
                    trace.cache = Some(CacheOutcome::Hit);
                    trace.layer = Some(Layer::Origin);
                    trace.age = Some(age);
                    trace.provider = Some(provider);
                    trace.cache_status =
                        Some(CacheStatusMember::hit(CACHE_NAME, remaining).render());
                    if let Some((model, usage)) = &saved {
                        let saving = Saving {
                            model,
                            usage,
                            times: 1,
                        };
                        self.meter
                            .saved(&tenant.id, Tier::Origin, unix_now(), saving);
                    }
                    if let Some(entry) = offered {
                        self.offer(entry).await;
                    }
                    return Ok(reply);
                }
            }
        }
        let mut pending = None;
        if plan.read && key.is_some() && tenant.semantic.enabled && !request.semantic_off {
            let started = Instant::now();
            match self
                .semantic_lookup(&tenant, &parsed, generation, now, plan.max_age)
                .await
            {
                semantic::Found::Hit {
                    hit,
                    key: answered_by,
                    similarity,
                } => {
                    if let Some(reply) = self
                        .serve_semantic_hit(&tenant, &request, &parsed, key.as_ref(), *hit, trace)
                        .await
                    {
                        trace.similarity = Some(similarity);
                        trace.semantic_key = Some(answered_by.hex().to_string());
                        trace.redis_ms = Some(
                            trace.redis_ms.unwrap_or(0.0)
                                + started.elapsed().as_secs_f64() * 1000.0,
                        );
                        return Ok(reply);
                    }
                }
                semantic::Found::Miss(found) => pending = found,
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
        self.miss(
            Miss {
                tenant,
                parsed,
                body: request.body,
                key,
                plan,
                fwd,
                generation,
                edge_miss: request.edge_miss,
                passthrough: request.passthrough,
                semantic: pending,
            },
            trace,
        )
        .await
    }

    /// The values of the counter `ops` (`None` when Redis did not answer), what the cache
    /// read found for `key`, and how long that round trip took (ms).
    async fn lookup(
        &self,
        key: &CacheKey,
        ops: &[CounterOp],
    ) -> (Option<Vec<u64>>, (Option<Vec<u8>>, f64)) {
        let start = Instant::now();
        let redis_key = key.redis_key();
        let got = if ops.is_empty() {
            self.store.get(&redis_key).await.map(|v| (v, Vec::new()))
        } else {
            self.store.get_with_counters(&redis_key, ops).await
        };
        let redis_ms = start.elapsed().as_secs_f64() * 1000.0;
        match got {
            Ok((got, values)) => (Some(values), (got, redis_ms)),
            Err(_) => (None, (None, redis_ms)),
        }
    }

    /// The entry read for `key` as a fresh hit, or why not: `true` when an entry was there
    /// but too old (`Cache-Status: fwd=stale`). An entry from before the tenant's purge
    /// `generation` is not there at all.
    fn decode(
        &self,
        key: &CacheKey,
        got: Option<Vec<u8>>,
        now: u64,
        max_age: Option<u64>,
        generation: u64,
    ) -> (Option<Hit>, bool) {
        let Some(bytes) = got else {
            return (None, false);
        };
        match self.open_stored(&bytes, key) {
            Some(entry) if policy::purged(entry.envelope.generation, generation) => (None, false),
            Some(entry) => {
                let env = &entry.envelope;
                // The cap applies to what is read too: an entry written under a larger cap
                // (before the setting was lowered) is not served past the current one.
                let ttl = policy::effective_ttl(env.ttl, self.ttl_cap_secs);
                match policy::freshness(env.created, ttl, now, max_age, 0) {
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
            None => (None, false),
        }
    }

    /// An entry (or published flight result) read from Redis, opened for `key`; `None` when
    /// it does not decode or open, which is counted (`gateway_cache_decode_errors_total`, and
    /// by reason in `gateway_seal_open_failures_total` for a sealed entry that did not open),
    /// logged (throttled) and served as a miss.
    pub(super) fn open_stored(&self, bytes: &[u8], key: &CacheKey) -> Option<Entry> {
        let error = match Entry::decode(bytes, key, &self.sealer) {
            Ok(entry) => return Some(entry),
            Err(error) => error,
        };
        self.metrics.cache_decode_errors.inc();
        if error.is_seal_failure() {
            self.metrics
                .seal_open_failures
                .with_label_values(&[error.reason()])
                .inc();
        }
        if let Some(suppressed) = self.decode_log.admit() {
            tracing::warn!(%error, suppressed, "cache entry did not decode; serving as a miss");
        }
        None
    }

    /// Logs `entry` for the edge tier (one Redis command).
    #[tracing::instrument(name = "replication.offer", skip_all)]
    async fn offer(&self, entry: Arc<Entry>) {
        let outcome = if self.replicator.offer(entry).await {
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

    /// `Ok` when Redis answers a PING in time and the replication queue is not saturated.
    pub async fn readiness(&self) -> Result<(), &'static str> {
        if self.replicator.saturated() {
            return Err("replication queue saturated");
        }
        self.store.ping().await.map_err(|_| "redis unreachable")
    }
}

/// A cached entry as the client asked for it: its API's event stream for a stream (chat,
/// Responses, Messages), otherwise the stored body. `None` when a stream was asked and the
/// entry cannot be replayed (then it is a miss). Members the answer echoes from its request
/// show the asking request's values (`echo`), in the stream's events too.
fn render_entry(entry: Entry, route: Route, parsed: &ParsedRequest) -> Option<Reply> {
    let body = echo::restore(parsed.echo.as_ref(), entry.body);
    if parsed.stream {
        let sse = sse::replay(route, &body, parsed.include_usage).ok()?;
        return Some(Reply {
            status: 200,
            content_type: "text/event-stream".into(),
            body: ReplyBody::Full(Bytes::from(sse)),
        });
    }
    Some(Reply {
        status: entry.envelope.status,
        content_type: entry.envelope.content_type,
        body: ReplyBody::Full(Bytes::from(body)),
    })
}
