//! Golden vectors of sealed entries (fixtures/golden_seal.json, computed by
//! scripts/golden-seal.py with an independent HKDF and XChaCha20-Poly1305): the frozen
//! version-2 format, and the tampering each must refuse. Plain `#[test]`s over `include_str!`,
//! so it also runs as wasm32-wasip1 (`just test-wasm`): edge and origin seal alike.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: a panic is the failure report"
)]

use gateway_common::entry::{ENTRY_VERSION, Entry, EntryError, Envelope, Usage};
use gateway_common::key::CacheKey;
use gateway_common::seal::{Keyring, NoKeys, SealError, SealKey};

const GOLDEN: &str = include_str!("../../fixtures/golden_seal.json");

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    secret_hex: String,
    key_id: String,
    hkdf_salt: String,
    hkdf_info: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    tenant: String,
    key: String,
    tenant_key_hex: String,
    created: u64,
    ttl: u64,
    generation: u64,
    status: u16,
    content_type: String,
    model: String,
    provider: String,
    usage: Option<Usage>,
    body: String,
    nonce_hex: String,
    metadata: String,
    value_hex: String,
}

struct Vector {
    ring: Keyring,
    cases: Vec<Case>,
}

fn golden() -> Vector {
    let g: Golden = serde_json::from_str(GOLDEN).expect("fixtures/golden_seal.json parses");
    assert_eq!(g.hkdf_salt.as_bytes(), gateway_common::seal::HKDF_SALT);
    assert_eq!(g.hkdf_info.as_bytes(), gateway_common::seal::HKDF_INFO);
    let secret = hex::decode(&g.secret_hex).unwrap();
    let ring = Keyring::new(SealKey::new(&g.key_id, &secret).unwrap(), None).unwrap();
    assert!(g.cases.len() >= 3);
    Vector {
        ring,
        cases: g.cases,
    }
}

impl Case {
    fn cache_key(&self) -> CacheKey {
        CacheKey::from_hex(&self.tenant, &self.key).unwrap()
    }

    fn entry(&self) -> Entry {
        Entry {
            envelope: Envelope {
                v: ENTRY_VERSION,
                tenant: self.tenant.clone(),
                key: self.key.clone(),
                created: self.created,
                ttl: self.ttl,
                status: self.status,
                content_type: self.content_type.clone(),
                model: self.model.clone(),
                provider: self.provider.clone(),
                usage: self.usage.clone(),
                generation: self.generation,
            },
            body: self.body.as_bytes().to_vec(),
        }
    }

    fn nonce(&self) -> [u8; 24] {
        hex::decode(&self.nonce_hex).unwrap().try_into().unwrap()
    }

    fn value(&self) -> Vec<u8> {
        hex::decode(&self.value_hex).unwrap()
    }

    fn open(
        &self,
        value: &[u8],
        metadata: &str,
        as_key: &CacheKey,
        ring: &Keyring,
    ) -> Result<Entry, EntryError> {
        Entry::decode_kv(value, Some(metadata.as_bytes()), as_key, ring)
    }
}

#[test]
fn every_golden_entry_seals_to_the_frozen_bytes_in_both_forms() {
    let g = golden();
    for case in &g.cases {
        let tenant_key = g.ring.current().tenant_key(&case.tenant);
        let (value, metadata) = case.entry().seal_kv(&tenant_key, &case.nonce()).unwrap();
        assert_eq!(metadata, case.metadata, "{}: metadata", case.name);
        assert_eq!(hex::encode(&value), case.value_hex, "{}: value", case.name);
        let redis = case.entry().seal(&tenant_key, &case.nonce()).unwrap();
        let expected = [case.metadata.as_bytes(), b"\n", &value].concat();
        assert_eq!(redis, expected, "{}: the Redis form", case.name);
        assert!(!case.tenant_key_hex.is_empty());
    }
}

#[test]
fn every_golden_entry_opens_to_its_envelope_and_body() {
    let g = golden();
    for case in &g.cases {
        let opened = case
            .open(&case.value(), &case.metadata, &case.cache_key(), &g.ring)
            .unwrap();
        assert_eq!(opened, case.entry(), "{}", case.name);
    }
}

#[test]
fn a_flipped_byte_in_a_golden_value_is_refused() {
    let g = golden();
    for case in &g.cases {
        let value = case.value();
        for i in [
            0,
            23,
            24,
            value.len() / 2,
            value.len() - 16,
            value.len() - 1,
        ] {
            let mut flipped = value.clone();
            flipped[i] ^= 0x01;
            assert_eq!(
                case.open(&flipped, &case.metadata, &case.cache_key(), &g.ring),
                Err(EntryError::Seal(SealError::Unopenable)),
                "{}: byte {i}",
                case.name
            );
        }
    }
}

#[test]
fn a_golden_entry_under_another_tenant_or_key_is_refused() {
    let g = golden();
    let case = &g.cases[0];
    let value = case.value();
    let other_tenant = CacheKey::from_hex("other", &case.key).unwrap();
    let other_key = CacheKey::from_hex(&case.tenant, &"e".repeat(64)).unwrap();
    assert_eq!(
        case.open(&value, &case.metadata, &other_tenant, &g.ring),
        Err(EntryError::WrongTenant)
    );
    assert_eq!(
        case.open(&value, &case.metadata, &other_key, &g.ring),
        Err(EntryError::WrongKey)
    );
    let renamed = case.metadata.replace("\"acme\"", "\"other\"");
    assert_eq!(
        case.open(&value, &renamed, &other_tenant, &g.ring),
        Err(EntryError::Seal(SealError::Unopenable))
    );
    let rekeyed = case.metadata.replace(&case.key, &"e".repeat(64));
    assert_eq!(
        case.open(&value, &rekeyed, &other_key, &g.ring),
        Err(EntryError::Seal(SealError::Unopenable))
    );
    let longer = case.metadata.replace("\"ttl\":3600", "\"ttl\":360000");
    assert_eq!(
        case.open(&value, &longer, &case.cache_key(), &g.ring),
        Err(EntryError::Seal(SealError::Unopenable))
    );
}

#[test]
fn a_golden_entry_is_a_miss_where_its_key_id_is_unknown() {
    let g = golden();
    let case = &g.cases[0];
    let other = Keyring::new(SealKey::new("k2", &[0; 32]).unwrap(), None).unwrap();
    let unknown = Err(EntryError::Seal(SealError::UnknownKeyId("k1".into())));
    assert_eq!(
        case.open(&case.value(), &case.metadata, &case.cache_key(), &other),
        unknown
    );
    assert_eq!(
        Entry::decode_kv(
            &case.value(),
            Some(case.metadata.as_bytes()),
            &case.cache_key(),
            &NoKeys
        ),
        unknown
    );
    let renamed = case.metadata.replace("\"kid\":\"k1\"", "\"kid\":\"k9\"");
    assert_eq!(
        case.open(&case.value(), &renamed, &case.cache_key(), &g.ring),
        Err(EntryError::Seal(SealError::UnknownKeyId("k9".into())))
    );
}
