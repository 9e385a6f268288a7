//! The cache of upstream answers.
//!
//! - Key: exchange (case-folded), connection type, region.
//! - Lifetime: the answer's `ttl_seconds` (capped at 3600 s; `cache_ttl_seconds` when the answer
//!   had none), ±10 % jitter so entries written together do not expire together.
//! - After expiry an entry is kept `stale_if_error_seconds` longer, to be served (marked stale)
//!   only when every upstream fails. Past that it is dropped when it is read, when it reaches the
//!   least recently used end of its shard, and by a sweep of each shard at most every
//!   [`SWEEP_EVERY`] (run by inserts and by [`AnswerCache::len`], which the metrics call).
//!   Freshness is decided by the broker's [`Clock`] on every read.
//! - Bound: at most `cache_max_entries` (an insert makes room in its own shard, else in others
//!   it can lock without waiting, so inserts racing each other may leave a few more until the
//!   next insert), least recently used evicted first. The entries are split
//!   into up to [`MAX_SHARDS`] shards (each its own mutex and LRU list) of at least
//!   [`MIN_SHARD_ENTRIES`] entries, so LRU order is exact below 2,048 entries and per shard above.
//! - Each entry keeps the parts of its answer (the proxy URL shared with the proxy index, the
//!   strategy interned, the endpoint name and metadata shared), and a hit builds the response from
//!   them: the same three string copies and metadata clone that cloning a prebuilt response took.
//! - **The proxy index** (proxy URL → the entries holding it and the endpoint that last handed it
//!   out) is kept in step with the entries under their shard's lock, so ejecting a proxy removes
//!   exactly its entries without scanning the cache, and feedback is routed to the endpoint that
//!   served the URL ([`AnswerCache::served_by`]) without a map of its own. It holds only proxies
//!   of live entries, so it is bounded by the entry cap.
//! - Embedded answers are never cached: pools must keep rotating.
//!
//! Why not moka (used here before): at 100,000 keys each moka entry cost ≈ 325 bytes of its own
//! bookkeeping (deque nodes, entry info, the concurrent hash table, timer wheel; measured with a
//! counting allocator), and the cache needed three of them per key (answers, per-proxy marks,
//! `served_by`): ≈ 2 KB per key. `hashlink`'s linked hash map (one node of three pointers per
//! entry, in a `hashbrown` table) behind a few mutexes costs ≈ 40 bytes, and the proxy index is
//! one `HashMap` bucket per proxy. A hit takes one shard mutex briefly; misses are rarer.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::Duration;

use hashbrown::HashTable;
use hashlink::LinkedHashMap;
use hashlink::linked_hash_map::RawEntryMut;
use prost::Message;
use proxy_broker_core::ConnectionType;
use rand::Rng;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::json::{json_to_struct, json_to_value};
use crate::pb;
use crate::sync::lock;
use crate::upstream::Answer;
use crate::wire::{Head, HeadRef, HeadSource, ProxyAnswer};

/// Distinct (strategy, metadata) pairs shared between entries (more are stored per entry).
const METADATA_SHARED: u64 = 10_000;
/// Distinct strategies of answers without metadata shared between entries (more are stored per entry).
const STRATEGIES_SHARED: usize = 1024;

/// TTL handed out with a stale answer (at most; less when the stale window ends sooner).
pub const STALE_ANSWER_TTL: u64 = 60;

/// Longest lifetime of a cached answer.
pub const MAX_TTL: Duration = Duration::from_secs(MAX_TTL_SECONDS as u64);
const MAX_TTL_SECONDS: u32 = 3600;

/// Most shards of the entries.
pub const MAX_SHARDS: usize = 16;
/// Fewest entries a shard is sized for (fewer shards below `MAX_SHARDS × MIN_SHARD_ENTRIES`).
pub const MIN_SHARD_ENTRIES: u64 = 1024;
/// How often each shard is swept of entries past their stale window (when something runs).
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

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

/// Longest exchange id plus region kept inside an entry without an allocation of its own.
const INLINE_KEY: usize = 20;
const HAS_REGION: u8 = 1;
const WEBSOCKET: u8 = 2;

/// A key as an entry keeps it, in 24 bytes: the exchange and region (one after the other) inline
/// when they fit in [`INLINE_KEY`] bytes (most keys), else in one allocation. A [`CacheKey`] is
/// 56 bytes and one allocation per string. Compared, ordered and hashed as [`Parts`].
enum Key {
    Inline {
        len: u8,
        /// Where the exchange ends.
        split: u8,
        flags: u8,
        bytes: [u8; INLINE_KEY],
    },
    Heap {
        text: Box<str>,
        split: u32,
        flags: u8,
    },
}

