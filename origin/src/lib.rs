//! The origin tier: an OpenAI-compatible actix-web service with a Redis cache in front of a
//! provider router. `Application::build` assembles everything (tests start it on port 0);
//! `main.rs` only parses the command line and starts it.

pub mod breaker;
pub mod budget;
pub mod coalesce;
pub mod config_api;
pub mod dashboard;
pub mod edge_span;
pub mod error;
pub mod fanout;
pub mod generation;
pub mod kv_api;
pub mod log_format;
pub mod meter;
pub mod metrics;
pub mod peers;
pub mod periodic;
pub mod provider_api;
pub mod replicate;
pub mod replicator;
pub mod request_scope;
pub mod router;
pub mod routes;
pub mod seal;
pub mod semantic;
pub mod service;
pub mod settings;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod tenants;
pub mod traffic;
pub mod usage;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::DefaultHeaders;
use actix_web::{App, HttpServer, web};
use gateway_common::headers::X_ORIGIN_REGION;

use crate::metrics::Metrics;
use crate::peers::{PeerMetrics, Peers};
use crate::replicate::{NoopReplicator, Replicator};
use crate::replicator::KvReplicator;
use crate::service::{RegionParts, Service};
use crate::settings::{Settings, ms};
use crate::store::{RedisStore, Store};
use crate::tenants::Tenants;

/// Why the origin could not start. Each message names the setting or resource at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error(transparent)]
    Tenants(#[from] tenants::TenantsError),
    #[error(transparent)]
    Redis(#[from] store::RedisSetupError),
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Replicator(#[from] replicator::ReplicatorError),
    #[error(transparent)]
    Peers(#[from] peers::PeersError),
    #[error("metrics: {0}")]
    RegionMetrics(#[from] prometheus::Error),
    #[error("server.listen {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Optional replacements for the parts `build` would make from settings (tests, and the
/// replicator of issue 4).
#[derive(Default)]
pub struct Parts {
    /// Instead of Redis at `redis.url` (e.g. `store::MemoryStore` in unit-level tests).
    pub store: Option<Arc<dyn Store>>,
    /// Instead of the replicator `replication.enabled` selects (`KvReplicator`, else `NoopReplicator`).
    pub replicator: Option<Arc<dyn Replicator>>,
    /// Instead of reading `tenants.file`.
    pub tenants: Option<Tenants>,
}

/// A bound, not yet running origin.
pub struct Application {
    server: Server,
    addr: SocketAddr,
    service: Arc<Service>,
    replicator: Arc<dyn Replicator>,
    shutdown_timeout: Duration,
}

impl Application {
    /// Validates `settings`, loads tenants, builds the pool, router and service, and binds.
    /// Must be called inside a Tokio runtime (it starts the usage flusher).
    pub fn build(settings: Settings) -> Result<Application, StartError> {
        Application::build_with(settings, Parts::default())
    }

    pub fn build_with(settings: Settings, parts: Parts) -> Result<Application, StartError> {
        settings.validate()?;
        let metrics = Metrics::new()?;
        let tenants = match parts.tenants {
            Some(tenants) => tenants,
            None => {
                // Validation refuses a missing file outside dev_mode; this only guards that.
                let file = settings.tenants_file().ok_or_else(|| {
                    settings::SettingsError::Production("tenants.file is not set".into())
                })?;
                Tenants::from_file(&file)?
            }
        };
        // The cache's pool; the replication log shares it for what the request path logs.
        let redis = Arc::new(RedisStore::new(&settings.redis, metrics.clone())?);
        let region_metrics = PeerMetrics::register(&metrics, &settings.region.name)?;
        // The outboxes live in this region's Redis, whatever store the cache uses.
        let peers = Peers::start(
            &settings.region,
            Arc::clone(&redis),
            Arc::new(RedisStore::new(
                &settings.redis.for_replication(),
                metrics.clone(),
            )?),
            region_metrics.clone(),
        )?
        .map(Arc::new);
        tracing::info!(
            region = %settings.region.name,
            peers = settings.region.peers.len(),
            "region"
        );
        let store: Arc<dyn Store> = match parts.store {
            Some(store) => store,
            None => Arc::clone(&redis) as Arc<dyn Store>,
        };
        let replicator: Arc<dyn Replicator> = match parts.replicator {
            Some(replicator) => replicator,
            None if settings.replication.enabled => {
                // The lanes get a pool of their own: their calls carry whole batches and wait
                // longer than a cache read may.
                let lanes = RedisStore::new(&settings.redis.for_replication(), metrics.clone())?;
                Arc::new(KvReplicator::start(
                    &settings.replication,
                    &tenants,
                    &metrics,
                    redis,
                    Arc::new(lanes),
                )?)
            }
            None => Arc::new(NoopReplicator),
        };
        if settings.usage.ingest_token.is_none() {
            tracing::warn!(
                "usage.ingest_token is not set: the edge's usage records are refused, so edge hits go unmetered"
            );
        }
        let service = Service::new(
            &settings,
            tenants,
            store,
            Arc::clone(&replicator),
            metrics,
            RegionParts {
                peers,
                metrics: region_metrics,
            },
        )?;
        service
            .budget()
            .spawn_flusher(ms(settings.cache.usage_flush_ms));
        service
            .meter()
            .traffic()
            .spawn_flusher(ms(settings.cache.usage_flush_ms));

        let addr = settings.listen_addr()?;
        let bind_error = |source| StartError::Bind {
            addr: settings.server.listen.clone(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let data = web::Data::from(Arc::clone(&service));
        let region = settings.region.name.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                // Every answer says which region produced it.
                .wrap(DefaultHeaders::new().add((X_ORIGIN_REGION, region.clone())))
                .configure(routes::configure)
        })
        .shutdown_timeout(settings.server.shutdown_timeout_secs)
        .client_request_timeout(Duration::from_millis(
            settings.server.client_request_timeout_ms,
        ))
        .keep_alive(Duration::from_secs(75));
        if settings.server.workers > 0 {
            server = server.workers(settings.server.workers);
        }
        let server = server.listen(listener).map_err(bind_error)?.run();
        Ok(Application {
            server,
            addr,
            service,
            replicator,
            shutdown_timeout: Duration::from_secs(settings.server.shutdown_timeout_secs),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server (gracefully or not) from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Serves until stopped (SIGTERM, SIGINT, or a [`ServerHandle`]), then flushes the token
    /// counts still pending and drains the replication queues: entries and purges the origin
    /// accepted are sent within `server.shutdown_timeout_secs`, and what is not is logged.
    pub async fn run(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.service.budget().flush(budget::unix_now()).await;
        self.service.meter().traffic().flush().await;
        let left = self.replicator.drain(self.shutdown_timeout).await;
        if left == replicate::Drained::default() {
            tracing::info!("replication drained; stopped");
        }
        result
    }
}
