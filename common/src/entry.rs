//! The stored cache entry: a response body plus a small versioned envelope, in its Redis form
//! (one buffer) and its KV form (value + metadata), sealed (version 2) or, for entries written
//! before sealing, plain (version 1, read until they expire). Must not decide freshness (see
//! `policy`) and must not pick nonces (the caller brings them).
//!
//! Version 2 splits the envelope in two. In the clear, as the metadata line, only what a tier
//! must read before opening: `v`, `tenant`, `key` (which entry this is), `created`, `ttl`
//! (freshness, the stale window, the KV TTL), `generation` (purges) and `kid` (which seal key
//! opens it). None of it tells anything about the answer. Sealed, with the body: `status`,
//! `content_type`, `model`, `provider` and `usage` (token counts hint at the answer's size and
//! the model at what was asked). The value is `nonce ‖ XChaCha20-Poly1305(inner line ‖ '\n' ‖
//! body) ‖ tag` under the tenant's key (`seal`); the associated data is a label and the
//! metadata line itself, byte for byte, so an entry moved under another tenant's or key's name,
//! or with any clear field changed (a longer TTL, a newer generation), does not open.
//!
//! Redis form: metadata line, b'\n', value; KV form: (value, metadata line). The two carry the
//! same bytes, so the replicator copies an entry from Redis to KV without opening it (`split`).

use serde::{Deserialize, Serialize};

use crate::key::CacheKey;
use crate::seal::{KeySource, NONCE_LEN, SealError, TenantKey};

/// The format version every writer writes: sealed. A reader treats any version other than
/// this one and `PLAIN_VERSION` as a miss.
pub const ENTRY_VERSION: u32 = 2;

/// The unsealed format written before entries were sealed. Still read, so an upgrade does not
/// empty the cache; nothing writes it. The reader goes once the longest TTL plus stale window
/// (`ttl_cap_secs` + the largest `stale_if_error_secs`) has passed since the upgrade.
pub const PLAIN_VERSION: u32 = 1;

/// Fastly KV metadata limit, in bytes.
pub const MAX_METADATA_BYTES: usize = 2000;

/// Prepended to the metadata line to form the associated data of a version-2 entry.
const AD_LABEL: &[u8] = b"gateway entry v2\n";

/// Token counts of the cached answer, as reported by the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// The envelope as both tiers use it once an entry is open (whatever its version). In version
/// 1 it was the metadata line; in version 2 part of it is in the clear (`Header`) and the rest
/// is sealed with the body. New fields are added with `#[serde(default)]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The version the entry was read as (`ENTRY_VERSION` for a new one).
    pub v: u32,
    pub tenant: String,
    /// The key's hex.
    pub key: String,
    /// Unix seconds.
    pub created: u64,
    /// Seconds.
    pub ttl: u64,
    pub status: u16,
    pub content_type: String,
    pub model: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The tenant's purge generation when the entry was written. Both tiers refuse an entry
    /// from before the tenant's last purge (`policy::purged`). Absent (0) in entries written
    /// before generations existed, and when the tenant was never purged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What an entry shows without being opened (a version-2 metadata line, or the same fields of
/// a version-1 one): enough to check it belongs to the request, judge freshness and purges,
/// and pick the key that opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub v: u32,
    pub tenant: String,
    pub key: String,
    pub created: u64,
    pub ttl: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// The seal key id; `None` in version 1 (plain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

impl Header {
    /// See `Entry::kv_expiry`.
    pub fn kv_expiry(&self, stale_window_secs: u64) -> u64 {
        kv_expiry(self.created, self.ttl, stale_window_secs)
    }
}

fn kv_expiry(created: u64, ttl: u64, stale_window_secs: u64) -> u64 {
    created
        .saturating_add(ttl)
        .saturating_add(stale_window_secs)
}