impl Key {
    fn new(key: &CacheKey) -> Self {
        let region = key.region.as_deref();
        let flags = if region.is_some() { HAS_REGION } else { 0 }
            | match key.connection_type {
                ConnectionTypeKey::Http => 0,
                ConnectionTypeKey::Websocket => WEBSOCKET,
            };
        let (exchange, region) = (key.exchange.as_bytes(), region.unwrap_or("").as_bytes());
        let len = exchange.len() + region.len();
        if let (Ok(len_u8), Ok(split)) = (u8::try_from(len), u8::try_from(exchange.len()))
            && len <= INLINE_KEY
        {
            let mut bytes = [0; INLINE_KEY];
            bytes[..exchange.len()].copy_from_slice(exchange);
            bytes[exchange.len()..len].copy_from_slice(region);
            return Key::Inline {
                len: len_u8,
                split,
                flags,
                bytes,
            };
        }
        Key::Heap {
            text: [key.exchange.as_str(), key.region.as_deref().unwrap_or("")]
                .concat()
                .into_boxed_str(),
            split: u32::try_from(exchange.len()).unwrap_or(u32::MAX),
            flags,
        }
    }

    /// The text, where the exchange ends in it, and the flags.
    fn raw(&self) -> (&[u8], usize, u8) {
        match self {
            Key::Inline {
                len,
                split,
                flags,
                bytes,
            } => (
                bytes.get(..usize::from(*len)).unwrap_or_default(),
                usize::from(*split),
                *flags,
            ),
            Key::Heap { text, split, flags } => (
                text.as_bytes(),
                usize::try_from(*split).unwrap_or(usize::MAX),
                *flags,
            ),
        }
    }

    fn parts(&self) -> Parts<'_> {
        let (text, split, flags) = self.raw();
        let split = split.min(text.len());
        let connection_type = if flags & WEBSOCKET == 0 {
            ConnectionTypeKey::Http
        } else {
            ConnectionTypeKey::Websocket
        };
        let (exchange, region) = text.split_at(split);
        (
            exchange,
            connection_type,
            (flags & HAS_REGION != 0).then_some(region),
        )
    }

    fn exchange(&self) -> &[u8] {
        self.parts().0
    }

    fn to_cache_key(&self) -> CacheKey {
        // Both parts were copied from `str`s and split where the first ended: valid UTF-8.
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let (exchange, connection_type, region) = self.parts();
        CacheKey {
            exchange: text(exchange),
            connection_type,
            region: region.map(text),
        }
    }
}

/// A key's fields borrowed as bytes, in [`CacheKey`]'s order: tuple order is `CacheKey`'s order
/// (UTF-8 bytes order as their strings do), and both sides hash these.
type Parts<'a> = (&'a [u8], ConnectionTypeKey, Option<&'a [u8]>);

fn parts(key: &CacheKey) -> Parts<'_> {
    (
        key.exchange.as_bytes(),
        key.connection_type,
        key.region.as_deref().map(str::as_bytes),
    )
}

/// The parts of an answer most entries share (one per strategy and metadata).
struct Extras {
    strategy: Box<str>,
    /// The metadata with `stale: false`.
    metadata: prost_types::Struct,
    /// Both encoded as answer fields, on the first hit of an entry that has them
    /// ([`Cached::hit_response`]).
    encoded: OnceLock<Arc<[u8]>>,
}

/// One cached answer. `Debug` masks the proxy's userinfo.
pub struct Cached {
    /// What it is cached under.
    key: Key,
    /// The proxy handed out (one allocation per proxy, shared with the proxy index).
    proxy_url: Arc<str>,
    /// Strategy and metadata, shared by every entry with the same: most upstreams attach the
    /// same few fields to every answer, and a `Struct` costs ~600 bytes.
    extras: Arc<Extras>,
    /// The endpoint that gave it.
    pub endpoint: Arc<str>,
    /// When the upstream's answer arrived.
    pub fetched_at: Instant,
    /// Served as fresh until then.
    pub fresh_until: Instant,
    /// Served as stale (upstreams failing) for this long after `fresh_until` (milliseconds;
    /// [`Cached::stale_until`]). Small fields, so that an entry stays one 128-byte allocation.
    stale_ms: u32,
    /// The answer's TTL, capped at [`MAX_TTL`] (so it fits).
    ttl_seconds: u16,
    /// [`pb::FallbackPolicy`] (a handful of values).
    fallback_policy: u8,
}

/// A hit's answer is sent from the entry: its proxy, its extras encoded (once, shared), its
/// fallback policy and endpoint.
impl HeadSource for Cached {
    fn head(&self) -> HeadRef<'_> {
        HeadRef {
            proxy_url: &self.proxy_url,
            fixed: self
                .extras
                .encoded
                .get_or_init(|| Head::fixed(&self.extras.strategy, Some(&self.extras.metadata))),
            fallback_policy: i32::from(self.fallback_policy),
            upstream_endpoint: &self.endpoint,
        }
    }
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
            .field("stale_until", &self.stale_until())
            .finish_non_exhaustive()
    }
}

