//! The edge usage ingest: its credential, line-by-line judgement, and what accepted records do to
//! the metrics, the rate window and the dashboard.

#![allow(
    clippy::expect_used,
    reason = "test helpers: a failure to reach the stack is the test failing"
)]

use gateway_common::usage::{Outcome, Tier, USAGE_VERSION, UsageRecord};
use gateway_origin::settings::{ModelPrice, Secret};
use reqwest::StatusCode;
use serde_json::Value;

use std::time::Duration;

use crate::harness::{Options, Stack, eventually};

const TOKEN: &str = "test-usage-ingest-token";
const ADMIN: &str = "test-admin-token-0123";

fn record(tenant: &str, layer: Tier, outcome: Outcome, saved: (u64, u64)) -> UsageRecord {
    UsageRecord {
        v: USAGE_VERSION,
        ts: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is past 1970")
            .as_secs(),
        tenant: tenant.into(),
        route: "chat.completions".into(),
        layer,
        outcome,
        status: if outcome == Outcome::Limited {
            429
        } else {
            200
        },
        model: "gpt-4o-mini".into(),
        saved_prompt_tokens: saved.0,
        saved_completion_tokens: saved.1,
        bytes: 300,
        total_ms: 1.5,
        steps: vec![("auth".into(), 0.1), ("kv".into(), 0.9)],
        pop: String::new(),
        region: String::new(),
        span: None,
        kv_reject: String::new(),
    }
}

async fn stack() -> Stack {
    Stack::start_with(Options {
        settings: Box::new(|s| {
            s.usage.ingest_token = Some(Secret::new(TOKEN));
            s.security.admin_token = Some(Secret::new(ADMIN));
            s.usage.fastly_service_ids = vec!["SU1Z0isxPaozGVKXdv0eY".into()];
            s.pricing.insert(
                "gpt-4o-mini".into(),
                ModelPrice {
                    prompt_per_million: 0.15,
                    completion_per_million: 0.6,
                },
            );
        }),
        ..Options::default()
    })
    .await
}

