//! Properties of the shared contract: keys depend on exactly what they should (meaning, tenant,
//! route) and on nothing else (key order, whitespace, number and string spelling, dropped
//! fields); canonical forms are fixed points; SSE replay and assembly are inverses.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: a panic is the failure report"
)]

use gateway_common::canonical::{
    DEFAULT_MAX_BODY_BYTES, DROPPED_FIELDS, canonicalize, parse_request,
};
use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_common::sse::{ChatAssembler, replay_chat_with};
use proptest::prelude::*;
use serde_json::{Value, json};

const SECRET: &[u8] = b"property-test-secret";
const TWO_POW_53: f64 = 9_007_199_254_740_992.0;

/// A JSON document as the tests build it; objects have unique keys in a given order.
#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn fields_mut(&mut self) -> &mut Vec<(String, J)> {
        match self {
            J::Obj(fields) => fields,
            _ => panic!("not an object"),
        }
    }
}

/// Drives the spelling choices of one rendering: a small deterministic generator, so a failing
/// case shrinks to a seed.
struct Style(u64);

impl Style {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }

    fn ws(&mut self, out: &mut String) {
        out.push_str(["", "", " ", "\n", "\t", "\r\n  "][self.next(6)]);
    }
}

fn render(j: &J, style: &mut Style) -> String {
    let mut out = String::new();
    render_into(j, style, &mut out);
    out
}

fn render_into(j: &J, style: &mut Style, out: &mut String) {
    style.ws(out);
    match j {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Int(n) => {
            let exact = (n.unsigned_abs() as f64) < TWO_POW_53 / 16.0;
            match style.next(4) {
                1 if exact => out.push_str(&format!("{n}.0")),
                2 if exact => out.push_str(&format!("{n}e0")),
                3 if exact => out.push_str(&format!("{}0E-1", n)),
                _ => out.push_str(&n.to_string()),
            }
        }
        J::Float(x) => match style.next(3) {
            0 => out.push_str(ryu::Buffer::new().format_finite(*x)),
            1 => out.push_str(&format!("{x:e}")),
            _ => out.push_str(&format!("{x}")),
        },
        J::Str(s) => render_string(s, style, out),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    style.ws(out);
                    out.push(',');
                }
                render_into(item, style, out);
            }
            style.ws(out);
            out.push(']');
        }
        J::Obj(fields) => {
            let mut order: Vec<usize> = (0..fields.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, style.next(i + 1));
            }
            out.push('{');
            for (n, &i) in order.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                style.ws(out);
                render_string(&fields[i].0, style, out);
                style.ws(out);
                out.push(':');
                render_into(&fields[i].1, style, out);
                style.ws(out);
            }
            out.push('}');
        }
    }
}

/// Either serde_json's spelling or every character as `\uXXXX` (surrogate pairs beyond the BMP).
fn render_string(s: &str, style: &mut Style, out: &mut String) {
    if style.next(2) == 0 {
        out.push_str(&serde_json::to_string(s).unwrap());
        return;
    }
    out.push('"');
    for unit in s.encode_utf16() {
        out.push_str(&format!("\\u{unit:04X}"));
    }
    out.push('"');
}

fn key_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,8}",
        any::<String>().prop_map(|s| s.chars().take(6).collect()),
    ]
}

/// Finite floats that are not integral at 2^53 or beyond (those make a body uncacheable).
fn exact_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        (any::<i32>(), -30i32..8).prop_map(|(m, e)| f64::from(m) * 10f64.powi(e)),
        -1e6..1e6f64,
    ]
    .prop_filter("exact", |x| x.is_finite() && x.abs() < TWO_POW_53)
}

fn json(float: BoxedStrategy<f64>) -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::Int),
        float.prop_map(J::Float),
        any::<String>().prop_map(J::Str),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Arr),
            prop::collection::btree_map(key_name(), inner, 0..4)
                .prop_map(|m| J::Obj(m.into_iter().collect())),
        ]
    })
}

fn cacheable_json() -> impl Strategy<Value = J> {
    json(exact_float().boxed())
}

