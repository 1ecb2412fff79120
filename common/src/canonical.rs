//! Strict parsing of request bodies and their canonical form, the bytes a cache key is made of.
//! Must stay deterministic and pure: the edge and the origin have to produce the same bytes for
//! the same body, so nothing here may depend on the clock, the platform or parser shortcuts.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;
use crate::policy::Bypass;
use crate::route::Route;

mod apis;

/// The default request body limit, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The fields that never change the answer; dropped (top level only) before keying. The
/// Responses and Messages APIs have their own lists (`dropped_fields`).
pub const DROPPED_FIELDS: &[&str] = &["stream", "stream_options", "user", "metadata", "store"];

/// Why a request body was refused. Every variant is a client error; `to_api_error` gives the
/// OpenAI-shaped answer. Messages never echo body content beyond key paths and field names.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The body is larger than the limit (413).
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The body is not one well-formed JSON document (400).
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// An object holds the same key twice; names its path, e.g. `messages[0].role` (400).
    #[error("duplicate key in JSON object: {0}")]
    DuplicateKey(String),
    /// The top level is not a JSON object (400).
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// A required field is absent (400, param = field).
    #[error("missing required parameter: {0}")]
    MissingField(&'static str),
    /// A field has the wrong type or an unacceptable value (400, param = field).
    #[error("invalid value for {field}: {reason}")]
    InvalidField { field: String, reason: String },
}

impl RequestError {
    /// The OpenAI-shaped error this maps to.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            RequestError::TooLarge { limit } => ApiError::too_large(*limit),
            RequestError::InvalidJson(msg) => ApiError::bad_request(
                format!("We could not parse the JSON body of your request: {msg}"),
                None,
            ),
            RequestError::DuplicateKey(path) => ApiError::bad_request(
                format!("The JSON body holds the key '{path}' more than once."),
                Some(path),
            ),
            RequestError::NotAnObject => {
                ApiError::bad_request("The request body must be a JSON object.", None)
            }
            RequestError::MissingField(field) => ApiError::bad_request(
                format!("Missing required parameter: '{field}'."),
                Some(field),
            ),
            RequestError::InvalidField { field, reason } => ApiError::bad_request(
                format!("Invalid value for '{field}': {reason}."),
                Some(field),
            ),
        }
    }
}

/// A parsed, validated request body.
#[derive(Debug, Clone)]
pub struct ParsedRequest {
    pub route: Route,
    /// The `model` field (non-empty).
    pub model: String,
    /// Body `"stream": true`.
    pub stream: bool,
    /// Body `stream_options.include_usage`.
    pub include_usage: bool,
    /// The answer is drawn at random: `temperature` absent (the providers' default is 1) or
    /// above 0, and no `seed`. Embeddings are never sampled. The tenant's `cache_sampled`
    /// decides whether such answers are cached (`policy::plan`).
    pub sampled: bool,
    /// Body `"store": true`: the client asks the provider to keep the completion, a side
    /// effect a cached answer would silently drop (`policy::plan`). On `/v1/responses` an
    /// absent `store` counts as true, OpenAI's default there.
    pub store: bool,
    /// The answer depends on state kept by the provider or is produced asynchronously
    /// (`/v1/responses` with `previous_response_id`, `conversation` or `background: true`):
    /// never read from nor written to the cache, whatever the policy (`policy::plan`).
    pub never_cached: Option<Bypass>,
    /// Canonical bytes (sorted keys, no whitespace, exact numbers, dropped fields removed).
    /// None when the body holds a number that cannot be represented exactly: the request is
    /// served but never cached (bypass), never a collision.
    pub canonical: Option<Vec<u8>>,
    /// What this request says for the members its answer echoes outside the key (Responses:
    /// `metadata`, `user`, `store`, ...), to rewrite a cached answer with; `None` on routes
    /// whose answers echo nothing unkeyed.
    pub echo: Option<crate::echo::Echo>,
}

