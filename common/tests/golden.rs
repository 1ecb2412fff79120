//! Golden vectors: the frozen key format (fixtures/golden_keys.json). Compiled in with
//! `include_str!` and kept to plain `#[test]`s, so it also runs as wasm32-wasip1 (no threads,
//! filesystem or clock). A failure here means the key format changed: bump `KEY_VERSION`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: a panic is the failure report"
)]

use gateway_common::canonical::{
    DEFAULT_MAX_BODY_BYTES, RequestError, canonicalize, parse_request,
};
use gateway_common::key::CacheKey;
use gateway_common::route::Route;

const GOLDEN: &str = include_str!("../../fixtures/golden_keys.json");

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    secret_hex: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    tenant: String,
    route: String,
    body: String,
    canonical: Option<String>,
    key: Option<String>,
    kv_key: Option<String>,
    redis_key: Option<String>,
    error: Option<String>,
}

fn golden() -> Golden {
    serde_json::from_str(GOLDEN).expect("fixtures/golden_keys.json parses")
}

fn secret(g: &Golden) -> Vec<u8> {
    hex::decode(&g.secret_hex).expect("secret_hex is hex")
}

fn variant(e: &RequestError) -> &'static str {
    match e {
        RequestError::TooLarge { .. } => "TooLarge",
        RequestError::InvalidJson(_) => "InvalidJson",
        RequestError::DuplicateKey(_) => "DuplicateKey",
        RequestError::NotAnObject => "NotAnObject",
        RequestError::MissingField(_) => "MissingField",
        RequestError::InvalidField { .. } => "InvalidField",
    }
}

fn key_of(g: &Golden, name: &str) -> String {
    g.cases
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| c.key.clone())
        .unwrap_or_else(|| panic!("golden case {name} has a key"))
}

#[test]
fn every_golden_case_parses_canonicalizes_and_keys_as_frozen() {
    let g = golden();
    let secret = secret(&g);
    assert!(g.cases.len() >= 20, "only {} golden cases", g.cases.len());
    for case in &g.cases {
        let name = &case.name;
        let route = Route::from_path(&case.route).expect("golden route is a route");
        match parse_request(route, case.body.as_bytes(), DEFAULT_MAX_BODY_BYTES) {
            Err(e) => {
                assert_eq!(Some(variant(&e)), case.error.as_deref(), "{name}: {e}");
                assert!(case.canonical.is_none() && case.key.is_none(), "{name}");
            }
            Ok(parsed) => {
                assert_eq!(case.error, None, "{name}: expected an error");
                let canonical = parsed
                    .canonical
                    .map(|c| String::from_utf8(c).expect("utf-8"));
                assert_eq!(canonical, case.canonical, "{name}: canonical");
                let key =
                    canonical.map(|c| CacheKey::derive(&secret, &case.tenant, route, c.as_bytes()));
                assert_eq!(
                    key.as_ref().map(|k| k.hex().to_owned()),
                    case.key,
                    "{name}: key"
                );
                assert_eq!(
                    key.as_ref().map(CacheKey::kv_key),
                    case.kv_key,
                    "{name}: kv_key"
                );
                assert_eq!(
                    key.as_ref().map(CacheKey::redis_key),
                    case.redis_key,
                    "{name}: redis_key"
                );
            }
        }
    }
}

#[test]
fn golden_canonical_forms_are_fixed_points() {
    for case in golden().cases {
        if let Some(canonical) = case.canonical {
            assert_eq!(
                canonicalize(canonical.as_bytes()),
                Ok(Some(canonical.clone().into_bytes())),
                "{}",
                case.name
            );
        }
    }
}

#[test]
fn equivalent_bodies_share_the_basic_key() {
    let g = golden();
    let basic = key_of(&g, "basic_chat");
    for name in ["reordered_keys", "whitespace", "dropped_fields"] {
        assert_eq!(key_of(&g, name), basic, "{name}");
    }
    assert_eq!(key_of(&g, "float_1_0"), key_of(&g, "integer_1"));
}

#[test]
fn tenant_route_and_kept_fields_change_the_key() {
    let g = golden();
    let basic = key_of(&g, "basic_chat");
    for name in [
        "tenant_changes_key",
        "unknown_field_kept",
        "float_0_1",
        "big_int_exact",
    ] {
        assert_ne!(key_of(&g, name), basic, "{name}");
    }
    assert_ne!(
        key_of(&g, "route_changes_key_chat"),
        key_of(&g, "route_changes_key_completions")
    );
}

#[test]
fn every_error_variant_in_the_file_is_a_real_one() {
    let known = [
        "TooLarge",
        "InvalidJson",
        "DuplicateKey",
        "NotAnObject",
        "MissingField",
        "InvalidField",
    ];
    for case in golden().cases {
        if let Some(error) = &case.error {
            assert!(known.contains(&error.as_str()), "{}: {error}", case.name);
        }
    }
}
