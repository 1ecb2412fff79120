//! The sealing cost per KiB where the edge runs it: wasm32-wasip1 under `viceroy run` (no AES
//! instructions, no SIMD). Prints one JSON object: nanoseconds per KiB to seal and to open,
//! for each AEAD considered and for `common::seal` itself. Must not need a host service.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm_siv::Aes256GcmSiv;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use gateway_common::entry::{ENTRY_VERSION, Entry, Envelope};
use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_common::seal::{Keyring, SealKey};
use serde_json::{Value, json};

/// How long each measure runs.
const BUDGET: Duration = Duration::from_millis(300);

/// Body sizes measured, in KiB.
const SIZES_KIB: [usize; 3] = [1, 4, 16];

fn main() {
    let mut results = serde_json::Map::new();
    for kib in SIZES_KIB {
        let body = vec![0x5a_u8; kib * 1024];
        let mut row = serde_json::Map::new();
        row.insert(
            "chacha20poly1305".into(),
            aead::<ChaCha20Poly1305>(&body, 12, kib),
        );
        row.insert(
            "xchacha20poly1305".into(),
            aead::<XChaCha20Poly1305>(&body, 24, kib),
        );
        row.insert("aes256gcmsiv".into(), aead::<Aes256GcmSiv>(&body, 12, kib));
        row.insert("gateway_entry".into(), entry(&body, kib));
        results.insert(format!("{kib}KiB"), Value::Object(row));
    }
    println!("{}", Value::Object(results));
}

/// ns per KiB to encrypt and to decrypt `body` in place with `A`.
fn aead<A: KeyInit + AeadInPlace>(body: &[u8], nonce_len: usize, kib: usize) -> Value {
    let key = [7_u8; 32];
    let cipher = match A::new_from_slice(&key) {
        Ok(cipher) => cipher,
        Err(_) => return Value::Null,
    };
    let nonce_bytes = vec![1_u8; nonce_len];
    let nonce = chacha20poly1305::aead::generic_array::GenericArray::from_slice(&nonce_bytes);
    let ad = b"associated data";
    let mut buf = Vec::with_capacity(body.len() + 16);
    let seal = per_kib(kib, || {
        buf.clear();
        buf.extend_from_slice(body);
        let _ = cipher.encrypt_in_place(nonce, ad, &mut buf);
        black_box(&buf);
    });
    let sealed = buf.clone();
    let open = per_kib(kib, || {
        buf.clear();
        buf.extend_from_slice(&sealed);
        let ok = cipher.decrypt_in_place(nonce, ad, &mut buf).is_ok();
        black_box(ok);
    });
    json!({ "seal_ns_per_kib": seal, "open_ns_per_kib": open })
}

/// What the edge pays per entry: `Entry::seal_kv` and `Entry::decode_kv` with the tenant key
/// derived each time (HKDF, as the edge does per request), per KiB of body.
fn entry(body: &[u8], kib: usize) -> Value {
    let key = CacheKey::derive(b"bench", "acme", Route::ChatCompletions, b"{}");
    let ring = match SealKey::new("k1", &[9; 32]).and_then(|k| Keyring::new(k, None)) {
        Ok(ring) => ring,
        Err(_) => return Value::Null,
    };
    let entry = Entry {
        envelope: Envelope {
            v: ENTRY_VERSION,
            tenant: "acme".into(),
            key: key.hex().into(),
            created: 1_700_000_000,
            ttl: 3600,
            status: 200,
            content_type: "application/json".into(),
            model: "gpt-4o-mini".into(),
            provider: "openai".into(),
            usage: None,
            generation: 0,
        },
        body: body.to_vec(),
    };
    let mut sealed = (Vec::new(), String::new());
    let seal = per_kib(kib, || {
        let tenant_key = ring.current().tenant_key("acme");
        if let Ok(kv) = entry.seal_kv(&tenant_key, &[3; 24]) {
            sealed = kv;
        }
        black_box(&sealed);
    });
    let open = per_kib(kib, || {
        let ok = Entry::decode_kv(&sealed.0, Some(sealed.1.as_bytes()), &key, &ring).is_ok();
        black_box(ok);
    });
    json!({ "seal_ns_per_kib": seal, "open_ns_per_kib": open })
}

/// Runs `f` for `BUDGET` and returns its mean time per KiB of input, in ns.
fn per_kib(kib: usize, mut f: impl FnMut()) -> u64 {
    for _ in 0..10 {
        f();
    }
    let started = Instant::now();
    let mut n: u64 = 0;
    while started.elapsed() < BUDGET {
        for _ in 0..16 {
            f();
        }
        n += 16;
    }
    let ns = started.elapsed().as_nanos() / u128::from(n) / kib as u128;
    u64::try_from(ns).unwrap_or(u64::MAX)
}
