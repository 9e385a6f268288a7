//! The `brokering:` block: per-exchange connection-attempt budgets and ban lengths, penalties,
//! the exchange outage guard, lease jitter and the candidate cap. Environment form
//! `PROXY_BROKER_BROKERING__<KEY>` (see [`crate::config::BROKERING_ENV_PREFIX`]).
//!
//! Everything here is hot-reloadable: `Broker::reload` does not count it as restart-needed, and the
//! engine takes new settings ([`BrokeringConfig::settings`]) through [`super::Brokering::reload`].

use std::collections::BTreeMap;

use proxy_broker_core::load::{Problems, Validate};
use proxy_broker_core::validate::{check_exchange_id, check_range};
use serde::{Deserialize, Serialize};

use super::settings::{BrokeringSettings, Budget, DEFAULT_BAN_SECONDS, ExchangeSettings, OutageSettings};

/// Allowed `attempts` of a budget.
pub const ATTEMPTS_RANGE: (i64, i64) = (1, 1_000_000);
/// Allowed `per_seconds` of a budget (a day at most).
pub const PER_SECONDS_RANGE: (i64, i64) = (1, 86_400);
/// Allowed `ban_seconds` and `penalty_seconds` (a day at most).
pub const BAN_SECONDS_RANGE: (i64, i64) = (1, 86_400);
/// Allowed `outage.window_seconds`.
pub const WINDOW_SECONDS_RANGE: (i64, i64) = (1, 3_600);
/// Allowed `outage.min_proxies`.
pub const MIN_PROXIES_RANGE: (i64, i64) = (1, 10_000);
/// Allowed `lease_jitter_percent` (90 % at most, so a lease never shrinks to nothing).
pub const LEASE_JITTER_PERCENT_RANGE: (i64, i64) = (0, 90);
/// Allowed `max_candidates_per_key`.
pub const MAX_CANDIDATES_RANGE: (i64, i64) = (1, 1_024);

/// The `brokering:` block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokeringConfig {
    /// Per-exchange budgets and ban lengths, keyed by exchange id (case-insensitive, lower-cased
    /// on load); they win over the built-in figures.
    pub exchanges: BTreeMap<String, ExchangeLimits>,
    /// Use the built-in budgets of exchanges with documented limits
    /// ([`KNOWN_EXCHANGE_LIMITS`](super::settings::KNOWN_EXCHANGE_LIMITS)).
    pub known_exchange_limits: bool,
    /// How long a proxy is penalised for an exchange after a 429 without `retry_after_seconds`,
    /// 1..=86400.
    pub penalty_seconds: i64,
    /// When an exchange counts as down (its failures then stop ejecting proxies).
    pub outage: OutageConfig,
    /// Leases end at TTL × (1 − U(0, jitter)), 0..=90 percent, so rotations do not line up.
    pub lease_jitter_percent: i64,
    /// Most distinct candidates kept per (exchange, connection type, region), 1..=1024.
    pub max_candidates_per_key: i64,
}

/// `brokering.exchanges.<id>`: one exchange's limits. Absent budgets fall back to the built-in
/// figures (when `known_exchange_limits`), else to none; an absent `ban_seconds` to
/// [`DEFAULT_BAN_SECONDS`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeLimits {
    /// WebSocket connection attempts allowed per proxy.
    #[serde(default)]
    pub websocket: Option<AttemptBudget>,
    /// HTTP hand-outs allowed per proxy.
    #[serde(default)]
    pub http: Option<AttemptBudget>,
    /// Ban length after a 418/403 without `retry_after_seconds` (doubling on repeats, capped at
    /// a day), 1..=86400.
    #[serde(default)]
    pub ban_seconds: Option<i64>,
}

/// `{ attempts, per_seconds }`: at most `attempts` hand-outs of one proxy in any `per_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptBudget {
    /// Attempts per window, 1..=1000000.
    pub attempts: i64,
    /// Window length, 1..=86400 seconds.
    pub per_seconds: i64,
}

