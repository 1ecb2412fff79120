//! Single flight across replicas: before a replica's leading request calls the provider, it
//! takes the key's flight lock in Redis; a replica that finds the lock held follows that
//! flight instead, reading the entry (or the answer the leader published because it will not
//! be cached) when it lands, with a bounded wait. A follower gets the answer whole, a stream
//! included (replayed once complete: only the leader's own replica relays it live). When Redis
//! does not answer, each replica keeps its own single flight: slower, never failing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway_common::entry::{ENTRY_VERSION, Entry, Envelope};
use gateway_common::key::CacheKey;
use gateway_common::policy::{self, Freshness};

use super::flight::Answer;
use super::{Refusal, Service};
use crate::budget::unix_now;
use crate::seal::Sealer;
use crate::store::{Claim, Store};

/// How long a flight lock lives unless its holder renews it (every third of it); a crashed
/// leader's followers wait at most this long before one of them leads.
const LOCK_TTL: Duration = Duration::from_secs(10);

/// How long a leader publishes an answer that is not cached, for its followers.
const RESULT_TTL: Duration = Duration::from_secs(10);

/// The longest pause between two looks at another replica's flight.
const MAX_POLL: Duration = Duration::from_millis(100);

/// Names this process's flights apart from every other replica's.
#[derive(Debug)]
pub(super) struct Holders {
    process: u64,
    next: AtomicU64,
}

impl Holders {
    pub(super) fn new() -> Holders {
        Holders {
            process: rand::random(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n}", self.process)
    }
}

/// What the replicas decided for one miss.
pub(super) enum Crossed {
    /// This replica calls the provider (holding the lock, or alone when Redis is down).
    Lead(Option<FlightLock>),
    /// Another replica's flight answered.
    Followed(Arc<Answer>),
}

/// The lock of a flight this replica leads: renewed while held, released when dropped.
pub(super) struct FlightLock {
    store: Arc<dyn Store>,
    lock_key: String,
    result_key: String,
    holder: String,
    renew: tokio::task::JoinHandle<()>,
}

impl FlightLock {
    /// Publishes an answer that will not be cached (an error, an uncacheable body) for the
    /// followers, before the lock is released: sealed like an entry, since it is an answer
    /// in Redis all the same.
    pub(super) async fn publish(
        &self,
        key: &CacheKey,
        answer: &Answer,
        generation: u64,
        sealer: &Sealer,
    ) {
        let envelope = Envelope {
            v: ENTRY_VERSION,
            tenant: key.tenant().to_string(),
            key: key.hex().to_string(),
            created: unix_now(),
            ttl: RESULT_TTL.as_secs(),
            status: answer.status,
            content_type: answer.content_type.clone(),
            model: String::new(),
            provider: answer.provider.to_string(),
            usage: answer.usage.clone(),
            generation,
        };
        let result = Entry {
            envelope,
            body: answer.body.to_vec(),
        };
        if let Ok(bytes) = sealer.seal(&result) {
            let ttl = RESULT_TTL.as_millis() as u64;
            let _ = self.store.set_px(&self.result_key, bytes, ttl).await;
        }
    }
}

impl Drop for FlightLock {
    fn drop(&mut self) {
        self.renew.abort();
        let store = Arc::clone(&self.store);
        let (lock_key, holder) = (self.lock_key.clone(), self.holder.clone());
        tokio::spawn(async move {
            let _ = store.keep_flight(&lock_key, &holder, None).await;
        });
    }
}

fn lock_key(key: &CacheKey) -> String {
    format!("gw:flight:{}:{{{}}}:lock", key.tenant(), key.hex())
}

fn result_key(key: &CacheKey) -> String {
    format!("gw:flight:{}:{{{}}}:result", key.tenant(), key.hex())
}

impl Service {
    /// Leads the flight of `key` across replicas, or follows the replica that does; see the
    /// module doc. `generation`: the tenant's purge generation as this request read it.
    pub(super) async fn cross(&self, key: &CacheKey, generation: u64) -> Crossed {
        let started = Instant::now();
        let deadline = started + self.wait_limit;
        let (entry_key, lock_key, result_key) = (key.redis_key(), lock_key(key), result_key(key));
        let holder = self.holders.next();
        loop {
            let claim = self
                .store
                .claim_flight(&entry_key, &lock_key, &holder, LOCK_TTL.as_millis() as u64)
                .await;
            match claim {
                Ok(Claim::Lead) => {
                    return Crossed::Lead(Some(self.hold(lock_key, result_key, holder)));
                }
                Ok(Claim::Entry(bytes)) => {
                    return match self.landed(key, bytes, generation, started) {
                        Some(answer) => Crossed::Followed(answer),
                        // There, but not servable (purged, expired): fetch a fresh one.
                        None => Crossed::Lead(None),
                    };
                }
                Ok(Claim::Held) => {}
                Err(_) => return Crossed::Lead(None),
            }
            let mut poll = Duration::from_millis(10);
            loop {
                if Instant::now() >= deadline {
                    // The leader is too slow: answer this client ourselves.
                    return Crossed::Lead(None);
                }
                tokio::time::sleep(poll).await;
                poll = (poll * 3 / 2).min(MAX_POLL);
                let watched = match self
                    .store
                    .watch_flight(&entry_key, &result_key, &lock_key)
                    .await
                {
                    Ok(watched) => watched,
                    Err(_) => return Crossed::Lead(None),
                };
                if let Some(bytes) = watched.entry
                    && let Some(answer) = self.landed(key, bytes, generation, started)
                {
                    return Crossed::Followed(answer);
                }
                if let Some(bytes) = watched.result
                    && let Some(answer) = self.published(key, &bytes, started)
                {
                    return Crossed::Followed(answer);
                }
                if !watched.held {
                    // The leader is gone without an answer: claim the flight again.
                    break;
                }
            }
        }
    }

