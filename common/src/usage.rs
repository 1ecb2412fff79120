//! The usage record: one compact JSON line per request that the edge writes to its Fastly log
//! endpoint and the origin's ingest route folds into its metering. Both tiers use this type, so
//! what the edge writes is what the origin accepts. It never holds keys, prompts or answers:
//! only who (tenant), what (route, model), which tier answered, and how much and how fast.

use serde::{Deserialize, Serialize};

use crate::key::validate_tenant_id;

/// The record format; a line of another version is rejected by the origin (and counted).
/// Fields are only ever added as optional ones (`span`, `region`), which keeps the version:
/// an origin reads the lines of an older edge unchanged. An older origin refuses a newer
/// edge's lines (unknown fields), so the origin is deployed first.
pub const USAGE_VERSION: u32 = 1;

/// The Fastly log endpoint the edge writes records to (`[setup.log_endpoints.usage]`).
pub const USAGE_ENDPOINT: &str = "usage";

/// Longest line the origin accepts: a record is about 300 bytes, so anything this long is not
/// one of ours.
pub const MAX_RECORD_BYTES: usize = 4096;

/// Which tier produced the answer (the `x-cache-layer` vocabulary, plus the edge's own refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The edge answered without the origin: from its KV store (hit or stale) or a refusal.
    Edge,
    /// The origin answered from Redis, or refused the request itself.
    Origin,
    /// A provider answered (through the origin).
    Upstream,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Edge, Tier::Origin, Tier::Upstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Edge => "edge",
            Tier::Origin => "origin",
            Tier::Upstream => "upstream",
        }
    }

    /// The tier an `x-cache-layer` value names; `None` for anything else.
    pub fn from_layer(layer: &str) -> Option<Tier> {
        match layer {
            "edge" => Some(Tier::Edge),
            "origin" => Some(Tier::Origin),
            "upstream" => Some(Tier::Upstream),
            _ => None,
        }
    }
}

/// What became of the request, as far as metering cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Answered from a cache (`x-cache: HIT`).
    Hit,
    /// Answered from a stale entry because the origin failed (`x-cache: STALE`).
    Stale,
    /// Answered by a provider after a cache miss.
    Miss,
    /// Answered by a provider, the cache skipped on purpose.
    Bypass,
    /// Refused with 429 (rate or budget).
    Limited,
    /// Refused with another 4xx (bad input, model not allowed).
    Refused,
    /// Failed with a 5xx.
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Hit,
        Outcome::Stale,
        Outcome::Miss,
        Outcome::Bypass,
        Outcome::Limited,
        Outcome::Refused,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
            Outcome::Limited => "limited",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
        }
    }

    /// The outcome of an answer from its status and `x-cache` value: an error status decides
    /// first (a 429 is `limited` whatever the cache said), then the cache's word; a 2xx without
    /// one is a `miss` (a provider answered).
    pub fn classify(status: u16, cache: Option<&str>) -> Outcome {
        match status {
            429 => Outcome::Limited,
            400..=499 => Outcome::Refused,
            500..=599 => Outcome::Error,
            _ => match cache {
                Some("HIT") => Outcome::Hit,
                Some("STALE") => Outcome::Stale,
                Some("BYPASS") => Outcome::Bypass,
                _ => Outcome::Miss,
            },
        }
    }
}

/// One request as the edge saw it. Field names are short (the line is written per request),
/// but each is a word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRecord {
    /// [`USAGE_VERSION`].
    pub v: u32,
    /// Unix seconds when the edge answered.
    pub ts: u64,
    pub tenant: String,
    /// `Route::as_str` (`chat.completions`, `completions`, `embeddings`, `responses`,
    /// `messages`), or `other` (a
    /// pass-through: models, cache purges).
    pub route: String,
    /// Which tier produced the answer.
    pub layer: Tier,
    pub outcome: Outcome,
    pub status: u16,
    /// The answering entry's model, when a cache answered; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Tokens a cache answer saved (the entry's recorded usage); 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub saved_prompt_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub saved_completion_tokens: u64,
    /// Response body bytes sent to the client (0 for a stream, whose length the edge never sees).
    #[serde(default)]
    pub bytes: u64,
    /// Time at the edge from the request to the response head, milliseconds.
    pub total_ms: f64,
    /// Per-step durations (`auth`, `kv`, `origin`), milliseconds, as in `Server-Timing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<(String, f64)>,
    /// The Fastly POP (`FASTLY_POP`), empty under Viceroy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pop: String,
    /// The origin region that answered (`x-upstream-region`), empty when none did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// The edge's own span of this request, which the origin exports for it (the edge has no
    /// OTLP client); absent in records of edges that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<SpanRecord>,
    /// Why the edge refused the KV entry it found for this request (`EntryError::reason`:
    /// `unopenable`, `unknown_key_id`, `wrong_tenant`, ...), so the origin counts at the edge
    /// what it counts for Redis; empty when nothing was refused (and in records of edges that
    /// predate it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kv_reject: String,
}

