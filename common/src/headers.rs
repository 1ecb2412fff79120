//! The header vocabulary both tiers speak: names, values and the `Cache-Status` and
//! `Server-Timing` renderings. Must not touch any HTTP library type; values are plain strings.

/// `HIT | MISS | STALE | BYPASS`.
pub const X_CACHE: &str = "x-cache";
/// `edge | origin | upstream`: which tier produced the body.
pub const X_CACHE_LAYER: &str = "x-cache-layer";
/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: &str = "cache-status";
/// The tenant-scoped hex key.
pub const X_CACHE_KEY: &str = "x-cache-key";
/// One entry per step, durations in milliseconds.
pub const SERVER_TIMING: &str = "server-timing";
/// The provider that answered a miss.
pub const X_UPSTREAM_PROVIDER: &str = "x-upstream-provider";
/// Edge: the origin region that answered (`none` when every region failed).
pub const X_UPSTREAM_REGION: &str = "x-upstream-region";
/// Edge: every region tried, in order, with how each ended (`us=unreachable, eu=200`).
pub const X_UPSTREAM_TRIED: &str = "x-upstream-tried";
/// Origin: the region this origin belongs to (its `region.name`).
pub const X_ORIGIN_REGION: &str = "x-origin-region";
/// A semantic hit: the cosine similarity of the question and the cached one (4 decimals).
pub const X_CACHE_SIMILARITY: &str = "x-cache-similarity";
/// A semantic hit: the key (hex) of the entry that answered (the paraphrase's).
pub const X_CACHE_SEMANTIC_KEY: &str = "x-cache-semantic-key";
/// Client -> origin: `off` turns the semantic cache off for this request.
pub const X_SEMANTIC_CACHE: &str = "x-semantic-cache";
/// Edge -> origin: "1" when the edge looked and missed (the origin should replicate).
pub const X_EDGE_MISS: &str = "x-gateway-edge-miss";
/// Edge -> origin shared secret.
pub const X_EDGE_SECRET: &str = "x-gateway-edge-secret";

/// The `x-cache` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl CacheOutcome {
    /// `HIT`, `MISS`, `STALE` or `BYPASS`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "HIT",
            CacheOutcome::Miss => "MISS",
            CacheOutcome::Stale => "STALE",
            CacheOutcome::Bypass => "BYPASS",
        }
    }
}

/// The `x-cache-layer` value: which tier produced the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Edge,
    Origin,
    Upstream,
}

impl Layer {
    /// `edge`, `origin` or `upstream`.
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Edge => "edge",
            Layer::Origin => "origin",
            Layer::Upstream => "upstream",
        }
    }
}

/// Why a cache forwarded the request (RFC 9211 `fwd`).
#[allow(
    non_camel_case_types,
    reason = "the variant name `Uri_Miss` is fixed by common/API.md, which both tiers code against"
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fwd {
    /// `uri-miss`: the cache had nothing for the key.
    Uri_Miss,
    /// `miss`.
    Miss,
    /// `stale`: it had an entry, too old to serve.
    Stale,
    /// `bypass`: configured or asked not to use the cache (no-store, uncacheable request).
    Bypass,
    /// `request`: the request asked for a fresh answer (no-cache).
    Request,
}

impl Fwd {
    /// The RFC 9211 token.
    pub fn as_str(self) -> &'static str {
        match self {
            Fwd::Uri_Miss => "uri-miss",
            Fwd::Miss => "miss",
            Fwd::Stale => "stale",
            Fwd::Bypass => "bypass",
            Fwd::Request => "request",
        }
    }
}

/// One RFC 9211 `Cache-Status` member, e.g. `gateway-origin; hit; ttl=3400`. Cache names are
/// `gateway-origin` and `gateway-edge`; a name that is not a structured-field token is rendered
/// as a quoted string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStatusMember {
    cache: String,
    params: Vec<String>,
}

impl CacheStatusMember {
    /// Served from this cache: `<cache>; hit; ttl=<ttl_remaining>`.
    pub fn hit(cache: &str, ttl_remaining: u64) -> Self {
        Self::hit_with_ttl(cache, ttl_remaining)
    }

    /// Forwarded: `<cache>; fwd=<fwd>` and `; stored` if the answer was stored.
    pub fn fwd(cache: &str, fwd: Fwd, stored: bool) -> Self {
        let mut params = vec![format!("fwd={}", fwd.as_str())];
        if stored {
            params.push("stored".to_owned());
        }
        Self::new(cache, params)
    }

