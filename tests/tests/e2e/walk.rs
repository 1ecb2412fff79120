//! The three-tier walk told by counters: provider calls, requests that crossed to the origin,
//! and entries in Redis, checked after every step.

use gateway_common::route::Route;
use gateway_e2e::stack::{ACME, Stack, chat_body, completion_text, header, key_for};
use serde_json::Value;

/// What the counters say at one point of the walk.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    provider_calls: u64,
    origin_requests: u64,
    redis_entries: Vec<String>,
}

fn counts(stack: &Stack) -> Counts {
    let mut redis_entries = stack.redis.keys("gw:v1:*").expect("redis keys");
    redis_entries.sort();
    Counts {
        provider_calls: stack.provider.calls(),
        origin_requests: stack.origin_requests(),
        redis_entries,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_prompt_costs_one_provider_call_one_redis_entry_and_two_origin_requests() {
    let stack = Stack::start().await.expect("stack starts");
    let prompt = "count the tiers";
    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));
    let entry = vec![key.redis_key()];
    assert_eq!(
        counts(&stack),
        Counts {
            provider_calls: 0,
            origin_requests: 0,
            redis_entries: vec![]
        }
    );

    // (x-cache, x-cache-layer, counters after the request) for each step of the walk.
    let steps = [
        ("MISS", "upstream", 1, 1),
        ("HIT", "origin", 1, 2),
        ("HIT", "edge", 1, 2),
        ("HIT", "edge", 1, 2),
        ("HIT", "edge", 1, 2),
    ];
    let mut answer = None;
    for (i, (cache, layer, provider_calls, origin_requests)) in steps.into_iter().enumerate() {
        let resp = stack.edge_chat(ACME, prompt).await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(header(&resp, "x-cache"), cache, "request {i}");
        assert_eq!(header(&resp, "x-cache-layer"), layer, "request {i}");
        assert_eq!(header(&resp, "x-cache-key"), key.hex(), "request {i}");
        let body: Value = resp.json().await.expect("a JSON body");
        let this = (body["id"].clone(), completion_text(&body));
        assert_eq!(
            answer.get_or_insert_with(|| this.clone()),
            &this,
            "request {i} carries the provider's one answer, id included"
        );
        stack.settle().await;
        assert_eq!(
            counts(&stack),
            Counts {
                provider_calls,
                origin_requests,
                redis_entries: entry.clone()
            },
            "after request {i} ({cache} from {layer})"
        );
    }
}
