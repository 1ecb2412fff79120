//! Streaming through the edge: a streamed miss reaches the client as the provider produces it,
//! and one cached completion answers both forms (JSON and Server-Sent Events) at both tiers.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gateway_e2e::sse::ChatStream;
use gateway_e2e::stack::{ACME, Stack, StackOptions, chat_body, completion_text, header};
use gateway_fixtures::ProviderConfig;
use serde_json::{Value, json};

/// The mock's pause between two SSE chunks in the arrival test.
const CHUNK_DELAY_MS: u64 = 80;

/// The streamed form of `chat_body(prompt)`: the same cache key, as `stream` and
/// `stream_options` do not change the answer.
fn stream_body(prompt: &str, include_usage: bool) -> Value {
    let mut body = chat_body(prompt);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": include_usage });
    body
}

async fn post_stream(stack: &Stack, prompt: &str, include_usage: bool) -> reqwest::Response {
    stack
        .edge_post(
            "/v1/chat/completions",
            ACME,
            &stream_body(prompt, include_usage),
            &[],
        )
        .await
}

/// A JSON answer: (x-cache, x-cache-layer, id, content).
async fn json_answer(stack: &Stack, prompt: &str) -> (String, String, String, String) {
    let resp = stack.edge_chat(ACME, prompt).await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("application/json"));
    let (cache, layer) = (header(&resp, "x-cache"), header(&resp, "x-cache-layer"));
    let body: Value = resp.json().await.expect("a JSON body");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    (cache, layer, id, completion_text(&body))
}

