//! Candidate sets and the choice among them.
//!
//! **Where candidates come from**, per (exchange, connection type, region):
//! - without delegation, the embedded entry's members ([`EmbeddedCandidates`], resolved in the same
//!   order as [`proxy_broker_core::EmbeddedResolver`]: the exchange's entry, else the default's,
//!   else direct; region plays no part). A plain `url` entry is a set of one;
//! - with delegation, every distinct upstream answer still within its TTL ([`UpstreamCandidates`]),
//!   at most `max_candidates_per_key` (expired ones go first, then the oldest), in a bounded number
//!   of keys.
//!
//! **How one is chosen** ([`choose`]): the store's snapshot of each candidate decides its tier —
//! banned or ejected for the exchange, or without budget headroom: not eligible; penalised:
//! eligible only when `allow_penalised` (the caller allows it once nothing unpenalised can be had);
//! otherwise eligible. The eligible ones are ordered by the sticky key (rendezvous hashing) or the
//! pool strategy (`round_robin` from a rotating cursor, `random` by weight, `least_connections` by
//! live leases), and tried in that order with [`Store::try_attempt`] — one atomic check-and-count —
//! until one is admitted. A candidate whose window filled since the snapshot (another broker task
//! got there first) is skipped, so the budget holds however many tasks choose at once.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proxy_broker_core::redact::redact_url;
use proxy_broker_core::{ConnectionProxies, ConnectionType, ProxyConfig, ProxySettings, Strategy};
use rand::Rng;
use tokio::time::Instant;

use super::lease::{lease_end, random_lease};
use super::settings::Budget;
use super::sticky;
use super::store::{Attempt, HandOut, ProxyState, StateKey, Store, StoreError};

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

/// How the eligible candidates are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order<'a> {
    /// A plain `url` entry (one candidate).
    Static,
    /// A pool strategy (upstream sets use `round_robin`).
    Strategy(Strategy),
    /// Rendezvous hashing on this key.
    Sticky(&'a str),
}

/// What [`choose`] needs.
#[derive(Debug)]
pub struct Choose<'a, P> {
    /// The exchange, lower-case.
    pub exchange: &'a str,
    /// The connection type the attempt counts under.
    pub connection_type: ConnectionType,
    /// The candidates.
    pub members: &'a [Candidate<P>],
    /// How to order the eligible ones.
    pub order: Order<'a>,
    /// The round-robin cursor of this set.
    pub cursor: &'a AtomicUsize,
    /// The budget in force (`None`: unlimited).
    pub budget: Option<Budget>,
    /// Lease TTL for candidates without an expiry (embedded ones).
    pub ttl: Duration,
    /// Lease jitter, a fraction 0..=1.
    pub jitter: f64,
    /// Whether penalised candidates may be picked.
    pub allow_penalised: bool,
    /// Now, on the broker's clock.
    pub now: Instant,
}

/// A hand-out.
#[derive(Clone)]
pub struct Picked<P> {
    /// The proxy URL (may hold a password).
    pub url: Arc<str>,
    /// The candidate's payload.
    pub payload: P,
    /// When the feed's lease ends: now + TTL × (1 − U(0, jitter)).
    pub lease_expires_at: Instant,
    /// When the candidate itself expires (upstream answers), for the answer's `ttl_seconds`.
    pub expires_at: Option<Instant>,
    /// Attempts in the window after this one (0 when unlimited).
    pub used: u32,
    /// The budget counted against.
    pub budget: Option<Budget>,
    /// Whether the proxy is penalised for the exchange (picked as a last resort).
    pub penalised: bool,
    /// Whether a sticky key chose it.
    pub sticky: bool,
}

impl<P> fmt::Debug for Picked<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picked")
            .field("url", &redact_url(&self.url))
            .field("lease_expires_at", &self.lease_expires_at)
            .field("used", &self.used)
            .field("budget", &self.budget)
            .field("penalised", &self.penalised)
            .field("sticky", &self.sticky)
            .finish_non_exhaustive()
    }
}