/// The sealed part of a version-2 envelope.
#[derive(Serialize, Deserialize)]
struct Inner {
    status: u16,
    content_type: String,
    model: String,
    provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// Any metadata line, version 1 or 2, parsed once.
#[derive(Deserialize)]
struct Line {
    v: u32,
    tenant: String,
    key: String,
    created: u64,
    ttl: u64,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    kid: Option<String>,
    // Version 1 only.
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    usage: Option<Usage>,
}

/// A cache entry: the envelope and the response body, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

/// A stored entry taken apart without opening it: its clear header and the exact bytes of its
/// metadata line and value, which are its KV form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<'a> {
    pub header: Header,
    pub metadata: &'a str,
    pub value: &'a [u8],
}

/// Why an entry could not be encoded or used. Readers treat every variant as a miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The envelope line is longer than `MAX_METADATA_BYTES`.
    #[error("entry metadata is {0} bytes; at most {MAX_METADATA_BYTES} fit")]
    MetadataTooLarge(usize),
    /// The stored bytes are not an entry.
    #[error("malformed entry: {0}")]
    Malformed(String),
    /// Written by a different format version.
    #[error("unknown entry version {0}")]
    UnknownVersion(u32),
    /// The entry belongs to another tenant.
    #[error("entry belongs to another tenant")]
    WrongTenant,
    /// The entry was stored under another key.
    #[error("entry was stored for another key")]
    WrongKey,
    /// The KV value came without metadata.
    #[error("entry has no metadata")]
    Missing,
    /// A sealed entry that does not open here: an unknown key id, a changed byte, moved.
    #[error(transparent)]
    Seal(#[from] SealError),
}

impl EntryError {
    /// Every label [`EntryError::reason`] gives: a counter fed by another tier's word (the
    /// edge's usage records) keeps to these, so a bad record cannot add label values.
    pub const REASONS: [&'static str; 9] = [
        "metadata_too_large",
        "malformed",
        "unknown_version",
        "wrong_tenant",
        "wrong_key",
        "missing_metadata",
        "unknown_key_id",
        "unopenable",
        "seal_key",
    ];

    /// A short label for counters and log lines (`unknown_key_id`, `unopenable`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            EntryError::MetadataTooLarge(_) => "metadata_too_large",
            EntryError::Malformed(_) => "malformed",
            EntryError::UnknownVersion(_) => "unknown_version",
            EntryError::WrongTenant => "wrong_tenant",
            EntryError::WrongKey => "wrong_key",
            EntryError::Missing => "missing_metadata",
            EntryError::Seal(SealError::UnknownKeyId(_)) => "unknown_key_id",
            EntryError::Seal(SealError::TooShort(_) | SealError::Unopenable) => "unopenable",
            EntryError::Seal(_) => "seal_key",
        }
    }

    /// Whether this is a sealed entry that failed to open (what `reason` names then), as
    /// opposed to an entry that is not this request's or not an entry at all.
    pub fn is_seal_failure(&self) -> bool {
        matches!(self, EntryError::Seal(_))
    }
}

/// Only the version, read when a metadata line does not parse, so a future envelope of
/// another shape is reported as `UnknownVersion` rather than as malformed.
#[derive(Deserialize)]
struct VersionProbe {
    v: u32,
}

impl Entry {
    /// Redis form, sealed with `key` (the tenant's current key) and `nonce` (24 random bytes,
    /// never reused): metadata line, b'\n', sealed value. Fails if the metadata would not also
    /// fit in KV, so that every entry the origin stores can be replicated to the edge.
    pub fn seal(&self, key: &TenantKey, nonce: &[u8; NONCE_LEN]) -> Result<Vec<u8>, EntryError> {
        let (value, metadata) = self.seal_kv(key, nonce)?;
        Ok(redis_form(&metadata, &value))
    }

