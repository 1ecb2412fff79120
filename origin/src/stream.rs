//! Forwarding a streamed provider answer: each chunk goes to the client as it arrives (no
//! buffering of the whole answer) while `common`'s `ChatAssembler` rebuilds the completion,
//! which is returned only when the stream ended properly. Never decides about caching.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use gateway_common::sse::{ChatAssembler, SseError};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

/// Chunks queued toward one client; a slow client applies back-pressure up to this many.
pub const CLIENT_QUEUE_CHUNKS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("the provider went silent for longer than the idle timeout")]
    Idle,
    #[error("the provider stream broke: {0}")]
    Broken(String),
    #[error("the stream did not complete: {0}")]
    Incomplete(#[from] SseError),
}

/// The client half: an actix-compatible body stream.
pub type ClientStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A channel toward the client: the sender for [`forward`], the body stream for the response.
pub fn client_channel() -> (mpsc::Sender<Bytes>, ClientStream) {
    let (tx, rx) = mpsc::channel::<Bytes>(CLIENT_QUEUE_CHUNKS);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok(chunk), rx))
    });
    (tx, Box::pin(stream))
}

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
/// when the client did not ask). `None` if the body is not a JSON object.
pub fn with_usage_requested(body: &[u8]) -> Option<Bytes> {
    let mut object: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(body).ok()?;
    let mut options: serde_json::Map<String, serde_json::Value> = match object.get("stream_options")
    {
        Some(raw) => serde_json::from_str(raw.get()).ok()?,
        None => serde_json::Map::new(),
    };
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let raw = RawValue::from_string(serde_json::to_string(&options).ok()?).ok()?;
    object.insert("stream_options".into(), raw);
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

/// Hides the usage chunk (`"choices": []` with a `usage`) from a client that did not ask for
/// it, forwarding every other event as soon as it is complete. Events are kept byte for byte.
#[derive(Debug, Default)]
pub struct UsageFilter {
    pending: Vec<u8>,
    /// Where the unfinished last line of `pending` starts: the lines before it are already
    /// known not to end the event, so the next chunk is searched from here, not from 0.
    line_start: usize,
}

impl UsageFilter {
    /// The complete events of what arrived so far, minus usage chunks; a partial event waits.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut event_start = 0;
        let mut line_start = self.line_start;
        while let Some(offset) = self.pending[line_start..].iter().position(|&b| b == b'\n') {
            let line_end = line_start + offset;
            let line = &self.pending[line_start..line_end];
            line_start = line_end + 1;
            if line.is_empty() || line == b"\r" {
                let event = &self.pending[event_start..line_start];
                if !is_usage_chunk(event) {
                    out.extend_from_slice(event);
                }
                event_start = line_start;
            }
        }
        self.pending.drain(..event_start);
        self.line_start = line_start - event_start;
        Bytes::from(out)
    }

    /// Whatever is left at the end of the stream (an unterminated last event).
    pub fn finish(self) -> Bytes {
        if is_usage_chunk(&self.pending) {
            Bytes::new()
        } else {
            Bytes::from(self.pending)
        }
    }
}

/// Whether an SSE event is a chat chunk with no choices and a usage object.
fn is_usage_chunk(event: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    let Ok(text) = std::str::from_utf8(event) else {
        return false;
    };
    let mut data = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d));
    let Some(first) = data.next() else {
        return false;
    };
    // This runs for every event of a filtered stream; one data line is the norm, and it is
    // parsed where it lies instead of being collected and joined.
    let json: Cow<'_, str> = match data.next() {
        None => Cow::Borrowed(first),
        Some(second) => Cow::Owned(
            [first, second]
                .into_iter()
                .chain(data)
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    };
    match serde_json::from_str::<Probe>(&json) {
        Ok(probe) => probe.choices.is_some_and(|c| c.is_empty()) && probe.usage.is_some(),
        Err(_) => false,
    }
}

