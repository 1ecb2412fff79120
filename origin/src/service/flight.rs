//! A miss: one provider call per key (single flight), run in a task of its own so a client that
//! disconnects cannot strand the requests coalesced behind it. A streamed answer is shared
//! live: every coalesced stream reader follows the same events as they arrive. After the
//! answer: tokens counted, the cache written, the entry offered to the edge tier.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use gateway_common::canonical::ParsedRequest;
use gateway_common::echo::Echo;
use gateway_common::entry::{ENTRY_VERSION, Entry, Envelope, Usage};
use gateway_common::error::ApiError;
use gateway_common::headers::{CacheStatusMember, Fwd};
use gateway_common::key::CacheKey;
use gateway_common::policy::{self, Bypass, Plan};
use gateway_common::route::Route;
use gateway_common::sse;
use gateway_common::tenant::Tenant;
use gateway_common::usage::Tier;
use tokio::sync::oneshot;

use super::flight_lock::{Crossed, refusal_answer};
use super::{CACHE_NAME, Refusal, Reply, ReplyBody, Service, Trace};
use crate::budget::unix_now;
use crate::coalesce::{Joined, Leader, WaitError, Waiter};
use crate::fanout::Fanout;
use crate::meter::Saving;
use crate::provider_api::Passthrough;
use crate::router::{AttemptError, RouterError, Upstream, UpstreamBody};
use crate::stream::{self, Forwarding};
use crate::usage;

/// A provider's answer, shared between the leader and its coalesced waiters.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) content_type: String,
    pub(super) body: Bytes,
    pub(super) provider: Arc<str>,
    pub(super) usage: Option<Usage>,
    pub(super) upstream_ms: f64,
    /// Answered by another replica's flight (`flight_lock.rs`): not written again here.
    pub(super) remote: bool,
    /// Present when the answer is cacheable (and, unless `remote`, will be written here).
    pub(super) entry: Option<Arc<Entry>>,
}

pub(super) type Shared = Result<Arc<Answer>, Refusal>;

/// What a key's flight offers its waiters: the live stream while it runs (a streamed answer),
/// then the whole answer.
#[derive(Debug, Clone)]
pub(super) enum Flight {
    Live(Arc<Live>),
    Done(Shared),
}

/// A provider stream under way.
#[derive(Debug)]
pub(super) struct Live {
    provider: Arc<str>,
    upstream_ms: f64,
    fanout: Arc<Fanout>,
}

/// A miss as [`Service::serve`] hands it over.
pub(super) struct Miss {
    pub(super) tenant: Arc<Tenant>,
    pub(super) parsed: ParsedRequest,
    pub(super) body: Bytes,
    pub(super) key: Option<CacheKey>,
    pub(super) plan: Plan,
    /// `Cache-Status` `fwd` of this tier.
    pub(super) fwd: Fwd,
    /// The tenant's purge generation as the cache read saw it: written into a new entry.
    pub(super) generation: u64,
    pub(super) edge_miss: bool,
    pub(super) passthrough: Passthrough,
    /// The question's vector, indexed once the answer is cached (a semantic tenant's miss).
    pub(super) semantic: Option<Arc<super::semantic::Pending>>,
}

/// How the client wants the answer.
#[derive(Debug, Clone, Copy)]
struct Want {
    route: Route,
    stream: bool,
    include_usage: bool,
}

/// One provider call.
struct Job {
    tenant: Arc<Tenant>,
    route: Route,
    model: String,
    /// What the provider is sent (the client's body, with usage requested for streams).
    body: Bytes,
    stream: bool,
    /// Assemble a streamed chat answer (for the cache and the waiters that want JSON).
    assemble: bool,
    /// Where to write a cacheable answer; `None` when the plan does not write.
    key: Option<CacheKey>,
    generation: u64,
    edge_miss: bool,
    passthrough: Passthrough,
    semantic: Option<Arc<super::semantic::Pending>>,
}

/// A leader's or a waiter's outcome: a live stream to read, or the whole answer.
enum Led {
    Live(Reply),
    Done(Shared),
}