/// Any JSON, including numbers with no exact form.
fn any_json() -> impl Strategy<Value = J> {
    json(
        prop_oneof![
            exact_float(),
            any::<f64>().prop_filter("finite", |x| x.is_finite())
        ]
        .boxed(),
    )
}

fn message() -> impl Strategy<Value = J> {
    ("[a-z]{1,10}", cacheable_json()).prop_map(|(role, content)| {
        J::Obj(vec![
            ("role".to_owned(), J::Str(role)),
            ("content".to_owned(), content),
        ])
    })
}

/// A valid chat request: model, messages and extra kept fields (never a dropped one).
fn chat_request() -> impl Strategy<Value = J> {
    (
        "[a-z0-9.-]{1,12}",
        prop::collection::vec(message(), 1..3),
        prop::collection::btree_map(key_name(), cacheable_json(), 0..4),
    )
        .prop_map(|(model, messages, extra)| {
            let mut fields = vec![
                ("model".to_owned(), J::Str(model)),
                ("messages".to_owned(), J::Arr(messages)),
            ];
            fields.extend(
                extra
                    .into_iter()
                    .filter(|(k, _)| k != "model" && k != "messages")
                    .filter(|(k, _)| !DROPPED_FIELDS.contains(&k.as_str())),
            );
            J::Obj(fields)
        })
}

fn dropped_field() -> impl Strategy<Value = (String, J)> {
    prop_oneof![
        any::<bool>().prop_map(|b| ("stream".to_owned(), J::Bool(b))),
        any::<bool>().prop_map(|b| {
            let options = J::Obj(vec![("include_usage".to_owned(), J::Bool(b))]);
            ("stream_options".to_owned(), options)
        }),
        any::<String>().prop_map(|s| ("user".to_owned(), J::Str(s))),
        prop::collection::btree_map("[a-z]{1,5}", any::<String>(), 0..3).prop_map(|m| {
            let m = m.into_iter().map(|(k, v)| (k, J::Str(v))).collect();
            ("metadata".to_owned(), J::Obj(m))
        }),
        any::<bool>().prop_map(|b| ("store".to_owned(), J::Bool(b))),
    ]
}

fn chat_key(tenant: &str, body: &str) -> CacheKey {
    let parsed = parse_request(
        Route::ChatCompletions,
        body.as_bytes(),
        DEFAULT_MAX_BODY_BYTES,
    )
    .unwrap_or_else(|e| panic!("{e}: {body}"));
    let canonical = parsed.canonical.expect("cacheable");
    CacheKey::derive(SECRET, tenant, Route::ChatCompletions, &canonical)
}

fn canonical_of(j: &J) -> Vec<u8> {
    canonicalize(render(j, &mut Style(0)).as_bytes())
        .unwrap()
        .expect("exact")
}

