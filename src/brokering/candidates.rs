//! Candidate sets: which proxies a request may get, per (exchange, connection type, region).
//!
//! - Without delegation, the embedded entry's members ([`EmbeddedCandidates`], resolved in the
//!   same order as [`proxy_broker_core::EmbeddedResolver`]: the exchange's entry, else the
//!   default's, else direct; region plays no part). A plain `url` entry is a set of one.
//! - With delegation, every distinct upstream answer still within its TTL
//!   ([`UpstreamCandidates`]), at most `max_candidates_per_key` per key (expired ones go first,
//!   then the oldest), in a bounded number of keys.
//!
//! [`super::choice`] picks among them.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foldhash::quality::RandomState;
use hashlink::LinkedHashMap;
use hashlink::linked_hash_map::RawEntryMut;
use proxy_broker_core::redact::redact_url;
use proxy_broker_core::{ConnectionProxies, ConnectionType, ProxyConfig, ProxySettings, Strategy};
use tokio::time::Instant;

/// Longest TTL an upstream answer is kept as a candidate.
pub const MAX_CANDIDATE_TTL: Duration = Duration::from_secs(3600);
/// Most (exchange, connection type, region) keys with upstream candidates.
pub const MAX_CANDIDATE_KEYS: u64 = 10_000;

/// One proxy that may be handed out.
#[derive(Clone)]
pub struct Candidate<P> {
    /// Its URL (may hold a password).
    pub url: Arc<str>,
    /// Weight for `random` and sticky choice (pool weights; 1 for upstream answers).
    pub weight: f64,
    /// When it stops being a candidate (`None`: embedded, until reload).
    pub expires_at: Option<Instant>,
    /// What the caller keeps with it (the upstream answer, ready to send).
    pub payload: P,
}

impl<P> fmt::Debug for Candidate<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Candidate")
            .field("url", &redact_url(&self.url))
            .field("weight", &self.weight)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

// --- Embedded candidates ------------------------------------------------------------------------

/// How an embedded entry picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddedKind {
    /// A plain `url` entry.
    Static,
    /// A pool with this strategy.
    Pool(Strategy),
}

impl EmbeddedKind {
    /// What feeds are told as `strategy`: `static` or the pool's strategy.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbeddedKind::Static => "static",
            EmbeddedKind::Pool(s) => s.as_str(),
        }
    }
}

/// The candidates of one embedded entry.
#[derive(Debug)]
pub struct EmbeddedList {
    /// Enabled members, in configured order (payload: nothing).
    pub members: Vec<Candidate<()>>,
    /// Static or a pool's strategy.
    pub kind: EmbeddedKind,
    /// The entry's `timeout_seconds`.
    pub timeout_seconds: i64,
    /// Round-robin cursor.
    pub cursor: AtomicUsize,
}

impl EmbeddedList {
    fn new(config: &ProxyConfig) -> Option<Self> {
        let candidate = |url: &str, weight: f64| Candidate {
            url: Arc::from(url),
            weight,
            expires_at: None,
            payload: (),
        };
        let (members, kind) = match (&config.pool, &config.url) {
            (Some(pool), _) => (
                pool.proxies
                    .iter()
                    .filter(|m| m.enabled)
                    .map(|m| candidate(&m.url, m.weight))
                    .collect::<Vec<_>>(),
                EmbeddedKind::Pool(pool.strategy),
            ),
            (None, Some(url)) => (vec![candidate(url, 1.0)], EmbeddedKind::Static),
            (None, None) => return None,
        };
        (!members.is_empty()).then(|| Self {
            members,
            kind,
            timeout_seconds: config.timeout_seconds,
            cursor: AtomicUsize::new(0),
        })
    }
}

#[derive(Debug, Default)]
struct EmbeddedScope {
    http: Option<Arc<EmbeddedList>>,
    websocket: Option<Arc<EmbeddedList>>,
}

impl EmbeddedScope {
    fn new(c: &ConnectionProxies) -> Self {
        Self {
            http: c.http.as_ref().and_then(EmbeddedList::new).map(Arc::new),
            websocket: c.websocket.as_ref().and_then(EmbeddedList::new).map(Arc::new),
        }
    }

    fn get(&self, connection_type: ConnectionType) -> Option<&Arc<EmbeddedList>> {
        match connection_type {
            ConnectionType::Http => self.http.as_ref(),
            ConnectionType::Websocket => self.websocket.as_ref(),
        }
    }
}

