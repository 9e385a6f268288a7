//! An exact sliding-window counter: the log of admitted attempt instants, at most the budget's
//! `attempts` long.
//!
//! An attempt is admitted when fewer than `attempts` admitted attempts lie in the last `per`, so no
//! window of length `per`, wherever it starts, ever holds more than `attempts` — which is what an
//! exchange counting per IP over a rolling window (Kraken says so explicitly) enforces.
//!
//! Why not the cheaper alternatives:
//! - a **fixed window** (a counter reset every `per`) admits `2 × attempts` around a window edge
//!   (`attempts` just before the reset, `attempts` just after);
//! - **GCRA** / a token bucket with burst `attempts` and rate `attempts / per` admits a full burst
//!   at once and then refills continuously, so a window of length `per` can hold almost
//!   `2 × attempts` (the burst, then `attempts − 1` refilled tokens before the window closes).
//!   Shrinking the burst to fix that throttles the reconnect storms the broker exists to spread.
//!
//! The price is memory: 8 bytes per admitted attempt still in the window (300 for Binance,
//! 2.4 KB per proxy and exchange at the worst), which the store bounds by its entry cap.
//!
//! Instants are whole milliseconds since the store's epoch, rounded so the count errs towards
//! refusing: an attempt is logged at the millisecond after it happened (ceiling) and leaves the
//! window only once `per` has passed since then measured from the millisecond before now (floor).

use std::collections::VecDeque;
use std::time::Duration;

use crate::brokering::settings::Budget;

/// The log of one (proxy, exchange, connection type).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingLog {
    /// Admitted attempts (ms since the epoch, rounded up), oldest first; at most the budget long.
    log: VecDeque<u64>,
}

/// What one attempt got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted: `used` attempts now lie in the window (this one included).
    Admitted {
        /// Attempts in the window, this one included.
        used: u32,
    },
    /// Refused: the window is full until `retry_after` has passed.
    Full {
        /// Until the oldest attempt in the window leaves it (at least 1 ms).
        retry_after: Duration,
    },
}

fn per_ms(budget: Budget) -> u64 {
    u64::try_from(budget.per.as_millis()).unwrap_or(u64::MAX)
}

impl SlidingLog {
    /// Drops attempts that have left the window at `now_ms` (rounded down).
    fn prune(&mut self, budget: Budget, now_ms: u64) {
        let per = per_ms(budget);
        while self
            .log
            .front()
            .is_some_and(|&at| at.saturating_add(per) <= now_ms)
        {
            self.log.pop_front();
        }
        // A budget lowered since the last attempt: only the newest `attempts` matter.
        let cap = usize::try_from(budget.attempts).unwrap_or(usize::MAX);
        while self.log.len() > cap {
            self.log.pop_front();
        }
    }

    /// Counts one attempt at `now_floor_ms`/`now_ceil_ms` (now rounded down and up) if the
    /// window has room: the check-and-count is one step.
    pub fn try_admit(&mut self, budget: Budget, now_floor_ms: u64, now_ceil_ms: u64) -> Admission {
        self.prune(budget, now_floor_ms);
        let used = u32::try_from(self.log.len()).unwrap_or(u32::MAX);
        if used < budget.attempts {
            self.log
                .push_back(now_ceil_ms.max(self.log.back().copied().unwrap_or(0)));
            return Admission::Admitted { used: used + 1 };
        }
        Admission::Full {
            retry_after: self
                .retry_after(budget, now_floor_ms)
                .unwrap_or(budget.per)
                .max(Duration::from_millis(1)),
        }
    }

    /// Attempts in the window at `now_floor_ms`.
    pub fn used(&self, budget: Budget, now_floor_ms: u64) -> u32 {
        let per = per_ms(budget);
        // The log is in time order: the live attempts are its tail (O(log n), not a scan).
        let live = self.log.len()
            - self
                .log
                .partition_point(|&at| at.saturating_add(per) <= now_floor_ms);
        u32::try_from(live).unwrap_or(u32::MAX).min(budget.attempts)
    }

    /// How long until the oldest attempt in the window leaves it (`None` when the log is empty).
    pub fn retry_after(&self, budget: Budget, now_floor_ms: u64) -> Option<Duration> {
        let per = per_ms(budget);
        self.log
            .iter()
            .find(|&&at| at.saturating_add(per) > now_floor_ms)
            .map(|&at| Duration::from_millis(at.saturating_add(per) - now_floor_ms))
    }

