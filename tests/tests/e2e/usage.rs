//! Every tier counted: the edge's usage records, forwarded from Viceroy's output in batches as
//! Fastly's HTTPS log endpoint would deliver them, reach the origin's metering; the forwarder
//! or the ingest being down never touches an edge request.

use std::time::{Duration, Instant};

use gateway_e2e::stack::{ACME, Stack, StackOptions, USAGE_TOKEN, chat_body, header};

/// What the test allows for a record to reach the origin: the forwarder's linger (200 ms in
/// tests, 1 s by default), a file poll (50 ms) and one delivery, with a wide margin for a busy
/// machine. The measured delay is printed.
const DELIVERY_BOUND: Duration = Duration::from_secs(10);

/// One sample, e.g. `gateway_answers_total{outcome="hit",tenant="acme",tier="edge"}`.
fn metric(stack: &Stack, sample: &str) -> f64 {
    let (name, labels) = sample.split_once('{').unwrap_or((sample, "}"));
    let labels: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty())
        .collect();
    stack.metric(name, &labels)
}

/// Two requests through the edge make the prompt an edge hit (MISS, then origin HIT, which
/// the edge stores locally); returns the entry's total tokens.
async fn warm(stack: &Stack, key: &str, prompt: &str) -> u64 {
    let miss = stack.edge_chat(key, prompt).await;
    assert_eq!(header(&miss, "x-cache"), "MISS");
    stack.settle().await;
    let body: serde_json::Value = stack.edge_chat(key, prompt).await.json().await.unwrap();
    stack.settle().await;
    let hit = stack.edge_chat(key, prompt).await;
    assert_eq!(header(&hit, "x-cache-layer"), "edge");
    body["usage"]["total_tokens"].as_u64().expect("usage")
}

async fn wait_for(stack: &Stack, sample: &str, want: f64) -> Duration {
    let started = Instant::now();
    while metric(stack, sample) < want {
        assert!(
            started.elapsed() < DELIVERY_BOUND,
            "{sample} is {} after {DELIVERY_BOUND:?}, want {want}; forwarder: {:?}",
            metric(stack, sample),
            stack.edge.forwarder().map(|f| f.stats()),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_edge_hits_reach_the_origins_metering_for_their_tenant_only() {
    let stack = Stack::start_with(StackOptions {
        usage: true,
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    let prompt = "metered at the edge";
    let tokens = warm(&stack, ACME, prompt).await;
    let hits = r#"gateway_answers_total{outcome="hit",tenant="acme",tier="edge"}"#;
    wait_for(&stack, hits, 1.0).await;
    let before = metric(&stack, hits);
    let globex_before = stack.service.metrics().render();

    let client = reqwest::Client::new();
    let body = chat_body(prompt);
    for _ in 0..100 {
        let resp = client
            .post(format!("{}/v1/chat/completions", stack.edge.url()))
            .bearer_auth(ACME)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-cache-layer"), "edge");
    }
    let sent = Instant::now();
    let took = wait_for(&stack, hits, before + 100.0).await;
    println!(
        "100 edge hits counted at the origin {:?} after the last one was answered (bound {DELIVERY_BOUND:?})",
        sent.elapsed().min(took)
    );
    assert_eq!(
        metric(&stack, hits),
        before + 100.0,
        "each hit counted once"
    );
    let saved = metric(
        &stack,
        r#"gateway_tokens_saved_total{tenant="acme",tier="edge"}"#,
    );
    assert_eq!(saved, (before + 100.0) * tokens as f64);
    assert!(
        metric(
            &stack,
            r#"gateway_cost_saved_dollars_total{tenant="acme",tier="edge"}"#
        ) > 0.0
    );
    // Nothing for globex, before or after.
    let globex = |page: &[u8]| {
        String::from_utf8_lossy(page)
            .lines()
            .filter(|l| l.contains(r#"tenant="globex""#))
            .count()
    };
    assert_eq!(globex(&globex_before), 0);
    assert_eq!(globex(&stack.service.metrics().render()), 0);
    // The edge's view of the origin answers feeds the latency by tier, not the answer counts.
    assert!(
        metric(
            &stack,
            r#"gateway_edge_duration_seconds_count{tier="upstream"}"#
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &stack,
            r#"gateway_answers_total{outcome="miss",tenant="acme",tier="upstream"}"#
        ),
        1.0
    );

    // The ingest route, called as an attacker would: no credential, then a mixed batch.
    let origin = &stack.origin_url;
    let refused = client
        .post(format!("{origin}/ingest/edge-usage"))
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let good = r#"{"v":1,"ts":1,"tenant":"globex","route":"chat.completions","layer":"edge","outcome":"hit","status":200,"total_ms":1.0}"#;
    let mixed = format!("{good}\nnot a record\n{good}\n");
    let report: serde_json::Value = client
        .post(format!("{origin}/ingest/edge-usage"))
        .bearer_auth(USAGE_TOKEN)
        .body(mixed)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["accepted"], 2, "{report}");
    assert_eq!(report["rejected"][0]["line"], 2, "{report}");
    assert_eq!(
        metric(
            &stack,
            r#"gateway_answers_total{outcome="hit",tenant="globex",tier="edge"}"#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_ingest_or_the_forwarder_down_edge_requests_are_unaffected() {
    let mut stack = Stack::start_with(StackOptions {
        usage: true,
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    let prompt = "served while metering is down";
    warm(&stack, ACME, prompt).await;

    // The ingest (the whole origin) down: edge hits go on, the records wait and are counted.
    stack.stop_origin().await;
    for _ in 0..20 {
        let hit = stack.edge_chat(ACME, prompt).await;
        assert_eq!(hit.status(), 200);
        assert_eq!(header(&hit, "x-cache-layer"), "edge");
    }
    let forwarder = stack.edge.forwarder().expect("forwarder");
    let deadline = Instant::now() + DELIVERY_BOUND;
    // A delivery has failed, and the forwarder has read the 20 hits' records (the edge writes
    // each after its answer; the forwarder polls the file).
    while {
        let stats = forwarder.stats();
        stats.failed_attempts == 0 || stats.pending < 20
    } {
        assert!(Instant::now() < deadline, "{:?}", forwarder.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = forwarder.stats();
    println!("ingest down: {stats:?}");
    assert!(
        stats.pending >= 20,
        "undelivered records are kept and counted: {stats:?}"
    );
    assert_eq!(
        stats.read,
        stats.delivered + stats.rejected + stats.dropped + stats.pending
    );

    // The forwarder down too: the edge still answers, and still writes its records.
    stack.edge.stop_forwarder().await;
    let hit = stack.edge_chat(ACME, prompt).await;
    assert_eq!(hit.status(), 200);
    assert_eq!(header(&hit, "x-cache-layer"), "edge");
    stack.settle().await;
    assert!(stack.edge.log().lines().any(|l| l.starts_with("usage :: ")));
}
