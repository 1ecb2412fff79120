//! The entry format's unit tests: both forms, sealing, tampering, rotation and version 1.

use super::*;
use crate::route::Route;
use crate::seal::{Keyring, NoKeys, SealKey};

const NONCE: [u8; NONCE_LEN] = [7; NONCE_LEN];

fn key(tenant: &str, body: &[u8]) -> CacheKey {
    CacheKey::derive(b"secret", tenant, Route::ChatCompletions, body)
}

fn ring() -> Keyring {
    Keyring::new(SealKey::new("k1", b"seal secret").unwrap(), None).unwrap()
}

fn tenant_key(tenant: &str) -> TenantKey {
    ring().current().tenant_key(tenant)
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
        body: b"{\"id\":\"x\",\"secret answer\":1}\n\nwith newlines\n".to_vec(),
    }
}

fn sealed_kv(e: &Entry) -> (Vec<u8>, String) {
    e.seal_kv(&tenant_key(&e.envelope.tenant), &NONCE).unwrap()
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
fn the_sealed_redis_form_round_trips_and_keeps_body_bytes() {
    let k = key("acme", b"{}");
    let e = entry(&k);
    let bytes = e.seal(&tenant_key("acme"), &NONCE).unwrap();
    assert_eq!(Entry::decode(&bytes, &k, &ring()).unwrap(), e);
}

#[test]
fn the_sealed_kv_form_round_trips_and_is_the_redis_form_split() {
    let k = key("acme", b"{}");
    let mut e = entry(&k);
    e.envelope.model = "line\nbreak".to_owned();
    let (value, metadata) = sealed_kv(&e);
    assert!(!metadata.contains('\n'));
    assert_eq!(
        Entry::decode_kv(&value, Some(metadata.as_bytes()), &k, &ring()).unwrap(),
        e
    );
    let redis = e.seal(&tenant_key("acme"), &NONCE).unwrap();
    let stored = split(&redis, &k).unwrap();
    assert_eq!((stored.value, stored.metadata), (&value[..], &metadata[..]));
    assert_eq!(stored.header.kid.as_deref(), Some("k1"));
    assert_eq!(stored.header.kv_expiry(10), e.kv_expiry(10));
}

#[test]
fn a_sealed_entry_shows_nothing_of_the_answer_in_the_clear() {
    let k = key("acme", b"{}");
    let (value, metadata) = sealed_kv(&entry(&k));
    for hidden in [
        "secret answer",
        "gpt-4o-mini",
        "openai",
        "application/json",
        "usage",
    ] {
        assert!(!metadata.contains(hidden), "{hidden} in {metadata}");
        assert!(
            !value.windows(hidden.len()).any(|w| w == hidden.as_bytes()),
            "{hidden} in the value"
        );
    }
    assert_eq!(
        metadata,
        format!(
            r#"{{"v":2,"tenant":"acme","key":"{}","created":1700000000,"ttl":3600,"kid":"k1"}}"#,
            k.hex()
        )
    );
}

#[test]
fn a_flipped_byte_anywhere_in_the_value_does_not_open() {
    let k = key("acme", b"{}");
    let (value, metadata) = sealed_kv(&entry(&k));
    for i in [0, NONCE_LEN, value.len() / 2, value.len() - 1] {
        let mut flipped = value.clone();
        flipped[i] ^= 0x80;
        let got = Entry::decode_kv(&flipped, Some(metadata.as_bytes()), &k, &ring());
        assert_eq!(
            got,
            Err(EntryError::Seal(SealError::Unopenable)),
            "byte {i}"
        );
        assert_eq!(got.unwrap_err().reason(), "unopenable");
    }
}

#[test]
fn a_changed_clear_field_does_not_open() {
    let k = key("acme", b"{}");
    let (value, metadata) = sealed_kv(&entry(&k));
    for (from, to) in [
        ("\"ttl\":3600", "\"ttl\":9600"),
        ("\"created\":1700000000", "\"created\":1800000000"),
        ("\"kid\":\"k1\"}", "\"kid\":\"k1\",\"generation\":9}"),
    ] {
        let changed = metadata.replace(from, to);
        assert_ne!(changed, metadata);
        assert_eq!(
            Entry::decode_kv(&value, Some(changed.as_bytes()), &k, &ring()),
            Err(EntryError::Seal(SealError::Unopenable)),
            "{to}"
        );
    }
}

#[test]
fn an_entry_moved_to_another_tenant_or_key_is_refused() {
    let k = key("acme", b"{}");
    let (value, metadata) = sealed_kv(&entry(&k));
    // Copied as it is: the clear checks refuse it.
    let other_tenant = CacheKey::from_hex("other", k.hex()).unwrap();
    let other_key = key("acme", b"[]");
    let decode = |meta: &str, expect: &CacheKey| {
        Entry::decode_kv(&value, Some(meta.as_bytes()), expect, &ring())
    };
    assert_eq!(
        decode(&metadata, &other_tenant),
        Err(EntryError::WrongTenant)
    );
    assert_eq!(decode(&metadata, &other_key), Err(EntryError::WrongKey));
    // With its metadata rewritten to match: it does not open.
    let renamed = metadata.replace("\"acme\"", "\"other\"");
    assert_eq!(
        decode(&renamed, &other_tenant),
        Err(EntryError::Seal(SealError::Unopenable))
    );
    let rekeyed = metadata.replace(k.hex(), other_key.hex());
    assert_eq!(
        decode(&rekeyed, &other_key),
        Err(EntryError::Seal(SealError::Unopenable))
    );
}

#[test]
fn an_unknown_key_id_or_no_keys_at_all_is_a_miss() {
    let k = key("acme", b"{}");
    let (value, metadata) = sealed_kv(&entry(&k));
    let other = Keyring::new(SealKey::new("k2", b"seal secret").unwrap(), None).unwrap();
    let unknown = Err(EntryError::Seal(SealError::UnknownKeyId("k1".into())));
    assert_eq!(
        Entry::decode_kv(&value, Some(metadata.as_bytes()), &k, &other),
        unknown
    );
    assert_eq!(
        Entry::decode_kv(&value, Some(metadata.as_bytes()), &k, &NoKeys),
        unknown
    );
    assert_eq!(
        EntryError::Seal(SealError::UnknownKeyId("k1".into())).reason(),
        "unknown_key_id"
    );
}

#[test]
fn after_a_rotation_the_previous_key_still_opens_its_entries() {
    let k = key("acme", b"{}");
    let e = entry(&k);
    let bytes = e.seal(&tenant_key("acme"), &NONCE).unwrap();
    let rotated = Keyring::new(
        SealKey::new("k2", b"new secret").unwrap(),
        Some(SealKey::new("k1", b"seal secret").unwrap()),
    )
    .unwrap();
    assert_eq!(Entry::decode(&bytes, &k, &rotated).unwrap(), e);
    let new = e
        .seal(&rotated.current().tenant_key("acme"), &NONCE)
        .unwrap();
    assert_eq!(split(&new, &k).unwrap().header.kid.as_deref(), Some("k2"));
    assert!(Entry::decode(&new, &k, &ring()).is_err());
}

#[test]
fn plain_version_1_entries_are_still_read_with_or_without_keys() {
    let k = key("acme", b"{}");
    let e = entry(&k);
    let bytes = e.encode_plain().unwrap();
    let read = Entry::decode(&bytes, &k, &NoKeys).unwrap();
    assert_eq!(read.envelope.v, PLAIN_VERSION);
    assert_eq!(read.body, e.body);
    assert_eq!(read.envelope.usage, e.envelope.usage);
    let (value, metadata) = e.encode_plain_kv().unwrap();
    let stored = split(&bytes, &k).unwrap();
    assert_eq!((stored.value, stored.metadata), (&value[..], &metadata[..]));
    assert_eq!(stored.header.kid, None);
}

#[test]
fn the_generation_is_in_the_clear_only_once_the_tenant_has_purged() {
    let k = key("acme", b"{}");
    let mut e = entry(&k);
    let (_, metadata) = sealed_kv(&e);
    assert!(!metadata.contains("generation"));
    e.envelope.generation = 3;
    let (value, metadata) = sealed_kv(&e);
    assert!(metadata.contains(r#""generation":3"#));
    let back = Entry::decode_kv(&value, Some(metadata.as_bytes()), &k, &ring()).unwrap();
    assert_eq!(back.envelope.generation, 3);
}

#[test]
fn usage_is_optional_in_the_sealed_envelope() {
    let k = key("acme", b"{}");
    let mut e = entry(&k);
    e.envelope.usage = None;
    let (value, metadata) = sealed_kv(&e);
    assert_eq!(
        Entry::decode_kv(&value, Some(metadata.as_bytes()), &k, &ring()).unwrap(),
        e
    );
}

#[test]
fn unknown_versions_and_garbage_are_refused() {
    let k = key("acme", b"{}");
    let mut e = entry(&k);
    e.envelope.v = 3;
    let (value, metadata) = e.encode_plain_kv().unwrap();
    let v3 = metadata.replacen("\"v\":1", "\"v\":3", 1);
    assert_eq!(
        Entry::decode_kv(&value, Some(v3.as_bytes()), &k, &ring()),
        Err(EntryError::UnknownVersion(3))
    );
    // A future envelope of another shape is still an unknown version, not garbage.
    assert_eq!(
        Entry::decode(b"{\"v\":3,\"shape\":\"new\"}\nbody", &k, &ring()),
        Err(EntryError::UnknownVersion(3))
    );
    assert!(matches!(
        Entry::decode(b"no newline", &k, &ring()),
        Err(EntryError::Malformed(_))
    ));
    assert!(matches!(
        Entry::decode(b"{\"v\":1}\nbody", &k, &ring()),
        Err(EntryError::Malformed(_))
    ));
    let sealed_without_kid = format!(
        r#"{{"v":2,"tenant":"acme","key":"{}","created":1,"ttl":1}}"#,
        k.hex()
    );
    assert!(matches!(
        Entry::decode_kv(b"x", Some(sealed_without_kid.as_bytes()), &k, &ring()),
        Err(EntryError::Malformed(_))
    ));
    assert_eq!(
        Entry::decode_kv(&[], None, &k, &ring()),
        Err(EntryError::Missing)
    );
}

#[test]
fn future_fields_of_a_plain_entry_are_ignored_on_read() {
    let k = key("acme", b"{}");
    let e = entry(&k);
    let (value, metadata) = e.encode_plain_kv().unwrap();
    let extended = metadata.replacen('{', "{\"later\":[1,2],", 1);
    let read = Entry::decode_kv(&value, Some(extended.as_bytes()), &k, &NoKeys).unwrap();
    assert_eq!(read.body, e.body);
}

#[test]
fn oversized_metadata_is_refused_in_both_forms() {
    let k = key("acme", b"{}");
    let mut e = entry(&k);
    e.envelope.model = "m".repeat(MAX_METADATA_BYTES);
    assert!(matches!(
        e.encode_plain(),
        Err(EntryError::MetadataTooLarge(_))
    ));
    // Sealed, the model is inside the value: only the clear line is bounded.
    assert!(e.seal(&tenant_key("acme"), &NONCE).is_ok());
    e.envelope.tenant = "t".repeat(MAX_METADATA_BYTES);
    assert!(matches!(
        e.seal_kv(&tenant_key("acme"), &NONCE),
        Err(EntryError::MetadataTooLarge(_))
    ));
}

#[test]
fn age_saturates_under_clock_skew() {
    let e = entry(&key("acme", b"{}"));
    assert_eq!(e.age(1_700_000_010), 10);
    assert_eq!(e.age(1_600_000_000), 0);
}

#[test]
fn every_reason_is_listed() {
    let errors = [
        EntryError::MetadataTooLarge(1),
        EntryError::Malformed(String::new()),
        EntryError::UnknownVersion(9),
        EntryError::WrongTenant,
        EntryError::WrongKey,
        EntryError::Missing,
        EntryError::Seal(SealError::UnknownKeyId("k9".into())),
        EntryError::Seal(SealError::TooShort(3)),
        EntryError::Seal(SealError::Unopenable),
        EntryError::Seal(SealError::EmptySecret),
    ];
    for error in &errors {
        assert!(EntryError::REASONS.contains(&error.reason()), "{error:?}");
    }
}
