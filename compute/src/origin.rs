//! The only file that talks to the origin backend: forwards a request with pass, explicit
//! timeouts and the edge's headers, and classifies what went wrong.

use std::sync::OnceLock;
use std::time::Instant;

use fastly::backend::{Backend, BackendCreationError};
use fastly::http::HeaderValue;
use fastly::http::request::SendErrorCause;
use fastly::{Request, Response};
use gateway_common::headers::{X_EDGE_MISS, X_EDGE_SECRET};

use crate::settings::EdgeSettings;

/// The static backend the service declares (`[local_server.backends]` / `[setup.backends]`).
pub const BACKEND: &str = "origin";

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

/// What the edge tells the origin about this request.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    /// The edge looked for a cacheable entry and had none: the origin should replicate its
    /// answer to the KV store.
    pub edge_miss: bool,
}

/// Send `req` (already carrying its body) to the origin. Client-supplied copies of the
/// edge's own headers are removed first, so a client cannot claim to be the edge.
pub fn send(
    mut req: Request,
    settings: &EdgeSettings,
    forward: Forward,
) -> Result<Response, OriginFailure> {
    req.remove_header(X_EDGE_MISS);
    req.remove_header(X_EDGE_SECRET);
    if forward.edge_miss {
        req.set_header(X_EDGE_MISS, "1");
    }
    if let Some(secret) = &settings.fallback().edge_shared_secret {
        match HeaderValue::from_bytes(secret) {
            Ok(value) => req.set_header(X_EDGE_SECRET, value),
            // Never log the secret itself; the origin will refuse the request.
            Err(_) => eprintln!("edge: edge_shared_secret is not a valid header value; not sent"),
        }
    }
    let started = Instant::now();
    let result = match backend(settings) {
        Some(timed) => req.with_pass(true).send(timed),
        None => req.with_pass(true).send(BACKEND),
    };
    result.map_err(|e| {
        let waited = started.elapsed() >= settings.fallback().origin_connect_timeout;
        let failure = classify(e.root_cause(), waited);
        eprintln!(
            "edge: origin request failed ({:?}: {})",
            failure,
            e.root_cause()
        );
        failure
    })
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

/// The static `origin` backend with the timeouts from settings made explicit: a dynamic
/// backend to the same host. Static backends take their timeouts from the service's
/// configuration (default first-byte timeout 15 s, shorter than a long completion), so we do
/// not rely on them. Where dynamic backends are not allowed, the static backend is used and
/// this is logged once per instance.
fn backend(settings: &EdgeSettings) -> Option<Backend> {
    static CHOSEN: OnceLock<Option<Backend>> = OnceLock::new();
    CHOSEN.get_or_init(|| timed_backend(settings)).clone()
}

fn timed_backend(settings: &EdgeSettings) -> Option<Backend> {
    let Ok(base) = Backend::from_name(BACKEND) else {
        eprintln!("edge: backend {BACKEND} is not declared");
        return None;
    };
    let mut builder = Backend::builder(
        "origin-timed",
        format!("{}:{}", base.get_host(), base.get_port()),
    )
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
        Err(BackendCreationError::NameInUse) => {
            Some(Backend::from_name("origin-timed").unwrap_or(base))
        }
        Err(e) => {
            eprintln!(
                "edge: dynamic backend unavailable ({e}); using {BACKEND} with its configured timeouts"
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