/// `brokering.outage`: an exchange is down (not its proxies) when more than `failing_fraction`
/// of the distinct proxies reporting for it within `window_seconds` (at least `min_proxies` of
/// them) fail.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutageConfig {
    /// Fraction of reporting proxies that must be failing, above 0 and at most 1.
    pub failing_fraction: f64,
    /// How far back reports count, 1..=3600 seconds.
    pub window_seconds: i64,
    /// Fewest distinct reporting proxies before an outage can be declared, 1..=10000.
    pub min_proxies: i64,
}

impl Default for BrokeringConfig {
    fn default() -> Self {
        Self {
            exchanges: BTreeMap::new(),
            known_exchange_limits: true,
            penalty_seconds: 30,
            outage: OutageConfig::default(),
            lease_jitter_percent: 20,
            max_candidates_per_key: 32,
        }
    }
}

impl Default for OutageConfig {
    fn default() -> Self {
        Self {
            failing_fraction: 0.5,
            window_seconds: 60,
            min_proxies: 2,
        }
    }
}

impl BrokeringConfig {
    /// The engine's form of the block: checked values in native units, exchange ids lower-case.
    /// Exchanges without a configured `ban_seconds` use [`DEFAULT_BAN_SECONDS`]; budgets not
    /// configured come from the engine's built-in table while `known_exchange_limits` is on.
    pub fn settings(&self) -> BrokeringSettings {
        BrokeringSettings {
            exchanges: self
                .exchanges
                .iter()
                .map(|(id, e)| {
                    let settings = ExchangeSettings {
                        websocket: e.websocket.map(|b| b.budget()),
                        http: e.http.map(|b| b.budget()),
                        ban_seconds: e.ban_seconds.map(to_u64),
                    };
                    (id.clone(), settings)
                })
                .collect(),
            known_exchange_limits: self.known_exchange_limits,
            ban_seconds: DEFAULT_BAN_SECONDS,
            penalty_seconds: to_u64(self.penalty_seconds),
            outage: OutageSettings {
                failing_fraction: self.outage.failing_fraction,
                window_seconds: to_u64(self.outage.window_seconds),
                min_proxies: u32::try_from(self.outage.min_proxies.max(1)).unwrap_or(u32::MAX),
            },
            lease_jitter_percent: u8::try_from(self.lease_jitter_percent.clamp(0, 90)).unwrap_or(0),
            max_candidates_per_key: usize::try_from(self.max_candidates_per_key.max(1)).unwrap_or(1),
        }
        .normalised()
    }
}

impl AttemptBudget {
    /// The engine's form (values are in range after validation; out-of-range ones saturate).
    pub fn budget(&self) -> Budget {
        Budget::new(
            u32::try_from(self.attempts.max(0)).unwrap_or(u32::MAX),
            to_u64(self.per_seconds),
        )
    }
}

/// A validated non-negative value as `u64` (negative ones, which validation refuses, become 0).
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn range(problems: &mut Problems, path: String, value: i64, (min, max): (i64, i64)) {
    check_range(problems, path, value, min, max);
}

impl Validate for BrokeringConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        let mut seen = BTreeMap::new();
        for (id, limits) in &self.exchanges {
            let p = format!("{path}.exchanges.{id}");
            if let Err(rule) = check_exchange_id(id) {
                problems.push(p.clone(), format!("exchange id '{id}' {rule}"));
            }
            // The loader folds ids to lower case; this catches configurations built otherwise.
            if let Some(other) = seen.insert(id.to_lowercase(), id) {
                problems.push(
                    p.clone(),
                    format!("exchange ids '{other}' and '{id}' are the same (ids are case-insensitive)"),
                );
            }
            limits.validate(&p, problems);
        }
        range(
            problems,
            format!("{path}.penalty_seconds"),
            self.penalty_seconds,
            BAN_SECONDS_RANGE,
        );
        self.outage.validate(&format!("{path}.outage"), problems);
        range(
            problems,
            format!("{path}.lease_jitter_percent"),
            self.lease_jitter_percent,
            LEASE_JITTER_PERCENT_RANGE,
        );
        range(
            problems,
            format!("{path}.max_candidates_per_key"),
            self.max_candidates_per_key,
            MAX_CANDIDATES_RANGE,
        );
    }
}

