//! The cacheable routes and their names. Owns nothing else: no parsing of bodies, no HTTP types.

/// A cacheable OpenAI-compatible route. The path is part of the cache key, so the same body sent
/// to two routes never shares an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl Route {
    /// Every route, in a fixed order.
    pub const ALL: [Route; 3] = [
        Route::ChatCompletions,
        Route::Completions,
        Route::Embeddings,
    ];

    /// The route for an exact request path; `None` for any other path (no trailing-slash or
    /// case folding, so a path maps to at most one route).
    pub fn from_path(path: &str) -> Option<Route> {
        match path {
            "/v1/chat/completions" => Some(Route::ChatCompletions),
            "/v1/completions" => Some(Route::Completions),
            "/v1/embeddings" => Some(Route::Embeddings),
            _ => None,
        }
    }

    /// The request path, as hashed into the cache key.
    pub fn path(self) -> &'static str {
        match self {
            Route::ChatCompletions => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Embeddings => "/v1/embeddings",
        }
    }

    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::ChatCompletions => "chat.completions",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
        }
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
    }
}
