//! Forwarding a streamed provider answer: each SSE event goes to the [`Fanout`] (the client and
//! any coalesced waiters) as soon as it is complete, its reported usage is read whatever else
//! happens, and `common`'s `Assembler` for the route rebuilds the answer (a chat completion, a
//! response, a message), returned only when the stream ended properly. Everything kept is bounded by the provider answer limit. Never
//! decides about caching.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use gateway_common::entry::Usage;
use gateway_common::error::ApiError;
use gateway_common::route::Route;
use gateway_common::sse::{Assembler, SseError};
use serde_json::value::RawValue;

use crate::fanout::{Event, Fanout};
use crate::usage;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("the provider went silent for longer than the idle timeout")]
    Idle,
    #[error("the provider stream broke: {0}")]
    Broken(String),
    #[error("the provider's streamed answer exceeds {0} bytes")]
    TooLarge(usize),
    #[error("the stream did not complete: {0}")]
    Incomplete(#[from] SseError),
}

/// The client half: an actix-compatible body stream.
pub type ClientStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A source of chunks: the provider's response in production, a script in unit tests.
pub trait ChunkSource: Send {
    fn next_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl ChunkSource for reqwest::Response {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.chunk().await.map_err(|e| e.to_string())
    }
}

/// The request body with `stream_options.include_usage = true`, every other member kept byte
/// for byte, so a streamed answer always reports the tokens it cost (the budget needs them even
/// when the client did not ask). A `null` `stream_options` counts as absent, as OpenAI reads it.
/// `None` if the body is not a JSON object.
pub fn with_usage_requested(body: &[u8]) -> Option<Bytes> {
    let mut object: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(body).ok()?;
    let mut options: serde_json::Map<String, serde_json::Value> = match object.get("stream_options")
    {
        Some(raw) if raw.get() != "null" => serde_json::from_str(raw.get()).ok()?,
        _ => serde_json::Map::new(),
    };
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let raw = RawValue::from_string(serde_json::to_string(&options).ok()?).ok()?;
    object.insert("stream_options".into(), raw);
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

/// How [`forward`] reads.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding {
    /// Rebuild the answer of this route (for the cache and the waiters that want JSON).
    pub assemble: Option<Route>,
    /// Longest silence between two chunks.
    pub idle: Duration,
    /// Most bytes read from the provider; past it the stream fails (nothing cached).
    pub max_bytes: usize,
}

/// How a forwarded stream ended.
#[derive(Debug)]
pub struct Forwarded {
    /// With `assemble`, the completed `chat.completion` JSON (`Ok(Some)`) only if the stream
    /// ended with `[DONE]` and every choice finished; without it, `Ok(None)` on a clean end.
    pub result: Result<Option<Vec<u8>>, StreamError>,
    /// The last usage the provider reported, whether or not the stream completed.
    pub usage: Option<Usage>,
}

/// Copies `source` to `fanout` event by event (see the module doc). The provider stream is
/// read to its end even when every reader is gone, so the answer can still be cached. On a
/// failure the readers receive an OpenAI-style error event before the end.
pub async fn forward<S: ChunkSource>(
    mut source: S,
    fanout: &Fanout,
    options: Forwarding,
) -> Forwarded {
    let mut events = Events::default();
    let mut assembler = options.assemble.and_then(Assembler::for_route);
    let mut assembly_error = None;
    let mut usage = None;
    let mut read = 0usize;
    let publish = |event: Bytes, usage: &mut Option<Usage>| {
        let reported = data_of(&event)
            .filter(|data| contains(data, b"\"usage\""))
            .and_then(|data| usage::read(&data));
        let usage_only = match reported {
            Some(usage::Reported {
                usage: Some(reported),
                no_choices,
            }) => {
                *usage = Some(reported);
                no_choices
            }
            _ => false,
        };
        fanout.push(Event {
            bytes: event,
            usage_only,
        });
    };
    let end = loop {
        let chunk = match tokio::time::timeout(options.idle, source.next_chunk()).await {
            Err(_) => break Err(StreamError::Idle),
            Ok(Err(e)) => break Err(StreamError::Broken(e)),
            Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(chunk))) => chunk,
        };
        read = read.saturating_add(chunk.len());
        if read > options.max_bytes {
            // Bounds every buffer: the partial event, the assembler and the fanout.
            break Err(StreamError::TooLarge(options.max_bytes));
        }
        if let Some(a) = assembler.as_mut() {
            let pushed = a.push(&chunk);
            // The typed streams (Responses, Messages) report usage inside their events:
            // the assembler reads it, even from a stream that does not complete.
            if let Some(reported) = a.usage() {
                usage = Some(reported);
            }
            if let Err(e) = pushed {
                assembly_error = Some(e);
                assembler = None;
            }
        }
        for event in events.push(&chunk) {
            publish(event, &mut usage);
        }
    };
    if end.is_ok()
        && let Some(rest) = events.finish()
    {
        publish(rest, &mut usage);
    }
    let result = match end {
        Err(error) => Err(error),
        Ok(()) => match (assembly_error, assembler) {
            (Some(e), _) => Err(StreamError::Incomplete(e)),
            (None, Some(a)) => a.finish().map(Some).map_err(StreamError::Incomplete),
            (None, None) => Ok(None),
        },
    };
    let tail = match &end_error(&result) {
        Some(error) => Bytes::from(format!(
            "data: {}\n\n",
            String::from_utf8_lossy(&ApiError::bad_gateway(error.to_string()).to_json())
        )),
        None => Bytes::new(),
    };
    fanout.finish(tail);
    Forwarded { result, usage }
}

