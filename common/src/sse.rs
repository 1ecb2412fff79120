//! Chat completions as Server-Sent Events: replaying a cached completion as the stream OpenAI
//! would send, and assembling a streamed completion back into one `chat.completion`.
//! Pure: bytes in, bytes out; no I/O, no clock, no buffering policy beyond one event.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

/// The default size of replayed content pieces, in characters (not bytes, so a piece never
/// splits a UTF-8 sequence).
pub const REPLAY_CHUNK_CHARS: usize = 32;

/// Why a replay or an assembly failed. Callers treat every variant as "do not use / do not
/// cache"; none of them is a client error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// The body is not a `chat.completion` with at least one choice.
    #[error("body is not a chat completion")]
    NotChatCompletion,
    /// The stream is not well-formed SSE carrying completion chunks.
    #[error("malformed event stream: {0}")]
    Malformed(String),
    /// The stream ended before `data: [DONE]`, or a choice has no finish_reason.
    #[error("stream ended before the completion was complete")]
    Incomplete,
    /// The upstream sent an error event or an error object.
    #[error("upstream sent an error in the stream")]
    UpstreamError,
}

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
fn split_chars(s: &str, n: usize) -> Vec<&str> {
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

/// Incremental assembler of a streamed chat completion back into one `chat.completion` JSON.
///
/// Parses SSE as the WHATWG spec and the OpenAI SDKs do: LF, CRLF or CR line ends, split
/// anywhere across `push` calls; `:` comment lines ignored; `data:` lines of one event joined
/// with "\n"; `event:`/`id:`/`retry:` read (only `event: error` matters). Deltas accumulate as in
/// the official Python SDK (`accumulate_delta`): strings concatenate, objects merge, list
/// entries merge by their `index`, `null` never erases. Where the SDK would produce nonsense the
/// assembler is stricter: `id` and `role` are kept from their first non-empty value (some
/// providers repeat them), and repeated numbers or booleans replace rather than add up.
#[derive(Debug, Default)]
pub struct ChatAssembler {
    /// The current, unterminated line.
    line: Vec<u8>,
    /// The previous push ended in CR: a leading LF belongs to that line end.
    after_cr: bool,
    /// Data lines of the event being read, joined with "\n".
    data: Vec<u8>,
    has_data: bool,
    event: String,
    done: bool,
    failed: Option<SseError>,
    completion: CompletionAcc,
}

#[derive(Debug, Default)]
struct CompletionAcc {
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    usage: Option<Value>,
    system_fingerprint: Option<Value>,
    service_tier: Option<Value>,
    extra: Map<String, Value>,
    choices: BTreeMap<u64, ChoiceAcc>,
}

#[derive(Debug, Default)]
struct ChoiceAcc {
    message: Map<String, Value>,
    logprobs: Option<Value>,
    finish_reason: Option<Value>,
    extra: Map<String, Value>,
}

impl ChatAssembler {
    /// An empty assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed raw bytes as they arrive (any split, CRLF or LF, comments, multi-line data).
    ///
    /// Err once the stream is known to be unusable (malformed, or an upstream error); every
    /// later call returns the same error. Bytes after `data: [DONE]` are ignored.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = self.push_lines(bytes);
        if let Err(err) = &result {
            self.failed = Some(err.clone());
        }
        result
    }

    /// Ok(completion JSON bytes) only if `data: [DONE]` was seen and every choice has a
    /// finish_reason; otherwise Err(SseError::Incomplete). An `error` event -> Err.
    ///
    /// A last event not followed by a blank line still counts (a stream that ends right after
    /// `data: [DONE]` is complete); a truncated chunk fails to parse and makes it Malformed.
    pub fn finish(mut self) -> Result<Vec<u8>, SseError> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line)?;
        }
        self.dispatch()?;
        if !self.done {
            return Err(SseError::Incomplete);
        }
        self.completion.build()
    }

    fn push_lines(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        let mut rest = bytes;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            let line = std::mem::take(&mut self.line);
            self.process_line(&line)?;
            self.line = line;
            self.line.clear();
            let mut next = end + 1;
            if rest[end] == b'\r' {
                match rest.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            rest = &rest[next..];
        }
        self.line.extend_from_slice(rest);
        Ok(())
    }

    fn process_line(&mut self, line: &[u8]) -> Result<(), SseError> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.event = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Result<(), SseError> {
        let data = std::mem::take(&mut self.data);
        let event = std::mem::take(&mut self.event);
        let had_data = std::mem::take(&mut self.has_data);
        if event == "error" {
            return Err(SseError::UpstreamError);
        }
        if !had_data || self.done {
            return Ok(());
        }
        let text = data.trim_ascii();
        if text.is_empty() {
            return Ok(());
        }
        if text.starts_with(b"[DONE]") {
            self.done = true;
            return Ok(());
        }
        let chunk: Value = serde_json::from_slice(text)
            .map_err(|e| SseError::Malformed(format!("event data is not JSON: {e}")))?;
        if chunk.get("error").is_some_and(|e| !e.is_null()) {
            return Err(SseError::UpstreamError);
        }
        self.completion.absorb(chunk)
    }
}

