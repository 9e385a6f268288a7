//! What the engine is told: [`BrokeringSettings`] (the plain form of the `brokering:` block, built
//! and validated by the configuration code) and the built-in table of exchange connection limits.
//!
//! The budget in force for (exchange, connection type) is, in order: the configured value for that
//! exchange and type; else the built-in figure when `known_exchange_limits` is on; else none
//! (unlimited). See [`BrokeringSettings::budget`].
//!
//! Exchange ids are case-insensitive: they are lower-cased here ([`normalise_exchange`]) and the
//! keys of [`BrokeringSettings::exchanges`] are lower-cased by [`BrokeringSettings::normalised`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use proxy_broker_core::ConnectionType;

/// A connection-attempt budget: at most `attempts` per proxy in any window of `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Budget {
    /// Attempts allowed in one window.
    pub attempts: u32,
    /// The window's length.
    pub per: Duration,
}

impl Budget {
    /// `attempts` per `per_seconds` seconds (the configuration's spelling).
    pub const fn new(attempts: u32, per_seconds: u64) -> Self {
        Self {
            attempts,
            per: Duration::from_secs(per_seconds),
        }
    }
}

impl fmt::Display for Budget {
    /// `300 per 300 s` (whole seconds; fractions are shown in ms).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.per.subsec_millis() == 0 {
            write!(f, "{} per {} s", self.attempts, self.per.as_secs())
        } else {
            write!(f, "{} per {} ms", self.attempts, self.per.as_millis())
        }
    }
}

/// Settings of one exchange (`brokering.exchanges.<id>`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExchangeSettings {
    /// WebSocket connection-attempt budget per proxy (overrides the built-in figure).
    pub websocket: Option<Budget>,
    /// HTTP connection-attempt budget per proxy.
    pub http: Option<Budget>,
    /// First ban after a 418/403 without `retry_after_seconds` (overrides the global `ban_seconds`).
    pub ban_seconds: Option<u64>,
}

/// The exchange-outage guard's settings (`brokering.outage`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutageSettings {
    /// More than this fraction (0..=1) of the distinct proxies reporting must fail.
    pub failing_fraction: f64,
    /// The window reports are counted in.
    pub window_seconds: u64,
    /// At least this many distinct proxies must have reported.
    pub min_proxies: u32,
}

impl Default for OutageSettings {
    fn default() -> Self {
        Self {
            failing_fraction: 0.5,
            window_seconds: 60,
            min_proxies: 2,
        }
    }
}

/// The engine's settings: the `brokering:` block in plain Rust. Range checks belong to the
/// configuration code; the engine only relies on the values not making it panic (it clamps).
#[derive(Debug, Clone, PartialEq)]
pub struct BrokeringSettings {
    /// Per-exchange settings, keyed by lower-case exchange id (see [`Self::normalised`]).
    pub exchanges: BTreeMap<String, ExchangeSettings>,
    /// Apply the built-in budgets ([`KNOWN_EXCHANGE_LIMITS`]) where nothing is configured.
    pub known_exchange_limits: bool,
    /// First ban after a 418/403 without `retry_after_seconds`; doubles on repeats (≤ one day).
    pub ban_seconds: u64,
    /// Penalty after a 429 without `retry_after_seconds`.
    pub penalty_seconds: u64,
    /// The exchange-outage guard.
    pub outage: OutageSettings,
    /// Leases end up to this percentage (0..=100) before the TTL, at random.
    pub lease_jitter_percent: u8,
    /// Most distinct upstream answers kept per (exchange, connection type, region).
    pub max_candidates_per_key: usize,
}

/// Default `ban_seconds` (Binance's shortest automatic ban is 2 minutes).
pub const DEFAULT_BAN_SECONDS: u64 = 120;
/// Default `penalty_seconds`.
pub const DEFAULT_PENALTY_SECONDS: u64 = 30;

impl Default for BrokeringSettings {
    fn default() -> Self {
        Self {
            exchanges: BTreeMap::new(),
            known_exchange_limits: true,
            ban_seconds: DEFAULT_BAN_SECONDS,
            penalty_seconds: DEFAULT_PENALTY_SECONDS,
            outage: OutageSettings::default(),
            lease_jitter_percent: 20,
            max_candidates_per_key: 32,
        }
    }
}

