//! Replay and assembly, each alone and round trip.

use super::replay::split_chars;
use super::*;
use serde_json::Value;
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
    let no_finish = OPENAI_STREAM.replace("\"finish_reason\":\"stop\"", "\"finish_reason\":null");
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
