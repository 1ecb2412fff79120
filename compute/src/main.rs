//! The edge tier: authenticate, derive the key with `common`, answer from the KV Store when a
//! fresh entry exists, otherwise fall back to the origin. Every expected failure becomes a
//! response (a miss, a stale answer or a clean OpenAI-shaped error), never an `Err` or a panic.

mod auth;
mod kv;
mod limit;
mod log;
mod names;
mod origin;
mod populate;
mod region;
mod respond;
mod settings;
mod trace;

use std::io::Read;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fastly::http::HeaderName;
use fastly::http::Method;
use fastly::{Request, Response};
use gateway_common::canonical::{ParsedRequest, RequestError, parse_request};
use gateway_common::entry::{ENTRY_VERSION, Entry, Envelope, Usage};
use gateway_common::error::ApiError;
use gateway_common::headers::{
    CacheOutcome, CacheStatusMember, Fwd, ServerTiming, append_cache_status,
};
use gateway_common::key::CacheKey;
use gateway_common::policy::{
    Bypass, Freshness, Plan, effective_ttl, freshness, is_cacheable_response, parse_cache_control,
    plan, purged,
};
use gateway_common::route::Route;
use gateway_common::seal::TenantKey;
use gateway_common::tenant::Tenant;
use gateway_common::traceparent::TraceContext;

use crate::auth::AuthError;
use crate::log::LogLine;
use crate::names::{
    AGE, CACHE_CONTROL, CACHE_STATUS, CONTENT_LENGTH, CONTENT_TYPE, PRAGMA, SERVER_TIMING, X_CACHE,
    X_CACHE_KEY, X_UPSTREAM_PROVIDER, X_UPSTREAM_REGION, X_UPSTREAM_TRIED,
};
use crate::origin::{Forward, OriginFailure};
use crate::respond::{CACHE_NAME, Served};
use crate::settings::EdgeSettings;

fn main() {
    let started = Instant::now();
    let req = Request::from_client();
    let span = trace::enter(&req);
    let mut log = LogLine::new(&req);
    log.span = Some(span.record());
    let reply = handle(req, &mut log, span.downstream);
    match reply {
        Reply::Send(resp) => {
            log.finish(&resp, started);
            resp.send_to_client();
        }
        Reply::SendThenPopulate {
            resp,
            key,
            entry,
            seal,
            kv_ttl_secs,
        } => {
            log.finish(&resp, started);
            resp.send_to_client();
            // After the client has its answer: the insert is never on the response path.
            kv::insert(&key, &entry, &seal, kv_ttl_secs);
        }
    }
    log.emit();
    log.emit_usage(unix_now());
}

/// What to do with the answer.
enum Reply {
    Send(Response),
    /// Send, then store the same answer in the edge's KV store (local populate).
    SendThenPopulate {
        resp: Response,
        key: CacheKey,
        entry: Box<Entry>,
        /// The tenant's current seal key: the edge never stores an unsealed entry.
        seal: Box<TenantKey>,
        kv_ttl_secs: u64,
    },
}

/// An error answer in the shape of `api`'s API (`None`: OpenAI's).
fn fail(api: Option<Route>, err: &ApiError) -> Reply {
    Reply::Send(respond::error(api, err))
}

