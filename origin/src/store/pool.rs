//! Where connections come from: deadpool-redis's pools (single node or cluster), or deadpool
//! with our own manager that skips deadpool-redis's PING on every checkout. Both hand out a
//! [`Conn`]; `redis.pool` chooses, and the bench measures the difference.

use std::sync::Arc;

use deadpool::managed::{self, PoolError, TimeoutType};
use redis::cluster_async::ClusterConnection;

use super::StoreError;
use super::conn::Conn;
use crate::settings::{RedisMode, RedisPool, RedisSettings, ms};

/// Creates single-node or cluster connections with our connect and response timeouts; a
/// recycle is free (a connection that failed is detached by the caller instead).
pub struct ConnManager {
    target: Target,
}

// One manager per pool, built once: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Target {
    Single {
        client: redis::Client,
        config: redis::AsyncConnectionConfig,
    },
    Cluster(Arc<SharedCluster>),
}

/// One cluster connection shared by every pooled entry. A cluster connection is already
/// multiplexed over a connection per node, and opening one costs a connection to every node
/// plus a `CLUSTER SLOTS`: a cold pool of 32 would open 32 of them at once. Entries are clones;
/// after a failure the shared one is dropped, so the next entry opens a fresh one (and reads
/// the topology afresh).
pub struct SharedCluster {
    client: redis::cluster::ClusterClient,
    current: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl SharedCluster {
    async fn connect(&self) -> Result<ClusterConnection, redis::RedisError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.client.get_async_connection().await?;
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the shared connection (it failed); waits for no one.
    fn reset(&self) {
        if let Ok(mut current) = self.current.try_lock() {
            *current = None;
        }
    }
}

impl managed::Manager for ConnManager {
    type Type = Conn;
    type Error = redis::RedisError;

    async fn create(&self) -> Result<Conn, redis::RedisError> {
        match &self.target {
            Target::Single { client, config } => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Conn::Single),
            Target::Cluster(shared) => shared.connect().await.map(Conn::Cluster),
        }
    }

    async fn recycle(
        &self,
        _conn: &mut Conn,
        _metrics: &managed::Metrics,
    ) -> managed::RecycleResult<redis::RedisError> {
        Ok(())
    }
}

/// The pool `redis.pool` and `redis.mode` chose.
pub enum Pool {
    /// Our manager; on a cluster, the connection its entries share.
    Multiplexed(managed::Pool<ConnManager>, Option<Arc<SharedCluster>>),
    DeadpoolRedis(deadpool_redis::Pool),
    DeadpoolRedisCluster(deadpool_redis::cluster::Pool),
}

/// A checked-out connection: it stays checked out (bounding concurrency) until dropped.
pub enum Lease {
    Multiplexed(managed::Object<ConnManager>),
    DeadpoolRedis(deadpool_redis::Connection),
    DeadpoolRedisCluster(deadpool_redis::cluster::Connection),
}

