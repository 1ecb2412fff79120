//! Sealed entries at the origin: what it stores in Redis is sealed (no answer in the clear);
//! a flipped byte, an entry copied under another tenant's key, an unknown key id are each a
//! miss counted in `gateway_seal_open_failures_total`, answered from the provider, never a 500.
#![allow(
    clippy::expect_used,
    reason = "test helpers: a failed expectation is a failed test"
)]

use gateway_common::entry::{Entry, split};
use gateway_common::key::CacheKey;
use gateway_common::seal::SealKey;
use gateway_origin::settings::DEV_SEAL_KEY_ID;

use crate::harness::{ACME, GLOBEX, Stack, dev_keys, header};

async fn connection(stack: &Stack) -> redis::aio::MultiplexedConnection {
    redis::Client::open(stack.redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connects")
}

async fn get(stack: &Stack, key: &CacheKey) -> Vec<u8> {
    redis::cmd("GET")
        .arg(key.redis_key())
        .query_async::<Option<Vec<u8>>>(&mut connection(stack).await)
        .await
        .expect("GET")
        .expect("the entry is stored")
}

async fn set(stack: &Stack, key: &CacheKey, value: &[u8]) {
    redis::cmd("SET")
        .arg(key.redis_key())
        .arg(value)
        .arg("EX")
        .arg(600)
        .query_async::<()>(&mut connection(stack).await)
        .await
        .expect("SET");
}

/// Asks `prompt` as `api_key`; returns the cache key, checking a 200 with `x-cache`.
async fn ask(stack: &Stack, api_key: &str, tenant: &str, prompt: &str, cache: &str) -> CacheKey {
    let resp = stack.chat(api_key, prompt).await;
    assert_eq!(resp.status(), 200, "{prompt}: never a 500");
    assert_eq!(header(&resp, "x-cache"), cache, "{prompt}");
    let key = CacheKey::from_hex(tenant, header(&resp, "x-cache-key")).expect("a key");
    let body = resp.text().await.expect("body");
    assert!(
        body.contains("deterministic mock answer"),
        "{prompt}: {body}"
    );
    stack.settle().await;
    key
}

fn failures(stack: &Stack, reason: &str) -> f64 {
    stack.metric(&format!(
        "gateway_seal_open_failures_total{{reason=\"{reason}\"}}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_stores_only_sealed_entries_and_opens_them_again() {
    let stack = Stack::start().await;
    let key = ask(&stack, ACME, "acme", "seal this", "MISS").await;
    let stored = get(&stack, &key).await;
    assert!(!String::from_utf8_lossy(&stored).contains("deterministic mock answer"));
    let parts = split(&stored, &key).expect("an entry");
    assert_eq!(parts.header.kid.as_deref(), Some(DEV_SEAL_KEY_ID));
    assert!(
        !parts.metadata.contains("gpt-4o-mini"),
        "{}",
        parts.metadata
    );
    let entry = Entry::decode(&stored, &key, &dev_keys()).expect("opens as the edge opens it");
    assert_eq!(entry.envelope.status, 200);
    ask(&stack, ACME, "acme", "seal this", "HIT").await;
    assert_eq!(stack.provider_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_moved_and_foreign_key_entries_are_counted_misses_never_errors() {
    let stack = Stack::start().await;

    // A flipped byte in the sealed value.
    let key = ask(&stack, ACME, "acme", "flip a byte", "MISS").await;
    let mut stored = get(&stack, &key).await;
    let last = stored.len() - 1;
    stored[last] ^= 0x01;
    set(&stack, &key, &stored).await;
    ask(&stack, ACME, "acme", "flip a byte", "MISS").await;
    // Counted per read: a miss reads the entry twice (the lookup, then the flight's look for
    // an entry another replica landed meanwhile), so one request counts one or two.
    let flipped = failures(&stack, "unopenable");
    assert!((1.0..=2.0).contains(&flipped), "{flipped}");
    ask(&stack, ACME, "acme", "flip a byte", "HIT").await;

    // Acme's entry under globex's key for the same prompt, its clear line rewritten to match.
    let acme_key = ask(&stack, ACME, "acme", "move me", "MISS").await;
    let globex_key = ask(&stack, GLOBEX, "globex", "move me", "MISS").await;
    let acme_entry = get(&stack, &acme_key).await;
    let parts = split(&acme_entry, &acme_key).expect("an entry");
    let metadata = parts
        .metadata
        .replace("\"tenant\":\"acme\"", "\"tenant\":\"globex\"")
        .replace(acme_key.hex(), globex_key.hex());
    let moved = [metadata.as_bytes(), b"\n", parts.value].concat();
    set(&stack, &globex_key, &moved).await;
    ask(&stack, GLOBEX, "globex", "move me", "MISS").await;
    assert!(failures(&stack, "unopenable") > flipped);

    // Sealed with a key id this origin does not hold.
    let key = ask(&stack, ACME, "acme", "foreign key", "MISS").await;
    let mut entry = Entry::decode(&get(&stack, &key).await, &key, &dev_keys()).expect("opens");
    entry.body = b"{\"never\":\"served\"}".to_vec();
    let foreign = SealKey::new("k9", b"a key this origin does not hold")
        .expect("a key")
        .tenant_key("acme");
    set(
        &stack,
        &key,
        &entry.seal(&foreign, &[3; 24]).expect("seals"),
    )
    .await;
    ask(&stack, ACME, "acme", "foreign key", "MISS").await;
    assert!(failures(&stack, "unknown_key_id") >= 1.0);
    assert!(stack.metric("gateway_cache_decode_errors_total") >= 3.0);
}
