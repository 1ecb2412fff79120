//! The only file that talks to the origin backends: forwards a request with pass, explicit
//! timeouts and the edge's headers to each region in turn until one answers, and classifies
//! what went wrong. Which region comes next is `region.rs`'s decision.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use fastly::backend::{Backend, BackendCreationError};
use fastly::experimental::{BackendExt, BackendHealth};
use fastly::http::HeaderValue;
use fastly::http::request::SendErrorCause;
use fastly::{Request, Response};
use gateway_common::traceparent::TraceContext;

use crate::names::{TRACEPARENT, X_EDGE_MISS, X_EDGE_SECRET};
use crate::region::{self, Attempt, Health, Region};
use crate::settings::EdgeSettings;
use crate::trace::edge_log;

/// How a forward failed before an answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginFailure {
    /// Could not connect (refused, DNS error, unreachable): 503.
    Unreachable,
    /// No answer in time: the connect (or the DNS lookup) timed out, or the answer's first
    /// byte did not come: 504.
    Timeout,
    /// Anything else the backend did wrong: 502.
    Broken,
}

impl OriginFailure {
    /// For `x-upstream-tried` and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginFailure::Unreachable => "unreachable",
            OriginFailure::Timeout => "timeout",
            OriginFailure::Broken => "broken",
        }
    }
}

/// What the edge tells the origin about this request.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    /// The edge looked for a cacheable entry and had none: the origin should replicate its
    /// answer to the KV store.
    pub edge_miss: bool,
    /// The trace the origin joins, as a child of the edge's span (`trace::EdgeSpan`).
    pub trace: TraceContext,
}

/// The outcome of a forward over the regions.
pub struct Routed {
    /// The answer to pass on (a 5xx only when it came from the last region tried), or how
    /// the last region failed.
    pub result: Result<Response, OriginFailure>,
    /// The region whose answer `result` is; `None` when no region answered.
    pub region: Option<String>,
    /// Every region tried, in order, with how it ended.
    pub tried: Vec<(String, Attempt)>,
}

impl Routed {
    /// `x-upstream-region`: the region that answered, or `none`.
    pub fn region_header(&self) -> &str {
        self.region.as_deref().unwrap_or("none")
    }
}

/// Send `req` (already carrying its body, in memory) to the origin regions of this POP in
/// order, moving on to the next on no answer or a 5xx; what the client gets is only decided
/// once a region's status is known, so a failover is never visible to it. Client-supplied
/// copies of the edge's own headers are removed first, so a client cannot claim to be the
/// edge.
pub fn send(mut req: Request, settings: &EdgeSettings, forward: Forward) -> Routed {
    req.remove_header(&X_EDGE_MISS);
    req.remove_header(&X_EDGE_SECRET);
    // Replaces the client's, whose parent is the client's span, not the edge's.
    req.set_header(&TRACEPARENT, forward.trace.to_string());
    if forward.edge_miss {
        req.set_header(&X_EDGE_MISS, "1");
    }
    if let Some(secret) = &settings.fallback().edge_shared_secret {
        match HeaderValue::from_bytes(secret) {
            Ok(value) => req.set_header(&X_EDGE_SECRET, value),
            // Never log the secret itself; the origin will refuse the request.
            Err(_) => edge_log!("edge_shared_secret is not a valid header value; not sent"),
        }
    }
    let regions = region::arrange(settings.fallback().regions.clone(), health);
    let mut tried = Vec::with_capacity(regions.len());
    let mut last_failure = OriginFailure::Unreachable;
    let mut pending = Some(req);
    for (index, region) in regions.iter().enumerate() {
        let more = index + 1 < regions.len();
        let attempt = match pending.as_mut() {
            // The body is in memory: a copy per attempt but the last, which takes the original.
            Some(req) if more => req.clone_with_body(),
            Some(_) => match pending.take() {
                Some(req) => req,
                None => break,
            },
            None => break,
        };
        let Some(backend) = backend(&region.backend, settings) else {
            tried.push((region.name.clone(), Attempt::Undeclared));
            continue;
        };
        match send_to(attempt, &backend, &region.name, settings) {
            Ok(resp) => {
                let status = Attempt::Answered(resp.get_status().as_u16());
                tried.push((region.name.clone(), status));
                if more && region::fail_over(status) {
                    edge_log!(
                        "region {} answered {}; trying the next region",
                        region.name,
                        status.describe()
                    );
                    last_failure = OriginFailure::Broken;
                    continue;
                }
                return Routed {
                    result: Ok(resp),
                    region: Some(region.name.clone()),
                    tried,
                };
            }
            Err(failure) => {
                tried.push((region.name.clone(), Attempt::Failed(failure.as_str())));
                last_failure = failure;
            }
        }
    }
    Routed {
        result: Err(last_failure),
        region: None,
        tried,
    }
}

fn send_to(
    req: Request,
    backend: &Backend,
    region: &str,
    settings: &EdgeSettings,
) -> Result<Response, OriginFailure> {
    let started = Instant::now();
    req.with_pass(true).send(backend).map_err(|e| {
        let waited = started.elapsed() >= settings.fallback().origin_connect_timeout;
        let failure = classify(e.root_cause(), waited);
        edge_log!(
            "origin region {region} failed ({:?}: {})",
            failure,
            e.root_cause()
        );
        failure
    })
}

