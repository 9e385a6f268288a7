//! Ban classes: what a feed's feedback means for the proxy at that exchange.
//!
//! | feedback | verdict |
//! |---|---|
//! | success | the failure count restarts |
//! | 418 or 403 | banned **for that exchange only**: `retry_after_seconds`, else the exchange's `ban_seconds` doubling on repeats; never more than a day |
//! | 451 (geo-blocked) | banned for that exchange for a day |
//! | 429 | penalised for that exchange: `retry_after_seconds`, else `penalty_seconds` (picked only when nothing unpenalised has headroom) |
//! | 5xx, no status, any other status | a plain failure: counted per (proxy, exchange); `eject_after_failures` in a row eject it for that exchange, unless the exchange is in an outage |
//!
//! A `retry_after_seconds` of 0 counts as absent. Every failure (ban, penalty or plain) also ends
//! one of the proxy's leases, as failure feedback does for embedded pools.
//!
//! [`classify`] is pure. The history a verdict depends on (how many bans before, how many
//! failures in a row) lives in the store, which applies each verdict as one atomic step
//! ([`apply`]): two feeds reporting the same ban at once cannot both see "first ban".

use std::time::Duration;

use tokio::time::Instant;

use super::settings::MAX_BAN;
use crate::store::{BanLength, StateKey, Store, StoreError};

/// How long a 451 (the exchange refuses the proxy's region) bans for.
pub const GEO_BLOCK_BAN: Duration = Duration::from_secs(24 * 3600);

/// The lengths in force for one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanPolicy {
    /// First ban after a 418/403 without `retry_after_seconds`.
    pub ban: Duration,
    /// Penalty after a 429 without `retry_after_seconds`.
    pub penalty: Duration,
}

/// What one feedback report means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The connection worked.
    Success,
    /// 418/403/451: banned for the exchange.
    Ban {
        /// How long.
        length: BanLength,
        /// The status that said so.
        status: u32,
    },
    /// 429: penalised for the exchange this long.
    Penalise(Duration),
    /// Anything else that failed.
    Failure,
}

impl Verdict {
    /// Whether the report says the exchange could not be reached through the proxy (what the
    /// outage guard counts): only plain failures. A ban or a 429 is an answer from a working
    /// exchange.
    pub fn is_plain_failure(&self) -> bool {
        matches!(self, Verdict::Failure)
    }
}

/// The verdict for one report (see the module docs for the table).
pub fn classify(
    success: bool,
    http_status: Option<u32>,
    retry_after: Option<Duration>,
    policy: BanPolicy,
) -> Verdict {
    if success {
        return Verdict::Success;
    }
    let retry_after = retry_after.filter(|d| !d.is_zero()).map(|d| d.min(MAX_BAN));
    match http_status {
        Some(status @ (418 | 403)) => Verdict::Ban {
            length: match retry_after {
                Some(d) => BanLength::Exactly(d),
                None => BanLength::Doubling {
                    base: policy.ban.min(MAX_BAN),
                    cap: MAX_BAN,
                },
            },
            status,
        },
        Some(451) => Verdict::Ban {
            length: BanLength::Exactly(GEO_BLOCK_BAN),
            status: 451,
        },
        Some(429) => Verdict::Penalise(retry_after.unwrap_or(policy.penalty).min(MAX_BAN)),
        _ => Verdict::Failure,
    }
}

/// The `strikes`-th ban's length: `base × 2^(strikes − 1)`, at most `cap` (`strikes` ≥ 1).
pub fn doubled(base: Duration, strikes: u32, cap: Duration) -> Duration {
    let exponent = strikes.saturating_sub(1).min(31);
    base.checked_mul(1u32 << exponent).unwrap_or(cap).min(cap)
}

/// Whether `consecutive` failures in a row eject the proxy: at `threshold` (at least 1), never
/// while the exchange is in an outage.
pub fn ejects(consecutive: u32, threshold: u32, exchange_in_outage: bool) -> bool {
    !exchange_in_outage && consecutive >= threshold.max(1)
}