/// The embedded configuration as candidate lists.
#[derive(Default)]
pub struct EmbeddedCandidates {
    enabled: bool,
    default: EmbeddedScope,
    exchanges: std::collections::HashMap<String, EmbeddedScope>,
    urls: std::collections::HashSet<Arc<str>>,
}

impl fmt::Debug for EmbeddedCandidates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedCandidates")
            .field("enabled", &self.enabled)
            .field("default", &self.default)
            .field("exchanges", &self.exchanges)
            .field("members", &self.urls.len())
            .finish()
    }
}

impl EmbeddedCandidates {
    /// From a validated `proxy:` block.
    pub fn new(settings: &ProxySettings) -> Self {
        let default = settings
            .default
            .as_ref()
            .map(EmbeddedScope::new)
            .unwrap_or_default();
        let exchanges: std::collections::HashMap<String, EmbeddedScope> = settings
            .exchanges
            .iter()
            .map(|(id, c)| (id.to_ascii_lowercase(), EmbeddedScope::new(c)))
            .collect();
        let urls = std::iter::once(&default)
            .chain(exchanges.values())
            .flat_map(|s| [&s.http, &s.websocket])
            .flatten()
            .flat_map(|l| l.members.iter().map(|m| m.url.clone()))
            .collect();
        Self {
            enabled: settings.enabled,
            default,
            exchanges,
            urls,
        }
    }

    /// The list for (exchange, type): the exchange's entry, else the default's; `None`: direct.
    pub fn get(&self, exchange: &str, connection_type: ConnectionType) -> Option<&Arc<EmbeddedList>> {
        if !self.enabled {
            return None;
        }
        self.exchanges
            .get(exchange)
            .and_then(|s| s.get(connection_type))
            .or_else(|| self.default.get(connection_type))
    }

    /// Whether `url` is an embedded member anywhere (the broker's own proxy).
    pub fn contains(&self, url: &str) -> bool {
        self.urls.contains(url)
    }
}

// --- Upstream candidates ------------------------------------------------------------------------

/// What upstream candidates are kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CandidateKey {
    /// Exchange id, lower-case.
    pub exchange: Arc<str>,
    /// Connection type.
    pub connection_type: ConnectionType,
    /// Region, if any.
    pub region: Option<Arc<str>>,
}

/// A [`CandidateKey`] borrowed from a request: it hashes exactly as the key does (same fields,
/// same order, `&str` hashing as `Arc<str>`), so finding an existing set allocates nothing.
#[derive(Hash)]
struct KeyRef<'a> {
    exchange: &'a str,
    connection_type: ConnectionType,
    region: Option<&'a str>,
}

impl KeyRef<'_> {
    fn matches(&self, key: &CandidateKey) -> bool {
        *key.exchange == *self.exchange
            && key.connection_type == self.connection_type
            && key.region.as_deref() == self.region
    }
}

/// How the last refill of a set went (shared with the callers that waited for it).
#[derive(Clone, Default)]
pub(crate) enum RefillOutcome {
    /// None ran yet.
    #[default]
    None,
    /// It added a new candidate.
    Added,
    /// The upstream answered with a candidate already held.
    NothingNew,
    /// The upstream failed (the caller's error, type-erased).
    Failed(Arc<dyn std::any::Any + Send + Sync>),
}

/// The upstream candidates of one key.
pub struct UpstreamSet<P> {
    members: Mutex<Vec<(u64, Candidate<P>)>>,
    added: AtomicU64,
    /// Round-robin cursor.
    pub cursor: AtomicUsize,
    /// Bumped when a refill ends.
    generation: AtomicU64,
    /// Held while a refill runs: one upstream call per key at a time.
    pub(crate) refill: tokio::sync::Mutex<()>,
    last: Mutex<RefillOutcome>,
}

