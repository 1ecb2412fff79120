//! Who may call: the edge shared secret and the tenant's API key on API requests, the admin
//! token on `/metrics` and the admin purge. Every comparison of a secret is constant-time.

use std::sync::Arc;

use bytes::Bytes;
use gateway_common::error::ApiError;
use gateway_common::key::bearer_token;
use gateway_common::tenant::Tenant;
use subtle::ConstantTimeEq;

use super::{Refusal, Service};

impl Service {
    /// The edge shared secret when this origin requires it, then bearer key → tenant. The
    /// secret comes first: a caller without it learns nothing, not even whether a key is valid.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        edge_secret: Option<&str>,
    ) -> Result<Arc<Tenant>, Refusal> {
        if let Some(expected) = &self.edge_secret {
            match edge_secret {
                None => {
                    return Err(ApiError {
                        status: 401,
                        message: "This origin only accepts requests through the gateway edge."
                            .into(),
                        kind: "authentication_error",
                        code: Some("edge_secret_missing"),
                        param: None,
                    }
                    .into());
                }
                Some(given) if constant_time_eq(given, expected.expose()) => {}
                Some(_) => {
                    return Err(ApiError {
                        status: 403,
                        message: "The edge shared secret is not valid.".into(),
                        kind: "permission_error",
                        code: Some("edge_secret_invalid"),
                        param: None,
                    }
                    .into());
                }
            }
        }
        authorization
            .and_then(bearer_token)
            .and_then(|key| self.tenants.authenticate(key))
            .ok_or_else(|| Refusal::from(ApiError::unauthorized()))
    }

    /// `GET /v1/models`: the models the tenant may use, in OpenAI's list shape.
    pub fn models(
        &self,
        authorization: Option<&str>,
        edge_secret: Option<&str>,
    ) -> Result<Bytes, Refusal> {
        let tenant = self.authorize(authorization, edge_secret)?;
        let ids = if tenant.allowed_models.iter().any(|m| m == "*") {
            self.router.models()
        } else {
            tenant.allowed_models.clone()
        };
        let data: Vec<serde_json::Value> = ids
            .into_iter()
            .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "gateway"}))
            .collect();
        let body = serde_json::json!({"object": "list", "data": data});
        Ok(Bytes::from(body.to_string()))
    }

    /// The Prometheus page (tenant ids and usage); requires the admin token. Only a
    /// `dev_mode` origin runs without one (validation refuses that elsewhere), and then the
    /// page is open.
    pub fn metrics_page(&self, authorization: Option<&str>) -> Result<Vec<u8>, Refusal> {
        if self.admin_token.is_some() && !self.is_admin(authorization) {
            return Err(ApiError::unauthorized().into());
        }
        Ok(self.metrics.render())
    }

    /// The bearer token is the configured, non-empty admin token. False without one.
    pub(super) fn is_admin(&self, authorization: Option<&str>) -> bool {
        match (&self.admin_token, authorization.and_then(bearer_token)) {
            (Some(token), Some(given)) if !token.expose().is_empty() => {
                constant_time_eq(given, token.expose())
            }
            _ => false,
        }
    }
}

pub(super) fn constant_time_eq(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}
