//! The exchange-outage guard: when most proxies fail at one exchange at once, the exchange is
//! down, not the proxies.
//!
//! Within the last `window_seconds`, each distinct proxy that reported for an exchange counts by
//! its latest report: failing (a plain failure: 5xx or no status) or not (a success, or a ban or
//! 429, which are answers from a working exchange). The exchange is in an **outage** while at
//! least `min_proxies` proxies reported and more than `failing_fraction` of them are failing.
//! While it lasts, plain failures neither count nor eject for that exchange; when it starts,
//! ejections made for it within the window are handed back to be lifted (418/403/451 bans and
//! 429 penalties stand). It ends when enough successes return, or when the reports age out of
//! the window.
//!
//! Bounded: at most [`MAX_EXCHANGES`] exchanges, [`MAX_REPORTERS`] distinct proxies and
//! [`MAX_REPORTS`] reports per exchange window (reports beyond are dropped oldest first; new
//! proxies beyond the reporter cap are not counted). Amortised O(1) per report.
//!
//! This is the in-process implementation, which the memory store ([`crate::store::MemoryStore`])
//! keeps; a shared store keeps the same state on its server so that a fleet judges an exchange
//! from every replica's reports (see [`crate::store`], "Exchange outages").

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::settings::OutageSettings;
use crate::sync::lock;

/// Most exchanges tracked at once.
pub const MAX_EXCHANGES: usize = 1024;
/// Most distinct proxies counted per exchange window.
pub const MAX_REPORTERS: usize = 4096;
/// Most reports (and ejections) remembered per exchange window.
pub const MAX_REPORTS: usize = 4 * MAX_REPORTERS;

/// What a report changed.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Transition {
    /// Nothing.
    #[default]
    None,
    /// The exchange went into an outage: lift these proxies' ejections (made within the window).
    Started {
        /// Proxies ejected for the exchange within the window.
        lift: Vec<Arc<str>>,
    },
    /// The outage ended.
    Ended,
}

impl fmt::Debug for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transition::None => f.write_str("None"),
            Transition::Started { lift } => write!(f, "Started {{ lift: {} proxies }}", lift.len()),
            Transition::Ended => f.write_str("Ended"),
        }
    }
}

/// An exchange's outage state, for `ListExchanges` and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutageStatus {
    /// Since when the exchange is in an outage (`None`: it is not).
    pub since: Option<Instant>,
    /// Distinct proxies that reported within the window.
    pub reporters: usize,
    /// Of those, how many are failing.
    pub failing: usize,
}

#[derive(Debug, Clone, Copy)]
struct Latest {
    seq: u64,
    failing: bool,
}

/// One exchange's reports (no `Debug`: it holds proxy URLs).
#[derive(Default)]
struct Window {
    latest: HashMap<Arc<str>, Latest>,
    /// Every report (instant, sequence number, proxy), oldest first.
    log: VecDeque<(Instant, u64, Arc<str>)>,
    failing: usize,
    seq: u64,
    /// Ejections made for the exchange, oldest first.
    ejections: VecDeque<(Instant, Arc<str>)>,
    since: Option<Instant>,
}

impl Window {
    fn drop_front(&mut self) {
        if let Some((_, seq, proxy)) = self.log.pop_front()
            && self.latest.get(&proxy).is_some_and(|l| l.seq == seq)
            && let Some(l) = self.latest.remove(&proxy)
        {
            self.failing -= usize::from(l.failing);
        }
    }

    fn prune(&mut self, now: Instant, window: Duration) {
        let Some(cutoff) = now.checked_sub(window) else {
            return;
        };
        while self.log.front().is_some_and(|(at, _, _)| *at <= cutoff) {
            self.drop_front();
        }
        while self.ejections.front().is_some_and(|(at, _)| *at <= cutoff) {
            self.ejections.pop_front();
        }
    }

    fn in_outage(&self, s: &OutageSettings) -> bool {
        let reporters = self.latest.len();
        let fraction = if s.failing_fraction.is_nan() {
            1.0
        } else {
            s.failing_fraction.clamp(0.0, 1.0)
        };
        reporters >= usize::try_from(s.min_proxies.max(1)).unwrap_or(usize::MAX)
            && self.failing as f64 > fraction * reporters as f64
    }

    /// Re-evaluates after a change; returns the transition.
    fn settle(&mut self, now: Instant, s: &OutageSettings) -> Transition {
        match (self.since.is_some(), self.in_outage(s)) {
            (false, true) => {
                self.since = Some(now);
                let mut lift: Vec<Arc<str>> = self.ejections.drain(..).map(|(_, p)| p).collect();
                lift.sort();
                lift.dedup();
                Transition::Started { lift }
            }
            (true, false) => {
                self.since = None;
                Transition::Ended
            }
            _ => Transition::None,
        }
    }

