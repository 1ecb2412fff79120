//! Building the edge's own responses: cache hits (JSON or replayed SSE), stale answers and
//! errors in the shape of the route's API (OpenAI's, Anthropic's on `/v1/messages`). Pure construction; nothing here reads a store or the network.

use fastly::Response;
use fastly::http::{HeaderValue, StatusCode};
use gateway_common::echo::{self, Echo};
use gateway_common::entry::Entry;
use gateway_common::error::ApiError;
use gateway_common::headers::{CacheOutcome, CacheStatusMember, Layer, ServerTiming};
use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_common::sse;

use crate::names::{
    AGE, CACHE_CONTROL, CACHE_STATUS, CONTENT_TYPE, RETRY_AFTER, SERVER_TIMING, X_CACHE,
    X_CACHE_KEY, X_CACHE_LAYER, X_UPSTREAM_PROVIDER,
};

/// The name this tier uses in `Cache-Status` (RFC 9211).
pub const CACHE_NAME: &str = "gateway-edge";

/// An error body with its status, in the shape of `route`'s API (OpenAI's when `None`).
pub fn error(route: Option<Route>, err: &ApiError) -> Response {
    let body = match route {
        Some(route) => err.to_json_for(route),
        None => err.to_json(),
    };
    Response::from_status(
        StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    )
    .with_header(CONTENT_TYPE, "application/json")
    .with_body(body)
}

/// An error with `Retry-After` (seconds), for a 429.
pub fn error_retry_after(route: Option<Route>, err: &ApiError, retry_after_secs: u64) -> Response {
    error(route, err).with_header(RETRY_AFTER, retry_after_secs.to_string())
}

/// How a cached entry is to be presented. Owns the entry so the body moves into the
/// response instead of being copied.
pub struct Served<'a> {
    pub entry: Entry,
    pub route: Route,
    pub key: &'a CacheKey,
    pub outcome: CacheOutcome,
    pub age: u64,
    /// Seconds of freshness left; negative when serving stale.
    pub ttl_remaining: i64,
    /// Replay as Server-Sent Events (the request had `stream: true`).
    pub stream: bool,
    pub include_usage: bool,
    /// The asking request's values for the members the answer echoes outside the key.
    pub echo: Option<&'a Echo>,
}

/// A response from a cached entry, or `None` when the entry cannot answer this request
/// (a `stream: true` request against an entry its route cannot replay): a miss.
pub fn from_entry(served: Served<'_>, timing: &ServerTiming) -> Option<Response> {
    let Entry {
        envelope: env,
        body,
    } = served.entry;
    // Before the replay too, so `response.created` / `response.completed` show them.
    let body = echo::restore(served.echo, body);
    let (content_type, body) = if served.stream {
        (
            "text/event-stream",
            sse::replay(served.route, &body, served.include_usage).ok()?,
        )
    } else {
        (env.content_type.as_str(), body)
    };
    let member = match served.outcome {
        CacheOutcome::Stale => CacheStatusMember::stale(CACHE_NAME, served.ttl_remaining),
        _ => CacheStatusMember::hit(CACHE_NAME, served.ttl_remaining.max(0) as u64),
    };
    let mut resp =
        Response::from_status(StatusCode::from_u16(env.status).unwrap_or(StatusCode::OK))
            .with_header(X_CACHE, served.outcome.as_str())
            .with_header(X_CACHE_LAYER, Layer::Edge.as_str())
            .with_header(CACHE_STATUS, member.render())
            .with_header(AGE, served.age.to_string())
            .with_header(X_CACHE_KEY, served.key.hex())
            .with_header(SERVER_TIMING, timing.render())
            .with_body(body);
    // Both come from the stored envelope: set them only if they are valid header values (a
    // conversion from an invalid &str would panic).
    let content_type = HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/json"));
    resp.set_header(CONTENT_TYPE, content_type);
    if let Ok(provider) = HeaderValue::from_str(&env.provider)
        && !env.provider.is_empty()
    {
        resp.set_header(X_UPSTREAM_PROVIDER, provider);
    }
    if served.stream {
        resp.set_header(CACHE_CONTROL, "no-cache");
    }
    Some(resp)
}

// Building a response uses host calls: only the wasm build (`just test-wasm`) links these.
#[cfg(all(test, target_arch = "wasm32"))]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_refusal_is_a_429_with_retry_after_and_an_openai_body() {
        let err = ApiError::rate_limited("Rate limit reached for requests per second.");
        let mut resp = error_retry_after(None, &err, 60);
        assert_eq!(resp.get_status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            resp.get_header_str("retry-after"),
            Some("60"),
            "Retry-After in seconds"
        );
        assert_eq!(
            resp.get_header_str("content-type"),
            Some("application/json")
        );
        let body: serde_json::Value = serde_json::from_slice(&resp.take_body_bytes()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    }
}
