//! The in-memory [`Store`], **for tests**: no eviction, a coarse TTL, a switch that makes
//! every call fail. Not for production (it is per process, so replicas would not share it).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use super::{Claim, CounterOp, Store, StoreError, StoreResult, Watched};

/// Key → (value, expiry).
type MemoryMap = HashMap<String, (Vec<u8>, Option<Instant>)>;
/// Set key → (members, expiry): the semantic index's buckets.
type MemorySets = HashMap<String, (BTreeSet<String>, Instant)>;

/// An in-memory [`Store`] **for tests**: no eviction, a coarse TTL, a switch that makes every
/// call fail. Not for production (it is per process, so replicas would not share it).
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<MemoryMap>,
    sets: Mutex<MemorySets>,
    failing: AtomicBool,
    calls: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// While on, every call fails with [`StoreError::Unavailable`].
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// How many calls were made (including failed ones).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_sets(&self) -> std::sync::MutexGuard<'_, MemorySets> {
        self.sets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable)
        } else {
            Ok(())
        }
    }

    fn live(&self, key: &str) -> Option<Vec<u8>> {
        let mut map = self.lock();
        match map.get(key) {
            Some((_, Some(expiry))) if *expiry <= Instant::now() => {
                map.remove(key);
                None
            }
            Some((value, _)) => Some(value.clone()),
            None => None,
        }
    }
}

/// `prefix*` patterns only (the only kind the origin uses).
/// The purge generation in an entry's envelope line (0 when absent or unreadable).
fn entry_generation(value: &[u8]) -> u64 {
    let line = value.split(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|envelope| envelope.get("generation").and_then(|g| g.as_u64()))
        .unwrap_or(0)
}