    /// Adds RFC 9211 `detail=<token>` (why a cache bypassed or forwarded, e.g. `sampled`).
    pub fn with_detail(mut self, detail: &str) -> Self {
        self.params.push(format!("detail={detail}"));
        self
    }

    /// Adds `<name>=<value>` when the value is an RFC 8941 token (e.g. `region=eu`); a
    /// value that is not one is rendered as a string.
    pub fn with_param(mut self, name: &str, value: &str) -> Self {
        let value = if is_sf_token(value) {
            value.to_owned()
        } else {
            sf_string(value)
        };
        self.params.push(format!("{name}={value}"));
        self
    }

    /// Served stale: `<cache>; hit; ttl=<ttl_remaining>`, where the ttl is negative (how many
    /// seconds past its freshness the entry is).
    pub fn stale(cache: &str, ttl_remaining: i64) -> Self {
        Self::hit_with_ttl(cache, ttl_remaining)
    }

    /// `<cache>; hit; ttl=<ttl>`, fresh or stale (on every hit: joined, not formatted).
    fn hit_with_ttl(cache: &str, ttl: impl itoa::Integer) -> Self {
        Self::new(
            cache,
            vec![
                "hit".to_owned(),
                ["ttl=", itoa::Buffer::new().format(ttl)].concat(),
            ],
        )
    }

    /// The member as it appears in the header.
    pub fn render(&self) -> String {
        let mut out = if is_sf_token(&self.cache) {
            self.cache.clone()
        } else {
            sf_string(&self.cache)
        };
        for param in &self.params {
            out.push_str("; ");
            out.push_str(param);
        }
        out
    }

    fn new(cache: &str, params: Vec<String>) -> Self {
        CacheStatusMember {
            cache: cache.to_owned(),
            params,
        }
    }
}

/// RFC 8941 token: starts with ALPHA or `*`, then tchar, `:` or `/`.
fn is_sf_token(s: &str) -> bool {
    let mut bytes = s.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == b'*')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b))
}

/// RFC 8941 string: printable ASCII only, `"` and `\` escaped; anything else is dropped.
fn sf_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Prepend-order rule of RFC 9211: the cache closest to the origin first; the edge appends.
/// `existing` is the header the response already carries (blank counts as absent).
pub fn append_cache_status(existing: Option<&str>, member: &CacheStatusMember) -> String {
    join_list(existing, &member.render())
}

fn join_list(existing: Option<&str>, addition: &str) -> String {
    match existing.map(str::trim) {
        Some(existing) if !existing.is_empty() => {
            if addition.is_empty() {
                existing.to_owned()
            } else {
                format!("{existing}, {addition}")
            }
        }
        _ => addition.to_owned(),
    }
}

/// Server-Timing: `name;dur=1.23` entries joined with ", ". Durations in milliseconds, rendered
/// with 2 decimals; negative or non-finite durations are rendered as 0. Names are tokens
/// (`auth`, `kv`, `origin`, `redis`, `upstream`), fixed at compile time: the header is on every
/// response of both tiers, so building it copies no name and formats no float.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerTiming {
    entries: Vec<(&'static str, f64)>,
}

impl ServerTiming {
    /// No entries.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one step; `ms` in milliseconds.
    pub fn add(&mut self, name: &'static str, ms: f64) -> &mut Self {
        self.entries.push((name, ms));
        self
    }

    /// True when no step was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The header value; empty if no step was added.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(self.entries.len() * 24);
        for (i, (name, ms)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(name);
            out.push_str(";dur=");
            push_hundredths(&mut out, *ms);
        }
        out
    }

    /// These steps appended to a header the response already carries (the origin's steps come
    /// first, the edge's after).
    pub fn append_to(&self, existing: Option<&str>) -> String {
        join_list(existing, &self.render())
    }
}

