//! HTTP in and out: extracts what the service needs from actix requests, reads bodies within
//! the size limit, and turns replies into responses with the shared header vocabulary, the
//! metrics and one log line per request. No cache or provider logic lives here.

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, AsHeaderName, HeaderMap, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::BytesMut;
use futures_util::StreamExt;
use gateway_common::error::ApiError;
use gateway_common::headers::{
    CACHE_STATUS, CacheOutcome, SERVER_TIMING, ServerTiming, X_CACHE, X_CACHE_KEY, X_CACHE_LAYER,
    X_CACHE_SEMANTIC_KEY, X_CACHE_SIMILARITY, X_UPSTREAM_PROVIDER,
};
use gateway_common::route::Route;
use gateway_common::traceparent::TraceContext;
use gateway_common::usage::{Outcome as UsageOutcome, Tier};
use tracing::Instrument;

use crate::budget::unix_now;
use crate::error::{error_response, error_response_for, method_not_allowed, not_found};
use crate::peers::PURGE_ROUTE;
use crate::provider_api::Passthrough;
use crate::request_scope::{self, RequestScope};
use crate::service::{ApiRequest, Outcome, Refusal, ReplyBody, Service, Trace};

/// Registers every route; unknown paths get 404 and wrong methods 405, both OpenAI-shaped.
pub fn configure(cfg: &mut web::ServiceConfig) {
    // Every path answers one method; any other gets 405.
    let only = |path: &str, route: actix_web::Route| {
        web::resource(path)
            .route(route)
            .default_service(web::to(method_not_allowed))
    };
    let api = |route: Route| {
        only(
            route.path(),
            web::post().to(
                move |request: HttpRequest, payload: web::Payload, service: web::Data<Service>| {
                    api(route, request, payload, service)
                },
            ),
        )
    };
    cfg.service(api(Route::ChatCompletions))
        .service(api(Route::Completions))
        .service(api(Route::Embeddings))
        .service(api(Route::Responses))
        .service(api(Route::Messages))
        .service(only("/v1/models", web::get().to(models)))
        .service(only("/v1/cache", web::delete().to(purge)))
        .service(only("/v1/cache/{key}", web::delete().to(delete_key)))
        .service(only(
            "/admin/tenants/{tenant}/cache",
            web::delete().to(admin_purge),
        ))
        .service(only("/healthz", web::get().to(healthz)))
        .service(only("/readyz", web::get().to(readyz)))
        .service(only("/metrics", web::get().to(metrics)))
        .service(only("/ingest/edge-usage", web::post().to(ingest_usage)))
        .service(only(PURGE_ROUTE, web::post().to(peer_purge)))
        .service(only("/dashboard", web::get().to(dashboard)))
        .service(only("/dashboard.json", web::get().to(dashboard_json)))
        .service(only(
            "/.well-known/fastly/logging/challenge",
            web::get().to(logging_challenge),
        ))
        .default_service(web::to(not_found));
}