impl Cached {
    /// Whole seconds of freshness left (at least 1 while fresh).
    pub fn remaining_ttl(&self, now: Instant) -> u32 {
        let left = self.fresh_until.saturating_duration_since(now);
        u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).unwrap_or(u32::MAX)
    }

    /// Served as stale (upstreams failing) until then.
    pub fn stale_until(&self) -> Instant {
        self.fresh_until + Duration::from_millis(u64::from(self.stale_ms))
    }

    /// The answer's TTL (capped at [`MAX_TTL`]).
    pub fn ttl_seconds(&self) -> u32 {
        u32::from(self.ttl_seconds)
    }

    /// The proxy URL handed out.
    pub fn proxy_url(&self) -> &str {
        &self.proxy_url
    }

    /// The key it is cached under (built: entries keep it compact).
    pub fn key(&self) -> CacheKey {
        self.key.to_cache_key()
    }

    fn response(&self) -> pb::ProxyResponse {
        pb::ProxyResponse {
            proxy_url: self.proxy_url.to_string(),
            strategy: self.extras.strategy.to_string(),
            ttl_seconds: self.ttl_seconds(),
            fallback_policy: i32::from(self.fallback_policy),
            metadata: Some(self.extras.metadata.clone()),
            source: pb::ProxySource::Cache.into(),
            upstream_endpoint: self.endpoint.to_string(),
            lease_expires_at: None,
        }
    }

    /// The CACHE answer at `now`, ready to send, lease end included: the TTL left (never more
    /// than the upstream allowed). The answer reads the entry itself when it is sent
    /// ([`HeadSource`]): strategy and metadata are encoded once for every entry that shares them
    /// (on the first hit), and nothing is allocated or counted per hit but the per-call fields.
    pub fn hit_response(
        self: Arc<Self>,
        now: Instant,
        lease_expires_at: prost_types::Timestamp,
    ) -> ProxyAnswer {
        // The entry may live up to 10 % past the answer's TTL (jitter); the feed is never told
        // more than the upstream (or the 3600 s cap) allowed.
        let ttl_seconds = self.remaining_ttl(now).min(self.ttl_seconds());
        ProxyAnswer::ready(self, ttl_seconds, pb::ProxySource::Cache, Some(lease_expires_at))
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
        let left = self.stale_until().saturating_duration_since(now).as_secs();
        response.ttl_seconds = u32::try_from(left.clamp(1, STALE_ANSWER_TTL)).unwrap_or(1);
        if let Some(m) = response.metadata.as_mut() {
            m.fields.insert("stale".into(), json_to_value(&true.into()));
        }
        response
    }
}

/// An entry as a member of its shard's map: hashed and compared by its key, so the map holds
/// one pointer per entry. Hashes as [`parts`] of the equal [`CacheKey`] does.
struct Slot(Arc<Cached>);

impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.key.parts().hash(state);
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.0.key.parts() == other.0.key.parts()
    }
}

impl Eq for Slot {}

/// An entry in a set of the proxy index: by address (one entry is one allocation).
struct ByAddress(Arc<Cached>);

impl Hash for ByAddress {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

impl PartialEq for ByAddress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ByAddress {}

/// What the proxy index keeps per proxy URL: 16 bytes when one entry holds it (the common
/// case: the URL is that entry's), else a box with the URL and the set of entries.
enum Proxy {
    One {
        entry: Arc<Cached>,
        /// The endpoint that handed it out.
        endpoint: u32,
    },
    Many(Box<Holders>),
}

struct Holders {
    url: Arc<str>,
    /// The endpoint that handed it out last.
    endpoint: u32,
    entries: HashSet<ByAddress>,
}

impl Proxy {
    fn url(&self) -> &Arc<str> {
        match self {
            Proxy::One { entry, .. } => &entry.proxy_url,
            Proxy::Many(h) => &h.url,
        }
    }

    fn endpoint(&self) -> u32 {
        match self {
            Proxy::One { endpoint, .. } => *endpoint,
            Proxy::Many(h) => h.endpoint,
        }
    }

    fn add(&mut self, entry: Arc<Cached>, endpoint: u32) {
        match self {
            Proxy::One {
                entry: one,
                endpoint: e,
            } if Arc::ptr_eq(one, &entry) => *e = endpoint,
            Proxy::One { entry: one, .. } => {
                *self = Proxy::Many(Box::new(Holders {
                    url: one.proxy_url.clone(),
                    endpoint,
                    entries: HashSet::from([ByAddress(one.clone()), ByAddress(entry)]),
                }));
            }
            Proxy::Many(h) => {
                h.endpoint = endpoint;
                h.entries.insert(ByAddress(entry));
            }
        }
    }

    /// Removes `entry`; returns whether none is left.
    fn remove(&mut self, entry: &Arc<Cached>) -> bool {
        match self {
            Proxy::One { entry: one, .. } => Arc::ptr_eq(one, entry),
            Proxy::Many(h) => {
                h.entries.remove(&ByAddress(entry.clone()));
                if h.entries.len() <= 1 {
                    let endpoint = h.endpoint;
                    let last = h.entries.drain().next();
                    match last {
                        Some(last) => {
                            *self = Proxy::One {
                                entry: last.0,
                                endpoint,
                            }
                        }
                        None => return true,
                    }
                }
                false
            }
        }
    }

