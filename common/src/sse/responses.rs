//! The OpenAI Responses API as Server-Sent Events: replaying a cached `response` as the typed
//! events the official SDKs parse (`response.created` … `response.completed`, each with a
//! `sequence_number`), and assembling a streamed one back, which is complete only when
//! `response.completed` arrived (it carries the whole response). Pure: bytes in, bytes out.

use serde_json::{Map, Value, json};

use super::events::{EventReader, SseEvent, pieces, write_event};
use super::{REPLAY_CHUNK_CHARS, SseError};
use crate::entry::Usage;

/// Replay a cached `response` object (`"object": "response"`, a string `id`, an `output`
/// array) as the events OpenAI streams for it: `response.created` and `response.in_progress`
/// (the response without output or usage, `in_progress`), then per output item
/// `response.output_item.added`, its content (`response.content_part.added`,
/// `response.output_text.delta` pieces, `response.output_text.done`,
/// `response.content_part.done`; refusals and function-call arguments likewise) and
/// `response.output_item.done`, then `response.completed` with the response as stored.
///
/// Round trip: assembling the replay gives the stored response back.
pub fn replay_responses(response_json: &[u8]) -> Result<Vec<u8>, SseError> {
    replay_responses_with(response_json, REPLAY_CHUNK_CHARS)
}

/// `replay_responses` with an explicit piece size (`chunk_chars`, at least 1).
pub fn replay_responses_with(
    response_json: &[u8],
    chunk_chars: usize,
) -> Result<Vec<u8>, SseError> {
    let not = SseError::NotReplayable("a response");
    let Ok(Value::Object(response)) = serde_json::from_slice::<Value>(response_json) else {
        return Err(not);
    };
    if response.get("object").and_then(Value::as_str) != Some("response")
        || !response.get("id").is_some_and(Value::is_string)
    {
        return Err(not);
    }
    let Some(Value::Array(output)) = response.get("output") else {
        return Err(not);
    };
    let mut writer = Writer::default();
    let mut started = response.clone();
    started.insert("status".into(), json!("in_progress"));
    started.insert("output".into(), json!([]));
    started.insert("usage".into(), Value::Null);
    writer.event("response.created", json!({ "response": started }));
    writer.event("response.in_progress", json!({ "response": started }));
    for (output_index, item) in output.iter().enumerate() {
        let Value::Object(item) = item else {
            return Err(SseError::NotReplayable("a response"));
        };
        writer.item(output_index, item, chunk_chars);
    }
    writer.event("response.completed", json!({ "response": response }));
    Ok(writer.out)
}

#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    sequence: u64,
}

impl Writer {
    fn event(&mut self, name: &str, mut data: Value) {
        if let Value::Object(map) = &mut data {
            map.insert("type".into(), json!(name));
            map.insert("sequence_number".into(), json!(self.sequence));
        }
        self.sequence += 1;
        write_event(&mut self.out, name, &data);
    }