/// Where a budget in force comes from (for `ListExchanges`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `brokering.exchanges.<id>.<type>`.
    Configured,
    /// [`KNOWN_EXCHANGE_LIMITS`].
    BuiltIn,
}

impl BudgetSource {
    /// `configured` or `built_in`.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetSource::Configured => "configured",
            BudgetSource::BuiltIn => "built_in",
        }
    }
}

/// A budget in force and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The budget.
    pub budget: Budget,
    /// Its origin.
    pub source: BudgetSource,
}

/// One row of the built-in table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownLimit {
    /// Lower-case exchange id (cryptofeed's spelling, lower-cased).
    pub exchange: &'static str,
    /// The connection type the figure is for.
    pub connection_type: ConnectionType,
    /// The figure.
    pub budget: Budget,
    /// Where it was published.
    pub source: &'static str,
}

/// WebSocket connection attempts per IP that exchanges publish, as built-in budgets.
///
/// Figures and sources as recorded in the project's design note `design/exchange-limits.md`, read
/// on 2026-12-01 (they were not re-checked against the exchanges' sites from here: exchanges change
/// them, so every one can be overridden in `brokering.exchanges`). Only WebSocket figures are
/// built in: the HTTP limits exchanges publish are request weights per minute, not connection
/// attempts, so no honest HTTP default exists.
///
/// Exchange ids are matched exactly (after lower-casing), with one justified family:
/// `binance_futures` (USDⓈ-M, `fstream`) and `binance_delivery` (COIN-M, `dstream`) get
/// Binance's figure because Binance's derivatives market-stream pages give the same limit as spot
/// (the note's "Binance futures/options: as spot" row). Each id keeps its own count, as the
/// budget is per (proxy, exchange id): they are separate hosts. `binance_us` is a separate company
/// with its own documentation and gets nothing built in; nor do `kraken_futures` (a different API)
/// or any other id not listed.
pub const KNOWN_EXCHANGE_LIMITS: &[KnownLimit] = &[
    KnownLimit {
        exchange: "binance",
        connection_type: ConnectionType::Websocket,
        budget: Budget::new(300, 300),
        source: "binance/binance-spot-api-docs web-socket-streams.md: 300 connections per attempt every 5 minutes per IP",
    },
    KnownLimit {
        exchange: "binance_futures",
        connection_type: ConnectionType::Websocket,
        budget: Budget::new(300, 300),
        source: "developers.binance.com derivatives market streams: as spot, 300 per 5 minutes per IP",
    },
    KnownLimit {
        exchange: "binance_delivery",
        connection_type: ConnectionType::Websocket,
        budget: Budget::new(300, 300),
        source: "developers.binance.com derivatives market streams: as spot, 300 per 5 minutes per IP",
    },
    KnownLimit {
        exchange: "bybit",
        connection_type: ConnectionType::Websocket,
        budget: Budget::new(500, 300),
        source: "bybit-exchange.github.io /docs/v5/rate-limit: 500 connections per 5 minutes to stream.bybit.com",
    },
    KnownLimit {
        exchange: "kraken",
        connection_type: ConnectionType::Websocket,
        budget: Budget::new(150, 600),
        source: "docs.kraken.com spot WebSocket introduction (second-hand): about 150 per rolling 10 minutes",
    },
    KnownLimit {
        exchange: "okx",
        connection_type: ConnectionType::Websocket,
        budget: Budget::new(3, 1),
        source: "okx.com docs-v5 WebSocket overview: 3 connection requests per second per IP",
    },
    KnownLimit {
        exchange: "coinbase",
        connection_type: ConnectionType::Websocket,
        budget: Budget::new(8, 1),
        source: "docs.cdp.coinbase.com WebSocket rate limits: 8 per second per IP",
    },
];

/// The built-in figure for (exchange, connection type), if any; `exchange` lower-case.
pub fn known_limit(exchange: &str, connection_type: ConnectionType) -> Option<&'static KnownLimit> {
    KNOWN_EXCHANGE_LIMITS
        .iter()
        .find(|k| k.exchange == exchange && k.connection_type == connection_type)
}

