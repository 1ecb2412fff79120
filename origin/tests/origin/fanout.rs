//! Coalesced streams: identical stream requests during a streamed miss follow the leader's
//! stream live, with one provider call.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway_fixtures::provider::ProviderConfig;
use serde_json::{Value, json};

use crate::harness::{ACME, Options, Stack, chat_body, header};
use crate::streaming::content_of_sse;

/// 12 content chunks or so, 150 ms apart: a stream of about two seconds.
fn slow_stream(
    settings: impl FnOnce(&mut gateway_origin::settings::Settings) + 'static,
) -> Options {
    Options {
        providers: vec![ProviderConfig {
            chunk_delay_ms: 150,
            ..ProviderConfig::default()
        }],
        settings: Box::new(settings),
        ..Options::default()
    }
}

/// When the first bytes and the end of a stream arrived, and the whole text.
struct Read {
    first: Instant,
    end: Instant,
    text: String,
    cache_status: String,
}

async fn read_stream(stack: Arc<Stack>, body: Value) -> Read {
    let response = stack.post("/v1/chat/completions", ACME, &body).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    let cache_status = header(&response, "cache-status").to_string();
    let mut chunks = response.bytes_stream();
    let first_chunk = chunks.next().await.unwrap().unwrap();
    let first = Instant::now();
    let mut text = String::from_utf8(first_chunk.to_vec()).unwrap();
    while let Some(chunk) = chunks.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    Read {
        first,
        end: Instant::now(),
        text,
        cache_status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_stream_waiters_get_the_leaders_chunks_live_not_after_its_end() {
    // A short coalesce wait: a waiter that waited for the whole answer would get a 504.
    let stack =
        Arc::new(Stack::start_with(slow_stream(|s| s.cache.coalesce_wait_timeout_ms = 500)).await);
    let mut body = chat_body("one stream for everyone");
    body["stream"] = json!(true);
    let leader = tokio::spawn(read_stream(Arc::clone(&stack), body.clone()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut with_usage = body.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let waiters: Vec<_> = [&body, &body, &with_usage]
        .into_iter()
        .map(|b| tokio::spawn(read_stream(Arc::clone(&stack), b.clone())))
        .collect();
    let leader = leader.await.unwrap();
    assert_eq!(stack.provider_calls(), 1, "one provider call");
    for (i, waiter) in waiters.into_iter().enumerate() {
        let waiter = waiter.await.unwrap();
        assert!(
            waiter.first < leader.end,
            "waiter {i} got its first chunk {:?} after the leader's stream ended",
            waiter.first - leader.end
        );
        assert!(
            waiter.cache_status.ends_with("; collapsed"),
            "{}",
            waiter.cache_status
        );
        assert_eq!(
            content_of_sse(&waiter.text),
            content_of_sse(&leader.text),
            "waiter {i}"
        );
        assert!(waiter.text.trim_end().ends_with("data: [DONE]"));
        assert_eq!(
            waiter.text.contains(r#""choices":[]"#),
            i == 2,
            "the usage chunk only for the waiter that asked"
        );
    }
    assert!(leader.first < leader.end - Duration::from_millis(500));
    stack.settle().await;
    assert_eq!(stack.redis.entries(), 1, "the stream was cached once");
}
