//! The stored cache entry: a response body plus a small versioned envelope, in its Redis form
//! (one buffer) and its KV form (value + metadata). Must not decide freshness (see `policy`).

use serde::{Deserialize, Serialize};

use crate::key::CacheKey;

/// The envelope format version. A reader treats any other version as a miss.
pub const ENTRY_VERSION: u32 = 1;

/// Fastly KV metadata limit, in bytes.
pub const MAX_METADATA_BYTES: usize = 2000;

/// Token counts of the cached answer, as reported by the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// The envelope. Serialized as one line of JSON (the KV metadata). New fields are added with
/// `#[serde(default)]` so older readers of the same version keep working; unknown fields are
/// ignored on read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// `ENTRY_VERSION`.
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

/// A cache entry: the envelope and the response body, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub envelope: Envelope,
    pub body: Vec<u8>,
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
}

/// Only the version, read when an envelope does not parse, so a future envelope of another
/// shape is reported as `UnknownVersion` rather than as malformed.
#[derive(Deserialize)]
struct VersionProbe {
    v: u32,
}

impl Entry {
    /// Redis form: metadata line, b'\n', body. Fails if the metadata would not also fit in KV,
    /// so that every entry the origin stores can be replicated to the edge.
    pub fn encode(&self) -> Result<Vec<u8>, EntryError> {
        let metadata = self.metadata()?;
        let mut out = Vec::with_capacity(metadata.len() + 1 + self.body.len());
        out.extend_from_slice(metadata.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// KV form: (value = body, metadata = one-line JSON <= 2000 bytes).
    pub fn encode_kv(&self) -> Result<(Vec<u8>, String), EntryError> {
        Ok((self.body.clone(), self.metadata()?))
    }

    /// Decode the Redis form and check version, tenant and key against the request's key. Any
    /// failure -> Err (callers treat it as a miss).
    pub fn decode(bytes: &[u8], expect: &CacheKey) -> Result<Entry, EntryError> {
        let split = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| EntryError::Malformed("no metadata line".to_owned()))?;
        let envelope = decode_envelope(&bytes[..split], expect)?;
        Ok(Entry {
            envelope,
            body: bytes[split + 1..].to_vec(),
        })
    }

    /// Decode the KV form (value and metadata) with the same checks as `decode`.
    pub fn decode_kv(
        value: Vec<u8>,
        metadata: Option<&[u8]>,
        expect: &CacheKey,
    ) -> Result<Entry, EntryError> {
        let metadata = metadata.ok_or(EntryError::Missing)?;
        let envelope = decode_envelope(metadata, expect)?;
        Ok(Entry {
            envelope,
            body: value,
        })
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
        self.envelope
            .created
            .saturating_add(self.envelope.ttl)
            .saturating_add(stale_window_secs)
    }

    fn metadata(&self) -> Result<String, EntryError> {
        // serde_json escapes control characters in strings, so the output is one line.
        let line = serde_json::to_string(&self.envelope)
            .map_err(|e| EntryError::Malformed(e.to_string()))?;
        if line.len() > MAX_METADATA_BYTES {
            return Err(EntryError::MetadataTooLarge(line.len()));
        }
        Ok(line)
    }
}

fn decode_envelope(metadata: &[u8], expect: &CacheKey) -> Result<Envelope, EntryError> {
    // Every hit decodes an envelope: parse it once. Only when that fails is the version read
    // alone, so a future envelope is still reported as `UnknownVersion`, not `Malformed`.
    let envelope: Envelope = match serde_json::from_slice(metadata) {
        Ok(envelope) => envelope,
        Err(e) => {
            return Err(match serde_json::from_slice::<VersionProbe>(metadata) {
                Ok(probe) if probe.v != ENTRY_VERSION => EntryError::UnknownVersion(probe.v),
                _ => EntryError::Malformed(format!("envelope: {e}")),
            });
        }
    };
    if envelope.v != ENTRY_VERSION {
        return Err(EntryError::UnknownVersion(envelope.v));
    }
    if envelope.tenant != expect.tenant() {
        return Err(EntryError::WrongTenant);
    }
    if envelope.key != expect.hex() {
        return Err(EntryError::WrongKey);
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Route;

    fn key(tenant: &str, body: &[u8]) -> CacheKey {
        CacheKey::derive(b"secret", tenant, Route::ChatCompletions, body)
    }

    fn entry(key: &CacheKey) -> Entry {
        Entry {
            envelope: Envelope {
                v: ENTRY_VERSION,
                tenant: key.tenant().to_owned(),
                key: key.hex().to_owned(),
                created: 1_700_000_000,
                ttl: 3600,
                status: 200,
                content_type: "application/json".to_owned(),
                model: "gpt-4o-mini".to_owned(),
                provider: "openai".to_owned(),
                usage: Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 5,
                    total_tokens: 8,
                }),
                generation: 0,
            },
            body: b"{\"id\":\"x\"}\n\nwith newlines\n".to_vec(),
        }
    }

