//! The cache of upstream answers.
//!
//! - Key: exchange (case-folded), connection type, region.
//! - Lifetime: the answer's `ttl_seconds` (capped at 3600 s; `cache_ttl_seconds` when the answer
//!   had none), ±10 % jitter so entries written together do not expire together.
//! - After expiry an entry is kept `stale_if_error_seconds` longer, to be served (marked stale)
//!   only when every upstream fails.
//! - Storage is moka (bounded by `cache_max_entries` with moka's LRU policy — set explicitly:
//!   moka's default is TinyLFU — and, by its own clock, dropping entries past any possible stale
//!   window). Freshness is decided by the broker's [`Clock`] on every read.
//! - Each entry keeps its answer ready to send (built once when cached), so a hit is a clone.
//! - Ejecting a proxy is O(1): entries holding the same proxy URL share a mark, which ejection
//!   sets; marked entries are dropped on their next read.
//! - Embedded answers are never cached: pools must keep rotating.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moka::ops::compute::{CompResult, Op};
use prost::Message;
use proxy_broker_core::ConnectionType;
use rand::Rng;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::json::{json_to_struct, json_to_value};
use crate::pb;
use crate::upstream::Answer;

/// Distinct metadata objects shared between entries (more are stored per entry).
const METADATA_SHARED: u64 = 10_000;

/// TTL handed out with a stale answer (at most; less when the stale window ends sooner).
pub const STALE_ANSWER_TTL: u64 = 60;

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

/// One cached answer, kept ready to send. `Debug` masks the proxy's userinfo.
pub struct Cached {
    /// The answer as a CACHE response, built once when it was cached, without its metadata.
    pub response: pb::ProxyResponse,
    /// Its metadata (`stale` false), shared by every entry with the same metadata: most
    /// upstreams attach the same few fields to every answer, and a `Struct` costs ~600 bytes.
    metadata: Arc<prost_types::Struct>,
    /// The endpoint that gave it.
    pub endpoint: Arc<str>,
    /// When the upstream's answer arrived.
    pub fetched_at: Instant,
    /// Served as fresh until then.
    pub fresh_until: Instant,
    /// Served as stale (upstreams failing) until then.
    pub stale_until: Instant,
    /// Shared by every entry holding the same proxy URL; set when that proxy is ejected.
    mark: Arc<ProxyMark>,
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached")
            .field(
                "proxy_url",
                &proxy_broker_core::redact::redact_url(self.proxy_url()),
            )
            .field("endpoint", &self.endpoint)
            .field("fresh_until", &self.fresh_until)
            .field("stale_until", &self.stale_until)
            .finish_non_exhaustive()
    }
}

/// Whether the proxy of the entries that share it has been ejected, and which keys hold it (so
/// that ejection removes exactly those, without scanning the cache).
#[derive(Debug, Default)]
struct ProxyMark {
    ejected: AtomicBool,
    keys: std::sync::Mutex<std::collections::HashSet<CacheKey>>,
}