impl<P> fmt::Debug for UpstreamSet<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSet")
            .field("members", &self.lock().len())
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl<P> UpstreamSet<P> {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, Candidate<P>)>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refills ended so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl<P: Clone> UpstreamSet<P> {
    fn new() -> Self {
        Self {
            members: Mutex::new(Vec::new()),
            added: AtomicU64::new(0),
            cursor: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            refill: tokio::sync::Mutex::new(()),
            last: Mutex::new(RefillOutcome::None),
        }
    }

    /// The live candidates at `now` (expired ones are dropped).
    /// `f` of the set's member when it holds exactly one live member (most sets), run under the
    /// set's lock: no snapshot is built for it. `None` when it holds none or several (then
    /// [`UpstreamSet::snapshot`]). `f` must not touch this set.
    pub fn with_lone<R>(&self, now: Instant, f: impl FnOnce(&Candidate<P>) -> R) -> Option<R> {
        let mut members = self.lock();
        members.retain(|(_, c)| c.expires_at.is_none_or(|e| e > now));
        match members.as_slice() {
            [(_, only)] => Some(f(only)),
            _ => None,
        }
    }

    pub fn snapshot(&self, now: Instant) -> Vec<Candidate<P>> {
        let mut members = self.lock();
        members.retain(|(_, c)| c.expires_at.is_none_or(|e| e > now));
        members.iter().map(|(_, c)| c.clone()).collect()
    }

    /// Adds (or refreshes) a candidate; at most `max` are kept (the oldest goes). Returns whether
    /// it is new.
    pub fn add(&self, candidate: Candidate<P>, max: usize, now: Instant) -> bool {
        let mut members = self.lock();
        members.retain(|(_, c)| c.expires_at.is_none_or(|e| e > now));
        if let Some((_, c)) = members.iter_mut().find(|(_, c)| c.url == candidate.url) {
            *c = candidate;
            return false;
        }
        while !members.is_empty() && members.len() >= max.max(1) {
            if let Some(oldest) = members
                .iter()
                .enumerate()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(i, _)| i)
            {
                members.remove(oldest);
            }
        }
        // Grown one at a time: most sets hold one or two candidates, and a first push would
        // reserve room for four.
        members.reserve_exact(1);
        members.push((self.added.fetch_add(1, Ordering::Relaxed), candidate));
        true
    }

    /// Drops `url`. Returns whether it was held.
    pub fn remove(&self, url: &str) -> bool {
        let mut members = self.lock();
        let before = members.len();
        members.retain(|(_, c)| &*c.url != url);
        members.len() != before
    }

    pub(crate) fn finish_refill(&self, outcome: RefillOutcome) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn last_refill(&self) -> RefillOutcome {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How long an upstream candidate set may go unused before it is dropped (longer than any
/// candidate lives).
pub const SET_IDLE: Duration = Duration::from_secs(2 * 3600);
/// Most shards of the candidate sets.
const MAX_SHARDS: usize = 8;
/// Fewest keys a shard is sized for (fewer shards below `MAX_SHARDS × MIN_SHARD_KEYS`).
const MIN_SHARD_KEYS: u64 = 1024;

/// A set and when it was last asked for.
struct Held<P> {
    set: Arc<UpstreamSet<P>>,
    used: Instant,
}

struct SetShard<P> {
    /// Least recently used first: the front is also the longest idle.
    map: LinkedHashMap<CandidateKey, Held<P>, RandomState>,
    capacity: usize,
}

impl<P> SetShard<P> {
    /// Drops the sets idle for [`SET_IDLE`] (from the least recently used end).
    fn expire(&mut self, now: Instant) {
        while self
            .map
            .front()
            .is_some_and(|(_, held)| held.used + SET_IDLE <= now)
        {
            self.map.pop_front();
        }
    }
}

/// Upstream candidate sets by key: at most `max_keys` keys (least recently used dropped first,
/// per shard: up to [`MAX_SHARDS`] shards of at least 1,024 keys, so exact below 2,048), and a
/// set unused for [`SET_IDLE`] is dropped (idle time on the reading its callers give: the engine
/// passes its choice's reading of the broker's clock); candidate expiry itself is decided on the
/// broker's clock. Why not moka (as before): its bookkeeping cost ≈ 325 bytes per key; a linked hash map
/// node is ≈ 100 bytes with its key. Keys are hashed with foldhash's quality hash under a
/// per-process random seed, as the hand-out marks are: std's SipHash cost about 240 of the
/// 1,800 instructions of a cache hit's engine work (`proxy-broker-bench hit-cost`), and the keys
/// are validated exchange ids in a bounded map.
pub struct UpstreamCandidates<P> {
    shards: Box<[Mutex<SetShard<P>>]>,
    hasher: RandomState,
}

impl<P> fmt::Debug for UpstreamCandidates<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: usize = self.shards.iter().map(|s| crate::sync::lock(s).map.len()).sum();
        f.debug_struct("UpstreamCandidates").field("keys", &keys).finish()
    }
}

impl<P: Clone + Send + Sync + 'static> Default for UpstreamCandidates<P> {
    fn default() -> Self {
        Self::new(MAX_CANDIDATE_KEYS)
    }
}

