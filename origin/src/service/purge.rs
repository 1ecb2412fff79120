//! The purge routes' logic: a tenant deletes one of its entries or all of them, an operator
//! any tenant's. Redis changes first (a delete; for a whole tenant, one increment of its purge
//! generation), then the edge purge is logged for the replicas to send, whatever Redis said.
//! Each tenant's purges are rate-limited, since each costs Fastly API requests. Every accepted
//! purge is also forwarded to the peer regions (`peers.rs`), which apply it to their Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use gateway_common::error::ApiError;
use gateway_common::key::{CacheKey, validate_tenant_id};

use super::{Refusal, Service};
use crate::generation;
use crate::peers::PeerPurge;
use crate::replicate::PurgeRefused;
use crate::settings::PurgeSettings;
use crate::store::CounterOp;

impl Service {
    /// `DELETE /v1/cache/{key}`: deletes one of the caller's entries. The answer is 200 only
    /// when the edge purge is queued and Redis confirmed the delete.
    pub async fn delete_key(
        &self,
        authorization: Option<&str>,
        edge_secret: Option<&str>,
        hex: &str,
    ) -> Result<Bytes, Refusal> {
        let tenant = self.authorize(authorization, edge_secret)?;
        let key = CacheKey::from_hex(&tenant.id, hex).ok_or_else(|| {
            Refusal::from(ApiError::bad_request(
                "The cache key must be 64 hex digits.",
                Some("key"),
            ))
        })?;
        self.purge_limiter.admit(&tenant.id)?;
        // Redis first: a write being sent meanwhile either sees the entry gone when it checks
        // Redis afterwards, or is sent before this purge's delete (see `replicator`).
        let deleted = self.store.delete(&key.redis_key()).await;
        self.replicator.purge_key(&key).await.map_err(refused)?;
        self.forward_to_peers(|region| PeerPurge::key(region, &tenant.id, key.hex()))
            .await?;
        let deleted = deleted.map_err(|_| origin_unavailable())?;
        Ok(Bytes::from(
            serde_json::json!({"key": key.hex(), "deleted": deleted, "edge": "queued"}).to_string(),
        ))
    }

    /// `DELETE /v1/cache`: purges every entry of the caller's tenant.
    pub async fn purge(
        &self,
        authorization: Option<&str>,
        edge_secret: Option<&str>,
    ) -> Result<Bytes, Refusal> {
        let tenant = self.authorize(authorization, edge_secret)?;
        self.purge_limiter.admit(&tenant.id)?;
        let generation = self.purge_everywhere(&tenant.id).await?;
        Ok(Bytes::from(
            serde_json::json!({"generation": generation, "edge": "queued"}).to_string(),
        ))
    }

    /// `DELETE /admin/tenants/{tenant}/cache`: an operator purges every entry of a tenant (one
    /// in tenants.json or one since removed from it). Requires `Authorization: Bearer
    /// <security.admin_token>`; with no admin token configured every caller is refused. Not
    /// rate-limited: the operator owns the budget.
    pub async fn admin_purge_tenant(
        &self,
        authorization: Option<&str>,
        tenant: &str,
    ) -> Result<Bytes, Refusal> {
        if !self.is_admin(authorization) {
            return Err(ApiError::unauthorized().into());
        }
        validate_tenant_id(tenant).map_err(|_| {
            Refusal::from(ApiError::bad_request(
                "The tenant id must be 1 to 64 characters of [a-z0-9_-].",
                Some("tenant"),
            ))
        })?;
        let generation = self.purge_everywhere(tenant).await?;
        tracing::info!(tenant, generation, "admin purge of a tenant's cache");
        Ok(Bytes::from(
            serde_json::json!({"tenant": tenant, "generation": generation, "edge": "queued"})
                .to_string(),
        ))
    }