/// `trace`: what the origin is told to join, should the request go there.
fn handle(mut req: Request, log: &mut LogLine, trace: TraceContext) -> Reply {
    let path = req.get_path().to_owned();
    if !path.starts_with("/v1/") {
        return fail(None, &ApiError::not_found(&path));
    }
    // Known before anything can fail, so every error has its API's shape.
    let api = Route::from_path(&path);

    let mut timing = ServerTiming::new();
    let auth_started = Instant::now();
    let tenant = match auth::authenticate(&req) {
        Ok(tenant) => tenant,
        Err(AuthError::Unavailable) => {
            return fail(
                api,
                &ApiError::unavailable("the edge cannot verify API keys right now"),
            );
        }
        Err(AuthError::Missing | AuthError::Unknown) => {
            return fail(api, &ApiError::unauthorized());
        }
    };
    record(&mut timing, log, "auth", auth_started);
    log.tenant = Some(tenant.id.clone());
    let settings = EdgeSettings::load();
    log.usage_log = settings.usage_log;
    // Before any body read, KV read or origin request: edge hits count against the limit too.
    if let limit::Decision::Limited {
        retry_after_secs, ..
    } = limit::check(&tenant, &settings)
    {
        let err = ApiError::rate_limited("Rate limit reached for requests per second.");
        return Reply::Send(respond::error_retry_after(api, &err, retry_after_secs));
    }

    let route = api.filter(|_| req.get_method() == Method::POST);
    let Some(route) = route else {
        // Models, cache purge and anything else: the origin decides, unchanged.
        return pass_through(api, req, &settings, timing, log, trace);
    };

    let body = match read_body(&mut req, settings.max_body_bytes) {
        Ok(body) => body,
        Err(e) => return fail(api, &e.to_api_error()),
    };
    let parsed = match parse_request(route, &body, settings.max_body_bytes) {
        Ok(parsed) => parsed,
        Err(e) => return fail(api, &e.to_api_error()),
    };
    if !tenant.allows_model(&parsed.model) {
        return fail(api, &ApiError::forbidden_model(&parsed.model));
    }

    let directives = parse_cache_control(header(&req, &CACHE_CONTROL), header(&req, &PRAGMA));
    let key = match (&settings.cache_key_secret, &parsed.canonical) {
        (Some(secret), Some(canonical)) => {
            Some(CacheKey::derive(secret, &tenant.id, route, canonical))
        }
        _ => None,
    };
    let plan = match &key {
        Some(_) => plan(directives, &parsed, &tenant),
        None => Plan::bypass(Bypass::Uncacheable),
    };
    log.key = key.as_ref().map(|k| k.hex().to_owned());

    let now = unix_now();
    let mut stale: Option<Entry> = None;
    if let (true, Some(key)) = (plan.read, &key) {
        let kv_started = Instant::now();
        let found = kv::lookup(key, &settings);
        record(&mut timing, log, "kv", kv_started);
        let read = match found {
            // Written before the tenant's last purge: never served, not even stale.
            Ok(entry) if purged(entry.envelope.generation, tenant.purge_generation) => {
                KvRead::Purged
            }
            Ok(mut entry) => {
                // The cap bounds every entry served, whoever wrote it: the origin replicates
                // with its own TTL (up to its own, longer cap). Capping the envelope itself
                // makes the freshness below, the stale-if-error window (counted from the
                // capped TTL) and the TTL a stale answer reports agree.
                entry.envelope.ttl = effective_ttl(entry.envelope.ttl, settings.ttl_cap_secs);
                let env = &entry.envelope;
                let fresh = freshness(
                    env.created,
                    env.ttl,
                    now,
                    plan.max_age,
                    tenant.stale_if_error_secs,
                );
                match fresh {
                    Freshness::Fresh { age, remaining } => {
                        log.served_from(&entry);
                        let served = Served {
                            entry,
                            route,
                            key,
                            outcome: CacheOutcome::Hit,
                            age,
                            ttl_remaining: i64::try_from(remaining).unwrap_or(i64::MAX),
                            stream: parsed.stream,
                            include_usage: parsed.include_usage,
                            echo: parsed.echo.as_ref(),
                        };
                        if let Some(resp) = respond::from_entry(served, &timing) {
                            return Reply::Send(resp);
                        }
                        log.not_served();
                        KvRead::Unservable
                    }
                    // A client that bounded the age it accepts gets nothing older, even on error.
                    Freshness::Stale { .. } if plan.max_age.is_none() => {
                        stale = Some(entry);
                        KvRead::Stale
                    }
                    Freshness::Stale { .. } | Freshness::Expired => KvRead::Expired,
                }
            }
            Err(miss) => KvRead::Miss(miss),
        };
        log.kv = Some(read);
    }

    req.set_body(body);
    let forward = Forward {
        edge_miss: plan.write && key.is_some(),
        trace,
    };
    let origin_started = Instant::now();
    let routed = origin::send(req, &settings, forward);
    record(&mut timing, log, "origin", origin_started);
    log.from_origin = routed.result.is_ok();
    let upstream = Upstream::of(&routed, log);

    let resp = match routed.result {
        Ok(resp) if !resp.get_status().is_server_error() => resp,
        failed => {
            if let Some(stale) = &stale {
                log.served_from(stale);
            }
            // Every region failed (the last one's answer is this 5xx, or no answer came).
            if let Some(reply) = serve_stale(stale.take(), key.as_ref(), &parsed, now, &timing) {
                log.from_origin = false;
                return upstream.tag(reply);
            }
            log.not_served();
            match failed {
                Ok(resp) => clean_server_error(api, resp),
                Err(failure) => return upstream.tag(fail(api, &origin_error(failure))),
            }
        }
    };

    let fwd = match (&key, plan) {
        (None, _) | (_, Plan { write: false, .. }) => Fwd::Bypass,
        (Some(_), Plan { read: false, .. }) => Fwd::Request,
        _ if matches!(log.kv, Some(KvRead::Stale | KvRead::Expired)) => Fwd::Stale,
        _ => Fwd::Miss,
    };
    let region = upstream.region.clone();
    upstream.tag(finish_from_origin(
        resp,
        Decorate {
            key,
            plan,
            fwd,
            timing,
            tenant: &tenant,
            parsed: &parsed,
            settings: &settings,
            now,
            region: &region,
        },
    ))
}

