//! Replaying a cached chat completion as the `text/event-stream` body OpenAI would send.
//! Pure: bytes in, bytes out.

use serde::Serialize;
use serde_json::{Map, Value};

use super::{REPLAY_CHUNK_CHARS, SseError};

/// Replay a cached chat completion JSON as a `text/event-stream` body that the official OpenAI
/// SDKs accept: a role chunk, content chunks (split into pieces of <= `chunk_chars` chars),
/// tool_calls deltas (index, id, type, function name, arguments), refusal, a finish chunk per
/// choice (finish_reason, logprobs kept if present), a usage chunk (choices: []) when
/// include_usage, then `data: [DONE]`. Every chunk has id, object "chat.completion.chunk",
/// created, model, system_fingerprint (if present). Err if the body is not a chat completion.
///
/// Uses `REPLAY_CHUNK_CHARS`; see `replay_chat_with`.
pub fn replay_chat(completion_json: &[u8], include_usage: bool) -> Result<Vec<u8>, SseError> {
    replay_chat_with(completion_json, include_usage, REPLAY_CHUNK_CHARS)
}

/// `replay_chat` with an explicit piece size (`chunk_chars`, at least 1).
///
/// The completion must be an object with `"object": "chat.completion"`, a string `id` and
/// `model`, a numeric `created` and a non-empty `choices` array of objects that each hold a
/// `message` object. Fields this module does not know are carried: message fields in the role
/// chunk, choice fields in the finish chunk, top-level fields in the first chunk.
/// `service_tier` is repeated in every chunk, as OpenAI does. With `include_usage`, chunks carry
/// `"usage": null` and the final chunk the usage (only if the completion has a `usage` member).
///
/// Round trip: for a chat completion `c` whose choices are numbered 0, 1, ... in order and each
/// have a `finish_reason`, assembling `replay_chat_with(c, true, n)` gives `c` back as a JSON
/// value. What the trip normalizes: `tool_calls[i].index` is dropped (the position is the
/// index), and with `include_usage = false` the `usage` member is not carried.
pub fn replay_chat_with(
    completion_json: &[u8],
    include_usage: bool,
    chunk_chars: usize,
) -> Result<Vec<u8>, SseError> {
    let chunk_chars = chunk_chars.max(1);
    let Ok(Value::Object(mut completion)) = serde_json::from_slice::<Value>(completion_json) else {
        return Err(SseError::NotChatCompletion);
    };
    if completion.remove("object").as_ref().and_then(Value::as_str) != Some("chat.completion") {
        return Err(SseError::NotChatCompletion);
    }
    let id = take_if(&mut completion, "id", Value::is_string)?;
    let created = take_if(&mut completion, "created", Value::is_number)?;
    let model = take_if(&mut completion, "model", Value::is_string)?;
    let choices = match completion.remove("choices") {
        Some(Value::Array(choices)) if !choices.is_empty() => choices,
        _ => return Err(SseError::NotChatCompletion),
    };
    let usage = completion.remove("usage");
    let header = Header {
        id,
        created,
        model,
        system_fingerprint: completion.remove("system_fingerprint"),
        service_tier: completion.remove("service_tier"),
        usage_placeholder: include_usage && usage.is_some(),
        no_extra: Map::new(),
    };
    let mut first_extra = Some(completion);
    let mut writer = Writer::default();

    for (position, choice) in choices.into_iter().enumerate() {
        let Value::Object(mut choice) = choice else {
            return Err(SseError::NotChatCompletion);
        };
        let index = match choice.remove("index") {
            None => position as u64,
            Some(index) => index.as_u64().ok_or(SseError::NotChatCompletion)?,
        };
        let Some(Value::Object(mut message)) = choice.remove("message") else {
            return Err(SseError::NotChatCompletion);
        };
        let logprobs = choice.remove("logprobs");
        let finish_reason = choice.remove("finish_reason").unwrap_or(Value::Null);
        // A `delta` here would collide with the chunk's own.
        choice.remove("delta");
        let choice_extra = choice;

        let mut chunk = ChoiceChunk {
            index,
            delta: Map::new(),
            logprobs_placeholder: logprobs.is_some(),
            logprobs: None,
            finish_reason: Value::Null,
            extra: Map::new(),
        };

        // Role chunk: everything that is not streamed piece by piece. Streamed strings start as
        // "" so the assembler sees the field even if its value is empty.
        let mut delta = Map::new();
        if let Some(role) = message.remove("role") {
            delta.insert("role".to_owned(), role);
        }
        let content = take_streamed_string(&mut message, "content", &mut delta);
        let refusal = take_streamed_string(&mut message, "refusal", &mut delta);
        let tool_calls = match message.remove("tool_calls") {
            Some(Value::Array(calls))
                if !calls.is_empty() && calls.iter().all(Value::is_object) =>
            {
                calls
            }
            Some(other) => {
                delta.insert("tool_calls".to_owned(), other);
                Vec::new()
            }
            None => Vec::new(),
        };
        delta.extend(message);
        chunk.delta = delta;
        writer.chunk(&header, &mut first_extra, &chunk)?;

        for (field, text) in [("content", content), ("refusal", refusal)] {
            for piece in split_chars(text.as_deref().unwrap_or_default(), chunk_chars) {
                chunk.delta = Map::from_iter([(field.to_owned(), Value::from(piece))]);
                writer.chunk(&header, &mut first_extra, &chunk)?;
            }
        }

        for (call_index, call) in tool_calls.into_iter().enumerate() {
            let Value::Object(mut call) = call else {
                continue;
            };
            call.remove("index");
            let arguments = call
                .get_mut("function")
                .and_then(Value::as_object_mut)
                .and_then(|function| match function.get_mut("arguments") {
                    Some(Value::String(arguments)) => Some(std::mem::take(arguments)),
                    _ => None,
                });
            let mut first = Map::from_iter([("index".to_owned(), Value::from(call_index))]);
            first.extend(call);
            chunk.delta = tool_call_delta(Value::Object(first));
            writer.chunk(&header, &mut first_extra, &chunk)?;
            for piece in split_chars(arguments.as_deref().unwrap_or_default(), chunk_chars) {
                let delta = serde_json::json!({
                    "index": call_index,
                    "function": {"arguments": piece},
                });
                chunk.delta = tool_call_delta(delta);
                writer.chunk(&header, &mut first_extra, &chunk)?;
            }
        }

        chunk.delta = Map::new();
        chunk.logprobs = logprobs;
        chunk.finish_reason = finish_reason;
        chunk.extra = choice_extra;
        writer.chunk(&header, &mut first_extra, &chunk)?;
    }

    if include_usage && let Some(usage) = usage.filter(|u| !u.is_null()) {
        writer.usage(&header, &usage)?;
    }
    let mut out = writer.out;
    out.extend_from_slice(b"data: [DONE]\n\n");
    Ok(out)
}