    /// The state as of the last prune, without settling: an outage shows only while its rule
    /// still holds (one that aged out ends at the next report).
    fn status(&self, s: &OutageSettings) -> OutageStatus {
        OutageStatus {
            since: self.since.filter(|_| self.in_outage(s)),
            reporters: self.latest.len(),
            failing: self.failing,
        }
    }
}

/// The guard. See the module docs.
pub struct OutageGuard {
    exchanges: DashMap<Arc<str>, Mutex<Window>>,
}

impl fmt::Debug for OutageGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutageGuard")
            .field("exchanges", &self.exchanges.len())
            .finish()
    }
}

impl Default for OutageGuard {
    fn default() -> Self {
        Self::new()
    }
}

fn window_of(s: &OutageSettings) -> Duration {
    Duration::from_secs(s.window_seconds.max(1))
}

impl OutageGuard {
    /// A guard tracking nothing yet.
    pub fn new() -> Self {
        Self {
            exchanges: DashMap::new(),
        }
    }

    /// Runs `f` on the exchange's window, creating it if there is room.
    fn with_window<R>(
        &self,
        exchange: &str,
        create: bool,
        now: Instant,
        s: &OutageSettings,
        f: impl FnOnce(&mut Window) -> R,
    ) -> Option<R> {
        if let Some(w) = self.exchanges.get(exchange) {
            let mut w = lock(&w);
            w.prune(now, window_of(s));
            return Some(f(&mut w));
        }
        if !create {
            return None;
        }
        if self.exchanges.len() >= MAX_EXCHANGES {
            // Forget exchanges nothing reported for within the window.
            self.exchanges.retain(|_, w| {
                let mut w = lock(w);
                w.prune(now, window_of(s));
                !w.log.is_empty() || !w.ejections.is_empty()
            });
            if self.exchanges.len() >= MAX_EXCHANGES {
                return None;
            }
        }
        let w = self.exchanges.entry(Arc::from(exchange)).or_default();
        Some(f(&mut lock(&w)))
    }

    /// Takes one report for `exchange` (lower-case) from `proxy`: `failing` for a plain failure.
    pub fn record(
        &self,
        exchange: &str,
        proxy: &str,
        failing: bool,
        now: Instant,
        s: &OutageSettings,
    ) -> Transition {
        self.report(exchange, proxy, failing, now, s).0
    }

    /// As [`OutageGuard::record`], and whether the exchange is in an outage after the report.
    pub fn report(
        &self,
        exchange: &str,
        proxy: &str,
        failing: bool,
        now: Instant,
        s: &OutageSettings,
    ) -> (Transition, bool) {
        let settled = |w: &mut Window| {
            let t = w.settle(now, s);
            (t, w.since.is_some())
        };
        self.with_window(exchange, true, now, s, |w| {
            let seq = w.seq;
            w.seq += 1;
            let proxy: Arc<str> = match w.latest.get_key_value(proxy) {
                Some((p, old)) => {
                    let p = p.clone();
                    w.failing -= usize::from(old.failing);
                    p
                }
                None if w.latest.len() >= MAX_REPORTERS => return settled(w),
                None => Arc::from(proxy),
            };
            w.failing += usize::from(failing);
            w.latest.insert(proxy.clone(), Latest { seq, failing });
            w.log.push_back((now, seq, proxy));
            while w.log.len() > MAX_REPORTS {
                w.drop_front();
            }
            settled(w)
        })
        .unwrap_or_default()
    }

    /// Notes that `proxy` was ejected for `exchange`, so an outage starting within the window lifts
    /// it. Returns `true` instead when the exchange is in an outage already (the caller lifts the
    /// ejection).
    pub fn note_ejection(&self, exchange: &str, proxy: &str, now: Instant, s: &OutageSettings) -> bool {
        self.with_window(exchange, true, now, s, |w| {
            if w.status(s).since.is_some() {
                return true;
            }
            w.ejections.push_back((now, Arc::from(proxy)));
            while w.ejections.len() > MAX_REPORTS {
                w.ejections.pop_front();
            }
            false
        })
        .unwrap_or(false)
    }

    /// Whether `exchange` is in an outage at `now` (reports that aged out no longer count).
    pub fn in_outage(&self, exchange: &str, now: Instant, s: &OutageSettings) -> bool {
        self.status(exchange, now, s).is_some_and(|st| st.since.is_some())
    }

    /// The exchange's state at `now`, if it is tracked.
    pub fn status(&self, exchange: &str, now: Instant, s: &OutageSettings) -> Option<OutageStatus> {
        self.with_window(exchange, false, now, s, |w| w.status(s))
    }