proptest! {
    #[test]
    fn reordering_keys_or_changing_whitespace_never_changes_a_key(
        request in chat_request(), a in any::<u64>(), b in any::<u64>(),
    ) {
        let one = render(&request, &mut Style(a));
        let two = render(&request, &mut Style(b));
        prop_assert_eq!(chat_key("t", &one), chat_key("t", &two), "{} vs {}", one, two);
    }

    #[test]
    fn changing_a_kept_field_always_changes_the_key(
        request in chat_request(),
        pick in any::<prop::sample::Index>(),
        replacement in cacheable_json(),
        seed in any::<u64>(),
    ) {
        let mut changed = request.clone();
        let fields = changed.fields_mut();
        let i = pick.index(fields.len());
        let (name, value) = &mut fields[i];
        match name.as_str() {
            "model" => {
                let J::Str(model) = value else { unreachable!() };
                model.push('x');
            }
            "messages" => {
                let J::Arr(messages) = value else { unreachable!() };
                let J::Obj(message) = &mut messages[0] else { unreachable!() };
                message[1].1 = J::Arr(vec![message[1].1.clone()]);
            }
            _ => {
                prop_assume!(canonical_of(value) != canonical_of(&replacement));
                *value = replacement;
            }
        }
        let before = chat_key("t", &render(&request, &mut Style(seed)));
        let after = chat_key("t", &render(&changed, &mut Style(seed)));
        prop_assert_ne!(before, after);
    }

    #[test]
    fn the_tenant_always_changes_the_key(
        request in chat_request(), one in "[a-z0-9_-]{1,64}", two in "[a-z0-9_-]{1,64}",
    ) {
        prop_assume!(one != two);
        let body = render(&request, &mut Style(1));
        let (k1, k2) = (chat_key(&one, &body), chat_key(&two, &body));
        prop_assert_ne!(k1.hex(), k2.hex());
    }

    #[test]
    fn the_route_always_changes_the_key(request in chat_request(), input in "[a-z ]{1,20}") {
        let mut request = request;
        // Fields some route requires or types strictly: replaced by values every route takes.
        let strict = ["prompt", "input", "max_tokens", "store", "system", "background", "previous_response_id"];
        request.fields_mut().retain(|(k, _)| !strict.contains(&k.as_str()));
        request.fields_mut().push(("prompt".to_owned(), J::Str(input.clone())));
        request.fields_mut().push(("input".to_owned(), J::Str(input)));
        request.fields_mut().push(("max_tokens".to_owned(), J::Int(16)));
        let body = render(&request, &mut Style(2));
        let keys: Vec<String> = Route::ALL
            .iter()
            .map(|&route| {
                let parsed = parse_request(route, body.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap();
                CacheKey::derive(SECRET, "t", route, &parsed.canonical.unwrap()).hex().to_owned()
            })
            .collect();
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                prop_assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn adding_or_changing_dropped_fields_never_changes_the_key(
        request in chat_request(),
        dropped in prop::collection::btree_map(
            "stream|stream_options|user|metadata|store", Just(()), 0..5),
        values in prop::collection::vec(dropped_field(), 0..10),
        seed in any::<u64>(),
    ) {
        let mut with = request.clone();
        let names: Vec<String> = dropped.into_keys().collect();
        for (name, value) in values.into_iter().filter(|(n, _)| names.contains(n)) {
            let fields = with.fields_mut();
            fields.retain(|(k, _)| *k != name);
            fields.push((name, value));
        }
        prop_assert_eq!(
            chat_key("t", &render(&request, &mut Style(seed))),
            chat_key("t", &render(&with, &mut Style(seed)))
        );
    }

    #[test]
    fn canonicalize_is_idempotent(doc in any_json(), seed in any::<u64>()) {
        let text = render(&doc, &mut Style(seed));
        let canonical = canonicalize(text.as_bytes()).unwrap();
        if let Some(canonical) = canonical {
            prop_assert_eq!(canonicalize(&canonical).unwrap(), Some(canonical.clone()));
            let as_serde: Value = serde_json::from_slice(&canonical).unwrap();
            let from_text: Value = serde_json::from_str(&text).unwrap();
            prop_assert!(json_equivalent(&as_serde, &from_text), "{} vs {}", as_serde, from_text);
        }
    }

    #[test]
    fn strings_are_escaped_exactly_like_serde_json(s in any::<String>(), seed in any::<u64>()) {
        let mut text = String::from("[");
        render_string(&s, &mut Style(seed), &mut text);
        text.push(']');
        let expected = format!("[{}]", serde_json::to_string(&s).unwrap());
        prop_assert_eq!(canonicalize(text.as_bytes()).unwrap(), Some(expected.into_bytes()));
    }

    #[test]
    fn replay_then_assemble_gives_back_the_completion(
        completion in chat_completion(),
        chunk_chars in 1usize..8,
        include_usage in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        crlf in any::<bool>(),
    ) {
        let bytes = serde_json::to_vec(&completion).unwrap();
        let mut stream = replay_chat_with(&bytes, include_usage, chunk_chars).unwrap();
        if crlf {
            stream = String::from_utf8(stream).unwrap().replace('\n', "\r\n").into_bytes();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut assembler = ChatAssembler::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            assembler.push(&stream[start..cut]).unwrap();
            start = cut;
        }
        let assembled: Value = serde_json::from_slice(&assembler.finish().unwrap()).unwrap();
        let mut expected = completion;
        if !include_usage {
            expected.as_object_mut().unwrap().remove("usage");
        }
        prop_assert_eq!(assembled, expected);
    }
}

/// Same structure and strings, and numbers equal as f64 (canonical numbers are exact for the
/// value serde_json reads, so they must agree on it).
fn json_equivalent(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equivalent(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equivalent(v, w)))
        }
        _ => a == b,
    }
}