fn take_if(
    map: &mut Map<String, Value>,
    field: &str,
    ok: fn(&Value) -> bool,
) -> Result<Value, SseError> {
    map.remove(field)
        .filter(ok)
        .ok_or(SseError::NotChatCompletion)
}

/// Moves `field` out of `message`: a string is returned for streaming and announced as "" in
/// `delta`; any other value (null, or something unexpected) goes into `delta` as it is.
fn take_streamed_string(
    message: &mut Map<String, Value>,
    field: &str,
    delta: &mut Map<String, Value>,
) -> Option<String> {
    match message.remove(field)? {
        Value::String(text) => {
            delta.insert(field.to_owned(), Value::from(""));
            Some(text)
        }
        other => {
            delta.insert(field.to_owned(), other);
            None
        }
    }
}

fn tool_call_delta(call: Value) -> Map<String, Value> {
    Map::from_iter([("tool_calls".to_owned(), Value::Array(vec![call]))])
}

/// Pieces of at most `n` chars; none for an empty string.
pub(super) fn split_chars(s: &str, n: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in s.char_indices().enumerate() {
        if count > 0 && count % n == 0 {
            pieces.push(&s[start..i]);
            start = i;
        }
    }
    if start < s.len() {
        pieces.push(&s[start..]);
    }
    pieces
}

/// The fields every chunk repeats.
struct Header {
    id: Value,
    created: Value,
    model: Value,
    system_fingerprint: Option<Value>,
    service_tier: Option<Value>,
    /// Put `"usage": null` in every chunk but the usage chunk, as OpenAI does.
    usage_placeholder: bool,
    /// Chunks after the first carry no top-level extras.
    no_extra: Map<String, Value>,
}

struct ChoiceChunk {
    index: u64,
    delta: Map<String, Value>,
    /// Put `"logprobs": null` in chunks without logprobs (the completion had the field).
    logprobs_placeholder: bool,
    logprobs: Option<Value>,
    finish_reason: Value,
    extra: Map<String, Value>,
}

/// A chunk on the wire, fields in OpenAI's order.
#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a Value,
    object: &'static str,
    created: &'a Value,
    model: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a Value>,
    choices: Vec<ChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a Value>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u64,
    delta: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<&'a Value>,
    finish_reason: &'a Value,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

#[derive(Default)]
struct Writer {
    out: Vec<u8>,
}

const NULL: Value = Value::Null;

impl Writer {
    fn chunk(
        &mut self,
        header: &Header,
        first_extra: &mut Option<Map<String, Value>>,
        choice: &ChoiceChunk,
    ) -> Result<(), SseError> {
        let extra = first_extra.take().unwrap_or_default();
        let logprobs = match &choice.logprobs {
            Some(logprobs) => Some(logprobs),
            None if choice.logprobs_placeholder => Some(&NULL),
            None => None,
        };
        let chunk = ChunkOut {
            choices: vec![ChoiceOut {
                index: choice.index,
                delta: &choice.delta,
                logprobs,
                finish_reason: &choice.finish_reason,
                extra: &choice.extra,
            }],
            usage: header.usage_placeholder.then_some(&NULL),
            extra: &extra,
            ..Self::base(header)
        };
        self.write(&chunk)
    }

    fn usage(&mut self, header: &Header, usage: &Value) -> Result<(), SseError> {
        let chunk = ChunkOut {
            usage: Some(usage),
            ..Self::base(header)
        };
        self.write(&chunk)
    }

    fn base(header: &Header) -> ChunkOut<'_> {
        ChunkOut {
            id: &header.id,
            object: "chat.completion.chunk",
            created: &header.created,
            model: &header.model,
            service_tier: header.service_tier.as_ref(),
            system_fingerprint: header.system_fingerprint.as_ref(),
            choices: Vec::new(),
            usage: None,
            extra: &header.no_extra,
        }
    }

    fn write(&mut self, chunk: &ChunkOut<'_>) -> Result<(), SseError> {
        self.out.extend_from_slice(b"data: ");
        // serde_json escapes newlines inside strings, so the chunk is a single data line.
        serde_json::to_writer(&mut self.out, chunk)
            .map_err(|e| SseError::Malformed(e.to_string()))?;
        self.out.extend_from_slice(b"\n\n");
        Ok(())
    }
}