/// What the region's health check says. Under Viceroy, and for a backend without a health
/// check, always `Unknown`.
fn health(region: &Region) -> Health {
    let Ok(backend) = Backend::from_name(&region.backend) else {
        return Health::Unknown;
    };
    match backend.is_healthy() {
        Ok(BackendHealth::Healthy) => Health::Healthy,
        Ok(BackendHealth::Unhealthy) => Health::Unhealthy,
        _ => Health::Unknown,
    }
}

/// `waited`: the send failed no sooner than the connect timeout. A failure the host does not
/// explain (Viceroy 0.22 never does: its `send_v2` ignores the detail argument) is a timeout
/// when it took that long, since a refused or unroutable connect fails at once.
fn classify(cause: &SendErrorCause, waited: bool) -> OriginFailure {
    match cause {
        // A connect or DNS lookup that ran out of time is an origin that did not answer in
        // time (504), not one that said no (503).
        SendErrorCause::HttpResponseTimeout
        | SendErrorCause::ConnectionTimeout
        | SendErrorCause::DnsTimeout => OriginFailure::Timeout,
        // The origin answered, but not with a usable HTTP response.
        SendErrorCause::HttpIncompleteResponse
        | SendErrorCause::HttpResponseHeaderSectionTooLarge
        | SendErrorCause::HttpResponseBodyTooLarge
        | SendErrorCause::HttpResponseStatusInvalid
        | SendErrorCause::HttpProtocolError
        | SendErrorCause::Http2StreamError { .. } => OriginFailure::Broken,
        SendErrorCause::InternalError(_) if waited => OriginFailure::Timeout,
        // Refused, DNS error, unreachable, TLS, and a host error with no detail that came at
        // once: no answer came back.
        _ => OriginFailure::Unreachable,
    }
}

thread_local! {
    /// Each region's timed backend, made once per instance (`None`: not declared).
    static BACKENDS: RefCell<HashMap<String, Option<Backend>>> = RefCell::new(HashMap::new());
}

/// The region's static backend (`[local_server.backends]` / `[setup.backends]`) with the
/// timeouts from settings made explicit: a dynamic backend to the same host. Static backends
/// take their timeouts from the service's configuration (default first-byte timeout 15 s,
/// shorter than a long completion), so we do not rely on them. Where dynamic backends are not
/// allowed, the static backend is used (logged). `None` when the region's backend is not
/// declared.
fn backend(name: &str, settings: &EdgeSettings) -> Option<Backend> {
    BACKENDS.with(|made| {
        made.borrow_mut()
            .entry(name.to_owned())
            .or_insert_with(|| timed_backend(name, settings))
            .clone()
    })
}

fn timed_backend(name: &str, settings: &EdgeSettings) -> Option<Backend> {
    let Ok(base) = Backend::from_name(name) else {
        edge_log!("backend {name} is not declared");
        return None;
    };
    let timed = format!("{name}-timed");
    let mut builder = Backend::builder(&timed, format!("{}:{}", base.get_host(), base.get_port()))
        .connect_timeout(settings.fallback().origin_connect_timeout)
        .first_byte_timeout(settings.fallback().origin_first_byte_timeout)
        .between_bytes_timeout(settings.fallback().origin_between_bytes_timeout);
    if let Some(host) = base
        .get_host_override()
        .and_then(|h| h.to_str().ok().map(str::to_owned))
    {
        builder = builder.override_host(host);
    }
    if base.is_ssl() {
        let host = base.get_host();
        builder = builder
            .enable_ssl()
            .sni_hostname(&host)
            .check_certificate(&host);
    }
    match builder.finish() {
        Ok(timed) => Some(timed),
        Err(BackendCreationError::NameInUse) => Some(Backend::from_name(&timed).unwrap_or(base)),
        Err(e) => {
            edge_log!(
                "dynamic backend unavailable ({e}); using {name} with its configured timeouts"
            );
            Some(base)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_or_dns_timeout_is_a_timeout_not_an_unreachable_origin() {
        for waited in [false, true] {
            for cause in [
                SendErrorCause::ConnectionTimeout,
                SendErrorCause::DnsTimeout,
                SendErrorCause::HttpResponseTimeout,
            ] {
                assert_eq!(
                    classify(&cause, waited),
                    OriginFailure::Timeout,
                    "{cause:?}"
                );
            }
        }
    }

    #[test]
    fn an_unexplained_failure_after_the_connect_timeout_is_a_timeout() {
        assert_eq!(
            classify(&SendErrorCause::InternalError(None), true),
            OriginFailure::Timeout
        );
        assert_eq!(
            classify(&SendErrorCause::ConnectionRefused, true),
            OriginFailure::Unreachable,
            "a refusal says what it is, however long it took"
        );
    }

    #[test]
    fn a_refused_or_undetailed_failure_is_an_unreachable_origin() {
        for cause in [
            SendErrorCause::ConnectionRefused,
            SendErrorCause::DnsError {
                rcode: Some(3),
                info_code: None,
            },
            SendErrorCause::DestinationIpUnroutable,
            SendErrorCause::TlsCertificateError,
            SendErrorCause::InternalError(None),
        ] {
            assert_eq!(
                classify(&cause, false),
                OriginFailure::Unreachable,
                "{cause:?}"
            );
        }
    }

    #[test]
    fn an_unusable_answer_is_a_broken_origin() {
        assert_eq!(
            classify(&SendErrorCause::HttpIncompleteResponse, false),
            OriginFailure::Broken
        );
        assert_eq!(
            classify(&SendErrorCause::HttpProtocolError, true),
            OriginFailure::Broken
        );
    }
}