/// `None` = field absent, `Some(None)` = null.
fn optional<T: Strategy>(s: T) -> impl Strategy<Value = Option<Option<T::Value>>> {
    prop::option::of(prop::option::of(s))
}

fn put<T: Into<Value>>(map: &mut serde_json::Map<String, Value>, key: &str, v: Option<Option<T>>) {
    if let Some(v) = v {
        map.insert(key.to_owned(), v.map_or(Value::Null, Into::into));
    }
}

fn tool_call() -> impl Strategy<Value = Value> {
    ("call_[a-zA-Z0-9]{0,8}", "[a-z_]{1,10}", any::<String>()).prop_map(|(id, name, args)| {
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
    })
}

fn logprobs() -> impl Strategy<Value = Value> {
    prop::collection::vec((any::<String>(), -100.0..0.0f64), 0..4).prop_map(|tokens| {
        let content: Vec<Value> = tokens
            .into_iter()
            .map(|(token, logprob)| {
                let bytes: Vec<u8> = token.bytes().collect();
                json!({"token": token, "logprob": logprob, "bytes": bytes, "top_logprobs": []})
            })
            .collect();
        json!({"content": content, "refusal": null})
    })
}

fn choice() -> impl Strategy<Value = (serde_json::Map<String, Value>, Option<Option<Value>>)> {
    (
        optional(any::<String>()),
        optional(any::<String>()),
        prop::option::of(prop::collection::vec(tool_call(), 0..3)),
        optional(logprobs()),
        prop::sample::select(vec!["stop", "length", "tool_calls", "content_filter"]),
        any::<bool>(),
    )
        .prop_map(
            |(content, refusal, tool_calls, logprobs, finish, annotations)| {
                let mut message = serde_json::Map::new();
                message.insert("role".to_owned(), json!("assistant"));
                put(&mut message, "content", content);
                put(&mut message, "refusal", refusal);
                if let Some(calls) = tool_calls {
                    message.insert("tool_calls".to_owned(), Value::Array(calls));
                }
                if annotations {
                    message.insert("annotations".to_owned(), json!([]));
                }
                let mut choice = serde_json::Map::new();
                choice.insert("message".to_owned(), Value::Object(message));
                choice.insert("finish_reason".to_owned(), json!(finish));
                (choice, logprobs)
            },
        )
}

fn chat_completion() -> impl Strategy<Value = Value> {
    (
        "chatcmpl-[a-zA-Z0-9]{1,10}",
        any::<u32>(),
        "[a-z0-9.-]{1,12}",
        optional("fp_[a-f0-9]{6}"),
        optional(prop::sample::select(vec!["default", "flex"])),
        prop::collection::vec(choice(), 1..4),
        optional((0u64..10_000, 0u64..10_000)),
    )
        .prop_map(|(id, created, model, fingerprint, tier, choices, usage)| {
            let mut c = serde_json::Map::new();
            c.insert("id".to_owned(), json!(id));
            c.insert("object".to_owned(), json!("chat.completion"));
            c.insert("created".to_owned(), json!(created));
            c.insert("model".to_owned(), json!(model));
            put(&mut c, "system_fingerprint", fingerprint);
            put(&mut c, "service_tier", tier);
            let choices: Vec<Value> = choices
                .into_iter()
                .enumerate()
                .map(|(i, (mut choice, logprobs))| {
                    choice.insert("index".to_owned(), json!(i));
                    put(&mut choice, "logprobs", logprobs);
                    Value::Object(choice)
                })
                .collect();
            c.insert("choices".to_owned(), Value::Array(choices));
            put(
                &mut c,
                "usage",
                usage.map(|u| {
                    u.map(|(p, q)| {
                        json!({"prompt_tokens": p, "completion_tokens": q, "total_tokens": p + q})
                    })
                }),
            );
            Value::Object(c)
        })
}
