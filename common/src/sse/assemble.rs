//! Assembling a streamed chat completion back into one `chat.completion`, event by event, as the
//! OpenAI SDKs accumulate deltas. Pure: bytes in, bytes out; buffers at most one event.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::SseError;
use super::events::{EventReader, SseEvent};

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
    reader: EventReader,
    /// Events read and not yet absorbed (reused between pushes).
    events: Vec<SseEvent>,
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
        self.reader.push(bytes, &mut self.events);
        let result = self.take_events();
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
        self.reader.finish(&mut self.events);
        self.take_events()?;
        if !self.done {
            return Err(SseError::Incomplete);
        }
        self.completion.build()
    }

    fn take_events(&mut self) -> Result<(), SseError> {
        let mut events = std::mem::take(&mut self.events);
        let result = events.drain(..).try_for_each(|event| self.dispatch(event));
        self.events = events;
        result
    }

    fn dispatch(&mut self, event: SseEvent) -> Result<(), SseError> {
        if event.name == "error" {
            return Err(SseError::UpstreamError);
        }
        if self.done {
            return Ok(());
        }
        let text = event.data.trim_ascii();
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