/// Parse and validate a request body for `route`, and compute its canonical form.
///
/// Rejects bodies over `max_bytes`, malformed JSON, duplicate keys at any depth, trailing
/// garbage, a non-object top level, and missing or mistyped required fields (see API.md for
/// the per-route rules). A `null` `stream`, `stream_options` or `include_usage` counts as
/// absent, as it does for OpenAI.
pub fn parse_request(
    route: Route,
    body: &[u8],
    max_bytes: usize,
) -> Result<ParsedRequest, RequestError> {
    if body.len() > max_bytes {
        return Err(RequestError::TooLarge { limit: max_bytes });
    }
    let Value::Object(mut fields) = parse_strict(body)? else {
        return Err(RequestError::NotAnObject);
    };

    let model = match fields.get("model") {
        None => return Err(RequestError::MissingField("model")),
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(invalid("model", "must be a non-empty string")),
    };
    match route {
        Route::ChatCompletions => validate_messages(fields.get("messages"))?,
        Route::Completions => match fields.get("prompt") {
            None => return Err(RequestError::MissingField("prompt")),
            Some(Value::String(_) | Value::Array(_)) => {}
            Some(_) => return Err(invalid("prompt", "must be a string or an array")),
        },
        Route::Embeddings => match fields.get("input") {
            None => return Err(RequestError::MissingField("input")),
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::Array(a)) if !a.is_empty() => {}
            Some(_) => {
                return Err(invalid(
                    "input",
                    "must be a non-empty string or a non-empty array",
                ));
            }
        },
        Route::Responses => apis::validate_responses(&fields)?,
        Route::Messages => apis::validate_messages_request(&fields)?,
    }

    let stream = match fields.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "must be a boolean")),
    };
    let include_usage = match fields.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("stream_options.include_usage", "must be a boolean")),
        },
        Some(_) => return Err(invalid("stream_options", "must be an object")),
    };

    let sampled = route != Route::Embeddings && is_sampled(&fields);
    let store = match route {
        Route::Responses => apis::responses_store(&fields),
        Route::Messages => false,
        _ => matches!(fields.get("store"), Some(Value::Bool(true))),
    };
    let never_cached = match route {
        Route::Responses => apis::responses_never_cached(&fields),
        _ => None,
    };

    let echo = crate::echo::Echo::of(route, |name| {
        let value = serialize(fields.get(name)?)?;
        serde_json::from_slice(&value).ok()
    });
    for field in dropped_fields(route) {
        fields.remove(*field);
    }
    // Only some routes' answers can be replayed as a stream, so a streamed request on another
    // route is served but never cached.
    let canonical = if stream && !route.replays_streams() {
        None
    } else {
        serialize(&Value::Object(fields))
    };

    Ok(ParsedRequest {
        route,
        model,
        stream,
        include_usage,
        sampled,
        store,
        never_cached,
        canonical,
        echo,
    })
}

/// The top-level fields dropped before keying on `route`: fields that change how an answer
/// is delivered, billed or kept, never what it says.
pub fn dropped_fields(route: Route) -> &'static [&'static str] {
    match route {
        Route::Responses => apis::RESPONSES_DROPPED_FIELDS,
        Route::Messages => apis::MESSAGES_DROPPED_FIELDS,
        _ => DROPPED_FIELDS,
    }
}

/// Randomness decides the answer: no `seed`, and `temperature` absent or null (the providers
/// default to 1), or a number above 0. A non-numeric temperature is left for the provider to
/// refuse, and counts as sampled.
fn is_sampled(fields: &BTreeMap<String, Value>) -> bool {
    if !matches!(fields.get("seed"), None | Some(Value::Null)) {
        return false;
    }
    match fields.get("temperature") {
        Some(Value::Number(Number::U64(t))) => *t > 0,
        Some(Value::Number(Number::I64(t))) => *t > 0,
        Some(Value::Number(Number::F64(t))) => *t > 0.0,
        _ => true,
    }
}

/// Canonicalize any JSON document (no field dropping, no validation, no size limit) — exposed
/// for tests and fuzzing. `Ok(None)` means the document holds a number that cannot be
/// represented exactly.
pub fn canonicalize(body: &[u8]) -> Result<Option<Vec<u8>>, RequestError> {
    Ok(serialize(&parse_strict(body)?))
}

