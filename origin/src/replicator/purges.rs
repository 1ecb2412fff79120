//! The purge lane: pending purges merged per tenant (a tenant purge supersedes that tenant's
//! queued key purges and earlier tenant purges), bounded, and sent by a task of their own, so
//! a tenant's purge backlog never holds up any tenant's writes. Never writes an entry.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use gateway_common::key::CacheKey;

use super::Shared;
use super::caller::Caller;
use crate::kv_api::{KvApiError, RequestKind};

/// What a purge covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scope {
    /// One KV key (`v1/<tenant>/<hex>`) of `tenant`.
    Key { tenant: String, kv_key: String },
    /// Every key of a tenant.
    Tenant(String),
}

impl Scope {
    pub(super) fn tenant(&self) -> &str {
        match self {
            Scope::Key { tenant, .. } | Scope::Tenant(tenant) => tenant,
        }
    }

    /// Whether a write of `kv_key` for `tenant` falls under this purge.
    pub(super) fn covers(&self, tenant: &str, kv_key: &str) -> bool {
        match self {
            Scope::Key { kv_key: key, .. } => key == kv_key,
            Scope::Tenant(purged) => purged == tenant,
        }
    }

    /// The KV key or tenant prefix, as [`super::dedup::Dedup::purge`] records it.
    pub(super) fn prefix(&self) -> String {
        match self {
            Scope::Key { kv_key, .. } => kv_key.clone(),
            Scope::Tenant(tenant) => CacheKey::kv_prefix(tenant),
        }
    }
}

/// A tenant's pending purge work. `seq` is the newest purge merged into it: the lane waits
/// until no write filtered before that purge is still in flight (see [`Shared::settled`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Job {
    All { seq: u64 },
    Keys { keys: BTreeSet<String>, seq: u64 },
}

impl Job {
    fn seq(&self) -> u64 {
        match self {
            Job::All { seq } | Job::Keys { seq, .. } => *seq,
        }
    }

    /// Slots it takes in the queue: a tenant purge one, key purges one per key.
    fn size(&self) -> usize {
        match self {
            Job::All { .. } => 1,
            Job::Keys { keys, .. } => keys.len(),
        }
    }
}

/// The purge queue was full; the caller must hear it (503), never a 200 for a purge that
/// will not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Full;

/// Pending purges, one job per tenant, tenants served in arrival order.
#[derive(Debug)]
pub(super) struct PurgeQueue {
    order: VecDeque<String>,
    jobs: HashMap<String, Job>,
    size: usize,
    capacity: usize,
}

impl PurgeQueue {
    pub(super) fn new(capacity: usize) -> PurgeQueue {
        PurgeQueue {
            order: VecDeque::new(),
            jobs: HashMap::new(),
            size: 0,
            capacity: capacity.max(1),
        }
    }

    /// Adds `scope` (recorded as purge number `seq`), merged into the tenant's pending job.
    /// `Ok(true)` when it merged into one already waiting. A tenant purge of a tenant already
    /// waiting never fails: it only shrinks the queue.
    pub(super) fn push(&mut self, scope: &Scope, seq: u64) -> Result<bool, Full> {
        let tenant = scope.tenant();
        let merged = self.jobs.get(tenant).map(|job| match (job, scope) {
            (Job::All { seq: old }, _) => Job::All {
                seq: (*old).max(seq),
            },
            (Job::Keys { .. }, Scope::Tenant(_)) => Job::All { seq },
            (Job::Keys { keys, seq: old }, Scope::Key { kv_key, .. }) => {
                let mut keys = keys.clone();
                keys.insert(kv_key.clone());
                Job::Keys {
                    keys,
                    seq: (*old).max(seq),
                }
            }
        });
        let (job, old_size) = match merged {
            Some(job) => (job, self.jobs.get(tenant).map_or(0, Job::size)),
            None => (
                match scope {
                    Scope::Tenant(_) => Job::All { seq },
                    Scope::Key { kv_key, .. } => Job::Keys {
                        keys: BTreeSet::from([kv_key.clone()]),
                        seq,
                    },
                },
                0,
            ),
        };
        let size = self.size - old_size + job.size();
        if size > self.size && size > self.capacity {
            return Err(Full);
        }
        self.size = size;
        let existed = old_size > 0;
        if !existed {
            self.order.push_back(tenant.to_string());
        }
        self.jobs.insert(tenant.to_string(), job);
        Ok(existed)
    }

    /// The next tenant's job, in arrival order.
    pub(super) fn pop(&mut self) -> Option<(String, Job)> {
        let tenant = self.order.pop_front()?;
        let job = self.jobs.remove(&tenant)?;
        self.size -= job.size();
        Some((tenant, job))
    }

    /// Slots in use: waiting tenant purges plus waiting key purges.
    pub(super) fn len(&self) -> usize {
        self.size
    }

    pub(super) fn is_empty(&self) -> bool {
        self.size == 0
    }
}

/// The task that sends purges: waits until no write offered before the purge can still land,
/// then deletes (a tenant purge lists the tenant's keys first: the API has no bulk delete).
pub(super) struct PurgeLane {
    pub(super) shared: Arc<Shared>,
    pub(super) caller: Caller,
}

