//! The Fastly Config Store REST API, for the one thing the origin writes there: the tenant
//! records of the Config Store `tenants` that the edge reads on every request, when a tenant's
//! purge generation changes. One bulk request however many of the tenant's keys it updates.
//! Like `kv_api`, it neither retries nor paces (the replicator does).

use std::time::Duration;

use reqwest::header::HeaderValue;
use reqwest::{Method, Url};
use serde::Serialize;

use crate::kv_api::{Answered, KvApiError, KvApiSetupError, api_client, send};
use crate::settings::Secret;

/// The largest item value the Config Store takes.
pub const MAX_ITEM_VALUE_CHARS: usize = 8000;

#[derive(Clone)]
pub struct ConfigStoreApi {
    http: reqwest::Client,
    items_url: Url,
    token: HeaderValue,
}

impl std::fmt::Debug for ConfigStoreApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigStoreApi")
            .field("items_url", &self.items_url.as_str())
            .field("token", &"[redacted]")
            .finish()
    }
}

#[derive(Serialize)]
struct Bulk<'a> {
    items: Vec<Op<'a>>,
}

#[derive(Serialize)]
struct Op<'a> {
    op: &'static str,
    item_key: &'a str,
    item_value: &'a str,
}

impl ConfigStoreApi {
    /// The items of Config Store `store_id` (its id, not its link name) under `base_url`
    /// (`https://api.fastly.com`, or a fake in tests); each request gives up after `timeout`.
    pub fn new(
        base_url: &str,
        store_id: &str,
        token: &Secret,
        timeout: Duration,
    ) -> Result<ConfigStoreApi, KvApiSetupError> {
        let (http, items_url, token) = api_client(
            base_url,
            &["resources", "stores", "config", store_id, "items"],
            token,
            timeout,
        )?;
        Ok(ConfigStoreApi {
            http,
            items_url,
            token,
        })
    }

    /// `PATCH /resources/stores/config/{id}/items` upserting every `(key, value)`.
    pub async fn upsert(&self, items: &[(String, String)]) -> Result<Answered, KvApiError> {
        let body = Bulk {
            items: items
                .iter()
                .map(|(key, value)| Op {
                    op: "upsert",
                    item_key: key,
                    item_value: value,
                })
                .collect(),
        };
        let request = self
            .http
            .request(Method::PATCH, self.items_url.clone())
            .header("fastly-key", self.token.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body);
        let (_, answered) = send(request).await?;
        Ok(answered)
    }
}