    fn into_entries(self) -> Vec<Arc<Cached>> {
        match self {
            Proxy::One { entry, .. } => vec![entry],
            Proxy::Many(h) => h.entries.into_iter().map(|e| e.0).collect(),
        }
    }
}

/// One shard of the entries: its own LRU list (front: least recently used).
struct Shard {
    map: LinkedHashMap<Slot, (), RandomState>,
    next_sweep: Instant,
}

/// The answer cache (see the module docs). `Debug` shows its size, never its proxy URLs.
pub struct AnswerCache {
    shards: Box<[Mutex<Shard>]>,
    /// The proxy index, sharded by proxy URL (as many shards as the entries).
    index: Box<[Mutex<HashTable<Proxy>>]>,
    hasher: RandomState,
    /// Entries in all shards.
    count: AtomicUsize,
    max_entries: usize,
    /// Strategy and metadata shared between entries, by their encoding.
    extras: moka::sync::Cache<Vec<u8>, Arc<Extras>>,
    /// The same for answers without metadata (most), by strategy, without encoding anything;
    /// at most [`STRATEGIES_SHARED`].
    plain: Mutex<HashMap<Box<str>, Arc<Extras>>>,
    stale_window: Duration,
    /// `stale_window` in milliseconds (at most `u32::MAX`: 49 days, past the configurable 1 day).
    stale_ms: u32,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache")
            .field("entries", &self.len())
            .field("shards", &self.shards.len())
            .field("stale_window", &self.stale_window)
            .finish_non_exhaustive()
    }
}

/// Shards for `max_entries`: a power of two, at most [`MAX_SHARDS`], each sized for at least
/// [`MIN_SHARD_ENTRIES`].
fn shard_count(max_entries: usize) -> usize {
    let mut n = 1usize;
    while n < MAX_SHARDS && (n as u64 * 2).saturating_mul(MIN_SHARD_ENTRIES) <= max_entries as u64 {
        n *= 2;
    }
    n
}

