//! The Fastly API request budget: a token bucket refilled at the hourly rate, held back by the
//! API's rate-limit headers and by backoffs, shared by every replica (in Redis), and handed to
//! this replica's write lane and purge lane in turn when both wait.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::log::Log;
use crate::kv_api::RateLimit;

/// The longest the replicator waits on the API's word (`Retry-After`, a rate-limit reset).
pub(super) const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Jittered exponential backoff for retry `attempt` (1-based): half of `base · 2^(attempt-1)`
/// (capped at `max`) plus `jitter` (0..=1) of the other half, so replicas that failed together
/// do not retry together, and no retry comes sooner than half the nominal delay.
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let nominal = base.saturating_mul(1u32 << exponent).min(max);
    let half = nominal / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// A token bucket of API requests: `hourly` per hour, refilled continuously, holding at most a
/// tenth of an hour's worth, so no sliding hour sees more than 1.1 × `hourly` requests (990 for
/// the default 900, under Fastly's ~1000). The API's own rate-limit headers can hold it longer.
#[derive(Debug, Clone)]
pub struct RequestBudget {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    updated: Instant,
    held_until: Option<Instant>,
}

impl RequestBudget {
    /// Starts full (a burst of `hourly / 10` requests).
    pub fn new(hourly: u32, now: Instant) -> RequestBudget {
        let hourly = f64::from(hourly.max(1));
        let capacity = (hourly / 10.0).max(1.0);
        RequestBudget {
            capacity,
            per_sec: hourly / 3600.0,
            tokens: capacity,
            updated: now,
            held_until: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// Spends one request if one is available now (and no hold is in force).
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.held_until.is_some_and(|until| now < until) || self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// When a request will next be allowed (`now` if one is).
    pub fn ready_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let refilled = if self.tokens >= 1.0 {
            now
        } else {
            now + Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec)
        };
        match self.held_until {
            Some(until) if until > refilled => until,
            _ => refilled,
        }
    }

    /// No request before `until` (a `Retry-After`, a backoff, a rate-limit reset).
    pub fn hold_until(&mut self, until: Instant) {
        self.held_until = Some(self.held_until.map_or(until, |held| held.max(until)));
    }

    /// Applies the API's `Fastly-RateLimit-*` headers: never plan on more requests than the
    /// account has left, and none at all until the reset once it has none.
    pub fn observe(&mut self, limit: RateLimit, now_unix: u64, now: Instant) {
        self.refill(now);
        match limit.remaining {
            Some(0) => {
                let wait = limit
                    .reset_unix
                    .map_or(Duration::from_secs(60), |reset| {
                        Duration::from_secs(reset.saturating_sub(now_unix).max(1))
                    })
                    .min(MAX_WAIT);
                self.tokens = 0.0;
                self.hold_until(now + wait);
            }
            Some(remaining) => self.tokens = self.tokens.min(remaining as f64),
            None => {}
        }
    }

    /// The bucket's size and refill rate (requests per second).
    pub fn size(&self) -> (f64, f64) {
        (self.capacity, self.per_sec)
    }

    /// Requests available now (fractional).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

/// The two users of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
    Writes = 0,
    Purges = 1,
}

impl Lane {
    fn other(self) -> Lane {
        match self {
            Lane::Writes => Lane::Purges,
            Lane::Purges => Lane::Writes,
        }
    }
}

/// The budget every replica spends from: the shared bucket in Redis (see `log.rs`), or,
/// while Redis does not answer, this replica's own [`RequestBudget`] of the same size. Within
/// a replica the two lanes take turns while both wait: a tenant's purge backlog never holds
/// back every tenant's writes, and a stream of writes never postpones purges forever.
pub(super) struct SharedBudget {
    turns: Mutex<Turns>,
    changed: Notify,
    /// The fallback bucket; also what the shared one is sized from.
    local: Mutex<RequestBudget>,
    shared: Option<Arc<Log>>,
}

#[derive(Debug)]
struct Turns {
    waiting: [bool; 2],
    /// Who goes next when both wait.
    next: Lane,
}

