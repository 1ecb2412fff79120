//! The cache decision table: what may be read, written and served, and for how long. Pure:
//! callers pass the clock (`now`) and headers in; nothing here reads them itself.

use crate::canonical::{ParsedRequest, Value, parse_strict};
use crate::tenant::Tenant;

/// What the request's `Cache-Control` (or `Pragma`) asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestDirectives {
    /// `no-store`: neither read nor write.
    pub no_store: bool,
    /// `no-cache` (or `Pragma: no-cache`): skip the read, write the fresh answer.
    pub no_cache: bool,
    /// `max-age=N`: accept only entries at most N seconds old.
    pub max_age: Option<u64>,
}

/// Parse request Cache-Control (and `Pragma: no-cache`); unknown directives ignored.
///
/// Directive names are case-insensitive; `max-age` accepts the quoted form, keeps the smallest
/// value if repeated, saturates on overflow and ignores values that are not digits. As RFC 9111
/// (section 5.4) says, `Pragma` only counts when there is no `Cache-Control` header.
pub fn parse_cache_control(cache_control: Option<&str>, pragma: Option<&str>) -> RequestDirectives {
    let mut directives = RequestDirectives::default();
    match cache_control {
        Some(cc) if !cc.trim().is_empty() => {
            for directive in cc.split(',') {
                let (name, value) = match directive.split_once('=') {
                    Some((name, value)) => (name.trim(), Some(value.trim())),
                    None => (directive.trim(), None),
                };
                if name.eq_ignore_ascii_case("no-store") {
                    directives.no_store = true;
                } else if name.eq_ignore_ascii_case("no-cache") {
                    directives.no_cache = true;
                } else if name.eq_ignore_ascii_case("max-age")
                    && let Some(secs) = value.and_then(parse_delta_seconds)
                {
                    directives.max_age =
                        Some(directives.max_age.map_or(secs, |prev| prev.min(secs)));
                }
            }
        }
        _ => {
            if let Some(pragma) = pragma {
                directives.no_cache = pragma
                    .split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-cache"));
            }
        }
    }
    directives
}

fn parse_delta_seconds(value: &str) -> Option<u64> {
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits, so the only possible failure is overflow.
    Some(value.parse().unwrap_or(u64::MAX))
}

/// What to do with the cache for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Look the key up.
    pub read: bool,
    /// Store a cacheable answer.
    pub write: bool,
    /// Serve only entries at most this old (seconds).
    pub max_age: Option<u64>,
    /// Why neither read nor write happens (`Cache-Status: fwd=bypass; detail=<reason>`).
    pub bypass: Option<Bypass>,
}

/// Why a request does not use the cache at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// The body cannot be keyed exactly (an inexact number, a stream on a route whose answers
    /// cannot be replayed), or the tier has no key secret.
    Uncacheable,
    /// The client sent `Cache-Control: no-store`.
    NoStore,
    /// A sampled answer, and the tenant does not cache those (`Tenant::cache_sampled`).
    Sampled,
    /// `"store": true`, and the tenant does not answer those from cache
    /// (`Tenant::cache_store_requests`).
    Store,
    /// `/v1/responses` with `previous_response_id`: the answer continues a conversation the
    /// provider keeps, so the same body can mean something else each time.
    PreviousResponse,
    /// `/v1/responses` with `conversation`: the same, for a provider-kept conversation object.
    Conversation,
    /// `/v1/responses` with `background: true`: answered with a pending response to poll.
    Background,
}

impl Bypass {
    /// The RFC 9211 `detail` token.
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Uncacheable => "uncacheable",
            Bypass::NoStore => "no-store",
            Bypass::Sampled => "sampled",
            Bypass::Store => "store",
            Bypass::PreviousResponse => "previous-response-id",
            Bypass::Conversation => "conversation",
            Bypass::Background => "background",
        }
    }
}