fn header(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The request headers every API request reads, as names made at compile time: a lookup by
/// `&str` parses the name first, and allocates one for each that is not a standard header.
mod names {
    use actix_web::http::header::HeaderName;
    use gateway_common::headers;

    pub const TRACEPARENT: HeaderName =
        HeaderName::from_static(gateway_common::traceparent::TRACEPARENT);
    pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    pub const X_EDGE_SECRET: HeaderName = HeaderName::from_static(headers::X_EDGE_SECRET);
    pub const X_EDGE_MISS: HeaderName = HeaderName::from_static(headers::X_EDGE_MISS);
    pub const X_SEMANTIC_CACHE: HeaderName = HeaderName::from_static(headers::X_SEMANTIC_CACHE);
    pub const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
    pub const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
}

async fn api(
    route: Route,
    request: HttpRequest,
    payload: web::Payload,
    service: web::Data<Service>,
) -> HttpResponse {
    let start = Instant::now();
    let headers = request.headers();
    let trace = request_trace(headers);
    if request_scope::enabled() {
        let scope = RequestScope {
            route: route.as_str(),
            trace_id: trace.trace_id,
        };
        return request_scope::run(
            scope,
            serve_api(route, &request, payload, service, start, trace),
        )
        .await;
    }
    let span = tracing::info_span!(
        "request",
        route = route.as_str(),
        trace_id = %trace.trace_id_display(),
    );
    if crate::telemetry::exporting() {
        crate::telemetry::adopt(&span, &trace);
    }
    serve_api(route, &request, payload, service, start, trace)
        .instrument(span)
        .await
}

/// The trace a request runs under: the edge's (or a direct client's) `traceparent`, or a new
/// trace when there is none. The request's log lines carry its trace id (through its span or
/// its `request_scope`).
fn request_trace(headers: &HeaderMap) -> TraceContext {
    header(headers, names::TRACEPARENT)
        .and_then(TraceContext::parse)
        .or_else(|| TraceContext::start(rand::random(), rand::random()))
        .unwrap_or(TraceContext {
            trace_id: [1; 16],
            parent_id: [1; 8],
            flags: 1,
        })
}

async fn serve_api(
    route: Route,
    request: &HttpRequest,
    payload: web::Payload,
    service: web::Data<Service>,
    start: Instant,
    trace: TraceContext,
) -> HttpResponse {
    let service = service.into_inner();
    let headers = request.headers();
    // The Anthropic SDKs send their key as `x-api-key`; read as a bearer token when there is
    // no `Authorization` (the chat path never allocates here).
    let authorization = header(headers, header::AUTHORIZATION).map(std::borrow::Cow::Borrowed);
    let authorization = authorization
        .or_else(|| header(headers, names::X_API_KEY).map(|key| format!("Bearer {key}").into()));
    // Authenticate before reading a byte of the body: an unknown key costs nothing.
    let tenant = match service.authorize(
        authorization.as_deref(),
        header(headers, names::X_EDGE_SECRET),
    ) {
        Ok(tenant) => tenant,
        Err(refusal) => {
            return finish(
                &service,
                route,
                start,
                Outcome::refused(Trace::default(), refusal),
            );
        }
    };
    let body = match read_body(headers, payload, service.max_body_bytes()).await {
        Ok(body) => body,
        Err(refusal) => {
            let trace = Trace {
                tenant: Some(tenant.id.clone()),
                ..Trace::default()
            };
            return finish(&service, route, start, Outcome::refused(trace, refusal));
        }
    };
    let outcome = service
        .handle(ApiRequest {
            route,
            tenant,
            edge_miss: header(headers, names::X_EDGE_MISS).is_some_and(|v| v.trim() == "1"),
            cache_control: header(headers, header::CACHE_CONTROL).map(str::to_string),
            pragma: header(headers, header::PRAGMA).map(str::to_string),
            semantic_off: header(headers, names::X_SEMANTIC_CACHE)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("off")),
            body,
            passthrough: passthrough(route, headers, trace),
        })
        .await;
    finish(&service, route, start, outcome)
}

/// The client headers the provider of `route` needs (none for the OpenAI routes).
fn passthrough(route: Route, headers: &HeaderMap, trace: TraceContext) -> Passthrough {
    if !route.is_anthropic() {
        return Passthrough {
            trace: Some(trace),
            ..Passthrough::default()
        };
    }
    Passthrough {
        anthropic_version: header(headers, names::ANTHROPIC_VERSION).map(str::to_string),
        anthropic_beta: header(headers, names::ANTHROPIC_BETA).map(str::to_string),
        trace: Some(trace),
    }
}

/// The body, refusing (413) past `limit` without reading further.
async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
    limit: usize,
) -> Result<bytes::Bytes, Refusal> {
    let declared =
        header(headers, header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit).into());
    }
    let mut body = BytesMut::with_capacity(initial_capacity(declared));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| {
            Refusal::from(ApiError::bad_request(
                "The request body could not be read.",
                None,
            ))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit).into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// What to reserve for a body before any of it arrived: the declared length (already within