impl Service {
    /// Answers a miss (or a bypass) from the provider; see the module doc.
    pub(super) async fn miss(
        self: &Arc<Self>,
        miss: Miss,
        trace: &mut Trace,
    ) -> Result<Reply, Refusal> {
        let parsed = &miss.parsed;
        let want = Want {
            route: parsed.route,
            stream: parsed.stream,
            include_usage: parsed.include_usage,
        };
        // A stream reports its tokens only when asked: ask, so the budget sees every token
        // (the usage chunk is then hidden from a client that did not ask for it).
        // Only the OpenAI chat and completion APIs take `stream_options.include_usage`; the
        // typed streams (Responses, Messages) always report usage.
        let asks_usage = matches!(parsed.route, Route::ChatCompletions | Route::Completions);
        let body = (parsed.stream && !parsed.include_usage && asks_usage)
            .then(|| stream::with_usage_requested(&miss.body))
            .flatten()
            .unwrap_or(miss.body);
        let job = Job {
            tenant: Arc::clone(&miss.tenant),
            route: parsed.route,
            model: parsed.model.clone(),
            body,
            stream: parsed.stream,
            assemble: parsed.stream && parsed.route.replays_streams(),
            key: if miss.plan.write {
                miss.key.clone()
            } else {
                None
            },
            generation: miss.generation,
            edge_miss: miss.edge_miss,
            passthrough: miss.passthrough,
            semantic: miss.semantic.clone(),
        };
        let status =
            |stored, collapsed| Some(cache_status(miss.fwd, miss.plan.bypass, stored, collapsed));
        let led = match &miss.key {
            Some(key) if miss.plan.read => match self.coalescer.join(&key.redis_key()) {
                Joined::Leader(leader) => self.lead(job, Some(leader), want, trace).await,
                Joined::Waiter(waiter) => {
                    trace.collapsed = true;
                    self.metrics.coalesced_waiters.inc();
                    self.follow(waiter, want, &miss.tenant, miss.edge_miss, trace)
                        .await
                }
            },
            _ => self.lead(job, None, want, trace).await,
        };
        let answer = match led {
            Led::Live(reply) => {
                trace.cache_status = status(false, trace.collapsed);
                return Ok(reply);
            }
            Led::Done(shared) => shared?,
        };
        trace.provider = Some(Arc::clone(&answer.provider));
        trace.upstream_ms = Some(answer.upstream_ms);
        trace.collapsed |= answer.remote;
        let stored = answer.entry.is_some() && !answer.remote;
        trace.cache_status = status(stored, trace.collapsed);
        // An answer made for another request echoes that request's unkeyed fields.
        let echo = parsed.echo.as_ref().filter(|_| trace.collapsed);
        Ok(render_answer(&answer, want, echo))
    }

    /// Starts the provider call in its own task and waits for it: for a stream, until the
    /// provider's stream starts (then the reply reads it live); otherwise the whole answer.
    async fn lead(
        self: &Arc<Self>,
        job: Job,
        leader: Option<Leader<Flight>>,
        want: Want,
        trace: &mut Trace,
    ) -> Led {
        let (done_tx, done_rx) = oneshot::channel();
        let (live_tx, live_rx) = oneshot::channel();
        // The provider call keeps the request's span or scope (its trace id) in its own task,
        // and is counted until that task ends (the cache write and the offer included).
        let fetching = Fetching::start(&self.fetching);
        let fetch = Arc::clone(self).fetch(job, leader, want.stream.then_some(live_tx), done_tx);
        tokio::spawn(crate::request_scope::carry(async move {
            fetch.await;
            drop(fetching);
        }));
        if want.stream
            && let Ok(live) = live_rx.await
        {
            return Led::Live(live_reply(
                &live,
                live.fanout.read(want.include_usage),
                trace,
            ));
        }
        Led::Done(match tokio::time::timeout(self.wait_limit, done_rx).await {
            Ok(Ok(shared)) => shared,
            Ok(Err(_)) => Err(ApiError::internal().into()),
            Err(_) => Err(ApiError::gateway_timeout("the provider did not answer in time").into()),
        })
    }

    /// Tokens `times` coalesced waiters did not spend: another request's provider call
    /// answered them (the `upstream` tier saved them).
    fn save(&self, tenant: &str, model: &str, usage: &Usage, times: u64) {
        let saving = Saving {
            model,
            usage,
            times,
        };
        self.meter.saved(tenant, Tier::Upstream, unix_now(), saving);
    }