/// The failure the readers must be told about: a broken, silent or oversized stream. A
/// stream that ended cleanly but could not be assembled reached its readers whole.
fn end_error(result: &Result<Option<Vec<u8>>, StreamError>) -> Option<&StreamError> {
    match result {
        Err(StreamError::Incomplete(_)) | Ok(_) => None,
        Err(error) => Some(error),
    }
}

/// Splits a byte stream into SSE events (each ending with a blank line, LF or CRLF), kept byte
/// for byte.
#[derive(Debug, Default)]
struct Events {
    pending: Vec<u8>,
    /// Where the unfinished last line of `pending` starts: the lines before it are already
    /// known not to end the event, so the next chunk is searched from here, not from 0.
    line_start: usize,
}

impl Events {
    /// The events completed by `chunk`.
    fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.pending.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut event_start = 0;
        let mut line_start = self.line_start;
        while let Some(offset) = self.pending[line_start..].iter().position(|&b| b == b'\n') {
            let line_end = line_start + offset;
            let line = &self.pending[line_start..line_end];
            line_start = line_end + 1;
            if line.is_empty() || line == b"\r" {
                events.push(Bytes::copy_from_slice(
                    &self.pending[event_start..line_start],
                ));
                event_start = line_start;
            }
        }
        self.pending.drain(..event_start);
        self.line_start = line_start - event_start;
        events
    }

    /// An unterminated last event, if the stream ended inside one.
    fn finish(self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| Bytes::from(self.pending))
    }
}

