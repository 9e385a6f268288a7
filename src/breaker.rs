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
//!
//! Every permit carries the breaker's *generation*, which moves on whenever the breaker changes
//! state or admits a probe. Only outcomes of the current generation count: a request admitted
//! while the breaker was closed and answering after it opened (or a forgotten probe answering
//! late) changes nothing, so a half-open breaker is decided by its probe alone.

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

/// A state and the generation of the permits whose outcomes count in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Machine {
    /// Where the breaker is.
    pub state: State,
    /// Moves on with every state change and every admitted probe.
    pub generation: u64,
}

impl Machine {
    /// A closed breaker.
    pub const fn new() -> Self {
        Self {
            state: State::Closed { failures: 0 },
            generation: 0,
        }
    }

    fn next(self, state: State) -> Self {
        Self {
            state,
            generation: self.generation.wrapping_add(1),
        }
    }
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

/// What happened, fed to [`transition`]. Outcomes carry the generation of their permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Someone wants to send a request.
    Acquire,
    /// The request succeeded.
    Success(u64),
    /// The request failed.
    Failure(u64),
    /// The request was abandoned without an outcome (caller went away, or it lost a hedge race).
    Abandon(u64),
}

/// The single transition function: the new machine, and for [`Event::Acquire`] the generation of
/// the admitted request (`None`: refused). Outcomes of another generation change nothing.
pub fn transition(
    m: Machine,
    event: Event,
    now: Instant,
    policy: &Policy,
    jitter: f64,
) -> (Machine, Option<u64>) {
    let open_for = |trips: u32| {
        let doubled = policy
            .open
            .saturating_mul(1u32 << (trips.saturating_sub(1)).min(16));
        doubled
            .min(policy.max_open)
            .mul_f64(jitter)
            .min(policy.max_open.mul_f64(1.1))
    };
    let open = |trips: u32| State::Open {
        until: now + open_for(trips),
        trips,
    };
    let admitted = |m: Machine| (m, Some(m.generation));
    match (m.state, event) {
        (_, Event::Success(g) | Event::Failure(g) | Event::Abandon(g)) if g != m.generation => (m, None),

        (State::Closed { .. }, Event::Acquire) => admitted(m),
        (State::Closed { .. }, Event::Success(_)) => (
            Machine {
                state: State::Closed { failures: 0 },
                ..m
            },
            None,
        ),
        (State::Closed { failures }, Event::Failure(_)) => {
            let failures = failures.saturating_add(1);
            if failures >= policy.failure_threshold {
                (m.next(open(1)), None)
            } else {
                (
                    Machine {
                        state: State::Closed { failures },
                        ..m
                    },
                    None,
                )
            }
        }
        (State::Closed { .. }, Event::Abandon(_)) => (m, None),

        (State::Open { until, trips }, Event::Acquire) if now >= until => admitted(m.next(State::HalfOpen {
            trips,
            probe_since: Some(now),
        })),
        (State::Open { .. }, _) => (m, None),

        (State::HalfOpen { trips, probe_since }, Event::Acquire) => match probe_since {
            Some(since) if now < since + policy.probe_timeout => (m, None),
            // No probe, or one older than probe_timeout (forgotten: its outcome will not count).
            _ => admitted(m.next(State::HalfOpen {
                trips,
                probe_since: Some(now),
            })),
        },
        (State::HalfOpen { .. }, Event::Success(_)) => (m.next(State::Closed { failures: 0 }), None),
        (State::HalfOpen { trips, .. }, Event::Failure(_)) => (m.next(open(trips.saturating_add(1))), None),
        (State::HalfOpen { trips, .. }, Event::Abandon(_)) => (
            Machine {
                state: State::HalfOpen {
                    trips,
                    probe_since: None,
                },
                ..m
            },
            None,
        ),
    }
}

#[derive(Debug)]
struct Shared {
    policy: Option<Policy>,
    machine: Mutex<Machine>,
    clock: Arc<dyn Clock>,
}

