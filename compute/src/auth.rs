//! Who is calling: `Authorization: Bearer <key>` (or `x-api-key: <key>`, as the Anthropic SDKs
//! send it) → SHA-256 → the Config Store `tenants`.
//! Runs before anything else, so an unknown key costs no KV read and no origin request.

use crate::header;
use crate::names::{AUTHORIZATION, X_API_KEY};
use crate::trace::edge_log;
use fastly::{ConfigStore, Request};
use gateway_common::key::{api_key_digest, bearer_token};
use gateway_common::tenant::Tenant;

/// Config Store mapping `sha256(api key)` (lowercase hex) to a tenant record (one line of JSON).
pub const TENANTS_STORE: &str = "tenants";

/// Why a caller was not authenticated. Each becomes a 401, except `Unavailable` (503).
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Unknown,
    /// The tenants store is missing or unreadable: we cannot tell who this is.
    Unavailable,
}

/// Resolve the caller's tenant from `req`'s bearer token, or else its `x-api-key` (read only
/// when there is no bearer token: each header read is a host call). A record that does not
/// decode is logged and treated as unknown.
pub fn authenticate(req: &Request) -> Result<Tenant, AuthError> {
    let key = header(req, &AUTHORIZATION)
        .and_then(bearer_token)
        .or_else(|| {
            header(req, &X_API_KEY)
                .map(str::trim)
                .filter(|k| !k.is_empty())
        })
        .ok_or(AuthError::Missing)?;
    let digest = api_key_digest(key);
    let store = ConfigStore::try_open(TENANTS_STORE).map_err(|e| {
        edge_log!("config store {TENANTS_STORE} unavailable ({e:?})");
        AuthError::Unavailable
    })?;
    let record = match store.try_get(&digest) {
        Ok(Some(record)) => record,
        Ok(None) => return Err(AuthError::Unknown),
        Err(e) => {
            edge_log!("tenant lookup failed ({e:?})");
            return Err(AuthError::Unavailable);
        }
    };
    match serde_json::from_str::<Tenant>(&record) {
        Ok(tenant) if tenant.validate().is_ok() && tenant.api_key_sha256.contains(&digest) => {
            Ok(tenant)
        }
        Ok(_) | Err(_) => {
            // Never log the record's key material; its digest prefix is enough to find it.
            edge_log!("tenant record for key digest {}… is invalid", &digest[..8]);
            Err(AuthError::Unknown)
        }
    }
}
