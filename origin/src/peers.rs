//! Purges that reach every region: each purge this region accepts is put in a durable outbox
//! per peer region (in this region's Redis) and carried to the peer's internal route by a lane
//! per peer, retried until the peer takes it. The peer applies it to its own Redis only: it
//! neither forwards it again (no loops) nor sends the Fastly API what this region already
//! sent. The receiving side is `service/peer_purge.rs`.

mod lane;
mod message;
mod outbox;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::Notify;

pub use lane::PURGE_ROUTE;
pub use message::{Asked, PeerPurge};
pub use outbox::OutboxError;

use crate::metrics::Metrics;
use crate::settings::{RegionSettings, ms};
use crate::store::RedisStore;
use lane::Lane;
use outbox::Outbox;

/// The region's metrics (prefix `gateway_region_`), registered whether or not it has peers.
#[derive(Clone)]
pub struct PeerMetrics {
    /// region: always 1, so a dashboard can tell which region a scrape came from.
    pub info: IntGaugeVec,
    /// peer, outcome (queued|full|redis|delivered|retried|refused): forwards to peers.
    pub forwards: IntCounterVec,
    /// peer: forwards waiting in the outbox.
    pub outbox_depth: IntGaugeVec,
    /// from, op (key|generation), outcome (applied|failed|refused): purges from peers.
    pub applied: IntCounterVec,
}

impl PeerMetrics {
    pub fn register(metrics: &Metrics, region: &str) -> Result<PeerMetrics, prometheus::Error> {
        let info = metrics.register(IntGaugeVec::new(
            Opts::new(
                "region_info",
                "The region this origin belongs to (region.name).",
            ),
            &["region"],
        )?)?;
        info.with_label_values(&[region]).set(1);
        Ok(PeerMetrics {
            info,
            forwards: metrics.register(IntCounterVec::new(
                Opts::new(
                    "region_forwards_total",
                    "Purges forwarded to peer regions, by outcome.",
                ),
                &["peer", "outcome"],
            )?)?,
            outbox_depth: metrics.register(IntGaugeVec::new(
                Opts::new(
                    "region_outbox_depth",
                    "Purges waiting in the outbox of each peer region.",
                ),
                &["peer"],
            )?)?,
            applied: metrics.register(IntCounterVec::new(
                Opts::new(
                    "region_purges_received_total",
                    "Purges received from peer regions, by outcome.",
                ),
                &["from", "op", "outcome"],
            )?)?,
        })
    }
}

/// Why the peer lanes could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("region.peers: {0}")]
    Client(String),
}

/// The forwarding side: the outbox and one lane per peer.
pub struct Peers {
    region: String,
    names: Vec<String>,
    outbox: Arc<Outbox>,
    ready: Vec<Arc<Notify>>,
    metrics: PeerMetrics,
    /// Set when the last handle goes: the lanes stop (what waits stays in the outbox).
    closed: Arc<AtomicBool>,
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        for wake in &self.ready {
            wake.notify_one();
        }
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("region", &self.region)
            .field("peers", &self.names)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// Starts a lane per peer on the current Tokio runtime; `None` for a region without peers.
    /// The request path appends through `requests` (the cache's pool), the lanes work through
    /// `lanes`.
    pub fn start(
        settings: &RegionSettings,
        requests: Arc<RedisStore>,
        lanes: Arc<RedisStore>,
        metrics: PeerMetrics,
    ) -> Result<Option<Peers>, PeersError> {
        let Some(token) = settings
            .peer_token
            .clone()
            .filter(|_| !settings.peers.is_empty())
        else {
            return Ok(None);
        };
        let timeout = ms(settings.peer_timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(1)))
            .build()
            .map_err(|e| PeersError::Client(e.to_string()))?;
        let consumer = format!(
            "{}-{}-{:08x}",
            settings.name,
            std::process::id(),
            rand::random::<u32>()
        );
        let outbox = Arc::new(Outbox::new(
            requests,
            lanes,
            consumer,
            settings.peer_outbox_capacity,
        ));
        let mut ready = Vec::new();
        let closed = Arc::new(AtomicBool::new(false));
        for peer in &settings.peers {
            let wake = Arc::new(Notify::new());
            ready.push(Arc::clone(&wake));
            let lane = Lane {
                peer: peer.name.clone(),
                url: format!("{}{PURGE_ROUTE}", peer.url.trim_end_matches('/')),
                token: token.clone(),
                http: http.clone(),
                outbox: Arc::clone(&outbox),
                ready: wake,
                retry: ms(settings.peer_retry_ms),
                metrics: metrics.clone(),
                closed: Arc::clone(&closed),
            };
            tokio::spawn(lane.run());
        }
        Ok(Some(Peers {
            region: settings.name.clone(),
            names: settings.peers.iter().map(|p| p.name.clone()).collect(),
            outbox,
            ready,
            metrics,
            closed,
        }))
    }

    /// This region's name, the `from` of every forward.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Puts `purge` in every peer's outbox. `Err` when one could not take it: the caller
    /// refuses the purge (503), so it is retried rather than half-done; the peers that did
    /// take it apply it (a purge applied twice is the same purge).
    pub async fn forward(&self, purge: &PeerPurge) -> Result<(), OutboxError> {
        let body = serde_json::to_string(purge).map_err(|e| OutboxError::Encode(e.to_string()))?;
        let mut failed = None;
        for (peer, wake) in self.names.iter().zip(&self.ready) {
            let outcome = match self.outbox.append(peer, &body).await {
                Ok(()) => {
                    wake.notify_one();
                    "queued"
                }
                Err(error) => {
                    let label = match error {
                        OutboxError::Full(_) => "full",
                        OutboxError::Redis(_) | OutboxError::Encode(_) => "redis",
                    };
                    tracing::warn!(peer, %error, "region: a purge could not be queued for a peer region");
                    failed = Some(error);
                    label
                }
            };
            self.metrics
                .forwards
                .with_label_values(&[peer, outcome])
                .inc();
        }
        failed.map_or(Ok(()), Err)
    }
}