impl Validate for ExchangeLimits {
    fn validate(&self, path: &str, problems: &mut Problems) {
        for (kind, budget) in [("websocket", &self.websocket), ("http", &self.http)] {
            if let Some(b) = budget {
                b.validate(&format!("{path}.{kind}"), problems);
            }
        }
        if let Some(ban) = self.ban_seconds {
            range(problems, format!("{path}.ban_seconds"), ban, BAN_SECONDS_RANGE);
        }
    }
}

impl Validate for AttemptBudget {
    fn validate(&self, path: &str, problems: &mut Problems) {
        range(
            problems,
            format!("{path}.attempts"),
            self.attempts,
            ATTEMPTS_RANGE,
        );
        range(
            problems,
            format!("{path}.per_seconds"),
            self.per_seconds,
            PER_SECONDS_RANGE,
        );
    }
}

impl Validate for OutageConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        let f = self.failing_fraction;
        // Written as "in range" and negated, so that NaN (YAML `.nan`) is refused too.
        let in_range = f > 0.0 && f <= 1.0;
        if !in_range {
            problems.push(
                format!("{path}.failing_fraction"),
                format!("{f} is out of range (allowed above 0 and at most 1, e.g. 0.5)"),
            );
        }
        range(
            problems,
            format!("{path}.window_seconds"),
            self.window_seconds,
            WINDOW_SECONDS_RANGE,
        );
        range(
            problems,
            format!("{path}.min_proxies"),
            self.min_proxies,
            MIN_PROXIES_RANGE,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proxy_broker_core::ConnectionType;

    use super::*;
    use crate::brokering::settings::BudgetSource;

    #[test]
    fn the_defaults_are_the_engines_defaults() {
        assert_eq!(
            BrokeringConfig::default().settings(),
            BrokeringSettings::default()
        );
        let mut problems = Problems::default();
        BrokeringConfig::default().validate("brokering", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn settings_carry_every_key_in_native_units() {
        let config = BrokeringConfig {
            exchanges: [(
                "binance".to_owned(),
                ExchangeLimits {
                    websocket: Some(AttemptBudget {
                        attempts: 10,
                        per_seconds: 60,
                    }),
                    http: None,
                    ban_seconds: Some(45),
                },
            )]
            .into_iter()
            .collect(),
            known_exchange_limits: true,
            penalty_seconds: 7,
            outage: OutageConfig {
                failing_fraction: 0.25,
                window_seconds: 30,
                min_proxies: 4,
            },
            lease_jitter_percent: 50,
            max_candidates_per_key: 8,
        };
        let s = config.settings();
        let ws = ConnectionType::Websocket;
        // (row, budget in force, expected)
        let cases = [
            (
                "configured",
                s.budget("Binance", ws).map(|r| (r.budget, r.source)),
                Some((Budget::new(10, 60), BudgetSource::Configured)),
            ),
            (
                "built in",
                s.budget("kraken", ws).map(|r| (r.budget, r.source)),
                Some((Budget::new(150, 600), BudgetSource::BuiltIn)),
            ),
            (
                "no http",
                s.budget("binance", ConnectionType::Http)
                    .map(|r| (r.budget, r.source)),
                None,
            ),
        ];
        for (row, got, want) in cases {
            assert_eq!(got, want, "{row}");
        }
        assert_eq!(s.ban_for("binance"), Duration::from_secs(45));
        assert_eq!(s.ban_for("okx"), Duration::from_secs(DEFAULT_BAN_SECONDS));
        assert_eq!(s.penalty(), Duration::from_secs(7));
        assert_eq!(
            s.outage,
            OutageSettings {
                failing_fraction: 0.25,
                window_seconds: 30,
                min_proxies: 4
            }
        );
        assert!((s.jitter() - 0.5).abs() < 1e-9);
        assert_eq!(s.max_candidates_per_key, 8);
        let off = BrokeringConfig {
            known_exchange_limits: false,
            ..config
        };
        assert_eq!(off.settings().budget("kraken", ws), None);
    }
}
