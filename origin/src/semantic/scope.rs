//! What may match by meaning: only the last user message of a chat request, everything else
//! identical. The scope is a keyed hash of the canonical request with that message's text
//! removed; requests the policy cannot make safe are refused with the reason (a metric label).

use gateway_common::key::KeySecret;
use gateway_common::route::Route;
use hmac::Mac;
use serde_json::Value;

use super::order::{WordKey, Words};

/// The most messages a semantic request may hold (the system prompt and earlier turns must
/// match exactly anyway; a long conversation's last turn leans on context the embedding of
/// one message does not see).
pub const MAX_MESSAGES: usize = 8;

/// The longest last user message compared by meaning, in characters. Past the model's
/// window (256 word pieces, roughly this many characters of English) two texts that differ
/// only at the end would embed alike, so longer ones are never semantic.
pub const MAX_CHARS: usize = 1000;

/// Why a request is never semantic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotSemantic {
    #[error("not a chat completion")]
    Route,
    #[error("the body is not canonical JSON with messages")]
    Shape,
    #[error("the last message is not from the user")]
    LastNotUser,
    #[error("the last user message is not plain text (images, audio, parts)")]
    NonText,
    #[error("the last user message is empty or longer than the semantic limit")]
    Length,
    #[error("the conversation holds tool calls or tool results")]
    Tools,
    #[error("more messages than the semantic limit")]
    TooManyMessages,
    #[error("more than one choice (n > 1)")]
    Choices,
}

impl NotSemantic {
    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            NotSemantic::Route => "route",
            NotSemantic::Shape => "shape",
            NotSemantic::LastNotUser => "last_not_user",
            NotSemantic::NonText => "non_text",
            NotSemantic::Length => "length",
            NotSemantic::Tools => "tools",
            NotSemantic::TooManyMessages => "messages",
            NotSemantic::Choices => "choices",
        }
    }
}

/// A request that may be answered by meaning: the text to embed, the scope (hex) that a
/// candidate must share, and the keyed words whose order a candidate must not invert
/// (`order.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub text: String,
    pub scope: String,
    pub words: Words,
}

/// The question in `canonical` (a chat request's canonical body), or why there is none.
/// `secret` is the cache key secret: the scope is keyed like the cache key, so a listing of
/// Redis cannot be used to confirm a guessed system prompt.
pub fn question(
    secret: &KeySecret,
    tenant: &str,
    route: Route,
    canonical: &[u8],
) -> Result<Question, NotSemantic> {
    if route != Route::ChatCompletions {
        return Err(NotSemantic::Route);
    }
    let mut body: Value = serde_json::from_slice(canonical).map_err(|_| NotSemantic::Shape)?;
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(NotSemantic::Choices);
    }
    let messages = body
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .ok_or(NotSemantic::Shape)?;
    if messages.len() > MAX_MESSAGES {
        return Err(NotSemantic::TooManyMessages);
    }
    for message in messages.iter() {
        let role = message.get("role").and_then(Value::as_str);
        if matches!(role, Some("tool" | "function"))
            || message.get("tool_calls").is_some()
            || message.get("function_call").is_some()
        {
            return Err(NotSemantic::Tools);
        }
    }
    let last = messages.last_mut().ok_or(NotSemantic::Shape)?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return Err(NotSemantic::LastNotUser);
    }
    let object = last.as_object_mut().ok_or(NotSemantic::Shape)?;
    let text = match object.get("content") {
        Some(Value::String(text)) => text.clone(),
        _ => return Err(NotSemantic::NonText),
    };
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.chars().count() > MAX_CHARS {
        return Err(NotSemantic::Length);
    }
    // The rest of the message (its role, a `name`) stays in the scope.
    object.insert("content".into(), Value::Null);
    // serde_json's map is ordered by key, so the rest stays canonical.
    let rest = serde_json::to_vec(&body).map_err(|_| NotSemantic::Shape)?;
    Ok(Question {
        text: trimmed.to_string(),
        words: WordKey::new(secret, tenant).words(trimmed),
        scope: scope_hash(
            secret,
            tenant,
            route,
            &rest,
            &super::guard::fingerprint(trimmed),
        ),
    })
}