/// Why nothing was picked, and what would help.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Shortfall {
    /// Every candidate not picked (for `metadata.exclude_proxies` when asking upstream).
    pub exclude: Vec<Arc<str>>,
    /// The earliest a candidate becomes usable again (its window frees, or its ban or ejection
    /// ends); `None` when there were no candidates.
    pub retry_after: Option<Duration>,
    /// Candidates whose window was full.
    pub no_headroom: usize,
    /// Candidates banned for the exchange.
    pub banned: usize,
    /// Candidates ejected for the exchange.
    pub ejected: usize,
    /// Candidates penalised for the exchange (not counted as full, banned or ejected).
    pub penalised: usize,
    /// Candidates considered.
    pub total: usize,
}

impl fmt::Debug for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shortfall")
            .field(
                "exclude",
                &self.exclude.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("retry_after", &self.retry_after)
            .field("no_headroom", &self.no_headroom)
            .field("banned", &self.banned)
            .field("ejected", &self.ejected)
            .field("penalised", &self.penalised)
            .field("total", &self.total)
            .finish()
    }
}

/// The outcome of [`choose`].
#[derive(Debug, Clone)]
pub enum Choice<P> {
    /// One was handed out (its attempt is counted).
    Picked(Picked<P>),
    /// None could be.
    Short(Shortfall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Eligible,
    Penalised,
    Out,
}

/// Chooses one of `input.members` and counts its attempt (see the module docs).
pub async fn choose<P: Clone>(store: &dyn Store, input: Choose<'_, P>) -> Result<Choice<P>, StoreError> {
    let Choose {
        exchange,
        connection_type,
        members,
        order,
        cursor,
        budget,
        ttl,
        jitter,
        allow_penalised,
        now,
    } = input;
    let urls: Vec<&str> = members.iter().map(|m| &*m.url).collect();
    let states = store.states(exchange, &urls).await?;
    let clean = ProxyState::default();
    let mut short = Shortfall {
        total: members.len(),
        ..Shortfall::default()
    };
    let mut usable_at: Option<Instant> = None;
    let tiers: Vec<Tier> = (0..members.len())
        .map(|i| {
            // A store answering with fewer states than asked counts the rest as clean slates.
            let st = states.get(i).and_then(Option::as_ref).unwrap_or(&clean);
            let window = st.window(connection_type);
            let full = match (budget, window) {
                (Some(b), Some(w)) => !w.has_headroom(b),
                (Some(b), None) => b.attempts == 0,
                (None, _) => false,
            };
            let mut at: Option<Instant> = None;
            let mut later = |t: Option<Instant>| {
                if let Some(t) = t {
                    at = Some(at.map_or(t, |a| a.max(t)));
                }
            };
            let banned = st.banned_until.is_some_and(|t| t > now);
            let ejected = st.ejected_until.is_some_and(|t| t > now);
            if banned {
                later(st.banned_until);
            }
            if ejected {
                later(st.ejected_until);
            }
            if full {
                later(
                    window
                        .and_then(|w| w.frees_at)
                        .or_else(|| budget.map(|b| now + b.per)),
                );
            }
            if let Some(at) = at {
                usable_at = Some(usable_at.map_or(at, |u| u.min(at)));
            }
            if banned {
                short.banned += 1;
                Tier::Out
            } else if ejected {
                short.ejected += 1;
                Tier::Out
            } else if full {
                short.no_headroom += 1;
                Tier::Out
            } else if st.penalised_until.is_some_and(|t| t > now) {
                short.penalised += 1;
                Tier::Penalised
            } else {
                Tier::Eligible
            }
        })
        .collect();
    let ranked = rank(members, order, cursor, &states);
    let mut tried = vec![false; members.len()];
    let passes: &[Tier] = if allow_penalised {
        &[Tier::Eligible, Tier::Penalised]
    } else {
        &[Tier::Eligible]
    };
    for &pass in passes {
        for &i in &ranked {
            if tiers[i] != pass || tried[i] {
                continue;
            }
            tried[i] = true;
            let member = &members[i];
            let lease_ttl = member
                .expires_at
                .map_or(ttl, |e| e.saturating_duration_since(now))
                .min(MAX_CANDIDATE_TTL);
            let lease = random_lease(lease_ttl, jitter);
            let key = StateKey {
                proxy: &member.url,
                exchange,
            };
            let hand_out = HandOut {
                connection_type,
                budget,
                lease,
            };
            match store.try_attempt(key, hand_out).await? {
                Attempt::Admitted { used, budget } => {
                    return Ok(Choice::Picked(Picked {
                        url: member.url.clone(),
                        payload: member.payload.clone(),
                        lease_expires_at: lease_end(now, lease),
                        expires_at: member.expires_at,
                        used,
                        budget,
                        penalised: pass == Tier::Penalised,
                        sticky: matches!(order, Order::Sticky(_)),
                    }));
                }
                Attempt::Exhausted { retry_after } => {
                    // Filled since the snapshot.
                    short.no_headroom += 1;
                    let at = now + retry_after;
                    usable_at = Some(usable_at.map_or(at, |u| u.min(at)));
                }
            }
        }
    }
    short.exclude = members.iter().map(|m| m.url.clone()).collect();
    short.retry_after = usable_at.map(|t| t.saturating_duration_since(now));
    Ok(Choice::Short(short))
}

/// Indices of `members` in the order `order` prefers them.
fn rank<P>(
    members: &[Candidate<P>],
    order: Order<'_>,
    cursor: &AtomicUsize,
    states: &[Option<ProxyState>],
) -> Vec<usize> {
    let n = members.len();
    if n == 0 {
        return Vec::new();
    }
    match order {
        Order::Static => (0..n).collect(),
        Order::Sticky(key) => {
            let weighted: Vec<(&str, f64)> = members.iter().map(|m| (&*m.url, m.weight)).collect();
            sticky::rank(key, &weighted)
        }
        Order::Strategy(Strategy::RoundRobin) => {
            let start = cursor.fetch_add(1, Ordering::Relaxed) % n;
            (start..n).chain(0..start).collect()
        }
        Order::Strategy(Strategy::Random) => {
            // Efraimidis–Spirakis: sorting by u^(1/w) is a weighted draw without replacement, so the
            // first is picked in proportion to its weight and the rest are its fallbacks.
            let mut rng = rand::rng();
            let mut keyed: Vec<(f64, usize)> = members
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let w = if m.weight.is_finite() && m.weight > 0.0 {
                        m.weight
                    } else {
                        f64::MIN_POSITIVE
                    };
                    (rng.random::<f64>().powf(1.0 / w), i)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            keyed.into_iter().map(|(_, i)| i).collect()
        }
        Order::Strategy(Strategy::LeastConnections) => {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| {
                (
                    states
                        .get(i)
                        .and_then(|s| s.as_ref())
                        .map_or(0, |s| s.live_leases),
                    i,
                )
            });
            order
        }
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
#[derive(Debug, Default)]
pub struct EmbeddedCandidates {
    enabled: bool,
    default: EmbeddedScope,
    exchanges: std::collections::HashMap<String, EmbeddedScope>,
    urls: std::collections::HashSet<Arc<str>>,
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

/// Upstream candidate sets by key: bounded in keys (moka, LRU) and dropped after two idle hours
/// (longer than any candidate lives); candidate expiry itself is decided on the broker's clock.
pub struct UpstreamCandidates<P> {
    sets: moka::sync::Cache<CandidateKey, Arc<UpstreamSet<P>>>,
}

impl<P> fmt::Debug for UpstreamCandidates<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamCandidates")
            .field("keys", &self.sets.entry_count())
            .finish()
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
        Self {
            sets: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(MAX_CANDIDATE_TTL * 2)
                .build(),
        }
    }

    /// The set of `key`, created empty if need be.
    pub fn set(&self, key: &CandidateKey) -> Arc<UpstreamSet<P>> {
        self.sets.get_with_by_ref(key, || Arc::new(UpstreamSet::new()))
    }

    /// The set of `key`, if there is one.
    pub fn get(&self, key: &CandidateKey) -> Option<Arc<UpstreamSet<P>>> {
        self.sets.get(key)
    }

    /// Drops `url` from every set of `exchange` (it is banned there). Returns how many held it.
    pub fn remove_from_exchange(&self, exchange: &str, url: &str) -> usize {
        self.sets
            .iter()
            .filter(|(k, _)| &*k.exchange == exchange)
            .filter(|(_, set)| set.remove(url))
            .count()
    }

    /// Drops every set (upstream settings changed).
    pub fn clear(&self) {
        self.sets.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proxy_broker_core::{PoolConfig, PoolMember};

    use super::*;
    use crate::brokering::memory::MemoryStore;
    use crate::brokering::store::BanLength;
    use crate::clock::SystemClock;

    const WS: ConnectionType = ConnectionType::Websocket;

    fn members(urls: &[&str]) -> Vec<Candidate<usize>> {
        urls.iter()
            .enumerate()
            .map(|(i, u)| Candidate {
                url: Arc::from(*u),
                weight: 1.0,
                expires_at: None,
                payload: i,
            })
            .collect()
    }

    fn store() -> MemoryStore {
        MemoryStore::new(10_000, Arc::new(SystemClock))
    }

    fn input<'a>(
        members: &'a [Candidate<usize>],
        order: Order<'a>,
        cursor: &'a AtomicUsize,
        budget: Option<Budget>,
        allow_penalised: bool,
    ) -> Choose<'a, usize> {
        Choose {
            exchange: "binance",
            connection_type: WS,
            members,
            order,
            cursor,
            budget,
            ttl: Duration::from_secs(300),
            jitter: 0.2,
            allow_penalised,
            now: Instant::now(),
        }
    }