impl SharedBudget {
    /// `shared`: the Redis log holding the bucket all replicas share; `None` keeps the budget
    /// in this process (a replica on its own, and tests).
    pub(super) fn new(local: RequestBudget, shared: Option<Arc<Log>>) -> Arc<SharedBudget> {
        Arc::new(SharedBudget {
            turns: Mutex::new(Turns {
                waiting: [false; 2],
                next: Lane::Writes,
            }),
            changed: Notify::new(),
            local: Mutex::new(local),
            shared,
        })
    }

    fn turns(&self) -> MutexGuard<'_, Turns> {
        // Two flags and a lane: a poisoned lock is still consistent.
        self.turns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn local(&self) -> MutexGuard<'_, RequestBudget> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `lane` may make one request, and spends it. Returns how long that took.
    pub(super) async fn take(&self, lane: Lane) -> Duration {
        let started = Instant::now();
        let waiting = Waiting::new(self, lane);
        self.wait_turn(lane, true).await;
        {
            let mut turns = self.turns();
            turns.next = lane.other();
        }
        drop(waiting);
        started.elapsed()
    }

    /// How long until a request could be made (zero if one could now), spending nothing.
    #[cfg(test)]
    pub(super) async fn ready_in(&self) -> Duration {
        self.try_take(false).await.unwrap_or_default()
    }

    /// Waits until `lane` could make a request (its turn, and the budget allows one), spending
    /// nothing; the lane keeps its place while it holds the guard, so the other lane does not
    /// take that request meanwhile. The write lane waits here before it takes work.
    pub(super) async fn ready(&self, lane: Lane) -> Waiting<'_> {
        let waiting = Waiting::new(self, lane);
        self.wait_turn(lane, false).await;
        waiting
    }

    /// Waits for `lane`'s turn (the other lane goes first when it waits and it is its turn)
    /// and for the budget to allow a request, spending it when `spend`.
    async fn wait_turn(&self, lane: Lane, spend: bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let my_turn = {
                let turns = self.turns();
                !turns.waiting[lane.other() as usize] || turns.next == lane
            };
            if !my_turn {
                // The other lane's turn: it takes the next request, then wakes us.
                changed.await;
                continue;
            }
            match self.try_take(spend).await {
                None => return,
                Some(wait) => tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep(wait) => {}
                },
            }
        }
    }

    /// Spends one request if `spend` and one is available (`None`), or how long to wait.
    async fn try_take(&self, spend: bool) -> Option<Duration> {
        let (capacity, per_sec) = self.local().size();
        // When Redis does not answer, this replica paces itself until it does.
        if let Some(log) = &self.shared
            && let Ok(wait) = log.take_budget(capacity, per_sec, spend).await
        {
            return wait;
        }
        let mut local = self.local();
        let now = Instant::now();
        if spend && local.try_take(now) {
            return None;
        }
        let wait = local.ready_at(now).saturating_duration_since(now);
        (!wait.is_zero() || spend).then_some(wait)
    }

    /// No request before `wait` from now (a backoff, `Retry-After`), for every replica.
    pub(super) async fn hold(&self, wait: Duration) {
        self.local().hold_until(Instant::now() + wait);
        if let Some(log) = &self.shared {
            let _ = log.hold_budget(wait, None).await;
        }
        self.changed.notify_waiters();
    }

    /// Applies the API's `Fastly-RateLimit-*` headers (see [`RequestBudget::observe`]).
    pub(super) async fn observe(&self, limit: RateLimit, now_unix: u64) {
        self.local().observe(limit, now_unix, Instant::now());
        if let (Some(log), Some(remaining)) = (&self.shared, limit.remaining) {
            let wait = match remaining {
                0 => limit
                    .reset_unix
                    .map_or(Duration::from_secs(60), |reset| {
                        Duration::from_secs(reset.saturating_sub(now_unix).max(1))
                    })
                    .min(MAX_WAIT),
                _ => Duration::ZERO,
            };
            let _ = log.hold_budget(wait, Some(remaining)).await;
        }
        self.changed.notify_waiters();
    }
}

/// Marks a lane as waiting for as long as its `take` runs, and unmarks it however that ends
/// (a drain's timeout cancels it), so the other lane is never left waiting for a turn.
pub(super) struct Waiting<'a> {
    budget: &'a SharedBudget,
    lane: Lane,
}

