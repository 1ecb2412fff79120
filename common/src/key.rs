//! Cache keys: the keyed, tenant-scoped digest of a canonical request and its renderings in KV
//! and Redis. Must not change format without bumping `KEY_VERSION` (golden vectors freeze it).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::route::Route;

/// The key format version; part of the HMAC input and of every rendered key.
pub const KEY_VERSION: &str = "v1";

/// Why a tenant id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantIdError {
    #[error("tenant id is empty")]
    Empty,
    #[error("tenant id is {0} characters long; at most 64 are allowed")]
    TooLong(usize),
    #[error("tenant id contains {0:?}; only a-z, 0-9, '_' and '-' are allowed")]
    InvalidChar(char),
}

/// 1..=64 chars of [a-z0-9_-]; keeps KV and Redis keys valid and unambiguous.
pub fn validate_tenant_id(id: &str) -> Result<(), TenantIdError> {
    if id.is_empty() {
        return Err(TenantIdError::Empty);
    }
    if let Some(c) = id
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
    {
        return Err(TenantIdError::InvalidChar(c));
    }
    if id.len() > 64 {
        return Err(TenantIdError::TooLong(id.len()));
    }
    Ok(())
}

/// A tenant-scoped cache key. Two requests share a key only if they have the same tenant, route
/// and canonical body (and the same secret).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    tenant: String,
    hex: String,
}

/// The cache key secret with HMAC's keyed state (its inner and outer padded blocks) computed
/// once. A process that derives many keys holds one of these: each key then costs the
/// message's blocks only, not two more SHA-256 compressions for the secret. Everything else
/// keyed with this secret (the origin's semantic scopes and words) starts from [`KeySecret::mac`].
#[derive(Clone)]
pub struct KeySecret {
    mac: Hmac<Sha256>,
}

impl KeySecret {
    pub fn new(secret: &[u8]) -> KeySecret {
        #[allow(
            clippy::expect_used,
            reason = "HMAC is defined for keys of any length; new_from_slice cannot fail"
        )]
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .expect("HMAC-SHA-256 accepts keys of any length");
        KeySecret { mac }
    }

    /// HMAC-SHA-256 keyed with the secret, ready for its message.
    pub fn mac(&self) -> Hmac<Sha256> {
        self.mac.clone()
    }

    /// HMAC-SHA-256(secret, "v1" 0x00 tenant 0x00 route.path() 0x00 canonical), lowercase hex.
    ///
    /// `tenant` must be a valid tenant id (no 0x00), which makes the separators unambiguous.
    pub fn derive(&self, tenant: &str, route: Route, canonical: &[u8]) -> CacheKey {
        let mut mac = self.mac();
        mac.update(KEY_VERSION.as_bytes());
        mac.update(&[0]);
        mac.update(tenant.as_bytes());
        mac.update(&[0]);
        mac.update(route.path().as_bytes());
        mac.update(&[0]);
        mac.update(canonical);
        CacheKey {
            tenant: tenant.to_owned(),
            hex: lower_hex(&mac.finalize().into_bytes()),
        }
    }
}

impl std::fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySecret(..)")
    }
}

impl CacheKey {
    /// [`KeySecret::derive`] for one key: what a caller that derives a single key per secret
    /// (the edge, once per request) uses.
    pub fn derive(secret: &[u8], tenant: &str, route: Route, canonical: &[u8]) -> CacheKey {
        KeySecret::new(secret).derive(tenant, route, canonical)
    }

    /// The tenant this key belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// 64 lowercase hex chars.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The KV Store key: `v1/<tenant>/<hex>`.
    pub fn kv_key(&self) -> String {
        format!("{}{}", Self::kv_prefix(&self.tenant), self.hex)
    }

    /// The Redis key: `gw:v1:<tenant>:{<hex>}`. The hex is the Redis Cluster hash tag, so a
    /// tenant's entries spread over the cluster while an entry's flight lock and result
    /// (tagged alike) live on the entry's node.
    pub fn redis_key(&self) -> String {
        // Read on every request: joined, not formatted.
        ["gw:", KEY_VERSION, ":", &self.tenant, ":{", &self.hex, "}"].concat()
    }

    /// The KV prefix of every key of `tenant`: `v1/<tenant>/`.
    pub fn kv_prefix(tenant: &str) -> String {
        format!("{KEY_VERSION}/{tenant}/")
    }

    /// The Redis SCAN pattern of every key of `tenant`: `gw:v1:<tenant>:*`.
    pub fn redis_pattern(tenant: &str) -> String {
        format!("gw:{KEY_VERSION}:{tenant}:*")
    }

    /// Parse a hex key given by a client (DELETE /v1/cache/{key}) for the caller's tenant.
    /// `None` unless `tenant` is a valid tenant id and `hex` is 64 hex digits (either case;
    /// the key is kept in lowercase).
    pub fn from_hex(tenant: &str, hex: &str) -> Option<CacheKey> {
        validate_tenant_id(tenant).ok()?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(CacheKey {
            tenant: tenant.to_owned(),
            hex: hex.to_ascii_lowercase(),
        })
    }
}

/// The key of an `Authorization: Bearer <key>` header value (scheme case-insensitive,
/// surrounding spaces ignored); `None` for any other scheme or an empty key.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, key) = authorization.trim().split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// sha256 hex (lowercase) of an API key (how tenants.json stores keys).
pub fn api_key_digest(api_key: &str) -> String {
    lower_hex(&Sha256::digest(api_key.as_bytes()))
}

