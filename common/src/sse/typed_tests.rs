//! Tests of the typed streams (Responses, Messages): replay shapes, round trips through the
//! assemblers at any split, and what makes an assembly fail.

use serde_json::{Value, json};

use super::*;
use crate::route::Route;

/// `(name, data)` of each event; every event has exactly one `event:` and one `data:` line.
fn events(sse: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(sse).unwrap();
    assert!(text.ends_with("\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_owned();
            let data = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            (name, data)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

fn response() -> Value {
    json!({
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
        "model": "gpt-4o-mini", "error": null, "incomplete_details": null,
        "output": [{
            "id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
            "content": [{ "type": "output_text", "text": "Héllo, wörld! A longer answer here.", "annotations": [], "logprobs": [] }],
        }],
        "usage": { "input_tokens": 5, "output_tokens": 7, "total_tokens": 12,
                   "input_tokens_details": { "cached_tokens": 0 }, "output_tokens_details": { "reasoning_tokens": 0 } },
    })
}

fn message() -> Value {
    json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": [
            { "type": "thinking", "thinking": "Let me think about it.", "signature": "sig==" },
            { "type": "text", "text": "Héllo, wörld! I will call a tool." },
            { "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": { "city": "Zürich", "days": [1, 2] } },
        ],
        "stop_reason": "tool_use", "stop_sequence": null,
        "usage": { "input_tokens": 20, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4, "output_tokens": 30 },
    })
}

fn assemble(route: Route, sse: &[u8], piece: usize) -> Result<Value, SseError> {
    let mut assembler = Assembler::for_route(route).unwrap();
    for chunk in sse.chunks(piece) {
        assembler.push(chunk)?;
    }
    assembler
        .finish()
        .map(|body| serde_json::from_slice(&body).unwrap())
}

#[test]
fn a_replayed_response_is_the_typed_event_sequence_the_sdk_parses() {
    let sse = replay_responses_with(response().to_string().as_bytes(), 8).unwrap();
    let events = events(&sse);
    let names = names(&events);
    assert_eq!(
        names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
    );
    assert_eq!(
        names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i as u64);
    }
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[0].1["response"]["output"], json!([]));
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| {
            assert_eq!(d["item_id"], "msg_1");
            assert_eq!(d["content_index"], 0);
            d["delta"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Héllo, wörld! A longer answer here.");
    assert_eq!(events.last().unwrap().1["response"], response());
}

#[test]
fn a_replayed_response_assembles_back_to_itself_at_any_split() {
    let mut with_call = response();
    with_call["output"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}" }));
    for body in [response(), with_call] {
        let sse = replay(Route::Responses, body.to_string().as_bytes(), false).unwrap();
        for piece in [1, 7, sse.len()] {
            assert_eq!(assemble(Route::Responses, &sse, piece).unwrap(), body);
        }
    }
}

#[test]
fn a_response_stream_without_completed_or_with_an_error_is_not_assembled() {
    let sse = replay_responses(response().to_string().as_bytes()).unwrap();
    let text = String::from_utf8(sse).unwrap();
    let cut = &text[..text.find("event: response.completed").unwrap()];
    assert_eq!(
        assemble(Route::Responses, cut.as_bytes(), 64),
        Err(SseError::Incomplete)
    );
    let failed = format!(
        "{cut}event: error\ndata: {{\"type\":\"error\",\"code\":\"x\",\"message\":\"m\",\"sequence_number\":9}}\n\n"
    );
    assert_eq!(
        assemble(Route::Responses, failed.as_bytes(), 64),
        Err(SseError::UpstreamError)
    );
    let incomplete = format!(
        "{cut}event: response.incomplete\ndata: {{\"type\":\"response.incomplete\",\"response\":{{}}}}\n\n"
    );
    assert_eq!(
        assemble(Route::Responses, incomplete.as_bytes(), 64),
        Err(SseError::Incomplete)
    );
}

#[test]
fn the_response_assembler_reports_usage_once_completed() {
    let sse = replay_responses(response().to_string().as_bytes()).unwrap();
    let mut assembler = ResponsesAssembler::new();
    assembler.push(&sse).unwrap();
    let usage = assembler.usage().unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (5, 7, 12)
    );
}

#[test]
fn a_replayed_message_is_the_event_sequence_anthropic_sends() {
    let sse = replay_messages_with(message().to_string().as_bytes(), 8).unwrap();
    let events = events(&sse);
    let names = names(&events);
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let start = &events[0].1["message"];
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["usage"]["input_tokens"], 20);
    assert_eq!(start["usage"]["output_tokens"], 1);
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 30);
    let text: String = events
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "text_delta")
        .map(|(_, d)| {
            assert_eq!(d["index"], 1);
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Héllo, wörld! I will call a tool.");
    let tool_start = events
        .iter()
        .find(|(_, d)| d["content_block"]["type"] == "tool_use")
        .unwrap();
    assert_eq!(tool_start.1["content_block"]["input"], json!({}));
}

#[test]
fn a_replayed_message_assembles_back_to_itself_at_any_split() {
    let body = message();
    let sse = replay(Route::Messages, body.to_string().as_bytes(), false).unwrap();
    for piece in [1, 5, sse.len()] {
        assert_eq!(assemble(Route::Messages, &sse, piece).unwrap(), body);
    }
    let crlf = String::from_utf8(sse).unwrap().replace('\n', "\r\n");
    assert_eq!(assemble(Route::Messages, crlf.as_bytes(), 3).unwrap(), body);
}

/// A stream as Anthropic documents it: usage split between `message_start` (input) and
/// `message_delta` (output).
const LIVE: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-haiku-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

#[test]
fn a_live_message_stream_assembles_with_usage_from_start_and_delta() {
    let mut assembler = MessagesAssembler::new();
    assembler.push(LIVE.as_bytes()).unwrap();
    let usage = assembler.usage().unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (25, 15, 40)
    );
    let message: Value = serde_json::from_slice(&assembler.finish().unwrap()).unwrap();
    assert_eq!(
        message["content"],
        json!([{ "type": "text", "text": "Hello!" }])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(
        message["usage"],
        json!({ "input_tokens": 25, "output_tokens": 15 })
    );
}

#[test]
fn a_message_stream_that_stops_early_errs_or_holds_unknown_deltas_is_not_assembled() {
    let cut = &LIVE[..LIVE.find("event: message_stop").unwrap()];
    assert_eq!(
        assemble(Route::Messages, cut.as_bytes(), 10),
        Err(SseError::Incomplete)
    );
    let error = format!(
        "{cut}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n"
    );
    assert_eq!(
        assemble(Route::Messages, error.as_bytes(), 10),
        Err(SseError::UpstreamError)
    );
    let unknown = LIVE.replace("text_delta", "hologram_delta");
    assert!(matches!(
        assemble(Route::Messages, unknown.as_bytes(), 10),
        Err(SseError::Malformed(_))
    ));
}

#[test]
fn routes_without_a_stream_form_do_not_replay_and_bodies_of_another_api_are_refused() {
    assert!(Assembler::for_route(Route::Embeddings).is_none());
    assert!(replay(Route::Completions, b"{}", false).is_err());
    let message = message().to_string();
    assert!(matches!(
        replay(Route::Responses, message.as_bytes(), false),
        Err(SseError::NotReplayable(_))
    ));
    let response = response().to_string();
    assert!(matches!(
        replay(Route::Messages, response.as_bytes(), false),
        Err(SseError::NotReplayable(_))
    ));
}
