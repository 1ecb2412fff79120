//! What the OpenAI Responses API and the Anthropic Messages API add to request parsing: their
//! required fields, the fields dropped before keying, and the Responses requests that must
//! never be cached. Pure, like the rest of `canonical`.

use std::collections::BTreeMap;

use super::{Number, RequestError, Value, invalid, validate_messages};
use crate::policy::Bypass;

/// `/v1/responses`: the chat list plus `safety_identifier` (the successor of `user`) and
/// `prompt_cache_key` (a hint for the provider's prompt cache): neither changes the answer.
pub(super) const RESPONSES_DROPPED_FIELDS: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "safety_identifier",
    "prompt_cache_key",
];

/// `/v1/messages`: only delivery (`stream`) and bookkeeping (`metadata`, which holds a
/// `user_id`). Anthropic has no `store` or `user` member; an unknown one stays in the key.
pub(super) const MESSAGES_DROPPED_FIELDS: &[&str] = &["stream", "metadata"];

/// `input` a string or an array (or absent when a stored `prompt` template is used), and the
/// members that steer caching well-typed.
pub(super) fn validate_responses(fields: &BTreeMap<String, Value>) -> Result<(), RequestError> {
    match (fields.get("input"), fields.get("prompt")) {
        (None | Some(Value::Null), None | Some(Value::Null)) => {
            return Err(RequestError::MissingField("input"));
        }
        (None | Some(Value::Null) | Some(Value::String(_) | Value::Array(_)), _) => {}
        (Some(_), _) => return Err(invalid("input", "must be a string or an array")),
    }
    match fields.get("previous_response_id") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(_) => return Err(invalid("previous_response_id", "must be a string")),
    }
    match fields.get("background") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(_) => return Err(invalid("background", "must be a boolean")),
    }
    match fields.get("store") {
        None | Some(Value::Null | Value::Bool(_)) => Ok(()),
        Some(_) => Err(invalid("store", "must be a boolean")),
    }
}

/// `messages` as for chat, and `max_tokens`, which Anthropic requires, a positive integer.
pub(super) fn validate_messages_request(
    fields: &BTreeMap<String, Value>,
) -> Result<(), RequestError> {
    validate_messages(fields.get("messages"))?;
    match fields.get("max_tokens") {
        None => Err(RequestError::MissingField("max_tokens")),
        Some(Value::Number(Number::U64(n))) if *n > 0 => Ok(()),
        // `16.0` and `1.6e1` are the integer 16 to a JSON reader.
        Some(Value::Number(Number::F64(n))) if *n >= 1.0 && n.fract() == 0.0 => Ok(()),
        Some(_) => Err(invalid("max_tokens", "must be a positive integer")),
    }?;
    match fields.get("system") {
        None | Some(Value::String(_) | Value::Array(_)) => Ok(()),
        Some(_) => Err(invalid("system", "must be a string or an array")),
    }
}

/// `store` on `/v1/responses`: OpenAI keeps the response unless told `false`.
pub(super) fn responses_store(fields: &BTreeMap<String, Value>) -> bool {
    !matches!(fields.get("store"), Some(Value::Bool(false)))
}