fn invalid(field: &str, reason: &str) -> RequestError {
    RequestError::InvalidField {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

fn validate_messages(messages: Option<&Value>) -> Result<(), RequestError> {
    let messages = match messages {
        None => return Err(RequestError::MissingField("messages")),
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(_) => return Err(invalid("messages", "must be a non-empty array")),
    };
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(invalid(&format!("messages[{i}]"), "must be an object"));
        };
        match message.get("role") {
            Some(Value::String(_)) => {}
            None => {
                return Err(RequestError::InvalidField {
                    field: format!("messages[{i}].role"),
                    reason: "is required".to_owned(),
                });
            }
            Some(_) => return Err(invalid(&format!("messages[{i}].role"), "must be a string")),
        }
    }
    Ok(())
}

/// A JSON value as read by the strict parser. Objects are kept sorted by key bytes (the order
/// of `String`'s `Ord`), which is the canonical order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Value>),
    Object(BTreeMap<String, Value>),
}

/// A number as serde_json read it: integer tokens that fit stay exact; everything else
/// (fractions, exponents, integers too large for 64 bits) is an f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Number {
    U64(u64),
    I64(i64),
    F64(f64),
}

/// Parse one JSON document strictly: duplicate keys at any depth and trailing garbage are
/// errors, and serde_json's recursion limit applies. Relies on serde_json's `float_roundtrip`
/// feature (enabled in Cargo.toml) so every decimal reads as its nearest f64.
pub(crate) fn parse_strict(body: &[u8]) -> Result<Value, RequestError> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = ValueSeed {
        path: None,
        duplicate: &duplicate,
    }
    .deserialize(&mut de)
    .and_then(|value| de.end().map(|()| value));
    parsed.map_err(|err| match duplicate.into_inner() {
        Some(path) => RequestError::DuplicateKey(path),
        None => RequestError::InvalidJson(err.to_string()),
    })
}

/// 2^53: every integer of smaller magnitude has exactly one f64, so an integral float below it
/// can be written as an integer without changing its meaning. At 2^53 and above the f64 may be
/// the rounding of a different integer token (9007199254740993.0 reads as 2^53), so such a
/// number makes the body uncacheable rather than risk a collision.
const EXACT_FLOAT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// The canonical bytes, or `None` if a number cannot be written exactly.
fn serialize(value: &Value) -> Option<Vec<u8>> {
    let mut out = String::new();
    write_value(&mut out, value).ok()?;
    Some(out.into_bytes())
}

/// Marks a number that has no exact canonical form.
struct Inexact;

