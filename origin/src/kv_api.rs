//! The Fastly KV Store REST API client: batch upsert (NDJSON), single-key upsert, list by prefix
//! and delete, each one request with the `Fastly-Key` token. It neither retries nor paces:
//! the replicator owns backoff and the request budget, from what this client reports.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::settings::Secret;

/// The largest value Fastly's KV Store accepts by default (25 MB); larger entries are not sent.
pub const MAX_VALUE_BYTES: usize = 25 * 1000 * 1000;

/// Keys per page when listing (the API's maximum).
pub const LIST_PAGE_LIMIT: usize = 1000;

/// The account-level API rate limit as the last response stated it (`Fastly-RateLimit-*`).
/// Either field is `None` when the header was absent or unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests left in the current window.
    pub remaining: Option<u64>,
    /// When the window resets, in unix seconds.
    pub reset_unix: Option<u64>,
}

/// What a successful request answered: its status and the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub status: u16,
    pub rate_limit: RateLimit,
}

/// The requests the replicator makes, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Batch,
    Put,
    List,
    Delete,
    /// A bulk upsert of Config Store items (`config_api.rs`).
    Config,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Batch => "batch",
            RequestKind::Put => "put",
            RequestKind::List => "list",
            RequestKind::Delete => "delete",
            RequestKind::Config => "config",
        }
    }
}

/// One item to write: the KV key, value and metadata from `Entry::encode_kv`, and its TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub value: Vec<u8>,
    pub metadata: String,
    /// `time_to_live_sec`; at least 1 (the API refuses 0).
    pub ttl_secs: u64,
}

impl Item {
    /// An upper bound on this item's NDJSON line in bytes, without encoding it (for sizing
    /// batches before the TTL is final).
    pub fn line_len_bound(&self) -> usize {
        // `{"key":"","value":"","metadata":"","time_to_live_sec":}\n` plus 20 digits, with room.
        const OVERHEAD: usize = 96;
        // Keys are [a-z0-9_/-] (common's rendering), so JSON-escaping leaves them unchanged;
        // metadata is JSON, so every quote or backslash in it doubles at most.
        OVERHEAD + self.key.len() + self.value.len().div_ceil(3) * 4 + self.metadata.len() * 2
    }
}

/// One line of the batch body, in the field names go-fastly and the Fastly CLI send.
#[derive(Serialize)]
struct Line<'a> {
    key: &'a str,
    /// Standard base64, padded.
    value: String,
    metadata: &'a str,
    time_to_live_sec: u64,
}

/// The NDJSON body of `PUT /resources/stores/kv/{store_id}/batch`: one JSON object per line,
/// each ending in `\n`, values base64-encoded.
pub fn encode_batch<'a>(items: impl IntoIterator<Item = &'a Item> + Clone) -> Vec<u8> {
    let mut body = Vec::with_capacity(items.clone().into_iter().map(Item::line_len_bound).sum());
    for item in items {
        let line = Line {
            key: &item.key,
            value: base64::engine::general_purpose::STANDARD.encode(&item.value),
            metadata: &item.metadata,
            time_to_live_sec: item.ttl_secs.max(1),
        };
        // Serializing a struct of strings and an integer into a Vec cannot fail.
        if serde_json::to_writer(&mut body, &line).is_ok() {
            body.push(b'\n');
        }
    }
    body
}

/// Why one API request failed. The replicator decides from [`KvApiError::is_retryable`] and
/// the rate-limit fields what to do next; nothing here carries the token.
#[derive(Debug, thiserror::Error)]
pub enum KvApiError {
    /// The API answered with a non-success status.
    #[error("the Fastly API answered {status}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Status {
        status: u16,
        /// `Retry-After`, in seconds or as an HTTP date, relative to now.
        retry_after: Option<Duration>,
        rate_limit: RateLimit,
        /// Fastly's `msg`/`detail`, shortened; never contains request data we sent.
        detail: Option<String>,
    },
    /// No answer within the request timeout.
    #[error("the Fastly API did not answer in time")]
    Timeout,
    /// The connection could not be made, or broke (reset) before the answer.
    #[error("the Fastly API connection failed: {0}")]
    Connection(String),
    /// A success status with a body this client does not understand.
    #[error("the Fastly API's answer was not understood: {0}")]
    Malformed(String),
}