/// Keeps the last non-null value, or null if only nulls were seen.
fn set_latest(slot: &mut Option<Value>, value: Option<Value>) {
    if let Some(value) = value
        && (!value.is_null() || slot.is_none())
    {
        *slot = Some(value);
    }
}

/// Keeps the first non-null value.
fn set_first(slot: &mut Option<Value>, value: Option<Value>) {
    if let Some(value) = value
        && slot.as_ref().is_none_or(Value::is_null)
    {
        *slot = Some(value);
    }
}

fn merge_latest(extra: &mut Map<String, Value>, fields: Map<String, Value>) {
    for (key, value) in fields {
        let mut slot = extra.remove(&key);
        set_latest(&mut slot, Some(value));
        if let Some(value) = slot {
            extra.insert(key, value);
        }
    }
}

impl CompletionAcc {
    fn absorb(&mut self, chunk: Value) -> Result<(), SseError> {
        let Value::Object(mut chunk) = chunk else {
            return Err(SseError::Malformed("chunk is not a JSON object".to_owned()));
        };
        let choices = match chunk.remove("choices") {
            Some(Value::Array(choices)) => choices,
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                return Err(SseError::Malformed(
                    "chunk choices is not an array".to_owned(),
                ));
            }
        };
        chunk.remove("object");
        set_first(&mut self.id, chunk.remove("id"));
        set_first(&mut self.created, chunk.remove("created"));
        set_first(&mut self.model, chunk.remove("model"));
        set_latest(&mut self.usage, chunk.remove("usage"));
        set_latest(
            &mut self.system_fingerprint,
            chunk.remove("system_fingerprint"),
        );
        set_latest(&mut self.service_tier, chunk.remove("service_tier"));
        merge_latest(&mut self.extra, chunk);

        for choice in choices {
            let Value::Object(mut choice) = choice else {
                return Err(SseError::Malformed(
                    "chunk choice is not an object".to_owned(),
                ));
            };
            let index = choice
                .remove("index")
                .and_then(|i| i.as_u64())
                .ok_or_else(|| SseError::Malformed("chunk choice has no index".to_owned()))?;
            let acc = self.choices.entry(index).or_default();
            match choice.remove("delta") {
                Some(Value::Object(delta)) => accumulate(&mut acc.message, delta),
                None | Some(Value::Null) => {}
                Some(_) => return Err(SseError::Malformed("delta is not an object".to_owned())),
            }
            if let Some(logprobs) = choice.remove("logprobs") {
                merge_logprobs(&mut acc.logprobs, logprobs);
            }
            set_latest(&mut acc.finish_reason, choice.remove("finish_reason"));
            // The assembled choice has its own `message`.
            choice.remove("message");
            merge_latest(&mut acc.extra, choice);
        }
        Ok(())
    }

    fn build(self) -> Result<Vec<u8>, SseError> {
        if self.choices.is_empty()
            || self
                .choices
                .values()
                .any(|c| !c.finish_reason.as_ref().is_some_and(Value::is_string))
        {
            return Err(SseError::Incomplete);
        }
        let choices = self
            .choices
            .into_iter()
            .map(|(index, mut choice)| {
                if let Some(Value::Array(calls)) = choice.message.get_mut("tool_calls") {
                    calls.sort_by_key(|call| {
                        call.get("index")
                            .and_then(Value::as_u64)
                            .unwrap_or(u64::MAX)
                    });
                    for call in calls.iter_mut().filter_map(Value::as_object_mut) {
                        call.remove("index");
                    }
                }
                AssembledChoice {
                    index,
                    message: choice.message,
                    logprobs: choice.logprobs,
                    finish_reason: choice.finish_reason.unwrap_or(Value::Null),
                    extra: choice.extra,
                }
            })
            .collect();
        let completion = AssembledCompletion {
            id: self.id,
            object: "chat.completion",
            created: self.created,
            model: self.model,
            choices,
            usage: self.usage,
            system_fingerprint: self.system_fingerprint,
            service_tier: self.service_tier,
            extra: self.extra,
        };
        serde_json::to_vec(&completion).map_err(|e| SseError::Malformed(e.to_string()))
    }
}

