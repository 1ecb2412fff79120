//! The Anthropic Messages API as Server-Sent Events: replaying a cached `message` as the events
//! the official SDKs parse (`message_start`, `content_block_start`, `ping`,
//! `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`), and
//! assembling a streamed one back, complete only when `message_stop` arrived. Usage is read
//! from `message_start` and updated by `message_delta`. Pure: bytes in, bytes out.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::events::{EventReader, SseEvent, pieces, write_event};
use super::{REPLAY_CHUNK_CHARS, SseError};
use crate::entry::Usage;

/// Replay a cached `message` (`"type": "message"`, a string `id`, a `content` array) as the
/// events Anthropic streams for it: `message_start` (the message without content, stop
/// reason still null, `output_tokens` 1 as Anthropic reports it there), per content block a
/// `content_block_start`, its deltas (`text_delta`, `input_json_delta` for tool use,
/// `thinking_delta` and `signature_delta`) and `content_block_stop`, a `ping` after the first
/// block starts, then `message_delta` (stop reason and sequence, and the whole usage) and
/// `message_stop`.
///
/// Round trip: assembling the replay gives the stored message back.
pub fn replay_messages(message_json: &[u8]) -> Result<Vec<u8>, SseError> {
    replay_messages_with(message_json, REPLAY_CHUNK_CHARS)
}

/// `replay_messages` with an explicit piece size (`chunk_chars`, at least 1).
pub fn replay_messages_with(message_json: &[u8], chunk_chars: usize) -> Result<Vec<u8>, SseError> {
    let not = SseError::NotReplayable("a message");
    let Ok(Value::Object(mut message)) = serde_json::from_slice::<Value>(message_json) else {
        return Err(not);
    };
    if message.get("type").and_then(Value::as_str) != Some("message")
        || !message.get("id").is_some_and(Value::is_string)
    {
        return Err(not);
    }
    let Some(Value::Array(content)) = message.insert("content".into(), json!([])) else {
        return Err(not);
    };
    let stop_reason = message.insert("stop_reason".into(), Value::Null);
    let stop_sequence = message.insert("stop_sequence".into(), Value::Null);
    let usage = message.get("usage").cloned();
    if let Some(Value::Object(start_usage)) = message.get_mut("usage")
        && start_usage.contains_key("output_tokens")
    {
        start_usage.insert("output_tokens".into(), json!(1));
    }
    let mut out = Vec::new();
    write_event(
        &mut out,
        "message_start",
        &json!({ "type": "message_start", "message": message }),
    );
    let ping = |out: &mut Vec<u8>| write_event(out, "ping", &json!({ "type": "ping" }));
    if content.is_empty() {
        ping(&mut out);
    }
    for (index, block) in content.into_iter().enumerate() {
        let Value::Object(block) = block else {
            return Err(SseError::NotReplayable("a message"));
        };
        let (start, deltas) = block_events(block, chunk_chars);
        write_event(
            &mut out,
            "content_block_start",
            &json!({ "type": "content_block_start", "index": index, "content_block": start }),
        );
        if index == 0 {
            ping(&mut out);
        }
        for delta in deltas {
            write_event(
                &mut out,
                "content_block_delta",
                &json!({ "type": "content_block_delta", "index": index, "delta": delta }),
            );
        }
        write_event(
            &mut out,
            "content_block_stop",
            &json!({ "type": "content_block_stop", "index": index }),
        );
    }
    let mut delta = json!({
        "type": "message_delta",
        "delta": {
            "stop_reason": stop_reason.unwrap_or(Value::Null),
            "stop_sequence": stop_sequence.unwrap_or(Value::Null),
        },
    });
    if let Some(usage) = usage {
        delta["usage"] = usage;
    }
    write_event(&mut out, "message_delta", &delta);
    write_event(&mut out, "message_stop", &json!({ "type": "message_stop" }));
    Ok(out)
}