impl KvApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            KvApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth trying again later: 429, 408, 5xx, timeouts and broken connections.
    pub fn is_retryable(&self) -> bool {
        match self {
            KvApiError::Status { status, .. } => {
                *status == 429 || *status == 408 || (500..=599).contains(status)
            }
            KvApiError::Timeout | KvApiError::Connection(_) => true,
            KvApiError::Malformed(_) => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            KvApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn rate_limit(&self) -> RateLimit {
        match self {
            KvApiError::Status { rate_limit, .. } => *rate_limit,
            _ => RateLimit::default(),
        }
    }

    /// The `status` label of the API request metric: the HTTP status, or what went wrong.
    pub fn label(&self) -> String {
        match self {
            KvApiError::Status { status, .. } => status.to_string(),
            KvApiError::Timeout => "timeout".into(),
            KvApiError::Connection(_) => "connection".into(),
            KvApiError::Malformed(_) => "malformed".into(),
        }
    }
}

/// Why the client could not be built (a settings problem, named by key).
#[derive(Debug, thiserror::Error)]
pub enum KvApiSetupError {
    #[error("replication.api_base_url: {0}")]
    BaseUrl(String),
    #[error("replication.api_token_env: the token is not a valid header value")]
    Token,
    #[error("replication: HTTP client: {0}")]
    Client(String),
}

/// One page of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub keys: Vec<String>,
    /// Pass back to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct ListBody {
    data: Vec<String>,
    #[serde(default)]
    meta: Option<ListMeta>,
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(default)]
    next_cursor: Option<String>,
}

/// A client for one KV store. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct KvApi {
    http: reqwest::Client,
    /// `{base}/resources/stores/kv/{store_id}`
    store_url: Url,
    token: HeaderValue,
}

impl std::fmt::Debug for KvApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvApi")
            .field("store_url", &self.store_url.as_str())
            .field("token", &"[redacted]")
            .finish()
    }
}

impl KvApi {
    /// `base_url` replaces `https://api.fastly.com` (a fake in tests); each request gives up
    /// after `timeout`.
    pub fn new(
        base_url: &str,
        store_id: &str,
        token: &Secret,
        timeout: Duration,
    ) -> Result<KvApi, KvApiSetupError> {
        let (http, store_url, token) = api_client(
            base_url,
            &["resources", "stores", "kv", store_id],
            token,
            timeout,
        )?;
        Ok(KvApi {
            http,
            store_url,
            token,
        })
    }

    /// `PUT /resources/stores/kv/{store_id}/batch` with an NDJSON body from [`encode_batch`].
    /// The API does not say which lines failed: a refusal is for the whole batch.
    pub async fn put_batch(&self, body: Bytes) -> Result<Answered, KvApiError> {
        let url = self.url(&["batch"]);
        let request = self
            .request(Method::PUT, url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let (_, answered) = send(request).await?;
        Ok(answered)
    }

    /// `PUT /resources/stores/kv/{store_id}/keys/{key}`: the raw value as the body, metadata and
    /// TTL in headers.
    pub async fn put_key(&self, item: &Item) -> Result<Answered, KvApiError> {
        let url = self.url(&["keys", &item.key]);
        let mut request = self
            .request(Method::PUT, url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header("time_to_live_sec", item.ttl_secs.max(1))
            .body(item.value.clone());
        // Metadata from `Entry::encode_kv` is one line of JSON; an invalid header value would
        // only come from a broken encoder, and the item is then written without it rather
        // than not at all (the edge treats an entry without metadata as a miss).
        if let Ok(metadata) = HeaderValue::from_str(&item.metadata) {
            request = request.header("metadata", metadata);
        }
        let (_, answered) = send(request).await?;
        Ok(answered)
    }

    /// `GET /resources/stores/kv/{store_id}/keys?prefix=&cursor=&limit=`, strongly consistent
    /// (a purge must see the keys just written).
    pub async fn list(
        &self,
        prefix: &str,
        cursor: Option<&str>,
    ) -> Result<(Page, Answered), KvApiError> {
        let mut url = self.url(&["keys"]);
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("prefix", prefix)
                .append_pair("limit", &LIST_PAGE_LIMIT.to_string())
                .append_pair("consistency", "strong");
            if let Some(cursor) = cursor {
                query.append_pair("cursor", cursor);
            }
        }
        let (body, answered) = send(self.request(Method::GET, url)).await?;
        let parsed: ListBody =
            serde_json::from_slice(&body).map_err(|e| KvApiError::Malformed(e.to_string()))?;
        let next_cursor = parsed
            .meta
            .and_then(|m| m.next_cursor)
            .filter(|c| !c.is_empty());
        Ok((
            Page {
                keys: parsed.data,
                next_cursor,
            },
            answered,
        ))
    }

    /// `DELETE /resources/stores/kv/{store_id}/keys/{key}?force=true`: succeeds whether or not
    /// the key existed.
    pub async fn delete(&self, key: &str) -> Result<Answered, KvApiError> {
        let mut url = self.url(&["keys", key]);
        url.query_pairs_mut().append_pair("force", "true");
        match send(self.request(Method::DELETE, url)).await {
            Ok((_, answered)) => Ok(answered),
            // `force` should make a missing key a success; tolerate servers that still 404.
            Err(KvApiError::Status {
                status: 404,
                rate_limit,
                ..
            }) => Ok(Answered {
                status: 404,
                rate_limit,
            }),
            Err(e) => Err(e),
        }
    }

    /// The store URL plus `segments`, each percent-encoded as one segment (a KV key's `/`
    /// becomes `%2F`, as go-fastly sends it).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.store_url.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .header("fastly-key", self.token.clone())
            .header(reqwest::header::ACCEPT, "application/json")
    }
}

