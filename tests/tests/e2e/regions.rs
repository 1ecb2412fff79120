//! Two origin regions behind one edge: `us` 20 ms away, `eu` 150 ms away, each with its own
//! Redis. Requests go to the near one; when it fails (a 5xx, or a refused connect) the far one
//! answers and the client sees no error; traffic returns once it is back. A purge accepted by
//! one region takes effect in the other's Redis, also when that one was down at the time.

use std::time::Duration;

use gateway_common::route::Route;
use gateway_e2e::regions::{PEER_TOKEN, RegionSpec, RegionStack};
use gateway_e2e::stack::{ACME, chat_body, header, key_for};
use serde_json::Value;

const NEAR: Duration = Duration::from_millis(20);
const FAR: Duration = Duration::from_millis(150);
/// How long a forwarded purge may take to apply here: generous, for a loaded 2-core machine.
const APPLY_WITHIN: Duration = Duration::from_secs(15);

async fn two_regions() -> RegionStack {
    RegionStack::start(&[RegionSpec::new("us", NEAR), RegionSpec::new("eu", FAR)])
        .await
        .expect("two regions start")
}

/// Asks the edge for `prompt`: it must answer 200 (never an error the client sees); the
/// region that answered and the regions tried.
async fn ask(stack: &RegionStack, prompt: &str) -> (String, String) {
    timed_ask(stack, prompt).await.0
}

/// [`ask`], and how long the answer took (printed, never asserted).
async fn timed_ask(stack: &RegionStack, prompt: &str) -> ((String, String), Duration) {
    let started = std::time::Instant::now();
    let resp = stack.edge_chat(ACME, prompt).await;
    let (region, tried) = (
        header(&resp, "x-upstream-region"),
        header(&resp, "x-upstream-tried"),
    );
    let cache_status = header(&resp, "cache-status");
    assert_eq!(resp.status(), 200, "{prompt:?}: tried {tried}");
    assert!(
        cache_status.contains(&format!("region={region}")),
        "{prompt:?}: Cache-Status {cache_status:?} names the region {region}"
    );
    resp.bytes().await.expect("body");
    ((region, tried), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_near_region_answers_the_far_one_takes_over_while_it_is_down_and_traffic_returns() {
    let mut stack = two_regions().await;

    let ((region, tried), near) = timed_ask(&stack, "regions: first").await;
    assert_eq!((region.as_str(), tried.as_str()), ("us", "us=200"));
    assert_eq!(stack.region("us").requests(), 1);
    assert_eq!(
        stack.region("eu").requests(),
        0,
        "the far region is not asked"
    );

    // The near origin stops; its proxy answers 502: a 5xx from the region, never shown.
    stack.region("us").stop_origin().await;
    let ((region, tried), after_5xx) = timed_ask(&stack, "regions: near origin down").await;
    assert_eq!(region, "eu");
    assert_eq!(tried, "us=502, eu=200");
    assert_eq!(stack.region("eu").requests(), 1);

    // The path to the near region is cut too: its address refuses the connection.
    stack.region("us").stop_proxy().await;
    let ((region, tried), after_refused) =
        timed_ask(&stack, "regions: near region unreachable").await;
    assert_eq!(region, "eu");
    assert_eq!(tried, "us=unreachable, eu=200");
    assert_eq!(stack.region("eu").requests(), 2);

    // Back: the next request goes to the near region again.
    stack
        .region("us")
        .start_origin()
        .await
        .expect("us restarts");
    stack
        .region("us")
        .start_proxy()
        .await
        .expect("us proxy restarts");
    let near_before = stack.region("us").requests();
    let (region, tried) = ask(&stack, "regions: near region back").await;
    assert_eq!((region.as_str(), tried.as_str()), ("us", "us=200"));
    assert_eq!(stack.region("us").requests(), near_before + 1);
    assert_eq!(
        stack.region("eu").requests(),
        2,
        "no more traffic to the far region"
    );
    assert_eq!(
        stack.provider.calls(),
        4,
        "one provider call per prompt, wherever"
    );
    println!(
        "regions (us {NEAR:?}, eu {FAR:?} each way), misses: us answered in {near:?}; eu after \
         us's 5xx in {after_5xx:?}; eu after us refused the connect in {after_refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pop_with_its_own_order_goes_to_its_own_nearest_region_first() {
    let specs = [RegionSpec::new("us", NEAR), RegionSpec::new("eu", FAR)];
    let mut stack = RegionStack::start_at_pop(&specs, Some(("LHR", &["eu", "us"])))
        .await
        .expect("two regions start");
    let (region, tried) = ask(&stack, "regions: from London").await;
    assert_eq!((region.as_str(), tried.as_str()), ("eu", "eu=200"));
    assert_eq!(stack.region("eu").requests(), 1);
    assert_eq!(stack.region("us").requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_region_down_is_a_clean_error_that_names_each_region_tried() {
    let mut stack = two_regions().await;
    for name in ["us", "eu"] {
        stack.region(name).stop_proxy().await;
    }
    let resp = stack.edge_chat(ACME, "regions: all down").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "x-upstream-region"), "none");
    assert_eq!(
        header(&resp, "x-upstream-tried"),
        "us=unreachable, eu=unreachable"
    );
    let body: Value = resp.json().await.expect("an OpenAI-shaped error");
    assert_eq!(body["error"]["code"], "origin_unavailable", "{body}");
}

/// Caches `prompt` in both regions (asked straight, so each region's Redis holds it): two
/// provider calls, then a hit in each.
async fn cache_in_both(stack: &RegionStack, prompt: &str) {
    let before = stack.provider.calls();
    for index in 0..2 {
        let resp = stack.origin_chat(index, ACME, prompt).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "x-cache"),
            "MISS",
            "{prompt:?} in region {index}"
        );
    }
    for index in 0..2 {
        let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt)).redis_key();
        stack
            .wait_for_redis(index, &["EXISTS", &key], "1", APPLY_WITHIN)
            .await;
        let resp = stack.origin_chat(index, ACME, prompt).await;
        assert_eq!(
            header(&resp, "x-cache"),
            "HIT",
            "{prompt:?} in region {index}"
        );
        assert_eq!(
            header(&resp, "x-origin-region"),
            ["us", "eu"][index],
            "each origin names its region"
        );
    }
    assert_eq!(stack.provider.calls(), before + 2);
}

