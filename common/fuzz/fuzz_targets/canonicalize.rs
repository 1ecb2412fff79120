//! For arbitrary bytes: parse_request and canonicalize never panic; a canonical form is valid
//! JSON, means the same as the input, and is a fixed point of canonicalize.
#![no_main]

use gateway_common::canonical::{DEFAULT_MAX_BODY_BYTES, canonicalize, parse_request};
use gateway_common::route::Route;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    for route in Route::ALL {
        if let Ok(parsed) = parse_request(route, data, DEFAULT_MAX_BODY_BYTES) {
            if let Some(canonical) = parsed.canonical {
                check_fixed_point(&canonical);
            }
        }
    }
    if let Ok(Some(canonical)) = canonicalize(data) {
        check_fixed_point(&canonical);
        // The strict parser accepts a subset of what serde_json accepts.
        let input: Value = serde_json::from_slice(data).expect("strict parse implies serde parse");
        let output: Value = serde_json::from_slice(&canonical).expect("canonical is JSON");
        assert!(equivalent(&input, &output), "canonical changed the meaning");
    }
});

fn check_fixed_point(canonical: &[u8]) {
    assert!(
        std::str::from_utf8(canonical).is_ok(),
        "canonical is not UTF-8"
    );
    serde_json::from_slice::<Value>(canonical).expect("canonical is JSON");
    match canonicalize(canonical) {
        Ok(Some(again)) => assert_eq!(again, canonical, "canonicalize is not idempotent"),
        other => panic!("canonical form does not canonicalize: {other:?}"),
    }
}

/// Same structure and strings; numbers equal as f64 (-0 == 0).
fn equivalent(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| equivalent(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| equivalent(v, w)))
        }
        _ => a == b,
    }
}
