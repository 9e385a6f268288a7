//! The in-process [`Store`]: per-(proxy, exchange) state in sharded maps, bounded and expiring.
//!
//! - **Layout**: (exchange, proxy) → entry in one [`DashMap`] (sharded locks), each entry behind
//!   its own mutex. An operation takes a shard's read lock and the entry's mutex, briefly; no lock
//!   is global and none is held across an `.await`. Lock order is always map shard → entry. (A
//!   map per exchange, as before, cost ≈ 2 KB per exchange in empty shards: with one proxy per
//!   exchange, 2.2 KB per entry; one map costs the entry and its key.) Lookups borrow the key's
//!   strings ([`Pair`]): no allocation for an entry that exists.
//! - **Budgets** are exact sliding windows ([`super::window`], which says why not GCRA or a fixed
//!   window), one per (proxy, exchange, connection type), holding at most the budget's attempts.
//! - **Expiry**: an entry is idle once its windows are empty, its leases ended, its penalty
//!   passed, a day has passed since its last ban ended (how long a repeat still doubles), 300 s
//!   since its last ejection ended, and an hour since its last failure. Idle entries are dropped
//!   by a purge that runs when enough entries were created since the last one (amortised O(1) per
//!   creation), or when the cap is reached; [`MemoryStore::purge`] runs it on demand.
//! - **Bound**: at most `max_entries` entries (a few more while concurrent creations race). At
//!   the cap, idle entries go first; if none are idle, the least recently touched 1/64th of the
//!   cap is evicted in one O(n) pass (amortised O(64) per creation). Evicting a live entry forgets
//!   its window and bans — the price of a bound on state that callers' exchange ids can grow.
//! - **Memory**: with one hand-out counted against a budget, an entry is ≈ 360 bytes with its key
//!   (measured with a counting allocator at 100,000 entries; was 2.2 KB with a map per exchange),
//!   plus 8 bytes per further attempt in a window and per further live lease (leases capped at
//!   [`MAX_LEASES`] per entry).
//! - **Time**: the broker's [`Clock`], in whole milliseconds since the store was created.
//! - **Shared answers and flights** (fleet mode's operations, trivially local here): answers in a
//!   cache bounded by total bytes ([`MAX_ANSWER_CACHE_BYTES`]), flight locks in a map bounded by
//!   [`MAX_FLIGHTS`] (full of live locks: the caller leads, as without the lock); shared
//!   candidates ([`Store::add_answer`]) as one small list per key in a second cache bounded by
//!   total bytes too, each list replaced whole in one atomic compute per key.

use std::borrow::Borrow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use proxy_broker_core::ConnectionType;
use proxy_broker_core::embedded::{EJECTION_BASE, EJECTION_MAX};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::window::{Admission, SlidingLog};
use super::{
    Attempt, BanLength, Change, ChangeKind, DEFAULT_PAGE_SIZE, HandOut, Listed, MAX_ANSWER_BYTES,
    MAX_ANSWER_TTL, MAX_PAGE_SIZE, MAX_SHARED_ANSWERS, MAX_SHARED_ANSWERS_BYTES, OutageReport, OutageStatus,
    Page, ProxyState, StateKey, Store, StoreError, WindowState,
};
use crate::brokering::bans::doubled;
use crate::brokering::outage::OutageGuard;
use crate::brokering::settings::OutageSettings;
use crate::brokering::settings::{Budget, MAX_BAN};
use crate::brokering::sticky::digest64;
use crate::clock::Clock;
use crate::sync::lock;

/// Default cap on (proxy, exchange) entries.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Most live leases remembered per entry (beyond it the soonest-ending is forgotten).
pub const MAX_LEASES: usize = 4096;
/// Changes buffered for slow subscribers.
pub const CHANGE_FEED_CAPACITY: usize = 4096;
/// How long after a ban ends a new ban still counts as a repeat (and the entry is kept).
pub(crate) const BAN_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// How long after an ejection ends its count is kept (a new one lasts longer).
pub(crate) const EJECTION_MEMORY: Duration = EJECTION_MAX;
/// How long a consecutive-failure count lives without a new failure.
pub(crate) const FAILURE_MEMORY: Duration = Duration::from_secs(3600);
/// Fewest creations between two opportunistic purges.
const MIN_CREATIONS_PER_PURGE: usize = 256;
/// Most bytes of shared answers kept (keys and values).
pub const MAX_ANSWER_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// Most flight locks held at once.
pub const MAX_FLIGHTS: usize = 10_000;

/// A kept answer: the bytes and when they expire (store milliseconds).
#[derive(Debug, Clone)]
struct Answer {
    bytes: Arc<[u8]>,
    expires_at: u64,
}

/// One of a key's shared candidates: the proxy it names, its bytes and when it expires.
#[derive(Clone)]
struct SharedAnswer {
    proxy: Arc<str>,
    bytes: Arc<[u8]>,
    expires_at: u64,
}

/// A key's shared candidates, soonest-ending first.
type SharedAnswers = Arc<[SharedAnswer]>;

/// The in-process store. See the module docs.
pub struct MemoryStore {
    entries: DashMap<StoreKey, Mutex<Entry>>,
    len: AtomicUsize,
    max_entries: usize,
    clock: Arc<dyn Clock>,
    epoch: Instant,
    changes: broadcast::Sender<Change>,
    /// Held by whoever purges or evicts (others skip rather than wait).
    housekeeping: Mutex<()>,
    created_since_purge: AtomicUsize,
    answers: moka::sync::Cache<String, Answer>,
    /// Flight locks: key → expiry (store milliseconds).
    flight_locks: Mutex<HashMap<String, u64>>,
    flights: broadcast::Sender<Arc<str>>,
    /// The exchange-outage reports (bounded on their own).
    outage: OutageGuard,
    /// Shared candidates per key ([`Store::add_answer`]).
    answer_sets: moka::sync::Cache<String, SharedAnswers>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.len())
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

/// What an entry is kept under: the exchange id and the proxy URL in one allocation (the
/// exchange first, `split` bytes long). One string rather than two saves an allocation and 8
/// bytes of table slot per entry (≈ 40 bytes of heap per entry).
#[derive(Clone, PartialEq, Eq)]
struct StoreKey {
    text: Arc<str>,
    split: u32,
}