impl PurgeLane {
    pub(super) async fn run(self) {
        while let Some((tenant, job)) = self.shared.next_purge().await {
            // A write filtered before this purge was recorded may still be on its way to the
            // API: deleting first would let it land after the delete.
            self.shared.settled(job.seq()).await;
            match job {
                Job::All { .. } => self.purge_tenant(&tenant).await,
                Job::Keys { keys, .. } => {
                    for key in keys {
                        self.delete(&key).await;
                    }
                }
            }
            self.shared.purge_done();
        }
    }

    async fn purge_tenant(&self, tenant: &str) {
        let keys = match self.list_tenant(tenant).await {
            Ok(keys) => keys,
            Err((keys, e)) => {
                // Delete what was listed; the rest expires by TTL (the edge also judges
                // freshness from the envelope).
                self.caller.metrics.count_dropped("purge_failed", 1);
                tracing::warn!(tenant, error = %e, listed = keys.len(), "replication: listing a tenant's KV keys for a purge failed");
                keys
            }
        };
        for key in keys {
            self.delete(&key).await;
        }
    }

    async fn delete(&self, key: &str) {
        let result = self
            .caller
            .call(RequestKind::Delete, |api| async move {
                api.delete(key).await.map(|a| ((), a))
            })
            .await;
        match result {
            Ok(()) => self.caller.metrics.purged.inc(),
            Err(e) => {
                self.caller.metrics.count_dropped("purge_failed", 1);
                if let Some(suppressed) = self.caller.log.admit() {
                    tracing::warn!(key, error = %e, suppressed, "replication: a KV delete failed; the entry expires by TTL");
                }
            }
        }
    }

    /// Every KV key of `tenant`. On failure, the keys listed so far and the error.
    async fn list_tenant(&self, tenant: &str) -> Result<Vec<String>, (Vec<String>, KvApiError)> {
        let prefix = CacheKey::kv_prefix(tenant);
        let mut keys = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .caller
                .call(RequestKind::List, |api| {
                    let (prefix, cursor) = (&prefix, cursor.clone());
                    async move { api.list(prefix, cursor.as_deref()).await }
                })
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) => return Err((keys, e)),
            };
            // Never trust the listing to have honoured the prefix: a purge must not reach
            // another tenant's keys.
            keys.extend(page.keys.into_iter().filter(|k| k.starts_with(&prefix)));
            match page.next_cursor {
                Some(next) if cursor.as_deref() != Some(next.as_str()) => cursor = Some(next),
                _ => return Ok(keys),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, hex: &str) -> Scope {
        Scope::Key {
            tenant: tenant.into(),
            kv_key: format!("v1/{tenant}/{hex}"),
        }
    }

    #[test]
    fn a_tenant_purge_supersedes_the_tenants_key_purges_and_earlier_tenant_purges() {
        let mut queue = PurgeQueue::new(10);
        assert_eq!(queue.push(&key("acme", "a"), 1), Ok(false));
        assert_eq!(queue.push(&key("globex", "g"), 2), Ok(false));
        assert_eq!(queue.push(&key("acme", "b"), 3), Ok(true));
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.push(&Scope::Tenant("acme".into()), 4), Ok(true));
        assert_eq!(queue.len(), 2, "acme's two keys became one tenant purge");
        for seq in 5..300 {
            assert_eq!(queue.push(&Scope::Tenant("acme".into()), seq), Ok(true));
            assert_eq!(queue.push(&key("acme", "c"), seq), Ok(true));
        }
        assert_eq!(queue.len(), 2, "a flood of purges stays one job");
        // Tenants keep their arrival order; a merged job carries the newest purge's number.
        assert_eq!(queue.pop(), Some(("acme".into(), Job::All { seq: 299 })));
        assert_eq!(
            queue.pop(),
            Some((
                "globex".into(),
                Job::Keys {
                    keys: BTreeSet::from(["v1/globex/g".to_string()]),
                    seq: 2
                }
            ))
        );
        assert!(queue.is_empty());
        assert_eq!(queue.pop(), None);
    }

    #[test]
    fn a_full_queue_refuses_new_work_but_still_takes_a_tenant_purge_that_shrinks_it() {
        let mut queue = PurgeQueue::new(2);
        queue.push(&key("acme", "a"), 1).unwrap();
        queue.push(&key("acme", "b"), 2).unwrap();
        assert_eq!(queue.push(&key("acme", "c"), 3), Err(Full));
        assert_eq!(queue.push(&Scope::Tenant("globex".into()), 4), Err(Full));
        assert_eq!(queue.push(&Scope::Tenant("acme".into()), 5), Ok(true));
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.push(&Scope::Tenant("globex".into()), 6), Ok(false));
        assert_eq!(
            queue.push(&key("acme", "d"), 7),
            Ok(true),
            "covered by acme's"
        );
    }

    #[test]
    fn a_scope_covers_its_key_or_its_whole_tenant_only() {
        let k = key("acme", "a");
        assert!(k.covers("acme", "v1/acme/a"));
        assert!(!k.covers("acme", "v1/acme/b"));
        let t = Scope::Tenant("acme".into());
        assert!(t.covers("acme", "v1/acme/b"));
        assert!(!t.covers("acme2", "v1/acme2/b"));
        assert_eq!(t.prefix(), "v1/acme/");
    }
}