/// The edge's span of one request: its W3C ids and when it started. It ends `total_ms` after
/// `start_unix_ns` (when the edge had the response head).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpanRecord {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero: the parent the origin's `request` span names.
    pub span_id: String,
    /// The client's span (from its `traceparent`); empty when the edge started the trace.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_id: String,
    /// Whether the trace is sampled (the `traceparent` flag).
    #[serde(default = "sampled_default")]
    pub sampled: bool,
    /// Unix nanoseconds when the edge received the request.
    pub start_unix_ns: u64,
}

fn sampled_default() -> bool {
    true
}

/// A [`SpanRecord`]'s ids as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub trace: [u8; 16],
    pub span: [u8; 8],
    /// The client's span; `None` when the edge started the trace.
    pub parent: Option<[u8; 8]>,
}

impl SpanRecord {
    /// The ids as bytes; `None` when one is not a valid W3C id.
    pub fn ids(&self) -> Option<SpanIds> {
        let trace = hex_id::<16>(&self.trace_id)?;
        let span = hex_id::<8>(&self.span_id)?;
        let parent = match self.parent_id.as_str() {
            "" => None,
            hex => Some(hex_id::<8>(hex)?),
        };
        Some(SpanIds {
            trace,
            span,
            parent,
        })
    }
}

/// `N` bytes from `2N` lowercase hex digits, refusing an all-zero id (invalid in W3C).
fn hex_id<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut id = [0u8; N];
    for (byte, pair) in id.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    (id != [0u8; N]).then_some(id)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why a line was not accepted; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the line is longer than {MAX_RECORD_BYTES} bytes")]
    TooLong,
    #[error("the line is not a usage record: {0}")]
    Malformed(String),
    #[error("version {0} is not {USAGE_VERSION}")]
    Version(u32),
    #[error("tenant: {0}")]
    Tenant(String),
    #[error("{0} is out of range")]
    Range(&'static str),
}

impl UsageRecord {
    /// Tokens the answer saved.
    pub fn saved_tokens(&self) -> u64 {
        self.saved_prompt_tokens
            .saturating_add(self.saved_completion_tokens)
    }