impl StoreKey {
    fn new(exchange: &str, proxy: &str) -> Self {
        let mut text = String::with_capacity(exchange.len() + proxy.len());
        text.push_str(exchange);
        text.push_str(proxy);
        Self {
            // Exchange ids are at most `MAX_EXCHANGE_ID_LEN` bytes.
            split: u32::try_from(exchange.len()).unwrap_or(u32::MAX),
            text: Arc::from(text),
        }
    }

    fn split_at(&self) -> usize {
        usize::try_from(self.split)
            .unwrap_or(usize::MAX)
            .min(self.text.len())
    }
}

/// An (exchange, proxy) pair however its strings are held, so that the map can be searched with
/// a [`StateKey`]'s borrowed strings (the trait-object form of a borrowed composite key).
trait Pair {
    fn exchange(&self) -> &str;
    fn proxy(&self) -> &str;
}

impl Pair for StoreKey {
    fn exchange(&self) -> &str {
        self.text.get(..self.split_at()).unwrap_or_default()
    }

    fn proxy(&self) -> &str {
        self.text.get(self.split_at()..).unwrap_or_default()
    }
}

impl Pair for StateKey<'_> {
    fn exchange(&self) -> &str {
        self.exchange
    }

    fn proxy(&self) -> &str {
        self.proxy
    }
}

impl Hash for dyn Pair + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.exchange().hash(state);
        self.proxy().hash(state);
    }
}

impl PartialEq for dyn Pair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.exchange() == other.exchange() && self.proxy() == other.proxy()
    }
}

impl Eq for dyn Pair + '_ {}

/// Hashes as its [`Pair`] does (the map relies on it).
impl Hash for StoreKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn Pair).hash(state);
    }
}

impl<'a> Borrow<dyn Pair + 'a> for StoreKey {
    fn borrow(&self) -> &(dyn Pair + 'a) {
        self
    }
}

/// "Now" in the store's milliseconds: rounded down (for "has it passed") and up (for "when it
/// happened"), so rounding always errs towards the stricter answer.
#[derive(Debug, Clone, Copy)]
struct Now {
    floor: u64,
    ceil: u64,
}

/// One (proxy, exchange). Kept small (≈ 64 bytes inline): what most entries never need (bans,
/// penalties, ejections, failure counts) and each connection type's window are boxed, and one
/// live lease is held without an allocation.
#[derive(Debug, Default)]
struct Entry {
    /// Opaque order for listings (a digest of the proxy URL).
    digest: u64,
    last_touch: u64,
    hand_outs: u64,
    leases: Leases,
    marks: Option<Box<Marks>>,
    http: Option<Box<Window>>,
    websocket: Option<Box<Window>>,
}

/// A connection type's window and the budget it was last counted against.
type Window = (Budget, SlidingLog);

/// Bans, penalties, ejections and failure counts of an entry.
#[derive(Debug, Default)]
struct Marks {
    banned_until: u64,
    ban_strikes: u32,
    penalised_until: u64,
    ejected_until: u64,
    ejections: u32,
    consecutive_failures: u32,
    last_failure: u64,
}

/// An entry without marks.
const NO_MARKS: Marks = Marks {
    banned_until: 0,
    ban_strikes: 0,
    penalised_until: 0,
    ejected_until: 0,
    ejections: 0,
    consecutive_failures: 0,
    last_failure: 0,
};

/// Lease ends, soonest first: one inline (most entries have one or none), more in a heap.
#[derive(Debug, Default)]
enum Leases {
    #[default]
    None,
    One(u64),
    /// Boxed: most entries never hold two, and inline the heap would make every entry 8 bytes larger.
    #[allow(
        clippy::box_collection,
        reason = "the box keeps `Leases` at 16 bytes in each of up to 100,000 entries"
    )]
    Many(Box<BinaryHeap<Reverse<u64>>>),
}

impl Leases {
    fn peek(&self) -> Option<u64> {
        match self {
            Leases::None => None,
            Leases::One(end) => Some(*end),
            Leases::Many(heap) => heap.peek().map(|Reverse(end)| *end),
        }
    }

    /// Ends the soonest-ending lease.
    fn pop(&mut self) -> Option<u64> {
        match self {
            Leases::None => None,
            Leases::One(end) => {
                let end = *end;
                *self = Leases::None;
                Some(end)
            }
            Leases::Many(heap) => {
                let end = heap.pop().map(|Reverse(end)| end);
                if heap.len() <= 1 {
                    *self = heap.pop().map_or(Leases::None, |Reverse(last)| Leases::One(last));
                }
                end
            }
        }
    }