/// the limit), but never more than [`MAX_PREALLOCATED_BYTES`], so a client that declares
/// megabytes and sends nothing cannot make every connection hold them.
fn initial_capacity(declared: Option<u64>) -> usize {
    declared.map_or(8 * 1024, |n| n.min(MAX_PREALLOCATED_BYTES as u64) as usize)
}

/// The most [`initial_capacity`] reserves; a larger body grows as it arrives.
const MAX_PREALLOCATED_BYTES: usize = 64 * 1024;

/// Headers, metrics and the request log line, then the response.
fn finish(service: &Arc<Service>, api: Route, start: Instant, outcome: Outcome) -> HttpResponse {
    let route = api.as_str();
    let Outcome { trace, result } = outcome;
    let total_ms = start.elapsed().as_secs_f64() * 1000.0;
    let mut response = match result {
        Ok(reply) => {
            let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut builder = HttpResponse::build(status);
            builder.insert_header((
                header::CONTENT_TYPE,
                HeaderValue::from_str(&reply.content_type)
                    .unwrap_or(HeaderValue::from_static("application/json")),
            ));
            match reply.body {
                ReplyBody::Full(bytes) => builder.body(bytes),
                ReplyBody::Stream(stream) => {
                    builder.insert_header((header::CACHE_CONTROL, "no-cache"));
                    builder.streaming(stream)
                }
            }
        }
        Err(refusal) => error_response_for(api, &refusal),
    };
    decorate(response.headers_mut(), &trace, total_ms);
    let status = response.status().as_u16();
    record(service, route, status, &trace, total_ms);
    response
}

fn decorate(headers: &mut HeaderMap, trace: &Trace, total_ms: f64) {
    let mut put = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(header::HeaderName::from_static(name), value);
        }
    };
    if let Some(cache) = trace.cache {
        put(X_CACHE, cache.as_str());
    }
    if let Some(layer) = trace.layer {
        put(X_CACHE_LAYER, layer.as_str());
    }
    if let Some(status) = &trace.cache_status {
        put(CACHE_STATUS, status);
    }
    if let Some(age) = trace.age {
        put("age", &age.to_string());
    }
    if let Some(key) = &trace.key {
        put(X_CACHE_KEY, key);
    }
    if let Some(provider) = &trace.provider {
        put(X_UPSTREAM_PROVIDER, provider);
    }
    if let Some(similarity) = trace.similarity {
        put(X_CACHE_SIMILARITY, &format!("{similarity:.4}"));
    }
    if let Some(key) = &trace.semantic_key {
        put(X_CACHE_SEMANTIC_KEY, key);
    }
    let mut timing = ServerTiming::new();
    if let Some(ms) = trace.redis_ms {
        timing.add("redis", ms);
    }
    if let Some(ms) = trace.upstream_ms {
        timing.add("upstream", ms);
    }
    timing.add("total", total_ms);
    put(SERVER_TIMING, &timing.render());
}

/// Counts the request and writes its one log line. Never logs credentials, prompts or answers.
fn record(service: &Service, route: &'static str, status: u16, trace: &Trace, total_ms: f64) {
    let metrics = service.metrics();
    metrics
        .requests
        .with_label_values(&[route, itoa::Buffer::new().format(status)])
        .inc();
    metrics
        .request_duration
        .with_label_values(&[route])
        .observe(total_ms / 1000.0);
    if let (Some(cache), Some(layer)) = (trace.cache, trace.layer) {
        metrics
            .cache_results
            .with_label_values(&[layer.as_str(), cache_label(cache)])
            .inc();
    }
    if let Some(tenant) = &trace.tenant {
        // The origin's answers; the edge's own arrive through the usage ingest.
        let tier = trace
            .layer
            .and_then(|l| Tier::from_layer(l.as_str()))
            .unwrap_or(Tier::Origin);
        let outcome = UsageOutcome::classify(status, trace.cache.map(|c| c.as_str()));
        service
            .meter()
            .answer(tenant, tier, outcome, unix_now(), total_ms);
    }
    tracing::info!(
        target: "gateway_origin::request",
        route,
        status,
        tenant = trace.tenant.as_deref().unwrap_or("-"),
        cache = trace.cache.map_or("-", |c| c.as_str()),
        layer = trace.layer.map_or("-", |l| l.as_str()),
        key = trace.key.as_deref().unwrap_or("-"),
        provider = trace.provider.as_deref().unwrap_or("-"),
        collapsed = trace.collapsed,
        redis_ms = round_ms(trace.redis_ms.unwrap_or(0.0)),
        upstream_ms = round_ms(trace.upstream_ms.unwrap_or(0.0)),
        total_ms = round_ms(total_ms),
        region = service.region(),
        "request"
    );
}

