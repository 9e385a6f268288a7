//! One circuit breaker per upstream endpoint.
//!
//! ```text
//!            failure_threshold consecutive failures
//!   Closed ───────────────────────────────────────────▶ Open { until }
//!     ▲                                                   │ until passes
//!     │ probe succeeds                                     ▼
//!     └──────────────────────────────────────────── HalfOpen (one probe at a time)
//!                         probe fails: Open again, period doubled (≤ max), jittered ±10 %
//! ```
//!
//! A half-open breaker cannot get stuck: a probe whose caller goes away (its [`Permit`] is dropped
//! without an outcome) frees the probe slot, and a probe older than `probe_timeout` is forgotten
//! so that the next request probes again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::clock::Clock;

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// First open period.
    pub open: Duration,
    /// Longest open period.
    pub max_open: Duration,
    /// How long a half-open probe may take before another is allowed.
    pub probe_timeout: Duration,
}

/// The state machine, as data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    /// Requests flow; `failures` consecutive failures so far.
    Closed {
        /// Consecutive failures.
        failures: u32,
    },
    /// Requests are refused until `until`.
    Open {
        /// End of the open period.
        until: Instant,
        /// How many times the breaker has opened without closing in between (≥ 1).
        trips: u32,
    },
    /// One probe may go through.
    HalfOpen {
        /// Trips so far (kept to size the next open period).
        trips: u32,
        /// When the current probe started, if one is in flight.
        probe_since: Option<Instant>,
    },
}

/// What happened, fed to [`transition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Someone wants to send a request.
    Acquire,
    /// The request succeeded.
    Success,
    /// The request failed.
    Failure,
    /// The request was abandoned without an outcome (caller went away).
    Abandon,
}

/// The single transition function: the new state, and for [`Event::Acquire`] whether the request
/// may go (`true`) or is refused.
pub fn transition(state: State, event: Event, now: Instant, policy: &Policy, jitter: f64) -> (State, bool) {
    let open_for = |trips: u32| {
        let doubled = policy
            .open
            .saturating_mul(1u32 << (trips.saturating_sub(1)).min(16));
        doubled
            .min(policy.max_open)
            .mul_f64(jitter)
            .min(policy.max_open.mul_f64(1.1))
    };
    match (state, event) {
        (State::Closed { .. }, Event::Acquire) => (state, true),
        (State::Closed { .. }, Event::Success) => (State::Closed { failures: 0 }, true),
        (State::Closed { failures }, Event::Failure) => {
            let failures = failures.saturating_add(1);
            if failures >= policy.failure_threshold {
                (
                    State::Open {
                        until: now + open_for(1),
                        trips: 1,
                    },
                    true,
                )
            } else {
                (State::Closed { failures }, true)
            }
        }
        (State::Closed { .. }, Event::Abandon) => (state, true),

        (State::Open { until, trips }, Event::Acquire) if now >= until => (
            State::HalfOpen {
                trips,
                probe_since: Some(now),
            },
            true,
        ),
        (State::Open { .. }, Event::Acquire) => (state, false),
        // Outcomes of requests admitted before the breaker opened change nothing.
        (State::Open { .. }, _) => (state, true),

        (State::HalfOpen { trips, probe_since }, Event::Acquire) => match probe_since {
            Some(since) if now < since + policy.probe_timeout => (state, false),
            _ => (
                State::HalfOpen {
                    trips,
                    probe_since: Some(now),
                },
                true,
            ),
        },
        (State::HalfOpen { .. }, Event::Success) => (State::Closed { failures: 0 }, true),
        (State::HalfOpen { trips, .. }, Event::Failure) => {
            let trips = trips.saturating_add(1);
            (
                State::Open {
                    until: now + open_for(trips),
                    trips,
                },
                true,
            )
        }
        (State::HalfOpen { trips, .. }, Event::Abandon) => (
            State::HalfOpen {
                trips,
                probe_since: None,
            },
            true,
        ),
    }
}

/// A breaker shared by every request to one endpoint.
#[derive(Debug)]
pub struct Breaker {
    policy: Option<Policy>,
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
}

/// Admission to send one request; report its outcome with [`Permit::success`] or
/// [`Permit::failure`]. Dropping it without either counts as abandoned.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    done: bool,
}

/// A consistent view for admin output and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Closed, open, half-open, or disabled.
    pub kind: Kind,
    /// Consecutive failures (closed) or 0.
    pub consecutive_failures: u32,
    /// Time until a probe is allowed (open only).
    pub until_probe: Option<Duration>,
}

/// The state's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Requests flow.
    Closed,
    /// Requests are refused.
    Open,
    /// One probe at a time.
    HalfOpen,
    /// Breakers are turned off.
    Disabled,
}