/// `ms` with two decimals (`12.00`, `0.12`), rounded half away from zero; 0 for negative or
/// non-finite values. Integer arithmetic: `{:.2}` takes the exact-decimal float path.
fn push_hundredths(out: &mut String, ms: f64) {
    let hundredths = if ms.is_finite() && ms > 0.0 {
        // Saturates for durations beyond u64 hundredths of a millisecond (none are).
        (ms * 100.0).round() as u64
    } else {
        0
    };
    let mut buffer = itoa::Buffer::new();
    out.push_str(buffer.format(hundredths / 100));
    out.push('.');
    let cents = hundredths % 100;
    if cents < 10 {
        out.push('0');
    }
    out.push_str(buffer.format(cents));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_is_a_token_when_it_can_be_and_a_string_otherwise() {
        let member = CacheStatusMember::fwd("gateway-edge", Fwd::Miss, false)
            .with_param("region", "eu")
            .with_param("region", "1 bad");
        assert_eq!(
            member.render(),
            "gateway-edge; fwd=miss; region=eu; region=\"1 bad\""
        );
    }

    #[test]
    fn outcomes_and_layers_have_their_header_values() {
        let outcomes = [
            CacheOutcome::Hit,
            CacheOutcome::Miss,
            CacheOutcome::Stale,
            CacheOutcome::Bypass,
        ];
        let values: Vec<_> = outcomes.iter().map(|o| o.as_str()).collect();
        assert_eq!(values, ["HIT", "MISS", "STALE", "BYPASS"]);
        let layers = [Layer::Edge, Layer::Origin, Layer::Upstream];
        let values: Vec<_> = layers.iter().map(|l| l.as_str()).collect();
        assert_eq!(values, ["edge", "origin", "upstream"]);
    }

    #[test]
    fn cache_status_members_render_like_rfc_9211() {
        assert_eq!(
            CacheStatusMember::hit("gateway-origin", 3400).render(),
            "gateway-origin; hit; ttl=3400"
        );
        assert_eq!(
            CacheStatusMember::fwd("gateway-edge", Fwd::Miss, false).render(),
            "gateway-edge; fwd=miss"
        );
        assert_eq!(
            CacheStatusMember::fwd("gateway-edge", Fwd::Uri_Miss, true).render(),
            "gateway-edge; fwd=uri-miss; stored"
        );
        assert_eq!(
            CacheStatusMember::stale("gateway-edge", -12).render(),
            "gateway-edge; hit; ttl=-12"
        );
        assert_eq!(
            CacheStatusMember::fwd("gateway-origin", Fwd::Bypass, false)
                .with_detail("sampled")
                .render(),
            "gateway-origin; fwd=bypass; detail=sampled"
        );
        let fwds = [Fwd::Stale, Fwd::Bypass, Fwd::Request];
        let values: Vec<_> = fwds.iter().map(|f| f.as_str()).collect();
        assert_eq!(values, ["stale", "bypass", "request"]);
    }

    #[test]
    fn odd_cache_names_are_quoted() {
        assert_eq!(
            CacheStatusMember::hit("my cache \"1\"", 1).render(),
            "\"my cache \\\"1\\\"\"; hit; ttl=1"
        );
    }

    #[test]
    fn the_edge_appends_after_the_origin() {
        let origin = CacheStatusMember::hit("gateway-origin", 3400);
        let edge = CacheStatusMember::fwd("gateway-edge", Fwd::Miss, false);
        let from_origin = append_cache_status(None, &origin);
        assert_eq!(
            append_cache_status(Some(&from_origin), &edge),
            "gateway-origin; hit; ttl=3400, gateway-edge; fwd=miss"
        );
        assert_eq!(
            append_cache_status(Some("  "), &edge),
            "gateway-edge; fwd=miss"
        );
    }

    #[test]
    fn server_timing_renders_milliseconds_with_two_decimals() {
        let mut timing = ServerTiming::new();
        assert!(timing.is_empty());
        assert_eq!(timing.render(), "");
        timing
            .add("auth", 0.123)
            .add("kv", 12.0)
            .add("origin", f64::NAN);
        assert_eq!(
            timing.render(),
            "auth;dur=0.12, kv;dur=12.00, origin;dur=0.00"
        );
        let mut more = ServerTiming::new();
        more.add("a", 0.005)
            .add("b", 0.994)
            .add("c", 0.996)
            .add("d", 1234.5)
            .add("e", -3.0)
            .add("f", f64::INFINITY);
        assert_eq!(
            more.render(),
            "a;dur=0.01, b;dur=0.99, c;dur=1.00, d;dur=1234.50, e;dur=0.00, f;dur=0.00"
        );
        assert_eq!(
            timing.append_to(Some("redis;dur=1.00")),
            "redis;dur=1.00, auth;dur=0.12, kv;dur=12.00, origin;dur=0.00"
        );
        assert_eq!(
            ServerTiming::new().append_to(Some("a;dur=1.00")),
            "a;dur=1.00"
        );
    }
}
