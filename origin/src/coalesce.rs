//! Single-flight per cache key: the first miss becomes the leader and makes the one provider
//! call; concurrent misses for the same key wait for the leader's answer instead of calling.
//!
//! Failure policy: waiters receive whatever the leader published, errors included, so a failing
//! provider sees one call per key, never a stampede of retries. The leader keeps its slot (with
//! the answer in it) until its cache write has finished, so a request that missed in Redis just
//! before the write landed still joins instead of calling again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug)]
pub struct Coalescer<T> {
    slots: Mutex<HashMap<String, Slot<T>>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Slot<T> {
    id: u64,
    rx: watch::Receiver<Option<T>>,
}

/// The outcome of [`Coalescer::join`].
#[derive(Debug)]
pub enum Joined<T> {
    /// Nobody is fetching this key: the caller must fetch and [`Leader::publish`].
    Leader(Leader<T>),
    /// Somebody is: wait for their answer.
    Waiter(Waiter<T>),
}

/// Holds a key's slot. Dropping it frees the slot; dropping it unpublished tells the waiters
/// the fetch was abandoned.
#[derive(Debug)]
pub struct Leader<T> {
    owner: Arc<Coalescer<T>>,
    key: String,
    id: u64,
    tx: watch::Sender<Option<T>>,
}

#[derive(Debug)]
pub struct Waiter<T> {
    rx: watch::Receiver<Option<T>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("the leading request ended without an answer")]
    Abandoned,
    #[error("timed out waiting for the leading request")]
    TimedOut,
}

impl<T: Clone + Send + Sync> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer {
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<T> Coalescer<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot<T>>> {
        // The map is always consistent between statements, so a poisoned lock is still usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T: Clone + Send + Sync> Coalescer<T> {
    pub fn new() -> Arc<Coalescer<T>> {
        Arc::new(Coalescer::default())
    }

    pub fn join(self: &Arc<Self>, key: &str) -> Joined<T> {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(key) {
            return Joined::Waiter(Waiter {
                rx: slot.rx.clone(),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        slots.insert(key.to_string(), Slot { id, rx });
        Joined::Leader(Leader {
            owner: Arc::clone(self),
            key: key.to_string(),
            id,
            tx,
        })
    }

    /// Keys currently being fetched (or holding an answer whose write is pending).
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }
}

impl<T: Clone + Send + Sync> Leader<T> {
    /// Hands the answer to every current waiter and to later joiners while this leader lives.
    pub fn publish(&self, value: T) {
        self.tx.send_replace(Some(value));
    }

    /// A waiter on this leader's own answer (the leading request itself uses it when the fetch
    /// runs in a task of its own).
    pub fn waiter(&self) -> Waiter<T> {
        Waiter {
            rx: self.tx.subscribe(),
        }
    }
}

impl<T> Drop for Leader<T> {
    fn drop(&mut self) {
        let mut slots = self.owner.lock();
        if slots.get(&self.key).is_some_and(|slot| slot.id == self.id) {
            slots.remove(&self.key);
        }
    }
}

impl<T: Clone + Send + Sync> Waiter<T> {
    /// The first value the leader publishes that `accept` takes (a leader may publish more
    /// than once: a live stream, then the whole answer), waiting at most `limit`.
    pub async fn wait(
        &mut self,
        limit: Duration,
        mut accept: impl FnMut(&T) -> bool,
    ) -> Result<T, WaitError> {
        let wait = self.rx.wait_for(|v| v.as_ref().is_some_and(&mut accept));
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(value)) => value.clone().ok_or(WaitError::Abandoned),
            Ok(Err(_)) => Err(WaitError::Abandoned),
            Err(_) => Err(WaitError::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_the_leaders_answer() {
        let c: Arc<Coalescer<u32>> = Coalescer::new();
        let Joined::Leader(leader) = c.join("k") else {
            panic!("first joiner leads")
        };
        let Joined::Waiter(mut w1) = c.join("k") else {
            panic!("second joiner waits")
        };
        let task = tokio::spawn(async move { w1.wait(Duration::from_secs(5), |_| true).await });
        leader.publish(7);
        assert_eq!(task.await.unwrap(), Ok(7));
        // Still held: a late joiner gets the published answer at once.
        let Joined::Waiter(mut w2) = c.join("k") else {
            panic!("slot held until the leader drops")
        };
        assert_eq!(w2.wait(Duration::from_millis(10), |_| true).await, Ok(7));
        drop(leader);
        assert_eq!(c.in_flight(), 0);
        assert!(matches!(c.join("k"), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn an_abandoned_leader_releases_its_waiters_with_an_error() {
        let c: Arc<Coalescer<u32>> = Coalescer::new();
        let Joined::Leader(leader) = c.join("k") else {
            panic!()
        };
        let Joined::Waiter(mut w) = c.join("k") else {
            panic!()
        };
        drop(leader);
        assert_eq!(
            w.wait(Duration::from_secs(1), |_| true).await,
            Err(WaitError::Abandoned)
        );
    }

    #[tokio::test]
    async fn a_waiter_gives_up_after_its_limit() {
        let c: Arc<Coalescer<u32>> = Coalescer::new();
        let Joined::Leader(_leader) = c.join("k") else {
            panic!()
        };
        let Joined::Waiter(mut w) = c.join("k") else {
            panic!()
        };
        assert_eq!(
            w.wait(Duration::from_millis(10), |_| true).await,
            Err(WaitError::TimedOut)
        );
    }

    #[tokio::test]
    async fn different_keys_do_not_coalesce() {
        let c: Arc<Coalescer<u32>> = Coalescer::new();
        let _a = c.join("a");
        assert!(matches!(c.join("b"), Joined::Leader(_)));
    }
}
