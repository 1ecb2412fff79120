//! Several origin replicas as real processes behind the round-robin proxy, sharing one Redis and
//! one fake Fastly API: the replicated stack the multi-replica tests build on, checked end to
//! end (one shared cache, spread load, a `kill -9` that no client notices, a new POP).

use std::time::{Duration, Instant};

use gateway_common::key::api_key_digest;
use gateway_common::route::Route;
use gateway_common::tenant::TenantsFile;
use gateway_e2e::replica_stack::{ReplicaStack, ReplicaStackOptions};
use gateway_e2e::repo_root;
use gateway_e2e::stack::{ACME, chat_body, header, key_for};
use serde_json::Value;

/// Connections the proxy gave each replica so far.
fn connections(stack: &ReplicaStack) -> Vec<u64> {
    stack
        .replicas
        .proxy()
        .stats()
        .iter()
        .map(|s| s.connections)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_cache_and_a_kill_9_fails_no_request() {
    let mut stack = ReplicaStack::start(3).await.expect("the stack starts");
    let prompt = "one cache for every replica";

    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));
    let mut answer = None;
    for (i, (cache, layer)) in [("MISS", "upstream"), ("HIT", "origin"), ("HIT", "edge")]
        .into_iter()
        .enumerate()
    {
        let resp = stack.edge_chat(ACME, prompt).await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(header(&resp, "x-cache"), cache, "request {i}");
        assert_eq!(header(&resp, "x-cache-layer"), layer, "request {i}");
        let body: Value = resp.json().await.expect("JSON");
        let id = body["id"].clone();
        assert_eq!(answer.get_or_insert_with(|| id.clone()), &id, "request {i}");
        stack.settle().await;
        stack.wait_for_redis(&key, Duration::from_secs(10)).await;
    }
    assert_eq!(stack.provider.calls(), 1, "one provider call for the walk");
    let crossed = connections(&stack);
    assert_eq!(
        crossed.iter().filter(|&&n| n == 1).count(),
        2,
        "the miss and the origin hit reached two different replicas: {crossed:?}"
    );

    // Every replica serves the shared Redis entry, and is counted doing it.
    for _ in 0..3 {
        let resp = stack.proxy_chat(ACME, prompt).await;
        assert_eq!(header(&resp, "x-cache-layer"), "origin");
    }
    for index in 0..3 {
        let served = stack
            .metric(index, "gateway_requests_total")
            .await
            .expect("metrics");
        assert!(served >= 1.0, "replica {index} served {served} requests");
    }

    stack.replicas.kill(1);
    let before = connections(&stack);
    // Nine new connections: three of them are the dead replica's turns.
    let mut failures = 0;
    for i in 0..9 {
        match stack
            .fresh
            .post(format!(
                "{}/v1/chat/completions",
                stack.replicas.proxy_url()
            ))
            .bearer_auth(ACME)
            .json(&chat_body(prompt))
            .send()
            .await
        {
            Ok(resp) if resp.status() == 200 => {}
            Ok(resp) => panic!("request {i}: {}", resp.status()),
            Err(_) => failures += 1,
        }
    }
    assert_eq!(failures, 0, "no client saw the dead replica");
    let stats = stack.replicas.proxy().stats();
    assert_eq!(
        stats[1].connections, before[1],
        "nothing reached the dead replica"
    );
    assert!(
        stats[1].connect_failures >= 3,
        "its turns failed over: {stats:?}"
    );
    assert_eq!(stack.replicas.proxy().unserved(), 0);
    let resp = stack
        .edge_chat(ACME, "through the edge after the crash")
        .await;
    assert_eq!(resp.status(), 200);

    stack.replicas.restart(1).await.expect("replica 1 restarts");
    let before = stack.replicas.proxy().connections(1);
    for _ in 0..3 {
        let resp = stack.proxy_chat(ACME, prompt).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-cache"), "HIT");
    }
    assert_eq!(
        stack.replicas.proxy().connections(1),
        before + 1,
        "the restarted replica takes its turn again"
    );
    assert_eq!(stack.provider.calls(), 2, "one call per distinct prompt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_pop_seeded_from_the_fake_api_reads_its_tenants_and_entries_from_the_exports() {
    let stack = ReplicaStack::start_with(ReplicaStackOptions {
        populate_on_fallback: false,
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    let prompt = "seed a POP from the API";
    let first = stack.edge_chat(ACME, prompt).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    let first: Value = first.json().await.expect("JSON");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.fastly_api.entries().is_empty() {
        assert!(Instant::now() < deadline, "no replica wrote the entry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A key only the fake API's Config Store knows, written through its item route: the new
    // POP can only accept it if its `tenants` store came from the export.
    let pop_key = "sk-pop-only";
    let raw = std::fs::read(repo_root().join("fixtures/tenants.json")).expect("tenants file");
    let mut acme = TenantsFile::parse(&raw)
        .expect("valid")
        .tenants
        .into_iter()
        .find(|t| t.id == "acme")
        .expect("acme");
    acme.api_key_sha256.push(api_key_digest(pop_key));
    let record = serde_json::to_string(&acme).expect("a tenant serializes");
    let url = format!(
        "{}/item/{}",
        stack.fastly_api.config_store_url(),
        api_key_digest(pop_key)
    );
    let put = stack
        .http
        .put(url)
        .header("fastly-key", stack.fastly_api.token())
        .form(&[("item_value", record)])
        .send()
        .await
        .expect("the fake API answers");
    assert_eq!(put.status(), 200);
    let refused = stack.edge_chat(pop_key, prompt).await;
    assert_eq!(refused.status(), 401, "the first POP never saw that key");

    let pop = stack.start_pop().await.expect("a new POP starts");
    let before = connections(&stack);
    let served = stack
        .http
        .post(format!("{}/v1/chat/completions", pop.url()))
        .bearer_auth(pop_key)
        .json(&chat_body(prompt))
        .send()
        .await
        .expect("the POP answers");
    assert_eq!(served.status(), 200);
    assert_eq!(header(&served, "x-cache"), "HIT");
    assert_eq!(header(&served, "x-cache-layer"), "edge");
    let served: Value = served.json().await.expect("JSON");
    assert_eq!(served, first, "the very answer a replica replicated");
    assert_eq!(
        connections(&stack),
        before,
        "the new POP did not cross to the replicas"
    );
}