/// Lowercase hex of `bytes` (a digest, a trace or span id), encoded into its one allocation.
/// `hex::encode` collects its digits a `char` at a time through an iterator: ~1.7k
/// instructions for a digest, twice on every origin hit and three ids on every edge request.
pub fn lower_hex(bytes: &[u8]) -> String {
    let mut digits = vec![0_u8; bytes.len() * 2];
    // The lengths match, and hex digits are ASCII: neither conversion can lose anything.
    let _ = hex::encode_to_slice(bytes, &mut digits);
    String::from_utf8(digits).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer_token("Bearer sk-1"), Some("sk-1"));
        assert_eq!(bearer_token("bearer   sk-1 "), Some("sk-1"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("sk-1"), None);
    }

    #[test]
    fn tenant_ids_are_short_lowercase_tokens() {
        assert_eq!(validate_tenant_id("acme_1-b"), Ok(()));
        assert_eq!(validate_tenant_id(&"a".repeat(64)), Ok(()));
        assert_eq!(validate_tenant_id(""), Err(TenantIdError::Empty));
        assert_eq!(
            validate_tenant_id(&"a".repeat(65)),
            Err(TenantIdError::TooLong(65))
        );
        for (id, bad) in [
            ("Acme", 'A'),
            ("a/b", '/'),
            ("a:b", ':'),
            ("a b", ' '),
            ("é", 'é'),
        ] {
            assert_eq!(validate_tenant_id(id), Err(TenantIdError::InvalidChar(bad)));
        }
    }

    #[test]
    fn derive_is_the_documented_hmac() {
        // Independently: python3 -c 'import hmac,hashlib;
        // print(hmac.new(b"secret", b"v1\0acme\0/v1/embeddings\0{}", hashlib.sha256).hexdigest())'
        let key = CacheKey::derive(b"secret", "acme", Route::Embeddings, b"{}");
        assert_eq!(
            key.hex(),
            "00399010dbdc388fb065de1895b8e56e6801fc33c8339431b177c4adec8e4869"
        );
        assert_eq!(key.tenant(), "acme");
        assert_eq!(key.kv_key(), format!("v1/acme/{}", key.hex()));
        assert_eq!(key.redis_key(), format!("gw:v1:acme:{{{}}}", key.hex()));
    }

    #[test]
    fn a_kept_secret_derives_every_key_as_a_fresh_one_does() {
        // A secret longer than SHA-256's block is hashed first: that path is kept too.
        for secret in [b"secret".as_slice(), &[7_u8; 100]] {
            let kept = KeySecret::new(secret);
            for body in [b"{}".as_slice(), b"{\"a\":1}", &[b'x'; 200], b"{}"] {
                assert_eq!(
                    kept.derive("acme", Route::ChatCompletions, body),
                    CacheKey::derive(secret, "acme", Route::ChatCompletions, body)
                );
            }
        }
        assert_eq!(format!("{:?}", KeySecret::new(b"secret")), "KeySecret(..)");
    }

    #[test]
    fn tenant_route_and_secret_all_change_the_key() {
        let base = CacheKey::derive(b"s", "a", Route::ChatCompletions, b"{}");
        assert_ne!(
            base,
            CacheKey::derive(b"s", "b", Route::ChatCompletions, b"{}")
        );
        assert_ne!(
            base.hex(),
            CacheKey::derive(b"s", "b", Route::ChatCompletions, b"{}").hex()
        );
        assert_ne!(
            base.hex(),
            CacheKey::derive(b"s", "a", Route::Completions, b"{}").hex()
        );
        assert_ne!(
            base.hex(),
            CacheKey::derive(b"t", "a", Route::ChatCompletions, b"{}").hex()
        );
        assert_eq!(
            base,
            CacheKey::derive(b"s", "a", Route::ChatCompletions, b"{}")
        );
    }

    #[test]
    fn prefixes_match_rendered_keys() {
        let key = CacheKey::derive(b"s", "t", Route::ChatCompletions, b"{}");
        assert!(key.kv_key().starts_with(&CacheKey::kv_prefix("t")));
        assert_eq!(CacheKey::redis_pattern("t"), "gw:v1:t:*");
        assert!(key.redis_key().starts_with("gw:v1:t:"));
    }

    #[test]
    fn from_hex_accepts_only_well_formed_keys_for_valid_tenants() {
        let key = CacheKey::derive(b"s", "t", Route::ChatCompletions, b"{}");
        assert_eq!(CacheKey::from_hex("t", key.hex()), Some(key.clone()));
        assert_eq!(
            CacheKey::from_hex("t", &key.hex().to_ascii_uppercase()),
            Some(key.clone())
        );
        assert_eq!(CacheKey::from_hex("T", key.hex()), None);
        assert_eq!(CacheKey::from_hex("t", &key.hex()[1..]), None);
        assert_eq!(CacheKey::from_hex("t", &format!("{}0", key.hex())), None);
        assert_eq!(CacheKey::from_hex("t", &"g".repeat(64)), None);
    }

    #[test]
    fn api_key_digest_is_sha256_hex() {
        assert_eq!(
            api_key_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
