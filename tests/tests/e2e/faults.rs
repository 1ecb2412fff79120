//! Faults across the stack: Redis killed or frozen, the origin down, a provider failing. No
//! request fails that the design says should succeed, and the counters say who answered.

use std::time::{Duration, Instant};

use gateway_common::route::Route;
use gateway_e2e::blackhole::Blackhole;
use gateway_e2e::edge::{Edge, EdgeConfig};
use gateway_e2e::entry::{completion, kv_seed, now};
use gateway_e2e::sse::ChatStream;
use gateway_e2e::stack::{
    ACME, SECRET, Stack, StackOptions, chat_body, completion_text, header, key_for,
};
use gateway_fixtures::ProviderConfig;
use gateway_fixtures::provider::Fault;
use serde_json::{Value, json};

/// A functional bound, not a benchmark: a request that takes this long is hanging on the fault.
const NO_HANG: Duration = Duration::from_secs(10);

/// One answer through the edge, asserted to be a 200 that came back without hanging.
struct Answer {
    cache: String,
    layer: String,
    provider: String,
    content: String,
}

async fn ask(stack: &Stack, prompt: &str) -> Answer {
    let started = Instant::now();
    let resp = stack.edge_chat(ACME, prompt).await;
    assert_eq!(resp.status(), 200, "{prompt:?} must succeed");
    assert!(started.elapsed() < NO_HANG, "{prompt:?} hung");
    let key = key_for("acme", Route::ChatCompletions, &chat_body(prompt));
    assert_eq!(header(&resp, "x-cache-key"), key.hex(), "{prompt:?}");
    let answer = Answer {
        cache: header(&resp, "x-cache"),
        layer: header(&resp, "x-cache-layer"),
        provider: header(&resp, "x-upstream-provider"),
        content: String::new(),
    };
    let body: Value = resp.json().await.expect("a JSON body");
    Answer {
        content: completion_text(&body),
        ..answer
    }
}