/// Asks region `index` straight: a miss, and one new provider call.
async fn assert_missed_in(stack: &RegionStack, index: usize, prompt: &str) {
    let before = stack.provider.calls();
    let resp = stack.origin_chat(index, ACME, prompt).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "MISS", "{prompt:?} is purged");
    assert_eq!(stack.provider.calls(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_purge_and_a_tenant_purge_sent_to_one_region_take_effect_in_the_other() {
    let stack = two_regions().await;

    let prompt = "regions: purge one key";
    cache_in_both(&stack, prompt).await;
    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));
    let (status, body) = stack
        .origin_delete(0, ACME, &format!("/v1/cache/{}", key.hex()))
        .await;
    assert_eq!(status, 200, "{body}");
    stack
        .wait_for_redis(1, &["EXISTS", &key.redis_key()], "0", APPLY_WITHIN)
        .await;
    assert_missed_in(&stack, 1, prompt).await;

    let prompt = "regions: purge the tenant";
    cache_in_both(&stack, prompt).await;
    let (status, body) = stack.origin_delete(0, ACME, "/v1/cache").await;
    assert_eq!(status, 200, "{body}");
    let generation = body["generation"]
        .as_u64()
        .expect("a generation")
        .to_string();
    stack
        .wait_for_redis(1, &["GET", "gw:gen:{acme}"], &generation, APPLY_WITHIN)
        .await;
    assert_missed_in(&stack, 1, prompt).await;
    assert_missed_in(&stack, 0, prompt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_that_was_down_during_a_purge_applies_it_when_it_is_back() {
    let mut stack = two_regions().await;
    let prompt = "regions: purged while eu was down";
    cache_in_both(&stack, prompt).await;
    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));

    stack.region("eu").stop_origin().await;
    let (status, body) = stack
        .origin_delete(0, ACME, &format!("/v1/cache/{}", key.hex()))
        .await;
    assert_eq!(status, 200, "accepted while a peer is down: {body}");
    // The forward waits in us's outbox (in us's Redis), retried.
    stack
        .wait_for_redis(0, &["XLEN", "gw:{peers}:eu"], "1", APPLY_WITHIN)
        .await;
    assert_eq!(
        stack.regions[1]
            .redis
            .cli(&["EXISTS", &key.redis_key()])
            .ok()
            .as_deref(),
        Some("1"),
        "eu has not heard of it yet"
    );

    stack
        .region("eu")
        .start_origin()
        .await
        .expect("eu restarts");
    stack
        .wait_for_redis(1, &["EXISTS", &key.redis_key()], "0", APPLY_WITHIN)
        .await;
    stack
        .wait_for_redis(0, &["XLEN", "gw:{peers}:eu"], "0", APPLY_WITHIN)
        .await;
    assert_missed_in(&stack, 1, prompt).await;
    let http = stack.http.clone();
    let received = stack.regions[1]
        .metric(
            &http,
            "gateway_region_purges_received_total",
            &["from=\"us\"", "op=\"key\"", "outcome=\"applied\""],
        )
        .await;
    assert_eq!(received, 1.0, "applied once, and not forwarded back");
    let back = stack.regions[0]
        .metric(&http, "gateway_region_purges_received_total", &[])
        .await;
    assert_eq!(back, 0.0, "the peer does not forward a purge again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_internal_purge_route_takes_only_a_peer_with_the_token_and_a_valid_forward() {
    let stack = two_regions().await;
    let url = format!("{}/internal/region/purge", stack.regions[1].origin_url());
    let valid = serde_json::json!({"from": "us", "tenant": "acme", "generation": 1});
    for token in [None, Some("not-the-peer-token"), Some(ACME)] {
        let mut request = stack.http.post(&url).json(&valid);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let resp = request.send().await.expect("answers");
        assert_eq!(resp.status(), 401, "token {token:?}");
    }
    let malformed = serde_json::json!({"from": "us", "tenant": "acme"});
    let resp = stack
        .http
        .post(&url)
        .bearer_auth(PEER_TOKEN)
        .json(&malformed)
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("an OpenAI-shaped error");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(
        stack.regions[1]
            .redis
            .cli(&["EXISTS", "gw:gen:{acme}"])
            .ok()
            .as_deref(),
        Some("0"),
        "nothing refused was applied"
    );
}