#[derive(Debug, thiserror::Error)]
pub enum PoolSetupError {
    /// Names the setting, never the URL (it may hold a password).
    #[error("{0}: not a usable redis URL ({1})")]
    Url(&'static str, String),
    #[error("redis pool: {0}")]
    Build(String),
}

impl Pool {
    /// Builds the pool; connects lazily, so a Redis that is down at start-up is not an error.
    pub fn new(settings: &RedisSettings) -> Result<Pool, PoolSetupError> {
        // The parse error may quote the URL: only its kind is kept.
        let url_error = |key: &'static str| {
            move |e: redis::RedisError| PoolSetupError::Url(key, format!("{:?}", e.kind()))
        };
        let seeds: Vec<&str> = settings.cluster_urls.iter().map(|u| u.expose()).collect();
        let connect = ms(settings.connect_timeout_ms);
        let response = ms(settings.response_timeout_ms);
        macro_rules! bounded {
            ($builder:expr) => {
                $builder
                    .max_size(settings.pool_size)
                    .wait_timeout(Some(ms(settings.pool_wait_timeout_ms)))
                    .create_timeout(Some(connect))
                    .recycle_timeout(Some(response))
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()
                    .map_err(|e| PoolSetupError::Build(e.to_string()))
            };
        }
        Ok(match (settings.pool, settings.mode) {
            (RedisPool::Multiplexed, RedisMode::Single) => {
                let client =
                    redis::Client::open(settings.url.expose()).map_err(url_error("redis.url"))?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(response);
                let target = Target::Single { client, config };
                Pool::Multiplexed(
                    bounded!(managed::Pool::builder(ConnManager { target }))?,
                    None,
                )
            }
            (RedisPool::Multiplexed, RedisMode::Cluster) => {
                let client = redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(connect)
                    .response_timeout(response)
                    .build()
                    .map_err(url_error("redis.cluster_urls"))?;
                let shared = Arc::new(SharedCluster {
                    client,
                    current: tokio::sync::Mutex::new(None),
                });
                let target = Target::Cluster(Arc::clone(&shared));
                Pool::Multiplexed(
                    bounded!(managed::Pool::builder(ConnManager { target }))?,
                    Some(shared),
                )
            }
            (RedisPool::DeadpoolRedis, RedisMode::Single) => {
                let manager = deadpool_redis::Manager::new(settings.url.expose())
                    .map_err(url_error("redis.url"))?;
                Pool::DeadpoolRedis(bounded!(deadpool_redis::Pool::builder(manager))?)
            }
            (RedisPool::DeadpoolRedis, RedisMode::Cluster) => {
                let manager = deadpool_redis::cluster::Manager::new(seeds, false)
                    .map_err(url_error("redis.cluster_urls"))?;
                Pool::DeadpoolRedisCluster(bounded!(deadpool_redis::cluster::Pool::builder(
                    manager
                ))?)
            }
        })
    }

    /// Called when a leased connection failed: a shared cluster connection is dropped too.
    pub fn failed(&self) {
        if let Pool::Multiplexed(_, Some(shared)) = self {
            shared.reset();
        }
    }

    /// A connection, within the pool wait (a full pool is [`StoreError::PoolBusy`]).
    pub async fn lease(&self) -> Result<Lease, StoreError> {
        match self {
            Pool::Multiplexed(p, _) => p.get().await.map(Lease::Multiplexed).map_err(pool_error),
            Pool::DeadpoolRedis(p) => p.get().await.map(Lease::DeadpoolRedis).map_err(pool_error),
            Pool::DeadpoolRedisCluster(p) => p
                .get()
                .await
                .map(Lease::DeadpoolRedisCluster)
                .map_err(pool_error),
        }
    }
}

fn pool_error(e: PoolError<redis::RedisError>) -> StoreError {
    match e {
        PoolError::Timeout(TimeoutType::Wait) => StoreError::PoolBusy,
        PoolError::Timeout(_) => StoreError::Timeout,
        other => StoreError::Pool(other.to_string()),
    }
}

impl Lease {
    /// A handle on the leased connection (a cheap clone of a multiplexed handle).
    pub fn conn(&self) -> Conn {
        match self {
            Lease::Multiplexed(o) => (**o).clone(),
            Lease::DeadpoolRedis(c) => Conn::Single((**c).clone()),
            Lease::DeadpoolRedisCluster(c) => Conn::Cluster((**c).clone()),
        }
    }

    /// Drops the connection from the pool (it failed): the next checkout opens a fresh one,
    /// which on a cluster also reads the topology afresh.
    pub fn detach(self) {
        match self {
            Lease::Multiplexed(o) => drop(managed::Object::take(o)),
            Lease::DeadpoolRedis(c) => drop(deadpool_redis::Connection::take(c)),
            Lease::DeadpoolRedisCluster(c) => drop(deadpool_redis::cluster::Connection::take(c)),
        }
    }
}
