//! Purging by pattern: `SCAN` every node that holds keys (the one node, or every primary of a
//! cluster, found with `CLUSTER SLOTS`), then one generation-checking script per key found,
//! batched by slot. Best effort under resharding: a key moved mid-scan may be missed, which
//! the purge generation covers (an entry of an older generation is a miss when read).

use redis::Value;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::StoreError;
use super::batch::Batch;
use super::conn::Conn;
use super::redis::RedisStore;
use super::scripts::UNLINK_OLDER;

/// Keys asked for per `SCAN` page.
const PAGE: u64 = 1000;

/// A node to scan: `None` is "the connection's node" (single-node Redis).
type Node = Option<(String, u16)>;

impl RedisStore {
    /// See [`super::Store::purge`].
    pub(super) async fn purge_older(
        &self,
        pattern: &str,
        generation: u64,
    ) -> Result<u64, StoreError> {
        let nodes = if self.is_cluster() {
            self.run("scan", |c| async move { primaries(c).await })
                .await?
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        let mut deleted = 0;
        for node in &nodes {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = self
                    .run("scan", move |c| async move {
                        scan_page(c, node, cursor, pattern).await
                    })
                    .await?;
                if !keys.is_empty() {
                    let mut batch = Batch::new();
                    for key in &keys {
                        // One script per key: each touches one key, so a cluster routes each
                        // to its slot, and an entry a request wrote since the purge (the
                        // current generation) is kept.
                        let mut eval = redis::cmd("EVAL");
                        eval.arg(UNLINK_OLDER).arg(1).arg(key).arg(generation);
                        batch.push(key, eval);
                    }
                    deleted += self
                        .run_batch("unlink", batch)
                        .await?
                        .iter()
                        .filter_map(|v| redis::from_redis_value::<u64>(v).ok())
                        .sum::<u64>();
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
    }
}

/// One `SCAN cursor MATCH pattern COUNT n` page on `node`: the next cursor and the keys.
async fn scan_page(
    mut conn: Conn,
    node: &Node,
    cursor: u64,
    pattern: &str,
) -> redis::RedisResult<(u64, Vec<String>)> {
    let mut scan = redis::cmd("SCAN");
    scan.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(PAGE);
    match (&mut conn, node) {
        (Conn::Cluster(cluster), Some((host, port))) => {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            let reply = cluster.route_command(&scan, routing).await?;
            redis::from_redis_value(&reply)
        }
        _ => scan.query_async(&mut conn).await,
    }
}

/// Every primary of the cluster, from `CLUSTER SLOTS`
/// (`[[start, end, [host, port, id, ...], replica...], ...]`).
async fn primaries(mut conn: Conn) -> redis::RedisResult<Vec<(String, u16)>> {
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await?;
    let mut nodes: Vec<(String, u16)> = Vec::new();
    if let Value::Array(ranges) = reply {
        for range in ranges {
            let Value::Array(parts) = range else { continue };
            let Some(Value::Array(primary)) = parts.get(2) else {
                continue;
            };
            let host: Option<String> = primary
                .first()
                .and_then(|v| redis::from_redis_value(v).ok());
            let port: Option<u16> = primary.get(1).and_then(|v| redis::from_redis_value(v).ok());
            if let (Some(host), Some(port)) = (host, port)
                && !nodes.contains(&(host.clone(), port))
            {
                nodes.push((host, port));
            }
        }
    }
    Ok(nodes)
}
