//! The tenant purge generation: a counter per tenant in Redis, bumped by a tenant purge. Every
//! entry records the generation it was written under, and both tiers refuse an entry from an
//! older one (`policy::purged`), so a tenant purge is one increment, not one delete per entry.

/// The Redis key of `tenant`'s purge generation (absent = 0): `gw:gen:{<tenant>}`, tagged by
/// the tenant so it shares a cluster slot with the tenant's budget counters (one pipeline).
pub fn key(tenant: &str) -> String {
    // Read on every request: joined, not formatted.
    ["gw:gen:{", tenant, "}"].concat()
}

/// How long the counter must outlive its last bump: past the longest an entry written before
/// it can still be served, by either tier (the TTL cap plus the longest stale-if-error
/// window), and a day for clock skew. Each bump renews it.
pub fn ttl_secs(ttl_cap_secs: u64, longest_stale_secs: u64) -> u64 {
    ttl_cap_secs
        .saturating_add(longest_stale_secs)
        .saturating_add(86_400)
}
