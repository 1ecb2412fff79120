//! The edge's `ttl_cap_secs` bounds every KV entry it serves, whoever wrote it: the origin
//! replicates entries with its own TTL (up to its own, longer cap), and the edge must not
//! serve them as fresh for longer than its own cap.

use gateway_common::route::Route;
use gateway_e2e::entry::{completion, kv_seed, now};
use gateway_e2e::stack::{ACME, Stack, StackOptions, chat_body, completion_text, header, key_for};
use serde_json::Value;

const DAY: u64 = 86_400;
const HOUR: u64 = 3_600;

/// The edge's log line for the last request on `prompt` (acme).
async fn edge_line(stack: &Stack, prompt: &str) -> Value {
    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));
    stack.edge_log_line(&key).await
}

/// The `ttl=` of the edge's `Cache-Status` member.
fn edge_ttl(cache_status: &str) -> i64 {
    cache_status
        .split(',')
        .map(str::trim)
        .find(|member| member.starts_with("gateway-edge"))
        .and_then(|member| member.split("ttl=").nth(1))
        .and_then(|ttl| ttl.split(';').next())
        .and_then(|ttl| ttl.trim().parse().ok())
        .unwrap_or_else(|| panic!("no edge ttl in {cache_status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_replicated_with_a_seven_day_ttl_is_not_an_edge_hit_after_the_one_day_cap() {
    let t = now();
    // As the origin's dual-write stores them: its own 7-day TTL in the envelope.
    let old = completion("acme", "two days old", t - 2 * DAY, 7 * DAY, "seeded-old");
    let young = completion("acme", "an hour old", t - HOUR, 7 * DAY, "seeded-young");
    let stack = Stack::start_with(StackOptions {
        kv: vec![kv_seed(&old), kv_seed(&young)],
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");

    let resp = stack.edge_chat(ACME, "two days old").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "MISS");
    assert_eq!(header(&resp, "x-cache-layer"), "upstream");
    assert!(
        header(&resp, "cache-status").contains("gateway-edge; fwd=stale"),
        "{}",
        header(&resp, "cache-status")
    );
    let body: Value = resp.json().await.expect("a JSON body");
    assert!(
        completion_text(&body).starts_with("echo:"),
        "answered by the provider, not the seeded entry"
    );
    assert_eq!(
        stack.origin_requests(),
        1,
        "the old entry went to the origin"
    );
    assert_eq!(stack.provider.calls(), 1);
    assert_eq!(
        edge_line(&stack, "two days old").await["kv"],
        "expired",
        "two days is past the one-day cap and acme's one-day stale window"
    );

    let resp = stack.edge_chat(ACME, "an hour old").await;
    assert_eq!(header(&resp, "x-cache"), "HIT");
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    let ttl = edge_ttl(&header(&resp, "cache-status"));
    assert!(
        ttl <= (DAY - HOUR) as i64,
        "the freshness left is counted from the capped TTL, got ttl={ttl}"
    );
    assert_eq!(
        stack.origin_requests(),
        1,
        "only the old entry went to the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_origin_down_the_stale_window_counts_from_the_capped_ttl() {
    let t = now();
    // Capped to one day, these are 6 h and 26 h into acme's one-day stale-if-error window.
    let stale = completion(
        "acme",
        "thirty hours old",
        t - 30 * HOUR,
        7 * DAY,
        "seeded-30h",
    );
    let gone = completion(
        "acme",
        "fifty hours old",
        t - 50 * HOUR,
        7 * DAY,
        "seeded-50h",
    );
    let mut stack = Stack::start_with(StackOptions {
        kv: vec![kv_seed(&stale), kv_seed(&gone)],
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    stack.stop_origin().await;

    let resp = stack.edge_chat(ACME, "thirty hours old").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "STALE");
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    let ttl = edge_ttl(&header(&resp, "cache-status"));
    assert!(
        (-(6 * HOUR as i64) - 60..=-(6 * HOUR as i64)).contains(&ttl),
        "six hours past the capped TTL, got ttl={ttl}"
    );
    let body: Value = resp.json().await.expect("a JSON body");
    assert_eq!(completion_text(&body), "seeded-30h");

    let resp = stack.edge_chat(ACME, "fifty hours old").await;
    assert_eq!(
        resp.status(),
        503,
        "past the capped TTL and its stale window"
    );
    assert_eq!(edge_line(&stack, "fifty hours old").await["kv"], "expired");
}