/// What every Fastly API client here needs: an HTTP client whose requests give up after
/// `timeout`, the URL of `base_url` plus `segments`, and the token as a sensitive header value.
pub(crate) fn api_client(
    base_url: &str,
    segments: &[&str],
    token: &Secret,
    timeout: Duration,
) -> Result<(reqwest::Client, Url, HeaderValue), KvApiSetupError> {
    let mut url = Url::parse(base_url).map_err(|e| KvApiSetupError::BaseUrl(e.to_string()))?;
    url.path_segments_mut()
        .map_err(|()| KvApiSetupError::BaseUrl("cannot be a base URL".into()))?
        .pop_if_empty()
        .extend(segments);
    let mut token = HeaderValue::from_str(token.expose()).map_err(|_| KvApiSetupError::Token)?;
    token.set_sensitive(true);
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| KvApiSetupError::Client(e.to_string()))?;
    Ok((http, url, token))
}

/// Sends one request; any non-2xx is an error carrying the status and rate-limit headers.
pub(crate) async fn send(
    request: reqwest::RequestBuilder,
) -> Result<(Bytes, Answered), KvApiError> {
    let response = request.send().await.map_err(transport_error)?;
    let status = response.status();
    let rate_limit = rate_limit(response.headers());
    let retry_after = retry_after(response.headers(), SystemTime::now());
    let body = response.bytes().await.map_err(transport_error)?;
    if status.is_success() {
        return Ok((
            body,
            Answered {
                status: status.as_u16(),
                rate_limit,
            },
        ));
    }
    Err(KvApiError::Status {
        status: status.as_u16(),
        retry_after,
        rate_limit,
        detail: error_detail(status, &body),
    })
}

fn transport_error(error: reqwest::Error) -> KvApiError {
    if error.is_timeout() {
        return KvApiError::Timeout;
    }
    // The URL holds the store id and a cache key, never the token; it is dropped anyway to
    // keep log lines short.
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    KvApiError::Connection(message)
}

/// Fastly's `{"msg", "detail"}` error body, shortened for a log line.
fn error_detail(status: StatusCode, body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        msg: Option<String>,
        detail: Option<String>,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let text = match (parsed.msg, parsed.detail) {
        (Some(msg), Some(detail)) => format!("{msg}: {detail}"),
        (Some(one), None) | (None, Some(one)) => one,
        (None, None) => return status.canonical_reason().map(str::to_string),
    };
    Some(text.chars().take(200).collect())
}

/// `Fastly-RateLimit-Remaining` and `Fastly-RateLimit-Reset` (unix seconds).
pub fn rate_limit(headers: &HeaderMap) -> RateLimit {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    RateLimit {
        remaining: number("fastly-ratelimit-remaining"),
        reset_unix: number("fastly-ratelimit-reset"),
    }
}