#[derive(Serialize)]
struct AssembledCompletion {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Value>,
    object: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<Value>,
    choices: Vec<AssembledChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Serialize)]
struct AssembledChoice {
    index: u64,
    message: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Value>,
    finish_reason: Value,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// The SDK's `accumulate_delta`, with `id`/`role` kept from their first value and scalars
/// replaced rather than added.
fn accumulate(acc: &mut Map<String, Value>, delta: Map<String, Value>) {
    for (key, value) in delta {
        match acc.get_mut(&key) {
            None => {
                acc.insert(key, value);
            }
            Some(existing) => merge_value(&key, existing, value),
        }
    }
}

fn merge_value(key: &str, existing: &mut Value, value: Value) {
    if existing.is_null() {
        *existing = value;
        return;
    }
    match key {
        "index" | "type" => {
            if !value.is_null() {
                *existing = value;
            }
            return;
        }
        "id" | "role" => {
            if existing.as_str() == Some("") && value.is_string() {
                *existing = value;
            }
            return;
        }
        _ => {}
    }
    match (existing, value) {
        (Value::String(acc), Value::String(more)) => acc.push_str(&more),
        (Value::Object(acc), Value::Object(more)) => accumulate(acc, more),
        (Value::Array(acc), Value::Array(more)) => merge_list(acc, more),
        (Value::Number(acc), Value::Number(more)) => *acc = more,
        (Value::Bool(acc), Value::Bool(more)) => *acc = more,
        // null or a different type: keep what we have, as the SDK does.
        _ => {}
    }
}

fn list_index(entry: &Value) -> Option<u64> {
    entry.get("index").and_then(Value::as_u64)
}

/// Entries with an `index` merge into the entry with the same index; others are appended.
fn merge_list(acc: &mut Vec<Value>, more: Vec<Value>) {
    for entry in more {
        let position = list_index(&entry)
            .and_then(|index| acc.iter().position(|e| list_index(e) == Some(index)));
        match (position, entry) {
            (Some(position), Value::Object(delta)) => {
                if let Value::Object(existing) = &mut acc[position] {
                    accumulate(existing, delta);
                }
            }
            (_, entry) => acc.push(entry),
        }
    }
}

/// The SDK's rule: the first non-null logprobs object is taken whole; later ones extend its
/// `content` and `refusal` arrays.
fn merge_logprobs(acc: &mut Option<Value>, logprobs: Value) {
    let existing = match acc {
        None => {
            *acc = Some(logprobs);
            return;
        }
        Some(existing) if existing.is_null() => {
            *existing = logprobs;
            return;
        }
        Some(existing) => existing,
    };
    let (Value::Object(existing), Value::Object(mut more)) = (existing, logprobs) else {
        return;
    };
    for field in ["content", "refusal"] {
        let Some(Value::Array(items)) = more.remove(field) else {
            continue;
        };
        if items.is_empty() {
            continue;
        }
        match existing.get_mut(field) {
            Some(Value::Array(acc_items)) => acc_items.extend(items),
            _ => {
                existing.insert(field.to_owned(), Value::Array(items));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion() -> Value {
        json!({
            "id": "chatcmpl-123",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_44709d6fcb",
            "service_tier": "default",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello there, how may I assist you today? ☃ 😀",
                    "refusal": null,
                    "annotations": []
                },
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0}
            }
        })
    }

    fn replay(c: &Value, include_usage: bool, n: usize) -> String {
        let bytes = replay_chat_with(&serde_json::to_vec(c).unwrap(), include_usage, n).unwrap();
        String::from_utf8(bytes).unwrap()
    }

    fn assemble(stream: &[u8]) -> Result<Value, SseError> {
        let mut asm = ChatAssembler::new();
        asm.push(stream)?;
        asm.finish()
            .map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }

    fn events(stream: &str) -> Vec<Value> {
        assert!(stream.ends_with("data: [DONE]\n\n"));
        stream
            .split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn replay_looks_like_openai_chunks() {
        let stream = replay(&completion(), true, 16);
        let chunks = events(&stream);
        let first = &chunks[0];
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["id"], "chatcmpl-123");
        assert_eq!(first["system_fingerprint"], "fp_44709d6fcb");
        assert_eq!(first["usage"], Value::Null);
        assert_eq!(
            first["choices"][0],
            json!({"index":0,"delta":{"role":"assistant","content":"","refusal":null,
                   "annotations":[]},"logprobs":null,"finish_reason":null})
        );
        assert!(stream.starts_with("data: {\"id\":\"chatcmpl-123\",\"object\":"));
        let pieces: Vec<_> = chunks[1..]
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(pieces.iter().all(|p| p.chars().count() <= 16));
        assert_eq!(
            pieces.concat(),
            "Hello there, how may I assist you today? ☃ 😀"
        );
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 21);
        assert_eq!(usage["system_fingerprint"], "fp_44709d6fcb");
    }