impl Breaker {
    /// A breaker with `policy`; `None` disables it (always admits).
    pub fn new(policy: Option<Policy>, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            state: Mutex::new(State::Closed { failures: 0 }),
            clock,
        }
    }

    fn apply(&self, event: Event) -> bool {
        let Some(policy) = &self.policy else {
            // Disabled: still count consecutive failures for admin output.
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let State::Closed { failures } = &mut *state {
                match event {
                    Event::Failure => *failures = failures.saturating_add(1),
                    Event::Success => *failures = 0,
                    _ => {}
                }
            }
            return true;
        };
        let jitter = rand::rng().random_range(0.9..=1.1);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (next, allowed) = transition(*state, event, self.clock.now(), policy, jitter);
        if next != *state {
            tracing::debug!(from = ?*state, to = ?next, ?event, "circuit breaker transition");
        }
        *state = next;
        allowed
    }

    /// Admission for one request, or `None` when the breaker is open (skip this endpoint).
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        self.apply(Event::Acquire).then_some(Permit {
            breaker: self,
            done: false,
        })
    }

    /// The current state.
    pub fn snapshot(&self) -> Snapshot {
        let state = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now();
        match (self.policy.is_some(), state) {
            (false, State::Closed { failures }) => Snapshot {
                kind: Kind::Disabled,
                consecutive_failures: failures,
                until_probe: None,
            },
            (_, State::Closed { failures }) => Snapshot {
                kind: Kind::Closed,
                consecutive_failures: failures,
                until_probe: None,
            },
            (_, State::Open { until, .. }) if until > now => Snapshot {
                kind: Kind::Open,
                consecutive_failures: 0,
                until_probe: Some(until - now),
            },
            (_, State::Open { .. } | State::HalfOpen { .. }) => Snapshot {
                kind: Kind::HalfOpen,
                consecutive_failures: 0,
                until_probe: None,
            },
        }
    }
}

impl Permit<'_> {
    /// The request succeeded.
    pub fn success(mut self) {
        self.done = true;
        self.breaker.apply(Event::Success);
    }

    /// The request failed.
    pub fn failure(mut self) {
        self.done = true;
        self.breaker.apply(Event::Failure);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.apply(Event::Abandon);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn policy() -> Policy {
        Policy {
            failure_threshold: 3,
            open: Duration::from_secs(30),
            max_open: Duration::from_secs(300),
            probe_timeout: Duration::from_secs(10),
        }
    }

    fn breaker() -> Breaker {
        Breaker::new(Some(policy()), Arc::new(SystemClock))
    }

    fn fail(b: &Breaker) {
        b.try_acquire().expect("admitted").failure();
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures_and_success_resets_the_count() {
        let b = breaker();
        fail(&b);
        fail(&b);
        b.try_acquire().unwrap().success();
        assert_eq!(b.snapshot().consecutive_failures, 0);
        fail(&b);
        fail(&b);
        assert_eq!(b.snapshot().kind, Kind::Closed);
        fail(&b);
        assert_eq!(b.snapshot().kind, Kind::Open);
        assert!(b.try_acquire().is_none(), "open breaker refuses");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_one_probe_and_success_closes() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(26)).await;
        assert!(b.try_acquire().is_none(), "still open before 0.9 × 30 s");
        tokio::time::advance(Duration::from_secs(8)).await; // 34 s > 1.1 × 30 s
        assert_eq!(b.snapshot().kind, Kind::HalfOpen);
        let probe = b.try_acquire().expect("one probe");
        assert!(b.try_acquire().is_none(), "only one probe at a time");
        probe.success();
        assert_eq!(b.snapshot().kind, Kind::Closed);
        assert!(b.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_twice_as_long_up_to_the_cap() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        let mut expected = 30u64;
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(expected * 11 / 10 + 1)).await;
            fail(&b); // the probe fails
            expected = (expected * 2).min(300);
            tokio::time::advance(Duration::from_secs(expected * 9 / 10 - 1)).await;
            assert!(b.try_acquire().is_none(), "open for at least 0.9 × {expected} s");
        }
        assert_eq!(expected, 300);
        tokio::time::advance(Duration::from_secs(40)).await; // 300 × 1.1 = 330 < 269 + 40 + 30
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(b.try_acquire().is_some(), "cap is 300 s (+10 % jitter)");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_never_sticks_when_a_probe_is_abandoned_or_hangs() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(40)).await;
        drop(b.try_acquire().expect("probe")); // caller went away
        let hanging = b.try_acquire().expect("abandoned probe frees the slot");
        assert!(b.try_acquire().is_none());
        tokio::time::advance(Duration::from_secs(11)).await;
        let next = b
            .try_acquire()
            .expect("a probe older than probe_timeout is forgotten");
        next.success();
        assert_eq!(b.snapshot().kind, Kind::Closed);
        hanging.failure(); // a late failure of an old probe counts as one closed-state failure
        assert_eq!(b.snapshot().kind, Kind::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_breaker_always_admits_but_counts_failures() {
        let b = Breaker::new(None, Arc::new(SystemClock));
        for _ in 0..50 {
            fail(&b);
        }
        assert!(b.try_acquire().is_some());
        assert_eq!(b.snapshot().kind, Kind::Disabled);
        assert_eq!(b.snapshot().consecutive_failures, 50);
    }
}