/// `Retry-After` as delay-seconds or an IMF-fixdate (RFC 9110 10.2.3), relative to `now`;
/// a date in the past is zero, an unreadable value `None`.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = parse_imf_fixdate(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` → unix seconds. The obsolete date forms are not accepted
/// (RFC 9110 requires senders to use this one).
fn parse_imf_fixdate(value: &str) -> Option<u64> {
    let rest = value.get(5..)?; // "Sun, "
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut clock = parts.next()?.split(':');
    let hour: u64 = clock.next()?.parse().ok()?;
    let minute: u64 = clock.next()?.parse().ok()?;
    let second: u64 = clock.next()?.parse().ok()?;
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), proleptic Gregorian.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let days = u64::try_from(days).ok()?;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second.min(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, value: &[u8], metadata: &str, ttl: u64) -> Item {
        Item {
            key: key.into(),
            value: value.to_vec(),
            metadata: metadata.into(),
            ttl_secs: ttl,
        }
    }

    #[test]
    fn a_batch_is_one_json_object_per_line_with_base64_values() {
        let items = [
            item(
                "v1/acme/aa",
                b"{\"id\":1}",
                r#"{"v":1,"tenant":"acme"}"#,
                90,
            ),
            item("v1/acme/bb", &[0, 255, 10], "{}", 0),
        ];
        let body = encode_batch(&items);
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["key"], "v1/acme/aa");
        assert_eq!(first["metadata"], r#"{"v":1,"tenant":"acme"}"#);
        assert_eq!(first["time_to_live_sec"], 90);
        let value = base64::engine::general_purpose::STANDARD
            .decode(first["value"].as_str().unwrap())
            .unwrap();
        assert_eq!(value, b"{\"id\":1}");
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["value"], "AP8K");
        // The API refuses a TTL of 0; the encoder never sends one.
        assert_eq!(second["time_to_live_sec"], 1);
        for (line, item) in text.lines().zip(&items) {
            assert!(line.len() < item.line_len_bound(), "{line}");
        }
    }

    #[test]
    fn the_line_bound_holds_for_metadata_full_of_quotes() {
        let metadata = "\"".repeat(500);
        let it = item("v1/t/k", &[7; 1000], &metadata, 3600);
        assert!(encode_batch(std::slice::from_ref(&it)).len() <= it.line_len_bound());
    }

    #[test]
    fn rate_limit_headers_are_read_and_missing_ones_are_none() {
        let mut headers = HeaderMap::new();
        headers.insert("fastly-ratelimit-remaining", HeaderValue::from_static("12"));
        headers.insert(
            "fastly-ratelimit-reset",
            HeaderValue::from_static("1700000000"),
        );
        assert_eq!(
            rate_limit(&headers),
            RateLimit {
                remaining: Some(12),
                reset_unix: Some(1_700_000_000)
            }
        );
        assert_eq!(rate_limit(&HeaderMap::new()), RateLimit::default());
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:50:07 GMT"),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(30)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:00:00 GMT"),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers, now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn imf_fixdates_convert_to_unix_seconds() {
        assert_eq!(parse_imf_fixdate("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_imf_fixdate("Tue, 29 Feb 2028 12:00:01 GMT"),
            Some(1_835_438_401)
        );
        assert_eq!(parse_imf_fixdate("Tue, 29 Foo 2028 12:00:01 GMT"), None);
        assert_eq!(parse_imf_fixdate("Tue, 29 Feb 2028 12:00:01 UTC"), None);
    }

    #[test]
    fn keys_are_one_percent_encoded_path_segment() {
        let api = KvApi::new(
            "http://127.0.0.1:1/",
            "store-1",
            &Secret::new("tok"),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            api.url(&["keys", "v1/acme/ab12"]).as_str(),
            "http://127.0.0.1:1/resources/stores/kv/store-1/keys/v1%2Facme%2Fab12"
        );
        assert_eq!(
            api.url(&["batch"]).as_str(),
            "http://127.0.0.1:1/resources/stores/kv/store-1/batch"
        );
        assert!(!format!("{api:?}").contains("tok\""));
    }

    #[test]
    fn only_rate_limits_server_errors_timeouts_and_broken_connections_are_retried() {
        let status = |status| KvApiError::Status {
            status,
            retry_after: None,
            rate_limit: RateLimit::default(),
            detail: None,
        };
        for retryable in [429, 408, 500, 503] {
            assert!(status(retryable).is_retryable(), "{retryable}");
        }
        for final_ in [400, 401, 403, 404, 405, 413, 415] {
            assert!(!status(final_).is_retryable(), "{final_}");
        }
        assert!(KvApiError::Timeout.is_retryable());
        assert!(KvApiError::Connection("reset".into()).is_retryable());
        assert_eq!(status(503).label(), "503");
        assert_eq!(KvApiError::Timeout.label(), "timeout");
    }
}