/// A streamed answer: (x-cache, x-cache-layer, the parsed stream).
async fn stream_answer(
    stack: &Stack,
    prompt: &str,
    include_usage: bool,
) -> (String, String, ChatStream) {
    let resp = post_stream(stack, prompt, include_usage).await;
    assert_eq!(resp.status(), 200);
    assert!(
        header(&resp, "content-type").starts_with("text/event-stream"),
        "{}",
        header(&resp, "content-type")
    );
    let (cache, layer) = (header(&resp, "x-cache"), header(&resp, "x-cache-layer"));
    let stream = ChatStream::parse(&resp.text().await.expect("an SSE body"));
    assert!(stream.done, "the stream ends with data: [DONE]");
    (cache, layer, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_miss_reaches_the_client_through_the_edge_chunk_by_chunk() {
    let stack = Stack::start_with(StackOptions {
        providers: vec![ProviderConfig {
            chunk_delay_ms: CHUNK_DELAY_MS,
            ..ProviderConfig::default()
        }],
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");

    let mut resp = post_stream(&stack, "stream me as you go", true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "MISS");
    assert_eq!(header(&resp, "x-cache-layer"), "upstream");
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let mut arrivals: Vec<Instant> = Vec::new();
    let mut body = Vec::new();
    while let Some(piece) = resp.chunk().await.expect("the body streams") {
        arrivals.push(Instant::now());
        body.extend_from_slice(&piece);
    }
    let stream = ChatStream::parse(&String::from_utf8(body).expect("UTF-8"));
    assert!(stream.done, "the stream ends with data: [DONE]");
    assert!(stream.usage().is_some(), "include_usage adds a usage chunk");

    // The mock sends its events CHUNK_DELAY_MS apart: (events - 1) pauses in all.
    let events = stream.chunks.len() + 1;
    let production = Duration::from_millis(CHUNK_DELAY_MS * (events as u64 - 1));
    let spread = arrivals[arrivals.len() - 1] - arrivals[0];
    println!(
        "streaming: {events} events produced over {production:?} arrived in {} reads spread over {spread:?}",
        arrivals.len()
    );
    assert!(
        arrivals.len() >= 3,
        "the body came in {} read(s): buffered, not streamed",
        arrivals.len()
    );
    assert!(
        spread >= production / 3,
        "the reads were spread over {spread:?} of the provider's {production:?}: buffered, not streamed"
    );
    stack.settle().await;
    assert_eq!(stack.provider.calls(), 1);
    assert_eq!(stack.provider.stats().streams, 1);
    assert_eq!(
        stack.redis.keys("gw:v1:acme:*").expect("redis keys").len(),
        1,
        "the stream ended properly, so its assembled completion is cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_request_is_answered_from_a_cached_json_completion_at_the_origin_then_at_the_edge()
{
    let stack = Stack::start().await.expect("stack starts");
    let prompt = "json first, then streams";

    let (cache, layer, id, content) = json_answer(&stack, prompt).await;
    assert_eq!((cache.as_str(), layer.as_str()), ("MISS", "upstream"));
    stack.settle().await;

    let (cache, layer, stream) = stream_answer(&stack, prompt, true).await;
    assert_eq!((cache.as_str(), layer.as_str()), ("HIT", "origin"));
    assert_eq!(
        stream.content(),
        content,
        "the replay says what the JSON said"
    );
    assert_eq!(stream.id(), id);
    assert!(stream.usage().is_some(), "include_usage adds a usage chunk");
    stack.settle().await;

    // A JSON origin hit populates the edge; then the edge replays the stream itself.
    let (_, layer, _, _) = json_answer(&stack, prompt).await;
    assert_eq!(layer, "origin");
    stack.settle().await;
    let before = stack.origin_requests();
    let (cache, layer, stream) = stream_answer(&stack, prompt, false).await;
    assert_eq!((cache.as_str(), layer.as_str()), ("HIT", "edge"));
    assert_eq!(stream.content(), content);
    assert_eq!(stream.id(), id);
    assert!(stream.usage().is_none(), "no usage chunk unless asked for");

    assert_eq!(
        stack.origin_requests(),
        before,
        "the edge replayed it alone"
    );
    assert_eq!(stack.provider.calls(), 1);
    assert_eq!(
        stack.provider.stats().streams,
        0,
        "the provider never streamed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_json_request_is_answered_from_a_cached_streamed_completion_at_the_origin_then_at_the_edge()
 {
    let stack = Stack::start().await.expect("stack starts");
    let prompt = "stream first, then json";

    let (cache, layer, stream) = stream_answer(&stack, prompt, false).await;
    assert_eq!((cache.as_str(), layer.as_str()), ("MISS", "upstream"));
    let content = stream.content();
    assert!(content.starts_with("echo:"), "{content:?}");
    stack.settle().await;

    let (cache, layer, id, json_content) = json_answer(&stack, prompt).await;
    assert_eq!((cache.as_str(), layer.as_str()), ("HIT", "origin"));
    assert_eq!(json_content, content, "the JSON says what the stream said");
    assert_eq!(id, stream.id());
    stack.settle().await;

    let before = stack.origin_requests();
    let (cache, layer, _, json_content) = json_answer(&stack, prompt).await;
    assert_eq!((cache.as_str(), layer.as_str()), ("HIT", "edge"));
    assert_eq!(json_content, content);
    let (cache, layer, replay) = stream_answer(&stack, prompt, true).await;
    assert_eq!((cache.as_str(), layer.as_str()), ("HIT", "edge"));
    assert_eq!(replay.content(), content);

    assert_eq!(stack.origin_requests(), before, "both answered at the edge");
    assert_eq!(stack.provider.calls(), 1);
    assert_eq!(stack.provider.stats().streams, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_streamed_misses_in_flight_together_cost_one_provider_call_and_all_end_whole() {
    let stack = Stack::start_with(StackOptions {
        providers: vec![ProviderConfig {
            chunk_delay_ms: 50,
            ..ProviderConfig::default()
        }],
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    let (stack, prompt) = (&stack, "many clients, one stream");
    // Some start together, some join while the provider is still streaming.
    let streams = join_all((0..5u64).map(|i| async move {
        tokio::time::sleep(Duration::from_millis(40 * i)).await;
        stream_answer(stack, prompt, false).await
    }))
    .await;
    let (_, _, first) = &streams[0];
    assert!(first.content().starts_with("echo:"));
    for (i, (cache, layer, stream)) in streams.iter().enumerate() {
        assert!(
            matches!(
                (cache.as_str(), layer.as_str()),
                ("MISS", "upstream") | ("HIT", "origin")
            ),
            "client {i}: {cache} from {layer}"
        );
        assert_eq!(stream.content(), first.content(), "client {i}");
        assert_eq!(
            stream.id(),
            first.id(),
            "client {i}: the one provider answer"
        );
    }
    stack.settle().await;
    assert_eq!(stack.provider.calls(), 1);
    assert_eq!(stack.redis.keys("gw:v1:acme:*").expect("keys").len(), 1);
}