    /// One line of JSON, no newline.
    pub fn to_line(&self) -> String {
        // Serializing plain fields to a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parse and check one line. Strict: unknown fields, another version, a bad tenant id, a
    /// status outside 100..=599 or a duration that is negative or not finite are refused, so a
    /// hostile or broken sender cannot put arbitrary label values or counts into the metrics.
    pub fn parse_line(line: &[u8]) -> Result<UsageRecord, RecordError> {
        if line.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLong);
        }
        let record: UsageRecord =
            serde_json::from_slice(line).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if record.v != USAGE_VERSION {
            return Err(RecordError::Version(record.v));
        }
        validate_tenant_id(&record.tenant).map_err(|e| RecordError::Tenant(e.to_string()))?;
        if !matches!(
            record.route.as_str(),
            "chat.completions" | "completions" | "embeddings" | "responses" | "messages" | "other"
        ) {
            return Err(RecordError::Range("route"));
        }
        if !(100..=599).contains(&record.status) {
            return Err(RecordError::Range("status"));
        }
        let sane_ms = |ms: f64| ms.is_finite() && (0.0..=86_400_000.0).contains(&ms);
        if !sane_ms(record.total_ms) {
            return Err(RecordError::Range("total_ms"));
        }
        if record.steps.len() > 8
            || record
                .steps
                .iter()
                .any(|(name, ms)| name.is_empty() || name.len() > 16 || !sane_ms(*ms))
        {
            return Err(RecordError::Range("steps"));
        }
        if record.model.len() > 128 || record.pop.len() > 16 {
            return Err(RecordError::Range("model or pop"));
        }
        if record.region.len() > 32
            || !record
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RecordError::Range("region"));
        }
        if let Some(span) = &record.span
            && (span.ids().is_none() || span.start_unix_ns == 0)
        {
            return Err(RecordError::Range("span"));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> UsageRecord {
        UsageRecord {
            v: USAGE_VERSION,
            ts: 1_764_500_000,
            tenant: "acme".into(),
            route: "chat.completions".into(),
            layer: Tier::Edge,
            outcome: Outcome::Hit,
            status: 200,
            model: "gpt-4o-mini".into(),
            saved_prompt_tokens: 5,
            saved_completion_tokens: 2,
            bytes: 310,
            total_ms: 1.25,
            steps: vec![("auth".into(), 0.1), ("kv".into(), 0.8)],
            pop: String::new(),
            region: String::new(),
            span: None,
            kv_reject: String::new(),
        }
    }

    fn span() -> SpanRecord {
        SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_id: String::new(),
            sampled: true,
            start_unix_ns: 1_764_500_000_000_000_000,
        }
    }

    #[test]
    fn a_record_with_the_edges_span_round_trips_and_an_old_line_still_parses() {
        let mut with_span = record();
        with_span.region = "eu-west".into();
        with_span.span = Some(SpanRecord {
            parent_id: "a3ce929d0e0e4736".into(),
            ..span()
        });
        let line = with_span.to_line();
        assert_eq!(UsageRecord::parse_line(line.as_bytes()).unwrap(), with_span);
        let ids = with_span.span.as_ref().unwrap().ids().unwrap();
        assert_eq!(ids.trace[0], 0x4b);
        assert_eq!(ids.span[7], 0xb7);
        assert_eq!(ids.parent.unwrap()[0], 0xa3);
        // A line written before the span and region existed.
        let old = r#"{"v":1,"ts":1764500000,"tenant":"acme","route":"messages","layer":"edge","outcome":"hit","status":200,"bytes":3,"total_ms":1.0}"#;
        let parsed = UsageRecord::parse_line(old.as_bytes()).unwrap();
        assert_eq!(
            (
                parsed.span,
                parsed.region.as_str(),
                parsed.kv_reject.as_str()
            ),
            (None, "", "")
        );
        let mut refused = record();
        refused.kv_reject = "unopenable".into();
        let line = refused.to_line();
        assert!(line.contains(r#""kv_reject":"unopenable""#), "{line}");
        assert_eq!(UsageRecord::parse_line(line.as_bytes()).unwrap(), refused);
    }

    #[test]
    fn a_span_with_a_bad_id_or_no_start_is_refused() {
        let with = |f: fn(&mut SpanRecord)| {
            let mut r = record();
            let mut s = span();
            f(&mut s);
            r.span = Some(s);
            UsageRecord::parse_line(r.to_line().as_bytes()).unwrap_err()
        };
        assert_eq!(
            with(|s| s.trace_id = "0".repeat(32)),
            RecordError::Range("span")
        );
        assert_eq!(
            with(|s| s.span_id = "XYZ".into()),
            RecordError::Range("span")
        );
        assert_eq!(
            with(|s| s.span_id = "00F067AA0BA902B7".into()),
            RecordError::Range("span")
        );
        assert_eq!(
            with(|s| s.parent_id = "abc".into()),
            RecordError::Range("span")
        );
        assert_eq!(with(|s| s.start_unix_ns = 0), RecordError::Range("span"));
        let mut r = record();
        r.region = "eu west\"".into();
        assert_eq!(
            UsageRecord::parse_line(r.to_line().as_bytes()).unwrap_err(),
            RecordError::Range("region")
        );
    }

    #[test]
    fn a_record_round_trips_through_its_line() {
        let line = record().to_line();
        assert!(!line.contains('\n'));
        assert!(
            !line.contains("\"pop\""),
            "empty fields are left out: {line}"
        );
        assert_eq!(UsageRecord::parse_line(line.as_bytes()).unwrap(), record());
        assert_eq!(record().saved_tokens(), 7);
    }

    #[test]
    fn hostile_lines_are_refused_naming_what_is_wrong() {
        let with = |f: fn(&mut UsageRecord)| {
            let mut r = record();
            f(&mut r);
            UsageRecord::parse_line(r.to_line().as_bytes()).unwrap_err()
        };
        assert_eq!(with(|r| r.v = 2), RecordError::Version(2));
        assert!(matches!(
            with(|r| r.tenant = "Acme\"}".into()),
            RecordError::Tenant(_)
        ));
        assert_eq!(with(|r| r.status = 42), RecordError::Range("status"));
        assert_eq!(with(|r| r.route = "x".into()), RecordError::Range("route"));
        assert_eq!(with(|r| r.total_ms = -1.0), RecordError::Range("total_ms"));
        assert!(matches!(
            UsageRecord::parse_line(b"{\"v\":1,\"extra\":true}"),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            UsageRecord::parse_line(b"not json"),
            Err(RecordError::Malformed(_))
        ));
        let long = vec![b' '; MAX_RECORD_BYTES + 1];
        assert_eq!(UsageRecord::parse_line(&long), Err(RecordError::TooLong));
    }

    #[test]
    fn an_error_status_decides_the_outcome_before_the_cache_word() {
        assert_eq!(Outcome::classify(200, Some("HIT")), Outcome::Hit);
        assert_eq!(Outcome::classify(200, Some("STALE")), Outcome::Stale);
        assert_eq!(Outcome::classify(200, Some("BYPASS")), Outcome::Bypass);
        assert_eq!(Outcome::classify(200, Some("MISS")), Outcome::Miss);
        assert_eq!(Outcome::classify(200, None), Outcome::Miss);
        assert_eq!(Outcome::classify(429, Some("HIT")), Outcome::Limited);
        assert_eq!(Outcome::classify(403, None), Outcome::Refused);
        assert_eq!(Outcome::classify(503, Some("MISS")), Outcome::Error);
        assert_eq!(Tier::from_layer("upstream"), Some(Tier::Upstream));
        assert_eq!(Tier::from_layer("-"), None);
    }
}