fn write_value(out: &mut String, value: &Value) -> Result<(), Inexact> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, *n)?,
        Value::String(s) => write_json_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item)?;
            }
            out.push(']');
        }
        Value::Object(fields) => {
            out.push('{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(out, key);
                out.push(':');
                write_value(out, item)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_number(out: &mut String, n: Number) -> Result<(), Inexact> {
    match n {
        Number::U64(u) => out.push_str(&u.to_string()),
        Number::I64(i) => out.push_str(&i.to_string()),
        Number::F64(x) => {
            if !x.is_finite() {
                return Err(Inexact);
            }
            if x.fract() == 0.0 {
                if x.abs() >= EXACT_FLOAT_INTEGER_LIMIT {
                    return Err(Inexact);
                }
                // Exact: |x| < 2^53 and integral. `-0.0 as i64` is 0, so -0.0 reads as 0.
                out.push_str(&(x as i64).to_string());
            } else {
                out.push_str(ryu::Buffer::new().format_finite(x));
            }
        }
    }
    Ok(())
}

/// Write `s` as a JSON string exactly as `serde_json::to_string(&str)` does: `"` and `\`
/// escaped, control characters as `\b \t \n \f \r` or `\u00xx` (lowercase hex), everything
/// else (including non-ASCII) as raw UTF-8.
pub fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    write_json_string_contents(out, s);
    out.push('"');
}

/// [`write_json_string`] without the quotes, for a string written in pieces (e.g. through
/// `fmt::Write`).
pub fn write_json_string_contents(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Most strings need no escape: one pass that the compiler vectorises (no early exit)
    // decides it, and the string is copied whole.
    let escapes = s.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !escapes {
        out.push_str(s);
        return;
    }
    let mut start = 0;
    for (i, byte) in s.bytes().enumerate() {
        let short = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0C => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1F => "",
            _ => continue,
        };
        // Escaped bytes are ASCII, so `i` is always a char boundary.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0F)]));
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// One step of the path to a value, for duplicate-key messages.
#[derive(Clone, Copy)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// The path to the value being parsed, as a stack-allocated linked list: built only when a
/// duplicate is found, so the common case pays nothing for it.
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    segment: Segment<'a>,
}

fn render_path(path: &Path<'_>) -> String {
    let mut segments = Vec::new();
    let mut node = Some(path);
    while let Some(n) = node {
        segments.push(n.segment);
        node = n.parent;
    }
    let mut out = String::new();
    for segment in segments.iter().rev() {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// Deserializes one `Value`, knowing where it sits. A duplicate key is reported through
/// `duplicate` because serde's error type cannot carry a distinguishable variant.
struct ValueSeed<'p, 'd> {
    path: Option<&'p Path<'p>>,
    duplicate: &'d RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(Number::U64(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(Number::I64(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(Number::F64(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let node = Path {
                parent: self.path,
                segment: Segment::Index(items.len()),
            };
            let seed = ValueSeed {
                path: Some(&node),
                duplicate: self.duplicate,
            };
            match seq.next_element_seed(seed)? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let node = Path {
                parent: self.path,
                segment: Segment::Key(&key),
            };
            // Checked before the value is read, so the first duplicate is the one reported.
            if fields.contains_key(&key) {
                let path = render_path(&node);
                *self.duplicate.borrow_mut() = Some(path.clone());
                return Err(de::Error::custom(format_args!("duplicate key {path}")));
            }
            let value = map.next_value_seed(ValueSeed {
                path: Some(&node),
                duplicate: self.duplicate,
            })?;
            fields.insert(key, value);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(body: &str) -> Option<String> {
        canonicalize(body.as_bytes())
            .unwrap()
            .map(|c| String::from_utf8(c).unwrap())
    }

    fn chat(body: &str) -> Result<ParsedRequest, RequestError> {
        parse_request(
            Route::ChatCompletions,
            body.as_bytes(),
            DEFAULT_MAX_BODY_BYTES,
        )
    }

    #[test]
    fn sampling_is_read_from_temperature_and_seed() {
        let sampled = |extra: &str| {
            chat(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#
            ))
            .unwrap()
            .sampled
        };
        assert!(
            sampled(""),
            "no temperature: the provider default (1) samples"
        );
        assert!(sampled(r#","temperature":null"#));
        assert!(sampled(r#","temperature":0.7"#));
        assert!(sampled(r#","temperature":1"#));
        assert!(!sampled(r#","temperature":0"#));
        assert!(!sampled(r#","temperature":0.0"#));
        assert!(
            !sampled(r#","seed":7"#),
            "a seed asks for a reproducible answer"
        );
        assert!(!sampled(r#","temperature":1.2,"seed":7"#));
        assert!(sampled(r#","seed":null"#));
        let embedding = parse_request(
            Route::Embeddings,
            br#"{"model":"e","input":"x"}"#,
            DEFAULT_MAX_BODY_BYTES,
        )
        .unwrap();
        assert!(!embedding.sampled);
    }

    #[test]
    fn store_is_true_only_for_a_true_store_member() {
        let store = |value: &str| {
            chat(&format!(
                r#"{{"model":"m","messages":[{{"role":"user"}}],"store":{value}}}"#
            ))
            .unwrap()
            .store
        };
        assert!(store("true"));
        assert!(!store("false"));
        assert!(!store("null"));
        assert!(
            !chat(r#"{"model":"m","messages":[{"role":"user"}]}"#)
                .unwrap()
                .store
        );
    }

    #[test]
    fn keys_are_sorted_and_whitespace_removed() {
        assert_eq!(
            canon(" { \"b\" : [ 1 , 2 ] ,\n\t\"a\" : { \"d\":null, \"c\":true } } ").unwrap(),
            r#"{"a":{"c":true,"d":null},"b":[1,2]}"#
        );
    }

    #[test]
    fn keys_sort_by_utf8_bytes() {
        assert_eq!(
            canon(r#"{"é":1,"z":2,"Z":3,"":4,"aa":5,"a":6}"#).unwrap(),
            r#"{"":4,"Z":3,"a":6,"aa":5,"z":2,"é":1}"#
        );
    }

    #[test]
    fn numbers_have_one_exact_form() {
        let cases = [
            ("1", "1"),
            ("-1", "-1"),
            ("1.0", "1"),
            ("1e2", "100"),
            ("1E+2", "100"),
            ("-0.0", "0"),
            ("-0", "0"),
            ("0.1", "0.1"),
            ("1.5e-7", "1.5e-7"),
            ("123.456", "123.456"),
            ("0.30000000000000004", "0.30000000000000004"),
            ("18446744073709551615", "18446744073709551615"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("9007199254740993", "9007199254740993"),
            ("9007199254740991.0", "9007199254740991"),
            ("-9007199254740991.0", "-9007199254740991"),
        ];
        for (token, expected) in cases {
            assert_eq!(
                canon(&format!("[{token}]")).unwrap(),
                format!("[{expected}]"),
                "{token}"
            );
        }
    }

    #[test]
    fn integral_floats_at_or_beyond_two_to_the_53_are_uncacheable() {
        for token in [
            "9007199254740992.0",
            "9007199254740993.0",
            "-9007199254740993.0",
            "1e300",
            "18446744073709551616",
            "-9223372036854775809",
        ] {
            assert_eq!(canon(&format!("{{\"x\":{token}}}")), None, "{token}");
        }
    }

    #[test]
    fn out_of_range_numbers_are_invalid_json() {
        assert!(matches!(
            canonicalize(b"[1e400]"),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn strings_are_escaped_like_serde_json() {
        let samples = [
            "plain",
            "quote \" backslash \\ slash /",
            "\u{0}\u{1}\u{8}\u{9}\u{a}\u{b}\u{c}\u{d}\u{1f}\u{7f}",
            "héllo wörld ☃ 😀 \u{2028}",
        ];
        for s in samples {
            let mut ours = String::new();
            write_json_string(&mut ours, s);
            assert_eq!(ours, serde_json::to_string(s).unwrap());
        }
        assert_eq!(canon(r#"["\u00e9\ud83d\ude00\/"]"#).unwrap(), "[\"é😀/\"]");
    }

    #[test]
    fn duplicate_keys_are_rejected_with_their_path() {
        let cases = [
            (r#"{"a":1,"a":2}"#, "a"),
            (r#"{"a":1,"\u0061":2}"#, "a"),
            (
                r#"{"messages":[{"role":"user","role":"x"}]}"#,
                "messages[0].role",
            ),
            (r#"{"x":{"y":[0,[{"z":1,"z":1}]]}}"#, "x.y[1][0].z"),
            (r#"[{"k":1},{"k":1,"k":2}]"#, "[1].k"),
        ];
        for (body, path) in cases {
            assert_eq!(
                canonicalize(body.as_bytes()),
                Err(RequestError::DuplicateKey(path.to_owned())),
                "{body}"
            );
        }
    }

    #[test]
    fn trailing_garbage_and_bad_json_are_invalid() {
        for body in [
            "{} x",
            "{}{}",
            "{",
            "",
            "{\"a\":}",
            "[1,]",
            "{\"a\" 1}",
            "nul",
        ] {
            assert!(
                matches!(
                    canonicalize(body.as_bytes()),
                    Err(RequestError::InvalidJson(_))
                ),
                "{body}"
            );
        }
        assert_eq!(canon(" {} \n").unwrap(), "{}");
    }

    #[test]
    fn invalid_utf8_is_invalid_json() {
        assert!(matches!(
            canonicalize(b"[\"\xff\"]"),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn the_recursion_limit_is_kept() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(
            canonicalize(deep.as_bytes()),
            Err(RequestError::InvalidJson(_))
        ));
        let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(canon(&ok).unwrap(), ok);
    }

    #[test]
    fn chat_request_drops_only_top_level_volatile_fields() {
        let parsed = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"hi","user":"kept"}],
                "stream":true,"stream_options":{"include_usage":true},"user":"u",
                "metadata":{"a":"b"},"store":false,"temperature":0.5,"x_unknown":[1]}"#,
        )
        .unwrap();
        assert_eq!(parsed.model, "m");
        assert!(parsed.stream);
        assert!(parsed.include_usage);
        assert_eq!(
            String::from_utf8(parsed.canonical.unwrap()).unwrap(),
            r#"{"messages":[{"content":"hi","role":"user","user":"kept"}],"model":"m","temperature":0.5,"x_unknown":[1]}"#
        );
    }

    #[test]
    fn null_stream_fields_count_as_absent() {
        let parsed = chat(
            r#"{"model":"m","messages":[{"role":"user"}],"stream":null,"stream_options":null}"#,
        )
        .unwrap();
        assert!(!parsed.stream);
        assert!(!parsed.include_usage);
    }

    #[test]
    fn chat_validation_names_the_field() {
        let cases: [(&str, RequestError); 9] = [
            ("[]", RequestError::NotAnObject),
            (r#"{"messages":[]}"#, RequestError::MissingField("model")),
            (
                r#"{"model":"","messages":[]}"#,
                invalid("model", "must be a non-empty string"),
            ),
            (r#"{"model":"m"}"#, RequestError::MissingField("messages")),
            (
                r#"{"model":"m","messages":[]}"#,
                invalid("messages", "must be a non-empty array"),
            ),
            (
                r#"{"model":"m","messages":[1]}"#,
                invalid("messages[0]", "must be an object"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"},{"role":1}]}"#,
                invalid("messages[1].role", "must be a string"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#,
                invalid("stream", "must be a boolean"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}],"stream_options":{"include_usage":1}}"#,
                invalid("stream_options.include_usage", "must be a boolean"),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(chat(body).unwrap_err(), expected, "{body}");
        }
    }

    #[test]
    fn completions_and_embeddings_have_their_own_required_fields() {
        let completions = |b: &str| parse_request(Route::Completions, b.as_bytes(), 1024);
        let embeddings = |b: &str| parse_request(Route::Embeddings, b.as_bytes(), 1024);
        assert!(completions(r#"{"model":"m","prompt":"p"}"#).is_ok());
        assert!(completions(r#"{"model":"m","prompt":["a","b"]}"#).is_ok());
        assert_eq!(
            completions(r#"{"model":"m"}"#).unwrap_err(),
            RequestError::MissingField("prompt")
        );
        assert!(embeddings(r#"{"model":"m","input":"x"}"#).is_ok());
        assert!(embeddings(r#"{"model":"m","input":[[1,2]]}"#).is_ok());
        for body in [r#"{"model":"m","input":""}"#, r#"{"model":"m","input":[]}"#] {
            assert!(matches!(
                embeddings(body).unwrap_err(),
                RequestError::InvalidField { .. }
            ));
        }
    }

    #[test]
    fn streaming_on_non_chat_routes_is_served_but_uncacheable() {
        let body = br#"{"model":"m","prompt":"p","stream":true}"#;
        let parsed = parse_request(Route::Completions, body, 1024).unwrap();
        assert!(parsed.stream);
        assert_eq!(parsed.canonical, None);
        let chat = chat(r#"{"model":"m","messages":[{"role":"user"}],"stream":true}"#).unwrap();
        assert!(chat.canonical.is_some());
    }

    #[test]
    fn body_limit_is_checked_before_parsing() {
        assert_eq!(
            parse_request(Route::ChatCompletions, b"{not json at all", 4).unwrap_err(),
            RequestError::TooLarge { limit: 4 }
        );
    }

    #[test]
    fn errors_map_to_openai_shaped_400s_and_413() {
        assert_eq!(
            RequestError::TooLarge { limit: 1 }.to_api_error().status,
            413
        );
        let e = RequestError::MissingField("model").to_api_error();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("model")));
        let e = RequestError::DuplicateKey("messages[0].role".into()).to_api_error();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        assert_eq!(e.kind, "invalid_request_error");
    }
}