    fn item(&mut self, output_index: usize, item: &Map<String, Value>, chunk_chars: usize) {
        let item_id = item.get("id").cloned().unwrap_or(Value::Null);
        let at = |content_index: Option<usize>, extra: Value| {
            let mut data = json!({ "item_id": item_id, "output_index": output_index });
            if let Some(i) = content_index {
                data["content_index"] = json!(i);
            }
            if let (Value::Object(data), Value::Object(extra)) = (&mut data, extra) {
                data.extend(extra);
            }
            data
        };
        let mut added = item.clone();
        added.insert("status".into(), json!("in_progress"));
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                added.insert("content".into(), json!([]));
                self.event(
                    "response.output_item.added",
                    json!({ "output_index": output_index, "item": added }),
                );
                let parts = item.get("content").and_then(Value::as_array);
                for (i, part) in parts.into_iter().flatten().enumerate() {
                    let kind = part.get("type").and_then(Value::as_str);
                    let (field, delta, done) = match kind {
                        Some("output_text") => (
                            "text",
                            "response.output_text.delta",
                            "response.output_text.done",
                        ),
                        Some("refusal") => {
                            ("refusal", "response.refusal.delta", "response.refusal.done")
                        }
                        _ => ("", "", ""),
                    };
                    let full = part.get(field).and_then(Value::as_str);
                    let Some(full) = full.filter(|_| !field.is_empty()) else {
                        self.event(
                            "response.content_part.added",
                            at(Some(i), json!({ "part": part })),
                        );
                        self.event(
                            "response.content_part.done",
                            at(Some(i), json!({ "part": part })),
                        );
                        continue;
                    };
                    let mut empty = part.clone();
                    empty[field] = json!("");
                    if kind == Some("output_text") {
                        empty["annotations"] = json!([]);
                    }
                    self.event(
                        "response.content_part.added",
                        at(Some(i), json!({ "part": empty })),
                    );
                    for piece in pieces(full, chunk_chars) {
                        let mut data = json!({ "delta": piece });
                        if kind == Some("output_text") {
                            data["logprobs"] = json!([]);
                        }
                        self.event(delta, at(Some(i), data));
                    }
                    let mut data = json!({ field: full });
                    if kind == Some("output_text") {
                        data["logprobs"] = part.get("logprobs").cloned().unwrap_or(json!([]));
                    }
                    self.event(done, at(Some(i), data));
                    self.event(
                        "response.content_part.done",
                        at(Some(i), json!({ "part": part })),
                    );
                }
            }
            Some("function_call") => {
                added.insert("arguments".into(), json!(""));
                self.event(
                    "response.output_item.added",
                    json!({ "output_index": output_index, "item": added }),
                );
                let arguments = item.get("arguments").and_then(Value::as_str).unwrap_or("");
                for piece in pieces(arguments, chunk_chars) {
                    self.event(
                        "response.function_call_arguments.delta",
                        at(None, json!({ "delta": piece })),
                    );
                }
                self.event(
                    "response.function_call_arguments.done",
                    at(None, json!({ "arguments": arguments })),
                );
            }
            // Reasoning, tool calls of built-in tools and anything newer: announced whole.
            _ => self.event(
                "response.output_item.added",
                json!({ "output_index": output_index, "item": item }),
            ),
        }
        self.event(
            "response.output_item.done",
            json!({ "output_index": output_index, "item": item }),
        );
    }
}

/// Incremental assembler of a streamed response: keeps the `response` of
/// `response.completed`, and fails on `error`, `response.failed` or `response.incomplete`.
#[derive(Debug, Default)]
pub struct ResponsesAssembler {
    reader: EventReader,
    events: Vec<SseEvent>,
    completed: Option<Value>,
    failed: Option<SseError>,
}

impl ResponsesAssembler {
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

    /// The completed response's JSON, only if `response.completed` arrived.
    pub fn finish(mut self) -> Result<Vec<u8>, SseError> {
        if let Some(error) = self.failed.take() {
            return Err(error);
        }
        self.reader.finish(&mut self.events);
        self.take_events()?;
        match self.completed {
            Some(response) => Ok(response.to_string().into_bytes()),
            None => Err(SseError::Incomplete),
        }
    }

    /// The usage of the completed response, once it arrived.
    pub fn usage(&self) -> Option<Usage> {
        let usage = self.completed.as_ref()?.get("usage")?;
        let input = usage.get("input_tokens")?.as_u64()?;
        let output = usage.get("output_tokens")?.as_u64()?;
        let total = usage
            .get("total_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(input.saturating_add(output));
        Some(Usage {
            prompt_tokens: input,
            completion_tokens: output,
            total_tokens: total,
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
        let data: Value =
            serde_json::from_slice(&event.data).map_err(|e| SseError::Malformed(e.to_string()))?;
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(&event.name);
        match kind {
            "error" | "response.failed" => Err(SseError::UpstreamError),
            "response.incomplete" => Err(SseError::Incomplete),
            "response.completed" => match data.get("response") {
                Some(response @ Value::Object(_)) => {
                    self.completed = Some(response.clone());
                    Ok(())
                }
                _ => Err(SseError::Malformed(
                    "response.completed without a response".into(),
                )),
            },
            _ => Ok(()),
        }
    }
}