    /// A coalesced request: a stream joins the leader's live stream (from its first event,
    /// then live); anything else waits for the whole answer.
    #[tracing::instrument(name = "coalesce.wait", skip_all)]
    async fn follow(
        &self,
        mut waiter: Waiter<Flight>,
        want: Want,
        tenant: &Tenant,
        edge_miss: bool,
        trace: &mut Trace,
    ) -> Led {
        let done = |flight: &Flight| matches!(flight, Flight::Done(_));
        let flight = waiter
            .wait(self.wait_limit, |flight| want.stream || done(flight))
            .await;
        let flight = match flight {
            Ok(Flight::Live(live)) => match live.fanout.join(want.include_usage, edge_miss) {
                Some(reader) => return Led::Live(live_reply(&live, reader, trace)),
                // The stream just ended: its answer is being published.
                None => waiter.wait(self.wait_limit, done).await,
            },
            other => other,
        };
        let shared = match flight {
            Ok(Flight::Done(shared)) => shared,
            Ok(Flight::Live(_)) => Err(ApiError::internal().into()),
            Err(WaitError::Abandoned) => {
                Err(ApiError::bad_gateway("the provider call was abandoned").into())
            }
            Err(WaitError::TimedOut) => {
                Err(ApiError::gateway_timeout("the provider did not answer in time").into())
            }
        };
        if let Ok(answer) = &shared {
            if let Some(usage) = &answer.usage {
                let model = answer
                    .entry
                    .as_ref()
                    .map_or("", |e| e.envelope.model.as_str());
                self.save(&tenant.id, model, usage, 1);
            }
            if edge_miss && let Some(entry) = &answer.entry {
                self.offer(Arc::clone(entry)).await;
            }
        }
        Led::Done(shared)
    }