impl AnswerCache {
    /// A cache holding at most `max_entries`, serving stale answers for `stale_window`.
    pub fn new(max_entries: u64, stale_window: Duration, clock: Arc<dyn Clock>) -> Self {
        let max_entries = usize::try_from(max_entries.max(1)).unwrap_or(usize::MAX);
        let n = shard_count(max_entries);
        let hasher = RandomState::new();
        let now = clock.now();
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard {
                    map: LinkedHashMap::with_hasher(hasher.clone()),
                    next_sweep: now + SWEEP_EVERY,
                })
            })
            .collect();
        let index = (0..n).map(|_| Mutex::new(HashTable::new())).collect();
        let lifetime = MAX_TTL.mul_f64(1.1) + stale_window + Duration::from_secs(60);
        let extras = moka::sync::Cache::builder()
            .max_capacity(METADATA_SHARED)
            .time_to_live(lifetime)
            .build();
        Self {
            shards,
            index,
            hasher,
            count: AtomicUsize::new(0),
            max_entries,
            extras,
            plain: Mutex::new(HashMap::new()),
            stale_window,
            stale_ms: u32::try_from(stale_window.as_millis()).unwrap_or(u32::MAX),
            clock,
        }
    }

    /// The shard of a hash (bits away from those `hashbrown` uses inside the shard).
    fn pick<T>(shards: &[Mutex<T>], hash: u64) -> &Mutex<T> {
        let i = usize::try_from(hash >> 32).unwrap_or(0) % shards.len();
        &shards[i]
    }

    fn hash_key(&self, key: Parts<'_>) -> u64 {
        self.hasher.hash_one(key)
    }

    fn hash_url(&self, url: &str) -> u64 {
        self.hasher.hash_one(url)
    }

    /// Records `entry` in the proxy index (called under its shard's lock).
    fn index_add(&self, entry: &Arc<Cached>, endpoint: u32) {
        let hash = self.hash_url(&entry.proxy_url);
        let mut index = lock(Self::pick(&self.index, hash));
        let url = &*entry.proxy_url;
        match index.entry(hash, |p| &**p.url() == url, |p| self.hash_url(p.url())) {
            hashbrown::hash_table::Entry::Occupied(mut o) => o.get_mut().add(entry.clone(), endpoint),
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(Proxy::One {
                    entry: entry.clone(),
                    endpoint,
                });
            }
        }
    }

    /// Forgets `entry` in the proxy index (called under its shard's lock, once it left the shard).
    fn index_remove(&self, entry: &Arc<Cached>) {
        let hash = self.hash_url(&entry.proxy_url);
        let mut index = lock(Self::pick(&self.index, hash));
        let url = &*entry.proxy_url;
        if let Ok(mut o) = index.find_entry(hash, |p| &**p.url() == url)
            && o.get_mut().remove(entry)
        {
            o.remove();
        }
    }

    /// Entries that left a shard: counted, and forgotten by the index (under the shard's lock).
    fn forget(&self, gone: &[Arc<Cached>]) {
        self.count.fetch_sub(gone.len(), Ordering::Relaxed);
        for entry in gone {
            self.index_remove(entry);
        }
    }

    /// Drops the shard's entries past their stale window, if its sweep is due (under its lock).
    fn sweep_if_due(&self, shard: &mut Shard, now: Instant) {
        if now < shard.next_sweep {
            return;
        }
        shard.next_sweep = now + SWEEP_EVERY;
        let mut gone = Vec::new();
        shard.map.retain(|slot, ()| {
            let keep = now < slot.0.stale_until();
            if !keep {
                gone.push(slot.0.clone());
            }
            keep
        });
        self.forget(&gone);
    }

    /// The entry for `key` at `now` if it is still inside its stale window (it becomes the most
    /// recently used); one past it is dropped.
    fn get(&self, key: &CacheKey, now: Instant) -> Option<Arc<Cached>> {
        let wanted = parts(key);
        let hash = self.hash_key(wanted);
        let mut shard = lock(Self::pick(&self.shards, hash));
        let RawEntryMut::Occupied(mut slot) = shard
            .map
            .raw_entry_mut()
            .from_hash(hash, |s| s.0.key.parts() == wanted)
        else {
            return None;
        };
        let entry = slot.key().0.clone();
        if now < entry.stale_until() {
            slot.to_back();
            return Some(entry);
        }
        slot.remove();
        self.forget(std::slice::from_ref(&entry));
        None
    }

    /// The fresh entry for `key`, if any.
    pub fn fresh(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        self.fresh_at(key, self.clock.now())
    }

    /// The entry for `key` if it is fresh at `now` (read from [`AnswerCache::now`]).
    pub fn fresh_at(&self, key: &CacheKey, now: Instant) -> Option<Arc<Cached>> {
        self.get(key, now).filter(|c| now < c.fresh_until)
    }

    /// An expired entry for `key` that is still inside the stale-if-error window.
    pub fn stale(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let now = self.clock.now();
        self.get(key, now).filter(|c| now >= c.fresh_until)
    }

    /// The shared strategy and metadata (with `stale: false`) of `answer`.
    fn extras(&self, answer: &Answer) -> Arc<Extras> {
        let build = |metadata: &serde_json::Map<String, serde_json::Value>| {
            let mut metadata = json_to_struct(metadata);
            metadata
                .fields
                .insert("stale".into(), json_to_value(&false.into()));
            Extras {
                strategy: answer.strategy.as_str().into(),
                metadata,
                encoded: OnceLock::new(),
            }
        };
        if answer.metadata.is_empty() {
            let mut plain = lock(&self.plain);
            if let Some(e) = plain.get(answer.strategy.as_str()) {
                return e.clone();
            }
            let e = Arc::new(build(&answer.metadata));
            if plain.len() < STRATEGIES_SHARED {
                plain.insert(answer.strategy.as_str().into(), e.clone());
            }
            return e;
        }
        let extras = build(&answer.metadata);
        let mut encoding = Vec::with_capacity(extras.metadata.encoded_len() + answer.strategy.len() + 8);
        encoding.extend_from_slice(&(answer.strategy.len() as u64).to_le_bytes());
        encoding.extend_from_slice(answer.strategy.as_bytes());
        extras.metadata.encode_raw(&mut encoding);
        self.extras.get_with(encoding, || Arc::new(extras))
    }

    /// Stores `answer` from endpoint number `endpoint_index` named `endpoint`; its lifetime is its
    /// TTL (already defaulted and validated), capped at [`MAX_TTL`], with ±10 % jitter.
    pub fn insert(
        &self,
        key: CacheKey,
        answer: &Answer,
        endpoint: Arc<str>,
        endpoint_index: usize,
    ) -> Arc<Cached> {
        let ttl = Duration::from_secs(u64::from(answer.ttl_seconds)).min(MAX_TTL);
        let jittered = ttl.mul_f64(rand::rng().random_range(0.9..=1.1));
        let now = self.clock.now();
        // One copy of a proxy URL, however many keys hold it.
        let url_hash = self.hash_url(&answer.proxy_url);
        let proxy_url = lock(Self::pick(&self.index, url_hash))
            .find(url_hash, |p| **p.url() == *answer.proxy_url)
            .map_or_else(|| Arc::from(answer.proxy_url.as_str()), |p| p.url().clone());
        let cached = Arc::new(Cached {
            key: Key::new(&key),
            proxy_url,
            extras: self.extras(answer),
            endpoint,
            fetched_at: now,
            fresh_until: now + jittered,
            stale_ms: self.stale_ms,
            ttl_seconds: u16::try_from(answer.ttl_seconds.min(MAX_TTL_SECONDS)).unwrap_or(u16::MAX),
            fallback_policy: u8::try_from(i32::from(answer.fallback_policy)).unwrap_or_default(),
        });
        let wanted = parts(&key);
        let hash = self.hash_key(wanted);
        let home = Self::pick(&self.shards, hash);
        let mut shard = lock(home);
        let mut gone = Vec::new();
        match shard
            .map
            .raw_entry_mut()
            .from_hash(hash, |s| s.0.key.parts() == wanted)
        {
            RawEntryMut::Occupied(mut slot) => {
                let old = slot.replace_key(Slot(cached.clone()));
                slot.to_back();
                // Counted again by `forget` below.
                self.count.fetch_add(1, Ordering::Relaxed);
                gone.push(old.0);
            }
            RawEntryMut::Vacant(slot) => {
                slot.insert_hashed_nocheck(hash, Slot(cached.clone()), ());
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.index_add(&cached, u32::try_from(endpoint_index).unwrap_or(u32::MAX));
        // Over the cap, or past its stale window at the least recently used end: out. The shard
        // never evicts the entry just stored; other shards make room below.
        while (self.count.load(Ordering::Relaxed).saturating_sub(gone.len()) > self.max_entries
            && shard.map.len() > 1)
            || shard.map.front().is_some_and(|(s, ())| s.0.stale_until() <= now)
        {
            match shard.map.pop_front() {
                Some((slot, ())) => gone.push(slot.0),
                None => break,
            }
        }
        self.forget(&gone);
        self.sweep_if_due(&mut shard, now);
        drop(shard);
        if self.count.load(Ordering::Relaxed) > self.max_entries {
            self.evict_elsewhere(home);
        }
        cached
    }

    /// Evicts the least recently used entry of other shards until the cap holds; a shard busy
    /// elsewhere is skipped (never waited for while holding another: no lock order to break).
    fn evict_elsewhere(&self, home: &Mutex<Shard>) {
        for other in self.shards.iter().filter(|s| !std::ptr::eq(*s, home)) {
            if self.count.load(Ordering::Relaxed) <= self.max_entries {
                return;
            }
            let mut shard = match other.try_lock() {
                Ok(shard) => shard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            if let Some((slot, ())) = shard.map.pop_front() {
                self.forget(&[slot.0]);
            }
        }
    }

    /// The endpoint (its index) that last handed out `proxy_url` while an entry holds it: where
    /// feedback about it goes.
    pub fn served_by(&self, proxy_url: &str) -> Option<usize> {
        let hash = self.hash_url(proxy_url);
        lock(Self::pick(&self.index, hash))
            .find(hash, |p| &**p.url() == proxy_url)
            .and_then(|p| usize::try_from(p.endpoint()).ok())
    }

    /// Drops every entry whose proxy is `proxy_url` (outlier ejection) without scanning the
    /// cache: the proxy index lists them. Returns how many entries went.
    pub fn evict_proxy(&self, proxy_url: &str) -> usize {
        let hash = self.hash_url(proxy_url);
        let taken = match lock(Self::pick(&self.index, hash)).find_entry(hash, |p| &**p.url() == proxy_url) {
            Ok(o) => o.remove().0,
            Err(_) => return 0,
        };
        let removed = taken
            .into_entries()
            .into_iter()
            .filter(|entry| {
                let wanted = entry.key.parts();
                let hash = self.hash_key(wanted);
                let mut shard = lock(Self::pick(&self.shards, hash));
                match shard
                    .map
                    .raw_entry_mut()
                    .from_hash(hash, |s| s.0.key.parts() == wanted)
                {
                    // The key may have been refreshed with another answer since: leave that one.
                    RawEntryMut::Occupied(slot) if Arc::ptr_eq(&slot.key().0, entry) => {
                        slot.remove();
                        true
                    }
                    _ => false,
                }
            })
            .count();
        self.count.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Drops the entries of one exchange (case-insensitive). Returns how many.
    pub fn invalidate_exchange(&self, exchange: &str) -> usize {
        let exchange = exchange.to_lowercase();
        self.remove_where(|c| c.key.exchange() == exchange.as_bytes())
    }

    /// Drops every entry. Returns how many.
    pub fn invalidate_all(&self) -> usize {
        self.remove_where(|_| true)
    }

    fn remove_where(&self, pred: impl Fn(&Cached) -> bool) -> usize {
        let mut removed = 0;
        for shard in &self.shards {
            let mut shard = lock(shard);
            let mut gone = Vec::new();
            shard.map.retain(|slot, ()| {
                let remove = pred(&slot.0);
                if remove {
                    gone.push(slot.0.clone());
                }
                !remove
            });
            self.forget(&gone);
            removed += gone.len();
        }
        removed
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
        let after = after.map(parts);
        let mut page: Vec<Arc<Cached>> = Vec::new();
        for shard in &self.shards {
            let shard = lock(shard);
            page.extend(
                shard
                    .map
                    .keys()
                    .map(|slot| &slot.0)
                    .filter(|c| {
                        now < c.stale_until()
                            && (exchange.is_empty() || c.key.exchange() == exchange.as_bytes())
                            && after.is_none_or(|a| c.key.parts() > a)
                    })
                    .cloned(),
            );
        }
        let more = page.len() > limit;
        if more {
            page.select_nth_unstable_by(limit, |a, b| a.key.parts().cmp(&b.key.parts()));
            page.truncate(limit);
        }
        page.sort_by(|a, b| a.key.parts().cmp(&b.key.parts()));
        (page.into_iter().map(|c| (c.key(), c)).collect(), more)
    }

    /// Entries held (fresh or stale; shards whose sweep is due are swept first).
    pub fn len(&self) -> usize {
        let now = self.clock.now();
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = lock(shard);
                self.sweep_if_due(&mut shard, now);
                shard.map.len()
            })
            .sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Proxy URLs in the proxy index (each held by at least one entry).
    pub fn indexed_proxies(&self) -> usize {
        self.index.iter().map(|i| lock(i).len()).sum()
    }

    /// The broker's clock.
    pub fn now(&self) -> Instant {
        self.clock.now()
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

    fn answer_for(proxy_url: &str, ttl_seconds: u32) -> Answer {
        Answer {
            proxy_url: proxy_url.into(),
            ..answer(ttl_seconds)
        }
    }

    fn cache(max_entries: u64, stale: u64) -> (Arc<ManualClock>, AnswerCache) {
        let clock = Arc::new(ManualClock::new());
        let cache = AnswerCache::new(max_entries, Duration::from_secs(stale), clock.clone());
        (clock, cache)
    }

    #[test]
    fn an_entry_stays_within_its_size_budget() {
        // 104 bytes + the Arc's two counters = 120, one 128-byte malloc chunk; the key inline.
        assert!(
            std::mem::size_of::<Cached>() <= 104,
            "{}",
            std::mem::size_of::<Cached>()
        );
        assert_eq!(std::mem::size_of::<Key>(), 24);
        assert_eq!(std::mem::size_of::<Proxy>(), 16);
    }

    #[test]
    fn ejecting_a_proxy_drops_exactly_the_entries_holding_it() {
        let (_, cache) = cache(100, 60);
        // (key, proxy)
        let held = [
            (0, "socks5://a:1"),
            (1, "socks5://a:1"),
            (2, "socks5://b:1"),
            (3, "socks5://a:1"),
        ];
        for (k, url) in held {
            cache.insert(key(k), &answer_for(url, 300), Arc::from("e"), 0);
        }
        // Key 3 moved to another proxy since: ejecting a leaves it.
        cache.insert(key(3), &answer_for("socks5://c:1", 300), Arc::from("e"), 0);
        assert_eq!(cache.indexed_proxies(), 3);
        assert_eq!(cache.evict_proxy("socks5://a:1"), 2);
        assert_eq!(cache.evict_proxy("socks5://a:1"), 0, "nothing left to eject");
        let kept: Vec<u8> = (0..4).filter(|&k| cache.fresh(&key(k)).is_some()).collect();
        assert_eq!(kept, [2, 3]);
        assert_eq!((cache.len(), cache.indexed_proxies()), (2, 2));
        assert_eq!(cache.served_by("socks5://a:1"), None);
    }

    #[test]
    fn feedback_goes_to_the_endpoint_that_last_handed_the_proxy_out_while_an_entry_holds_it() {
        let (_, cache) = cache(100, 60);
        let url = "socks5://shared:1";
        assert_eq!(cache.served_by(url), None, "never handed out");
        cache.insert(key(0), &answer_for(url, 300), Arc::from("first"), 0);
        assert_eq!(cache.served_by(url), Some(0));
        cache.insert(key(1), &answer_for(url, 300), Arc::from("second"), 1);
        assert_eq!(cache.served_by(url), Some(1), "the later hand-out wins");
        let (a, b) = (cache.fresh(&key(0)).unwrap(), cache.fresh(&key(1)).unwrap());
        assert!(std::ptr::eq(a.proxy_url(), b.proxy_url()), "one copy of the URL");
        assert_eq!(cache.invalidate_exchange("EX0"), 1);
        assert_eq!(cache.served_by(url), Some(1), "key 1 still holds it");
        assert_eq!(cache.invalidate_all(), 1);
        assert_eq!((cache.served_by(url), cache.indexed_proxies()), (None, 0));
    }

    #[test]
    fn the_cache_holds_its_cap_and_evicts_the_least_recently_used() {
        // (cap, keys inserted): one shard (exact LRU) and several (per-shard LRU).
        for (cap, inserted) in [(3u64, 3usize), (4096, 5000), (40_000, 50_000)] {
            let (_, cache) = cache(cap, 60);
            let key = |i: usize| CacheKey::new(&format!("x{i}"), ConnectionType::Http, None);
            for i in 0..inserted {
                cache.insert(
                    key(i),
                    &answer_for(&format!("socks5://p{i}:1"), 300),
                    Arc::from("e"),
                    0,
                );
            }
            assert_eq!(cache.len() as u64, cap, "cap {cap}");
            assert_eq!(
                cache.indexed_proxies() as u64,
                cap,
                "cap {cap}: the index follows"
            );
        }
        let (_, cache) = cache(3, 60);
        for k in 0..3 {
            cache.insert(key(k), &answer(300), Arc::from("e"), 0);
        }
        assert!(cache.fresh(&key(0)).is_some(), "0 is now the most recently used");
        cache.insert(key(3), &answer(300), Arc::from("e"), 0);
        let kept: Vec<u8> = (0..4).filter(|&k| cache.fresh(&key(k)).is_some()).collect();
        assert_eq!(kept, [0, 2, 3], "1 was the least recently used");
    }

    /// Entries the proxy index points at, each checked to be the one its shard holds.
    fn indexed_entries(cache: &AnswerCache) -> usize {
        let mut n = 0;
        for index in &cache.index {
            for proxy in lock(index).iter() {
                let entries = match proxy {
                    Proxy::One { entry, .. } => vec![entry.clone()],
                    Proxy::Many(h) => h.entries.iter().map(|e| e.0.clone()).collect(),
                };
                for entry in entries {
                    assert_eq!(&entry.proxy_url, proxy.url(), "indexed under its own URL");
                    let held = cache.fresh(&entry.key()).expect("an indexed entry is cached");
                    assert!(Arc::ptr_eq(&held, &entry), "the index points at the live entry");
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn concurrent_inserts_reads_and_ejections_keep_the_count_and_the_index_exact() {
        let (_, cache) = cache(3000, 60);
        assert_eq!(cache.shards.len(), 2);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let cache = &cache;
                scope.spawn(move || {
                    let mut rng = rand::rng();
                    for i in 0..20_000u64 {
                        let k = rand::Rng::random_range(&mut rng, 0..6000u32);
                        let key = CacheKey::new(&format!("x{k}"), ConnectionType::Http, None);
                        let proxy = format!("socks5://p{}:1", rand::Rng::random_range(&mut rng, 0..500u32));
                        match (i + t) % 10 {
                            0 => {
                                cache.evict_proxy(&proxy);
                            }
                            1..=4 => {
                                cache.fresh(&key);
                            }
                            _ => {
                                cache.insert(key, &answer_for(&proxy, 300), Arc::from("e"), 0);
                            }
                        }
                    }
                });
            }
        });
        let len = cache.len();
        assert_eq!(
            cache.count.load(Ordering::Relaxed),
            len,
            "the count is the shards' sum"
        );
        assert!(len <= 3000 + 8, "{len} entries for a cap of 3,000");
        assert_eq!(
            indexed_entries(&cache),
            len,
            "every entry indexed once, nothing else"
        );
    }

    #[test]
    fn entries_past_their_stale_window_are_swept_and_leave_the_index() {
        let (clock, cache) = cache(100_000, 10);
        for i in 0..5000 {
            let key = CacheKey::new(&format!("x{i}"), ConnectionType::Http, None);
            cache.insert(
                key,
                &answer_for(&format!("socks5://p{i}:1"), 60),
                Arc::from("e"),
                0,
            );
        }
        clock.advance(Duration::from_secs(30));
        assert_eq!(cache.len(), 5000, "inside the stale window");
        clock.advance(Duration::from_secs(60) + SWEEP_EVERY);
        assert_eq!((cache.len(), cache.indexed_proxies()), (0, 0));
    }

    #[test]
    fn keys_of_any_shape_are_kept_apart_and_given_back_unchanged() {
        let (_, cache) = cache(100, 60);
        let long = "x".repeat(64);
        // (row, exchange, connection type, region): inline and heap keys, splits that would
        // collide if the exchange's end were not kept, no region vs an empty one.
        let rows: &[(&str, &str, ConnectionType, Option<&str>)] = &[
            ("short", "binance", ConnectionType::Http, None),
            ("websocket", "binance", ConnectionType::Websocket, None),
            (
                "20 bytes inline",
                "binance",
                ConnectionType::Http,
                Some("eu-west-1abc"),
            ),
            (
                "21 bytes on the heap",
                "binance",
                ConnectionType::Http,
                Some("eu-west-1abcd"),
            ),
            ("split a|bc", "a", ConnectionType::Http, Some("bc")),
            ("split ab|c", "ab", ConnectionType::Http, Some("c")),
            ("empty region", "ab", ConnectionType::Http, Some("")),
            ("no region", "ab", ConnectionType::Http, None),
            ("non-ASCII region", "kraken", ConnectionType::Http, Some("région")),
            ("long exchange", &long, ConnectionType::Websocket, Some("us")),
        ];
        for (i, (_, exchange, ct, region)) in rows.iter().enumerate() {
            let url = format!("socks5://p{i}:1");
            cache.insert(
                CacheKey::new(exchange, *ct, *region),
                &answer_for(&url, 300),
                Arc::from("e"),
                i,
            );
        }
        assert_eq!(cache.len(), rows.len(), "every key is its own");
        for (i, (row, exchange, ct, region)) in rows.iter().enumerate() {
            let key = CacheKey::new(exchange, *ct, *region);
            let hit = cache.fresh(&key).unwrap_or_else(|| panic!("{row}: not found"));
            assert_eq!(hit.key(), key, "{row}");
            assert_eq!(hit.proxy_url(), format!("socks5://p{i}:1"), "{row}");
        }
    }

    #[test]
    fn listing_pages_through_entries_in_key_order() {
        let (_, cache) = cache(100, 60);
        let keys = [
            CacheKey::new("b", ConnectionType::Http, None),
            CacheKey::new("a", ConnectionType::Websocket, Some("eu")),
            CacheKey::new("a", ConnectionType::Http, Some("us")),
            CacheKey::new("a", ConnectionType::Http, None),
            CacheKey::new("ab", ConnectionType::Http, None),
        ];
        for k in &keys {
            cache.insert(k.clone(), &answer(300), Arc::from("e"), 0);
        }
        let mut sorted = keys.to_vec();
        sorted.sort();
        let (first, more) = cache.list_page("", None, 3);
        assert!(more);
        let (rest, more) = cache.list_page("", first.last().map(|(k, _)| k), 3);
        assert!(!more);
        let listed: Vec<CacheKey> = first.into_iter().chain(rest).map(|(k, _)| k).collect();
        assert_eq!(listed, sorted);
        let (only_a, _) = cache.list_page("a", None, 10);
        assert_eq!(only_a.len(), 3);
        assert!(only_a.iter().all(|(k, c)| k.exchange == "a" && c.key() == *k));
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
                        cache.insert(key(k), &answer(ttl), Arc::from("e"), 0);
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
                                let served = c.clone()
                                    .hit_response(clock.now(), prost_types::Timestamp::default())
                                    .into_response();
                                prop_assert!(served.ttl_seconds as u64 <= ttl);
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
