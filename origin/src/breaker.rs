//! A consecutive-failures circuit breaker (closed → open for a cool-down → half-open with one
//! probe → closed). Used per provider and for Redis. Pure bookkeeping: it never does I/O.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The value of the `provider_breaker_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out since `since`; if it never reports (its caller was cancelled), another
    /// probe is allowed after a further cool-down rather than staying half-open forever.
    HalfOpen {
        since: Instant,
    },
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures, for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// May a call go through now? In the half-open state only the first caller (the probe) gets
    /// `true`; it must report with [`Breaker::record`].
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// Report the outcome of an allowed call.
    pub fn record(&self, success: bool) {
        self.record_at(success, Instant::now())
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain data; the
        // state is still a valid enum value, so keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn allow_at(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { since: now };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { since } if now.duration_since(since) >= self.cooldown => {
                *state = State::HalfOpen { since: now };
                true
            }
            State::HalfOpen { .. } => false,
        }
    }

    fn record_at(&self, success: bool, now: Instant) {
        let mut state = self.lock();
        *state = match (&*state, success) {
            // A late report from a call that started before the breaker opened changes
            // nothing: a success proves little, and a failure must not extend the cool-down.
            (State::Open { .. }, _) => return,
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (State::Closed { .. } | State::HalfOpen { .. }, false) => State::Open {
                until: now + self.cooldown,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let b = Breaker::new(3, Duration::from_millis(100));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(b.allow_at(t0));
            b.record_at(false, t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record_at(false, t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow_at(t0 + Duration::from_millis(50)));
        let t1 = t0 + Duration::from_millis(100);
        assert!(
            b.allow_at(t1),
            "the first caller after the cool-down is the probe"
        );
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow_at(t1), "only one probe at a time");
        b.record_at(true, t1);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow_at(t1));
    }

    #[test]
    fn a_failed_probe_reopens_the_breaker() {
        let b = Breaker::new(1, Duration::from_millis(100));
        let t0 = Instant::now();
        b.record_at(false, t0);
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.allow_at(t1));
        b.record_at(false, t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow_at(t1 + Duration::from_millis(99)));
        assert!(b.allow_at(t1 + Duration::from_millis(100)));
    }

    #[test]
    fn a_probe_that_never_reports_does_not_wedge_the_breaker() {
        let b = Breaker::new(1, Duration::from_millis(100));
        let t0 = Instant::now();
        b.record_at(false, t0);
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.allow_at(t1));
        assert!(!b.allow_at(t1 + Duration::from_millis(50)));
        assert!(b.allow_at(t1 + Duration::from_millis(100)));
    }

    #[test]
    fn a_late_report_while_open_changes_nothing() {
        let b = Breaker::new(1, Duration::from_millis(100));
        let t0 = Instant::now();
        b.record_at(false, t0);
        b.record_at(true, t0 + Duration::from_millis(10));
        assert_eq!(b.state(), BreakerState::Open);
        b.record_at(false, t0 + Duration::from_millis(50));
        assert!(b.allow_at(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let b = Breaker::new(2, Duration::from_millis(100));
        let t0 = Instant::now();
        b.record_at(false, t0);
        b.record_at(true, t0);
        b.record_at(false, t0);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