/// What applying a verdict did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// The ban's or penalty's end, for those verdicts.
    pub until: Option<Instant>,
    /// Failures in a row after a plain failure (`None` when not counted: outage or unknown).
    pub consecutive_failures: Option<u32>,
    /// The ejection's end, when this failure ejected the proxy.
    pub ejected_until: Option<Instant>,
}

/// Applies `verdict` for `key` through the store: each step is one store operation.
/// `create`: the proxy is the broker's own (an embedded member), so state may be created for it.
pub async fn apply(
    store: &dyn Store,
    key: StateKey<'_>,
    verdict: Verdict,
    create: bool,
    eject_after_failures: u32,
    exchange_in_outage: bool,
) -> Result<Applied, StoreError> {
    let mut applied = Applied::default();
    if !matches!(verdict, Verdict::Success) {
        store.release(key).await?;
    }
    match verdict {
        Verdict::Success => {
            store.record_success(key).await?;
        }
        Verdict::Ban { length, .. } => {
            applied.until = store.ban(key, length, create).await?;
        }
        Verdict::Penalise(length) => {
            applied.until = store.penalise(key, length, create).await?;
        }
        Verdict::Failure if exchange_in_outage => {}
        Verdict::Failure => {
            applied.consecutive_failures = store.record_failure(key, create).await?;
            if let Some(n) = applied.consecutive_failures
                && ejects(n, eject_after_failures, false)
            {
                applied.ejected_until = store.eject(key, create).await?;
            }
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::SystemClock;
    use crate::store::memory::MemoryStore;
    use crate::store::{ChangeKind, HandOut};

    const POLICY: BanPolicy = BanPolicy {
        ban: Duration::from_secs(120),
        penalty: Duration::from_secs(30),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn feedback_is_classified_by_status_and_retry_after() {
        let doubling = BanLength::Doubling {
            base: secs(120),
            cap: MAX_BAN,
        };
        // (row, success, status, retry_after, verdict)
        type Row = (&'static str, bool, Option<u32>, Option<u64>, Verdict);
        let rows: &[Row] = &[
            ("success", true, None, None, Verdict::Success),
            (
                "success wins over a status",
                true,
                Some(429),
                Some(5),
                Verdict::Success,
            ),
            (
                "418 with retry-after",
                false,
                Some(418),
                Some(300),
                Verdict::Ban {
                    length: BanLength::Exactly(secs(300)),
                    status: 418,
                },
            ),
            (
                "418 without",
                false,
                Some(418),
                None,
                Verdict::Ban {
                    length: doubling,
                    status: 418,
                },
            ),
            (
                "403 without",
                false,
                Some(403),
                None,
                Verdict::Ban {
                    length: doubling,
                    status: 403,
                },
            ),
            (
                "403 retry-after 0 is absent",
                false,
                Some(403),
                Some(0),
                Verdict::Ban {
                    length: doubling,
                    status: 403,
                },
            ),
            (
                "418 retry-after capped at a day",
                false,
                Some(418),
                Some(3 * 86_400),
                Verdict::Ban {
                    length: BanLength::Exactly(MAX_BAN),
                    status: 418,
                },
            ),
            (
                "451 is a day whatever retry-after",
                false,
                Some(451),
                Some(5),
                Verdict::Ban {
                    length: BanLength::Exactly(GEO_BLOCK_BAN),
                    status: 451,
                },
            ),
            (
                "429 with retry-after",
                false,
                Some(429),
                Some(7),
                Verdict::Penalise(secs(7)),
            ),
            ("429 without", false, Some(429), None, Verdict::Penalise(secs(30))),
            (
                "429 capped",
                false,
                Some(429),
                Some(u64::from(u32::MAX)),
                Verdict::Penalise(MAX_BAN),
            ),
            ("500", false, Some(500), None, Verdict::Failure),
            (
                "503 with retry-after",
                false,
                Some(503),
                Some(60),
                Verdict::Failure,
            ),
            ("no status", false, None, None, Verdict::Failure),
            ("407 from the proxy", false, Some(407), None, Verdict::Failure),
            ("404", false, Some(404), None, Verdict::Failure),
            ("absurd status", false, Some(u32::MAX), None, Verdict::Failure),
        ];
        for (row, success, status, retry_after, expected) in rows {
            let got = classify(*success, *status, retry_after.map(secs), POLICY);
            assert_eq!(got, *expected, "row {row}");
        }
    }

    #[test]
    fn bans_double_per_strike_and_stop_at_the_cap() {
        // (strikes, expected seconds) with base 120 s, cap one day.
        let rows = [
            (0, 120),
            (1, 120),
            (2, 240),
            (3, 480),
            (10, 61_440),
            (11, 86_400),
            (40, 86_400),
            (u32::MAX, 86_400),
        ];
        for (strikes, expected) in rows {
            assert_eq!(
                doubled(secs(120), strikes, MAX_BAN),
                secs(expected),
                "strikes {strikes}"
            );
        }
        assert_eq!(doubled(Duration::MAX, 2, MAX_BAN), MAX_BAN);
    }

    #[test]
    fn ejection_needs_the_threshold_and_no_outage() {
        // (consecutive, threshold, outage, ejects)
        let rows = [
            (2, 3, false, false),
            (3, 3, false, true),
            (4, 3, false, true),
            (3, 3, true, false),
            (1, 0, false, true),
        ];
        for (n, threshold, outage, expected) in rows {
            assert_eq!(
                ejects(n, threshold, outage),
                expected,
                "{n} of {threshold}, outage {outage}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn applying_a_ban_scopes_it_to_the_exchange_and_ends_a_lease() {
        let store = MemoryStore::new(100, Arc::new(SystemClock));
        let proxy = "http://p:1";
        let hand_out = HandOut {
            connection_type: proxy_broker_core::ConnectionType::Websocket,
            budget: None,
            lease: secs(60),
        };
        for exchange in ["binance", "bybit"] {
            store
                .try_attempt(StateKey { proxy, exchange }, hand_out)
                .await
                .unwrap();
        }
        let key = StateKey {
            proxy,
            exchange: "binance",
        };
        let mut changes = store.subscribe();
        let verdict = classify(false, Some(418), Some(secs(90)), POLICY);
        let applied = apply(&store, key, verdict, false, 3, false).await.unwrap();
        assert_eq!(applied.until, Some(Instant::now() + secs(90)));
        assert!(matches!(changes.try_recv().unwrap().kind, ChangeKind::Banned(_)));
        let states = |exchange| {
            let store = &store;
            async move {
                store
                    .states(exchange, &[proxy])
                    .await
                    .unwrap()
                    .pop()
                    .flatten()
                    .unwrap()
            }
        };
        let binance = states("binance").await;
        assert!(binance.banned_until.is_some());
        assert_eq!(binance.live_leases, 0);
        let bybit = states("bybit").await;
        assert_eq!(
            bybit.banned_until, None,
            "a ban at one exchange is not a ban at another"
        );
        assert_eq!(bybit.live_leases, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn plain_failures_eject_at_the_threshold_but_not_in_an_outage() {
        let store = MemoryStore::new(100, Arc::new(SystemClock));
        let key = StateKey {
            proxy: "http://p:1",
            exchange: "okx",
        };
        for outage in [true, true, true] {
            let applied = apply(&store, key, Verdict::Failure, true, 3, outage)
                .await
                .unwrap();
            assert_eq!(applied.consecutive_failures, None, "not counted in an outage");
        }
        let mut last = Applied::default();
        for _ in 0..3 {
            last = apply(&store, key, Verdict::Failure, true, 3, false)
                .await
                .unwrap();
        }
        assert_eq!(last.consecutive_failures, Some(3));
        assert!(last.ejected_until.is_some());
        let stranger = StateKey {
            proxy: "http://stranger:1",
            exchange: "okx",
        };
        let applied = apply(&store, stranger, Verdict::Failure, false, 1, false)
            .await
            .unwrap();
        assert_eq!(applied, Applied::default(), "nothing is recorded for a stranger");
    }
}
