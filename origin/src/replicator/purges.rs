//! The purge lane: purge records from the shared log (and purges queued here while Redis was
//! down), merged per tenant and sent in a task of their own, so a tenant's purge backlog never
//! holds up any tenant's writes. A tenant purge is one Config Store update (the tenant's new
//! purge generation, which the edge checks) when a Config Store is configured, else a listing
//! and one delete per key; a key purge is one delete. Never writes an entry.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use gateway_common::key::CacheKey;

use super::caller::Caller;
use super::log::{self, Held, Record};
use super::{Shared, Timing};
use crate::config_api::ConfigStoreApi;
use crate::kv_api::{KvApiError, RequestKind};

/// What a purge covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scope {
    /// One KV key (`v1/<tenant>/<hex>`) of `tenant`.
    Key { tenant: String, kv_key: String },
    /// Every entry of `tenant` written before `generation`: the edge refuses them once its
    /// tenant record carries the generation.
    Generation { tenant: String, generation: u64 },
    /// Every KV key of a tenant, listed and deleted (no generation could be recorded).
    Tenant(String),
}

impl Scope {
    fn tenant(&self) -> &str {
        match self {
            Scope::Key { tenant, .. }
            | Scope::Generation { tenant, .. }
            | Scope::Tenant(tenant) => tenant,
        }
    }