/// A block's `content_block_start` form and its deltas.
fn block_events(block: Map<String, Value>, chunk_chars: usize) -> (Value, Vec<Value>) {
    let mut start = block.clone();
    let text = |field: &str| block.get(field).and_then(Value::as_str).unwrap_or("");
    let deltas = match block.get("type").and_then(Value::as_str) {
        Some("text") => {
            start.insert("text".into(), json!(""));
            if let Some(Value::Array(_)) = start.get("citations") {
                start.insert("citations".into(), json!([]));
                let mut deltas = text_deltas(text("text"), chunk_chars);
                let citations = block.get("citations").and_then(Value::as_array);
                deltas.extend(
                    citations
                        .into_iter()
                        .flatten()
                        .map(|c| json!({ "type": "citations_delta", "citation": c })),
                );
                deltas
            } else {
                text_deltas(text("text"), chunk_chars)
            }
        }
        Some("tool_use" | "server_tool_use") => {
            start.insert("input".into(), json!({}));
            let input = block.get("input").map(Value::to_string).unwrap_or_default();
            pieces(&input, chunk_chars)
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(|p| json!({ "type": "input_json_delta", "partial_json": p }))
                .collect()
        }
        Some("thinking") => {
            start.insert("thinking".into(), json!(""));
            start.insert("signature".into(), json!(""));
            let mut deltas: Vec<Value> = pieces(text("thinking"), chunk_chars)
                .into_iter()
                .map(|p| json!({ "type": "thinking_delta", "thinking": p }))
                .collect();
            deltas.push(json!({ "type": "signature_delta", "signature": text("signature") }));
            deltas
        }
        // Redacted thinking and anything newer: the whole block in its start event.
        _ => Vec::new(),
    };
    (Value::Object(start), deltas)
}

fn text_deltas(text: &str, chunk_chars: usize) -> Vec<Value> {
    pieces(text, chunk_chars)
        .into_iter()
        .map(|p| json!({ "type": "text_delta", "text": p }))
        .collect()
}

/// Incremental assembler of a streamed message, as the Anthropic SDKs accumulate it: the
/// message of `message_start`, blocks from `content_block_start` grown by their deltas, the
/// stop reason and usage of `message_delta`. Complete only after `message_stop`; an `error`
/// event or a delta it does not know fails it (an answer it cannot rebuild is not cached).
#[derive(Debug, Default)]
pub struct MessagesAssembler {
    reader: EventReader,
    events: Vec<SseEvent>,
    message: Option<Map<String, Value>>,
    blocks: BTreeMap<u64, Block>,
    stopped: bool,
    failed: Option<SseError>,
}

#[derive(Debug)]
struct Block {
    block: Map<String, Value>,
    /// Tool input as it arrives (`input_json_delta`), parsed at `content_block_stop`.
    partial_json: Option<String>,
}

