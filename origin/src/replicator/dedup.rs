//! What the replicator remembers about recent offers and purges: an entry offered again within
//! the dedup window is not queued twice, and an entry read before a purge is not written after it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long after a purge an offer of an entry created no later than the purge is refused: a
/// request that read the entry from Redis just before the purge must not write it back to KV
/// just after. (An entry created in the purge's own second waits this long to be re-offered.)
pub const PURGE_GUARD: Duration = Duration::from_secs(10);

/// What [`Dedup::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// The same entry was admitted within the window.
    Duplicate,
    /// The entry predates a purge of its key or tenant made within [`PURGE_GUARD`].
    Purged,
}

/// Recently admitted writes, by KV key: an offer of the same entry (same `created`) within the
/// window is a duplicate; a newer entry for the key (after `no-cache`, or expiry) is admitted.
/// Also remembers recent purges, so an entry read before a purge is not written after it.
#[derive(Debug)]
pub struct Dedup {
    window: Duration,
    /// Pruned of expired records when it grows past this.
    prune_at: usize,
    seen: HashMap<String, (Instant, u64)>,
    /// A KV key or a tenant prefix (`v1/<tenant>/`) → when it was purged (and in unix seconds).
    purges: HashMap<String, (Instant, u64)>,
}

impl Dedup {
    pub fn new(window: Duration, prune_at: usize) -> Dedup {
        Dedup {
            window,
            prune_at: prune_at.max(1),
            seen: HashMap::new(),
            purges: HashMap::new(),
        }
    }

    /// Whether an offer of the entry `created` at that unix second under `kv_key` goes ahead
    /// (then it is recorded).
    pub fn admit(&mut self, kv_key: &str, created: u64, now: Instant) -> Admission {
        if !self.purges.is_empty() {
            // `v1/<tenant>/<hex>` → `v1/<tenant>/`
            let prefix = kv_key.match_indices('/').nth(1).map(|(i, _)| &kv_key[..=i]);
            let purged = [Some(kv_key), prefix].into_iter().flatten().any(|scope| {
                self.purges.get(scope).is_some_and(|(at, unix)| {
                    now.saturating_duration_since(*at) < PURGE_GUARD && created <= *unix
                })
            });
            if purged {
                return Admission::Purged;
            }
        }
        if self.window.is_zero() {
            return Admission::Admit;
        }
        if let Some((at, seen_created)) = self.seen.get(kv_key)
            && now.saturating_duration_since(*at) < self.window
            && *seen_created >= created
        {
            return Admission::Duplicate;
        }
        if self.seen.len() >= self.prune_at {
            let window = self.window;
            self.seen
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < window);
        }
        self.seen.insert(kv_key.to_string(), (now, created));
        Admission::Admit
    }

    /// The write was dropped: the next offer must not be taken for a duplicate.
    pub fn forget(&mut self, kv_key: &str) {
        self.seen.remove(kv_key);
    }

    /// A purge of a KV key or of a tenant prefix, at `now` (`now_unix` in unix seconds): the
    /// next offer of a newer entry is written again, an older one is refused for a while.
    pub fn purge(&mut self, scope: &str, now: Instant, now_unix: u64) {
        self.seen.retain(|key, _| !key.starts_with(scope));
        // A tenant purge covers the earlier key purges of that tenant: keep one record.
        self.purges.retain(|key, (at, _)| {
            !key.starts_with(scope) && now.saturating_duration_since(*at) < PURGE_GUARD
        });
        self.purges.insert(scope.to_string(), (now, now_unix));
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn dedup_skips_the_same_entry_within_the_window_but_not_a_newer_one() {
        use Admission::*;
        let t0 = Instant::now();
        let mut dedup = Dedup::new(10 * SEC, 100);
        assert_eq!(dedup.admit("v1/acme/a", 100, t0), Admit);
        assert_eq!(dedup.admit("v1/acme/a", 100, t0 + 9 * SEC), Duplicate);
        assert_eq!(dedup.admit("v1/acme/b", 100, t0), Admit, "another key");
        assert_eq!(dedup.admit("v1/acme/a", 101, t0 + SEC), Admit, "newer");
        assert_eq!(dedup.admit("v1/acme/a", 100, t0 + 2 * SEC), Duplicate);
        assert_eq!(dedup.admit("v1/acme/a", 101, t0 + 12 * SEC), Admit, "later");
        dedup.forget("v1/acme/a");
        assert_eq!(
            dedup.admit("v1/acme/a", 101, t0 + 13 * SEC),
            Admit,
            "dropped"
        );
        assert_eq!(Dedup::new(Duration::ZERO, 1).admit("k", 1, t0), Admit);
    }

    #[test]
    fn after_a_purge_an_older_entry_is_refused_and_a_newer_one_admitted() {
        use Admission::*;
        let t0 = Instant::now();
        let mut dedup = Dedup::new(30 * SEC, 100);
        assert_eq!(dedup.admit("v1/acme/a", 100, t0), Admit);
        assert_eq!(dedup.admit("v1/acme2/a", 100, t0), Admit);
        dedup.purge("v1/acme/a", t0 + SEC, 105);
        // An offer in flight across the purge (read from Redis before it) is refused ...
        assert_eq!(dedup.admit("v1/acme/a", 100, t0 + 2 * SEC), Purged);
        // ... a new entry is written again, past the dedup record the purge cleared ...
        assert_eq!(dedup.admit("v1/acme/a", 106, t0 + 2 * SEC), Admit);
        // ... and after the guard an entry of the purge's own second can be re-offered.
        dedup.purge("v1/acme/", t0 + 3 * SEC, 110);
        assert_eq!(dedup.admit("v1/acme/b", 110, t0 + 4 * SEC), Purged);
        assert_eq!(
            dedup.admit("v1/acme/b", 110, t0 + 3 * SEC + PURGE_GUARD),
            Admit
        );
        // Another tenant, even one whose id extends this one's, is untouched.
        assert_eq!(dedup.admit("v1/acme2/a", 100, t0 + 4 * SEC), Duplicate);
        assert_eq!(dedup.admit("v1/acme2/b", 100, t0 + 4 * SEC), Admit);
    }

    #[test]
    fn dedup_forgets_expired_records_when_it_grows() {
        let t0 = Instant::now();
        let mut dedup = Dedup::new(SEC, 4);
        for i in 0..4 {
            assert_eq!(dedup.admit(&format!("k{i}"), 1, t0), Admission::Admit);
        }
        assert_eq!(dedup.len(), 4);
        assert_eq!(dedup.admit("k4", 1, t0 + 2 * SEC), Admission::Admit);
        assert_eq!(dedup.len(), 1);
    }
}
