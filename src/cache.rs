//! The cache of upstream answers.
//!
//! - Key: exchange (case-folded), connection type, region.
//! - Lifetime: the answer's `ttl_seconds` (capped at 3600 s; `cache_ttl_seconds` when the answer
//!   had none), ±10 % jitter so entries written together do not expire together.
//! - After expiry an entry is kept `stale_if_error_seconds` longer, to be served (marked stale)
//!   only when every upstream fails.
//! - Storage is moka (bounded by `cache_max_entries`, evicting least-recently-used entries and,
//!   by its own clock, entries past any possible stale window). Freshness is decided by the
//!   broker's [`Clock`] on every read.
//! - Embedded answers are never cached: pools must keep rotating.

use std::sync::Arc;
use std::time::Duration;

use proxy_broker_core::ConnectionType;
use rand::Rng;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::upstream::Answer;

/// Longest lifetime of a cached answer.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// What an answer is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    /// Exchange id, lower-cased.
    pub exchange: String,
    /// HTTP or WebSocket.
    pub connection_type: ConnectionTypeKey,
    /// Region, if any.
    pub region: Option<String>,
}

/// [`ConnectionType`] with an order, for sorted listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectionTypeKey {
    /// HTTP.
    Http,
    /// WebSocket.
    Websocket,
}

impl From<ConnectionType> for ConnectionTypeKey {
    fn from(c: ConnectionType) -> Self {
        match c {
            ConnectionType::Http => ConnectionTypeKey::Http,
            ConnectionType::Websocket => ConnectionTypeKey::Websocket,
        }
    }
}

impl CacheKey {
    /// The key of a lookup.
    pub fn new(exchange: &str, connection_type: ConnectionType, region: Option<&str>) -> Self {
        Self {
            exchange: exchange.to_lowercase(),
            connection_type: connection_type.into(),
            region: region.map(str::to_owned),
        }
    }
}

/// One cached answer.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The validated upstream answer.
    pub answer: Answer,
    /// The endpoint that gave it.
    pub endpoint: Arc<str>,
    /// Served as fresh until then.
    pub fresh_until: Instant,
    /// Served as stale (upstreams failing) until then.
    pub stale_until: Instant,
}

impl Cached {
    /// Whole seconds of freshness left (at least 1 while fresh).
    pub fn remaining_ttl(&self, now: Instant) -> u32 {
        let left = self.fresh_until.saturating_duration_since(now);
        u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).unwrap_or(u32::MAX)
    }
}

/// The answer cache (see the module docs).
#[derive(Debug)]
pub struct AnswerCache {
    entries: moka::sync::Cache<CacheKey, Arc<Cached>>,
    stale_window: Duration,
    clock: Arc<dyn Clock>,
}

impl AnswerCache {
    /// A cache holding at most `max_entries`, serving stale answers for `stale_window`.
    pub fn new(max_entries: u64, stale_window: Duration, clock: Arc<dyn Clock>) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_entries)
            .time_to_live(MAX_TTL.mul_f64(1.1) + stale_window + Duration::from_secs(60))
            .build();
        Self {
            entries,
            stale_window,
            clock,
        }
    }

    /// The fresh entry for `key`, if any.
    pub fn fresh(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let now = self.clock.now();
        self.entries.get(key).filter(|c| now < c.fresh_until)
    }

    /// An expired entry for `key` that is still inside the stale-if-error window.
    pub fn stale(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let now = self.clock.now();
        self.entries
            .get(key)
            .filter(|c| now >= c.fresh_until && now < c.stale_until)
    }

    /// Stores `answer` from `endpoint`; its lifetime is its TTL (already defaulted and validated),
    /// capped at [`MAX_TTL`], with ±10 % jitter.
    pub fn insert(&self, key: CacheKey, answer: Answer, endpoint: Arc<str>) -> Arc<Cached> {
        let ttl = Duration::from_secs(u64::from(answer.ttl_seconds)).min(MAX_TTL);
        let jittered = ttl.mul_f64(rand::rng().random_range(0.9..=1.1));
        let now = self.clock.now();
        let cached = Arc::new(Cached {
            answer,
            endpoint,
            fresh_until: now + jittered,
            stale_until: now + jittered + self.stale_window,
        });
        self.entries.insert(key, cached.clone());
        cached
    }

    /// Drops every entry whose proxy is `proxy_url` (outlier ejection). Returns how many.
    pub fn evict_proxy(&self, proxy_url: &str) -> usize {
        self.remove_where(|_, c| c.answer.proxy_url == proxy_url)
    }

    /// Drops the entries of one exchange (case-insensitive). Returns how many.
    pub fn invalidate_exchange(&self, exchange: &str) -> usize {
        let exchange = exchange.to_lowercase();
        self.remove_where(|k, _| k.exchange == exchange)
    }

    /// Drops every entry. Returns how many.
    pub fn invalidate_all(&self) -> usize {
        self.remove_where(|_, _| true)
    }

    fn remove_where(&self, pred: impl Fn(&CacheKey, &Cached) -> bool) -> usize {
        let doomed: Vec<Arc<CacheKey>> = self
            .entries
            .iter()
            .filter(|(k, c)| pred(k, c))
            .map(|(k, _)| k)
            .collect();
        doomed
            .iter()
            .filter(|k| self.entries.remove(k.as_ref()).is_some())
            .count()
    }

    /// Every entry still inside its stale window, sorted by key.
    pub fn list(&self) -> Vec<(CacheKey, Arc<Cached>)> {
        let now = self.clock.now();
        let mut all: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, c)| now < c.stale_until)
            .map(|(k, c)| (CacheKey::clone(&k), c))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Entries held (fresh or stale).
    pub fn len(&self) -> usize {
        self.entries.run_pending_tasks();
        usize::try_from(self.entries.entry_count()).unwrap_or(usize::MAX)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The broker's clock.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }
}
