//! The header names the edge reads and writes, as `HeaderName`s made at compile time. A name
//! passed as `&str` is parsed (and, unless it is a standard header, allocated) on every call:
//! the hit path reads and writes about a dozen, so that parse cost every request ~5% of the
//! guest's work. The spellings stay `common::headers`', shared with the origin.

use fastly::http::HeaderName;
use gateway_common::headers;
use gateway_common::traceparent;

pub use fastly::http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, PRAGMA, RETRY_AFTER,
};

pub const X_CACHE: HeaderName = HeaderName::from_static(headers::X_CACHE);
pub const X_CACHE_LAYER: HeaderName = HeaderName::from_static(headers::X_CACHE_LAYER);
pub const CACHE_STATUS: HeaderName = HeaderName::from_static(headers::CACHE_STATUS);
pub const X_CACHE_KEY: HeaderName = HeaderName::from_static(headers::X_CACHE_KEY);
pub const SERVER_TIMING: HeaderName = HeaderName::from_static(headers::SERVER_TIMING);
pub const X_UPSTREAM_PROVIDER: HeaderName = HeaderName::from_static(headers::X_UPSTREAM_PROVIDER);
pub const X_UPSTREAM_REGION: HeaderName = HeaderName::from_static(headers::X_UPSTREAM_REGION);
pub const X_UPSTREAM_TRIED: HeaderName = HeaderName::from_static(headers::X_UPSTREAM_TRIED);
pub const X_EDGE_MISS: HeaderName = HeaderName::from_static(headers::X_EDGE_MISS);
pub const X_EDGE_SECRET: HeaderName = HeaderName::from_static(headers::X_EDGE_SECRET);
pub const TRACEPARENT: HeaderName = HeaderName::from_static(traceparent::TRACEPARENT);
/// How the Anthropic SDKs send the API key.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