impl<P: Clone + Send + Sync + 'static> UpstreamCandidates<P> {
    /// At most `max_keys` keys.
    pub fn new(max_keys: u64) -> Self {
        let max_keys = max_keys.max(1);
        let mut n = 1usize;
        while n < MAX_SHARDS && (n as u64 * 2).saturating_mul(MIN_SHARD_KEYS) <= max_keys {
            n *= 2;
        }
        let max = usize::try_from(max_keys).unwrap_or(usize::MAX);
        let hasher = RandomState::default();
        let shards = (0..n)
            .map(|i| {
                Mutex::new(SetShard {
                    map: LinkedHashMap::with_hasher(hasher.clone()),
                    // The capacities add up to `max_keys`.
                    capacity: (max / n + usize::from(i < max % n)).max(1),
                })
            })
            .collect();
        Self { shards, hasher }
    }

    fn shard(&self, hash: u64) -> &Mutex<SetShard<P>> {
        &self.shards[usize::try_from(hash >> 32).unwrap_or(0) % self.shards.len()]
    }

    /// The set of `key`, created empty if need be.
    pub fn set(&self, key: &CandidateKey) -> Arc<UpstreamSet<P>> {
        self.set_of(
            &key.exchange,
            key.connection_type,
            key.region.as_deref(),
            Instant::now(),
        )
    }

    /// The set of (`exchange`, `connection_type`, `region`), created empty if need be; the key
    /// is allocated only then (`exchange` lower-case). `now` is the caller's reading of the clock
    /// (the engine's choice has one already: a hit reads the clock once less).
    pub fn set_of(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        region: Option<&str>,
        now: Instant,
    ) -> Arc<UpstreamSet<P>> {
        let wanted = KeyRef {
            exchange,
            connection_type,
            region,
        };
        let hash = self.hasher.hash_one(&wanted);
        let mut shard = crate::sync::lock(self.shard(hash));
        shard.expire(now);
        match shard.map.raw_entry_mut().from_hash(hash, |k| wanted.matches(k)) {
            RawEntryMut::Occupied(mut o) => {
                o.get_mut().used = now;
                o.to_back();
                o.get().set.clone()
            }
            RawEntryMut::Vacant(v) => {
                let set = Arc::new(UpstreamSet::new());
                v.insert_hashed_nocheck(
                    hash,
                    CandidateKey {
                        exchange: Arc::from(exchange),
                        connection_type,
                        region: region.map(Arc::from),
                    },
                    Held {
                        set: set.clone(),
                        used: now,
                    },
                );
                while shard.map.len() > shard.capacity {
                    shard.map.pop_front();
                }
                set
            }
        }
    }

    /// The set of `key`, if there is one.
    pub fn get(&self, key: &CandidateKey) -> Option<Arc<UpstreamSet<P>>> {
        let hash = self.hasher.hash_one(key);
        let now = Instant::now();
        let mut shard = crate::sync::lock(self.shard(hash));
        shard.expire(now);
        match shard.map.raw_entry_mut().from_key_hashed_nocheck(hash, key) {
            RawEntryMut::Occupied(mut o) => {
                o.get_mut().used = now;
                o.to_back();
                Some(o.get().set.clone())
            }
            RawEntryMut::Vacant(_) => None,
        }
    }

    /// Drops `url` from every set of `exchange` (it is banned there). Returns how many held it.
    pub fn remove_from_exchange(&self, exchange: &str, url: &str) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                crate::sync::lock(shard)
                    .map
                    .iter()
                    .filter(|(k, held)| &*k.exchange == exchange && held.set.remove(url))
                    .count()
            })
            .sum()
    }

    /// Drops every set of `exchange` (its cache entries were invalidated). Returns how many.
    pub fn clear_exchange(&self, exchange: &str) -> usize {
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = crate::sync::lock(shard);
            let before = shard.map.len();
            shard.map.retain(|k, _| &*k.exchange != exchange);
            dropped += before - shard.map.len();
        }
        dropped
    }

    /// Drops every set (upstream settings changed).
    pub fn clear(&self) {
        for shard in &self.shards {
            crate::sync::lock(shard).map.clear();
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| crate::sync::lock(s).map.len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use proxy_broker_core::{PoolConfig, PoolMember};

    use super::*;

    const WS: ConnectionType = ConnectionType::Websocket;

    #[test]
    fn a_borrowed_key_finds_the_set_of_its_owned_key() {
        let sets = UpstreamCandidates::<u32>::default();
        for region in [None, Some("eu")] {
            let key = CandidateKey {
                exchange: Arc::from("binance"),
                connection_type: WS,
                region: region.map(Arc::from),
            };
            let borrowed = KeyRef {
                exchange: "binance",
                connection_type: WS,
                region,
            };
            assert_eq!(sets.hasher.hash_one(&key), sets.hasher.hash_one(&borrowed));
            let set = sets.set(&key);
            assert!(Arc::ptr_eq(
                &set,
                &sets.set_of("binance", WS, region, Instant::now())
            ));
            assert!(Arc::ptr_eq(&set, &sets.get(&key).unwrap()));
        }
        // Another region, type or exchange is another set.
        let eu = sets.set_of("binance", WS, Some("eu"), Instant::now());
        assert!(!Arc::ptr_eq(
            &eu,
            &sets.set_of("binance", WS, Some("us"), Instant::now())
        ));
        assert!(!Arc::ptr_eq(
            &eu,
            &sets.set_of("binance", ConnectionType::Http, Some("eu"), Instant::now())
        ));
        assert!(!Arc::ptr_eq(
            &eu,
            &sets.set_of("bybit", WS, Some("eu"), Instant::now())
        ));
    }

    #[test]
    fn upstream_sets_keep_distinct_live_answers_up_to_the_cap() {
        let set = UpstreamSet::<u32>::new();
        let now = Instant::now();
        let c = |url: &str, ttl: u64, payload: u32| Candidate {
            url: Arc::from(url),
            weight: 1.0,
            expires_at: Some(now + Duration::from_secs(ttl)),
            payload,
        };
        assert!(set.add(c("http://a:1", 100, 1), 3, now));
        assert!(
            !set.add(c("http://a:1", 200, 2), 3, now),
            "the same answer again refreshes it"
        );
        assert!(set.add(c("http://b:1", 10, 0), 3, now));
        assert!(set.add(c("http://c:1", 100, 0), 3, now));
        assert!(set.add(c("http://d:1", 100, 0), 3, now), "the oldest (a) goes");
        let urls: Vec<String> = set.snapshot(now).iter().map(|c| c.url.to_string()).collect();
        assert_eq!(urls, ["http://b:1", "http://c:1", "http://d:1"]);
        let later = now + Duration::from_secs(10);
        assert_eq!(set.snapshot(later).len(), 2, "b expired");
        assert!(set.remove("http://c:1"));
        assert_eq!(set.snapshot(later).len(), 1);
    }

    #[test]
    fn a_set_s_idle_time_is_counted_on_the_reading_its_caller_gives() {
        let sets = UpstreamCandidates::<u32>::default();
        let now = Instant::now();
        let first = sets.set_of("kucoin", WS, None, now);
        let before_limit = now + SET_IDLE - Duration::from_secs(1);
        assert!(Arc::ptr_eq(
            &first,
            &sets.set_of("kucoin", WS, None, before_limit)
        ));
        // Idle for SET_IDLE since that use, by the caller's reading: dropped and made anew.
        let after = before_limit + SET_IDLE;
        assert!(!Arc::ptr_eq(&first, &sets.set_of("kucoin", WS, None, after)));
        assert_eq!(sets.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_sets_are_bounded_in_keys_and_dropped_when_idle() {
        let key = |i: usize| CandidateKey {
            exchange: Arc::from(format!("x{}", i % 3).as_str()),
            connection_type: ConnectionType::Http,
            region: Some(Arc::from(format!("r{i}").as_str())),
        };
        let now = Instant::now();
        let candidate = |url: &str| Candidate {
            url: Arc::from(url),
            weight: 1.0,
            expires_at: Some(now + Duration::from_secs(300)),
            payload: (),
        };
        // (cap, keys asked for): one shard, and several.
        for (cap, asked) in [(3u64, 5usize), (4096, 5000)] {
            let sets = UpstreamCandidates::<()>::new(cap);
            for i in 0..asked {
                sets.set(&key(i)).add(candidate("http://p:1"), 8, now);
            }
            assert_eq!(sets.len() as u64, cap, "cap {cap}");
        }
        let sets = UpstreamCandidates::<()>::new(10);
        for i in 0..3 {
            sets.set(&key(i)).add(candidate("http://banned:1"), 8, now);
        }
        assert_eq!(sets.remove_from_exchange("x1", "http://banned:1"), 1);
        assert_eq!(sets.get(&key(1)).unwrap().snapshot(now).len(), 0);
        tokio::time::advance(SET_IDLE - Duration::from_secs(1)).await;
        assert!(sets.get(&key(0)).is_some(), "used just before the idle limit");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            sets.get(&key(0)).is_some(),
            "its use above restarted the idle time"
        );
        assert!(sets.get(&key(2)).is_none(), "idle for longer than SET_IDLE");
        sets.clear();
        assert!(sets.is_empty());
    }

    fn pool(strategy: Strategy, urls: &[(&str, bool)]) -> ProxyConfig {
        ProxyConfig {
            url: None,
            timeout_seconds: 15,
            pool: Some(PoolConfig {
                proxies: urls
                    .iter()
                    .map(|(u, enabled)| PoolMember {
                        url: (*u).into(),
                        weight: 2.0,
                        enabled: *enabled,
                    })
                    .collect(),
                strategy,
            }),
        }
    }

    #[test]
    fn embedded_lists_resolve_like_the_embedded_resolver() {
        let mut settings = ProxySettings {
            enabled: true,
            default: Some(ConnectionProxies {
                http: Some(ProxyConfig::from_url("http://default:1")),
                websocket: Some(pool(
                    Strategy::LeastConnections,
                    &[("socks5://d1:1", true), ("socks5://d2:1", true)],
                )),
            }),
            ..Default::default()
        };
        settings.exchanges.insert(
            "Binance".into(),
            ConnectionProxies {
                http: None,
                websocket: Some(pool(
                    Strategy::Random,
                    &[("socks5://b1:1", true), ("socks5://off:1", false)],
                )),
            },
        );
        settings.exchanges.insert(
            "kraken".into(),
            ConnectionProxies {
                http: None,
                websocket: Some(pool(Strategy::RoundRobin, &[("socks5://k:1", false)])),
            },
        );
        let e = EmbeddedCandidates::new(&settings);
        let urls = |x: &str, ct| {
            e.get(x, ct).map(|l| {
                (
                    l.kind,
                    l.members.iter().map(|m| m.url.to_string()).collect::<Vec<_>>(),
                )
            })
        };
        // (row, exchange, type, expected kind and members)
        type Row = (
            &'static str,
            &'static str,
            ConnectionType,
            Option<(EmbeddedKind, Vec<&'static str>)>,
        );
        let rows: &[Row] = &[
            (
                "exchange pool, enabled members only",
                "binance",
                WS,
                Some((EmbeddedKind::Pool(Strategy::Random), vec!["socks5://b1:1"])),
            ),
            (
                "exchange without http: default",
                "binance",
                ConnectionType::Http,
                Some((EmbeddedKind::Static, vec!["http://default:1"])),
            ),
            (
                "all disabled: default",
                "kraken",
                WS,
                Some((
                    EmbeddedKind::Pool(Strategy::LeastConnections),
                    vec!["socks5://d1:1", "socks5://d2:1"],
                )),
            ),
            (
                "unknown exchange: default",
                "okx",
                WS,
                Some((
                    EmbeddedKind::Pool(Strategy::LeastConnections),
                    vec!["socks5://d1:1", "socks5://d2:1"],
                )),
            ),
        ];
        for (row, x, ct, expected) in rows {
            let expected = expected
                .as_ref()
                .map(|(k, v)| (*k, v.iter().map(|s| s.to_string()).collect::<Vec<_>>()));
            assert_eq!(urls(x, *ct), expected, "row {row}");
        }
        assert!(e.contains("socks5://b1:1") && e.contains("http://default:1"));
        assert!(!e.contains("socks5://stranger:1"));
        settings.enabled = false;
        assert!(
            EmbeddedCandidates::new(&settings).get("binance", WS).is_none(),
            "disabled: direct"
        );
    }

    #[test]
    fn debug_output_never_shows_a_password() {
        let c = Candidate {
            url: Arc::from("socks5://u:hunter2@p:1"),
            weight: 1.0,
            expires_at: None,
            payload: (),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let settings = ProxySettings {
            enabled: true,
            default: Some(ConnectionProxies {
                http: Some(ProxyConfig::from_url("socks5://u:hunter2@p:1")),
                websocket: None,
            }),
            ..Default::default()
        };
        let text = format!("{:?}", EmbeddedCandidates::new(&settings));
        assert!(
            !text.contains("hunter2") && !text.contains("u:") && text.contains("socks5://***@p:1"),
            "{text}"
        );
    }
}