async fn ingest(stack: &Stack, token: Option<&str>, body: String) -> (StatusCode, Value) {
    let mut req = stack
        .http
        .post(format!("{}/ingest/edge-usage", stack.url))
        .header("content-type", "application/x-ndjson")
        .body(body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("the origin answers");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn lines(records: &[UsageRecord]) -> String {
    records.iter().map(|r| r.to_line() + "\n").collect()
}

#[tokio::test]
async fn edge_hits_count_for_their_tenant_only_with_their_tokens_saved() {
    let stack = stack().await;
    let hits: Vec<_> = (0..100)
        .map(|_| record("acme", Tier::Edge, Outcome::Hit, (5, 2)))
        .collect();
    let (status, report) = ingest(&stack, Some(TOKEN), lines(&hits)).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], 100);

    let m = |s: &str| stack.metric(s);
    assert_eq!(
        m(r#"gateway_answers_total{outcome="hit",tenant="acme",tier="edge"}"#),
        100.0
    );
    assert_eq!(
        m(r#"gateway_tokens_saved_total{tenant="acme",tier="edge"}"#),
        700.0
    );
    let dollars = m(r#"gateway_cost_saved_dollars_total{tenant="acme",tier="edge"}"#);
    assert!(
        (dollars - 100.0 * (5.0 * 0.15 + 2.0 * 0.6) / 1e6).abs() < 1e-9,
        "{dollars}"
    );
    assert_eq!(
        stack.metric_sum("gateway_edge_duration_seconds_count"),
        100.0
    );
    assert_eq!(m(r#"gateway_usage_lines_total{outcome="accepted"}"#), 100.0);
    for tenant in ["globex", "initech"] {
        let sample =
            format!(r#"gateway_answers_total{{outcome="hit",tenant="{tenant}",tier="edge"}}"#);
        assert_eq!(m(&sample), 0.0, "{tenant}");
    }

    // Records of answers the origin produced only feed the edge latency: the origin counted
    // the answer itself when it made it.
    let forwarded = vec![record("acme", Tier::Upstream, Outcome::Miss, (0, 0))];
    ingest(&stack, Some(TOKEN), lines(&forwarded)).await;
    assert_eq!(stack.metric_sum("gateway_answers_total"), 100.0);
    assert_eq!(
        m(r#"gateway_edge_duration_seconds_count{tier="upstream"}"#),
        1.0
    );

    // The saved tokens reach the tenant's monthly ledger in Redis with the next flush.
    eventually(
        "700 tokens in the ledger",
        Duration::from_secs(10),
        || async {
            let keys = stack.redis.keys("gw:saved:{acme}:*");
            assert!(keys.len() <= 1, "{keys:?}");
            keys.first()
                .is_some_and(|key| stack.redis.cli(&["GET", key]).trim() == "700")
        },
    )
    .await;
}

#[tokio::test]
async fn an_ingest_without_the_token_is_refused_and_counts_nothing() {
    let stack = stack().await;
    let body = lines(&[record("acme", Tier::Edge, Outcome::Hit, (5, 2))]);
    for token in [None, Some("wrong-token-wrong-token"), Some(ADMIN)] {
        let (status, error) = ingest(&stack, token, body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(error["error"]["code"], "invalid_api_key");
    }
    assert_eq!(stack.metric_sum("gateway_answers_total"), 0.0);
    assert_eq!(
        stack.metric(r#"gateway_usage_batches_total{outcome="unauthorized"}"#),
        3.0
    );
}

#[tokio::test]
async fn a_malformed_batch_is_refused_line_by_line_and_the_good_lines_count() {
    let stack = stack().await;
    let good = record("acme", Tier::Edge, Outcome::Hit, (5, 2)).to_line();
    let mut other_version = record("acme", Tier::Edge, Outcome::Hit, (5, 2));
    other_version.v = 9;
    let body = [
        good.clone(),
        "not json at all".to_owned(),
        record("nobody", Tier::Edge, Outcome::Hit, (1, 1)).to_line(),
        good.clone(),
        String::new(),
        other_version.to_line(),
        good.replace("\"acme\"", "\"ACME\""),
        good,
    ]
    .join("\n");
    let (status, report) = ingest(&stack, Some(TOKEN), body).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], 3, "{report}");
    assert_eq!(report["rejected_total"], 4, "{report}");
    let rejected: Vec<u64> = report["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected, vec![2, 3, 6, 7], "{report}");
    assert!(
        report["rejected"][1]["error"]
            .as_str()
            .unwrap()
            .contains("nobody")
    );
    assert_eq!(
        stack.metric(r#"gateway_answers_total{outcome="hit",tenant="acme",tier="edge"}"#),
        3.0
    );
    assert_eq!(
        stack.metric(r#"gateway_usage_lines_total{outcome="rejected"}"#),
        4.0
    );

    // Nothing good at all: 400, with the same report.
    let (status, report) = ingest(&stack, Some(TOKEN), "{}\n[]\n".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(report["accepted"], 0);
    assert_eq!(report["rejected_total"], 2);
}

#[tokio::test]
async fn edge_hits_count_in_the_tenants_rate_window() {
    // fixtures/tenants.json: acme may make 100 requests per second.
    let stack = stack().await;
    let hits: Vec<_> = (0..150)
        .map(|_| record("acme", Tier::Edge, Outcome::Hit, (5, 2)))
        .collect();
    let (status, _) = ingest(&stack, Some(TOKEN), lines(&hits)).await;
    assert_eq!(status, StatusCode::OK);
    let refused = stack
        .chat("sk-dev-acme", "after a burst of edge hits")
        .await;
    // The window is one second: the check may land in the next one, so try once more at once.
    let status = if refused.status() == StatusCode::TOO_MANY_REQUESTS {
        refused.status()
    } else {
        ingest(&stack, Some(TOKEN), lines(&hits)).await;
        stack
            .chat("sk-dev-acme", "after a second burst")
            .await
            .status()
    };
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // globex's window is its own.
    let other = stack.chat("sk-dev-globex", "unaffected").await;
    assert_eq!(other.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_dashboard_needs_the_admin_token_and_shows_what_metrics_count() {
    let stack = stack().await;
    let resp = stack
        .http
        .get(format!("{}/dashboard", stack.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic ")
    );

    let hits: Vec<_> = (0..4)
        .map(|_| record("acme", Tier::Edge, Outcome::Hit, (5, 2)))
        .collect();
    ingest(&stack, Some(TOKEN), lines(&hits)).await;
    assert_eq!(
        stack.chat("sk-dev-acme", "one").await.status(),
        StatusCode::OK
    );
    // The answer comes back before its cache write lands: without the wait, the second
    // request can join the first one's flight and be counted upstream, not an origin hit.
    stack.settle().await;
    assert_eq!(
        stack.chat("sk-dev-acme", "one").await.status(),
        StatusCode::OK
    );
    stack.settle().await;

    // The series reach Redis with the next flush: wait for what the metrics count.
    let saved = stack.metric_sum("gateway_tokens_saved_total");
    let what = format!("answers [4, 1, 1] and {saved} tokens saved on the dashboard");
    eventually(&what, Duration::from_secs(10), || async {
        let data: Value = stack
            .http
            .get(format!("{}/dashboard.json", stack.url))
            .basic_auth("operator", Some(ADMIN))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        data["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tenant"] == "acme")
            .is_some_and(|acme| {
                acme["answers"] == serde_json::json!([4, 1, 1])
                    && acme["saved_tokens"].as_f64() == Some(saved)
            })
    })
    .await;

    let page = stack
        .http
        .get(format!("{}/dashboard", stack.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"<td data-field="answers_edge">4</td>"#),
        "{html}"
    );

    // Fastly's logging challenge: the sha256 of the configured service id.
    let challenge = stack
        .http
        .get(format!(
            "{}/.well-known/fastly/logging/challenge",
            stack.url
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let expected = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(b"SU1Z0isxPaozGVKXdv0eY"))
    };
    assert_eq!(challenge.trim(), expected);
}

#[tokio::test]
async fn entries_the_edge_refused_are_counted_by_reason_with_unknown_reasons_as_other() {
    let stack = stack().await;
    let refused = |reason: &str| {
        let mut r = record("acme", Tier::Upstream, Outcome::Miss, (0, 0));
        r.kv_reject = reason.into();
        r
    };
    let records = [
        refused("unopenable"),
        refused("unopenable"),
        refused("unknown_key_id"),
        refused("a label an old or hostile edge made up"),
        record("acme", Tier::Edge, Outcome::Hit, (5, 2)),
    ];
    let (status, report) = ingest(&stack, Some(TOKEN), lines(&records)).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["accepted"], 5);
    let m = |s: &str| stack.metric(s);
    assert_eq!(
        m(r#"gateway_edge_kv_rejects_total{reason="unopenable"}"#),
        2.0
    );
    assert_eq!(
        m(r#"gateway_edge_kv_rejects_total{reason="unknown_key_id"}"#),
        1.0
    );
    assert_eq!(m(r#"gateway_edge_kv_rejects_total{reason="other"}"#), 1.0);
    assert_eq!(stack.metric_sum("gateway_edge_kv_rejects_total"), 4.0);
}