impl Cached {
    /// Whole seconds of freshness left (at least 1 while fresh).
    pub fn remaining_ttl(&self, now: Instant) -> u32 {
        let left = self.fresh_until.saturating_duration_since(now);
        u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).unwrap_or(u32::MAX)
    }

    /// The proxy URL handed out.
    pub fn proxy_url(&self) -> &str {
        &self.response.proxy_url
    }

    fn response(&self) -> pb::ProxyResponse {
        pb::ProxyResponse {
            metadata: Some(prost_types::Struct::clone(&self.metadata)),
            ..self.response.clone()
        }
    }

    fn ejected(&self) -> bool {
        self.mark.ejected.load(Ordering::Relaxed)
    }

    /// The CACHE answer at `now`: the TTL left (never more than the upstream allowed).
    pub fn fresh_response(&self, now: Instant) -> pb::ProxyResponse {
        let mut response = self.response();
        // The entry may live up to 10 % past the answer's TTL (jitter); the feed is never told
        // more than the upstream (or the 3600 s cap) allowed.
        response.ttl_seconds = self.remaining_ttl(now).min(response.ttl_seconds);
        response
    }

    /// The UPSTREAM answer of the flight that fetched this entry.
    pub fn upstream_response(&self) -> pb::ProxyResponse {
        let mut response = self.response();
        response.source = pb::ProxySource::Upstream.into();
        if let Some(m) = response.metadata.as_mut() {
            m.fields.remove("stale");
        }
        response
    }

    /// A stale CACHE answer (every upstream failing): `metadata.stale` true and a short TTL, a
    /// stopgap so the feed asks again soon, but does not hammer the broker.
    pub fn stale_response(&self, now: Instant) -> pb::ProxyResponse {
        let mut response = self.response();
        let left = self.stale_until.saturating_duration_since(now).as_secs();
        response.ttl_seconds = u32::try_from(left.clamp(1, STALE_ANSWER_TTL)).unwrap_or(1);
        if let Some(m) = response.metadata.as_mut() {
            m.fields.insert("stale".into(), json_to_value(&true.into()));
        }
        response
    }
}

/// The answer cache (see the module docs). `Debug` shows its size, never its proxy URLs.
pub struct AnswerCache {
    entries: moka::sync::Cache<CacheKey, Arc<Cached>>,
    /// One mark per proxy URL currently cached, so that ejecting a proxy is O(1): its entries
    /// are found through the shared mark on their next read, not by scanning the cache.
    marks: moka::sync::Cache<String, Arc<ProxyMark>>,
    /// Metadata shared between entries, by its encoding.
    metadata: moka::sync::Cache<Vec<u8>, Arc<prost_types::Struct>>,
    stale_window: Duration,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("entries", &self.entries.entry_count())
            .field("stale_window", &self.stale_window)
            .finish_non_exhaustive()
    }
}