/// The `result` label of `gateway_cache_results_total`: the `x-cache` value in lower case.
fn cache_label(cache: CacheOutcome) -> &'static str {
    match cache {
        CacheOutcome::Hit => "hit",
        CacheOutcome::Miss => "miss",
        CacheOutcome::Stale => "stale",
        CacheOutcome::Bypass => "bypass",
    }
}

/// Milliseconds to two decimals, as in `Server-Timing`.
fn round_ms(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

/// For the non-API routes: headers and log line without cache fields.
fn plain(
    service: &Arc<Service>,
    route: &'static str,
    start: Instant,
    result: Result<HttpResponse, Refusal>,
) -> HttpResponse {
    let mut response = result.unwrap_or_else(|refusal| error_response(&refusal));
    let total_ms = start.elapsed().as_secs_f64() * 1000.0;
    decorate(response.headers_mut(), &Trace::default(), total_ms);
    record(
        service,
        route,
        response.status().as_u16(),
        &Trace::default(),
        total_ms,
    );
    response
}

fn json(body: bytes::Bytes) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body)
}

async fn models(request: HttpRequest, service: web::Data<Service>) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    let headers = request.headers();
    let result = service
        .models(
            header(headers, header::AUTHORIZATION),
            header(headers, names::X_EDGE_SECRET),
        )
        .map(json);
    plain(&service, "models", start, result)
}

async fn delete_key(request: HttpRequest, service: web::Data<Service>) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    let headers = request.headers();
    let key = request.match_info().get("key").unwrap_or("");
    let result = service
        .delete_key(
            header(headers, header::AUTHORIZATION),
            header(headers, names::X_EDGE_SECRET),
            key,
        )
        .await
        .map(json);
    plain(&service, "cache", start, result)
}

async fn purge(request: HttpRequest, service: web::Data<Service>) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    let headers = request.headers();
    let result = service
        .purge(
            header(headers, header::AUTHORIZATION),
            header(headers, names::X_EDGE_SECRET),
        )
        .await
        .map(json);
    plain(&service, "cache", start, result)
}

async fn admin_purge(request: HttpRequest, service: web::Data<Service>) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    let tenant = request.match_info().get("tenant").unwrap_or("");
    let result = service
        .admin_purge_tenant(header(request.headers(), header::AUTHORIZATION), tenant)
        .await
        .map(json);
    plain(&service, "admin", start, result)
}

/// `POST /ingest/edge-usage`: the token first (nothing read without it), then the batch
/// within `usage.max_batch_bytes`.
async fn ingest_usage(
    request: HttpRequest,
    payload: web::Payload,
    service: web::Data<Service>,
) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    let headers = request.headers();
    if let Err(refusal) = service.authorize_ingest(header(headers, header::AUTHORIZATION)) {
        return plain(&service, "ingest", start, Err(refusal));
    }
    let batch = match read_body(headers, payload, service.usage_max_batch_bytes()).await {
        Ok(batch) => batch,
        Err(refusal) => {
            if refusal.error.status == 413 {
                service
                    .metrics()
                    .usage_batches
                    .with_label_values(&["too_large"])
                    .inc();
            }
            return plain(&service, "ingest", start, Err(refusal));
        }
    };
    let (status, report) = match service.ingest_usage(&batch).await {
        Ok(report) => (StatusCode::OK, report),
        Err((_, report)) => (StatusCode::BAD_REQUEST, report),
    };
    let body = serde_json::to_vec(&report).unwrap_or_default();
    let response = HttpResponse::build(status)
        .content_type("application/json")
        .body(body);
    plain(&service, "ingest", start, Ok(response))
}