/// Which origin region answered and which were tried: `x-upstream-region` and
/// `x-upstream-tried` on every answer that involved the origin, errors and stale answers
/// included.
struct Upstream {
    region: String,
    tried: String,
}

impl Upstream {
    fn of(routed: &origin::Routed, log: &mut LogLine) -> Upstream {
        let upstream = Upstream {
            region: routed.region_header().to_owned(),
            tried: region::render_tried(&routed.tried),
        };
        log.region = Some(upstream.region.clone());
        log.tried = Some(upstream.tried.clone());
        upstream
    }

    fn tag(&self, reply: Reply) -> Reply {
        let tag = |mut resp: Response| {
            resp.set_header(X_UPSTREAM_REGION, &self.region);
            resp.set_header(X_UPSTREAM_TRIED, &self.tried);
            resp
        };
        match reply {
            Reply::Send(resp) => Reply::Send(tag(resp)),
            Reply::SendThenPopulate {
                resp,
                key,
                entry,
                seal,
                kv_ttl_secs,
            } => Reply::SendThenPopulate {
                resp: tag(resp),
                key,
                entry,
                seal,
                kv_ttl_secs,
            },
        }
    }
}

struct Decorate<'a> {
    key: Option<CacheKey>,
    plan: Plan,
    fwd: Fwd,
    timing: ServerTiming,
    tenant: &'a Tenant,
    parsed: &'a ParsedRequest,
    settings: &'a EdgeSettings,
    now: u64,
    /// The origin region that answered.
    region: &'a str,
}