    /// Every tracked exchange and its state at `now`, sorted by id.
    pub fn statuses(&self, now: Instant, s: &OutageSettings) -> Vec<(Arc<str>, OutageStatus)> {
        let mut all: Vec<_> = self
            .exchanges
            .iter()
            .map(|e| {
                let mut w = lock(e.value());
                w.prune(now, window_of(s));
                (e.key().clone(), w.status(s))
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutageSettings {
        OutageSettings {
            failing_fraction: 0.5,
            window_seconds: 60,
            min_proxies: 2,
        }
    }

    fn proxy(i: usize) -> String {
        format!("http://p{i}:1")
    }

    #[test]
    fn an_outage_needs_more_than_the_fraction_of_at_least_min_proxies() {
        let s = settings();
        // (row, reports as (proxy, failing), in outage after them)
        type Row = (&'static str, &'static [(usize, bool)], bool);
        let rows: &[Row] = &[
            ("one failing proxy is not enough", &[(0, true)], false),
            ("two of two", &[(0, true), (1, true)], true),
            ("half is not more than half", &[(0, true), (1, false)], false),
            ("two of three", &[(0, true), (1, true), (2, false)], true),
            (
                "repeats of one proxy count once",
                &[(0, true), (0, true), (0, true), (1, false)],
                false,
            ),
            (
                "the latest report counts",
                &[(0, true), (1, true), (1, false)],
                false,
            ),
            (
                "bans and 429s are not failing",
                &[(0, false), (1, false), (2, true)],
                false,
            ),
        ];
        for (row, reports, expected) in rows {
            let g = OutageGuard::new();
            let now = Instant::now();
            for (p, failing) in *reports {
                g.record("binance", &proxy(*p), *failing, now, &s);
            }
            assert_eq!(g.in_outage("binance", now, &s), *expected, "row {row}");
        }
    }

    #[test]
    fn starting_an_outage_lifts_ejections_within_the_window_and_successes_end_it() {
        let s = settings();
        let g = OutageGuard::new();
        let t0 = Instant::now();
        g.note_ejection("okx", &proxy(9), t0, &s);
        g.note_ejection("okx", &proxy(1), t0 + Duration::from_secs(30), &s);
        let t = t0 + Duration::from_secs(70);
        assert_eq!(g.record("okx", &proxy(1), true, t, &s), Transition::None);
        let started = g.record("okx", &proxy(2), true, t, &s);
        assert_eq!(
            started,
            Transition::Started {
                lift: vec![Arc::from(proxy(1).as_str())]
            },
            "the ejection 70 s ago is outside the window"
        );
        assert_eq!(g.record("okx", &proxy(3), true, t, &s), Transition::None);
        assert!(g.status("okx", t, &s).unwrap().since == Some(t));
        assert_eq!(
            g.record("okx", &proxy(1), false, t, &s),
            Transition::None,
            "2 of 3 still fail"
        );
        assert_eq!(g.record("okx", &proxy(2), false, t, &s), Transition::Ended);
        assert!(!g.in_outage("okx", t, &s));
        assert!(!g.in_outage("binance", t, &s), "other exchanges are untouched");
    }

    #[test]
    fn an_outage_ends_when_its_reports_age_out() {
        let s = settings();
        let g = OutageGuard::new();
        let t0 = Instant::now();
        g.record("kraken", &proxy(0), true, t0, &s);
        g.record("kraken", &proxy(1), true, t0, &s);
        assert!(g.in_outage("kraken", t0 + Duration::from_secs(59), &s));
        assert!(!g.in_outage("kraken", t0 + Duration::from_secs(60), &s));
        let st = g.status("kraken", t0 + Duration::from_secs(60), &s).unwrap();
        assert_eq!((st.reporters, st.failing, st.since), (0, 0, None));
    }

    #[test]
    fn state_stays_bounded_under_a_flood_of_proxies_and_exchanges() {
        let s = settings();
        let g = OutageGuard::new();
        let now = Instant::now();
        for i in 0..(MAX_REPORTERS + 500) {
            g.record("binance", &proxy(i), i % 2 == 0, now, &s);
        }
        for _ in 0..(MAX_REPORTS + 10) {
            g.record("binance", &proxy(0), true, now, &s);
        }
        {
            let entry = g.exchanges.get("binance").unwrap();
            let w = lock(&entry);
            assert!(w.latest.len() <= MAX_REPORTERS);
            assert!(w.log.len() <= MAX_REPORTS);
            assert_eq!(w.failing, w.latest.values().filter(|l| l.failing).count());
        }
        for i in 0..(MAX_EXCHANGES + 10) {
            g.record(&format!("x{i}"), &proxy(0), false, now, &s);
        }
        assert!(g.exchanges.len() <= MAX_EXCHANGES);
        // Once the old reports age out, new exchanges get room again.
        g.record("late", &proxy(0), false, now + Duration::from_secs(61), &s);
        assert!(g.status("late", now + Duration::from_secs(61), &s).is_some());
    }

    #[test]
    fn odd_settings_do_not_panic() {
        let g = OutageGuard::new();
        let now = Instant::now();
        for s in [
            OutageSettings {
                failing_fraction: f64::NAN,
                window_seconds: 0,
                min_proxies: 0,
            },
            OutageSettings {
                failing_fraction: -3.0,
                window_seconds: u64::MAX,
                min_proxies: u32::MAX,
            },
        ] {
            g.record("x", &proxy(0), true, now, &s);
            g.statuses(now, &s);
        }
    }
}
