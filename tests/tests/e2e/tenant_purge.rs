//! A tenant purge is one purge generation, not one delete per entry: 5,000 entries purged in
//! at most two Fastly API requests, refused at once by every replica and, once it reads the
//! new tenant record, by the edge.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gateway_common::tenant::Tenant;
use gateway_e2e::replica_stack::{ReplicaStack, ReplicaStackOptions};
use gateway_e2e::stack::{ACME, chat_body, fixture_tenants, header, post};
use serde_json::Value;

const N: usize = 5_000;

fn unlimited_tenants() -> Vec<Tenant> {
    fixture_tenants(|t| {
        t.requests_per_second = None;
        t.monthly_token_budget = None;
    })
}

/// Sends `prompt(i)` for every i < N to `base` (16 at a time), with `headers`: each answer's
/// `id` and `x-cache-layer`.
async fn ask_all(
    http: &reqwest::Client,
    bases: &[String],
    headers: &'static [(&'static str, &'static str)],
) -> Vec<(String, String)> {
    let next = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(std::sync::Mutex::new(vec![
        (String::new(), String::new());
        N
    ]));
    let workers = (0..16).map(|w| {
        let (next, answers, http) = (Arc::clone(&next), Arc::clone(&answers), http.clone());
        let bases = bases.to_vec();
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= N {
                    return;
                }
                let base = &bases[(i + w) % bases.len()];
                let resp = post(
                    &http,
                    base,
                    "/v1/chat/completions",
                    ACME,
                    &chat_body(&format!("purge at scale {i}")),
                    headers,
                )
                .await;
                assert_eq!(resp.status(), 200);
                let layer = header(&resp, "x-cache-layer");
                let body: Value = resp.json().await.expect("JSON");
                let id = body["id"].as_str().expect("an id").to_string();
                answers.lock().expect("answers")[i] = (id, layer);
            }
        }
    });
    join_all(workers).await;
    Arc::try_unwrap(answers)
        .expect("every worker is done")
        .into_inner()
        .expect("answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_purge_of_5000_entries_costs_two_api_requests_and_holds_everywhere() {
    let stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 3,
        tenants: Some(unlimited_tenants()),
        populate_on_fallback: false,
        settings: Some(Box::new(|_, config| {
            config
                .set("replication", "hourly_request_budget", "36000")
                .set("replication", "batch_max_entries", "1000")
                .set("replication", "linger_ms", "500");
        })),
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    let replicas: Vec<String> = (0..3).map(|i| stack.replicas.url(i)).collect();
    let started = Instant::now();
    let before: Vec<(String, String)> =
        ask_all(&stack.http, &replicas, &[("x-gateway-edge-miss", "1")]).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while stack.fastly_api.entries().len() < N {
        assert!(
            Instant::now() < deadline,
            "{} of {N} replicated",
            stack.fastly_api.entries().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "tenant purge: {N} entries cached and replicated in {:?}",
        started.elapsed()
    );

    let requests_before = stack.fastly_api.stats().requests;
    let purge = stack
        .http
        .delete(format!("{}/v1/cache", replicas[0]))
        .bearer_auth(ACME)
        .send()
        .await
        .expect("the replica answers");
    assert_eq!(purge.status(), 200);
    let purged: Value = purge.json().await.expect("JSON");
    assert_eq!(purged["generation"], 1);
    let acme = gateway_common::key::api_key_digest(ACME);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stack
        .fastly_api
        .config_item(&acme)
        .is_some_and(|item| item.value.contains(r#""purge_generation":1"#))
    {
        assert!(
            Instant::now() < deadline,
            "the new generation never reached the Config Store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cost = stack.fastly_api.stats().requests - requests_before;
    println!("tenant purge: {N} entries purged in {cost} Fastly API request(s)");
    assert!(cost <= 2, "{cost} requests");

    // Every replica refuses every old entry at once: no answer is the purged one.
    let old: HashMap<usize, String> = before.into_iter().map(|(id, _)| id).enumerate().collect();
    for replica in &replicas {
        let after = ask_all(&stack.http, std::slice::from_ref(replica), &[]).await;
        for (i, (id, _)) in after.iter().enumerate() {
            assert_ne!(id, &old[&i], "{replica} served purged entry {i}");
        }
    }
    // A new POP reading the KV store and the tenant record as they are now: no edge hit.
    let pop = stack.start_pop().await.expect("a new POP");
    let at_edge = ask_all(&stack.http, &[pop.url()], &[]).await;
    for (i, (id, layer)) in at_edge.iter().enumerate() {
        assert_ne!(layer, "edge", "the edge served purged entry {i}");
        assert_ne!(id, &old[&i], "purged entry {i} came back");
    }
}
