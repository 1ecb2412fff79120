//! OpenAI-shaped error bodies and their statuses. Owns the wording and the type/code vocabulary;
//! must not decide *when* an error happens (each tier maps its failures here in one place).

use crate::canonical::write_json_string;

/// An error answer: `{"error":{"message","type","code","param"}}` with `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// Human-readable; never holds credentials, prompts or completions.
    pub message: String,
    /// The OpenAI error `type`.
    pub kind: &'static str,
    /// The OpenAI error `code`, `null` when `None`.
    pub code: Option<&'static str>,
    /// The request parameter at fault, `null` when `None`.
    pub param: Option<String>,
}

const INVALID_REQUEST: &str = "invalid_request_error";
const AUTHENTICATION: &str = "authentication_error";
const PERMISSION: &str = "permission_error";
const RATE_LIMIT: &str = "rate_limit_error";
const API: &str = "api_error";

impl ApiError {
    /// The body, one line of JSON: `{"error":{"message":..,"type":..,"code":..,"param":..}}`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = String::from("{\"error\":{\"message\":");
        write_json_string(&mut out, &self.message);
        out.push_str(",\"type\":");
        write_json_string(&mut out, self.kind);
        out.push_str(",\"code\":");
        match self.code {
            Some(code) => write_json_string(&mut out, code),
            None => out.push_str("null"),
        }
        out.push_str(",\"param\":");
        match &self.param {
            Some(param) => write_json_string(&mut out, param),
            None => out.push_str("null"),
        }
        out.push_str("}}");
        out.into_bytes()
    }

    /// Anthropic's body for the same error, one line of JSON:
    /// `{"type":"error","error":{"type":..,"message":..}}`, the `type` being the one Anthropic
    /// uses for the status (400 invalid_request_error, 401 authentication_error, 403
    /// permission_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error,
    /// 529 overloaded_error, any other api_error).
    pub fn to_anthropic_json(&self) -> Vec<u8> {
        let kind = match self.status {
            400 | 405 => INVALID_REQUEST,
            401 => AUTHENTICATION,
            403 => PERMISSION,
            404 => "not_found_error",
            413 => "request_too_large",
            429 => RATE_LIMIT,
            503 | 529 => "overloaded_error",
            _ => API,
        };
        let mut out = String::from("{\"type\":\"error\",\"error\":{\"type\":");
        write_json_string(&mut out, kind);
        out.push_str(",\"message\":");
        write_json_string(&mut out, &self.message);
        out.push_str("}}");
        out.into_bytes()
    }

    /// The body in the shape of `route`'s API: Anthropic's for `/v1/messages`, OpenAI's
    /// otherwise.
    pub fn to_json_for(&self, route: crate::route::Route) -> Vec<u8> {
        if route.is_anthropic() {
            self.to_anthropic_json()
        } else {
            self.to_json()
        }
    }

    fn new(status: u16, message: impl Into<String>, kind: &'static str) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400 invalid_request_error; `param` names the offending field, if any.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            param: param.map(str::to_owned),
            ..Self::new(400, message, INVALID_REQUEST)
        }
    }

    /// 401 authentication_error, code `invalid_api_key` (missing or unknown key alike).
    pub fn unauthorized() -> Self {
        Self::new(
            401,
            "Incorrect or missing API key. Provide a valid key as 'Authorization: Bearer <key>'.",
            AUTHENTICATION,
        )
        .with_code("invalid_api_key")
    }

    /// 403 permission_error, code `model_not_allowed`, param `model`.
    pub fn forbidden_model(model: &str) -> Self {
        ApiError {
            param: Some("model".to_owned()),
            ..Self::new(
                403,
                format!("The model '{model}' is not allowed for this API key."),
                PERMISSION,
            )
            .with_code("model_not_allowed")
        }
    }

    /// 404 invalid_request_error for an unknown path (or resource).
    pub fn not_found(path: &str) -> Self {
        Self::new(404, format!("Invalid URL ({path})."), INVALID_REQUEST)
    }

    /// 405 invalid_request_error.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "This method is not allowed on this URL.",
            INVALID_REQUEST,
        )
    }

    /// 413 invalid_request_error; `limit` in bytes.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            format!("The request body is larger than the limit of {limit} bytes."),
            INVALID_REQUEST,
        )
    }

    /// 429 rate_limit_error, code `rate_limit_exceeded`.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(429, message, RATE_LIMIT).with_code("rate_limit_exceeded")
    }

    /// 429 rate_limit_error, code `insufficient_quota`: the tenant's token budget is spent.
    pub fn budget_exceeded() -> Self {
        Self::new(
            429,
            "You exceeded your current quota: this API key's monthly token budget is spent.",
            RATE_LIMIT,
        )
        .with_code("insufficient_quota")
    }

    /// 502 api_error, code `upstream_error`: every provider failed.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, message, API).with_code("upstream_error")
    }

    /// 504 api_error, code `upstream_timeout`.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, message, API).with_code("upstream_timeout")
    }

    /// 503 api_error, code `origin_unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, message, API).with_code("origin_unavailable")
    }

    /// 500 api_error with no code; the details belong in the logs, not the body.
    pub fn internal() -> Self {
        Self::new(
            500,
            "The server had an error while processing your request.",
            API,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_bodies_carry_anthropic_error_types_for_each_status() {
        let cases = [
            (
                ApiError::bad_request("bad \"x\"", Some("x")),
                "invalid_request_error",
            ),
            (ApiError::unauthorized(), "authentication_error"),
            (ApiError::forbidden_model("m"), "permission_error"),
            (ApiError::not_found("/v1/x"), "not_found_error"),
            (ApiError::too_large(10), "request_too_large"),
            (ApiError::rate_limited("slow down"), "rate_limit_error"),
            (ApiError::bad_gateway("down"), "api_error"),
            (ApiError::unavailable("origin"), "overloaded_error"),
        ];
        for (error, kind) in cases {
            let body: serde_json::Value =
                serde_json::from_slice(&error.to_anthropic_json()).unwrap();
            assert_eq!(body["type"], "error");
            assert_eq!(body["error"]["type"], kind, "{}", error.status);
            assert_eq!(body["error"]["message"], error.message.as_str());
            assert_eq!(
                error.to_json_for(crate::route::Route::Messages),
                error.to_anthropic_json()
            );
            assert_eq!(
                error.to_json_for(crate::route::Route::Responses),
                error.to_json()
            );
        }
    }

    fn body(e: &ApiError) -> serde_json::Value {
        serde_json::from_slice(&e.to_json()).unwrap()
    }

    #[test]
    fn bodies_are_openai_shaped() {
        let e = ApiError::bad_request("bad \"thing\"\n", Some("messages"));
        assert_eq!(
            body(&e),
            serde_json::json!({"error": {
                "message": "bad \"thing\"\n", "type": "invalid_request_error",
                "code": null, "param": "messages"}})
        );
        assert!(!e.to_json().contains(&b'\n'));
        let e = ApiError::unauthorized();
        assert_eq!(body(&e)["error"]["code"], "invalid_api_key");
        assert_eq!(body(&e)["error"]["param"], serde_json::Value::Null);
    }

    #[test]
    fn each_constructor_has_its_status_type_and_code() {
        let cases = [
            (
                ApiError::bad_request("m", None),
                400,
                "invalid_request_error",
                None,
            ),
            (
                ApiError::unauthorized(),
                401,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            (
                ApiError::forbidden_model("x"),
                403,
                "permission_error",
                Some("model_not_allowed"),
            ),
            (
                ApiError::not_found("/x"),
                404,
                "invalid_request_error",
                None,
            ),
            (
                ApiError::method_not_allowed(),
                405,
                "invalid_request_error",
                None,
            ),
            (ApiError::too_large(10), 413, "invalid_request_error", None),
            (
                ApiError::rate_limited("m"),
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                ApiError::budget_exceeded(),
                429,
                "rate_limit_error",
                Some("insufficient_quota"),
            ),
            (
                ApiError::bad_gateway("m"),
                502,
                "api_error",
                Some("upstream_error"),
            ),
            (
                ApiError::gateway_timeout("m"),
                504,
                "api_error",
                Some("upstream_timeout"),
            ),
            (
                ApiError::unavailable("m"),
                503,
                "api_error",
                Some("origin_unavailable"),
            ),
            (ApiError::internal(), 500, "api_error", None),
        ];
        for (e, status, kind, code) in cases {
            assert_eq!((e.status, e.kind, e.code), (status, kind, code), "{e:?}");
            assert_eq!(body(&e)["error"]["type"], kind);
        }
        assert_eq!(
            ApiError::forbidden_model("x").param.as_deref(),
            Some("model")
        );
    }
}
