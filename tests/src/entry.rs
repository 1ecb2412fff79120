//! Cache entries as the origin would have written them, for seeding an edge's KV store.
//! Test data only: nothing here reads or writes a store.

use gateway_common::entry::{ENTRY_VERSION, Entry, Envelope};
use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use serde_json::json;

use gateway_common::seal::{NONCE_LEN, SealKey};

use crate::edge::KvSeed;
use crate::stack::{SEAL_KEY, chat_body, key_for};

/// A well-formed cached chat completion of `prompt` for `tenant` whose answer is `content`,
/// created at `created` (Unix seconds) and fresh for `ttl` seconds.
pub fn completion(tenant: &str, prompt: &str, created: u64, ttl: u64, content: &str) -> Entry {
    let key = key_for(tenant, Route::ChatCompletions, &chat_body(prompt));
    let body = json!({
        "id": "chatcmpl-seeded", "object": "chat.completion", "created": created, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    });
    Entry {
        envelope: Envelope {
            v: ENTRY_VERSION,
            tenant: tenant.to_owned(),
            key: key.hex().to_owned(),
            created,
            ttl,
            status: 200,
            content_type: "application/json".to_owned(),
            model: "gpt-4o-mini".to_owned(),
            provider: "seeded".to_owned(),
            usage: None,
            generation: 0,
        },
        body: body.to_string().into_bytes(),
    }
}

/// The KV item the origin's dual-write would store for `entry`, sealed with the tests' seal
/// key ([`SEAL_KEY`]), under `v1/<tenant>/<key>`. Panics if the entry does not encode (a
/// test bug).
pub fn kv_seed(entry: &Entry) -> KvSeed {
    kv_seed_sealed(entry, SEAL_KEY.0, SEAL_KEY.1.as_bytes())
}

/// As [`kv_seed`], sealed with the key (`id`, `secret`).
pub fn kv_seed_sealed(entry: &Entry, id: &str, secret: &[u8]) -> KvSeed {
    let key = SealKey::new(id, secret)
        .unwrap_or_else(|e| panic!("bad test seal key: {e}"))
        .tenant_key(&entry.envelope.tenant);
    let nonce: [u8; NONCE_LEN] = rand::random();
    let (value, metadata) = entry
        .seal_kv(&key, &nonce)
        .unwrap_or_else(|e| panic!("seed entry does not encode: {e}"));
    seed(entry, value, metadata)
}

/// The Redis form of `entry` as the origin stores it, sealed with [`SEAL_KEY`].
pub fn redis_sealed(entry: &Entry) -> Vec<u8> {
    let key = SealKey::new(SEAL_KEY.0, SEAL_KEY.1.as_bytes())
        .unwrap_or_else(|e| panic!("bad test seal key: {e}"))
        .tenant_key(&entry.envelope.tenant);
    let nonce: [u8; NONCE_LEN] = rand::random();
    entry
        .seal(&key, &nonce)
        .unwrap_or_else(|e| panic!("entry does not encode: {e}"))
}

/// The KV item of `entry` in the plain format of version 1 (written before sealing; read
/// until it expires).
pub fn kv_seed_plain(entry: &Entry) -> KvSeed {
    let (value, metadata) = entry
        .encode_plain_kv()
        .unwrap_or_else(|e| panic!("seed entry does not encode: {e}"));
    seed(entry, value, metadata)
}

fn seed(entry: &Entry, value: Vec<u8>, metadata: String) -> KvSeed {
    KvSeed {
        key: format!("v1/{}/{}", entry.envelope.tenant, entry.envelope.key),
        data: value,
        metadata: Some(metadata),
    }
}

/// Unix seconds now.
/// A KV item (value, metadata) opened as the edge opens it, with the tests' seal key
/// ([`SEAL_KEY`]); plain version-1 items open too. `None` when it does not open for `key`.
pub fn open_kv(key: &CacheKey, value: &[u8], metadata: Option<&str>) -> Option<Entry> {
    let current = SealKey::new(SEAL_KEY.0, SEAL_KEY.1.as_bytes()).ok()?;
    let ring = gateway_common::seal::Keyring::new(current, None).ok()?;
    Entry::decode_kv(value, metadata.map(str::as_bytes), key, &ring).ok()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
