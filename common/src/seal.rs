//! Sealing: per-tenant keys derived from a shared secret (HKDF-SHA-256) and the AEAD
//! (XChaCha20-Poly1305) that encrypts an entry's content. Pure: no randomness, no clock, no
//! I/O; the caller brings the nonce (origin: `rand`, edge: the host's WASI `random_get`).
//!
//! Why XChaCha20-Poly1305: measured in wasm32-wasip1 under Viceroy (no AES instructions),
//! ChaCha20-Poly1305 seals and opens at ~14 µs/KiB where AES-256-GCM-SIV takes ~60-80 µs/KiB
//! (`just bench`, part seal-wasm); the X variant costs the same per KiB and its 192-bit nonce
//! makes a random nonce per entry safe at any volume, with no nonce state to keep anywhere.

use std::sync::Arc;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;

/// Bytes of the nonce stored in front of every sealed value.
pub const NONCE_LEN: usize = 24;

/// Bytes of the Poly1305 tag at the end of every sealed value.
pub const TAG_LEN: usize = 16;

/// HKDF's salt: a fixed label, so a seal secret shared with anything else derives other keys.
pub const HKDF_SALT: &[u8] = b"gateway seal salt";

/// HKDF's info starts with this; the key id and the tenant follow, each after a 0x00 (neither
/// may contain one), so no two (key id, tenant) pairs share an info string.
pub const HKDF_INFO: &[u8] = b"gateway seal v2";

/// The longest key id: it is written in every entry's clear metadata.
pub const MAX_KEY_ID_LEN: usize = 16;

/// Why a key could not be made or a sealed value not opened. Readers treat each as a miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Key ids are 1..=16 chars of [a-z0-9_-].
    #[error("invalid seal key id {0:?}: 1 to 16 of a-z, 0-9, '_' and '-'")]
    InvalidKeyId(String),
    /// A seal secret must not be empty.
    #[error("empty seal secret")]
    EmptySecret,
    /// The current and the previous key carry the same id.
    #[error("the previous seal key has the current key's id {0:?}")]
    DuplicateKeyId(String),
    /// The entry names a key this tier does not hold (or holds no key at all).
    #[error("entry sealed with unknown key id {0:?}")]
    UnknownKeyId(String),
    /// Shorter than a nonce and a tag.
    #[error("sealed value is {0} bytes; too short to be sealed")]
    TooShort(usize),
    /// The tag did not verify: a changed byte, another tenant's key, other associated data.
    #[error("sealed value does not open (tampered, or sealed for another tenant or key)")]
    Unopenable,
}

/// One seal secret and the id entries name it by. Not `Debug`: it holds the secret.
#[derive(Clone)]
pub struct SealKey {
    /// Shared with every key derived from it: cloning a derived key (the origin's cache hands
    /// out a clone per read) copies no string.
    id: Arc<str>,
    secret: Vec<u8>,
}

impl SealKey {
    /// `id`: 1..=16 chars of [a-z0-9_-]; `secret`: any non-empty bytes (the tiers' settings
    /// ask for 32 random bytes in production).
    pub fn new(id: &str, secret: &[u8]) -> Result<SealKey, SealError> {
        validate_key_id(id)?;
        if secret.is_empty() {
            return Err(SealError::EmptySecret);
        }
        Ok(SealKey {
            id: Arc::from(id),
            secret: secret.to_vec(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tenant's key: HKDF-SHA-256(ikm = secret, salt = `HKDF_SALT`,
    /// info = `HKDF_INFO` 0x00 key id 0x00 tenant), 32 bytes. Two HMACs: cheap enough to derive
    /// per request at the edge; the origin keeps a small map.
    pub fn tenant_key(&self, tenant: &str) -> TenantKey {
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.secret);
        let mut okm = [0_u8; 32];
        // 32 bytes is far below HKDF-SHA-256's limit of 255 * 32, so expand cannot fail.
        let _ = hkdf.expand_multi_info(
            &[HKDF_INFO, &[0], self.id.as_bytes(), &[0], tenant.as_bytes()],
            &mut okm,
        );
        TenantKey {
            id: Arc::clone(&self.id),
            cipher: XChaCha20Poly1305::new(Key::from_slice(&okm)),
            #[cfg(test)]
            raw: okm,
        }
    }
}

/// A tenant's derived key under one key id: what seals and opens that tenant's entries.
#[derive(Clone)]
pub struct TenantKey {
    id: Arc<str>,
    cipher: XChaCha20Poly1305,
    #[cfg(test)]
    raw: [u8; 32],
}

impl TenantKey {
    /// The id of the seal key this was derived from (written in the entry's metadata).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `nonce ‖ ciphertext ‖ tag` of `plaintext` with `ad` authenticated alongside. The nonce
    /// must never repeat under one key: 24 random bytes per entry.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(nonce);
        out.extend_from_slice(plaintext);
        let tag = self.cipher.encrypt_in_place_detached(
            XNonce::from_slice(nonce),
            ad,
            &mut out[NONCE_LEN..],
        );
        match tag {
            Ok(tag) => out.extend_from_slice(&tag),
            // Only for a plaintext beyond 256 GiB, which no entry is; sealing to nothing then
            // makes the entry unopenable (a miss), never a plaintext leak.
            Err(_) => out.clear(),
        }
        out
    }

    /// The plaintext of `sealed` (`nonce ‖ ciphertext ‖ tag`) if it was sealed with this key
    /// and exactly this `ad`.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::TooShort(sealed.len()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plaintext = ciphertext.to_vec();
        self.cipher
            .decrypt_in_place_detached(XNonce::from_slice(nonce), ad, &mut plaintext, tag.into())
            .map_err(|_| SealError::Unopenable)?;
        Ok(plaintext)
    }
}

/// Where a reader gets the tenant key an entry names. `None`: this tier does not hold that
/// key id (the entry is a miss).
pub trait KeySource {
    fn tenant_key(&self, key_id: &str, tenant: &str) -> Option<TenantKey>;
}

/// The seal keys a tier holds: the current one (every new entry) and, during a rotation, the
/// previous one (entries sealed before it, read until they expire).
#[derive(Clone)]
pub struct Keyring {
    current: SealKey,
    previous: Option<SealKey>,
}

impl Keyring {
    pub fn new(current: SealKey, previous: Option<SealKey>) -> Result<Keyring, SealError> {
        if let Some(previous) = &previous
            && previous.id == current.id
        {
            return Err(SealError::DuplicateKeyId(current.id.to_string()));
        }
        Ok(Keyring { current, previous })
    }