/// Add the edge's headers to the origin's answer and decide whether to populate the KV store.
fn finish_from_origin(mut resp: Response, d: Decorate<'_>) -> Reply {
    // Local populate stands in for the origin's dual-write, which replicates what the origin
    // has stored. So the edge stores only answers the origin served from its own cache: never
    // one the origin declined to keep (its policy decides), and never a fresh upstream answer
    // whose Redis write may have failed. Locally this gives the walk MISS -> origin HIT -> edge HIT.
    let streamed = d.parsed.stream;
    // Stored only sealed: an edge without a seal key stores nothing.
    let seal = d
        .settings
        .fallback()
        .populate_on_fallback
        .then(|| d.settings.seal_current())
        .flatten()
        .map(|k| k.tenant_key(&d.tenant.id));
    let populate = seal.is_some()
        && d.plan.write
        && d.key.is_some()
        && (!streamed || populate::from_stream(d.parsed.route))
        && resp.get_status().as_u16() == 200
        && header_resp(&resp, &X_CACHE) == Some(CacheOutcome::Hit.as_str())
        && header_resp(&resp, &CONTENT_TYPE).is_some_and(|ct| {
            ct.starts_with(if streamed {
                "text/event-stream"
            } else {
                "application/json"
            })
        });

    let mut member = CacheStatusMember::fwd(CACHE_NAME, d.fwd, populate);
    if let Some(reason) = d.plan.bypass {
        member = member.with_detail(reason.as_str());
    }
    // Named once there are regions to tell apart; the one-region member reads as before.
    if d.region != region::DEFAULT_REGION {
        member = member.with_param("region", d.region);
    }
    let cache_status = append_cache_status(header_resp(&resp, &CACHE_STATUS), &member);
    resp.set_header(CACHE_STATUS, cache_status);
    let server_timing = d.timing.append_to(header_resp(&resp, &SERVER_TIMING));
    resp.set_header(SERVER_TIMING, server_timing);
    if let Some(key) = &d.key
        && resp.get_header(&X_CACHE_KEY).is_none()
    {
        resp.set_header(X_CACHE_KEY, key.hex());
    }

    let (Some(key), Some(seal)) = (d.key.filter(|_| populate), seal) else {
        // Streams flow through as they arrive: the host splices the origin's body to the client.
        return Reply::Send(resp);
    };
    let body = resp.take_body_bytes();
    let (content_type, stored) = if streamed {
        match populate::assemble(d.parsed.route, &body) {
            Some(json) => ("application/json".to_owned(), json),
            None => return Reply::Send(resp.with_body(body)),
        }
    } else {
        let content_type = header_resp(&resp, &CONTENT_TYPE).unwrap_or("application/json");
        (content_type.to_owned(), body.clone())
    };
    if !is_cacheable_response(200, &content_type, &stored) {
        return Reply::Send(resp.with_body(body));
    }
    // An origin hit is as old as the origin says: keep created-at consistent across tiers.
    let age = header_resp(&resp, &AGE)
        .and_then(|a| a.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let ttl = effective_ttl(d.tenant.cache_ttl_secs, d.settings.ttl_cap_secs);
    let provider = header_resp(&resp, &X_UPSTREAM_PROVIDER)
        .unwrap_or_default()
        .to_owned();
    let (model, usage) = model_and_usage(&stored, &d.parsed.model);
    let entry = Entry {
        envelope: Envelope {
            v: ENTRY_VERSION,
            tenant: d.tenant.id.clone(),
            key: key.hex().to_owned(),
            created: d.now.saturating_sub(age),
            ttl,
            status: 200,
            content_type,
            model,
            provider,
            usage,
            // The edge's view of the tenant's purges; never newer than the origin's, so an
            // entry populated here is refused rather than served after a purge it missed.
            generation: d.tenant.purge_generation,
        },
        body: stored,
    };
    let kv_ttl_secs = entry
        .kv_expiry(d.tenant.stale_if_error_secs)
        .saturating_sub(d.now);
    Reply::SendThenPopulate {
        resp: resp.with_body(body),
        key,
        entry: Box::new(entry),
        seal: Box::new(seal),
        kv_ttl_secs,
    }
}

/// Answer from a stale entry when the origin failed, if the tenant's window allows it.
fn serve_stale(
    stale: Option<Entry>,
    key: Option<&CacheKey>,
    parsed: &ParsedRequest,
    now: u64,
    timing: &ServerTiming,
) -> Option<Reply> {
    let (entry, key) = (stale?, key?);
    let age = entry.age(now);
    let ttl_remaining = i64::try_from(entry.envelope.ttl).unwrap_or(i64::MAX)
        - i64::try_from(age).unwrap_or(i64::MAX);
    let served = Served {
        entry,
        route: parsed.route,
        key,
        outcome: CacheOutcome::Stale,
        age,
        ttl_remaining,
        stream: parsed.stream,
        include_usage: parsed.include_usage,
        echo: parsed.echo.as_ref(),
    };
    respond::from_entry(served, timing).map(Reply::Send)
}

/// Keep the origin's own JSON 5xx (already in the route's shape); replace anything else (an
/// HTML page from a load balancer, an empty body) with a clean error of the same class.
fn clean_server_error(api: Option<Route>, resp: Response) -> Response {
    if header_resp(&resp, &CONTENT_TYPE).is_some_and(|ct| ct.starts_with("application/json")) {
        return resp;
    }
    respond::error(
        api,
        &origin_error(match resp.get_status().as_u16() {
            503 => OriginFailure::Unreachable,
            504 => OriginFailure::Timeout,
            _ => OriginFailure::Broken,
        }),
    )
}

fn pass_through(
    api: Option<Route>,
    mut req: Request,
    settings: &EdgeSettings,
    mut timing: ServerTiming,
    log: &mut LogLine,
    trace: TraceContext,
) -> Reply {
    // Into memory (bounded), so another region can be tried with the same body.
    let body = match read_body(&mut req, settings.max_body_bytes) {
        Ok(body) => body,
        Err(e) => return fail(api, &e.to_api_error()),
    };
    req.set_body(body);
    let started = Instant::now();
    let forward = Forward {
        edge_miss: false,
        trace,
    };
    let routed = origin::send(req, settings, forward);
    record(&mut timing, log, "origin", started);
    log.from_origin = routed.result.is_ok();
    let upstream = Upstream::of(&routed, log);
    let reply = match routed.result {
        Ok(mut resp) => {
            let server_timing = timing.append_to(header_resp(&resp, &SERVER_TIMING));
            resp.set_header(SERVER_TIMING, server_timing);
            Reply::Send(if resp.get_status().is_server_error() {
                clean_server_error(api, resp)
            } else {
                resp
            })
        }
        Err(failure) => fail(api, &origin_error(failure)),
    };
    upstream.tag(reply)
}

/// The client's error when the origin gave no answer.
fn origin_error(failure: OriginFailure) -> ApiError {
    match failure {
        OriginFailure::Unreachable => ApiError::unavailable("the gateway origin is unreachable"),
        OriginFailure::Timeout => {
            ApiError::gateway_timeout("the gateway origin did not answer in time")
        }
        OriginFailure::Broken => ApiError::bad_gateway("the gateway origin failed"),
    }
}

/// What the KV read found, when the edge read it (the log line's `kv` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvRead {
    Miss(kv::Miss),
    /// Fresh, but cannot answer this request (a stream request for a non-chat entry).
    Unservable,
    /// Past its TTL, inside the stale-if-error window: kept in case the origin fails.
    Stale,
    /// Past any use.
    Expired,
    /// Written before the tenant's last purge (an older purge generation).
    Purged,
}