impl Plan {
    /// Neither read nor write, for `reason`.
    pub fn bypass(reason: Bypass) -> Plan {
        Plan {
            read: false,
            write: false,
            max_age: None,
            bypass: Some(reason),
        }
    }
}

/// The decision table, the same in both tiers: a request whose answer depends on provider-kept
/// state (`ParsedRequest::never_cached`), an uncacheable body, `no-store`, or a request
/// the tenant's policy keeps out of the cache (sampled answers, `store: true`) -> neither read
/// nor write. `no-cache` -> write only. Otherwise read and write.
pub fn plan(directives: RequestDirectives, request: &ParsedRequest, tenant: &Tenant) -> Plan {
    let bypass = if let Some(reason) = request.never_cached {
        Some(reason)
    } else if request.canonical.is_none() {
        Some(Bypass::Uncacheable)
    } else if directives.no_store {
        Some(Bypass::NoStore)
    } else if request.store && !tenant.cache_store_requests {
        Some(Bypass::Store)
    } else if request.sampled && !tenant.cache_sampled {
        Some(Bypass::Sampled)
    } else {
        None
    };
    if let Some(reason) = bypass {
        return Plan::bypass(reason);
    }
    Plan {
        read: !directives.no_cache,
        write: true,
        max_age: directives.max_age,
        bypass: None,
    }
}

/// Only complete 2xx answers with a JSON content type whose body is a JSON object without a
/// top-level "error" member (other than `"error": null`).
///
/// JSON content types are `application/json` and any `+json` type, parameters ignored. The body
/// must parse strictly (a truncated body does not), so an incomplete answer is never stored.
pub fn is_cacheable_response(status: u16, content_type: &str, body: &[u8]) -> bool {
    if !(200..300).contains(&status) {
        return false;
    }
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media_type != "application/json" && !media_type.ends_with("+json") {
        return false;
    }
    // `"error": null` is no error: a Responses API `response` always carries the member.
    matches!(parse_strict(body), Ok(Value::Object(fields))
        if matches!(fields.get("error"), None | Some(Value::Null)))
}

/// requested (tenant default) capped to [1, cap].
pub fn effective_ttl(tenant_ttl: u64, cap: u64) -> u64 {
    tenant_ttl.min(cap).max(1)
}

/// Whether an entry written under purge `generation` predates the tenant's last purge
/// (`tenant_generation`): then it is never served, fresh or stale.
pub fn purged(generation: u64, tenant_generation: u64) -> bool {
    generation < tenant_generation
}

/// How usable an entry is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it. `remaining` is `ttl - age` seconds.
    Fresh { age: u64, remaining: u64 },
    /// Too old to serve normally; may be served if the origin is unreachable.
    Stale { age: u64 },
    /// Never serve.
    Expired,
}

