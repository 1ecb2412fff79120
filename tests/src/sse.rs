//! Reading Server-Sent Events bodies the way a client does, independently of `common`'s own
//! SSE code, so tests check what the tiers send rather than agree with themselves.

use serde_json::Value;

/// A chat completion stream as a client sees it.
#[derive(Debug, Clone, Default)]
pub struct ChatStream {
    /// Every `data:` payload other than `[DONE]`, parsed, in order.
    pub chunks: Vec<Value>,
    /// Whether the stream ended with `data: [DONE]` and nothing after it.
    pub done: bool,
}

impl ChatStream {
    /// Parse a whole SSE body. Panics on a `data:` payload that is not JSON (a broken stream).
    pub fn parse(body: &str) -> ChatStream {
        let mut stream = ChatStream::default();
        for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if data.is_empty() {
                continue; // a comment or keep-alive
            }
            let payload = data.join("\n");
            assert!(!stream.done, "an event after [DONE]: {payload}");
            if payload == "[DONE]" {
                stream.done = true;
            } else {
                let chunk = serde_json::from_str(&payload)
                    .unwrap_or_else(|e| panic!("SSE payload is not JSON ({e}): {payload}"));
                stream.chunks.push(chunk);
            }
        }
        stream
    }

    /// The assistant's text: every `choices[0].delta.content`, joined.
    pub fn content(&self) -> String {
        self.chunks
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect()
    }

    /// The completion id the chunks carry (the first chunk's).
    pub fn id(&self) -> &str {
        self.chunks
            .first()
            .and_then(|c| c["id"].as_str())
            .unwrap_or_default()
    }

    /// The usage chunk's `usage`, when the stream had one.
    pub fn usage(&self) -> Option<&Value> {
        self.chunks
            .iter()
            .map(|c| &c["usage"])
            .find(|u| u.is_object())
    }
}