    /// The key new entries are sealed with.
    pub fn current(&self) -> &SealKey {
        &self.current
    }

    /// The key named `id`, current or previous.
    pub fn get(&self, id: &str) -> Option<&SealKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| &*k.id == id)
    }
}

impl KeySource for Keyring {
    fn tenant_key(&self, key_id: &str, tenant: &str) -> Option<TenantKey> {
        self.get(key_id).map(|k| k.tenant_key(tenant))
    }
}

/// A tier without seal keys: every sealed entry is a miss.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKeys;

impl KeySource for NoKeys {
    fn tenant_key(&self, _key_id: &str, _tenant: &str) -> Option<TenantKey> {
        None
    }
}

/// 1..=16 chars of [a-z0-9_-].
pub fn validate_key_id(id: &str) -> Result<(), SealError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SealError::InvalidKeyId(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, secret: &[u8]) -> SealKey {
        SealKey::new(id, secret).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_with_the_same_key_and_associated_data_only() {
        let k = key("k1", b"secret").tenant_key("acme");
        let sealed = k.seal(&[9; NONCE_LEN], b"ad", b"the answer");
        assert_eq!(sealed.len(), NONCE_LEN + 10 + TAG_LEN);
        assert!(!sealed.windows(10).any(|w| w == b"the answer"));
        assert_eq!(k.open(b"ad", &sealed).unwrap(), b"the answer");
        assert_eq!(k.open(b"AD", &sealed), Err(SealError::Unopenable));
        let other_tenant = key("k1", b"secret").tenant_key("other");
        assert_eq!(
            other_tenant.open(b"ad", &sealed),
            Err(SealError::Unopenable)
        );
        let other_id = key("k2", b"secret").tenant_key("acme");
        assert_eq!(other_id.open(b"ad", &sealed), Err(SealError::Unopenable));
        for i in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[i] ^= 1;
            assert_eq!(k.open(b"ad", &flipped), Err(SealError::Unopenable), "{i}");
        }
        assert_eq!(k.open(b"ad", &sealed[..39]), Err(SealError::TooShort(39)));
    }

    #[test]
    fn tenant_keys_differ_by_tenant_key_id_and_secret() {
        let a = key("k1", b"s").tenant_key("acme").raw;
        assert_ne!(a, key("k1", b"s").tenant_key("acmf").raw);
        assert_ne!(a, key("k2", b"s").tenant_key("acme").raw);
        assert_ne!(a, key("k1", b"t").tenant_key("acme").raw);
        assert_eq!(a, key("k1", b"s").tenant_key("acme").raw);
    }

    #[test]
    fn the_keyring_finds_current_and_previous_and_nothing_else() {
        let ring = Keyring::new(key("k2", b"new"), Some(key("k1", b"old"))).unwrap();
        assert_eq!(ring.current().id(), "k2");
        assert_eq!(ring.get("k1").map(SealKey::id), Some("k1"));
        assert!(ring.get("k3").is_none());
        assert!(ring.tenant_key("k3", "acme").is_none());
        assert!(NoKeys.tenant_key("k1", "acme").is_none());
        assert_eq!(
            Keyring::new(key("k1", b"a"), Some(key("k1", b"b"))).err(),
            Some(SealError::DuplicateKeyId("k1".into()))
        );
    }

    #[test]
    fn key_ids_and_secrets_are_checked() {
        assert!(SealKey::new("k1", b"").is_err());
        for bad in ["", "K1", "k 1", "k\u{0}1", "abcdefghijklmnopq"] {
            assert!(SealKey::new(bad, b"s").is_err(), "{bad:?}");
        }
        assert!(SealKey::new("2026-06_a", b"s").is_ok());
    }
}