/// Fresh: age < ttl and (max_age is None or age <= max_age). Stale: not fresh but
/// age < ttl + stale_window. Expired otherwise. A `created` in the future (clock skew) counts as
/// age 0. All values are seconds.
pub fn freshness(
    created: u64,
    ttl: u64,
    now: u64,
    max_age: Option<u64>,
    stale_window: u64,
) -> Freshness {
    let age = now.saturating_sub(created);
    if age < ttl && max_age.is_none_or(|max| age <= max) {
        Freshness::Fresh {
            age,
            remaining: ttl - age,
        }
    } else if age < ttl.saturating_add(stale_window) {
        Freshness::Stale { age }
    } else {
        Freshness::Expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(value: &str) -> RequestDirectives {
        parse_cache_control(Some(value), None)
    }

    #[test]
    fn cache_control_directives_are_parsed_case_insensitively() {
        assert_eq!(cc(""), RequestDirectives::default());
        assert!(cc("No-Store").no_store);
        assert!(cc("private, NO-CACHE").no_cache);
        assert_eq!(cc("max-age=60").max_age, Some(60));
        assert_eq!(cc("Max-Age = \"30\" ").max_age, Some(30));
        assert_eq!(cc("max-age=60, max-age=10").max_age, Some(10));
        assert_eq!(cc("max-age=-1, max-age=abc, max-age=").max_age, None);
        assert_eq!(
            cc("max-age=99999999999999999999999").max_age,
            Some(u64::MAX)
        );
        assert_eq!(
            cc("only-if-cached, stale-if-error=5"),
            RequestDirectives::default()
        );
    }

    #[test]
    fn pragma_counts_only_without_cache_control() {
        assert!(parse_cache_control(None, Some("no-cache")).no_cache);
        assert!(parse_cache_control(Some(" "), Some("x, No-Cache")).no_cache);
        assert!(!parse_cache_control(Some("max-age=5"), Some("no-cache")).no_cache);
        assert!(!parse_cache_control(None, Some("something")).no_cache);
    }

    fn request(canonical: bool, sampled: bool, store: bool) -> ParsedRequest {
        ParsedRequest {
            route: crate::route::Route::ChatCompletions,
            model: "m".into(),
            stream: false,
            include_usage: false,
            sampled,
            store,
            never_cached: None,
            canonical: canonical.then(|| b"{}".to_vec()),
            echo: None,
        }
    }

    #[test]
    fn a_request_on_provider_kept_state_is_never_cached_whatever_the_tenant_allows() {
        for reason in [
            Bypass::PreviousResponse,
            Bypass::Conversation,
            Bypass::Background,
        ] {
            let request = ParsedRequest {
                never_cached: Some(reason),
                ..request(true, false, false)
            };
            let plan = plan(RequestDirectives::default(), &request, &tenant(true, true));
            assert_eq!(plan, Plan::bypass(reason));
        }
        assert_eq!(Bypass::PreviousResponse.as_str(), "previous-response-id");
    }

    fn tenant(cache_sampled: bool, cache_store_requests: bool) -> Tenant {
        Tenant {
            id: "acme".into(),
            api_key_sha256: vec![],
            allowed_models: vec![],
            cache_ttl_secs: 60,
            stale_if_error_secs: 0,
            monthly_token_budget: None,
            requests_per_second: None,
            cache_sampled,
            cache_store_requests,
            purge_generation: 0,
            semantic: Default::default(),
        }
    }

    #[test]
    fn plan_follows_the_decision_table() {
        let d = |no_store, no_cache| RequestDirectives {
            no_store,
            no_cache,
            max_age: Some(5),
        };
        let plain = request(true, false, false);
        let t = tenant(true, false);
        let rw = |p: Plan| (p.read, p.write, p.bypass);
        assert_eq!(rw(plan(d(false, false), &plain, &t)), (true, true, None));
        assert_eq!(rw(plan(d(false, true), &plain, &t)), (false, true, None));
        let no_store = (false, false, Some(Bypass::NoStore));
        assert_eq!(rw(plan(d(true, false), &plain, &t)), no_store);
        assert_eq!(rw(plan(d(true, true), &plain, &t)), no_store);
        let inexact = request(false, false, false);
        assert_eq!(
            rw(plan(d(false, false), &inexact, &t)),
            (false, false, Some(Bypass::Uncacheable))
        );
        assert_eq!(plan(d(false, false), &plain, &t).max_age, Some(5));
    }

    #[test]
    fn the_tenant_decides_about_sampled_answers_and_store_requests() {
        let none = RequestDirectives::default();
        let sampled = request(true, true, false);
        let stored = request(true, false, true);
        let default = tenant(true, false);
        assert!(
            plan(none, &sampled, &default).read,
            "sampled answers cached by default"
        );
        assert_eq!(
            plan(none, &stored, &default).bypass,
            Some(Bypass::Store),
            "store: true goes to the provider unless the tenant opts in"
        );
        let fresh_draws = tenant(false, true);
        assert_eq!(
            plan(none, &sampled, &fresh_draws),
            Plan::bypass(Bypass::Sampled)
        );
        let no_cache = RequestDirectives {
            no_cache: true,
            ..none
        };
        assert!(
            !plan(no_cache, &sampled, &fresh_draws).write,
            "not written either"
        );
        assert!(plan(none, &stored, &fresh_draws).read);
        assert!(plan(none, &request(true, false, false), &fresh_draws).read);
        assert_eq!(Bypass::NoStore.as_str(), "no-store");
    }

    #[test]
    fn only_complete_successful_json_objects_are_cacheable() {
        let ok = br#"{"id":"x","choices":[]}"#;
        assert!(is_cacheable_response(200, "application/json", ok));
        assert!(is_cacheable_response(
            201,
            "Application/JSON; charset=utf-8",
            ok
        ));
        assert!(is_cacheable_response(200, "application/problem+json", ok));
        assert!(!is_cacheable_response(429, "application/json", ok));
        assert!(!is_cacheable_response(500, "application/json", ok));
        assert!(!is_cacheable_response(304, "application/json", ok));
        assert!(!is_cacheable_response(200, "text/event-stream", ok));
        assert!(!is_cacheable_response(
            200,
            "application/json",
            br#"{"id":"x","cho"#
        ));
        assert!(!is_cacheable_response(200, "application/json", b"[1]"));
        assert!(!is_cacheable_response(
            200,
            "application/json",
            br#"{"error":{"message":"m"}}"#
        ));
        // A Responses API `response` always has the member; null means no error.
        assert!(is_cacheable_response(
            200,
            "application/json",
            br#"{"object":"response","error":null}"#
        ));
    }

    #[test]
    fn ttl_is_capped_and_never_zero() {
        assert_eq!(effective_ttl(3600, 86_400), 3600);
        assert_eq!(effective_ttl(100_000, 86_400), 86_400);
        assert_eq!(effective_ttl(0, 86_400), 1);
        assert_eq!(effective_ttl(10, 0), 1);
    }

    #[test]
    fn freshness_distinguishes_fresh_stale_and_expired() {
        assert_eq!(
            freshness(100, 60, 130, None, 30),
            Freshness::Fresh {
                age: 30,
                remaining: 30
            }
        );
        assert_eq!(
            freshness(100, 60, 160, None, 30),
            Freshness::Stale { age: 60 }
        );
        assert_eq!(
            freshness(100, 60, 189, None, 30),
            Freshness::Stale { age: 89 }
        );
        assert_eq!(freshness(100, 60, 190, None, 30), Freshness::Expired);
        assert_eq!(freshness(100, 60, 160, None, 0), Freshness::Expired);
    }

    #[test]
    fn an_entry_from_before_the_last_purge_is_purged() {
        assert!(!purged(0, 0));
        assert!(purged(0, 1));
        assert!(purged(2, 3));
        assert!(!purged(3, 3), "written after the purge");
        assert!(!purged(4, 3), "an edge that has not seen the purge yet");
    }

    #[test]
    fn max_age_makes_older_entries_stale() {
        assert_eq!(
            freshness(100, 60, 110, Some(10), 0),
            Freshness::Fresh {
                age: 10,
                remaining: 50
            }
        );
        assert_eq!(
            freshness(100, 60, 111, Some(10), 0),
            Freshness::Stale { age: 11 }
        );
        assert_eq!(
            freshness(100, 60, 111, Some(10), 100),
            Freshness::Stale { age: 11 }
        );
    }

    #[test]
    fn a_future_created_time_counts_as_age_zero() {
        assert_eq!(
            freshness(200, 60, 100, Some(0), 0),
            Freshness::Fresh {
                age: 0,
                remaining: 60
            }
        );
        assert_eq!(
            freshness(0, u64::MAX, u64::MAX, None, u64::MAX),
            Freshness::Expired
        );
    }
}