impl AnswerCache {
    /// A cache holding at most `max_entries`, serving stale answers for `stale_window`.
    pub fn new(max_entries: u64, stale_window: Duration, clock: Arc<dyn Clock>) -> Self {
        let lifetime = MAX_TTL.mul_f64(1.1) + stale_window + Duration::from_secs(60);
        // LRU, as documented: moka's default (TinyLFU) would refuse new keys while the cache is
        // full of keys asked for more often, so a new exchange could go uncached for a long time.
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_entries)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .time_to_live(lifetime)
            .build();
        // A mark outlives no entry that uses it by more than the entries' own lifetime; twice the
        // entry cap leaves room for marks whose entries have just expired.
        let marks = moka::sync::Cache::builder()
            .max_capacity(max_entries.saturating_mul(2))
            .time_to_live(lifetime)
            .build();
        let metadata = moka::sync::Cache::builder()
            .max_capacity(METADATA_SHARED)
            .time_to_live(lifetime)
            .build();
        Self {
            entries,
            marks,
            metadata,
            stale_window,
            clock,
        }
    }

    /// The entry for `key` unless its proxy was ejected (then it is dropped).
    fn get(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let entry = self.entries.get(key)?;
        if entry.ejected() {
            self.entries.remove(key);
            return None;
        }
        Some(entry)
    }

    /// The fresh entry for `key`, if any.
    pub fn fresh(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        self.fresh_at(key, self.clock.now())
    }

    /// The entry for `key` if it is fresh at `now` (read from [`AnswerCache::now`]).
    pub fn fresh_at(&self, key: &CacheKey, now: Instant) -> Option<Arc<Cached>> {
        self.get(key).filter(|c| now < c.fresh_until)
    }

    /// An expired entry for `key` that is still inside the stale-if-error window.
    pub fn stale(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let now = self.clock.now();
        self.get(key)
            .filter(|c| now >= c.fresh_until && now < c.stale_until)
    }

    /// Stores `answer` from `endpoint`; its lifetime is its TTL (already defaulted and validated),
    /// capped at [`MAX_TTL`], with ±10 % jitter.
    pub fn insert(&self, key: CacheKey, answer: &Answer, endpoint: Arc<str>) -> Arc<Cached> {
        let ttl = Duration::from_secs(u64::from(answer.ttl_seconds)).min(MAX_TTL);
        let jittered = ttl.mul_f64(rand::rng().random_range(0.9..=1.1));
        let now = self.clock.now();
        let mark = self
            .marks
            .get_with_by_ref(answer.proxy_url.as_str(), || Arc::new(ProxyMark::default()));
        let mut metadata = json_to_struct(&answer.metadata);
        metadata
            .fields
            .insert("stale".into(), json_to_value(&false.into()));
        let metadata = self
            .metadata
            .get_with(metadata.encode_to_vec(), || Arc::new(metadata));
        let cached = Arc::new(Cached {
            response: cached_response(answer, &endpoint),
            metadata,
            endpoint,
            fetched_at: now,
            fresh_until: now + jittered,
            stale_until: now + jittered + self.stale_window,
            mark,
        });
        cached
            .mark
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        self.entries.insert(key, cached.clone());
        cached
    }

    /// Drops every entry whose proxy is `proxy_url` (outlier ejection) without scanning the
    /// cache: the keys that took it are listed on its mark. Returns how many entries went.
    pub fn evict_proxy(&self, proxy_url: &str) -> usize {
        let Some(mark) = self.marks.remove(proxy_url) else {
            return 0;
        };
        // Entries not removed below (a reader holding one) are refused on their next read.
        mark.ejected.store(true, Ordering::Relaxed);
        let keys = std::mem::take(&mut *mark.keys.lock().unwrap_or_else(|e| e.into_inner()));
        keys.iter()
            .filter(|key| {
                // The key may have been refreshed with another proxy since: leave that entry.
                let result = self
                    .entries
                    .entry_by_ref(*key)
                    .and_compute_with(|entry| match entry {
                        Some(e) if Arc::ptr_eq(&e.value().mark, &mark) => Op::Remove,
                        _ => Op::Nop,
                    });
                matches!(result, CompResult::Removed(_))
            })
            .count()
    }

    /// Drops the entries of one exchange (case-insensitive). Returns how many.
    pub fn invalidate_exchange(&self, exchange: &str) -> usize {
        let exchange = exchange.to_lowercase();
        self.remove_where(|k, _| k.exchange == exchange)
    }

    /// Drops every entry. Returns how many.
    pub fn invalidate_all(&self) -> usize {
        let n = self.len();
        self.entries.invalidate_all();
        self.marks.invalidate_all();
        n
    }

    fn remove_where(&self, pred: impl Fn(&CacheKey, &Cached) -> bool) -> usize {
        let doomed: Vec<Arc<CacheKey>> = self
            .entries
            .iter()
            .filter(|(k, c)| !c.ejected() && pred(k, c))
            .map(|(k, _)| k)
            .collect();
        doomed
            .iter()
            .filter(|k| self.entries.remove(k.as_ref()).is_some())
            .count()
    }

    /// One page of the entries still inside their stale window, in key order: at most `limit`
    /// entries of `exchange` (lower-cased; empty: all) whose key comes after `after`, and whether
    /// more follow. O(entries) per page, without sorting the whole cache.
    pub fn list_page(
        &self,
        exchange: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> (Vec<(CacheKey, Arc<Cached>)>, bool) {
        let now = self.clock.now();
        let mut page: Vec<_> = self
            .entries
            .iter()
            .filter(|(k, c)| {
                now < c.stale_until
                    && !c.ejected()
                    && (exchange.is_empty() || k.exchange == exchange)
                    && after.is_none_or(|a| k.as_ref() > a)
            })
            .map(|(k, c)| (CacheKey::clone(&k), c))
            .collect();
        let more = page.len() > limit;
        if more {
            page.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            page.truncate(limit);
        }
        page.sort_by(|a, b| a.0.cmp(&b.0));
        (page, more)
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

/// The CACHE response for `answer` from `endpoint`.
fn cached_response(answer: &Answer, endpoint: &str) -> pb::ProxyResponse {
    pb::ProxyResponse {
        proxy_url: answer.proxy_url.clone(),
        strategy: answer.strategy.clone(),
        ttl_seconds: answer
            .ttl_seconds
            .min(u32::try_from(MAX_TTL.as_secs()).unwrap_or(u32::MAX)),
        fallback_policy: answer.fallback_policy.into(),
        metadata: None,
        source: pb::ProxySource::Cache.into(),
        upstream_endpoint: endpoint.to_owned(),
        lease_expires_at: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use serde_json::Map;

    use super::*;
    use crate::clock::ManualClock;
    use crate::pb::FallbackPolicy;

    fn answer(ttl_seconds: u32) -> Answer {
        Answer {
            proxy_url: "socks5://p.test:1080".into(),
            strategy: "s".into(),
            ttl_seconds,
            fallback_policy: FallbackPolicy::EmbeddedFallback,
            metadata: Map::new(),
        }
    }

    fn key(i: u8) -> CacheKey {
        CacheKey::new(&format!("ex{i}"), ConnectionType::Http, None)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Advance(u64),
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4, 60u32..5000).prop_map(|(k, ttl)| Op::Insert(k, ttl)),
            (0u64..5000).prop_map(Op::Advance),
            Just(Op::Evict),
        ]
    }

    proptest! {
        /// Whatever happens, an entry is served fresh only within its TTL (capped at 3600 s,
        /// +10 % jitter), stale only within TTL + the stale window, never after its proxy was
        /// ejected, and never with a TTL above what the upstream allowed.
        #[test]
        fn the_cache_never_serves_past_ttl_and_stale_window(ops in proptest::collection::vec(op(), 1..40), stale in 0u64..1000) {
            let clock = Arc::new(ManualClock::new());
            let cache = AnswerCache::new(100, Duration::from_secs(stale), clock.clone());
            let mut elapsed = 0u64;
            // key → (inserted at, capped ttl), or None once ejected
            let mut model: HashMap<u8, Option<(u64, u64)>> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, ttl) => {
                        cache.insert(key(k), &answer(ttl), Arc::from("e"));
                        model.insert(k, Some((elapsed, u64::from(ttl).min(3600))));
                    }
                    Op::Advance(s) => {
                        clock.advance(Duration::from_secs(s));
                        elapsed += s;
                    }
                    Op::Evict => {
                        cache.evict_proxy("socks5://p.test:1080");
                        for v in model.values_mut() {
                            *v = None;
                        }
                    }
                }
                for k in 0..4u8 {
                    let fresh = cache.fresh(&key(k));
                    let stale_entry = cache.stale(&key(k));
                    match model.get(&k).copied().flatten() {
                        None => {
                            prop_assert!(fresh.is_none() && stale_entry.is_none(), "key {k} served without a live entry");
                        }
                        Some((at, ttl)) => {
                            let age = elapsed - at;
                            // 1.1 × ttl, rounded up a second for the jitter's fractions.
                            let fresh_limit = ttl + ttl / 10 + 1;
                            if let Some(c) = &fresh {
                                prop_assert!(age < fresh_limit, "fresh at age {age} with ttl {ttl}");
                                prop_assert!(c.fresh_response(clock.now()).ttl_seconds as u64 <= ttl);
                            }
                            if stale_entry.is_some() {
                                prop_assert!(age < fresh_limit + stale, "stale at age {age}, ttl {ttl}, window {stale}");
                            }
                            if age + 1 < ttl - ttl / 10 {
                                prop_assert!(fresh.is_some(), "fresh entry missing at age {age} with ttl {ttl}");
                            }
                        }
                    }
                }
            }
        }
    }
}
