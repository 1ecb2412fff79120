//! A tenant's `requests_per_second` at the edge: every authenticated request, edge hits
//! included, is counted with Fastly Edge Rate Limiting (ERL) under the tenant id, never the API
//! key. Must not replace the origin's exact count: ERL counts per POP and only approximately.

use std::time::Duration;

use fastly::erl::{ERLError, Penaltybox, RateCounter, RateWindow};
use gateway_common::tenant::Tenant;

use crate::settings::EdgeSettings;
use crate::trace::edge_log;

/// The ERL rate counter of authenticated requests, one entry per tenant id (at most 64 bytes,
/// within ERL's 256-byte entry limit).
pub const RATE_COUNTER: &str = "tenant_requests";
/// The ERL penalty box of tenants refused outright for `rate_limit_penalty_secs`.
pub const PENALTY_BOX: &str = "tenant_penalty";

/// The window ERL averages its per-second rate estimate over. One second, because the
/// tenant's limit is per second and the origin counts calendar seconds: over ten seconds, a
/// tenant idle for nine could send ten times its limit in the tenth before the average passed
/// the limit, and one that has just crossed it would be noticed only seconds later. The price
/// is the noisiest estimate ERL has (its docs: a shorter window detects sooner, less
/// accurately), which is why a plain excess costs only the request, not the penalty box.
const WINDOW: RateWindow = RateWindow::OneSec;

/// A tenant observed above this multiple of its limit goes to the penalty box.
const PENALTY_MARGIN: u32 = 2;

/// `Retry-After` when a single request is refused: the window is one second, so a second's
/// pause brings the estimate back under the limit.
const RETRY_AFTER_OVER_LIMIT_SECS: u64 = 1;

/// What ERL said about a tenant, for [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// In the penalty box (`Penaltybox::has`): refused without being counted.
    InPenaltyBox,
    /// Counted, then looked up: the estimated requests per second over [`WINDOW`]
    /// (`RateCounter::lookup_rate`), this request included.
    Rate(u32),
}

/// Whether the edge answers this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Answer 429 with `Retry-After: retry_after_secs` (at least 1).
    Limited {
        retry_after_secs: u64,
        /// Also put the tenant in the penalty box for the penalty duration.
        penalize: bool,
    },
}

/// The edge's verdict on one request of a tenant limited to `limit` requests per second
/// (`None`: no limit, always allowed). `observed` is `None` when ERL did not answer (or was
/// not asked): allowed, since the limit fails open like every other store at the edge, and
/// the origin still counts what is forwarded. `penalty` is the penalty box TTL.
///
/// - At or under the limit: allowed.
/// - Over it, up to [`PENALTY_MARGIN`] times: only this request is refused, `Retry-After: 1`.
///   A per-second limit with a one-minute box would turn one noisy second (ERL may be off by
///   10%, the one-second estimate more) into sixty seconds of refusals, far harsher than the
///   origin, which refuses only the rest of that second.
/// - Over the margin: refused and put in the penalty box, `Retry-After` = the box's TTL. Twice
///   the limit is beyond noise: the tenant keeps sending through its 429s (refused requests
///   are counted too). While boxed, each request costs one ERL call (`has`), not three, and
///   is refused without being counted.
/// - Already in the box: refused, `Retry-After` = the box's TTL. ERL does not tell how much of
///   it is left, so this is an upper bound: a client that honours it never comes back too
///   soon.
pub fn decide(limit: Option<u32>, observed: Option<Observed>, penalty: Duration) -> Decision {
    let (Some(limit), Some(observed)) = (limit, observed) else {
        return Decision::Allow;
    };
    let penalty_secs = penalty.as_secs().max(1);
    match observed {
        Observed::InPenaltyBox => Decision::Limited {
            retry_after_secs: penalty_secs,
            penalize: false,
        },
        Observed::Rate(rate) if rate <= limit => Decision::Allow,
        Observed::Rate(rate) if rate > limit.saturating_mul(PENALTY_MARGIN) => Decision::Limited {
            retry_after_secs: penalty_secs,
            penalize: true,
        },
        Observed::Rate(_) => Decision::Limited {
            retry_after_secs: RETRY_AFTER_OVER_LIMIT_SECS,
            penalize: false,
        },
    }
}

/// Count this request against `tenant`'s limit and decide; puts the tenant in the penalty box
/// when the decision says so. A tenant without a limit costs nothing (no ERL call, no Config
/// Store read). Any ERL error allows the request, logged in one line at most.
pub fn check(tenant: &Tenant, settings: &EdgeSettings) -> Decision {
    let Some(limit) = tenant.requests_per_second else {
        return Decision::Allow;
    };
    let rate_limit = settings.rate_limit();
    if !rate_limit.enabled {
        return Decision::Allow;
    }
    let penalty_box = Penaltybox::open(PENALTY_BOX);
    let observed = observe(&penalty_box, &tenant.id)
        .map_err(|e| {
            edge_log!(
                "rate limit of tenant {} unavailable ({e:?}); allowing",
                tenant.id
            )
        })
        .ok();
    let decision = decide(Some(limit), observed, rate_limit.penalty);
    if let Decision::Limited { penalize: true, .. } = decision
        && let Err(e) = penalty_box.add(&tenant.id, rate_limit.penalty)
    {
        // This request is still refused; the next one is counted again and decided afresh.
        edge_log!(
            "penalty box {PENALTY_BOX} refused tenant {} ({e:?})",
            tenant.id
        );
    }
    decision
}