    #[test]
    fn without_include_usage_there_is_no_usage_anywhere() {
        let stream = replay(&completion(), false, 32);
        assert!(!stream.contains("usage"));
        let mut expected = completion();
        expected.as_object_mut().unwrap().remove("usage");
        assert_eq!(assemble(stream.as_bytes()).unwrap(), expected);
    }

    #[test]
    fn replay_then_assemble_is_the_identity() {
        let c = completion();
        for n in [1, 3, 32, 1000] {
            assert_eq!(
                assemble(replay(&c, true, n).as_bytes()).unwrap(),
                c,
                "n={n}"
            );
        }
    }

    #[test]
    fn tool_calls_round_trip_and_stream_arguments_in_pieces() {
        let c = json!({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_b", "type": "function",
                     "function": {"name": "get_time", "arguments": ""}}
                ]},
                "logprobs": null,
                "finish_reason": "tool_calls"
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        });
        let stream = replay(&c, true, 4);
        let chunks = events(&stream);
        assert_eq!(
            chunks[1]["choices"][0]["delta"],
            json!({"tool_calls":[{"index":0,"id":"call_a","type":"function",
                   "function":{"name":"get_weather","arguments":""}}]})
        );
        assert_eq!(
            chunks[2]["choices"][0]["delta"],
            json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]})
        );
        assert_eq!(assemble(stream.as_bytes()).unwrap(), c);
    }

    #[test]
    fn refusals_logprobs_and_several_choices_round_trip() {
        let logprobs = json!({"content": [
            {"token": "No", "logprob": -0.25, "bytes": [78, 111], "top_logprobs": []},
            {"token": ".", "logprob": -1.5e-7, "bytes": [46], "top_logprobs": []}
        ], "refusal": null});
        let c = json!({
            "id": "c2", "object": "chat.completion", "created": 2, "model": "m",
            "system_fingerprint": null,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "No.", "refusal": null},
                 "logprobs": logprobs, "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": null,
                                         "refusal": "I can't help with that."},
                 "logprobs": null, "finish_reason": "stop"},
                {"index": 2, "message": {"role": "assistant", "content": ""},
                 "finish_reason": "length", "stop_reason": 42}
            ],
            "usage": null,
            "prompt_filter_results": [{"prompt_index": 0}]
        });
        let stream = replay(&c, true, 2);
        assert_eq!(assemble(stream.as_bytes()).unwrap(), c);
    }

    #[test]
    fn replay_refuses_what_is_not_a_chat_completion() {
        let bad = [
            json!([]),
            json!({"object": "list", "data": []}),
            json!({"object": "chat.completion", "id": "x", "created": 1, "model": "m",
                   "choices": []}),
            json!({"object": "chat.completion", "id": "x", "created": 1, "model": "m",
                   "choices": [{"index": 0}]}),
            json!({"object": "chat.completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "message": {}}]}),
        ];
        for body in bad {
            assert_eq!(
                replay_chat(&serde_json::to_vec(&body).unwrap(), false),
                Err(SseError::NotChatCompletion),
                "{body}"
            );
        }
        assert_eq!(replay_chat(b"{", false), Err(SseError::NotChatCompletion));
    }

    /// A stream as OpenAI sends it (captured shape), with CRLF, a comment and a keep-alive.
    const OPENAI_STREAM: &str = concat!(
        ": keep-alive\r\n\r\n",
        "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1,",
        "\"model\":\"gpt-4o\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,",
        "\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},",
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1,",
        "\"model\":\"gpt-4o\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,",
        "\"delta\":{\"content\":\"Hi\"},\"logprobs\":null,\"finish_reason\":null}],",
        "\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1,",
        "\"model\":\"gpt-4o\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,",
        "\"delta\":{\"content\":\" there\"},\"logprobs\":null,\"finish_reason\":null}],",
        "\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1,",
        "\"model\":\"gpt-4o\",\"system_fingerprint\":\"fp_1\",\"choices\":[{\"index\":0,",
        "\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"chatcmpl-9\",\"object\":\"chat.completion.chunk\",\"created\":1,",
        "\"model\":\"gpt-4o\",\"system_fingerprint\":\"fp_1\",\"choices\":[],",
        "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\r\n\r\n",
        "data: [DONE]\r\n\r\n"
    );

    fn expected_openai_completion() -> Value {
        json!({
            "id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "system_fingerprint": "fp_1",
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": "Hi there", "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        })
    }

    #[test]
    fn an_openai_stream_assembles_at_every_split_point() {
        let bytes = OPENAI_STREAM.as_bytes();
        for split in 0..=bytes.len() {
            let mut asm = ChatAssembler::new();
            asm.push(&bytes[..split]).unwrap();
            asm.push(&bytes[split..]).unwrap();
            let got: Value = serde_json::from_slice(&asm.finish().unwrap()).unwrap();
            assert_eq!(got, expected_openai_completion(), "split at {split}");
        }
    }

    #[test]
    fn byte_at_a_time_with_lf_or_cr_line_ends() {
        for ending in ["\n", "\r"] {
            let stream = OPENAI_STREAM.replace("\r\n", ending);
            let mut asm = ChatAssembler::new();
            for b in stream.as_bytes() {
                asm.push(std::slice::from_ref(b)).unwrap();
            }
            let got: Value = serde_json::from_slice(&asm.finish().unwrap()).unwrap();
            assert_eq!(got, expected_openai_completion());
        }
    }

    #[test]
    fn multi_line_data_fields_are_joined() {
        let stream = concat!(
            "event: message\n",
            "data: {\"id\":\"x\",\"created\":1,\"model\":\"m\",\n",
            "data:\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\n",
            "data: \"content\":\"a\\nb\"},\"finish_reason\":\"stop\"}]}\n",
            "id: 7\nretry: 1000\n\n",
            "data: [DONE]"
        );
        let got = assemble(stream.as_bytes()).unwrap();
        assert_eq!(got["choices"][0]["message"]["content"], "a\nb");
        assert_eq!(got["object"], "chat.completion");
    }

    #[test]
    fn a_stream_without_done_or_finish_reason_is_incomplete() {
        let cut = OPENAI_STREAM.replace("data: [DONE]\r\n\r\n", "");
        assert_eq!(assemble(cut.as_bytes()), Err(SseError::Incomplete));
        let no_finish =
            OPENAI_STREAM.replace("\"finish_reason\":\"stop\"", "\"finish_reason\":null");
        assert_eq!(assemble(no_finish.as_bytes()), Err(SseError::Incomplete));
        assert_eq!(assemble(b"data: [DONE]\n\n"), Err(SseError::Incomplete));
        assert_eq!(assemble(b""), Err(SseError::Incomplete));
    }

    #[test]
    fn a_truncated_chunk_is_malformed() {
        let stream = &OPENAI_STREAM.as_bytes()[..200];
        assert!(matches!(assemble(stream), Err(SseError::Malformed(_))));
        assert!(matches!(
            assemble(b"data: {\"choices\":5}\n\n"),
            Err(SseError::Malformed(_))
        ));
    }

    #[test]
    fn upstream_errors_poison_the_assembly() {
        let err = b"data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
        let mut asm = ChatAssembler::new();
        assert_eq!(asm.push(err), Err(SseError::UpstreamError));
        assert_eq!(asm.push(b"data: [DONE]\n\n"), Err(SseError::UpstreamError));
        assert_eq!(asm.finish(), Err(SseError::UpstreamError));
        assert_eq!(
            assemble(b"event: error\ndata: {\"message\":\"x\"}\n\n"),
            Err(SseError::UpstreamError)
        );
    }

    #[test]
    fn repeated_ids_and_roles_are_not_concatenated() {
        let stream = concat!(
            "data: {\"id\":\"x\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,",
            "\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",",
            "\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\"}}]}}]}\n\n",
            "data: {\"id\":\"x\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,",
            "\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,",
            "\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"arguments\":\"}\"}}]},",
            "\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let got = assemble(stream.as_bytes()).unwrap();
        assert_eq!(
            got["choices"][0]["message"],
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]})
        );
    }

    #[test]
    fn split_chars_never_splits_a_character() {
        assert_eq!(split_chars("", 3), Vec::<&str>::new());
        assert_eq!(split_chars("abcdefg", 3), ["abc", "def", "g"]);
        assert_eq!(split_chars("é😀ab", 1), ["é", "😀", "a", "b"]);
    }
}