/// HMAC-SHA-256(secret, "sem2" 0x00 tenant 0x00 route 0x00 guard 0x00 rest), hex; first 32
/// characters (128 bits: a collision would need 2^64 scopes). `guard` is the last message's
/// lexical fingerprint (`guard.rs`). "sem2": the guard gained its reversal parity and the
/// index's vectors their words (`order.rs`), so no scope of "sem1" is ever read again; its
/// keys expire with their entries.
pub fn scope_hash(
    secret: &KeySecret,
    tenant: &str,
    route: Route,
    rest: &[u8],
    guard: &str,
) -> String {
    let mut mac = secret.mac();
    for part in [
        b"sem2".as_slice(),
        tenant.as_bytes(),
        route.path().as_bytes(),
        guard.as_bytes(),
    ] {
        mac.update(part);
        mac.update(&[0]);
    }
    mac.update(rest);
    let mut hex = hex::encode(mac.finalize().into_bytes());
    hex.truncate(32);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::canonical::parse_request;

    fn ask(body: &str) -> Result<Question, NotSemantic> {
        ask_as("acme", body)
    }

    fn ask_as(tenant: &str, body: &str) -> Result<Question, NotSemantic> {
        let parsed = parse_request(Route::ChatCompletions, body.as_bytes(), 1 << 20).unwrap();
        question(
            &KeySecret::new(b"secret"),
            tenant,
            Route::ChatCompletions,
            &parsed.canonical.unwrap(),
        )
    }

    fn chat(system: &str, user: &str) -> String {
        serde_json::json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}]})
        .to_string()
    }

    #[test]
    fn only_the_last_user_message_is_left_out_of_the_scope() {
        let a = ask(&chat("Be brief.", "How do I reverse a list in Python?")).unwrap();
        let b = ask(&chat(
            "Be brief.",
            "What's the way to reverse a Python list?",
        ))
        .unwrap();
        assert_eq!(a.scope, b.scope);
        assert_eq!(a.text, "How do I reverse a list in Python?");
        assert_eq!(a.scope.len(), 32);
    }

    #[test]
    fn a_different_system_prompt_model_parameter_or_tenant_is_another_scope() {
        let a = ask(&chat("Be brief.", "Hi there")).unwrap().scope;
        assert_ne!(a, ask(&chat("Be verbose.", "Hi there")).unwrap().scope);
        assert_ne!(
            a,
            ask_as("globex", &chat("Be brief.", "Hi there"))
                .unwrap()
                .scope
        );
        let warm = serde_json::json!({"model": "gpt-4o-mini", "temperature": 0.5, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]});
        assert_ne!(a, ask(&warm.to_string()).unwrap().scope);
        let other = chat("Be brief.", "Hi there").replace("gpt-4o-mini", "gpt-4o");
        assert_ne!(a, ask(&other).unwrap().scope);
    }

    #[test]
    fn tool_traffic_images_many_messages_and_several_choices_are_never_semantic() {
        let tool = r#"{"model":"m","messages":[{"role":"user","content":"weather?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function",
            "function":{"name":"w","arguments":"{}"}}]},{"role":"tool","tool_call_id":"1",
            "content":"sunny"},{"role":"user","content":"and tomorrow?"}]}"#;
        assert_eq!(ask(tool), Err(NotSemantic::Tools));
        let image = r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"what is this?"},
            {"type":"image_url","image_url":{"url":"https://example.com/a.png"}}]}]}"#;
        assert_eq!(ask(image), Err(NotSemantic::NonText));
        let turns: Vec<_> = (0..=MAX_MESSAGES)
            .map(|i| serde_json::json!({"role": "user", "content": format!("turn {i}")}))
            .collect();
        let long = serde_json::json!({"model": "m", "messages": turns}).to_string();
        assert_eq!(ask(&long), Err(NotSemantic::TooManyMessages));
        let n2 = r#"{"model":"m","n":2,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(ask(n2), Err(NotSemantic::Choices));
        let assistant = r#"{"model":"m","messages":[{"role":"assistant","content":"hi"}]}"#;
        assert_eq!(ask(assistant), Err(NotSemantic::LastNotUser));
        let huge = chat("s", &"word ".repeat(MAX_CHARS));
        assert_eq!(ask(&huge), Err(NotSemantic::Length));
    }
}