/// Why a Responses request is never cached: its answer continues a conversation the provider
/// keeps (`previous_response_id`, `conversation`), so the same body can mean different
/// things, or it runs in the background and is answered with a pending response to poll.
pub(super) fn responses_never_cached(fields: &BTreeMap<String, Value>) -> Option<Bypass> {
    let present = |name: &str| !matches!(fields.get(name), None | Some(Value::Null));
    if present("previous_response_id") {
        Some(Bypass::PreviousResponse)
    } else if present("conversation") {
        Some(Bypass::Conversation)
    } else if matches!(fields.get("background"), Some(Value::Bool(true))) {
        Some(Bypass::Background)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use crate::canonical::parse_request;
    use crate::policy::Bypass;
    use crate::route::Route;

    fn parse(route: Route, body: &str) -> crate::canonical::ParsedRequest {
        parse_request(route, body.as_bytes(), 1 << 20).unwrap()
    }

    #[test]
    fn responses_delivery_and_bookkeeping_fields_do_not_change_the_key() {
        let plain = parse(
            Route::Responses,
            r#"{"model":"m","input":"hi","store":false}"#,
        );
        let decorated = parse(
            Route::Responses,
            r#"{"model":"m","input":"hi","stream":true,"user":"u","metadata":{"a":"b"},"store":false,"safety_identifier":"s","prompt_cache_key":"k","stream_options":{"include_obfuscation":false}}"#,
        );
        assert_eq!(plain.canonical, decorated.canonical);
        assert!(decorated.stream);
        assert_eq!(
            plain.canonical.as_deref(),
            Some(&br#"{"input":"hi","model":"m"}"#[..])
        );
    }

    #[test]
    fn responses_store_defaults_to_true_as_openai_does() {
        assert!(parse(Route::Responses, r#"{"model":"m","input":"hi"}"#).store);
        assert!(
            parse(
                Route::Responses,
                r#"{"model":"m","input":"hi","store":true}"#
            )
            .store
        );
        assert!(
            !parse(
                Route::Responses,
                r#"{"model":"m","input":"hi","store":false}"#
            )
            .store
        );
    }

    #[test]
    fn responses_on_provider_kept_state_are_marked_never_cached() {
        let cases = [
            (
                r#"{"model":"m","input":"hi","previous_response_id":"resp_1"}"#,
                Some(Bypass::PreviousResponse),
            ),
            (
                r#"{"model":"m","input":"hi","conversation":"conv_1"}"#,
                Some(Bypass::Conversation),
            ),
            (
                r#"{"model":"m","input":"hi","conversation":{"id":"conv_1"}}"#,
                Some(Bypass::Conversation),
            ),
            (
                r#"{"model":"m","input":"hi","background":true}"#,
                Some(Bypass::Background),
            ),
            (
                r#"{"model":"m","input":"hi","background":false,"previous_response_id":null}"#,
                None,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                parse(Route::Responses, body).never_cached,
                expected,
                "{body}"
            );
        }
    }

    #[test]
    fn responses_and_messages_refuse_missing_or_mistyped_fields_with_the_field_named() {
        let refused = |route, body: &str| {
            parse_request(route, body.as_bytes(), 1 << 20)
                .unwrap_err()
                .to_api_error()
                .param
        };
        assert_eq!(
            refused(Route::Responses, r#"{"model":"m"}"#).as_deref(),
            Some("input")
        );
        assert_eq!(
            refused(Route::Responses, r#"{"model":"m","input":3}"#).as_deref(),
            Some("input")
        );
        assert_eq!(
            refused(
                Route::Responses,
                r#"{"model":"m","input":"x","background":"yes"}"#
            )
            .as_deref(),
            Some("background")
        );
        let messages = r#""messages":[{"role":"user","content":"hi"}]"#;
        assert_eq!(
            refused(Route::Messages, &format!(r#"{{"model":"m",{messages}}}"#)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            refused(
                Route::Messages,
                &format!(r#"{{"model":"m","max_tokens":0,{messages}}}"#)
            )
            .as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            refused(
                Route::Messages,
                r#"{"model":"m","max_tokens":5,"messages":[]}"#
            )
            .as_deref(),
            Some("messages")
        );
        // A prompt template instead of input is accepted.
        parse(
            Route::Responses,
            r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#,
        );
    }

    #[test]
    fn messages_drop_only_stream_and_metadata_and_streams_stay_cacheable() {
        let plain = parse(
            Route::Messages,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let streamed = parse(
            Route::Messages,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"stream":true,"metadata":{"user_id":"u"}}"#,
        );
        assert_eq!(plain.canonical, streamed.canonical);
        assert!(streamed.canonical.is_some());
        assert!(!streamed.store);
        let with_user = parse(
            Route::Messages,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"user":"u"}"#,
        );
        assert_ne!(plain.canonical, with_user.canonical);
    }
}
