//! The one place an error becomes an HTTP response: OpenAI-shaped JSON (Anthropic-shaped on
//! `/v1/messages`) with the right status (and `Retry-After` for 429s), including the 404/405
//! fallbacks, so no actix text error leaks.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};
use gateway_common::error::ApiError;
use gateway_common::route::Route;

use crate::service::Refusal;

/// The response for a refusal, OpenAI-shaped.
pub fn error_response(refusal: &Refusal) -> HttpResponse {
    respond(refusal, refusal.error.to_json())
}

/// The response for a refusal on `route`, in its API's shape.
pub fn error_response_for(route: Route, refusal: &Refusal) -> HttpResponse {
    respond(refusal, refusal.error.to_json_for(route))
}

fn respond(refusal: &Refusal, body: Vec<u8>) -> HttpResponse {
    let status =
        StatusCode::from_u16(refusal.error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    response.insert_header((
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    ));
    if let Some(secs) = refusal.retry_after_secs {
        response.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    response.body(body)
}

/// Fallback for any path no route matches.
pub async fn not_found(request: HttpRequest) -> HttpResponse {
    error_response(&Refusal::from(ApiError::not_found(request.path())))
}

/// Fallback for a known path with the wrong method.
pub async fn method_not_allowed() -> HttpResponse {
    error_response(&Refusal::from(ApiError::method_not_allowed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    #[test]
    fn a_rate_limit_refusal_carries_retry_after() {
        let refusal = Refusal {
            error: ApiError::rate_limited("slow down"),
            retry_after_secs: Some(3),
        };
        let response = error_response(&refusal);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "3");
        let body = response.into_body().try_into_bytes().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "rate_limit_error");
    }
}