    /// KV form, sealed: (value = sealed content, metadata = the clear line, <= 2000 bytes).
    pub fn seal_kv(
        &self,
        key: &TenantKey,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<(Vec<u8>, String), EntryError> {
        let env = &self.envelope;
        let header = Header {
            v: ENTRY_VERSION,
            tenant: env.tenant.clone(),
            key: env.key.clone(),
            created: env.created,
            ttl: env.ttl,
            generation: env.generation,
            kid: Some(key.id().to_owned()),
        };
        let metadata = one_line(&header)?;
        let inner = Inner {
            status: env.status,
            content_type: env.content_type.clone(),
            model: env.model.clone(),
            provider: env.provider.clone(),
            usage: env.usage.clone(),
        };
        let mut plaintext =
            serde_json::to_vec(&inner).map_err(|e| EntryError::Malformed(e.to_string()))?;
        plaintext.push(b'\n');
        plaintext.extend_from_slice(&self.body);
        let value = key.seal(nonce, &associated_data(metadata.as_bytes()), &plaintext);
        Ok((value, metadata))
    }

    /// The version-1 (plain) Redis form. Nothing writes it any more: for tests of the
    /// version-1 reader and the benchmark's unsealed baseline; goes with that reader.
    pub fn encode_plain(&self) -> Result<Vec<u8>, EntryError> {
        let (value, metadata) = self.encode_plain_kv()?;
        Ok(redis_form(&metadata, &value))
    }

    /// The version-1 (plain) KV form; see `encode_plain`.
    pub fn encode_plain_kv(&self) -> Result<(Vec<u8>, String), EntryError> {
        let envelope = Envelope {
            v: PLAIN_VERSION,
            ..self.envelope.clone()
        };
        Ok((self.body.clone(), one_line(&envelope)?))
    }

    /// Decode the Redis form (either version) and check version, tenant and key against the
    /// request's key; a sealed entry is opened with the key `keys` gives for its key id. Any
    /// failure -> Err (callers treat it as a miss and count `EntryError::reason`).
    pub fn decode(
        bytes: &[u8],
        expect: &CacheKey,
        keys: &dyn KeySource,
    ) -> Result<Entry, EntryError> {
        let (metadata, value) = split_redis(bytes)?;
        open(metadata, value, expect, keys)
    }

    /// Decode the KV form (value and metadata) with the same checks as `decode`.
    pub fn decode_kv(
        value: &[u8],
        metadata: Option<&[u8]>,
        expect: &CacheKey,
        keys: &dyn KeySource,
    ) -> Result<Entry, EntryError> {
        let metadata = metadata.ok_or(EntryError::Missing)?;
        open(metadata, value, expect, keys)
    }

    /// Seconds since the entry was created; 0 if `created` is in the future (clock skew).
    pub fn age(&self, now: u64) -> u64 {
        now.saturating_sub(self.envelope.created)
    }

    /// When a KV copy of this entry stops being useful to the edge, in unix seconds: its
    /// freshness lifetime plus the tenant's stale-if-error window, during which the edge may
    /// still serve it when the origin is down. Both writers of the edge tier (the origin's
    /// replicator and the edge's local populate) size the KV TTL from it; the KV TTL only
    /// bounds storage, since the edge judges freshness from the envelope.
    pub fn kv_expiry(&self, stale_window_secs: u64) -> u64 {
        kv_expiry(self.envelope.created, self.envelope.ttl, stale_window_secs)
    }
}

/// The Redis form taken apart without opening it, after the same version, tenant and key
/// checks as `Entry::decode`: what the replicator copies to KV as it is.
pub fn split<'a>(bytes: &'a [u8], expect: &CacheKey) -> Result<Stored<'a>, EntryError> {
    let (metadata, value) = split_redis(bytes)?;
    let line = parse_line(metadata, expect)?;
    let metadata = std::str::from_utf8(metadata)
        .map_err(|_| EntryError::Malformed("metadata is not UTF-8".to_owned()))?;
    Ok(Stored {
        header: Header {
            v: line.v,
            tenant: line.tenant,
            key: line.key,
            created: line.created,
            ttl: line.ttl,
            generation: line.generation,
            kid: line.kid,
        },
        metadata,
        value,
    })
}