    /// The instant (ms) the last attempt leaves the window; nothing is kept for the log after it.
    pub fn clears_at(&self, budget: Budget) -> Option<u64> {
        self.log.back().map(|&at| at.saturating_add(per_ms(budget)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn admit(log: &mut SlidingLog, budget: Budget, at_ms: u64) -> Admission {
        log.try_admit(budget, at_ms, at_ms)
    }

    #[test]
    fn a_full_window_refuses_until_its_oldest_attempt_leaves() {
        let b = Budget::new(3, 10);
        let mut log = SlidingLog::default();
        assert_eq!(admit(&mut log, b, 0), Admission::Admitted { used: 1 });
        assert_eq!(admit(&mut log, b, 4_000), Admission::Admitted { used: 2 });
        assert_eq!(admit(&mut log, b, 9_000), Admission::Admitted { used: 3 });
        assert_eq!(
            admit(&mut log, b, 9_500),
            Admission::Full {
                retry_after: Duration::from_millis(500)
            }
        );
        // At 10 s the first attempt has left: one more, and the window is full again.
        assert_eq!(admit(&mut log, b, 10_000), Admission::Admitted { used: 3 });
        assert_eq!(
            admit(&mut log, b, 10_001),
            Admission::Full {
                retry_after: Duration::from_millis(3_999)
            }
        );
    }

    #[test]
    fn no_window_edge_admits_twice_the_budget() {
        // The fixed-window hole: budget at the end of one window and again at the start of the next.
        let b = Budget::new(5, 60);
        let mut log = SlidingLog::default();
        let mut admitted = 0;
        for at in [59_999, 60_001] {
            for _ in 0..5 {
                admitted += usize::from(matches!(admit(&mut log, b, at), Admission::Admitted { .. }));
            }
        }
        assert_eq!(admitted, 5);
    }

    #[test]
    fn a_lowered_budget_keeps_only_the_newest_attempts() {
        let mut log = SlidingLog::default();
        for t in 0..10 {
            admit(&mut log, Budget::new(10, 100), t);
        }
        let lower = Budget::new(2, 100);
        assert!(matches!(admit(&mut log, lower, 20), Admission::Full { .. }));
        assert_eq!(log.log.len(), 2);
        assert_eq!(log.used(lower, 20), 2);
    }

    #[test]
    fn a_zero_budget_refuses_everything_without_panicking() {
        let mut log = SlidingLog::default();
        assert!(matches!(
            admit(&mut log, Budget::new(0, 1), 5),
            Admission::Full { .. }
        ));
        let zero_window = Budget {
            attempts: 1,
            per: Duration::ZERO,
        };
        // A zero-length window never holds anything: always admitted.
        assert!(matches!(
            admit(&mut log, zero_window, 5),
            Admission::Admitted { .. }
        ));
        assert!(matches!(
            admit(&mut log, zero_window, 5),
            Admission::Admitted { .. }
        ));
    }

    proptest! {
        /// Whatever the arrival times, no window of length `per` holds more than `attempts`
        /// admitted attempts, and an attempt is refused only when the window is really full.
        #[test]
        fn no_window_ever_holds_more_than_the_budget(
            attempts in 1u32..8,
            per_s in 1u64..5,
            gaps in proptest::collection::vec(0u64..1500, 1..200),
        ) {
            let b = Budget::new(attempts, per_s);
            let per = per_s * 1000;
            let mut log = SlidingLog::default();
            let mut admitted: Vec<u64> = Vec::new();
            let mut now = 0u64;
            for gap in gaps {
                now += gap;
                let in_window = admitted.iter().filter(|&&t| t + per > now).count() as u32;
                match admit(&mut log, b, now) {
                    Admission::Admitted { used } => {
                        admitted.push(now);
                        prop_assert_eq!(used, in_window + 1);
                    }
                    Admission::Full { retry_after } => {
                        prop_assert_eq!(in_window, attempts, "refused with room at {}", now);
                        prop_assert!(retry_after > Duration::ZERO && retry_after <= b.per);
                    }
                }
                for &start in &admitted {
                    let held = admitted.iter().filter(|&&t| t >= start && t < start + per).count() as u32;
                    prop_assert!(held <= attempts, "{} attempts in the window from {}", held, start);
                }
            }
        }
    }
}