/// An exchange id as the engine keys it: lower-cased (ids are case-insensitive); borrowed when it
/// already is (the usual case, on the hot path).
pub fn normalise_exchange(exchange: &str) -> Cow<'_, str> {
    if exchange.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(exchange.to_ascii_lowercase())
    } else {
        Cow::Borrowed(exchange)
    }
}

/// Longest ban or penalty the engine applies, whatever it is told (Binance bans for up to 3 days;
/// a repeat report after a day bans again).
pub const MAX_BAN: Duration = Duration::from_secs(24 * 3600);

impl BrokeringSettings {
    /// The same settings with the exchange keys lower-cased (when two keys fold to one, the one
    /// sorting last wins; validation should reject such duplicates).
    pub fn normalised(mut self) -> Self {
        self.exchanges = std::mem::take(&mut self.exchanges)
            .into_iter()
            .map(|(k, v)| (normalise_exchange(&k).into_owned(), v))
            .collect();
        self
    }

    /// [`BrokeringSettings::normalised`], shared: what the engine and the broker's state both
    /// hold (one copy per configuration in force).
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self.normalised())
    }

    /// The settings of `exchange` (lower-case), if configured.
    pub fn exchange(&self, exchange: &str) -> Option<&ExchangeSettings> {
        self.exchanges.get(exchange)
    }

    /// The budget in force for (`exchange`, `connection_type`): configured, else built-in when
    /// `known_exchange_limits`, else `None` (unlimited). `exchange` is matched case-insensitively.
    pub fn budget(&self, exchange: &str, connection_type: ConnectionType) -> Option<Resolved> {
        let exchange = normalise_exchange(exchange);
        let configured = self.exchange(&exchange).and_then(|e| match connection_type {
            ConnectionType::Http => e.http,
            ConnectionType::Websocket => e.websocket,
        });
        if let Some(budget) = configured {
            return Some(Resolved {
                budget,
                source: BudgetSource::Configured,
            });
        }
        if self.known_exchange_limits {
            return known_limit(&exchange, connection_type).map(|k| Resolved {
                budget: k.budget,
                source: BudgetSource::BuiltIn,
            });
        }
        None
    }

    /// First ban length for `exchange` (lower-case) after a 418/403 without `retry_after_seconds`.
    pub fn ban_for(&self, exchange: &str) -> Duration {
        let secs = self
            .exchange(exchange)
            .and_then(|e| e.ban_seconds)
            .unwrap_or(self.ban_seconds);
        Duration::from_secs(secs).min(MAX_BAN)
    }

    /// Penalty after a 429 without `retry_after_seconds`.
    pub fn penalty(&self) -> Duration {
        Duration::from_secs(self.penalty_seconds).min(MAX_BAN)
    }

    /// The lease jitter as a fraction 0..=1.
    pub fn jitter(&self) -> f64 {
        f64::from(self.lease_jitter_percent.min(100)) / 100.0
    }

    /// Exchanges with a budget in force from configuration or the built-in table (lower-case,
    /// sorted, distinct).
    pub fn exchanges_with_budgets(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.exchanges.keys().cloned().collect();
        if self.known_exchange_limits {
            ids.extend(KNOWN_EXCHANGE_LIMITS.iter().map(|k| k.exchange.to_owned()));
        }
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WS: ConnectionType = ConnectionType::Websocket;
    const HTTP: ConnectionType = ConnectionType::Http;

    fn configured() -> BrokeringSettings {
        let mut s = BrokeringSettings::default();
        s.exchanges.insert(
            "Binance".into(),
            ExchangeSettings {
                websocket: Some(Budget::new(10, 60)),
                http: Some(Budget::new(1200, 60)),
                ban_seconds: Some(600),
            },
        );
        s.exchanges.insert(
            "bybit".into(),
            ExchangeSettings {
                http: Some(Budget::new(600, 5)),
                ..Default::default()
            },
        );
        s.normalised()
    }

    #[test]
    fn budget_in_force_is_configured_then_built_in_then_none() {
        let on = configured();
        let off = BrokeringSettings {
            known_exchange_limits: false,
            ..configured()
        };
        // (row, settings, exchange, type, expected)
        type Row<'a> = (
            &'a str,
            &'a BrokeringSettings,
            &'a str,
            ConnectionType,
            Option<(Budget, BudgetSource)>,
        );
        let cases: &[Row] = &[
            (
                "configured ws wins over built-in",
                &on,
                "binance",
                WS,
                Some((Budget::new(10, 60), BudgetSource::Configured)),
            ),
            (
                "configured http",
                &on,
                "BINANCE",
                HTTP,
                Some((Budget::new(1200, 60), BudgetSource::Configured)),
            ),
            (
                "only http configured: ws built in",
                &on,
                "bybit",
                WS,
                Some((Budget::new(500, 300), BudgetSource::BuiltIn)),
            ),
            (
                "built in, id case-insensitive",
                &on,
                "Kraken",
                WS,
                Some((Budget::new(150, 600), BudgetSource::BuiltIn)),
            ),
            (
                "okx built in",
                &on,
                "okx",
                WS,
                Some((Budget::new(3, 1), BudgetSource::BuiltIn)),
            ),
            (
                "coinbase built in",
                &on,
                "coinbase",
                WS,
                Some((Budget::new(8, 1), BudgetSource::BuiltIn)),
            ),
            (
                "binance futures as spot",
                &on,
                "BINANCE_FUTURES",
                WS,
                Some((Budget::new(300, 300), BudgetSource::BuiltIn)),
            ),
            (
                "binance delivery as spot",
                &on,
                "binance_delivery",
                WS,
                Some((Budget::new(300, 300), BudgetSource::BuiltIn)),
            ),
            ("binance us is not binance", &on, "binance_us", WS, None),
            ("no http built in", &on, "kraken", HTTP, None),
            ("unknown exchange", &on, "deribit", WS, None),
            ("built-ins off", &off, "kraken", WS, None),
            (
                "built-ins off, configured stays",
                &off,
                "binance",
                WS,
                Some((Budget::new(10, 60), BudgetSource::Configured)),
            ),
        ];
        for (row, settings, exchange, ct, expected) in cases {
            let got = settings.budget(exchange, *ct).map(|r| (r.budget, r.source));
            assert_eq!(got, *expected, "row {row}");
        }
    }

    #[test]
    fn ban_length_is_per_exchange_then_global_and_capped() {
        let mut s = configured();
        assert_eq!(s.ban_for("binance"), Duration::from_secs(600));
        assert_eq!(s.ban_for("bybit"), Duration::from_secs(DEFAULT_BAN_SECONDS));
        s.ban_seconds = u64::MAX;
        assert_eq!(s.ban_for("okx"), MAX_BAN);
    }

    #[test]
    fn budgets_display_as_attempts_per_window() {
        assert_eq!(Budget::new(300, 300).to_string(), "300 per 300 s");
        let fine = Budget {
            attempts: 3,
            per: Duration::from_millis(1500),
        };
        assert_eq!(fine.to_string(), "3 per 1500 ms");
    }

    #[test]
    fn exchange_ids_are_lower_cased_without_copying_when_they_already_are() {
        assert!(matches!(
            normalise_exchange("binance_futures"),
            Cow::Borrowed("binance_futures")
        ));
        assert_eq!(normalise_exchange("Binance"), "binance");
        assert_eq!(normalise_exchange("OKX"), "okx");
    }

    #[test]
    fn every_built_in_id_is_lower_case_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in KNOWN_EXCHANGE_LIMITS {
            assert_eq!(k.exchange, k.exchange.to_ascii_lowercase());
            assert!(
                seen.insert((k.exchange, k.connection_type)),
                "{} twice",
                k.exchange
            );
            assert!(k.budget.attempts > 0 && !k.budget.per.is_zero());
        }
    }

    #[test]
    fn exchanges_with_budgets_lists_configured_and_built_in_once() {
        let ids = configured().exchanges_with_budgets();
        assert!(ids.contains(&"binance".to_owned()));
        assert!(ids.contains(&"okx".to_owned()));
        assert_eq!(ids.iter().filter(|i| *i == "binance").count(), 1);
    }
}