impl KvRead {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KvRead::Miss(miss) => miss.as_str(),
            KvRead::Unservable => "unservable",
            KvRead::Stale => "stale",
            KvRead::Expired => "expired",
            KvRead::Purged => "purged",
        }
    }
}

/// Read the request body, refusing more than `limit` bytes without buffering them.
fn read_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, RequestError> {
    let declared = header(req, &CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(RequestError::TooLarge { limit });
    }
    let mut body = Vec::new();
    let mut reader = req.take_body().take(limit as u64 + 1);
    if reader.read_to_end(&mut body).is_err() {
        return Err(RequestError::InvalidJson(
            "the request body could not be read".to_owned(),
        ));
    }
    if body.len() > limit {
        return Err(RequestError::TooLarge { limit });
    }
    Ok(body)
}

/// The answer's own model name and token usage, for the entry's envelope.
fn model_and_usage(body: &[u8], requested: &str) -> (String, Option<Usage>) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let model = value
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or(requested)
        .to_owned();
    let usage = value.get("usage").and_then(|u| {
        let n = |k: &str| u.get(k).and_then(serde_json::Value::as_u64);
        // OpenAI chat names, or the Responses and Messages APIs' (Anthropic counts prompt-cache
        // reads and writes apart from input_tokens).
        let prompt = n("prompt_tokens").or_else(|| {
            let cached = n("cache_creation_input_tokens")
                .unwrap_or(0)
                .saturating_add(n("cache_read_input_tokens").unwrap_or(0));
            n("input_tokens").map(|i| i.saturating_add(cached))
        })?;
        let completion = n("completion_tokens")
            .or_else(|| n("output_tokens"))
            .unwrap_or(0);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            // Provider-supplied numbers: a huge count must not wrap (or, in a debug build, panic).
            total_tokens: n("total_tokens").unwrap_or(prompt.saturating_add(completion)),
        })
    });
    (model, usage)
}

/// A request header's value, `None` when absent or not visible ASCII (never a panic, which
/// `get_header_str` is on a value that is not UTF-8).
pub(crate) fn header<'a>(req: &'a Request, name: &HeaderName) -> Option<&'a str> {
    req.get_header(name).and_then(|v| v.to_str().ok())
}

/// A response header's value, `None` when absent or not visible ASCII.
pub(crate) fn header_resp<'a>(resp: &'a Response, name: &HeaderName) -> Option<&'a str> {
    resp.get_header(name).and_then(|v| v.to_str().ok())
}

/// One step's duration, in `Server-Timing` and in the log line alike.
fn record(timing: &mut ServerTiming, log: &mut LogLine, step: &'static str, started: Instant) {
    let took = ms(started);
    timing.add(step, took);
    log.steps.push((step, took));
}

pub(crate) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_near_the_limit_saturate_instead_of_wrapping() {
        let body = format!(
            r#"{{"model":"m-2024","usage":{{"prompt_tokens":{},"completion_tokens":2}}}}"#,
            u64::MAX - 1
        );
        let (model, usage) = model_and_usage(body.as_bytes(), "m");
        assert_eq!(model, "m-2024");
        assert_eq!(usage.map(|u| u.total_tokens), Some(u64::MAX));
    }

    #[test]
    fn a_reported_total_is_kept_and_a_missing_usage_is_none() {
        let body = br#"{"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":9}}"#;
        let (model, usage) = model_and_usage(body, "requested");
        assert_eq!(model, "requested");
        assert_eq!(usage.map(|u| u.total_tokens), Some(9));
        assert_eq!(model_and_usage(b"not json", "m").1, None);
    }
}
