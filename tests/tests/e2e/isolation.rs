//! Tenant isolation at both tiers: many tenants ask the same prompts, at the same time, and
//! no tenant is ever answered from another's entry, at the edge or at the origin.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::join_all;
use gateway_common::route::Route;
use gateway_e2e::stack::{
    Stack, StackOptions, chat_body, completion_text, header, key_for, many_tenants,
};
use serde_json::Value;

const TENANTS: usize = 6;
const PROMPTS: [&str; 5] = [
    "what is the capital of france",
    "summarise the meeting notes",
    "write a haiku about caches",
    "translate hello into german",
    "explain tenant isolation",
];

/// One answer as a client sees it.
#[derive(Debug)]
struct Seen {
    cache: String,
    layer: String,
    key: String,
    id: String,
    content: String,
}

async fn seen(resp: reqwest::Response, what: &str) -> Seen {
    assert_eq!(resp.status(), 200, "{what}");
    let (cache, layer, key) = (
        header(&resp, "x-cache"),
        header(&resp, "x-cache-layer"),
        header(&resp, "x-cache-key"),
    );
    let body: Value = resp.json().await.expect("a JSON body");
    Seen {
        cache,
        layer,
        key,
        id: body["id"].as_str().unwrap_or_default().to_owned(),
        content: completion_text(&body),
    }
}

/// Every (tenant, prompt) pair, tenants interleaved so identical prompts from different
/// tenants are in flight together.
fn pairs() -> Vec<(String, &'static str)> {
    PROMPTS
        .iter()
        .flat_map(|p| (0..TENANTS).map(move |t| (format!("t{t:02}"), *p)))
        .collect()
}

/// One round: every pair once, all at the same time, through the edge or straight to the origin.
async fn round(stack: &Stack, via_edge: bool) -> Vec<Seen> {
    join_all(pairs().into_iter().map(|(tenant, prompt)| async move {
        let api_key = format!("sk-{tenant}");
        let resp = if via_edge {
            stack.edge_chat(&api_key, prompt).await
        } else {
            stack
                .origin_post("/v1/chat/completions", &api_key, &chat_body(prompt))
                .await
        };
        seen(resp, &format!("{tenant} / {prompt}")).await
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tenants_asking_the_same_prompts_never_see_each_others_entries() {
    let stack = Stack::start_with(StackOptions {
        tenants: Some(many_tenants(TENANTS)),
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    let pairs = pairs();
    let n = pairs.len() as u64;

    // Round 1 through the edge: every pair is a miss answered by its own provider call.
    let first = round(&stack, true).await;
    stack.settle().await;
    assert_eq!(
        stack.provider.calls(),
        n,
        "one provider call per (tenant, prompt): identical prompts are never coalesced across tenants"
    );
    let mut own_id = BTreeMap::new();
    for ((tenant, prompt), s) in pairs.iter().zip(&first) {
        assert_eq!(
            (s.cache.as_str(), s.layer.as_str()),
            ("MISS", "upstream"),
            "{tenant} / {prompt}: the first request is a miss"
        );
        own_id.insert((tenant.clone(), *prompt), s.id.clone());
    }
    let ids: BTreeSet<&String> = own_id.values().collect();
    assert_eq!(
        ids.len(),
        pairs.len(),
        "every pair got its own provider call: {own_id:?}"
    );
    let mut redis = stack.redis.keys("gw:v1:*").expect("redis keys");
    redis.sort();
    let mut expected: Vec<String> = pairs
        .iter()
        .map(|(t, p)| key_for(t, Route::ChatCompletions, &chat_body(p)).redis_key())
        .collect();
    expected.sort();
    assert_eq!(redis, expected, "one Redis entry per (tenant, prompt)");

    // Round 2 through the edge (origin hits, which populate the edge), round 3 straight at the
    // origin, round 4 through the edge (edge hits).
    let second = round(&stack, true).await;
    let direct = round(&stack, false).await;
    stack.settle().await;
    let fourth = round(&stack, true).await;
    let rounds = [
        ("first", &first, "upstream"),
        ("second", &second, "origin"),
        ("direct", &direct, "origin"),
        ("fourth", &fourth, "edge"),
    ];
    for (name, answers, layer) in rounds {
        for ((tenant, prompt), s) in pairs.iter().zip(answers) {
            let what = format!("{name} round, {tenant} / {prompt}");
            let key = key_for(tenant, Route::ChatCompletions, &chat_body(prompt));
            assert_eq!(s.key, key.hex(), "{what}: the tenant's own key");
            assert_eq!(s.layer, layer, "{what}");
            assert_eq!(
                s.id,
                own_id[&(tenant.clone(), *prompt)],
                "{what}: answered with this tenant's own provider answer"
            );
            assert!(s.content.starts_with("echo:"), "{what}: {:?}", s.content);
        }
    }
    assert_eq!(stack.provider.calls(), n, "no provider call after round 1");
    assert_eq!(
        stack.origin_requests(),
        2 * n,
        "rounds 1 and 2 crossed to the origin; round 4 was answered at the edge"
    );
    assert_eq!(
        stack.redis.keys("gw:v1:*").expect("redis keys").len(),
        pairs.len()
    );
    for t in 0..TENANTS {
        let own = stack
            .redis
            .keys(&format!("gw:v1:t{t:02}:*"))
            .expect("redis keys");
        assert_eq!(own.len(), PROMPTS.len(), "t{t:02} has one entry per prompt");
    }
}
