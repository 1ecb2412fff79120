//! Sealed entries end to end: after a realistic run neither Redis nor the KV store shows an
//! answer; a tampered, moved or foreign-key entry at the edge is a miss, never served, that the
//! origin counts from the edge's usage records; a key rotation keeps the entries sealed under
//! the previous key served at both tiers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_e2e::edge::{Edge, EdgeConfig, KvSeed};
use gateway_e2e::entry::{completion, kv_seed, kv_seed_plain, kv_seed_sealed, now};
use gateway_e2e::stack::{
    ACME, GLOBEX, SEAL_KEY, SECRET, Stack, StackOptions, chat_body, edge_seal_secret, header,
    key_for, origin_seal_key, origin_settings, post,
};
use gateway_fixtures::provider::Fault;
use gateway_fixtures::{DelayProxy, FakeFastlyApi, RedisDeployment};
use gateway_origin::Application;
use serde_json::{Value, json};

/// What every mock provider answer says (fixtures/src/provider/answer.rs).
const ANSWER_PHRASE: &str = "is the deterministic mock answer";

/// Every `echo:<16 hex>` tag in `text`: the mock provider's answer text names its request.
fn answer_tags(text: &str) -> BTreeSet<String> {
    text.match_indices("echo:")
        .filter_map(|(at, _)| text.get(at..at + 21))
        .filter(|tag| tag[5..].bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

/// Every value Redis holds, whatever its type, as text (lossy): keys and values.
fn redis_dump(redis: &RedisDeployment) -> String {
    let mut dump = String::new();
    for key in redis.keys("*").expect("KEYS") {
        let kind = redis.cli(&["TYPE", &key]).expect("TYPE");
        let value = match kind.trim() {
            "string" => redis.cli(&["GET", &key]),
            "hash" => redis.cli(&["HGETALL", &key]),
            "list" => redis.cli(&["LRANGE", &key, "0", "-1"]),
            "set" => redis.cli(&["SMEMBERS", &key]),
            "zset" => redis.cli(&["ZRANGE", &key, "0", "-1", "WITHSCORES"]),
            "stream" => redis.cli(&["XRANGE", &key, "-", "+"]),
            other => Ok(format!("<{other}>")),
        }
        .expect("a Redis read");
        dump.push_str(&format!("{key} => {value}\n"));
    }
    dump
}

/// Every item of the fake Fastly KV API: key, metadata and value (lossy).
fn kv_dump(api: &FakeFastlyApi) -> String {
    api.entries()
        .iter()
        .map(|item| {
            format!(
                "{} [{}] {}\n",
                item.key,
                item.metadata.as_deref().unwrap_or_default(),
                String::from_utf8_lossy(&item.value)
            )
        })
        .collect()
}

async fn wait_for_kv(api: &FakeFastlyApi, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.entries().len() < count {
        assert!(
            Instant::now() < deadline,
            "the KV API holds {} of {count} entries",
            api.entries().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The clear metadata line of each stored entry of Redis, by Redis key.
fn redis_metadata(redis: &RedisDeployment, key: &CacheKey) -> Value {
    let stored = redis.cli(&["GET", &key.redis_key()]).expect("GET");
    let line = stored.lines().next().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_answer_text_is_readable_in_redis_or_the_kv_api_after_a_realistic_run() {
    let stack = Stack::start_with(StackOptions {
        replicate: true,
        ..StackOptions::default()
    })
    .await
    .expect("stack");
    let requests: [(&str, Value); 3] = [
        ("/v1/chat/completions", chat_body("seal me, chat")),
        (
            "/v1/responses",
            json!({"model": "gpt-4o-mini", "input": "seal me, responses", "store": false}),
        ),
        (
            "/v1/messages",
            json!({"model": "claude-haiku-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "seal me, messages"}]}),
        ),
    ];
    let mut answered = String::new();
    let mut walks = Vec::new();
    for (path, body) in &requests {
        // Plain three times (upstream, origin hit, edge hit), then streamed from the edge.
        for _ in 0..3 {
            let resp = stack.edge_post(path, ACME, body, &[]).await;
            assert_eq!(resp.status(), 200, "{path}");
            walks.push(format!("{path} {}", header(&resp, "x-cache-layer")));
            answered.push_str(&resp.text().await.expect("body"));
            stack.settle().await;
        }
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let resp = stack.edge_post(path, ACME, &streamed, &[]).await;
        assert_eq!(resp.status(), 200, "{path} streamed");
        resp.text().await.expect("stream");
        stack.settle().await;
    }
    for (path, _) in &requests {
        for layer in ["upstream", "origin", "edge"] {
            assert!(walks.contains(&format!("{path} {layer}")), "{walks:?}");
        }
    }
    // A stream that ends cleanly but cannot be assembled is not cached: its leader publishes
    // the answer in Redis for followers on other replicas (`gw:flight:…:result`, 10 s).
    stack.provider.set_fault(Fault::DropFinish, Some(1));
    let mut unassembled = chat_body("seal me, a flight result");
    unassembled["stream"] = json!(true);
    let resp = stack
        .edge_post("/v1/chat/completions", ACME, &unassembled, &[])
        .await;
    assert_eq!(resp.status(), 200, "the unassembled stream");
    answered.push_str(&resp.text().await.expect("stream"));
    let tags = answer_tags(&answered);
    assert!(
        answered.contains(ANSWER_PHRASE) && tags.len() >= 4,
        "the clients read the answers: {tags:?}"
    );

    let api = stack.kv_api.as_ref().expect("replication is on");
    wait_for_kv(api, requests.len()).await;
    let redis = redis_dump(&stack.redis);
    assert!(
        redis.contains(":result => "),
        "the dump holds the flight result:\n{redis}"
    );
    let kv = kv_dump(api);
    assert!(
        redis.contains("gw:v1:acme:"),
        "the dump reads the entries:\n{redis}"
    );
    assert!(kv.contains(&format!("\"kid\":\"{}\"", SEAL_KEY.0)), "{kv}");
    for (tier, dump) in [("Redis", &redis), ("KV", &kv)] {
        assert!(
            !dump.contains(ANSWER_PHRASE),
            "an answer in {tier}:\n{dump}"
        );
        for tag in &tags {
            assert!(!dump.contains(tag.as_str()), "{tag} in {tier}:\n{dump}");
        }
        for model in ["gpt-4o-mini", "claude-haiku-4-5"] {
            assert!(!dump.contains(model), "{model} in {tier}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_moved_and_foreign_key_entries_at_the_edge_are_counted_misses() {
    let t = now();
    // A control, sealed as the origin seals: served from the edge.
    let good = completion("acme", "control", t, 3600, "seeded-good");
    // One changed byte in the sealed value.
    let flipped_entry = completion("acme", "flipped", t, 3600, "seeded-bad");
    let mut flipped = kv_seed(&flipped_entry);
    let at = flipped.data.len() / 2;
    flipped.data[at] ^= 0x01;
    // Acme's entry copied under globex's key for the same prompt, its metadata rewritten to
    // match: it passes the clear checks, but was sealed for another tenant and key.
    let acme_moved = completion("acme", "moved", t, 3600, "seeded-bad");
    let globex_key = key_for("globex", Route::ChatCompletions, &chat_body("moved"));
    let mut moved = kv_seed(&acme_moved);
    moved.key = globex_key.kv_key();
    moved.metadata = moved.metadata.map(|m| {
        m.replace("\"tenant\":\"acme\"", "\"tenant\":\"globex\"")
            .replace(&acme_moved.envelope.key, globex_key.hex())
    });
    // Sealed under a key id this edge does not hold.
    let foreign_entry = completion("acme", "foreign key", t, 3600, "seeded-bad");
    let foreign = kv_seed_sealed(&foreign_entry, "k9", b"a key nobody here holds");
    // Written before sealing (version 1): still served until it expires.
    let plain = completion("acme", "plain", t, 3600, "seeded-plain");

    let stack = Stack::start_with(StackOptions {
        kv: vec![
            kv_seed(&good),
            flipped,
            moved,
            foreign,
            kv_seed_plain(&plain),
        ],
        usage: true,
        ..StackOptions::default()
    })
    .await
    .expect("stack");

    for (key, prompt, expected) in [
        (ACME, "control", "seeded-good"),
        (ACME, "plain", "seeded-plain"),
    ] {
        let resp = stack.edge_chat(key, prompt).await;
        assert_eq!(header(&resp, "x-cache-layer"), "edge", "{prompt}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            body["choices"][0]["message"]["content"], expected,
            "{prompt}"
        );
    }
    for (key, tenant, prompt, reason) in [
        (ACME, "acme", "flipped", "unopenable"),
        (GLOBEX, "globex", "moved", "unopenable"),
        (ACME, "acme", "foreign key", "unknown_key_id"),
    ] {
        let resp = stack.edge_chat(key, prompt).await;
        assert_eq!(resp.status(), 200, "{prompt}: never a 500");
        assert_eq!(header(&resp, "x-cache"), "MISS", "{prompt}");
        assert_eq!(header(&resp, "x-cache-layer"), "upstream", "{prompt}");
        let body = resp.text().await.expect("body");
        assert!(!body.contains("seeded-bad"), "{prompt}: served a bad entry");
        assert!(body.contains(ANSWER_PHRASE), "{prompt}: {body}");
        let cache_key = key_for(tenant, Route::ChatCompletions, &chat_body(prompt));
        let line = stack.edge_log_line(&cache_key).await;
        assert_eq!(line["kv"], "rejected", "{prompt}: {line}");
        assert_eq!(line["kv_reject"], reason, "{prompt}: {line}");
    }
    assert_eq!(
        stack.provider.calls(),
        3,
        "each refused entry cost one provider call"
    );
    // Counted at the origin from the edge's usage records, as the origin counts its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = |reason: &str| {
        let label = format!("reason=\"{reason}\"");
        stack.metric("gateway_edge_kv_rejects_total", &[label.as_str()])
    };
    while (counted("unopenable"), counted("unknown_key_id")) != (2.0, 1.0) {
        assert!(
            Instant::now() < deadline,
            "edge rejects counted: unopenable {}, unknown_key_id {}",
            counted("unopenable"),
            counted("unknown_key_id")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An origin of its own on `redis`, replicating to `api`, sealing with `current` and opening
/// with `previous` too; with a counting proxy in front, as an edge's backend.
async fn rotated_origin(
    redis: &RedisDeployment,
    provider: &gateway_fixtures::MockProvider,
    api: &FakeFastlyApi,
    current: (&str, &str),
    previous: Option<(&str, &str)>,
) -> (String, DelayProxy, Arc<gateway_origin::service::Service>) {
    let mut settings = origin_settings(redis, &[provider]);
    settings.seal.current = Some(origin_seal_key(current.0, current.1));
    settings.seal.previous = previous.map(|(id, secret)| origin_seal_key(id, secret));
    settings.replication.enabled = true;
    settings.replication.api_base_url = api.base_url();
    settings.replication.store_id = api.store_id().to_owned();
    settings.replication.api_token = Some(gateway_origin::settings::Secret::new(api.token()));
    settings.replication.linger_ms = 50;
    let app = Application::build_with(settings, Default::default()).expect("origin builds");
    let url = app.base_url();
    let service = Arc::clone(app.service());
    tokio::spawn(app.run());
    let proxy = DelayProxy::start(url.clone(), Duration::ZERO)
        .await
        .expect("proxy");
    (url, proxy, service)
}

/// A new POP in front of `proxy`, seeded with the KV API's items, holding these seal keys.
async fn pop(
    proxy: &DelayProxy,
    api: &FakeFastlyApi,
    current: &str,
    previous: Option<&str>,
) -> Edge {
    let mut config = EdgeConfig::new(proxy.url(), SECRET);
    config.populate_on_fallback = false;
    config.kv = KvSeed::from_api(api);
    config.seal_key_current = Some(current.to_owned());
    config.seal_key_previous = previous.map(str::to_owned);
    let edge = tokio::task::spawn_blocking(move || Edge::start(&config))
        .await
        .expect("join")
        .expect("edge starts");
    // Viceroy probes each backend once at start-up; let it, so counts start clean.
    tokio::time::sleep(Duration::from_millis(200)).await;
    edge
}

async fn chat_at(http: &reqwest::Client, url: &str, prompt: &str) -> (String, String) {
    let resp = post(
        http,
        url,
        "/v1/chat/completions",
        ACME,
        &chat_body(prompt),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200, "{prompt}");
    let at = (header(&resp, "x-cache"), header(&resp, "x-cache-layer"));
    let body = resp.text().await.expect("body");
    assert!(body.contains(ANSWER_PHRASE), "{prompt}: {body}");
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_key_rotation_old_entries_are_still_hits_and_new_ones_use_the_new_key() {
    const K2: (&str, &str) = ("e2e2", "e2e-seal-secret-rotated-0123456789");
    // Before: both tiers on the tests' key (k1 = SEAL_KEY); the origin dual-writes.
    let stack = Stack::start_with(StackOptions {
        replicate: true,
        populate_on_fallback: false,
        ..StackOptions::default()
    })
    .await
    .expect("stack");
    let api = stack.kv_api.as_ref().expect("replication is on");
    let first = stack.edge_chat(ACME, "sealed before the rotation").await;
    assert_eq!(header(&first, "x-cache-layer"), "upstream");
    stack.settle().await;
    wait_for_kv(api, 1).await;
    let old_key = key_for(
        "acme",
        Route::ChatCompletions,
        &chat_body("sealed before the rotation"),
    );
    assert_eq!(redis_metadata(&stack.redis, &old_key)["kid"], SEAL_KEY.0);

    // The rotation, edge first: a POP that knows the new key as current and the old one as
    // previous, then an origin that seals with the new key (same Redis, same KV store).
    let (_, proxy, service) =
        rotated_origin(&stack.redis, &stack.provider, api, K2, Some(SEAL_KEY)).await;
    let k1 = edge_seal_secret(SEAL_KEY.0, SEAL_KEY.1);
    let k2 = edge_seal_secret(K2.0, K2.1);
    let edge = pop(&proxy, api, &k2, Some(&k1)).await;
    let calls = stack.provider.calls();
    let http = &stack.http;

    // The old entry: an edge hit (KV, previous key), and an origin hit behind it.
    let before = proxy.requests();
    let at = chat_at(http, &edge.url(), "sealed before the rotation").await;
    assert_eq!(at, ("HIT".to_owned(), "edge".to_owned()));
    assert_eq!(proxy.requests(), before, "the rotated POP answered alone");
    let at = chat_at(http, &proxy.url(), "sealed before the rotation").await;
    assert_eq!(at, ("HIT".to_owned(), "origin".to_owned()));

    // A new entry: sealed with the new key in Redis and in KV.
    let at = chat_at(http, &edge.url(), "sealed after the rotation").await;
    assert_eq!(at.1, "upstream");
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for_kv(api, 2).await;
    let new_key = key_for(
        "acme",
        Route::ChatCompletions,
        &chat_body("sealed after the rotation"),
    );
    assert_eq!(redis_metadata(&stack.redis, &new_key)["kid"], K2.0);
    let item = api.get(&new_key.kv_key()).expect("replicated");
    assert!(
        item.metadata
            .unwrap_or_default()
            .contains(&format!("\"kid\":\"{}\"", K2.0))
    );
    assert_eq!(
        stack.provider.calls(),
        calls + 1,
        "only the new prompt went upstream"
    );

    // A POP started after the rotation serves both, one sealed under each key.
    let later = pop(&proxy, api, &k2, Some(&k1)).await;
    let before = proxy.requests();
    for prompt in ["sealed before the rotation", "sealed after the rotation"] {
        let at = chat_at(http, &later.url(), prompt).await;
        assert_eq!(at, ("HIT".to_owned(), "edge".to_owned()), "{prompt}");
    }
    assert_eq!(proxy.requests(), before);
    // An edge not yet given the new key cannot open the new entry: a miss, never an error.
    let stale_pop = pop(&proxy, api, &k1, None).await;
    let at = chat_at(http, &stale_pop.url(), "sealed after the rotation").await;
    assert_eq!(at, ("HIT".to_owned(), "origin".to_owned()));
}
