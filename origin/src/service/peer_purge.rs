//! The receiving side of a purge another region accepted (`POST /internal/region/purge`):
//! applied to this region's Redis only (a key deleted; a tenant's purge generation raised to
//! max(its own, the one received)), never forwarded again and never sent to the Fastly API,
//! which the accepting region did. Only a peer holding `region.peer_token` may call it.

use std::sync::Arc;

use bytes::Bytes;
use gateway_common::error::ApiError;
use gateway_common::key::{CacheKey, bearer_token};

use super::access::constant_time_eq;
use super::{Refusal, Service};
use crate::generation;
use crate::peers::{Asked, PeerPurge};
use crate::store::CounterOp;

impl Service {
    /// Applies a peer region's purge. 200 once this region's Redis holds it; 503 (the peer
    /// retries) when Redis did not answer; 400 for a body that is not a valid forward (the
    /// peer drops it); 401 without the peer token.
    pub async fn apply_peer_purge(
        &self,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Result<Bytes, Refusal> {
        let authorized = match (&self.peer_token, authorization.and_then(bearer_token)) {
            (Some(token), Some(given)) => constant_time_eq(given, token.expose()),
            _ => false,
        };
        if !authorized {
            return Err(ApiError::unauthorized().into());
        }
        let purge: PeerPurge = serde_json::from_slice(body).map_err(|e| {
            Refusal::from(ApiError::bad_request(
                format!("Not a region purge: {e}"),
                None,
            ))
        })?;
        let asked = purge.asked().map_err(|e| {
            Refusal::from(ApiError::bad_request(
                format!("Not a region purge: {e}"),
                None,
            ))
        })?;
        let op = match asked {
            Asked::Key(_) => "key",
            Asked::Generation(_) => "generation",
        };
        let count = |outcome: &str| {
            self.peer_metrics
                .applied
                .with_label_values(&[&purge.from, op, outcome])
                .inc();
        };
        let applied = match asked {
            Asked::Key(hex) => self.apply_key(&purge.tenant, hex).await,
            Asked::Generation(generation) => self.raise_generation(&purge.tenant, generation).await,
        };
        match applied {
            Ok(answer) => {
                count("applied");
                tracing::info!(from = %purge.from, tenant = %purge.tenant, op, "region: applied a peer region's purge");
                Ok(Bytes::from(answer.to_string()))
            }
            Err(refusal) => {
                count("failed");
                Err(refusal)
            }
        }
    }

    async fn apply_key(&self, tenant: &str, hex: &str) -> Result<serde_json::Value, Refusal> {
        let key = CacheKey::from_hex(tenant, hex).ok_or_else(|| {
            Refusal::from(ApiError::bad_request(
                "Not a region purge: key: must be 64 hex digits",
                None,
            ))
        })?;
        let deleted = self
            .store
            .delete(&key.redis_key())
            .await
            .map_err(|_| redis_down())?;
        Ok(serde_json::json!({"region": self.region, "key": key.hex(), "deleted": deleted}))
    }

    /// Raises `tenant`'s generation to at least `received`, so regions converge on the
    /// highest; a local purge racing this one can only push it higher (never lower), which
    /// purges no less. Then sweeps the purged entries out of Redis in the background.
    async fn raise_generation(
        &self,
        tenant: &str,
        received: u64,
    ) -> Result<serde_json::Value, Refusal> {
        let key = generation::key(tenant);
        let local = self
            .store
            .counters(&[CounterOp::Get { key: key.clone() }])
            .await
            .map_err(|_| redis_down())?
            .first()
            .copied()
            .unwrap_or(0);
        let now = if received > local {
            let raise = CounterOp::Incr {
                key,
                by: received - local,
                ttl_secs: self.generation_ttl_secs,
            };
            let raised = self
                .store
                .counters(&[raise])
                .await
                .map_err(|_| redis_down())?
                .first()
                .copied()
                .unwrap_or(received);
            let store = Arc::clone(&self.store);
            let pattern = CacheKey::redis_pattern(tenant);
            tokio::spawn(async move {
                if let Err(error) = store.purge(&pattern, raised).await {
                    tracing::debug!(%error, "purged entries stay in Redis until they expire");
                }
            });
            raised
        } else {
            local
        };
        Ok(serde_json::json!({"region": self.region, "tenant": tenant, "generation": now}))
    }

    /// Hands an accepted purge to every peer region's outbox; without peers, nothing to do.
    pub(super) async fn forward_to_peers(
        &self,
        purge: impl FnOnce(&str) -> PeerPurge,
    ) -> Result<(), Refusal> {
        let Some(peers) = &self.peers else {
            return Ok(());
        };
        peers.forward(&purge(peers.region())).await.map_err(|error| {
            tracing::warn!(%error, "a purge was refused: a peer region's outbox could not take it");
            Refusal {
                error: ApiError::unavailable(
                    "The purge could not be queued for every region; try again shortly.",
                ),
                retry_after_secs: Some(5),
            }
        })
    }
}

fn redis_down() -> Refusal {
    Refusal {
        error: ApiError::unavailable("This region's cache is unavailable; the purge is retried."),
        retry_after_secs: Some(1),
    }
}
