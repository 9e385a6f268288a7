//! Feed-aware brokering: spread the fleet within each exchange's per-IP connection limits, scope
//! bans per exchange, and tell watchers when a proxy goes bad.
//!
//! One file per concern:
//! - [`config`]: the `brokering:` configuration block (serde types and validation), turned into
//!   the engine's [`BrokeringSettings`] by [`config::BrokeringConfig::settings`];
//! - [`settings`]: the engine's settings ([`BrokeringSettings`]) and the built-in table of
//!   exchange connection limits, with the rule for the budget in force;
//! - [`crate::store`]: **the state seam** — the [`Store`] trait for everything kept per (proxy, exchange),
//!   designed for a shared (Redis) implementation, with its in-process [`MemoryStore`];
//! - [`crate::store::window`]: the exact sliding-window budget counter (and why not GCRA or a fixed window);
//! - [`bans`]: feedback → verdict (ban / penalty / plain failure) and applying it;
//! - [`outage`]: the exchange-outage guard;
//! - [`candidates`]: candidate sets (embedded members, upstream answers); [`choice`]: the choice
//!   among them (eligibility, strategy, the atomic hand-out);
//! - [`sticky`]: weighted rendezvous hashing for sticky keys;
//! - [`lease`]: jittered lease ends; [`marks`]: what an unbudgeted upstream hand-out leaves
//!   behind instead of a store entry;
//! - [`engine`]: the [`Brokering`] facade the broker calls;
//! - [`watch`]: the registry of `WatchProxy` streams (push migration) and the stream each reads.
//!
//! # How a `RequestProxy` flows through it
//! The broker validates the request into an [`Ask`] (exchange, connection type, region,
//! `sticky_key`, and the TTL embedded answers get), then:
//! 1. **Without delegation** it calls [`Brokering::choose_embedded`]. `Ok(None)`: no embedded proxy,
//!    answer DIRECT. `Ok(Some(picked))`: answer EMBEDDED with `picked.url`, `strategy` from
//!    `picked.payload.kind`, `timeout_seconds` from the payload, and `lease_expires_at` =
//!    `picked.lease_expires_at`. `Err(NotPicked::Exhausted(e))`: RESOURCE_EXHAUSTED with
//!    `e.message` and `RetryInfo(e.retry_after)`.
//! 2. **With delegation** it calls [`Brokering::choose_delegated`] with a `refill` closure that
//!    asks the upstream once (joining the broker's single flight for the key, adding
//!    `metadata.exclude_proxies` = the `exclude` list) and turns a valid answer into an [`Offer`]
//!    whose payload is the answer ready to send. The engine picks among the key's live upstream
//!    candidates (the budget's attempt is counted in the same step), refills when none has
//!    headroom (one refill per key at a time), and falls back to penalised candidates last.
//!    `Ok(picked)`: answer CACHE/UPSTREAM from `picked.payload`, with `ttl_seconds` from
//!    `picked.expires_at` and `lease_expires_at`. `Err(NotPicked::Upstream(_))`: the broker's
//!    existing fallbacks (a stale answer through [`Brokering::admit`], then the embedded
//!    configuration through [`Brokering::choose_embedded`] when `fallback_to_embedded`, else
//!    UNAVAILABLE). `Err(NotPicked::Exhausted(e))`: the embedded fallback if it has headroom, else
//!    RESOURCE_EXHAUSTED as above.
//!    `Err(NotPicked::Store(_))` (a shared store unreachable): UNAVAILABLE.
//!
//! Every hand-out, embedded or delegated, counts one attempt for (proxy, exchange, connection
//! type) and takes a lease; no proxy is ever handed out over its budget, however many requests
//! run at once or (with a shared store) however many brokers serve them. (An upstream hand-out
//! without a budget leaves only a [`marks`] mark: nothing a choice reads would be counted.)
//!
//! # How a `ReportFeedback` flows through it
//! The broker forwards the report upstream as today (with `http_status` and
//! `retry_after_seconds`) and calls [`Brokering::report`] with a [`Report`]. The engine ignores
//! reports about proxies it never handed out for that exchange (unless they are embedded members),
//! classifies the rest ([`bans::classify`]), feeds the exchange's outage guard, and applies the
//! verdict through the store: a ban or penalty for that exchange only, or a counted failure that
//! ejects at `eject_after_failures` unless the exchange is in an outage. A ban also drops the
//! proxy from that exchange's upstream candidates. An outage starting lifts the ejections made for
//! the exchange within the window. Bans, penalties, ejections and lifts are published on
//! [`Brokering::subscribe`], which `WatchProxy` uses to move feeds off a bad proxy (waking only the
//! watchers of the affected key).
//!
//! # Admin
//! [`Brokering::list_proxies`] pages through the store (`ListProxies`); [`Brokering::exchanges`]
//! lists budgets in force and outage state (`ListExchanges`, and the
//! `proxy_broker_exchange_outage{exchange}` gauge). Nothing here labels a metric with a proxy URL,
//! and every `Debug` redacts proxy passwords.

pub mod bans;
pub mod candidates;
pub mod choice;
pub mod config;
pub mod engine;
pub mod lease;
pub mod marks;
pub mod outage;
pub mod settings;
pub mod sticky;
pub mod watch;

#[cfg(test)]
mod tests;

pub use crate::store::MemoryStore;
pub use crate::store::{Change, ChangeKind, Store, StoreError};
pub use choice::Picked;
pub use engine::{
    Ask, Brokering, Ejection, EmbeddedPick, ExchangeStatus, Exhausted, NotPicked, Offer, Report, Reported,
};
pub use settings::{BrokeringSettings, Budget, ExchangeSettings, OutageSettings};
