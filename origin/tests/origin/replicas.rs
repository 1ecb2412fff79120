//! Several origin replicas on one Redis: identical misses spread over them make one provider
//! call, and without Redis each still answers with its own single flight.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gateway_fixtures::provider::{Fault, ProviderConfig};
use serde_json::{Value, json};

use crate::harness::{ACME, Options, Stack, chat_body, mock_config};

/// A slow provider (every request arrives while the first is still out) and no rate limit.
fn slow() -> Options {
    Options {
        providers: vec![mock_config("mock", 400)],
        tenants: Box::new(|t| t.requests_per_second = None),
        ..Options::default()
    }
}

/// `n` identical requests at once, alternating between `urls`: (status, body) of each.
async fn spread(stack: &Stack, urls: &[String], n: usize, body: &Value) -> Vec<(u16, Value)> {
    let requests = (0..n).map(|i| {
        let request = stack
            .http
            .post(format!("{}/v1/chat/completions", urls[i % urls.len()]))
            .bearer_auth(ACME)
            .json(body)
            .send();
        async move {
            let response = request.await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    });
    join_all(requests).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_misses_spread_over_three_replicas_make_one_provider_call() {
    let stack = Stack::start_with(slow()).await;
    let replicas = [stack.replica(), stack.replica()];
    let urls = vec![
        stack.url.clone(),
        replicas[0].url.clone(),
        replicas[1].url.clone(),
    ];
    let answers = spread(&stack, &urls, 90, &chat_body("one call for everyone")).await;
    assert_eq!(
        stack.provider_calls(),
        1,
        "one provider call for 90 requests"
    );
    assert!(answers.iter().all(|(status, _)| *status == 200));
    assert!(
        answers.iter().all(|(_, body)| *body == answers[0].1),
        "every client got the same answer"
    );
    let remote: f64 = replicas
        .iter()
        .map(|r| {
            let page = String::from_utf8(r.service.metrics().render()).unwrap();
            page.lines()
                .find_map(|l| l.strip_prefix("gateway_coalesced_remote_total "))
                .map_or(0.0, |v| v.parse().unwrap())
        })
        .sum::<f64>()
        + stack.metric("gateway_coalesced_remote_total");
    assert!(
        remote >= 2.0,
        "at least the two other replicas followed: {remote}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_leaders_error_reaches_followers_on_other_replicas_without_a_stampede() {
    // What is not cached is shared only while the flight lasts: a request arriving after it
    // calls again. The 20 requests must all arrive within it on a loaded machine.
    let stack = Stack::start_with(Options {
        providers: vec![ProviderConfig {
            latency_ms: 2_000,
            ..ProviderConfig::default()
        }],
        ..slow()
    })
    .await;
    stack.provider().set_fault(
        Fault::Status {
            status: 400,
            retry_after_secs: None,
        },
        None,
    );
    let replica = stack.replica();
    let urls = vec![stack.url.clone(), replica.url.clone()];
    let answers = spread(&stack, &urls, 20, &chat_body("a bad request")).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 400),
        "{answers:?}"
    );
    assert_eq!(
        stack.provider_calls(),
        1,
        "the error was shared, not retried by each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_keeps_its_own_single_flight() {
    // Nothing can be stored: a request arriving after its replica's flight calls again, so
    // the flight lasts long enough for all 20 to arrive on a loaded machine.
    let mut stack = Stack::start_with(Options {
        providers: vec![mock_config("mock", 2_000)],
        ..slow()
    })
    .await;
    let replica = stack.replica();
    stack.redis.kill();
    let urls = vec![stack.url.clone(), replica.url.clone()];
    let answers = spread(&stack, &urls, 20, &chat_body("redis is down")).await;
    assert!(answers.iter().all(|(status, _)| *status == 200));
    assert_eq!(stack.provider_calls(), 2, "one per replica");
    stack.redis.restart();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_following_another_replicas_flight_gets_it_whole_once_complete() {
    let stack = Arc::new(
        Stack::start_with(Options {
            providers: vec![ProviderConfig {
                chunk_delay_ms: 100,
                ..ProviderConfig::default()
            }],
            ..slow()
        })
        .await,
    );
    let replica = stack.replica();
    let mut body = chat_body("streamed across replicas");
    body["stream"] = json!(true);
    let first_byte = |url: String| {
        let (stack, body) = (Arc::clone(&stack), body.clone());
        async move {
            let started = Instant::now();
            let response = stack
                .http
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(ACME)
                .json(&body)
                .send()
                .await
                .unwrap();
            let mut response = response;
            response.chunk().await.unwrap();
            let first = Instant::now();
            while response.chunk().await.unwrap().is_some() {}
            (started, first, Instant::now())
        }
    };
    let leader = tokio::spawn(first_byte(stack.url.clone()));
    // The follower starts once the leader holds the flight lock.
    crate::harness::eventually(
        "the leader's flight lock",
        Duration::from_secs(10),
        || async { !stack.redis.keys("gw:flight:acme:*:lock").is_empty() },
    )
    .await;
    let follower = tokio::spawn(first_byte(replica.url.clone()));
    let ((started, leader_first, leader_end), (_, follower_first, _)) =
        (leader.await.unwrap(), follower.await.unwrap());
    println!(
        "stream across replicas: leader first byte {:?}, end {:?}; follower first byte {:?} (from the leader's start)",
        leader_first - started,
        leader_end - started,
        follower_first - started,
    );
    assert_eq!(stack.provider_calls(), 1);
    // (Slack for the leader's client reading its last chunk late; a live relay would give the
    // follower its first byte near the leader's, most of a second before the end.)
    assert!(
        follower_first + Duration::from_millis(200) >= leader_end,
        "the follower is answered once the leader's stream is complete"
    );
}
