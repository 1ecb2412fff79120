//! The semantic cache through the edge: a paraphrase of a cached question is answered by the
//! origin from its entry (one provider call in total), then by the edge; hard negatives (a
//! negation, a swap of two lowercase words), other tenants, other system prompts and tenants
//! without the opt-in miss; a missing model or a dead Redis makes it an exact miss, never a
//! failure.

use gateway_common::route::Route;
use gateway_e2e::stack::{
    ACME, GLOBEX, INITECH, Stack, StackOptions, chat_body, fixture_tenants, header, key_for,
};
use serde_json::{Value, json};

const QUESTION: &str = "How do I reverse a list in Python?";
const PARAPHRASE: &str = "What's the way to reverse a Python list?";

async fn content(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("a JSON body");
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn with_system(system: &str, prompt: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": prompt}]})
}

/// Asks `prompt` at the edge, waits for every write, and checks it was answered.
async fn ask(stack: &Stack, key: &str, body: &Value) -> reqwest::Response {
    let resp = stack
        .edge_post("/v1/chat/completions", key, body, &[])
        .await;
    assert_eq!(resp.status(), 200);
    stack.settle().await;
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paraphrase_is_a_semantic_hit_and_then_an_edge_hit_with_one_provider_call() {
    let stack = Stack::start().await.expect("stack starts");
    let first = ask(&stack, INITECH, &chat_body(QUESTION)).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    let answer = content(first).await;

    let second = ask(&stack, INITECH, &chat_body(PARAPHRASE)).await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert_eq!(header(&second, "x-cache-layer"), "origin");
    let status = header(&second, "cache-status");
    assert!(
        status.contains("gateway-origin; hit;") && status.contains("detail=semantic"),
        "{status}"
    );
    let similarity: f32 = header(&second, "x-cache-similarity")
        .parse()
        .expect("a similarity");
    assert!((0.8..=1.0).contains(&similarity), "{similarity}");
    let original = key_for("initech", Route::ChatCompletions, &chat_body(QUESTION));
    assert_eq!(header(&second, "x-cache-semantic-key"), original.hex());
    assert_eq!(
        header(&second, "x-cache-key"),
        key_for("initech", Route::ChatCompletions, &chat_body(PARAPHRASE)).hex(),
        "the request's own key: the answer is stored under it too"
    );
    assert_eq!(content(second).await, answer);

    let before = stack.origin_requests();
    let third = ask(&stack, INITECH, &chat_body(PARAPHRASE)).await;
    assert_eq!(header(&third, "x-cache"), "HIT");
    assert_eq!(header(&third, "x-cache-layer"), "edge");
    assert_eq!(content(third).await, answer);
    assert_eq!(stack.origin_requests(), before, "the edge answered alone");
    assert_eq!(stack.provider.calls(), 1, "one provider call in total");
    assert_eq!(
        stack.metric("gateway_semantic_lookups_total", &["outcome=\"hit\""]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_negatives_other_tenants_and_other_system_prompts_are_misses() {
    // globex turns the semantic cache on too: its own index, never initech's.
    let tenants = fixture_tenants(|t| {
        if t.id == "globex" {
            t.semantic.enabled = true;
        }
    });
    let stack = Stack::start_with(StackOptions {
        tenants: Some(tenants),
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    ask(
        &stack,
        INITECH,
        &with_system("Be brief.", "Is it safe to eat raw chicken?"),
    )
    .await;
    ask(&stack, INITECH, &with_system("Be brief.", QUESTION)).await;
    ask(
        &stack,
        INITECH,
        &with_system(
            "Be brief.",
            "How do I convert a string to an integer in Java?",
        ),
    )
    .await;
    let calls = stack.provider.calls();

    // Negation, from the labelled set.
    let negation = ask(
        &stack,
        INITECH,
        &with_system("Be brief.", "Is it not safe to eat raw chicken?"),
    )
    .await;
    assert_eq!(header(&negation, "x-cache"), "MISS");
    // The same words the other way round (a cosine above 0.98): the stored words' order.
    let swapped = ask(
        &stack,
        INITECH,
        &with_system(
            "Be brief.",
            "How do I convert an integer to a string in Java?",
        ),
    )
    .await;
    assert_eq!(header(&swapped, "x-cache"), "MISS");
    // Another system prompt: another scope.
    let other_system = ask(
        &stack,
        INITECH,
        &with_system("Answer in detail.", PARAPHRASE),
    )
    .await;
    assert_eq!(header(&other_system, "x-cache"), "MISS");
    // Another tenant with the same paraphrase (and the same system prompt).
    let other_tenant = ask(&stack, GLOBEX, &with_system("Be brief.", PARAPHRASE)).await;
    assert_eq!(header(&other_tenant, "x-cache"), "MISS");
    assert_eq!(stack.provider.calls(), calls + 4);
    // The control: the same paraphrase for initech is a semantic hit.
    let control = ask(&stack, INITECH, &with_system("Be brief.", PARAPHRASE)).await;
    assert!(header(&control, "cache-status").contains("detail=semantic"));
    // And x-semantic-cache: off turns it off for one request.
    let off = stack
        .edge_post(
            "/v1/chat/completions",
            INITECH,
            &with_system("Be brief.", "How can I reverse a list using Python?"),
            &[("x-semantic-cache", "off")],
        )
        .await;
    assert_eq!(header(&off, "x-cache"), "MISS");
    stack.settle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_without_the_opt_in_never_gets_a_semantic_hit() {
    let stack = Stack::start().await.expect("stack starts");
    ask(&stack, ACME, &chat_body(QUESTION)).await;
    let paraphrase = ask(&stack, ACME, &chat_body(PARAPHRASE)).await;
    assert_eq!(header(&paraphrase, "x-cache"), "MISS");
    assert!(header(&paraphrase, "x-cache-similarity").is_empty());
    assert_eq!(stack.provider.calls(), 2);
    assert_eq!(stack.metric("gateway_semantic_lookups_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_model_missing_a_paraphrase_is_an_exact_miss_served_by_the_provider() {
    let stack = Stack::start_with(StackOptions {
        origin_settings: Some(Box::new(|s| {
            s.semantic.model_dir = "/nonexistent/all-minilm-l6-v2".into();
        })),
        ..StackOptions::default()
    })
    .await
    .expect("the origin starts without its model");
    ask(&stack, INITECH, &chat_body(QUESTION)).await;
    let paraphrase = ask(&stack, INITECH, &chat_body(PARAPHRASE)).await;
    assert_eq!(header(&paraphrase, "x-cache"), "MISS");
    assert_eq!(stack.provider.calls(), 2);
    let errors = stack.metric(
        "gateway_semantic_lookups_total",
        &["outcome=\"error\"", "reason=\"model_missing\""],
    );
    assert_eq!(errors, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_a_semantic_tenant_is_served_by_the_provider() {
    let mut stack = Stack::start().await.expect("stack starts");
    ask(&stack, INITECH, &chat_body(QUESTION)).await;
    stack.redis.kill();
    let paraphrase = ask(&stack, INITECH, &chat_body(PARAPHRASE)).await;
    assert_eq!(header(&paraphrase, "x-cache"), "MISS");
    assert!(!content(paraphrase).await.is_empty());
    assert_eq!(stack.provider.calls(), 2);
}