    fn push(&mut self, end: u64) {
        match self {
            Leases::None => *self = Leases::One(end),
            Leases::One(first) => {
                *self = Leases::Many(Box::new(BinaryHeap::from([Reverse(*first), Reverse(end)])));
            }
            Leases::Many(heap) => heap.push(Reverse(end)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Leases::None => 0,
            Leases::One(_) => 1,
            Leases::Many(heap) => heap.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Entry {
    fn marks(&self) -> &Marks {
        self.marks.as_deref().unwrap_or(&NO_MARKS)
    }

    fn marks_mut(&mut self) -> &mut Marks {
        self.marks.get_or_insert_with(Box::default)
    }

    fn window_mut(&mut self, connection_type: ConnectionType) -> &mut Option<Box<Window>> {
        match connection_type {
            ConnectionType::Http => &mut self.http,
            ConnectionType::Websocket => &mut self.websocket,
        }
    }

    fn prune_leases(&mut self, now: Now) {
        while self.leases.peek().is_some_and(|end| end <= now.floor) {
            self.leases.pop();
        }
    }

    fn hand_out(&mut self, now: Now, lease: Duration) {
        self.hand_outs = self.hand_outs.saturating_add(1);
        self.prune_leases(now);
        if self.leases.len() >= MAX_LEASES {
            self.leases.pop();
        }
        self.leases.push(now.ceil.saturating_add(ms(lease)));
    }

    fn is_idle(&mut self, now: Now) -> bool {
        self.prune_leases(now);
        let past = |t: u64| t <= now.floor;
        let window_clear = |w: &Option<Box<Window>>| {
            w.as_deref()
                .is_none_or(|(b, log)| log.clears_at(*b).is_none_or(past))
        };
        let m = self.marks();
        self.leases.is_empty()
            && past(m.penalised_until)
            && (m.ban_strikes == 0 || past(m.banned_until.saturating_add(ms(BAN_MEMORY))))
            && (m.ejections == 0 || past(m.ejected_until.saturating_add(ms(EJECTION_MEMORY))))
            && (m.consecutive_failures == 0 || past(m.last_failure.saturating_add(ms(FAILURE_MEMORY))))
            && window_clear(&self.http)
            && window_clear(&self.websocket)
    }
}

impl MemoryStore {
    /// A store holding at most `max_entries` (proxy, exchange) entries, on `clock`.
    pub fn new(max_entries: usize, clock: Arc<dyn Clock>) -> Self {
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let (flights, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let answers = moka::sync::Cache::builder()
            .max_capacity(MAX_ANSWER_CACHE_BYTES)
            .weigher(|k: &String, v: &Answer| u32::try_from(k.len() + v.bytes.len()).unwrap_or(u32::MAX))
            // Only frees memory: expiry itself is checked on the store's clock.
            .time_to_live(MAX_ANSWER_TTL)
            .build();
        let answer_sets = moka::sync::Cache::builder()
            .max_capacity(MAX_ANSWER_CACHE_BYTES)
            .weigher(|k: &String, v: &SharedAnswers| {
                let held: usize = v.iter().map(|a| a.proxy.len() + a.bytes.len()).sum();
                u32::try_from(k.len() + held).unwrap_or(u32::MAX)
            })
            .time_to_live(MAX_ANSWER_TTL)
            .build();
        Self {
            answer_sets,
            entries: DashMap::new(),
            len: AtomicUsize::new(0),
            max_entries: max_entries.max(1),
            epoch: clock.now(),
            clock,
            changes,
            housekeeping: Mutex::new(()),
            created_since_purge: AtomicUsize::new(0),
            answers,
            flight_locks: Mutex::new(HashMap::new()),
            flights,
            outage: OutageGuard::new(),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn now(&self) -> Now {
        let since = self.clock.now().saturating_duration_since(self.epoch);
        let floor = ms(since);
        let ceil = if since.subsec_nanos().is_multiple_of(1_000_000) {
            floor
        } else {
            floor.saturating_add(1)
        };
        Now { floor, ceil }
    }

    fn instant(&self, at_ms: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_millis(at_ms))
            .unwrap_or_else(|| self.clock.now() + MAX_BAN)
    }

    fn publish(&self, key: StateKey<'_>, kind: ChangeKind) {
        // No subscriber is not an error.
        let _ = self.changes.send(Change {
            proxy: Arc::from(key.proxy),
            exchange: Arc::from(key.exchange),
            kind,
        });
    }

    /// [`Store::states`], which never waits here.
    pub fn states_now(&self, exchange: &str, proxies: &[&str]) -> Vec<Option<ProxyState>> {
        if self.is_empty() {
            // Nothing banned, penalised, ejected or budgeted anywhere (the usual state of a broker
            // whose exchanges have no budget): no key to hash, no shard to lock.
            return vec![None; proxies.len()];
        }
        proxies
            .iter()
            .map(|proxy| self.existing(StateKey { proxy, exchange }, |e, now| self.snapshot(e, now)))
            .collect()
    }

    /// [`MemoryStore::states_now`] of one proxy, without a vector.
    pub fn state_now(&self, exchange: &str, proxy: &str) -> Option<ProxyState> {
        if self.is_empty() {
            return None;
        }
        self.existing(StateKey { proxy, exchange }, |e, now| self.snapshot(e, now))
    }

    /// Runs `f` on the entry of `key` if there is one.
    fn existing<R>(&self, key: StateKey<'_>, f: impl FnOnce(&mut Entry, Now) -> R) -> Option<R> {
        let entry = self.entries.get(&key as &dyn Pair)?;
        // Read only for an entry there is: a choice among members without state reads no clock.
        let now = self.now();
        let mut e = lock(&entry);
        e.last_touch = now.floor;
        Some(f(&mut e, now))
    }

    /// Runs `f` on the entry of `key`, creating it if need be.
    fn upsert<R>(&self, key: StateKey<'_>, f: impl FnOnce(&mut Entry, Now) -> R) -> R {
        if let Some(entry) = self.entries.get(&key as &dyn Pair) {
            let now = self.now();
            let mut e = lock(&entry);
            e.last_touch = now.floor;
            return f(&mut e, now);
        }
        self.make_room();
        let now = self.now();
        let stored = StoreKey::new(key.exchange, key.proxy);
        let entry = match self.entries.entry(stored) {
            MapEntry::Occupied(o) => o.into_ref().downgrade(),
            MapEntry::Vacant(v) => {
                self.len.fetch_add(1, Ordering::Relaxed);
                self.created_since_purge.fetch_add(1, Ordering::Relaxed);
                v.insert(Mutex::new(Entry {
                    digest: digest64(&[key.proxy.as_bytes()]),
                    ..Entry::default()
                }))
                .downgrade()
            }
        };
        let mut e = lock(&entry);
        e.last_touch = now.floor;
        f(&mut e, now)
    }

    fn with_entry<R>(
        &self,
        key: StateKey<'_>,
        create: bool,
        f: impl FnOnce(&mut Entry, Now) -> R,
    ) -> Option<R> {
        if create {
            Some(self.upsert(key, f))
        } else {
            self.existing(key, f)
        }
    }

    /// Before creating an entry: purge idle entries when due, and evict when at the cap.
    fn make_room(&self) {
        let len = self.len();
        let due = self.created_since_purge.load(Ordering::Relaxed) >= (len / 4).max(MIN_CREATIONS_PER_PURGE);
        if len < self.max_entries && !due {
            return;
        }
        let Ok(_guard) = self.housekeeping.try_lock() else {
            return;
        };
        self.purge_locked();
        if self.len() >= self.max_entries {
            self.evict_least_recent((self.max_entries / 64).max(1));
        }
    }

    /// Drops idle entries now. Returns how many went.
    pub fn purge(&self) -> usize {
        let _guard = self.housekeeping.lock().unwrap_or_else(|e| e.into_inner());
        self.purge_locked()
    }

    fn purge_locked(&self) -> usize {
        self.created_since_purge.store(0, Ordering::Relaxed);
        let now = self.now();
        let mut removed = 0;
        self.entries.retain(|_, e| {
            let keep = !lock(e).is_idle(now);
            removed += usize::from(!keep);
            keep
        });
        self.len.fetch_sub(removed.min(self.len()), Ordering::Relaxed);
        removed
    }

    fn evict_least_recent(&self, count: usize) {
        let mut all: Vec<(u64, StoreKey)> = Vec::with_capacity(self.len());
        for e in self.entries.iter() {
            all.push((lock(e.value()).last_touch, e.key().clone()));
        }
        if all.len() > count {
            all.select_nth_unstable_by_key(count, |(touched, _)| *touched);
            all.truncate(count);
        }
        let mut removed = 0;
        for (_, key) in all {
            if self.entries.remove(&key).is_some() {
                removed += 1;
            }
        }
        self.len.fetch_sub(removed.min(self.len()), Ordering::Relaxed);
    }

    fn snapshot(&self, e: &mut Entry, now: Now) -> ProxyState {
        e.prune_leases(now);
        let live = |t: u64| (t > now.floor).then(|| self.instant(t));
        let window = |w: &Option<Box<Window>>| {
            w.as_deref().map(|(budget, log)| WindowState {
                budget: *budget,
                used: log.used(*budget, now.floor),
                frees_at: log
                    .retry_after(*budget, now.floor)
                    .map(|d| self.instant(now.floor.saturating_add(ms(d)))),
            })
        };
        let m = e.marks();
        ProxyState {
            banned_until: live(m.banned_until),
            ban_strikes: m.ban_strikes,
            penalised_until: live(m.penalised_until),
            ejected_until: live(m.ejected_until),
            ejections: m.ejections,
            consecutive_failures: m.consecutive_failures,
            live_leases: u32::try_from(e.leases.len()).unwrap_or(u32::MAX),
            hand_outs: e.hand_outs,
            http: window(&e.http),
            websocket: window(&e.websocket),
        }
    }
}

#[tonic::async_trait]
impl Store for MemoryStore {
    async fn try_attempt(&self, key: StateKey<'_>, hand_out: HandOut) -> Result<Attempt, StoreError> {
        Ok(self.upsert(key, |e, now| {
            let slot = e.window_mut(hand_out.connection_type);
            let Some(budget) = hand_out.budget else {
                *slot = None;
                e.hand_out(now, hand_out.lease);
                return Attempt::Admitted {
                    used: 0,
                    budget: None,
                };
            };
            let (counted_against, log) =
                &mut **slot.get_or_insert_with(|| Box::new((budget, SlidingLog::default())));
            *counted_against = budget;
            match log.try_admit(budget, now.floor, now.ceil) {
                Admission::Admitted { used } => {
                    e.hand_out(now, hand_out.lease);
                    Attempt::Admitted {
                        used,
                        budget: Some(budget),
                    }
                }
                Admission::Full { retry_after } => Attempt::Exhausted { retry_after },
            }
        }))
    }

    async fn states(&self, exchange: &str, proxies: &[&str]) -> Result<Vec<Option<ProxyState>>, StoreError> {
        Ok(self.states_now(exchange, proxies))
    }

    fn choice_states_now(&self, exchange: &str, proxies: &[&str]) -> Option<Vec<Option<ProxyState>>> {
        Some(self.states_now(exchange, proxies))
    }

    fn choice_state_now(&self, exchange: &str, proxy: &str) -> Option<Option<ProxyState>> {
        Some(self.state_now(exchange, proxy))
    }

    async fn ban(
        &self,
        key: StateKey<'_>,
        length: BanLength,
        create: bool,
    ) -> Result<Option<Instant>, StoreError> {
        let until = self.with_entry(key, create, |e, now| {
            let m = e.marks_mut();
            if m.ban_strikes > 0 && m.banned_until.saturating_add(ms(BAN_MEMORY)) <= now.floor {
                m.ban_strikes = 0;
            }
            m.ban_strikes = m.ban_strikes.saturating_add(1);
            let length = match length {
                BanLength::Exactly(d) => d,
                BanLength::Doubling { base, cap } => doubled(base, m.ban_strikes, cap),
            }
            .min(MAX_BAN);
            m.banned_until = m.banned_until.max(now.ceil.saturating_add(ms(length)));
            m.banned_until
        });
        Ok(until.map(|t| {
            let until = self.instant(t);
            self.publish(key, ChangeKind::Banned(until));
            until
        }))
    }

    async fn penalise(
        &self,
        key: StateKey<'_>,
        length: Duration,
        create: bool,
    ) -> Result<Option<Instant>, StoreError> {
        let until = self.with_entry(key, create, |e, now| {
            let m = e.marks_mut();
            m.penalised_until = m
                .penalised_until
                .max(now.ceil.saturating_add(ms(length.min(MAX_BAN))));
            m.penalised_until
        });
        Ok(until.map(|t| {
            let until = self.instant(t);
            self.publish(key, ChangeKind::Penalised(until));
            until
        }))
    }

    async fn record_failure(&self, key: StateKey<'_>, create: bool) -> Result<Option<u32>, StoreError> {
        Ok(self.with_entry(key, create, |e, now| {
            let m = e.marks_mut();
            if m.last_failure.saturating_add(ms(FAILURE_MEMORY)) <= now.floor {
                m.consecutive_failures = 0;
            }
            m.consecutive_failures = m.consecutive_failures.saturating_add(1);
            m.last_failure = now.floor;
            m.consecutive_failures
        }))
    }

    async fn record_success(&self, key: StateKey<'_>) -> Result<(), StoreError> {
        self.existing(key, |e, _| {
            if let Some(m) = e.marks.as_mut() {
                m.consecutive_failures = 0;
            }
        });
        Ok(())
    }

    async fn eject(&self, key: StateKey<'_>, create: bool) -> Result<Option<Instant>, StoreError> {
        let until = self.with_entry(key, create, |e, now| {
            let m = e.marks_mut();
            m.ejections = m.ejections.saturating_add(1);
            let length = EJECTION_BASE.saturating_mul(m.ejections).min(EJECTION_MAX);
            m.ejected_until = m.ejected_until.max(now.ceil.saturating_add(ms(length)));
            m.consecutive_failures = 0;
            m.ejected_until
        });
        Ok(until.map(|t| {
            let until = self.instant(t);
            self.publish(key, ChangeKind::Ejected(until));
            until
        }))
    }

    async fn lift_ejection(&self, key: StateKey<'_>) -> Result<bool, StoreError> {
        let lifted = self
            .existing(key, |e, now| {
                let Some(m) = e.marks.as_mut().filter(|m| m.ejected_until > now.floor) else {
                    return false;
                };
                m.ejected_until = now.floor;
                m.ejections = m.ejections.saturating_sub(1);
                true
            })
            .unwrap_or(false);
        if lifted {
            self.publish(key, ChangeKind::Lifted);
        }
        Ok(lifted)
    }

    async fn release(&self, key: StateKey<'_>) -> Result<bool, StoreError> {
        Ok(self
            .existing(key, |e, now| {
                e.prune_leases(now);
                e.leases.pop().is_some()
            })
            .unwrap_or(false))
    }

    async fn list(
        &self,
        exchange: Option<&str>,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<Page, StoreError> {
        let after = page_token
            .filter(|t| !t.is_empty())
            .map(parse_token)
            .transpose()?;
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let now = self.now();
        let mut rows: Vec<((Arc<str>, u64), Listed)> = Vec::new();
        for e in self.entries.iter() {
            let key = e.key();
            if exchange.is_some_and(|x| x != key.exchange()) {
                continue;
            }
            let mut entry = lock(e.value());
            if after
                .as_ref()
                .is_some_and(|(x, d)| (key.exchange(), entry.digest) <= (x.as_str(), *d))
            {
                continue;
            }
            let exchange: Arc<str> = Arc::from(key.exchange());
            let state = self.snapshot(&mut entry, now);
            rows.push((
                (exchange.clone(), entry.digest),
                Listed {
                    proxy: Arc::from(key.proxy()),
                    exchange,
                    state,
                },
            ));
        }
        let more = rows.len() > limit;
        if more {
            rows.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            rows.truncate(limit);
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let next_page_token = more
            .then(|| rows.last().map(|((x, d), _)| format!("{x}/{d:016x}")))
            .flatten();
        Ok(Page {
            entries: rows.into_iter().map(|(_, l)| l).collect(),
            next_page_token,
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn put_answer(&self, key: &str, bytes: &[u8], ttl: Duration) -> Result<(), StoreError> {
        if bytes.len() > MAX_ANSWER_BYTES || ttl.is_zero() {
            return Ok(());
        }
        let now = self.now();
        let answer = Answer {
            bytes: Arc::from(bytes),
            expires_at: now.floor.saturating_add(ms(ttl.min(MAX_ANSWER_TTL))),
        };
        self.answers.insert(key.to_owned(), answer);
        Ok(())
    }

    async fn get_answer(&self, key: &str) -> Result<Option<(Vec<u8>, Duration)>, StoreError> {
        let Some(answer) = self.answers.get(key) else {
            return Ok(None);
        };
        let now = self.now();
        if answer.expires_at <= now.floor {
            self.answers.invalidate(key);
            return Ok(None);
        }
        let left = Duration::from_millis(answer.expires_at - now.floor);
        Ok(Some((answer.bytes.to_vec(), left)))
    }

    async fn add_answer(
        &self,
        key: &str,
        proxy: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if bytes.len() > MAX_ANSWER_BYTES || ttl.is_zero() {
            return Ok(());
        }
        let now = self.now();
        let added = SharedAnswer {
            proxy: Arc::from(proxy),
            bytes: Arc::from(bytes),
            expires_at: now.floor.saturating_add(ms(ttl.min(MAX_ANSWER_TTL))),
        };
        self.answer_sets.entry(key.to_owned()).and_compute_with(|held| {
            let held = held.map(moka::Entry::into_value);
            let list = merge_answer(held.as_deref().unwrap_or_default(), added, now.floor);
            moka::ops::compute::Op::Put(Arc::from(list))
        });
        Ok(())
    }

    async fn get_answers(&self, key: &str) -> Result<Vec<(Vec<u8>, Duration)>, StoreError> {
        let Some(list) = self.answer_sets.get(key) else {
            return Ok(Vec::new());
        };
        let now = self.now();
        Ok(list
            .iter()
            .rev()
            .filter(|a| a.expires_at > now.floor)
            .map(|a| (a.bytes.to_vec(), Duration::from_millis(a.expires_at - now.floor)))
            .collect())
    }

    async fn lead_flight(&self, key: &str, lock_ttl: Duration) -> Result<bool, StoreError> {
        let now = self.now();
        let mut locks = self.flight_locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.get(key).is_some_and(|&until| until > now.floor) {
            return Ok(false);
        }
        if locks.len() >= MAX_FLIGHTS {
            locks.retain(|_, until| *until > now.floor);
            if locks.len() >= MAX_FLIGHTS {
                // Full of live locks: lead without one (the broker's own single flight still
                // holds within the process).
                return Ok(true);
            }
        }
        let until = now.ceil.saturating_add(ms(lock_ttl.min(MAX_ANSWER_TTL)));
        locks.insert(key.to_owned(), until);
        Ok(true)
    }

    async fn end_flight(&self, key: &str) -> Result<(), StoreError> {
        self.flight_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        // No subscriber is not an error.
        let _ = self.flights.send(Arc::from(key));
        Ok(())
    }

    fn flights(&self) -> broadcast::Receiver<Arc<str>> {
        self.flights.subscribe()
    }

    async fn outage_report(
        &self,
        exchange: &str,
        proxy: &str,
        failing: bool,
        rule: &OutageSettings,
    ) -> Result<OutageReport, StoreError> {
        let (transition, in_outage) = self
            .outage
            .report(exchange, proxy, failing, self.clock.now(), rule);
        Ok(OutageReport {
            transition,
            in_outage,
        })
    }

    async fn outage_note_ejection(
        &self,
        exchange: &str,
        proxy: &str,
        rule: &OutageSettings,
    ) -> Result<bool, StoreError> {
        Ok(self.outage.note_ejection(exchange, proxy, self.clock.now(), rule))
    }

    async fn outages(
        &self,
        exchange: Option<&str>,
        rule: &OutageSettings,
    ) -> Result<Vec<(Arc<str>, OutageStatus)>, StoreError> {
        let now = self.clock.now();
        let mut all = match exchange {
            Some(x) => self
                .outage
                .status(x, now, rule)
                .map(|st| (Arc::from(x), st))
                .into_iter()
                .collect(),
            None => self.outage.statuses(now, rule),
        };
        // Exchanges whose reports all aged out are not tracked any more (as in a shared store).
        all.retain(|(_, st)| st.reporters > 0);
        Ok(all)
    }
}

/// A key's shared candidates `held` with `added` (replacing the answer naming the same proxy),
/// without those expired at `now`, within [`MAX_SHARED_ANSWERS`] and
/// [`MAX_SHARED_ANSWERS_BYTES`] (the soonest-ending go first, never `added`); soonest-ending
/// first.
fn merge_answer(held: &[SharedAnswer], added: SharedAnswer, now: u64) -> Vec<SharedAnswer> {
    let mut list: Vec<SharedAnswer> = held
        .iter()
        .filter(|a| a.expires_at > now && a.proxy != added.proxy)
        .cloned()
        .collect();
    list.push(added.clone());
    list.sort_by_key(|a| a.expires_at);
    let mut bytes: usize = list.iter().map(|a| a.bytes.len()).sum();
    let mut i = 0;
    while (list.len() > MAX_SHARED_ANSWERS || bytes > MAX_SHARED_ANSWERS_BYTES) && i < list.len() {
        if list[i].proxy == added.proxy {
            i += 1;
        } else {
            bytes -= list.remove(i).bytes.len();
        }
    }
    list
}

/// `exchange/digest` → its parts (the Redis store issues and reads the same tokens).
pub(super) fn parse_token(token: &str) -> Result<(String, u64), StoreError> {
    let bad = || {
        let shown: String = proxy_broker_core::redact::redact_text(token)
            .chars()
            .take(64)
            .collect();
        StoreError::BadPageToken(format!("{shown:?} is not a page token this broker issued"))
    };
    let (exchange, digest) = token.rsplit_once('/').ok_or_else(bad)?;
    if digest.len() != 16 || exchange.len() > proxy_broker_core::validate::MAX_EXCHANGE_ID_LEN {
        return Err(bad());
    }
    let digest = u64::from_str_radix(digest, 16).map_err(|_| bad())?;
    Ok((exchange.to_owned(), digest))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::clock::SystemClock;

    const WS: ConnectionType = ConnectionType::Websocket;

    fn store(max: usize) -> MemoryStore {
        MemoryStore::new(max, Arc::new(SystemClock))
    }

    fn key<'a>(proxy: &'a str, exchange: &'a str) -> StateKey<'a> {
        StateKey { proxy, exchange }
    }

    fn hand_out(budget: Option<Budget>) -> HandOut {
        HandOut {
            connection_type: WS,
            budget,
            lease: Duration::from_secs(60),
        }
    }

    async fn state(s: &MemoryStore, proxy: &str, exchange: &str) -> Option<ProxyState> {
        s.states(exchange, &[proxy]).await.unwrap().pop().flatten()
    }

    /// 100,000 cached keys are 100,000 entries (issue 8: < 64 MiB RSS in all): a larger slot or
    /// key shows here first. Table slot = key + `Mutex<Entry>` (96 bytes); one allocation per key.
    #[test]
    fn entries_and_their_keys_stay_small() {
        use std::hash::BuildHasher;
        assert_eq!(size_of::<StoreKey>(), 24, "one shared string and its split");
        assert_eq!(size_of::<Leases>(), 16, "one lease inline, more boxed");
        assert!(size_of::<Entry>() <= 64, "Entry is {} bytes", size_of::<Entry>());
        assert!(
            size_of::<Mutex<Entry>>() <= 72,
            "Mutex<Entry> is {} bytes",
            size_of::<Mutex<Entry>>()
        );
        let stored = StoreKey::new("binance", "socks5://u:p@host:1080");
        assert_eq!(
            (stored.exchange(), stored.proxy()),
            ("binance", "socks5://u:p@host:1080")
        );
        let asked = key("socks5://u:p@host:1080", "binance");
        let hasher = std::hash::RandomState::new();
        assert_eq!(
            hasher.hash_one(&stored),
            hasher.hash_one(&asked as &dyn Pair),
            "a stored key and a borrowed one hash alike"
        );
        assert!(&stored as &dyn Pair == &asked as &dyn Pair);
        let other = StoreKey::new("binanc", "esocks5://u:p@host:1080");
        assert!(
            &stored as &dyn Pair != &other as &dyn Pair,
            "the split is part of the key"
        );
        assert_eq!(StoreKey::new("", "").proxy(), "");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_attempts_never_exceed_the_budget() {
        let s = Arc::new(store(1000));
        let budget = Some(Budget::new(25, 300));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    let attempt = s
                        .try_attempt(key("http://p:1", "binance"), hand_out(budget))
                        .await;
                    matches!(attempt, Ok(Attempt::Admitted { .. }))
                })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.unwrap());
        }
        assert_eq!(admitted, 25);
        let st = state(&s, "http://p:1", "binance").await.unwrap();
        assert_eq!(st.hand_outs, 25);
        assert_eq!(st.live_leases, 25);
        assert_eq!(st.websocket.unwrap().used, 25);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_window_says_when_it_frees_and_then_admits() {
        let s = store(10);
        let budget = Some(Budget::new(2, 10));
        for _ in 0..2 {
            assert!(matches!(
                s.try_attempt(key("http://p:1", "okx"), hand_out(budget))
                    .await
                    .unwrap(),
                Attempt::Admitted { .. }
            ));
        }
        tokio::time::advance(Duration::from_secs(4)).await;
        let Attempt::Exhausted { retry_after } = s
            .try_attempt(key("http://p:1", "okx"), hand_out(budget))
            .await
            .unwrap()
        else {
            panic!("admitted over budget");
        };
        assert_eq!(retry_after, Duration::from_secs(6));
        tokio::time::advance(retry_after).await;
        assert_eq!(
            s.try_attempt(key("http://p:1", "okx"), hand_out(budget))
                .await
                .unwrap(),
            Attempt::Admitted { used: 1, budget }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_are_counted_per_exchange_and_connection_type() {
        let s = store(10);
        let budget = Some(Budget::new(1, 60));
        let p = "http://p:1";
        assert!(matches!(
            s.try_attempt(key(p, "binance"), hand_out(budget)).await.unwrap(),
            Attempt::Admitted { .. }
        ));
        assert!(matches!(
            s.try_attempt(key(p, "binance"), hand_out(budget)).await.unwrap(),
            Attempt::Exhausted { .. }
        ));
        assert!(matches!(
            s.try_attempt(key(p, "bybit"), hand_out(budget)).await.unwrap(),
            Attempt::Admitted { .. }
        ));
        let http = HandOut {
            connection_type: ConnectionType::Http,
            ..hand_out(budget)
        };
        assert!(matches!(
            s.try_attempt(key(p, "binance"), http).await.unwrap(),
            Attempt::Admitted { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn bans_double_on_repeats_up_to_the_cap_and_are_forgotten_after_a_day() {
        let s = store(10);
        let k = key("http://p:1", "binance");
        let base = Duration::from_secs(120);
        let cap = Duration::from_secs(600);
        let length = BanLength::Doubling { base, cap };
        // (row, expected ban length)
        let rows = [
            ("first", 120),
            ("second doubles", 240),
            ("third", 480),
            ("capped", 600),
            ("still capped", 600),
        ];
        for (row, secs) in rows {
            let start = Instant::now();
            let until = s.ban(k, length, true).await.unwrap().unwrap();
            assert_eq!(until - start, Duration::from_secs(secs), "row {row}");
            tokio::time::advance(Duration::from_secs(secs)).await;
        }
        tokio::time::advance(BAN_MEMORY).await;
        let start = Instant::now();
        let until = s.ban(k, length, true).await.unwrap().unwrap();
        assert_eq!(
            until - start,
            base,
            "a ban a day after the last one is a first ban again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_ban_or_penalty_never_shortens_a_running_one() {
        let s = store(10);
        let k = key("http://p:1", "binance");
        let long = s
            .ban(k, BanLength::Exactly(Duration::from_secs(600)), true)
            .await
            .unwrap();
        let short = s
            .ban(k, BanLength::Exactly(Duration::from_secs(10)), true)
            .await
            .unwrap();
        assert_eq!(long, short);
        let long = s.penalise(k, Duration::from_secs(60), true).await.unwrap();
        let short = s.penalise(k, Duration::from_secs(1), true).await.unwrap();
        assert_eq!(long, short);
        let huge = s
            .ban(k, BanLength::Exactly(Duration::MAX), true)
            .await
            .unwrap()
            .unwrap();
        assert!(huge <= Instant::now() + MAX_BAN + Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn feedback_for_an_unknown_proxy_creates_nothing_unless_asked() {
        let s = store(10);
        let k = key("http://stranger:1", "binance");
        // (row, did the operation find an entry)
        let rows = [
            (
                "ban",
                s.ban(k, BanLength::Exactly(Duration::from_secs(1)), false)
                    .await
                    .unwrap()
                    .is_some(),
            ),
            (
                "penalise",
                s.penalise(k, Duration::from_secs(1), false)
                    .await
                    .unwrap()
                    .is_some(),
            ),
            ("failure", s.record_failure(k, false).await.unwrap().is_some()),
            ("eject", s.eject(k, false).await.unwrap().is_some()),
            ("lift", s.lift_ejection(k).await.unwrap()),
            ("release", s.release(k).await.unwrap()),
        ];
        s.record_success(k).await.unwrap();
        for (row, found) in rows {
            assert!(!found, "row {row}");
        }
        assert!(s.is_empty());
        assert_eq!(s.record_failure(k, true).await.unwrap(), Some(1));
        assert_eq!(s.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_count_until_success_ejection_or_an_hour_of_quiet() {
        let s = store(10);
        let k = key("http://p:1", "kraken");
        for n in 1..=3 {
            assert_eq!(s.record_failure(k, true).await.unwrap(), Some(n));
        }
        s.record_success(k).await.unwrap();
        assert_eq!(s.record_failure(k, true).await.unwrap(), Some(1));
        tokio::time::advance(FAILURE_MEMORY).await;
        assert_eq!(s.record_failure(k, true).await.unwrap(), Some(1));
        let first = s.eject(k, true).await.unwrap().unwrap();
        assert_eq!(first - Instant::now(), EJECTION_BASE);
        assert_eq!(
            state(&s, k.proxy, k.exchange).await.unwrap().consecutive_failures,
            0
        );
        let second = s.eject(k, true).await.unwrap().unwrap();
        assert_eq!(second - Instant::now(), EJECTION_BASE * 2);
        assert!(s.lift_ejection(k).await.unwrap());
        assert!(!s.lift_ejection(k).await.unwrap(), "nothing left to lift");
        assert_eq!(state(&s, k.proxy, k.exchange).await.unwrap().ejected_until, None);
    }

    #[tokio::test(start_paused = true)]
    async fn release_ends_the_soonest_lease_and_leases_end_by_themselves() {
        let s = store(10);
        let k = key("http://p:1", "binance");
        for secs in [30, 10, 20] {
            let h = HandOut {
                lease: Duration::from_secs(secs),
                ..hand_out(None)
            };
            s.try_attempt(k, h).await.unwrap();
        }
        assert_eq!(state(&s, k.proxy, k.exchange).await.unwrap().live_leases, 3);
        assert!(s.release(k).await.unwrap());
        tokio::time::advance(Duration::from_secs(25)).await;
        // The 10 s lease was released, the 20 s one ended: the 30 s one is left.
        assert_eq!(state(&s, k.proxy, k.exchange).await.unwrap().live_leases, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(state(&s, k.proxy, k.exchange).await.unwrap().live_leases, 0);
        assert!(!s.release(k).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_are_purged_only_after_their_windows_and_bans_pass() {
        let s = store(100);
        let budget = Some(Budget::new(5, 300));
        let h = HandOut {
            lease: Duration::from_secs(60),
            ..hand_out(budget)
        };
        s.try_attempt(key("http://counted:1", "binance"), h)
            .await
            .unwrap();
        s.penalise(
            key("http://penalised:1", "binance"),
            Duration::from_secs(30),
            true,
        )
        .await
        .unwrap();
        s.ban(
            key("http://banned:1", "binance"),
            BanLength::Exactly(Duration::from_secs(10)),
            true,
        )
        .await
        .unwrap();
        assert_eq!(s.purge(), 0);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(s.purge(), 1, "the penalty passed");
        tokio::time::advance(Duration::from_secs(270)).await;
        assert_eq!(s.purge(), 1, "the window and the lease passed");
        assert!(
            state(&s, "http://banned:1", "binance").await.is_some(),
            "repeat memory"
        );
        tokio::time::advance(BAN_MEMORY).await;
        assert_eq!(s.purge(), 1);
        assert!(s.is_empty());
        assert!(s.entries.is_empty(), "the map is empty too");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_and_evicts_the_least_recently_touched() {
        let cap = 128;
        let s = store(cap);
        let h = hand_out(Some(Budget::new(10, 3600)));
        s.try_attempt(key("http://old:1", "binance"), h).await.unwrap();
        tokio::time::advance(Duration::from_millis(5)).await;
        s.try_attempt(key("http://kept:1", "binance"), h).await.unwrap();
        for i in 0..1000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            let proxy = format!("http://p{i}:1");
            s.try_attempt(key(&proxy, &format!("x{}", i % 7)), h)
                .await
                .unwrap();
            // Touching keeps an entry recent.
            s.try_attempt(key("http://kept:1", "binance"), HandOut { budget: None, ..h })
                .await
                .unwrap();
            assert!(s.len() <= cap, "{} entries", s.len());
        }
        assert!(state(&s, "http://old:1", "binance").await.is_none());
        assert!(state(&s, "http://kept:1", "binance").await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn listing_pages_through_every_entry_once_with_tokens_that_hold_no_url() {
        let s = store(1000);
        let h = hand_out(None);
        let mut expected = HashSet::new();
        for i in 0..57 {
            let proxy = format!("http://user:secret{i}@p{i}:1");
            let exchange = ["binance", "bybit", "okx"][i % 3];
            s.try_attempt(key(&proxy, exchange), h).await.unwrap();
            expected.insert((proxy, exchange.to_owned()));
        }
        for (filter, page_size) in [(None, 10), (Some("bybit"), 4), (None, 0), (None, 5000)] {
            let mut seen = HashSet::new();
            let mut token: Option<String> = None;
            loop {
                let page = s.list(filter, token.as_deref(), page_size).await.unwrap();
                let most = match page_size {
                    0 => DEFAULT_PAGE_SIZE,
                    n => n.min(MAX_PAGE_SIZE),
                };
                assert!(page.entries.len() <= most);
                for row in page.entries {
                    assert!(
                        seen.insert((row.proxy.to_string(), row.exchange.to_string())),
                        "listed twice"
                    );
                    assert!(!format!("{row:?}").contains("secret"), "Debug shows the password");
                }
                match page.next_page_token {
                    Some(t) => {
                        assert!(
                            !t.contains("secret") && !t.contains("p1"),
                            "token {t} holds a URL"
                        );
                        token = Some(t);
                    }
                    None => break,
                }
            }
            let want: HashSet<_> = expected
                .iter()
                .filter(|(_, x)| filter.is_none_or(|f| f == x))
                .cloned()
                .collect();
            assert_eq!(seen, want, "filter {filter:?}, page size {page_size}");
        }
    }

    #[tokio::test]
    async fn a_bad_page_token_is_an_error_naming_the_field() {
        let s = store(10);
        for token in [
            "nonsense",
            "binance/xyz",
            "binance/0123456789abcdefg",
            "/",
            "http://u:pw@h:1",
        ] {
            let err = s.list(None, Some(token), 10).await.unwrap_err().to_string();
            assert!(
                err.starts_with("page_token: ") && err.contains("not a page token"),
                "{err}"
            );
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changes_are_published_for_bans_penalties_ejections_and_lifts() {
        let s = store(10);
        let mut feed = s.subscribe();
        let k = key("http://u:pw@p:1", "binance");
        s.ban(k, BanLength::Exactly(Duration::from_secs(5)), true)
            .await
            .unwrap();
        s.penalise(k, Duration::from_secs(5), true).await.unwrap();
        s.eject(k, true).await.unwrap();
        s.lift_ejection(k).await.unwrap();
        let kinds: Vec<_> = (0..4).map(|_| feed.try_recv().unwrap()).collect();
        assert!(matches!(kinds[0].kind, ChangeKind::Banned(_)));
        assert!(matches!(kinds[1].kind, ChangeKind::Penalised(_)));
        assert!(matches!(kinds[2].kind, ChangeKind::Ejected(_)));
        assert_eq!(kinds[3].kind, ChangeKind::Lifted);
        assert!(
            kinds
                .iter()
                .all(|c| &*c.proxy == k.proxy && &*c.exchange == "binance")
        );
        assert!(!format!("{kinds:?}").contains("pw"));
        assert!(!format!("{s:?}").contains("pw"));
    }
}