impl<'a> Waiting<'a> {
    fn new(budget: &'a SharedBudget, lane: Lane) -> Waiting<'a> {
        budget.turns().waiting[lane as usize] = true;
        Waiting { budget, lane }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.budget.turns().waiting[self.lane as usize] = false;
        self.budget.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap_with_half_of_it_jittered() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(1, base, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(2, base, max, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(4, base, max, 0.5), Duration::from_millis(600));
        assert_eq!(backoff(5, base, max, 1.0), Duration::from_millis(1600));
        assert_eq!(backoff(6, base, max, 1.0), max);
        assert_eq!(backoff(60, base, max, 1.0), max);
        assert_eq!(backoff(u32::MAX, base, max, 0.0), max / 2);
        // Out-of-range jitter is clamped, never a negative or oversized delay.
        assert_eq!(backoff(1, base, max, 7.0), Duration::from_millis(100));
        assert_eq!(backoff(1, base, max, -1.0), Duration::from_millis(50));
    }

    #[test]
    fn the_budget_allows_a_tenth_of_an_hour_at_once_then_paces_to_the_hourly_rate() {
        let t0 = Instant::now();
        let mut budget = RequestBudget::new(900, t0);
        for i in 0..90 {
            assert!(budget.try_take(t0), "request {i} of the burst");
        }
        assert!(!budget.try_take(t0));
        // 900 per hour is one every 4 s.
        assert_eq!(budget.ready_at(t0), t0 + 4 * SEC);
        assert!(!budget.try_take(t0 + 3 * SEC));
        assert!(budget.try_take(t0 + 4 * SEC));
        // An hour of steady use stays within 1.1 × the budget.
        let mut budget = RequestBudget::new(900, t0);
        let mut spent = 0;
        for s in 0..3600 {
            while budget.try_take(t0 + s * SEC) {
                spent += 1;
            }
        }
        assert!((900..=990).contains(&spent), "{spent}");
    }

    #[test]
    fn the_budget_obeys_the_api_rate_limit_headers_and_holds() {
        let t0 = Instant::now();
        let mut budget = RequestBudget::new(900, t0);
        budget.observe(
            RateLimit {
                remaining: Some(3),
                reset_unix: Some(1_000),
            },
            900,
            t0,
        );
        assert_eq!(budget.available(t0), 3.0);
        budget.observe(
            RateLimit {
                remaining: Some(0),
                reset_unix: Some(1_030),
            },
            1_000,
            t0,
        );
        assert!(!budget.try_take(t0 + 29 * SEC));
        assert_eq!(budget.ready_at(t0), t0 + 30 * SEC);
        assert!(budget.try_take(t0 + 30 * SEC));
        // Absent headers change nothing; a hold is never shortened by a later, shorter one.
        let mut budget = RequestBudget::new(900, t0);
        budget.observe(RateLimit::default(), 0, t0);
        assert_eq!(budget.available(t0), 90.0);
        budget.hold_until(t0 + 10 * SEC);
        budget.hold_until(t0 + 2 * SEC);
        assert_eq!(budget.ready_at(t0), t0 + 10 * SEC);
    }

    #[tokio::test(start_paused = true)]
    async fn two_waiting_lanes_take_turns() {
        // 3600 an hour: one a second, after a burst of 360.
        let budget = SharedBudget::new(RequestBudget::new(3600, Instant::now()), None);
        for _ in 0..360 {
            budget.take(Lane::Writes).await;
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let lane = |lane: Lane, n: usize| {
            let budget = Arc::clone(&budget);
            let order = Arc::clone(&order);
            tokio::spawn(async move {
                for _ in 0..n {
                    budget.take(lane).await;
                    order.lock().unwrap().push(lane);
                }
            })
        };
        let writes = lane(Lane::Writes, 6);
        let purges = lane(Lane::Purges, 3);
        writes.await.unwrap();
        purges.await.unwrap();
        let order = order.lock().unwrap().clone();
        // While both waited they alternated; the writes then had the budget to themselves.
        let purges_in_first_six = order[..6].iter().filter(|l| **l == Lane::Purges).count();
        assert_eq!(purges_in_first_six, 3, "{order:?}");
        assert_eq!(order.len(), 9);
    }
}