/// The Redis form of a KV pair: the metadata line, b'\n', the value (`split_redis` undoes it).
fn redis_form(metadata: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(metadata.len() + 1 + value.len());
    out.extend_from_slice(metadata.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(value);
    out
}

fn split_redis(bytes: &[u8]) -> Result<(&[u8], &[u8]), EntryError> {
    let at = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| EntryError::Malformed("no metadata line".to_owned()))?;
    Ok((&bytes[..at], &bytes[at + 1..]))
}

fn associated_data(metadata: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_LABEL.len() + metadata.len());
    ad.extend_from_slice(AD_LABEL);
    ad.extend_from_slice(metadata);
    ad
}

fn one_line<T: Serialize>(value: &T) -> Result<String, EntryError> {
    // serde_json escapes control characters in strings, so the output is one line.
    let line = serde_json::to_string(value).map_err(|e| EntryError::Malformed(e.to_string()))?;
    if line.len() > MAX_METADATA_BYTES {
        return Err(EntryError::MetadataTooLarge(line.len()));
    }
    Ok(line)
}

fn open(
    metadata: &[u8],
    value: &[u8],
    expect: &CacheKey,
    keys: &dyn KeySource,
) -> Result<Entry, EntryError> {
    let line = parse_line(metadata, expect)?;
    // What the envelope keeps besides the clear line's fields: in the line itself (version 1)
    // or sealed in front of the body (version 2).
    let (inner, body) = if line.v == PLAIN_VERSION {
        let missing = || EntryError::Malformed("version 1 envelope without its fields".into());
        let inner = Inner {
            status: line.status.ok_or_else(missing)?,
            content_type: line.content_type.ok_or_else(missing)?,
            model: line.model.ok_or_else(missing)?,
            provider: line.provider.ok_or_else(missing)?,
            usage: line.usage,
        };
        (inner, value.to_vec())
    } else {
        let kid = line
            .kid
            .ok_or_else(|| EntryError::Malformed("sealed entry without a key id".to_owned()))?;
        let key = keys
            .tenant_key(&kid, &line.tenant)
            .ok_or(SealError::UnknownKeyId(kid))?;
        // The metadata bytes are authenticated exactly as they were read.
        let mut plaintext = key.open(&associated_data(metadata), value)?;
        let (inner, _) = split_redis(&plaintext)?;
        let at = inner.len() + 1;
        let inner: Inner = serde_json::from_slice(inner)
            .map_err(|e| EntryError::Malformed(format!("sealed envelope: {e}")))?;
        // The body is the rest of the opened buffer: moved down in place, not copied out.
        plaintext.drain(..at);
        (inner, plaintext)
    };
    Ok(Entry {
        envelope: Envelope {
            v: line.v,
            tenant: line.tenant,
            key: line.key,
            created: line.created,
            ttl: line.ttl,
            status: inner.status,
            content_type: inner.content_type,
            model: inner.model,
            provider: inner.provider,
            usage: inner.usage,
            generation: line.generation,
        },
        body,
    })
}

fn parse_line(metadata: &[u8], expect: &CacheKey) -> Result<Line, EntryError> {
    // Every hit parses a metadata line: once. Only when that fails is the version read alone,
    // so a future envelope is still reported as `UnknownVersion`, not `Malformed`.
    let line: Line = match serde_json::from_slice(metadata) {
        Ok(line) => line,
        Err(e) => {
            return Err(match serde_json::from_slice::<VersionProbe>(metadata) {
                Ok(probe) if !known_version(probe.v) => EntryError::UnknownVersion(probe.v),
                _ => EntryError::Malformed(format!("envelope: {e}")),
            });
        }
    };
    if !known_version(line.v) {
        return Err(EntryError::UnknownVersion(line.v));
    }
    if line.tenant != expect.tenant() {
        return Err(EntryError::WrongTenant);
    }
    if line.key != expect.hex() {
        return Err(EntryError::WrongKey);
    }
    Ok(line)
}

fn known_version(v: u32) -> bool {
    v == ENTRY_VERSION || v == PLAIN_VERSION
}

#[cfg(test)]
mod tests;