/// A breaker shared by every request to one endpoint.
#[derive(Debug)]
pub struct Breaker {
    shared: Arc<Shared>,
}

/// Admission to send one request; report its outcome with [`Permit::success`] or
/// [`Permit::failure`]. Dropping it without either counts as abandoned. It owns a handle on its
/// breaker, so a request may outlive the code that started it (a hedged attempt finishing in the
/// background).
#[derive(Debug)]
pub struct Permit {
    shared: Arc<Shared>,
    generation: u64,
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

impl Kind {
    /// The value of the `proxy_broker_circuit_state` gauge: 0 closed (or disabled), 1 open,
    /// 2 half-open.
    pub fn gauge_value(self) -> i64 {
        match self {
            Kind::Closed | Kind::Disabled => 0,
            Kind::Open => 1,
            Kind::HalfOpen => 2,
        }
    }
}

impl Shared {
    fn apply(&self, event: Event) -> Option<u64> {
        let Some(policy) = &self.policy else {
            // Disabled: always admit, still count consecutive failures for admin output.
            let mut m = self.machine.lock().unwrap_or_else(|e| e.into_inner());
            if let State::Closed { failures } = &mut m.state {
                match event {
                    Event::Failure(_) => *failures = failures.saturating_add(1),
                    Event::Success(_) => *failures = 0,
                    _ => {}
                }
            }
            return Some(m.generation);
        };
        let jitter = rand::rng().random_range(0.9..=1.1);
        let mut m = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        let (next, admitted) = transition(*m, event, self.clock.now(), policy, jitter);
        if next.state != m.state {
            tracing::debug!(from = ?m.state, to = ?next.state, ?event, "circuit breaker transition");
        }
        *m = next;
        admitted
    }
}

impl Breaker {
    /// A breaker with `policy`; `None` disables it (always admits).
    pub fn new(policy: Option<Policy>, clock: Arc<dyn Clock>) -> Self {
        Self {
            shared: Arc::new(Shared {
                policy,
                machine: Mutex::new(Machine::new()),
                clock,
            }),
        }
    }

    /// Admission for one request, or `None` when the breaker is open (skip this endpoint).
    pub fn try_acquire(&self) -> Option<Permit> {
        let generation = self.shared.apply(Event::Acquire)?;
        Some(Permit {
            shared: self.shared.clone(),
            generation,
            done: false,
        })
    }

