//! The origin binary's JSON lines when it exports no spans: each request runs in a request
//! scope rather than a span, and every line it writes, those of the provider call's own task
//! included, still carries the `request` entry with the request's trace id.

use std::time::Duration;

use gateway_common::route::Route;
use gateway_e2e::replica_stack::{ReplicaStack, ReplicaStackOptions};
use gateway_e2e::stack::{ACME, chat_body, header, key_for};
use gateway_fixtures::provider::Fault;
use serde_json::{Value, json};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// The origin's JSON lines that name `trace_id` anywhere.
fn lines_with(log: &str, trace_id: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.contains(trace_id))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_span_export_every_line_of_a_request_carries_its_trace_id() {
    let stack = ReplicaStack::start_with(ReplicaStackOptions {
        replicas: 1,
        settings: Some(Box::new(|_, config| {
            config
                .set_str("log", "format", "json")
                // The failed attempt's line is DEBUG, written from the provider call's task.
                .set_str("log", "filter", "info,gateway_origin::router=debug");
        })),
        ..ReplicaStackOptions::default()
    })
    .await
    .expect("the stack starts");
    let traceparent = format!("00-{TRACE_ID}-b7ad6b7169203331-01");
    let body = chat_body("a question logged in its scope");
    stack.provider.set_fault(
        Fault::Status {
            status: 500,
            retry_after_secs: None,
        },
        Some(1),
    );
    let key = key_for("acme", Route::ChatCompletions, &body);
    // The first request meets the provider's 500 (on one of its attempts). Then ask again
    // until the answer is a hit: a repeat can join a flight still in progress (the failed one,
    // or the next one's write) and get its outcome, so wait for the entry in Redis after a 200.
    let mut outcomes = Vec::new();
    while outcomes.last() != Some(&(200, "HIT".to_owned())) {
        assert!(outcomes.len() < 10, "never a hit: {outcomes:?}");
        let response = stack
            .replica_post(
                0,
                "/v1/chat/completions",
                ACME,
                &body,
                &[("traceparent", traceparent.as_str())],
            )
            .await;
        let outcome = (response.status().as_u16(), header(&response, "x-cache"));
        if outcome.0 == 200 {
            stack.wait_for_redis(&key, Duration::from_secs(10)).await;
        }
        outcomes.push(outcome);
    }

    let log = stack.replicas.log(0);
    let lines = lines_with(&log, TRACE_ID);
    let request = json!({"route": "chat.completions", "trace_id": TRACE_ID, "name": "request"});
    let failed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "provider attempt failed")
        .collect();
    assert!(!failed.is_empty(), "no failed attempt line: {log}");
    for line in &failed {
        // Written by the provider call's own task, which carries the request's scope.
        assert_eq!(line["spans"], json!([request]), "{line}");
    }
    let answered: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request")
        .collect();
    assert_eq!(
        answered.len(),
        outcomes.len(),
        "one request line per request: {log}"
    );
    for line in &answered {
        assert_eq!(line["spans"], json!([request]), "{line}");
    }
    assert_eq!(
        answered.last().expect("a request line")["fields"]["cache"],
        "HIT"
    );
}
