//! The dual-write round trip: what the origin writes to the (fake) Fastly KV API is what a
//! fresh edge reads; the KV API failing never fails a request; staleness is corrected; purge
//! reaches both tiers.

use std::time::{Duration, Instant};

use gateway_e2e::edge::{Edge, KvSeed};
use gateway_e2e::stack::{ACME, Stack, StackOptions, chat_body, header, many_tenants};
use gateway_fixtures::FakeFastlyApi;
use gateway_fixtures::fastly_api::Fault;
use serde_json::Value;

/// Wait (bounded) until the fake KV API holds `count` entries.
async fn wait_for_entries(api: &FakeFastlyApi, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while api.entries().len() < count {
        assert!(
            Instant::now() < deadline,
            "the KV API holds {} of {count} entries after {within:?}",
            api.entries().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fake API's contents in the form a fresh Viceroy is seeded with.
fn exported(api: &FakeFastlyApi) -> Vec<KvSeed> {
    KvSeed::from_api(api)
}

/// Ask a POP started with `Stack::start_pop` for `prompt` as acme.
async fn ask_pop(stack: &Stack, pop: &Edge, prompt: &str) -> reqwest::Response {
    let url = format!("{}/v1/chat/completions", pop.url());
    let sent = stack
        .http
        .post(url)
        .bearer_auth(ACME)
        .json(&chat_body(prompt))
        .send();
    sent.await.expect("the POP answers")
}

/// A stack as in production: the origin dual-writes to the (fake) KV API and the edge never
/// writes its KV store itself.
async fn replicating_stack() -> Stack {
    let options = StackOptions {
        replicate: true,
        populate_on_fallback: false,
        ..StackOptions::default()
    };
    Stack::start_with(options).await.expect("stack starts")
}

fn id_of(body: &Value) -> String {
    body["id"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_the_origin_replicates_is_served_by_a_new_pop_without_an_origin_request() {
    let stack = replicating_stack().await;
    let api = stack.kv_api.as_ref().expect("replication is on");

    let first = stack.edge_chat(ACME, "replicate me to every POP").await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    let first: Value = first.json().await.expect("JSON");
    stack.settle().await;
    wait_for_entries(api, 1, Duration::from_secs(10)).await;
    assert_eq!(
        api.stats().entries_written,
        1,
        "exactly one KV write for one miss"
    );

    let (pop, proxy) = stack
        .start_pop(exported(api))
        .await
        .expect("a new POP starts");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = proxy.requests();
    let resp = ask_pop(&stack, &pop, "replicate me to every POP").await;
    assert_eq!(header(&resp, "x-cache"), "HIT");
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    let served: Value = resp.json().await.expect("JSON");
    assert_eq!(
        served, first,
        "the new POP serves the very answer the origin replicated"
    );
    assert_eq!(
        proxy.requests(),
        before,
        "the new POP did not cross to the origin"
    );
    assert_eq!(stack.provider.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_kv_api_never_fails_a_request_and_catches_up_when_it_recovers() {
    let stack = replicating_stack().await;
    let api = stack.kv_api.as_ref().expect("replication is on");

    let outages = [
        (Fault::Status { status: 503 }, None, "down"),
        (
            Fault::RateLimited {
                retry_after_secs: 1,
            },
            // Until cleared: a counted fault would let a retry through while the requests of
            // this phase are still being sent on a slow machine.
            None,
            "rate limiting",
        ),
    ];
    for (phase, (fault, times, what)) in outages.into_iter().enumerate() {
        api.set_fault(fault, times);
        for i in phase * 10..phase * 10 + 10 {
            let resp = stack
                .edge_chat(ACME, &format!("during the KV outage {i}"))
                .await;
            assert_eq!(
                resp.status(),
                200,
                "request {i} succeeds while the KV API is {what}"
            );
        }
    }
    assert_eq!(api.stats().entries_written, 0);
    api.clear_faults();
    // The lane may be in a backoff grown over both outages (capped at a minute).
    wait_for_entries(api, 20, Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_changed_at_the_origin_is_corrected_at_the_edge_once_its_copy_expires() {
    let mut tenants = many_tenants(1);
    // Freshness counts whole seconds: the edge's copy must still be fresh after three requests
    // and two settles on a loaded machine, so not 2 s (which leaves between 1 and 2).
    tenants[0].cache_ttl_secs = 5;
    let stack = Stack::start_with(StackOptions {
        tenants: Some(tenants),
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    let prompt = "a changing answer";
    for _ in 0..2 {
        stack
            .edge_post("/v1/chat/completions", "sk-t00", &chat_body(prompt), &[])
            .await;
        stack.settle().await;
    }
    let edge_copy = stack
        .edge_post("/v1/chat/completions", "sk-t00", &chat_body(prompt), &[])
        .await;
    assert_eq!(header(&edge_copy, "x-cache-layer"), "edge");
    let old: Value = edge_copy.json().await.expect("JSON");

    // The origin's entry changes: a no-cache request stores a fresh answer in Redis.
    let fresh = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.origin_url))
        .bearer_auth("sk-t00")
        .header("cache-control", "no-cache")
        .json(&chat_body(prompt))
        .send()
        .await
        .expect("origin answers");
    let new: Value = fresh.json().await.expect("JSON");
    assert_ne!(id_of(&new), id_of(&old));
    stack.settle().await;

    // The edge may serve its copy until that copy expires by its own created-at + TTL, then
    // it falls back to the origin and is corrected (with the origin's new entry, or an even
    // newer one if that has expired too by then: the TTL here is 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let corrected = loop {
        let resp = stack
            .edge_post("/v1/chat/completions", "sk-t00", &chat_body(prompt), &[])
            .await;
        let layer = header(&resp, "x-cache-layer");
        let body: Value = resp.json().await.expect("JSON");
        if id_of(&body) != id_of(&old) {
            assert_ne!(layer, "edge", "the correction comes from behind the edge");
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the edge was not corrected within TTL + slack"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // The mock numbers its answers: `<id>-<call number>`.
    let call = |body: &Value| {
        id_of(body)
            .rsplit('-')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
    };
    assert!(
        call(&corrected) >= call(&new),
        "never an answer older than the origin's change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_reaches_redis_and_the_kv_store_and_the_next_request_is_a_miss() {
    let stack = replicating_stack().await;
    let api = stack.kv_api.as_ref().expect("replication is on");
    for prompt in ["purge one", "purge two"] {
        stack.edge_chat(ACME, prompt).await;
    }
    stack.settle().await;
    wait_for_entries(api, 2, Duration::from_secs(10)).await;
    assert_eq!(stack.redis.keys("gw:v1:acme:*").expect("redis").len(), 2);

    let resp = stack
        .http
        .delete(format!("{}/v1/cache", stack.edge.url()))
        .bearer_auth(ACME)
        .send()
        .await
        .expect("purge through the edge");
    assert!(
        resp.status().is_success(),
        "purge answered {}",
        resp.status()
    );
    assert!(
        stack.redis.keys("gw:v1:acme:*").expect("redis").is_empty(),
        "Redis no longer holds them"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !api.entries().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the KV store still holds {} entries",
            api.entries().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (pop, _proxy) = stack
        .start_pop(exported(api))
        .await
        .expect("a new POP starts");
    let resp = ask_pop(&stack, &pop, "purge one").await;
    assert_eq!(
        header(&resp, "x-cache"),
        "MISS",
        "a purged entry is served by neither tier"
    );
    assert_eq!(stack.provider.calls(), 3);
}
