//! The forwards waiting for each peer region, in this region's Redis: one Stream per peer read
//! through one consumer group, so any replica sends what any replica accepted, a record a
//! replica took and did not acknowledge (the peer was down, or the replica died) is taken
//! again after the retry interval, and a restart loses nothing. Keys carry the `{peers}` hash
//! tag (one Redis Cluster slot). Holds no policy: the lane decides what to retry.

use std::sync::Arc;
use std::time::Duration;

use redis::streams::{StreamAutoClaimReply, StreamReadReply};

use crate::store::{RedisStore, StoreError};

const GROUP: &str = "replicas";
/// The one field of a record: the forward's JSON body.
const FIELD: &str = "m";

/// Appends ARGV[2] unless the stream holds ARGV[1] records already: 1 appended, 0 full.
const APPEND: &str = r"
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
return 1";

/// One waiting forward: its stream id and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Forward {
    pub(super) id: String,
    pub(super) body: String,
}

/// Why a forward was not put in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the outbox of peer region {0} is full")]
    Full(String),
    #[error("the outbox is not reachable: {0}")]
    Redis(#[from] StoreError),
    #[error("the forward could not be encoded: {0}")]
    Encode(String),
}

/// The outbox of every peer. What the request path appends goes through the cache's pool;
/// what the lanes read and acknowledge through a pool of their own.
pub(crate) struct Outbox {
    requests: Arc<RedisStore>,
    lanes: Arc<RedisStore>,
    consumer: String,
    capacity: usize,
    append: redis::Script,
}

/// The Redis key of `peer`'s stream.
pub(super) fn stream(peer: &str) -> String {
    format!("gw:{{peers}}:{peer}")
}

impl Outbox {
    pub(crate) fn new(
        requests: Arc<RedisStore>,
        lanes: Arc<RedisStore>,
        consumer: String,
        capacity: usize,
    ) -> Outbox {
        Outbox {
            requests,
            lanes,
            consumer,
            capacity,
            append: redis::Script::new(APPEND),
        }
    }

    /// Creates `peer`'s stream and group if missing (any replica may be first).
    pub(super) async fn ensure_group(&self, peer: &str) -> Result<(), StoreError> {
        let key = stream(peer);
        let created = self
            .lanes
            .run("peer_group", move |mut c| async move {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&key)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        match created {
            Err(StoreError::Redis(e)) if e.contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Puts `body` in `peer`'s outbox, or says why not.
    pub(super) async fn append(&self, peer: &str, body: &str) -> Result<(), OutboxError> {
        let key = stream(peer);
        let script = &self.append;
        let capacity = self.capacity.max(1);
        let appended: u8 = self
            .requests
            .run("peer_append", move |mut c| async move {
                script
                    .key(&key)
                    .arg(capacity)
                    .arg(body)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        match appended {
            1 => Ok(()),
            _ => Err(OutboxError::Full(peer.to_owned())),
        }
    }

    /// Up to `count` forwards to `peer` no replica has taken yet, now taken by this one.
    pub(super) async fn read(&self, peer: &str, count: usize) -> Result<Vec<Forward>, StoreError> {
        let key = stream(peer);
        let consumer = self.consumer.as_str();
        let reply: Option<StreamReadReply> = self
            .lanes
            .run("peer_read", move |mut c| async move {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count.max(1))
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|id| Forward {
                body: id.get::<String>(FIELD).unwrap_or_default(),
                id: id.id,
            })
            .collect())
    }

    /// Up to `count` forwards to `peer` taken at least `min_idle` ago and not acknowledged
    /// (a failed send, or a replica that died), now taken by this one.
    pub(super) async fn claim(
        &self,
        peer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Forward>, StoreError> {
        let key = stream(peer);
        let consumer = self.consumer.as_str();
        let reply: StreamAutoClaimReply = self
            .lanes
            .run("peer_claim", move |mut c| async move {
                redis::cmd("XAUTOCLAIM")
                    .arg(&key)
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(min_idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count.max(1))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(reply
            .claimed
            .into_iter()
            .map(|id| Forward {
                body: id.get::<String>(FIELD).unwrap_or_default(),
                id: id.id,
            })
            .collect())
    }

    /// Done with `ids` (delivered, or refused for good): acknowledged and removed.
    pub(super) async fn ack(&self, peer: &str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let key = stream(peer);
        self.lanes
            .run("peer_ack", move |mut c| async move {
                redis::pipe()
                    .cmd("XACK")
                    .arg(&key)
                    .arg(GROUP)
                    .arg(ids)
                    .ignore()
                    .cmd("XDEL")
                    .arg(&key)
                    .arg(ids)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    /// Forwards waiting for `peer` (taken or not).
    pub(super) async fn len(&self, peer: &str) -> Result<usize, StoreError> {
        let key = stream(peer);
        self.lanes
            .run("peer_len", move |mut c| async move {
                redis::cmd("XLEN").arg(&key).query_async(&mut c).await
            })
            .await
    }
}