/// The largest forwarded purge a peer region sends (a key purge is ~150 bytes).
const MAX_PEER_PURGE_BYTES: usize = 4096;

/// `POST /internal/region/purge`: a peer region's purge, applied here (`service/peer_purge.rs`).
async fn peer_purge(
    request: HttpRequest,
    payload: web::Payload,
    service: web::Data<Service>,
) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    let headers = request.headers();
    let result = match read_body(headers, payload, MAX_PEER_PURGE_BYTES).await {
        Ok(body) => service
            .apply_peer_purge(header(headers, header::AUTHORIZATION), &body)
            .await
            .map(json),
        Err(refusal) => Err(refusal),
    };
    plain(&service, "region_purge", start, result)
}

/// The `tenant` query parameter of the dashboard routes.
#[derive(Debug, serde::Deserialize)]
struct DashboardQuery {
    tenant: Option<String>,
}

/// `GET /dashboard`: the admin token as a bearer token or as HTTP Basic credentials (any user
/// name), so an operator's browser can open it; a 401 asks the browser for them.
async fn dashboard(
    request: HttpRequest,
    query: web::Query<DashboardQuery>,
    service: web::Data<Service>,
) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    if let Err(refusal) =
        service.authorize_dashboard(header(request.headers(), header::AUTHORIZATION))
    {
        let mut response = plain(&service, "dashboard", start, Err(refusal));
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"gateway admin\", charset=\"UTF-8\""),
        );
        return response;
    }
    let data = service.dashboard(query.tenant.as_deref()).await;
    let response = HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(crate::dashboard::render(&data, 15));
    plain(&service, "dashboard", start, Ok(response))
}

/// `GET /dashboard.json`: the dashboard's data, for scripts.
async fn dashboard_json(
    request: HttpRequest,
    query: web::Query<DashboardQuery>,
    service: web::Data<Service>,
) -> HttpResponse {
    let start = Instant::now();
    let service = service.into_inner();
    let result = match service.authorize_dashboard(header(request.headers(), header::AUTHORIZATION))
    {
        Ok(()) => {
            let data = service.dashboard(query.tenant.as_deref()).await;
            Ok(HttpResponse::Ok()
                .content_type("application/json")
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .body(serde_json::to_vec(&data).unwrap_or_default()))
        }
        Err(refusal) => Err(refusal),
    };
    plain(&service, "dashboard", start, result)
}

async fn logging_challenge(service: web::Data<Service>) -> HttpResponse {
    match service.logging_challenge() {
        Some(body) => HttpResponse::Ok().content_type("text/plain").body(body),
        None => {
            error_response(&ApiError::not_found("/.well-known/fastly/logging/challenge").into())
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"status":"ok"}"#)
}

async fn readyz(service: web::Data<Service>) -> HttpResponse {
    match service.readiness().await {
        Ok(()) => HttpResponse::Ok()
            .content_type("application/json")
            .body(r#"{"status":"ready"}"#),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .content_type("application/json")
            .body(serde_json::json!({"status": "not ready", "reason": reason}).to_string()),
    }
}

async fn metrics(request: HttpRequest, service: web::Data<Service>) -> HttpResponse {
    match service.metrics_page(header(request.headers(), header::AUTHORIZATION)) {
        Ok(page) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(page),
        Err(refusal) => error_response(&refusal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_length_reserves_at_most_64_kib_before_the_body_arrives() {
        assert_eq!(initial_capacity(Some(4 * 1024 * 1024)), 64 * 1024);
        assert_eq!(initial_capacity(Some(100)), 100);
        assert_eq!(initial_capacity(None), 8 * 1024);
    }
}