/// The penalty box first, so a boxed tenant is neither counted nor looked up.
fn observe(penalty_box: &Penaltybox, entry: &str) -> Result<Observed, ERLError> {
    if penalty_box.has(entry)? {
        return Ok(Observed::InPenaltyBox);
    }
    let counter = RateCounter::open(RATE_COUNTER);
    counter.increment(entry, 1)?;
    Ok(Observed::Rate(counter.lookup_rate(entry, WINDOW)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn limited(retry_after_secs: u64, penalize: bool) -> Decision {
        Decision::Limited {
            retry_after_secs,
            penalize,
        }
    }

    #[test]
    fn a_tenant_without_a_limit_is_always_allowed() {
        for observed in [
            None,
            Some(Observed::Rate(0)),
            Some(Observed::Rate(u32::MAX)),
            Some(Observed::InPenaltyBox),
        ] {
            assert_eq!(
                decide(None, observed, MINUTE),
                Decision::Allow,
                "{observed:?}"
            );
        }
    }

    #[test]
    fn a_tenant_under_its_limit_is_allowed() {
        assert_eq!(
            decide(Some(100), Some(Observed::Rate(0)), MINUTE),
            Decision::Allow
        );
        assert_eq!(
            decide(Some(100), Some(Observed::Rate(99)), MINUTE),
            Decision::Allow
        );
    }

    #[test]
    fn a_tenant_exactly_at_its_limit_is_allowed() {
        assert_eq!(
            decide(Some(100), Some(Observed::Rate(100)), MINUTE),
            Decision::Allow
        );
    }

    #[test]
    fn a_tenant_just_over_its_limit_loses_only_this_request_for_a_second() {
        assert_eq!(
            decide(Some(100), Some(Observed::Rate(101)), MINUTE),
            limited(1, false)
        );
        // Up to the margin, inclusive: still no penalty box.
        assert_eq!(
            decide(Some(100), Some(Observed::Rate(200)), MINUTE),
            limited(1, false)
        );
    }

    #[test]
    fn a_tenant_far_over_its_limit_is_limited_and_goes_to_the_penalty_box() {
        assert_eq!(
            decide(Some(100), Some(Observed::Rate(201)), MINUTE),
            limited(60, true)
        );
        // The measured case: 2,164 rps of edge hits against a limit of 100.
        assert_eq!(
            decide(
                Some(100),
                Some(Observed::Rate(2164)),
                Duration::from_secs(300)
            ),
            limited(300, true)
        );
    }

    #[test]
    fn a_tenant_already_in_the_penalty_box_is_limited_without_being_boxed_again() {
        assert_eq!(
            decide(Some(100), Some(Observed::InPenaltyBox), MINUTE),
            limited(60, false)
        );
    }

    #[test]
    fn retry_after_is_the_penalty_in_whole_seconds_and_never_zero() {
        let boxed = Some(Observed::InPenaltyBox);
        assert_eq!(
            decide(Some(10), boxed, Duration::from_secs(3600)),
            limited(3600, false)
        );
        assert_eq!(
            decide(Some(10), boxed, Duration::from_millis(1500)),
            limited(1, false)
        );
        assert_eq!(decide(Some(10), boxed, Duration::ZERO), limited(1, false));
    }

    #[test]
    fn when_rate_limiting_did_not_answer_the_request_is_allowed() {
        assert_eq!(decide(Some(1), None, MINUTE), Decision::Allow);
    }

    #[test]
    fn the_largest_limit_never_overflows_into_a_penalty() {
        assert_eq!(
            decide(Some(u32::MAX), Some(Observed::Rate(u32::MAX)), MINUTE),
            Decision::Allow
        );
    }

    // Host calls exist only in the wasm build (run by `just test-wasm` under Viceroy);
    // `cargo test --workspace` also builds this crate's tests for the host.
    #[cfg(target_arch = "wasm32")]
    #[test]
    fn the_host_calls_answer_under_viceroy_without_limiting() {
        // Viceroy 0.22's ERL host calls are stubs (never boxed, rate 0): this is what runs
        // locally, and it must allow. In production the same calls reach the POP's counters.
        let penalty_box = Penaltybox::open(PENALTY_BOX);
        assert_eq!(observe(&penalty_box, "tenant-a"), Ok(Observed::Rate(0)));
    }
}