    fn hold(&self, lock_key: String, result_key: String, holder: String) -> FlightLock {
        let store = Arc::clone(&self.store);
        let (key, who) = (lock_key.clone(), holder.clone());
        let renew = tokio::spawn(async move {
            let ttl = LOCK_TTL.as_millis() as u64;
            loop {
                tokio::time::sleep(LOCK_TTL / 3).await;
                let _ = store.keep_flight(&key, &who, Some(ttl)).await;
            }
        });
        FlightLock {
            store: Arc::clone(&self.store),
            lock_key,
            result_key,
            holder,
            renew,
        }
    }

    /// A cached entry another replica's flight wrote, as this request's answer: `None` when it
    /// does not decode, predates the tenant's purge or is no longer fresh.
    fn landed(
        &self,
        key: &CacheKey,
        bytes: Vec<u8>,
        generation: u64,
        started: Instant,
    ) -> Option<Arc<Answer>> {
        let entry = self.open_stored(&bytes, key)?;
        let env = &entry.envelope;
        if policy::purged(env.generation, generation) {
            return None;
        }
        let ttl = policy::effective_ttl(env.ttl, self.ttl_cap_secs);
        if !matches!(
            policy::freshness(env.created, ttl, unix_now(), None, 0),
            Freshness::Fresh { .. }
        ) {
            return None;
        }
        self.metrics.coalesced_remote.inc();
        Some(Arc::new(Answer::followed(entry, waited_ms(started))))
    }

    /// The answer a leader published for its followers (not cached).
    fn published(&self, key: &CacheKey, bytes: &[u8], started: Instant) -> Option<Arc<Answer>> {
        let result = self.open_stored(bytes, key)?;
        let mut answer = Answer::followed(result, waited_ms(started));
        // Only its entry was meant for caching; a published result never is.
        answer.entry = None;
        Some(Arc::new(answer))
    }
}

fn waited_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

impl Answer {
    /// An answer another replica's flight produced: `entry` carries what to offer to the
    /// edge tier (never written again here).
    fn followed(entry: Entry, waited_ms: f64) -> Answer {
        let env = &entry.envelope;
        Answer {
            status: env.status,
            content_type: env.content_type.clone(),
            body: Bytes::from(entry.body.clone()),
            provider: Arc::from(env.provider.as_str()),
            usage: env.usage.clone(),
            upstream_ms: waited_ms,
            remote: true,
            entry: Some(Arc::new(entry)),
        }
    }
}

/// A refusal as the answer a leader publishes for its followers.
pub(super) fn refusal_answer(refusal: &Refusal, provider: &str) -> Answer {
    Answer {
        status: refusal.error.status,
        content_type: "application/json".into(),
        body: Bytes::from(refusal.error.to_json()),
        provider: Arc::from(provider),
        usage: None,
        upstream_ms: 0.0,
        remote: false,
        entry: None,
    }
}