    /// The current state.
    pub fn snapshot(&self) -> Snapshot {
        let m = *self.shared.machine.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.shared.clock.now();
        match (self.shared.policy.is_some(), m.state) {
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

impl Permit {
    /// The request succeeded.
    pub fn success(mut self) {
        self.done = true;
        self.shared.apply(Event::Success(self.generation));
    }

    /// The request failed.
    pub fn failure(mut self) {
        self.done = true;
        self.shared.apply(Event::Failure(self.generation));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.shared.apply(Event::Abandon(self.generation));
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
        hanging.failure(); // a late failure of a forgotten probe is ignored
        assert_eq!(b.snapshot().kind, Kind::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_ignores_outcomes_of_permits_issued_before_it_opened() {
        let b = breaker();
        let early: Vec<Permit> = (0..4).map(|_| b.try_acquire().expect("closed")).collect();
        (0..3).for_each(|_| fail(&b));
        assert_eq!(b.snapshot().kind, Kind::Open);
        tokio::time::advance(Duration::from_secs(40)).await;
        let probe = b.try_acquire().expect("probe");
        let mut early = early.into_iter();
        early.next().unwrap().success();
        assert_eq!(b.snapshot().kind, Kind::HalfOpen, "an old success does not close");
        early.next().unwrap().failure();
        assert_eq!(
            b.snapshot().kind,
            Kind::HalfOpen,
            "an old failure does not re-open"
        );
        drop(early.next());
        assert!(
            b.try_acquire().is_none(),
            "an old permit dropped does not free the probe slot"
        );
        probe.success();
        assert_eq!(b.snapshot().kind, Kind::Closed);
        early.next().unwrap().failure();
        assert_eq!(
            b.snapshot().consecutive_failures,
            0,
            "nor does it count once the breaker closed again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_while_open_change_nothing() {
        let b = breaker();
        let early = b.try_acquire().unwrap();
        (0..3).for_each(|_| fail(&b));
        let until = b.snapshot().until_probe;
        early.success();
        assert_eq!(b.snapshot().kind, Kind::Open);
        assert_eq!(b.snapshot().until_probe, until);
    }

    /// A clock that stands still unless the test moves it (proptest cases run without a runtime).
    #[derive(Debug)]
    struct StillClock {
        base: Instant,
        offset: Mutex<Duration>,
    }

    impl Clock for StillClock {
        fn now(&self) -> Instant {
            self.base + *self.offset.lock().unwrap()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        Succeed(usize),
        Fail(usize),
        Drop(usize),
        Advance(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => Just(Op::Acquire),
            2 => (0..8usize).prop_map(Op::Succeed),
            3 => (0..8usize).prop_map(Op::Fail),
            1 => (0..8usize).prop_map(Op::Drop),
            2 => (0..40u64).prop_map(Op::Advance),
        ]
    }

    proptest::proptest! {
        /// Against a model of "the live probe": while half-open exactly one probe is admitted at
        /// a time, a new one is admitted as soon as the last ended or grew older than
        /// probe_timeout (never stuck), and outcomes of other permits change nothing.
        #[test]
        fn breaker_is_never_stuck_half_open_and_admits_one_probe_at_a_time(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            let clock = Arc::new(StillClock { base: Instant::now(), offset: Mutex::new(Duration::ZERO) });
            let b = Breaker::new(Some(policy()), clock.clone());
            let probe_timeout = policy().probe_timeout;
            let mut permits: Vec<Option<Permit>> = Vec::new();
            // (index into permits, when it was admitted)
            let mut live_probe: Option<(usize, Instant)> = None;
            for op in ops {
                let before = b.snapshot().kind;
                if before != Kind::HalfOpen {
                    live_probe = None;
                }
                let now = clock.now();
                match op {
                    Op::Acquire => {
                        let permit = b.try_acquire();
                        let expected = match before {
                            Kind::Closed | Kind::Disabled => true,
                            Kind::Open => false,
                            Kind::HalfOpen => live_probe.is_none_or(|(_, since)| now >= since + probe_timeout),
                        };
                        proptest::prop_assert_eq!(permit.is_some(), expected, "acquire in {:?}", before);
                        if permit.is_some() && before == Kind::HalfOpen {
                            live_probe = Some((permits.len(), now));
                        }
                        permits.push(permit);
                    }
                    Op::Succeed(i) | Op::Fail(i) | Op::Drop(i) => {
                        if permits.is_empty() {
                            continue;
                        }
                        let i = i % permits.len();
                        let Some(permit) = permits[i].take() else { continue };
                        match op {
                            Op::Succeed(_) => permit.success(),
                            Op::Fail(_) => permit.failure(),
                            _ => drop(permit),
                        }
                        let is_probe = live_probe.is_some_and(|(p, _)| p == i);
                        if is_probe {
                            live_probe = None;
                        } else if before == Kind::HalfOpen {
                            proptest::prop_assert_eq!(b.snapshot().kind, Kind::HalfOpen, "a non-probe outcome changed a half-open breaker");
                        }
                    }
                    Op::Advance(secs) => *clock.offset.lock().unwrap() += Duration::from_secs(secs),
                }
            }
            // Never stuck: once the longest open period and a probe timeout have passed, a
            // request is admitted whatever is still outstanding.
            *clock.offset.lock().unwrap() += policy().max_open.mul_f64(1.1) + probe_timeout;
            proptest::prop_assert!(b.try_acquire().is_some(), "stuck in {:?}", b.snapshot());
        }
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