/// The `data:` lines of an event joined with "\n", as SSE readers see them.
fn data_of(event: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<Vec<u8>> = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            let joined = data.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.push(b'\n');
            }
            joined.extend_from_slice(value.as_bytes());
        }
    }
    data
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    struct Script(std::collections::VecDeque<Result<Option<Bytes>, String>>);

    impl ChunkSource for Script {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
            self.0.pop_front().unwrap_or(Ok(None))
        }
    }

    fn script(chunks: &[&str]) -> Script {
        Script(
            chunks
                .iter()
                .map(|c| Ok(Some(Bytes::from(c.to_string()))))
                .collect(),
        )
    }

    const ROLE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
    const HELLO: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n";
    const STOP: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn options(max_bytes: usize) -> Forwarding {
        Forwarding {
            assemble: Some(Route::ChatCompletions),
            idle: Duration::from_secs(1),
            max_bytes,
        }
    }

    /// Forwards `source` with assembly on, and what a reader that did (not) ask for usage got.
    async fn run(source: Script, max_bytes: usize, show_usage: bool) -> (Forwarded, Vec<u8>) {
        let fanout = Fanout::new();
        let reader = fanout.read(show_usage);
        let forwarded = forward(source, &fanout, options(max_bytes)).await;
        let received: Vec<Bytes> = reader.map(|c| c.unwrap()).collect().await;
        (forwarded, received.concat())
    }

    #[tokio::test]
    async fn a_complete_stream_is_forwarded_and_assembled() {
        let (out, received) = run(script(&[ROLE, HELLO, STOP, DONE]), 1 << 20, false).await;
        let completion: serde_json::Value =
            serde_json::from_slice(&out.result.unwrap().unwrap()).unwrap();
        assert_eq!(completion["choices"][0]["message"]["content"], "Hello");
        assert_eq!(received, [ROLE, HELLO, STOP, DONE].concat().as_bytes());
    }

    #[tokio::test]
    async fn a_stream_without_done_is_not_assembled() {
        let (out, _) = run(script(&[ROLE, HELLO]), 1 << 20, false).await;
        assert!(
            matches!(out.result, Err(StreamError::Incomplete(_))),
            "{:?}",
            out.result
        );
    }

    #[tokio::test]
    async fn a_broken_stream_ends_with_an_error_event() {
        let mut s = script(&[ROLE]);
        s.0.push_back(Err("reset".into()));
        let (out, received) = run(s, 1 << 20, false).await;
        assert!(matches!(out.result, Err(StreamError::Broken(_))));
        let text = String::from_utf8(received).unwrap();
        assert!(
            text.ends_with("}}\n\n") && text.contains("\"error\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_usage_chunk_is_hidden_from_a_reader_that_did_not_ask_but_still_counted() {
        // Split mid-event to prove events are reassembled before they are judged.
        let (a, b) = USAGE.split_at(20);
        let source = script(&[ROLE, HELLO, STOP, a, b, DONE]);
        let (out, received) = run(source, 1 << 20, false).await;
        let completion: serde_json::Value =
            serde_json::from_slice(&out.result.unwrap().unwrap()).unwrap();
        assert_eq!(completion["usage"]["total_tokens"], 2);
        assert_eq!(out.usage.unwrap().total_tokens, 2);
        assert_eq!(received, [ROLE, HELLO, STOP, DONE].concat().as_bytes());
        let (_, shown) = run(script(&[ROLE, HELLO, STOP, USAGE, DONE]), 1 << 20, true).await;
        assert_eq!(shown, [ROLE, HELLO, STOP, USAGE, DONE].concat().as_bytes());
    }

    #[tokio::test]
    async fn usage_is_counted_even_when_the_stream_cannot_be_assembled() {
        // No finish chunk: a clean end, [DONE] and usage, but no complete completion.
        let (out, _) = run(script(&[ROLE, HELLO, USAGE, DONE]), 1 << 20, false).await;
        assert!(matches!(out.result, Err(StreamError::Incomplete(_))));
        assert_eq!(out.usage.unwrap().total_tokens, 2);
    }

    #[tokio::test]
    async fn a_stream_past_the_limit_fails_with_an_error_event_and_keeps_nothing_more() {
        // A provider that never ends its event: one endless data line.
        let endless: Vec<String> = (0..100).map(|_| "x".repeat(1000)).collect();
        let mut chunks = vec!["data: {\"choices\":[{\"delta\":{\"content\":\""];
        chunks.extend(endless.iter().map(String::as_str));
        let (out, received) = run(script(&chunks), 10_000, false).await;
        assert_eq!(out.result.unwrap_err(), StreamError::TooLarge(10_000));
        let text = String::from_utf8(received).unwrap();
        assert!(text.starts_with("data: {\"error\""), "{text}");
        // Many complete events past the limit: the same.
        let many: Vec<&str> = std::iter::once(ROLE)
            .chain(std::iter::repeat_n(HELLO, 1000))
            .collect();
        let (out, received) = run(script(&many), 10_000, false).await;
        assert_eq!(out.result.unwrap_err(), StreamError::TooLarge(10_000));
        assert!(received.len() < 11_000, "{}", received.len());
    }

    #[test]
    fn usage_is_requested_without_touching_other_members() {
        let body = with_usage_requested(
            br#"{"model":"m","n":1.50,"stream":true,"stream_options":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(
            &body[..],
            br#"{"model":"m","n":1.50,"stream":true,"stream_options":{"include_usage":true,"x":1}}"#
        );
        let null = with_usage_requested(br#"{"stream":true,"stream_options":null}"#).unwrap();
        assert_eq!(
            &null[..],
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert!(with_usage_requested(b"[1]").is_none());
    }

    #[test]
    fn events_split_over_many_chunks_come_out_whole_crlf_included() {
        let mut events = Events::default();
        let mut out = Vec::new();
        let crlf = ROLE.replace('\n', "\r\n");
        for piece in format!("{crlf}{USAGE}{HELLO}").as_bytes().chunks(7) {
            out.extend(events.push(piece));
        }
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], crlf.as_bytes());
        assert_eq!(out[2], HELLO.as_bytes());
        assert!(events.finish().is_none());
    }

    #[tokio::test]
    async fn a_gone_reader_does_not_stop_the_assembly() {
        let fanout = Fanout::new();
        drop(fanout.read(false));
        let out = forward(
            script(&[ROLE, HELLO, STOP, DONE]),
            &fanout,
            options(1 << 20),
        )
        .await;
        assert!(out.result.unwrap().is_some());
    }
}
