//! The members of an answer that echo request fields kept out of the cache key. A Responses
//! `response` repeats the request's `metadata`, `user`, `store`, `safety_identifier` and
//! `prompt_cache_key`, none of which is keyed, so an entry written for one request would show
//! that request's values to the next. [`Echo`] holds what the asking request says for each,
//! and rewrites a cached answer with it before either tier serves it (as stored, or replayed
//! as events). An Anthropic `message` echoes nothing outside the key (`metadata` is not
//! repeated; `model` is keyed), so Messages has no echo. Pure: bytes in, bytes out.

use serde_json::{Map, Value};

use crate::route::Route;

/// The echoed members of a Responses answer.
const RESPONSES_ECHOED: &[&str] = &[
    "metadata",
    "user",
    "store",
    "safety_identifier",
    "prompt_cache_key",
];

/// The API's value for an echoed member when the request leaves the field out.
fn responses_default(name: &str) -> Value {
    match name {
        "metadata" => Value::Object(Map::new()),
        "store" => Value::Bool(true),
        _ => Value::Null,
    }
}

/// What one request says for each member its route's answer echoes.
#[derive(Debug, Clone, PartialEq)]
pub struct Echo {
    members: Vec<(&'static str, Value)>,
}

impl Echo {
    /// The echo of a request on `route`, whose top-level fields `field` looks up (`None` for
    /// an absent field, `Some(Value::Null)` for an explicit null). `None` when the route's
    /// answers echo nothing outside the key.
    pub fn of(route: Route, field: impl Fn(&str) -> Option<Value>) -> Option<Echo> {
        if route != Route::Responses {
            return None;
        }
        let members = RESPONSES_ECHOED
            .iter()
            .map(|name| {
                let value = match field(name) {
                    None | Some(Value::Null) => responses_default(name),
                    Some(value) => value,
                };
                (*name, value)
            })
            .collect();
        Some(Echo { members })
    }

    /// `answer` (a stored `response` object) with each echoed member it carries set to this
    /// request's value. A member the answer lacks is not added (the provider does not echo
    /// it); anything that is not a `response` object comes back unchanged.
    pub fn apply(&self, answer: Vec<u8>) -> Vec<u8> {
        let Ok(Value::Object(mut response)) = serde_json::from_slice::<Value>(&answer) else {
            return answer;
        };
        if response.get("object").and_then(Value::as_str) != Some("response") {
            return answer;
        }
        let mut changed = false;
        for (name, value) in &self.members {
            if let Some(member) = response.get_mut(*name)
                && member != value
            {
                *member = value.clone();
                changed = true;
            }
        }
        if !changed {
            return answer;
        }
        serde_json::to_vec(&Value::Object(response)).unwrap_or(answer)
    }
}

/// [`Echo::apply`] when there is an echo; `answer` as it is otherwise.
pub fn restore(echo: Option<&Echo>, answer: Vec<u8>) -> Vec<u8> {
    match echo {
        Some(echo) => echo.apply(answer),
        None => answer,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn echo_of(request: Value) -> Echo {
        Echo::of(Route::Responses, |name| request.get(name).cloned()).unwrap()
    }

    fn stored() -> Vec<u8> {
        json!({
            "id": "resp_1", "object": "response", "output": [],
            "metadata": {"run": "first"}, "user": "alice", "store": true,
            "safety_identifier": "s-alice", "prompt_cache_key": "k1",
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_cached_response_shows_the_asking_requests_values() {
        let echo = echo_of(json!({"metadata": {"run": "second"}, "user": "bob", "store": false}));
        let served: Value = serde_json::from_slice(&echo.apply(stored())).unwrap();
        assert_eq!(served["metadata"], json!({"run": "second"}));
        assert_eq!(served["user"], "bob");
        assert_eq!(served["store"], false);
        assert_eq!(served["safety_identifier"], Value::Null);
        assert_eq!(served["prompt_cache_key"], Value::Null);
        assert_eq!(served["id"], "resp_1");
    }

    #[test]
    fn absent_fields_take_the_apis_defaults_and_unechoed_members_are_not_added() {
        let echo = echo_of(json!({"model": "m", "user": null}));
        let stored = json!({"id": "r", "object": "response", "output": [], "metadata": {"a": "b"}, "user": "alice"});
        let served: Value =
            serde_json::from_slice(&echo.apply(stored.to_string().into_bytes())).unwrap();
        assert_eq!(served["metadata"], json!({}));
        assert_eq!(served["user"], Value::Null);
        assert!(served.get("store").is_none(), "{served}");
    }

    #[test]
    fn only_responses_echo_and_other_bodies_pass_unchanged() {
        assert!(Echo::of(Route::Messages, |_| Some(json!("x"))).is_none());
        assert!(Echo::of(Route::ChatCompletions, |_| None).is_none());
        let echo = echo_of(json!({"user": "bob"}));
        let chat = br#"{"object":"chat.completion","user":"alice"}"#.to_vec();
        assert_eq!(echo.apply(chat.clone()), chat);
        assert_eq!(echo.apply(b"not json".to_vec()), b"not json".to_vec());
        assert_eq!(restore(None, stored()), stored());
    }
}