fn pattern_matches(pattern: &str, key: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => key == pattern,
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreResult<'a, Option<Vec<u8>>> {
        async move {
            self.check()?;
            Ok(self.live(key))
        }
        .boxed()
    }

    fn set_ex<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl_secs: u64) -> StoreResult<'a, ()> {
        async move {
            self.check()?;
            let expiry = Instant::now() + Duration::from_secs(ttl_secs.max(1));
            self.lock().insert(key.to_string(), (value, Some(expiry)));
            Ok(())
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreResult<'a, bool> {
        async move {
            self.check()?;
            Ok(self.lock().remove(key).is_some())
        }
        .boxed()
    }

    fn purge<'a>(&'a self, pattern: &'a str, generation: u64) -> StoreResult<'a, u64> {
        async move {
            self.check()?;
            let mut map = self.lock();
            let before = map.len();
            map.retain(|k, (value, _)| {
                !pattern_matches(pattern, k) || entry_generation(value) >= generation
            });
            Ok((before - map.len()) as u64)
        }
        .boxed()
    }

    fn counters<'a>(&'a self, ops: &'a [CounterOp]) -> StoreResult<'a, Vec<u64>> {
        async move {
            self.check()?;
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    CounterOp::Incr { key, by, ttl_secs } => {
                        let current = self
                            .live(key)
                            .and_then(|v| String::from_utf8(v).ok())
                            .and_then(|s| s.parse::<u64>().ok())
                            .unwrap_or(0);
                        let next = current.saturating_add(*by);
                        let expiry = Instant::now() + Duration::from_secs((*ttl_secs).max(1));
                        self.lock()
                            .insert(key.clone(), (next.to_string().into_bytes(), Some(expiry)));
                        out.push(next);
                    }
                    CounterOp::Get { key } => out.push(
                        self.live(key)
                            .and_then(|v| String::from_utf8(v).ok())
                            .and_then(|s| s.parse::<u64>().ok())
                            .unwrap_or(0),
                    ),
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn ping(&self) -> StoreResult<'_, ()> {
        async move { self.check() }.boxed()
    }

    fn claim_flight<'a>(
        &'a self,
        entry_key: &'a str,
        lock_key: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreResult<'a, Claim> {
        async move {
            self.check()?;
            if let Some(entry) = self.live(entry_key) {
                return Ok(Claim::Entry(entry));
            }
            if self.live(lock_key).is_some() {
                return Ok(Claim::Held);
            }
            let expiry = Instant::now() + Duration::from_millis(ttl_ms.max(1));
            self.lock().insert(
                lock_key.to_string(),
                (holder.as_bytes().to_vec(), Some(expiry)),
            );
            Ok(Claim::Lead)
        }
        .boxed()
    }

    fn watch_flight<'a>(
        &'a self,
        entry_key: &'a str,
        result_key: &'a str,
        lock_key: &'a str,
    ) -> StoreResult<'a, Watched> {
        async move {
            self.check()?;
            Ok(Watched {
                entry: self.live(entry_key),
                result: self.live(result_key),
                held: self.live(lock_key).is_some(),
            })
        }
        .boxed()
    }

    fn keep_flight<'a>(
        &'a self,
        lock_key: &'a str,
        holder: &'a str,
        ttl_ms: Option<u64>,
    ) -> StoreResult<'a, ()> {
        async move {
            self.check()?;
            if self.live(lock_key).as_deref() != Some(holder.as_bytes()) {
                return Ok(());
            }
            let mut map = self.lock();
            match ttl_ms {
                Some(ms) => {
                    if let Some((_, expiry)) = map.get_mut(lock_key) {
                        *expiry = Some(Instant::now() + Duration::from_millis(ms.max(1)));
                    }
                }
                None => {
                    map.remove(lock_key);
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn set_px<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl_ms: u64) -> StoreResult<'a, ()> {
        async move {
            self.check()?;
            let expiry = Instant::now() + Duration::from_millis(ttl_ms.max(1));
            self.lock().insert(key.to_string(), (value, Some(expiry)));
            Ok(())
        }
        .boxed()
    }

    fn index_add<'a>(
        &'a self,
        sets: &'a [String],
        member: &'a str,
        value_key: &'a str,
        value: Vec<u8>,
        ttl_secs: u64,
    ) -> StoreResult<'a, ()> {
        async move {
            self.check()?;
            let expiry = Instant::now() + Duration::from_secs(ttl_secs.max(1));
            self.lock()
                .insert(value_key.to_string(), (value, Some(expiry)));
            let mut all = self.lock_sets();
            for set in sets {
                let (members, until) = all
                    .entry(set.clone())
                    .or_insert_with(|| (BTreeSet::new(), expiry));
                members.insert(member.to_string());
                *until = (*until).max(expiry);
            }
            Ok(())
        }
        .boxed()
    }

    fn index_union<'a>(&'a self, sets: &'a [String]) -> StoreResult<'a, Vec<String>> {
        async move {
            self.check()?;
            let now = Instant::now();
            let mut all = self.lock_sets();
            all.retain(|_, (_, until)| *until > now);
            let union: BTreeSet<&String> = sets
                .iter()
                .filter_map(|set| all.get(set))
                .flat_map(|(members, _)| members.iter())
                .collect();
            Ok(union.into_iter().cloned().collect())
        }
        .boxed()
    }

    fn index_remove<'a>(
        &'a self,
        sets: &'a [String],
        members: &'a [String],
    ) -> StoreResult<'a, ()> {
        async move {
            self.check()?;
            let mut all = self.lock_sets();
            for set in sets {
                if let Some((present, _)) = all.get_mut(set) {
                    members.iter().for_each(|m| {
                        present.remove(m);
                    });
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> StoreResult<'a, Vec<Option<Vec<u8>>>> {
        async move {
            self.check()?;
            Ok(keys.iter().map(|k| self.live(k)).collect())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_memory_store_round_trips_and_purges_by_prefix() {
        let s = MemoryStore::new();
        s.set_ex("gw:v1:acme:aa", b"x".to_vec(), 60).await.unwrap();
        s.set_ex("gw:v1:acme:bb", b"y".to_vec(), 60).await.unwrap();
        s.set_ex("gw:v1:globex:aa", b"z".to_vec(), 60)
            .await
            .unwrap();
        s.set_ex(
            "gw:v1:acme:cc",
            br#"{"generation":2}
body"#
                .to_vec(),
            60,
        )
        .await
        .unwrap();
        assert_eq!(s.get("gw:v1:acme:aa").await.unwrap(), Some(b"x".to_vec()));
        assert_eq!(s.purge("gw:v1:acme:*", 2).await.unwrap(), 2);
        assert_eq!(s.get("gw:v1:acme:bb").await.unwrap(), None);
        assert!(
            s.delete("gw:v1:acme:cc").await.unwrap(),
            "written since: kept"
        );
        assert!(s.delete("gw:v1:globex:aa").await.unwrap());
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn memory_counters_increment_and_read() {
        let s = MemoryStore::new();
        let ops = [
            CounterOp::Incr {
                key: "a".into(),
                by: 5,
                ttl_secs: 10,
            },
            CounterOp::Get { key: "b".into() },
        ];
        assert_eq!(s.counters(&ops).await.unwrap(), vec![5, 0]);
        assert_eq!(s.counters(&ops).await.unwrap(), vec![10, 0]);
    }

    #[tokio::test]
    async fn a_failing_memory_store_errors() {
        let s = MemoryStore::new();
        s.set_failing(true);
        assert!(s.get("k").await.is_err());
        assert!(s.ping().await.is_err());
    }
}
