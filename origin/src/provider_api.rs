//! Which API a provider speaks (`apis = ["chat", "responses", "messages"]` in its settings),
//! which API a route needs, and what the gateway adds to a provider request for it: the
//! provider's own credential in that API's form, and the client headers that pass through.
//! Never forwards the client's credential.

use gateway_common::route::Route;
use gateway_common::traceparent::{TRACEPARENT, TraceContext};
use serde::{Deserialize, Serialize};

/// An API a provider serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderApi {
    /// OpenAI-compatible chat completions, legacy completions and embeddings.
    Chat,
    /// OpenAI's Responses API.
    Responses,
    /// Anthropic's Messages API.
    Messages,
}

impl ProviderApi {
    /// What a provider serves when its settings do not say: the OpenAI-compatible basics.
    pub fn default_set() -> Vec<ProviderApi> {
        vec![ProviderApi::Chat]
    }

    /// The API a route is answered with.
    pub fn for_route(route: Route) -> ProviderApi {
        match route {
            Route::ChatCompletions | Route::Completions | Route::Embeddings => ProviderApi::Chat,
            Route::Responses => ProviderApi::Responses,
            Route::Messages => ProviderApi::Messages,
        }
    }
}

/// Client headers a provider needs to answer as the client expects; empty (no allocation) on
/// the chat path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passthrough {
    /// `anthropic-version` (Messages only): the API version the client's SDK speaks.
    pub anthropic_version: Option<String>,
    /// `anthropic-beta` (Messages only): the beta features the client opted into.
    pub anthropic_beta: Option<String>,
    /// The trace this request runs under (W3C Trace Context); the provider receives a
    /// `traceparent` naming the attempt as its parent. Copy, no allocation.
    pub trace: Option<TraceContext>,
}

/// The Anthropic API version sent when the client named none (the one the SDKs send).
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Adds the provider's `key` in the form `api` expects (`x-api-key` for Messages, a bearer
/// token otherwise), the pass-through headers and the `traceparent` of this attempt
/// (`attempt_span`, the span id the provider sees as its parent).
pub fn decorate(
    mut request: reqwest::RequestBuilder,
    api: ProviderApi,
    key: Option<&str>,
    passthrough: &Passthrough,
    attempt_span: [u8; 8],
) -> reqwest::RequestBuilder {
    if let Some(trace) = &passthrough.trace {
        request = request.header(TRACEPARENT, trace.child(attempt_span).to_string());
    }
    match api {
        ProviderApi::Messages => {
            if let Some(key) = key {
                request = request.header("x-api-key", key);
            }
            let version = passthrough
                .anthropic_version
                .as_deref()
                .unwrap_or(DEFAULT_ANTHROPIC_VERSION);
            request = request.header("anthropic-version", version);
            if let Some(beta) = &passthrough.anthropic_beta {
                request = request.header("anthropic-beta", beta);
            }
        }
        ProviderApi::Chat | ProviderApi::Responses => {
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_the_api_that_answers_it() {
        assert_eq!(ProviderApi::for_route(Route::Embeddings), ProviderApi::Chat);
        assert_eq!(
            ProviderApi::for_route(Route::Responses),
            ProviderApi::Responses
        );
        assert_eq!(
            ProviderApi::for_route(Route::Messages),
            ProviderApi::Messages
        );
    }

    #[test]
    fn a_messages_request_carries_the_key_as_x_api_key_and_the_version() {
        let client = reqwest::Client::new();
        let passthrough = Passthrough {
            anthropic_version: Some("2023-06-01".into()),
            anthropic_beta: None,
            trace: TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        };
        let request = decorate(
            client.post("http://127.0.0.1:1/v1/messages"),
            ProviderApi::Messages,
            Some("sk-ant"),
            &passthrough,
            [7; 8],
        )
        .build()
        .unwrap();
        assert_eq!(request.headers()["x-api-key"], "sk-ant");
        assert_eq!(request.headers()["anthropic-version"], "2023-06-01");
        assert!(request.headers().get("authorization").is_none());
        assert_eq!(
            request.headers()["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0707070707070707-01"
        );
        let chat = decorate(
            client.post("http://127.0.0.1:1/v1/chat/completions"),
            ProviderApi::Chat,
            Some("sk"),
            &Passthrough::default(),
            [7; 8],
        )
        .build()
        .unwrap();
        assert_eq!(chat.headers()["authorization"], "Bearer sk");
        assert!(chat.headers().get("anthropic-version").is_none());
        assert!(chat.headers().get("traceparent").is_none());
    }
}