    /// Purges every entry of `tenant` in O(1): one increment of its purge generation makes
    /// every entry written before unservable at the origin at once, and at the edge once its
    /// tenant record carries the new generation (one Config Store update, logged here). The
    /// stale entries are then removed from Redis in the background, only to free memory.
    /// The new generation.
    async fn purge_everywhere(&self, tenant: &str) -> Result<u64, Refusal> {
        let bump = CounterOp::Incr {
            key: generation::key(tenant),
            by: 1,
            ttl_secs: self.generation_ttl_secs,
        };
        let generation = self
            .store
            .counters(&[bump])
            .await
            .map(|v| v.first().copied());
        match generation {
            Ok(Some(generation)) => {
                self.replicator
                    .purge_tenant(tenant, Some(generation))
                    .await
                    .map_err(refused)?;
                // Every other region raises its own generation to this one (and sweeps).
                self.forward_to_peers(|region| PeerPurge::generation(region, tenant, generation))
                    .await?;
                let store = Arc::clone(&self.store);
                let pattern = CacheKey::redis_pattern(tenant);
                tokio::spawn(async move {
                    if let Err(error) = store.purge(&pattern, generation).await {
                        tracing::debug!(%error, "purged entries stay in Redis until they expire");
                    }
                });
                Ok(generation)
            }
            // No generation recorded: the edge copies are still listed and deleted, but the
            // origin cannot refuse its old entries once Redis is back: the caller must retry.
            _ => {
                self.replicator
                    .purge_tenant(tenant, None)
                    .await
                    .map_err(refused)?;
                Err(origin_unavailable())
            }
        }
    }
}

fn refused(reason: PurgeRefused) -> Refusal {
    tracing::warn!(%reason, "a purge was refused: the edge purge could not be queued");
    Refusal {
        error: ApiError::unavailable(
            "The purge could not be queued for the edge cache; nothing was purged. Try again shortly.",
        ),
        retry_after_secs: Some(5),
    }
}

fn origin_unavailable() -> Refusal {
    Refusal {
        error: ApiError::unavailable(
            "The edge purge is queued, but the origin cache is unavailable; try again.",
        ),
        retry_after_secs: Some(1),
    }
}

/// Purge requests per tenant: a token bucket of `tenant_burst` refilled at
/// `tenant_per_minute`, kept in this process (a tenant spread over N replicas gets N times
/// the rate; the purge queue merges what gets through, so the Fastly API cost stays bounded).
#[derive(Debug)]
pub(super) struct PurgeLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl PurgeLimiter {
    pub(super) fn new(settings: &PurgeSettings) -> PurgeLimiter {
        PurgeLimiter {
            per_sec: f64::from(settings.tenant_per_minute) / 60.0,
            burst: f64::from(settings.tenant_burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Spends one purge of `tenant`'s, or refuses with 429 and when to retry.
    pub(super) fn admit(&self, tenant: &str) -> Result<(), Refusal> {
        self.admit_at(tenant, Instant::now())
    }

    fn admit_at(&self, tenant: &str, now: Instant) -> Result<(), Refusal> {
        // Tokens and a time per tenant: consistent between statements, so a poisoned lock
        // is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, updated) = buckets
            .entry(tenant.to_string())
            .or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*updated).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_sec).min(self.burst);
        *updated = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - *tokens) / self.per_sec).ceil().max(1.0) as u64;
        Err(Refusal {
            error: ApiError::rate_limited(
                "Too many cache purges for this tenant; retry after the time in Retry-After.",
            ),
            retry_after_secs: Some(wait),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_tenant_gets_its_burst_then_the_per_minute_rate() {
        let limiter = PurgeLimiter::new(&PurgeSettings {
            tenant_per_minute: 30,
            tenant_burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.admit_at("acme", t0).is_ok());
        }
        let refused = limiter.admit_at("acme", t0).unwrap_err();
        assert_eq!(refused.error.status, 429);
        assert_eq!(
            refused.retry_after_secs,
            Some(2),
            "30 a minute: one every 2 s"
        );
        assert!(limiter.admit_at("globex", t0).is_ok(), "tenants are apart");
        assert!(
            limiter
                .admit_at("acme", t0 + Duration::from_secs(1))
                .is_err()
        );
        assert!(
            limiter
                .admit_at("acme", t0 + Duration::from_secs(2))
                .is_ok()
        );
    }
}