    /// The provider call and everything after it: share the live stream or publish the
    /// answer to the waiters, then (off every response path) count tokens, write the cache,
    /// offer the entry for replication, and only then free the coalescing slot.
    async fn fetch(
        self: Arc<Self>,
        job: Job,
        leader: Option<Leader<Flight>>,
        mut live_tx: Option<oneshot::Sender<Arc<Live>>>,
        done_tx: oneshot::Sender<Shared>,
    ) {
        // A coalesced flight also coalesces across replicas: another one may be fetching.
        let crossed = match (&leader, &job.key) {
            (Some(_), Some(key)) => self.cross(key, job.generation).await,
            _ => Crossed::Lead(None),
        };
        let lock = match crossed {
            Crossed::Lead(lock) => lock,
            Crossed::Followed(answer) => {
                drop(live_tx);
                if let Some(leader) = &leader {
                    leader.publish(Flight::Done(Ok(Arc::clone(&answer))));
                }
                let _ = done_tx.send(Ok(Arc::clone(&answer)));
                if let Some(usage) = &answer.usage {
                    self.save(&job.tenant.id, &job.model, usage, 1);
                }
                if job.edge_miss
                    && let Some(entry) = &answer.entry
                {
                    self.offer(Arc::clone(entry)).await;
                }
                return;
            }
        };
        let start = Instant::now();
        let sent = self
            .router
            .send(
                job.route,
                &job.model,
                &job.body,
                job.stream,
                &job.passthrough,
            )
            .await;
        let upstream_ms = start.elapsed().as_secs_f64() * 1000.0;
        let mut used = None;
        let mut sharers = (0, false);
        let shared: Shared = match sent {
            Err(error) => Err(refusal_for(&error)),
            Ok(Upstream {
                provider,
                body: UpstreamBody::Stream(response),
                ..
            }) => {
                let live = Arc::new(Live {
                    provider: Arc::clone(&provider),
                    upstream_ms,
                    fanout: Fanout::new(),
                });
                if let Some(tx) = live_tx.take() {
                    let _ = tx.send(Arc::clone(&live));
                }
                if let Some(leader) = &leader {
                    leader.publish(Flight::Live(Arc::clone(&live)));
                }
                let options = Forwarding {
                    assemble: job.assemble.then_some(job.route),
                    idle: self.router.stream_idle_timeout,
                    max_bytes: self.max_upstream_body_bytes,
                };
                let forwarded = stream::forward(response, &live.fanout, options).await;
                // Before the answer is published: a waiter either joined the live stream (and
                // is counted here) or takes the published answer.
                sharers = live.fanout.seal();
                used = forwarded.usage;
                match forwarded.result {
                    Ok(Some(completion)) => Ok(self.answer(
                        &job,
                        200,
                        "application/json".into(),
                        Bytes::from(completion),
                        provider,
                        upstream_ms,
                    )),
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
                let answer = self.answer(&job, status, content_type, body, provider, upstream_ms);
                used = answer.usage.clone();
                Ok(answer)
            }
        };
        // No stream: the leading request stops waiting for one and takes the answer.
        drop(live_tx);
        if let Some(leader) = &leader {
            leader.publish(Flight::Done(shared.clone()));
        }
        let _ = done_tx.send(shared.clone());

        let (joined, joined_from_edge) = sharers;
        if let Some(usage) = &used {
            self.budget
                .spend(&job.tenant.id, usage.total_tokens, unix_now())
                .await;
            if joined > 0 {
                self.save(&job.tenant.id, &job.model, usage, joined as u64);
            }
        }
        if let (Some(lock), Some(key)) = (&lock, &job.key) {
            // Followers on other replicas take what is not cached from here.
            match &shared {
                Ok(answer) if answer.entry.is_none() => {
                    lock.publish(key, answer, job.generation, &self.sealer)
                        .await
                }
                Err(refusal) => {
                    let answer = refusal_answer(refusal, "gateway");
                    lock.publish(key, &answer, job.generation, &self.sealer)
                        .await
                }
                Ok(_) => {}
            }
        }
        if let Ok(answer) = &shared
            && let (Some(entry), Some(key)) = (&answer.entry, &job.key)
        {
            // Written before it is offered: the replication log names the Redis entry, which
            // the sender reads when it writes to the KV store.
            let written = self.write(key, entry).await;
            if written && let Some(pending) = &job.semantic {
                self.semantic_index(
                    &job.tenant.id,
                    key,
                    pending,
                    job.generation,
                    entry.envelope.ttl,
                )
                .await;
            }
            if job.edge_miss || joined_from_edge {
                self.offer(Arc::clone(entry)).await;
            }
        }
        // Released once the entry (or the published answer) is there for the followers.
        drop(lock);
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
            usage::of_answer(&body)
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
                        generation: job.generation,
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
            remote: false,
            entry,
        })
    }

    #[tracing::instrument(name = "cache.write", skip_all)]
    /// Whether the entry is in Redis now.
    async fn write(&self, key: &CacheKey, entry: &Entry) -> bool {
        let bytes = match self.sealer.seal(entry) {
            Ok(bytes) => bytes,
            Err(error) => {
                self.metrics
                    .cache_writes
                    .with_label_values(&["uncacheable"])
                    .inc();
                tracing::debug!(%error, "entry not encodable; not cached");
                return false;
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
        outcome == "stored"
    }
}

/// A reply that reads a live stream, and the trace fields it knows.
fn live_reply(live: &Live, reader: stream::ClientStream, trace: &mut Trace) -> Reply {
    trace.provider = Some(Arc::clone(&live.provider));
    trace.upstream_ms = Some(live.upstream_ms);
    Reply {
        status: 200,
        content_type: "text/event-stream".into(),
        body: ReplyBody::Stream(reader),
    }
}

pub(super) fn cache_status(
    fwd: Fwd,
    bypass: Option<Bypass>,
    stored: bool,
    collapsed: bool,
) -> String {
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

/// A provider answer as this client asked for it (a waiter may want SSE from a JSON answer),
/// with the members it echoes set to this client's values when `echo` is given (a collapsed
/// answer, made for another request).
fn render_answer(answer: &Answer, want: Want, echo: Option<&Echo>) -> Reply {
    let body = match echo {
        Some(echo) if answer.status == 200 => Bytes::from(echo.apply(answer.body.to_vec())),
        _ => answer.body.clone(),
    };
    if want.stream
        && answer.status == 200
        && let Ok(sse) = sse::replay(want.route, &body, want.include_usage)
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
        body: ReplyBody::Full(body),
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

/// One provider call's task, counted in [`Service::in_flight`] while it runs: its answer, the
/// budget spend, the cache write and the offer to the edge.
pub(super) struct Fetching(Arc<AtomicUsize>);

impl Fetching {
    fn start(count: &Arc<AtomicUsize>) -> Fetching {
        count.fetch_add(1, Ordering::Relaxed);
        Fetching(Arc::clone(count))
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_status_marks_collapsed_requests_and_bypass_reasons() {
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