impl MessagesAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed raw bytes as they arrive. Err once the stream is known to be unusable; every
    /// later call returns the same error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        self.reader.push(bytes, &mut self.events);
        self.take_events()
    }

    /// The message's JSON, only if `message_stop` arrived.
    pub fn finish(mut self) -> Result<Vec<u8>, SseError> {
        if let Some(error) = self.failed.take() {
            return Err(error);
        }
        self.reader.finish(&mut self.events);
        self.take_events()?;
        let (Some(mut message), true) = (self.message, self.stopped) else {
            return Err(SseError::Incomplete);
        };
        let mut content = Vec::with_capacity(self.blocks.len());
        for (_, block) in self.blocks {
            if block.partial_json.is_some() {
                return Err(SseError::Incomplete);
            }
            content.push(Value::Object(block.block));
        }
        message.insert("content".into(), Value::Array(content));
        Ok(Value::Object(message).to_string().into_bytes())
    }

    /// The tokens reported so far: `message_start`'s usage, updated by `message_delta`'s.
    /// Input counts cache reads and writes too (Anthropic reports them apart).
    pub fn usage(&self) -> Option<Usage> {
        let usage = self.message.as_ref()?.get("usage")?;
        let count = |field: &str| usage.get(field).and_then(Value::as_u64).unwrap_or(0);
        let input = count("input_tokens")
            .saturating_add(count("cache_creation_input_tokens"))
            .saturating_add(count("cache_read_input_tokens"));
        let output = count("output_tokens");
        Some(Usage {
            prompt_tokens: input,
            completion_tokens: output,
            total_tokens: input.saturating_add(output),
        })
    }

    fn take_events(&mut self) -> Result<(), SseError> {
        for event in std::mem::take(&mut self.events) {
            if let Err(error) = self.event(event) {
                self.failed = Some(error.clone());
                return Err(error);
            }
        }
        Ok(())
    }

    fn event(&mut self, event: SseEvent) -> Result<(), SseError> {
        let malformed = |what: &str| SseError::Malformed(what.to_owned());
        let Value::Object(mut data) =
            serde_json::from_slice(&event.data).map_err(|e| SseError::Malformed(e.to_string()))?
        else {
            return Err(malformed("an event that is not an object"));
        };
        let kind = match data.get("type").and_then(Value::as_str) {
            Some(kind) => kind.to_owned(),
            None => event.name,
        };
        let index = data.get("index").and_then(Value::as_u64);
        match kind.as_str() {
            "ping" => Ok(()),
            "error" => Err(SseError::UpstreamError),
            "message_start" => match data.remove("message") {
                Some(Value::Object(message)) => {
                    self.message = Some(message);
                    Ok(())
                }
                _ => Err(malformed("message_start without a message")),
            },
            "content_block_start" => match (index, data.remove("content_block")) {
                (Some(index), Some(Value::Object(block))) => {
                    let tool = matches!(
                        block.get("type").and_then(Value::as_str),
                        Some("tool_use" | "server_tool_use")
                    );
                    let block = Block {
                        block,
                        partial_json: tool.then(String::new),
                    };
                    self.blocks.insert(index, block);
                    Ok(())
                }
                _ => Err(malformed("content_block_start without an index or a block")),
            },
            "content_block_delta" => {
                let block = index
                    .and_then(|i| self.blocks.get_mut(&i))
                    .ok_or_else(|| malformed("a delta for a block that did not start"))?;
                let Some(Value::Object(delta)) = data.remove("delta") else {
                    return Err(malformed("content_block_delta without a delta"));
                };
                block.apply(delta)
            }
            "content_block_stop" => {
                let block = index
                    .and_then(|i| self.blocks.get_mut(&i))
                    .ok_or_else(|| malformed("a stop for a block that did not start"))?;
                if let Some(json) = block.partial_json.take() {
                    let input = if json.is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&json)
                            .map_err(|_| malformed("tool input is not JSON"))?
                    };
                    block.block.insert("input".into(), input);
                }
                Ok(())
            }
            "message_delta" => {
                let message = self
                    .message
                    .as_mut()
                    .ok_or_else(|| malformed("message_delta before message_start"))?;
                if let Some(Value::Object(delta)) = data.remove("delta") {
                    message.extend(delta);
                }
                if let Some(Value::Object(usage)) = data.remove("usage") {
                    let entry = message.entry("usage").or_insert_with(|| json!({}));
                    if let Value::Object(current) = entry {
                        // Anthropic's SDKs keep a count when the delta reports it as null.
                        current.extend(usage.into_iter().filter(|(_, v)| !v.is_null()));
                    }
                }
                Ok(())
            }
            "message_stop" => {
                self.stopped = true;
                Ok(())
            }
            _ => Err(malformed("an event this gateway does not know")),
        }
    }
}

impl Block {
    fn apply(&mut self, delta: Map<String, Value>) -> Result<(), SseError> {
        let malformed = |what: &str| SseError::Malformed(what.to_owned());
        let str_of = |field: &str| {
            delta
                .get(field)
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("a delta without its text"))
        };
        let append = |block: &mut Map<String, Value>, field: &str, more: &str| {
            let current = block.get(field).and_then(Value::as_str).unwrap_or("");
            let joined = format!("{current}{more}");
            block.insert(field.to_owned(), Value::String(joined));
        };
        match delta.get("type").and_then(Value::as_str) {
            Some("text_delta") => append(&mut self.block, "text", str_of("text")?),
            Some("thinking_delta") => append(&mut self.block, "thinking", str_of("thinking")?),
            Some("signature_delta") => append(&mut self.block, "signature", str_of("signature")?),
            Some("input_json_delta") => match &mut self.partial_json {
                Some(json) => json.push_str(str_of("partial_json")?),
                None => return Err(malformed("tool input for a block that is not a tool use")),
            },
            Some("citations_delta") => {
                let citation = delta.get("citation").cloned().unwrap_or(Value::Null);
                let entry = self.block.entry("citations").or_insert_with(|| json!([]));
                match entry {
                    Value::Array(citations) => citations.push(citation),
                    _ => *entry = json!([citation]),
                }
            }
            _ => return Err(malformed("a delta this gateway does not know")),
        }
        Ok(())
    }
}