    /// The scope a purge record of the log describes; `None` for a malformed record.
    fn of(record: &Record) -> Option<Scope> {
        let field = |name: &str| record.fields.get(name).cloned();
        let tenant = field("t")?;
        match field("op")?.as_str() {
            "key" => Some(Scope::Key {
                tenant,
                kv_key: field("k")?,
            }),
            "gen" => Some(Scope::Generation {
                tenant,
                generation: field("g")?.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// A tenant's pending purge work, merged: a tenant-wide purge covers the key purges queued
/// before it (their entries are older than it), never those queued after.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Job {
    /// The newest purge generation to carry to the edge.
    generation: Option<u64>,
    /// List and delete every KV key of the tenant.
    list_all: bool,
    keys: BTreeSet<String>,
    /// The log records merged into this job, acknowledged once it is done.
    ids: Vec<String>,
}

impl Job {
    /// Slots it takes in the queue: a tenant-wide purge one, key purges one per key.
    fn size(&self) -> usize {
        usize::from(self.generation.is_some() || self.list_all) + self.keys.len()
    }

    fn merge(&mut self, scope: &Scope) {
        match scope {
            Scope::Key { kv_key, .. } => {
                self.keys.insert(kv_key.clone());
            }
            Scope::Generation { generation, .. } => {
                self.generation = Some(self.generation.map_or(*generation, |g| g.max(*generation)));
                self.keys.clear();
            }
            Scope::Tenant(_) => {
                self.list_all = true;
                self.keys.clear();
            }
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

    /// Merges a purge queued in this process into the tenant's pending job. `Ok(true)` when
    /// a job was already waiting. A purge that does not grow the queue (a tenant-wide one over
    /// waiting key purges) is always taken.
    pub(super) fn push(&mut self, scope: &Scope, id: Option<String>) -> Result<bool, Full> {
        self.add(scope, id, true)
    }

    /// Merges a purge record of the log: the log is durable and bounded already, so it is
    /// taken whatever the capacity (it must not be lost between the log and the queue).
    pub(super) fn merge(&mut self, scope: &Scope, id: String) -> bool {
        matches!(self.add(scope, Some(id), false), Ok(true))
    }

    fn add(&mut self, scope: &Scope, id: Option<String>, bounded: bool) -> Result<bool, Full> {
        let tenant = scope.tenant();
        let existed = self.jobs.contains_key(tenant);
        let mut job = self.jobs.get(tenant).cloned().unwrap_or_default();
        let old_size = job.size();
        job.merge(scope);
        let size = self.size - old_size + job.size();
        if bounded && size > self.size && size > self.capacity {
            return Err(Full);
        }
        job.ids.extend(id);
        self.size = size;
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

    /// Slots in use: waiting tenant-wide purges plus waiting key purges.
    pub(super) fn len(&self) -> usize {
        self.size
    }

    pub(super) fn is_empty(&self) -> bool {
        self.size == 0
    }
}

/// The task that sends purges; see the module doc.
pub(super) struct PurgeLane {
    pub(super) shared: Arc<Shared>,
    pub(super) caller: Caller,
    /// The Config Store `tenants`, when configured.
    pub(super) config_api: Option<ConfigStoreApi>,
    pub(super) timing: Timing,
}

/// How a job ended: acknowledge its records, or leave them for a retry by any replica.
enum Done {
    Ack,
    Retry,
}

impl PurgeLane {
    pub(super) async fn run(self) {
        let mut next_claim = Instant::now();
        // Records wait in the queue (merged) and while sent: kept alive all along.
        let held = self
            .shared
            .log
            .hold(log::PURGES, self.timing.claim_idle / 3);
        loop {
            let found = self.take_records(&mut next_claim, &held).await;
            let job = {
                let mut state = self.shared.lock();
                let job = state.purges.pop();
                self.shared
                    .metrics
                    .purge_queue_depth
                    .set(state.purges.len() as i64);
                state.purges_idle = job.is_none() && !found;
                if job.is_none() && state.closed {
                    return;
                }
                job
            };
            let Some((tenant, job)) = job else {
                tokio::select! {
                    () = self.shared.purge_ready.notified() => {}
                    () = tokio::time::sleep(self.timing.poll) => {}
                }
                continue;
            };
            let ids = job.ids.clone();
            match self.send(&tenant, job).await {
                Done::Ack => {
                    let _ = self.shared.log.ack(log::PURGES, &ids).await;
                }
                // Left pending: claimed again after `claim_idle` (by this replica or another).
                Done::Retry => self.caller.metrics.deferred.inc(),
            }
            held.remove(&ids);
        }
    }

    /// Moves purge records from the log (new ones, and a dead replica's) into the queue;
    /// whether there were any.
    async fn take_records(&self, next_claim: &mut Instant, held: &Held) -> bool {
        let mut records = Vec::new();
        if Instant::now() >= *next_claim {
            *next_claim = Instant::now() + self.timing.claim_idle / 2;
            records.extend(
                self.shared
                    .log
                    .claim(log::PURGES, self.timing.claim_idle, 100)
                    .await
                    .unwrap_or_default(),
            );
        }
        // Everything waiting, so a burst of purges merges into one job per tenant rather than
        // being sent as it trickles in.
        loop {
            let page = self
                .shared
                .log
                .read(log::PURGES, 100)
                .await
                .unwrap_or_default();
            let full = page.len() == 100;
            records.extend(page);
            if !full || records.len() >= 10_000 {
                break;
            }
        }
        if records.is_empty() {
            return false;
        }
        held.add(records.iter().map(|r| &r.id));
        let mut malformed = Vec::new();
        let mut merged = 0;
        {
            let mut state = self.shared.lock();
            for record in records {
                let Some(scope) = Scope::of(&record) else {
                    malformed.push(record.id);
                    continue;
                };
                if state.purges.merge(&scope, record.id) {
                    merged += 1;
                }
            }
        }
        self.caller.metrics.purges_merged.inc_by(merged);
        let _ = self.shared.log.ack(log::PURGES, &malformed).await;
        held.remove(&malformed);
        true
    }

    async fn send(&self, tenant: &str, job: Job) -> Done {
        if let Some(generation) = job.generation {
            match &self.config_api {
                Some(api) => {
                    if let Done::Retry = self.publish_generation(api, tenant, generation).await {
                        return Done::Retry;
                    }
                }
                None => self.purge_tenant(tenant).await,
            }
        }
        if job.list_all {
            self.purge_tenant(tenant).await;
        }
        for key in &job.keys {
            self.delete(key).await;
        }
        Done::Ack
    }

    /// One Config Store request carrying the tenant's new generation in each of its records.
    async fn publish_generation(
        &self,
        api: &ConfigStoreApi,
        tenant: &str,
        generation: u64,
    ) -> Done {
        let items = self.shared.tenant_records(tenant, generation);
        if items.is_empty() {
            tracing::warn!(
                tenant,
                "replication: a purge generation for a tenant this replica does not know; the edge learns it when its records are next written"
            );
            return Done::Ack;
        }
        let result = self
            .caller
            .call(RequestKind::Config, |_| {
                let api = api.clone();
                let items = &items;
                async move { api.upsert(items).await.map(|a| ((), a)) }
            })
            .await;
        match result {
            Ok(()) => {
                self.caller.metrics.generations.inc();
                Done::Ack
            }
            Err(e) if e.is_retryable() => {
                if let Some(suppressed) = self.caller.log.admit() {
                    tracing::warn!(tenant, error = %e, suppressed, "replication: the purge generation did not reach the Config Store; retried later");
                }
                Done::Retry
            }
            Err(e) => {
                self.caller.metrics.count_dropped("purge_failed", 1);
                tracing::warn!(tenant, error = %e, "replication: the Config Store refused the purge generation; the tenant's KV entries expire by TTL");
                Done::Ack
            }
        }
    }

    /// Lists the tenant's KV keys and deletes each (the API has no bulk delete).
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

    fn generation(tenant: &str, generation: u64) -> Scope {
        Scope::Generation {
            tenant: tenant.into(),
            generation,
        }
    }

    #[test]
    fn a_tenant_purge_covers_the_key_purges_before_it_and_not_those_after() {
        let mut queue = PurgeQueue::new(10);
        assert_eq!(queue.push(&key("acme", "a"), Some("1-0".into())), Ok(false));
        assert_eq!(queue.push(&key("globex", "g"), None), Ok(false));
        assert_eq!(queue.push(&key("acme", "b"), Some("2-0".into())), Ok(true));
        assert_eq!(queue.len(), 3);
        assert_eq!(
            queue.push(&generation("acme", 4), Some("3-0".into())),
            Ok(true)
        );
        assert_eq!(queue.len(), 2, "acme's two keys became one tenant purge");
        for n in 5..300 {
            assert_eq!(queue.push(&generation("acme", n), None), Ok(true));
        }
        assert_eq!(queue.push(&key("acme", "c"), Some("9-0".into())), Ok(true));
        assert_eq!(
            queue.len(),
            3,
            "a flood stays one job, plus the key purged after it"
        );
        let (tenant, job) = queue.pop().unwrap();
        assert_eq!(tenant, "acme");
        assert_eq!(job.generation, Some(299), "the newest generation");
        assert_eq!(job.keys, BTreeSet::from(["v1/acme/c".to_string()]));
        assert_eq!(
            job.ids,
            ["1-0", "2-0", "3-0", "9-0"],
            "every record acknowledged"
        );
        assert_eq!(queue.pop().unwrap().0, "globex");
        assert!(queue.is_empty());
        assert_eq!(queue.pop(), None);
    }

    #[test]
    fn a_full_queue_refuses_new_work_but_still_takes_a_tenant_purge_that_shrinks_it() {
        let mut queue = PurgeQueue::new(2);
        queue.push(&key("acme", "a"), None).unwrap();
        queue.push(&key("acme", "b"), None).unwrap();
        assert_eq!(queue.push(&key("acme", "c"), None), Err(Full));
        assert_eq!(queue.push(&Scope::Tenant("globex".into()), None), Err(Full));
        assert_eq!(queue.push(&Scope::Tenant("acme".into()), None), Ok(true));
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.push(&generation("globex", 1), None), Ok(false));
        assert_eq!(queue.push(&Scope::Tenant("acme".into()), None), Ok(true));
    }

    #[test]
    fn log_records_become_scopes_and_malformed_ones_none() {
        let record = |fields: &[(&str, &str)]| Record {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(
            Scope::of(&record(&[("op", "key"), ("t", "acme"), ("k", "v1/acme/x")])),
            Some(key("acme", "x"))
        );
        assert_eq!(
            Scope::of(&record(&[("op", "gen"), ("t", "acme"), ("g", "7")])),
            Some(generation("acme", 7))
        );
        assert_eq!(Scope::of(&record(&[("op", "gen"), ("t", "acme")])), None);
        assert_eq!(Scope::of(&record(&[("op", "nuke"), ("t", "acme")])), None);
    }
}
