//! The cacheable routes and their names. Owns nothing else: no parsing of bodies, no HTTP types.

/// A cacheable route: OpenAI-compatible, or Anthropic's Messages API. The path is part of the cache key, so the same body sent
/// to two routes never shares an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
    /// `POST /v1/responses` (OpenAI Responses API)
    Responses,
    /// `POST /v1/messages` (Anthropic Messages API)
    Messages,
}

impl Route {
    /// Every route, in a fixed order.
    pub const ALL: [Route; 5] = [
        Route::ChatCompletions,
        Route::Completions,
        Route::Embeddings,
        Route::Responses,
        Route::Messages,
    ];

    /// The route for an exact request path; `None` for any other path (no trailing-slash or
    /// case folding, so a path maps to at most one route).
    pub fn from_path(path: &str) -> Option<Route> {
        match path {
            "/v1/chat/completions" => Some(Route::ChatCompletions),
            "/v1/completions" => Some(Route::Completions),
            "/v1/embeddings" => Some(Route::Embeddings),
            "/v1/responses" => Some(Route::Responses),
            "/v1/messages" => Some(Route::Messages),
            _ => None,
        }
    }

    /// The request path, as hashed into the cache key.
    pub fn path(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Embeddings => "/v1/embeddings",
            Route::Responses => "/v1/responses",
            Route::Messages => "/v1/messages",
        }
    }

    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat.completions",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
            Route::Responses => "responses",
            Route::Messages => "messages",
        }
    }

    /// A cached answer can be replayed as this route's event stream (`sse::replay`), and a
    /// streamed answer assembled back (`sse::Assembler`); on other routes a stream is served
    /// but never cached.
    pub fn replays_streams(self) -> bool {
        matches!(
            self,
            Route::ChatCompletions | Route::Responses | Route::Messages
        )
    }

    /// Errors on this route are Anthropic-shaped (`ApiError::to_json_for`).
    pub fn is_anthropic(self) -> bool {
        self == Route::Messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_round_trips_through_its_path() {
        for route in Route::ALL {
            assert_eq!(Route::from_path(route.path()), Some(route));
        }
    }

    #[test]
    fn unknown_and_near_miss_paths_are_not_routes() {
        for path in [
            "/v1/models",
            "/v1/chat/completions/",
            "/V1/embeddings",
            "",
            "/",
        ] {
            assert_eq!(Route::from_path(path), None, "{path}");
        }
    }

    #[test]
    fn labels_are_the_metric_names() {
        assert_eq!(Route::ChatCompletions.as_str(), "chat.completions");
        assert_eq!(Route::Completions.as_str(), "completions");
        assert_eq!(Route::Embeddings.as_str(), "embeddings");
        assert_eq!(Route::Responses.as_str(), "responses");
        assert_eq!(Route::Messages.as_str(), "messages");
    }
}