/// Copies `source` to `client` chunk by chunk. With `assemble`, returns the completed
/// `chat.completion` JSON (`Ok(Some)`) only if the stream ended with `[DONE]` and every choice
/// finished; without it, `Ok(None)` on a clean end. A client that disconnects or stops reading
/// for `idle` is dropped but the provider stream is still read to the end, so the answer can
/// still be cached and handed to coalesced waiters. On a broken stream the client receives an
/// OpenAI-style error event before the end.
pub async fn forward<S: ChunkSource>(
    mut source: S,
    client: mpsc::Sender<Bytes>,
    assemble: bool,
    mut filter: Option<UsageFilter>,
    idle: Duration,
) -> Result<Option<Vec<u8>>, StreamError> {
    let mut client = Some(client);
    let mut assembler = assemble.then(ChatAssembler::new);
    let mut assembly_error = None;
    let end = loop {
        let chunk = match tokio::time::timeout(idle, source.next_chunk()).await {
            Err(_) => break Err(StreamError::Idle),
            Ok(Err(e)) => break Err(StreamError::Broken(e)),
            Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(chunk))) => chunk,
        };
        if let Some(a) = assembler.as_mut()
            && let Err(e) = a.push(&chunk)
        {
            assembly_error = Some(e);
            assembler = None;
        }
        let chunk = match filter.as_mut() {
            Some(filter) => filter.push(&chunk),
            None => chunk,
        };
        if !chunk.is_empty()
            && let Some(tx) = &client
            && tx.send_timeout(chunk, idle).await.is_err()
        {
            client = None;
        }
    };
    if let Some(rest) = filter.map(UsageFilter::finish)
        && !rest.is_empty()
        && let Some(tx) = &client
        && tx.send_timeout(rest, idle).await.is_err()
    {
        client = None;
    }
    if let Err(error) = &end
        && let Some(tx) = &client
    {
        let event = format!(
            "data: {}\n\n",
            String::from_utf8_lossy(
                &gateway_common::error::ApiError::bad_gateway(error.to_string()).to_json()
            )
        );
        let _ = tx.send_timeout(Bytes::from(event), idle).await;
    }
    end?;
    if let Some(e) = assembly_error {
        return Err(StreamError::Incomplete(e));
    }
    match assembler {
        Some(a) => Ok(Some(a.finish()?)),
        None => Ok(None),
    }
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
    const DONE: &str = "data: [DONE]\n\n";

    /// [`forward`] with assembly on and a one-second idle timeout, as every test here wants.
    async fn assemble(
        source: Script,
        client: mpsc::Sender<Bytes>,
        filter: Option<UsageFilter>,
    ) -> Result<Option<Vec<u8>>, StreamError> {
        forward(source, client, true, filter, Duration::from_secs(1)).await
    }

    /// Everything the client received, concatenated.
    async fn received(rx: ClientStream) -> Vec<u8> {
        let chunks: Vec<Bytes> = rx.map(|c| c.unwrap()).collect().await;
        chunks.concat()
    }

    #[tokio::test]
    async fn a_complete_stream_is_forwarded_and_assembled() {
        let (tx, rx) = client_channel();
        let out = assemble(script(&[ROLE, HELLO, STOP, DONE]), tx, None)
            .await
            .unwrap()
            .unwrap();
        let completion: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(completion["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            received(rx).await,
            [ROLE, HELLO, STOP, DONE].concat().as_bytes()
        );
    }

    #[tokio::test]
    async fn a_stream_without_done_is_not_assembled() {
        let (tx, _rx) = client_channel();
        let err = assemble(script(&[ROLE, HELLO]), tx, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StreamError::Incomplete(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_broken_stream_ends_with_an_error_event() {
        let (tx, rx) = client_channel();
        let mut s = script(&[ROLE]);
        s.0.push_back(Err("reset".into()));
        let err = assemble(s, tx, None).await.unwrap_err();
        assert!(matches!(err, StreamError::Broken(_)));
        let text = String::from_utf8(received(rx).await).unwrap();
        assert!(
            text.ends_with("}}\n\n") && text.contains("\"error\""),
            "{text}"
        );
    }

    const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n";

    #[tokio::test]
    async fn the_usage_chunk_is_hidden_from_a_client_that_did_not_ask_but_still_assembled() {
        let (tx, rx) = client_channel();
        // Split mid-event to prove events are reassembled before they are judged.
        let (a, b) = USAGE.split_at(20);
        let source = script(&[ROLE, HELLO, STOP, a, b, DONE]);
        let out = assemble(source, tx, Some(UsageFilter::default()))
            .await
            .unwrap()
            .unwrap();
        let completion: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(completion["usage"]["total_tokens"], 2);
        assert_eq!(
            received(rx).await,
            [ROLE, HELLO, STOP, DONE].concat().as_bytes()
        );
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
        assert!(with_usage_requested(b"[1]").is_none());
    }

    #[test]
    fn an_event_split_over_many_chunks_is_judged_once_whole() {
        let mut filter = UsageFilter::default();
        let mut out = Vec::new();
        for piece in format!("{ROLE}{USAGE}{HELLO}").as_bytes().chunks(7) {
            out.extend_from_slice(&filter.push(piece));
        }
        assert_eq!(out, [ROLE, HELLO].concat().as_bytes());
        assert!(filter.finish().is_empty());
    }

    #[test]
    fn crlf_events_are_filtered_too() {
        let mut filter = UsageFilter::default();
        let usage = USAGE.replace("\n", "\r\n");
        let role = ROLE.replace("\n", "\r\n");
        let out = filter.push(format!("{role}{usage}").as_bytes());
        assert_eq!(&out[..], role.as_bytes());
        assert!(filter.finish().is_empty());
    }

    #[tokio::test]
    async fn a_gone_client_does_not_stop_the_assembly() {
        let (tx, rx) = client_channel();
        drop(rx);
        let out = assemble(script(&[ROLE, HELLO, STOP, DONE]), tx, None).await;
        assert!(out.unwrap().is_some());
    }
}