/// Ask `prompt` until the origin serves it from Redis (the store is back), settling between
/// tries; every try must succeed. Returns the provider calls the tries cost.
async fn until_origin_hit(stack: &Stack, prompt: &str) -> u64 {
    let calls = stack.provider.calls();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ask(stack, prompt).await;
        stack.settle().await;
        if answer.cache == "HIT" {
            assert_eq!(answer.layer, "origin", "{prompt:?}");
            return stack.provider.calls() - calls;
        }
        assert!(
            Instant::now() < deadline,
            "{prompt:?}: Redis hits never resumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_succeeds_while_redis_is_killed_and_hits_resume_once_it_restarts() {
    let mut stack = Stack::start().await.expect("stack starts");
    for prompt in ["before 0", "before 1"] {
        let answer = ask(&stack, prompt).await;
        assert_eq!(answer.cache, "MISS");
    }
    stack.settle().await;
    assert_eq!(stack.redis.keys("gw:v1:*").expect("keys").len(), 2);

    stack.redis.kill();
    let calls = stack.provider.calls();
    let prompts = ["before 0", "during 0", "during 1", "during 0", "before 1"];
    for prompt in prompts {
        let answer = ask(&stack, prompt).await;
        assert_eq!(
            (answer.cache.as_str(), answer.layer.as_str()),
            ("MISS", "upstream"),
            "{prompt:?}: with Redis gone the origin fails open to the provider"
        );
        assert!(answer.content.starts_with("echo:"));
        stack.settle().await;
    }
    assert_eq!(
        stack.provider.calls() - calls,
        prompts.len() as u64,
        "every request was answered by the provider"
    );

    stack.redis.restart().expect("redis restarts");
    let cost = until_origin_hit(&stack, "after").await;
    println!("redis restarted: origin hits resumed after {cost} provider call(s)");
    let calls = stack.provider.calls();
    let answer = ask(&stack, "after").await;
    assert_eq!(
        (answer.cache.as_str(), answer.layer.as_str()),
        ("HIT", "edge")
    );
    assert_eq!(stack.provider.calls(), calls, "hits cost no provider call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_succeeds_while_redis_is_frozen_and_after_it_thaws() {
    let stack = Stack::start().await.expect("stack starts");
    let prompts = ["frozen 0", "frozen 1", "frozen 2"];
    let mut contents = Vec::new();
    for prompt in prompts {
        contents.push(ask(&stack, prompt).await.content);
    }
    stack.settle().await;

    stack.redis.freeze().expect("redis freezes");
    let calls = stack.provider.calls();
    for (prompt, content) in prompts.iter().zip(&contents) {
        let answer = ask(&stack, prompt).await;
        assert_eq!(
            (answer.cache.as_str(), answer.layer.as_str()),
            ("MISS", "upstream"),
            "{prompt:?}: a Redis that does not answer is a miss"
        );
        assert_eq!(&answer.content, content, "{prompt:?}");
        stack.settle().await;
    }
    assert_eq!(ask(&stack, "asked while frozen").await.cache, "MISS");
    stack.settle().await;
    assert_eq!(stack.provider.calls() - calls, prompts.len() as u64 + 1);

    stack.redis.thaw().expect("redis thaws");
    for (prompt, content) in prompts.iter().zip(&contents) {
        until_origin_hit(&stack, prompt).await;
        // Replies queued while frozen must not answer the wrong command once Redis resumes.
        let answer = ask(&stack, prompt).await;
        assert_eq!(
            (answer.cache.as_str(), answer.layer.as_str()),
            ("HIT", "edge"),
            "{prompt:?}"
        );
        assert_eq!(&answer.content, content, "{prompt:?}: its own entry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_origin_down_the_edge_answers_what_it_holds_and_fails_cleanly_otherwise() {
    let stale = completion(
        "acme",
        "stale while down",
        now() - 7200,
        3600,
        "seeded-stale",
    );
    let mut stack = Stack::start_with(StackOptions {
        kv: vec![kv_seed(&stale)],
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    // Walk one prompt to the edge while the origin is up.
    let mut held = String::new();
    for layer in ["upstream", "origin", "edge"] {
        let answer = ask(&stack, "held at the edge").await;
        assert_eq!(answer.layer, layer);
        held = answer.content;
        stack.settle().await;
    }

    stack.stop_origin().await;
    let (calls, crossed) = (stack.provider.calls(), stack.origin_requests());

    let answer = ask(&stack, "held at the edge").await;
    assert_eq!(
        (answer.cache.as_str(), answer.layer.as_str()),
        ("HIT", "edge")
    );
    assert_eq!(answer.content, held);
    let mut body = chat_body("held at the edge");
    body["stream"] = json!(true);
    let resp = stack
        .edge_post("/v1/chat/completions", ACME, &body, &[])
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    let stream = ChatStream::parse(&resp.text().await.expect("SSE"));
    assert!(stream.done);
    assert_eq!(
        stream.content(),
        held,
        "the held entry also answers a stream"
    );

    let resp = stack.edge_chat(ACME, "stale while down").await;
    assert_eq!(resp.status(), 200, "stale-if-error saves the request");
    assert_eq!(header(&resp, "x-cache"), "STALE");
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    assert!(
        header(&resp, "cache-status").contains("ttl=-"),
        "{}",
        header(&resp, "cache-status")
    );
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(completion_text(&body), "seeded-stale");

    for stream in [false, true] {
        let mut body = chat_body("never cached");
        body["stream"] = json!(stream);
        let started = Instant::now();
        let resp = stack
            .edge_post("/v1/chat/completions", ACME, &body, &[])
            .await;
        assert_eq!(resp.status(), 503, "stream: {stream}");
        assert!(started.elapsed() < NO_HANG);
        assert!(header(&resp, "content-type").starts_with("application/json"));
        let error: Value = resp.json().await.expect("an OpenAI-shaped error");
        assert_eq!(error["error"]["type"], "api_error");
        assert_eq!(error["error"]["code"], "origin_unavailable");
        assert!(error["error"]["message"].is_string());
    }
    assert_eq!(stack.provider.calls(), calls, "nothing reached a provider");
    assert_eq!(
        stack.origin_requests(),
        crossed,
        "nothing crossed to the origin"
    );
}

/// Two providers, the first showing `fault` on every request: two JSON requests and one
/// stream, each answered by the second provider, then a cached repeat.
async fn every_request_fails_over_to_the_second_provider(fault: Fault) {
    let stack = Stack::start_with(StackOptions {
        providers: ["primary", "secondary"]
            .map(|name| ProviderConfig {
                name: name.to_owned(),
                ..ProviderConfig::default()
            })
            .to_vec(),
        // A hanging provider is given up on after a second rather than five.
        origin_settings: Some(Box::new(|settings| {
            settings.providers[0].timeout_ms = 1_000
        })),
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    let (primary, secondary) = (&stack.provider, &stack.fallbacks[0]);
    primary.set_fault(fault.clone(), None);

    for prompt in ["failover 0", "failover 1"] {
        let answer = ask(&stack, prompt).await;
        assert_eq!(
            (answer.cache.as_str(), answer.layer.as_str()),
            ("MISS", "upstream"),
            "{fault:?}"
        );
        assert_eq!(answer.provider, "secondary", "{fault:?}");
        assert!(answer.content.starts_with("echo:"));
    }
    let mut body = chat_body("failover stream");
    body["stream"] = json!(true);
    let resp = stack
        .edge_post("/v1/chat/completions", ACME, &body, &[])
        .await;
    assert_eq!(resp.status(), 200, "{fault:?}");
    assert_eq!(
        header(&resp, "x-upstream-provider"),
        "secondary",
        "{fault:?}"
    );
    let stream = ChatStream::parse(&resp.text().await.expect("SSE"));
    assert!(stream.done, "{fault:?}: a complete stream");
    stack.settle().await;

    let answer = ask(&stack, "failover 0").await;
    assert_eq!(
        (answer.cache.as_str(), answer.provider.as_str()),
        ("HIT", "secondary"),
        "the entry remembers who answered"
    );
    assert_eq!(
        primary.stats().faulted,
        3,
        "{fault:?}: the primary was tried each time"
    );
    assert_eq!(
        secondary.calls(),
        3,
        "{fault:?}: and the secondary answered each time"
    );
    primary.clear_faults();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_answering_500_fails_over_to_the_next_with_no_request_failing() {
    every_request_fails_over_to_the_second_provider(Fault::Status {
        status: 500,
        retry_after_secs: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_resetting_connections_fails_over_to_the_next_with_no_request_failing() {
    every_request_fails_over_to_the_second_provider(Fault::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_provider_fails_over_to_the_next_with_no_request_failing() {
    every_request_fails_over_to_the_second_provider(Fault::Hang { ms: None }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_every_provider_fails_the_client_gets_a_clean_502_or_the_edge_copy_and_nothing_is_cached()
 {
    let stale = completion(
        "acme",
        "stale while failing",
        now() - 7200,
        3600,
        "seeded-stale",
    );
    let stack = Stack::start_with(StackOptions {
        kv: vec![kv_seed(&stale)],
        providers: ["primary", "secondary"]
            .map(|name| ProviderConfig {
                name: name.to_owned(),
                ..ProviderConfig::default()
            })
            .to_vec(),
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    stack.provider.set_fault(
        Fault::Status {
            status: 500,
            retry_after_secs: None,
        },
        None,
    );
    stack.fallbacks[0].set_fault(
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        None,
    );

    for stream in [false, true] {
        let mut body = chat_body("nobody can answer");
        body["stream"] = json!(stream);
        let resp = stack
            .edge_post("/v1/chat/completions", ACME, &body, &[])
            .await;
        assert_eq!(resp.status(), 502, "stream: {stream}");
        assert!(header(&resp, "content-type").starts_with("application/json"));
        let error: Value = resp.json().await.expect("an OpenAI-shaped error");
        assert_eq!(error["error"]["type"], "api_error");
        assert!(error["error"]["message"].is_string());
    }

    // The origin answers 502 for an entry the edge holds, expired but within stale-if-error.
    let resp = stack.edge_chat(ACME, "stale while failing").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "STALE");
    assert_eq!(header(&resp, "x-cache-layer"), "edge");
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(completion_text(&body), "seeded-stale");

    stack.settle().await;
    assert!(
        stack.redis.keys("gw:v1:*").expect("keys").is_empty(),
        "errors are never cached"
    );
    assert_eq!(stack.origin_requests(), 3);
    assert_eq!(
        (
            stack.provider.stats().faulted,
            stack.fallbacks[0].stats().faulted
        ),
        (3, 3),
        "each request tried both providers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_origin_whose_connect_hangs_gets_a_clean_timeout_error_within_the_origin_timeouts() {
    let blackhole = Blackhole::start().expect("a loopback address whose connects hang");
    let mut config = EdgeConfig::new(blackhole.url(), SECRET);
    config.origin_connect_timeout_ms = 300;
    config.origin_first_byte_timeout_ms = 1_500;
    let edge = tokio::task::spawn_blocking(move || Edge::start(&config))
        .await
        .expect("join")
        .expect("the edge starts");

    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", edge.url()))
        .bearer_auth(ACME)
        .header("content-type", "application/json")
        .body(chat_body("is anyone there").to_string())
        .send()
        .await
        .expect("the edge answers");
    let took = started.elapsed();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("an OpenAI-shaped error");
    println!("a hanging connect: {status} after {took:?}");

    assert!(
        took >= Duration::from_millis(300),
        "the connect hung rather than being refused ({took:?})"
    );
    // Viceroy 0.22 applies no connect timeout (its backends have none); the connect runs under
    // the first-byte timeout, which bounds the wait here. Fastly applies the 300 ms.
    assert!(
        took < Duration::from_millis(1_500) + NO_HANG,
        "hung: {took:?}"
    );
    assert_eq!(status, 504, "{body}\n{}", edge.log());
    assert_eq!(body["error"]["type"], "api_error", "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert_eq!(
        body["error"]["message"],
        "the gateway origin did not answer in time"
    );
}