    async fn pick(store: &dyn Store, input: Choose<'_, usize>) -> Option<Arc<str>> {
        match choose(store, input).await.unwrap() {
            Choice::Picked(p) => Some(p.url),
            Choice::Short(_) => None,
        }
    }

    fn key<'a>(proxy: &'a str) -> StateKey<'a> {
        StateKey {
            proxy,
            exchange: "binance",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_rotates_and_skips_the_ineligible() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1"]);
        let cursor = AtomicUsize::new(0);
        s.ban(
            key("http://b:1"),
            BanLength::Exactly(Duration::from_secs(60)),
            true,
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(
                pick(
                    &s,
                    input(&m, Order::Strategy(Strategy::RoundRobin), &cursor, None, true),
                )
                .await
                .unwrap(),
            );
        }
        let got: Vec<&str> = got.iter().map(|u| &**u).collect();
        assert_eq!(got, ["http://a:1", "http://c:1", "http://c:1", "http://a:1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn penalised_candidates_are_a_last_resort() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1"]);
        let cursor = AtomicUsize::new(0);
        let budget = Some(Budget::new(1, 60));
        s.penalise(key("http://a:1"), Duration::from_secs(30), true)
            .await
            .unwrap();
        let rr = Order::Strategy(Strategy::RoundRobin);
        assert_eq!(
            pick(&s, input(&m, rr, &cursor, budget, true)).await.as_deref(),
            Some("http://b:1")
        );
        // b is full now; a is penalised: not without permission, then yes.
        let Choice::Short(short) = choose(&s, input(&m, rr, &cursor, budget, false)).await.unwrap() else {
            panic!("picked a penalised proxy without permission");
        };
        assert_eq!((short.penalised, short.no_headroom, short.total), (1, 1, 2));
        assert_eq!(short.exclude.len(), 2);
        let Choice::Picked(p) = choose(&s, input(&m, rr, &cursor, budget, true)).await.unwrap() else {
            panic!("the penalised proxy had headroom");
        };
        assert!(p.penalised && &*p.url == "http://a:1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shortfall_says_when_the_earliest_candidate_is_usable_again() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1"]);
        let cursor = AtomicUsize::new(0);
        let budget = Some(Budget::new(1, 60));
        let rr = Order::Strategy(Strategy::RoundRobin);
        pick(&s, input(&m, rr, &cursor, budget, true)).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        pick(&s, input(&m, rr, &cursor, budget, true)).await.unwrap();
        s.eject(key("http://c:1"), true).await.unwrap();
        let Choice::Short(short) = choose(&s, input(&m, rr, &cursor, budget, true)).await.unwrap() else {
            panic!("over budget");
        };
        assert_eq!((short.no_headroom, short.ejected, short.banned), (2, 1, 0));
        // a frees at 60 s (50 s from now), c's ejection ends in 30 s.
        assert_eq!(short.retry_after, Some(Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn least_connections_prefers_the_fewest_live_leases() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1"]);
        let cursor = AtomicUsize::new(0);
        let lc = Order::Strategy(Strategy::LeastConnections);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..9 {
            let url = pick(&s, input(&m, lc, &cursor, None, true)).await.unwrap();
            *counts.entry(url.to_string()).or_default() += 1;
        }
        assert!(counts.values().all(|&n| n == 3), "{counts:?}");
        s.release(key("http://b:1")).await.unwrap();
        assert_eq!(
            pick(&s, input(&m, lc, &cursor, None, true)).await.as_deref(),
            Some("http://b:1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn random_follows_the_weights() {
        let s = store();
        let mut m = members(&["http://a:1", "http://b:1"]);
        m[1].weight = 4.0;
        let cursor = AtomicUsize::new(0);
        let mut b = 0;
        for _ in 0..2000 {
            b += usize::from(
                pick(
                    &s,
                    input(&m, Order::Strategy(Strategy::Random), &cursor, None, true),
                )
                .await
                .as_deref()
                    == Some("http://b:1"),
            );
        }
        // Expected 1600 (80 %); 5 standard deviations is ±90.
        assert!((1500..=1700).contains(&b), "{b} of 2000");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sticky_key_keeps_its_proxy_while_eligible_then_moves_and_comes_back() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1", "http://d:1"]);
        let cursor = AtomicUsize::new(0);
        let first = pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
            .await
            .unwrap();
        for _ in 0..5 {
            assert_eq!(
                pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
                    .await
                    .unwrap(),
                first
            );
        }
        s.ban(key(&first), BanLength::Exactly(Duration::from_secs(10)), true)
            .await
            .unwrap();
        let moved = pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
            .await
            .unwrap();
        assert_ne!(moved, first);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
                .await
                .unwrap(),
            first
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_choices_never_hand_out_over_budget() {
        let s: Arc<dyn Store> = Arc::new(store());
        let m: Arc<Vec<Candidate<usize>>> = Arc::new(members(&["http://a:1", "http://b:1", "http://c:1"]));
        let cursor = Arc::new(AtomicUsize::new(0));
        let budget = Some(Budget::new(7, 300));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (s, m, cursor) = (s.clone(), m.clone(), cursor.clone());
                tokio::spawn(async move {
                    let input = Choose {
                        exchange: "binance",
                        connection_type: WS,
                        members: &m,
                        order: Order::Strategy(Strategy::RoundRobin),
                        cursor: &cursor,
                        budget,
                        ttl: Duration::from_secs(300),
                        jitter: 0.2,
                        allow_penalised: true,
                        now: Instant::now(),
                    };
                    match choose(&*s, input).await.unwrap() {
                        Choice::Picked(p) => Some(p.url.to_string()),
                        Choice::Short(_) => None,
                    }
                })
            })
            .collect();
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut short = 0;
        for t in tasks {
            match t.await.unwrap() {
                Some(url) => *counts.entry(url).or_default() += 1,
                None => short += 1,
            }
        }
        assert_eq!(counts.values().sum::<usize>(), 21);
        assert!(counts.values().all(|&n| n == 7), "{counts:?}");
        assert_eq!(short, 79);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_are_jittered_below_the_candidates_ttl() {
        let s = store();
        let now = Instant::now();
        let mut m = members(&["http://a:1"]);
        m[0].expires_at = Some(now + Duration::from_secs(100));
        let cursor = AtomicUsize::new(0);
        for _ in 0..50 {
            let Choice::Picked(p) = choose(&s, input(&m, Order::Static, &cursor, None, true))
                .await
                .unwrap()
            else {
                panic!("unlimited");
            };
            let lease = p.lease_expires_at - now;
            assert!(
                lease <= Duration::from_secs(100) && lease >= Duration::from_secs(80),
                "{lease:?}"
            );
        }
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
        let short = Shortfall {
            exclude: vec![c.url.clone()],
            ..Default::default()
        };
        let text = format!("{c:?} {short:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