    #[test]
    fn the_kv_lifetime_is_the_ttl_plus_the_stale_window_from_creation() {
        let at = |created: u64, ttl: u64| {
            let mut e = entry(&key("acme", b"{}"));
            e.envelope.created = created;
            e.envelope.ttl = ttl;
            e
        };
        assert_eq!(at(1_000, 3600).kv_expiry(86_400), 1_000 + 3600 + 86_400);
        assert_eq!(at(1_000, 60).kv_expiry(0), 1_060);
        assert_eq!(at(u64::MAX - 1, 60).kv_expiry(60), u64::MAX);
    }

    #[test]
    fn redis_form_round_trips_and_keeps_body_bytes() {
        let k = key("acme", b"{}");
        let e = entry(&k);
        let bytes = e.encode().unwrap();
        assert_eq!(Entry::decode(&bytes, &k).unwrap(), e);
    }

    #[test]
    fn kv_form_round_trips_with_one_line_metadata() {
        let k = key("acme", b"{}");
        let mut e = entry(&k);
        e.envelope.model = "line\nbreak".to_owned();
        let (value, metadata) = e.encode_kv().unwrap();
        assert!(!metadata.contains('\n'));
        assert_eq!(
            Entry::decode_kv(value, Some(metadata.as_bytes()), &k).unwrap(),
            e
        );
    }

    #[test]
    fn the_generation_is_written_only_once_the_tenant_has_purged() {
        let k = key("acme", b"{}");
        let mut e = entry(&k);
        let (_, metadata) = e.encode_kv().unwrap();
        assert!(
            !metadata.contains("generation"),
            "older readers see what they always saw"
        );
        e.envelope.generation = 3;
        let (value, metadata) = e.encode_kv().unwrap();
        assert!(metadata.contains(r#""generation":3"#));
        let back = Entry::decode_kv(value, Some(metadata.as_bytes()), &k).unwrap();
        assert_eq!(back.envelope.generation, 3);
    }

    #[test]
    fn usage_is_optional_in_the_envelope() {
        let k = key("acme", b"{}");
        let mut e = entry(&k);
        e.envelope.usage = None;
        let (_, metadata) = e.encode_kv().unwrap();
        assert!(!metadata.contains("usage"));
        assert_eq!(
            Entry::decode_kv(e.body.clone(), Some(metadata.as_bytes()), &k).unwrap(),
            e
        );
    }

    #[test]
    fn an_entry_for_another_tenant_or_key_is_refused() {
        let k = key("acme", b"{}");
        let bytes = entry(&k).encode().unwrap();
        let other_tenant = CacheKey::from_hex("other", k.hex()).unwrap();
        assert_eq!(
            Entry::decode(&bytes, &other_tenant),
            Err(EntryError::WrongTenant)
        );
        assert_eq!(
            Entry::decode(&bytes, &key("acme", b"[]")),
            Err(EntryError::WrongKey)
        );
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        let k = key("acme", b"{}");
        let mut e = entry(&k);
        e.envelope.v = 2;
        let bytes = e.encode().unwrap();
        assert_eq!(
            Entry::decode(&bytes, &k),
            Err(EntryError::UnknownVersion(2))
        );
        // A future envelope of another shape is still an unknown version, not garbage.
        assert_eq!(
            Entry::decode(b"{\"v\":3,\"shape\":\"new\"}\nbody", &k),
            Err(EntryError::UnknownVersion(3))
        );
        assert!(matches!(
            Entry::decode(b"no newline", &k),
            Err(EntryError::Malformed(_))
        ));
        assert!(matches!(
            Entry::decode(b"{\"v\":1}\nbody", &k),
            Err(EntryError::Malformed(_))
        ));
        assert_eq!(
            Entry::decode_kv(Vec::new(), None, &k),
            Err(EntryError::Missing)
        );
    }

    #[test]
    fn future_fields_are_ignored_on_read() {
        let k = key("acme", b"{}");
        let e = entry(&k);
        let (_, metadata) = e.encode_kv().unwrap();
        let extended = metadata.replacen('{', "{\"later\":[1,2],", 1);
        assert_eq!(
            Entry::decode_kv(e.body.clone(), Some(extended.as_bytes()), &k).unwrap(),
            e
        );
    }

    #[test]
    fn oversized_metadata_is_refused_in_both_forms() {
        let k = key("acme", b"{}");
        let mut e = entry(&k);
        e.envelope.model = "m".repeat(MAX_METADATA_BYTES);
        assert!(matches!(e.encode(), Err(EntryError::MetadataTooLarge(_))));
        assert!(matches!(
            e.encode_kv(),
            Err(EntryError::MetadataTooLarge(_))
        ));
    }

    #[test]
    fn age_saturates_under_clock_skew() {
        let e = entry(&key("acme", b"{}"));
        assert_eq!(e.age(1_700_000_010), 10);
        assert_eq!(e.age(1_600_000_000), 0);
    }
}
