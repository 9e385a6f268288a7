//! The state seam: everything the engine keeps per (proxy, exchange), behind one object-safe
//! trait, so that a fleet of brokers can share it (the next step adds a Redis implementation with
//! the same semantics; [`memory::MemoryStore`] is the in-process one).
//!
//! # Semantics every implementation keeps
//! - **Each operation is one atomic step** on one (proxy, exchange) entry, expressible as one
//!   server-side script: [`Store::try_attempt`] checks the budget *and* counts the attempt, the
//!   hand-out and the lease in one step, so concurrent brokers never admit more than the budget.
//! - **The store owns time.** Operations take durations ("ban for 2 min", "a window of 300 s",
//!   "a lease of 270 s"), never instants, and the store measures them on its own clock: the memory
//!   store on the broker's [`crate::clock::Clock`]; a Redis store on the Redis server's clock
//!   (`TIME` inside its scripts), because replicas' monotonic clocks share no origin and their wall
//!   clocks drift, while a window or a ban shared by replicas must start and end at one instant
//!   for all of them. Results come back as instants of the *caller's* clock (a Redis store
//!   converts the server's "ends in 37 s" into `now + 37 s`).
//! - **Entries are created only by what the broker hands out**: [`Store::try_attempt`] creates
//!   one; feedback operations apply to an existing entry, or create it only when the caller says
//!   the proxy is its own (`create`, e.g. an embedded pool member), since feedback carries any URL
//!   a caller likes. Every entry expires once its windows, bans, penalties, ejections and leases
//!   have passed, and the number of entries is capped.
//! - **Changes are published** ([`Store::subscribe`]) when a proxy is banned, penalised, ejected or
//!   has its ejection lifted for an exchange, by whichever broker saw the feedback (a Redis store:
//!   pub/sub), so watchers can move feeds off it.
//! - Exchange ids arrive lower-cased; proxy URLs as handed out (they may hold a password: never
//!   log them, and a shared store should key by a digest of the URL).
//!
//! # Shared upstream answers and single flight across replicas
//! Fleet mode also shares what the broker's cache and single flight hold, so that a storm spread
//! over the replicas makes one upstream call per key for the whole fleet:
//! - [`Store::put_answer`] / [`Store::get_answer`]: an upstream answer (opaque bytes, e.g. an
//!   encoded `ProxyResponse`) per cache key, with its TTL (at most [`MAX_ANSWER_TTL`]; answers
//!   larger than [`MAX_ANSWER_BYTES`] are not kept). `get_answer` returns the remaining TTL.
//! - [`Store::lead_flight`]: take the key's flight lock (Redis: `SET NX PX`). `true`: this broker
//!   leads and calls upstream; `false`: another broker (or an earlier call) leads. The lock
//!   expires after `lock_ttl`, so a leader that dies frees it.
//! - [`Store::end_flight`]: the leader is done (after `put_answer` on success, or on failure): frees
//!   its lock and announces the key on [`Store::flights`], on every broker.
//! - **A follower** (a call for which `lead_flight` was `false`) subscribes to [`Store::flights`]
//!   *before* calling `lead_flight`, then loops until its own deadline: on a `flights()` message
//!   for its key, or every [`FLIGHT_POLL_INTERVAL`] (a missed message must not strand it), it
//!   calls `get_answer`; an answer ends the wait; none after the flight ended means the leader
//!   failed: it may try `lead_flight` itself or take its usual fallback. Keys are the broker's
//!   cache keys (no secrets); a shared store keys them by digest too.
//!
//! - [`Store::add_answer`] / [`Store::get_answers`]: the key's *shared candidates*, the distinct
//!   upstream answers the fleet holds for a cache key, so that a replica whose own candidates are
//!   exhausted takes one another replica already fetched before it asks upstream again. One
//!   answer per proxy URL, each with its own TTL (at most [`MAX_ANSWER_TTL`]): adding a proxy again
//!   replaces its bytes and restarts its TTL; expired ones are dropped; at most
//!   [`MAX_SHARED_ANSWERS`] answers and [`MAX_SHARED_ANSWERS_BYTES`] per key (the soonest-ending
//!   go first, never the one being added); answers over [`MAX_ANSWER_BYTES`] and a zero TTL are
//!   not kept. `get_answers` lists the live ones, longest-lived first, each with its remaining
//!   TTL. The leader of a flight adds its answer here as well as with `put_answer` (which a
//!   follower, or a replica of an earlier version, reads). A shared store keys the set by a digest
//!   of the cache key and each member by a digest of the proxy URL; the URL is only in the bytes.
//!
//! The memory store implements these locally (bounded, expiring), so a single broker behaves as
//! before: it always leads unless its own earlier call still holds the key.
//!
//! # Exchange outages
//! The outage guard's reports live here too, so that the replicas of a fleet judge an exchange
//! from every replica's reports and agree on when its outage started (see
//! [`crate::brokering::outage`] for the rule). [`Store::outage_report`] records one proxy's latest
//! report for an exchange and settles the exchange in one atomic step: the replica whose report
//! starts the outage gets the ejections to lift ([`Transition::Started`]) and nobody else does.
//! [`Store::outage_note_ejection`] remembers an ejection for that lift (or says the exchange is
//! already in an outage, so the caller lifts it itself). [`Store::outages`] reads every tracked
//! exchange without changing anything. Reports count on the store's clock; every key expires
//! with the window.

pub mod config;
#[cfg(test)]
mod conformance;
pub mod memory;
pub mod redis;
pub mod resilient;
pub mod window;

pub use config::{BuiltStore, StoreConfig, build_store};
pub use memory::MemoryStore;
pub use resilient::StoreStatus;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use proxy_broker_core::ConnectionType;
use proxy_broker_core::redact::redact_url;
use tokio::sync::broadcast;
use tokio::time::Instant;

pub use crate::brokering::outage::{OutageStatus, Transition};
use crate::brokering::settings::{Budget, OutageSettings};

/// Which (proxy, exchange) an operation is about.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateKey<'a> {
    /// The proxy URL as handed out.
    pub proxy: &'a str,
    /// The exchange id, lower-case.
    pub exchange: &'a str,
}

impl fmt::Debug for StateKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateKey")
            .field("proxy", &redact_url(self.proxy))
            .field("exchange", &self.exchange)
            .finish()
    }
}

/// What one hand-out asks of the store.
#[derive(Debug, Clone, Copy)]
pub struct HandOut {
    /// The connection type the attempt is counted under.
    pub connection_type: ConnectionType,
    /// The budget in force; `None`: unlimited (the hand-out and lease are still counted).
    pub budget: Option<Budget>,
    /// How long the lease lives (the jittered TTL).
    pub lease: Duration,
}

/// The result of [`Store::try_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Counted: `used` attempts of `budget` are now in the window (0 when unlimited).
    Admitted {
        /// Attempts in the window, this one included.
        used: u32,
        /// The budget it was counted against.
        budget: Option<Budget>,
    },
    /// Not counted: the window is full.
    Exhausted {
        /// Until the oldest attempt in the window leaves it.
        retry_after: Duration,
    },
}

/// How long a ban lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanLength {
    /// Exactly this long (the exchange's `Retry-After`, or a geo-block's day).
    Exactly(Duration),
    /// `base × 2^(repeats)`, at most `cap`: the store counts the repeats (its "strikes").
    Doubling {
        /// The first ban's length.
        base: Duration,
        /// The longest ban.
        cap: Duration,
    },
}

/// One connection type's window, as of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// The budget the attempts were last counted against.
    pub budget: Budget,
    /// Attempts in the window.
    pub used: u32,
    /// When the oldest attempt in the window leaves it (`None`: the window is empty).
    pub frees_at: Option<Instant>,
}

impl WindowState {
    /// Whether one more attempt fits under `budget` (the budget in force now, which may differ
    /// from the one last counted against).
    pub fn has_headroom(&self, budget: Budget) -> bool {
        self.used < budget.attempts
    }
}

/// A snapshot of one (proxy, exchange) entry. Deadlines in the past are reported as `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyState {
    /// Banned for the exchange until then (418/403/451).
    pub banned_until: Option<Instant>,
    /// Bans so far (the doubling's exponent).
    pub ban_strikes: u32,
    /// Penalised for the exchange until then (429).
    pub penalised_until: Option<Instant>,
    /// Ejected for the exchange until then (consecutive failures).
    pub ejected_until: Option<Instant>,
    /// Ejections so far (the ejection period grows with it).
    pub ejections: u32,
    /// Failure reports since the last success or ejection.
    pub consecutive_failures: u32,
    /// Hand-outs whose lease has not ended.
    pub live_leases: u32,
    /// Hand-outs counted since the entry was created.
    pub hand_outs: u64,
    /// The HTTP window, if an HTTP attempt was counted against a budget.
    pub http: Option<WindowState>,
    /// The WebSocket window, if a WebSocket attempt was counted against a budget.
    pub websocket: Option<WindowState>,
}

/// A proxy's standing for an exchange, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Banned until then.
    Banned(Instant),
    /// Ejected until then.
    Ejected(Instant),
    /// Penalised until then.
    Penalised(Instant),
    /// Usable.
    Ok,
}

impl ProxyState {
    /// The window of one connection type.
    pub fn window(&self, connection_type: ConnectionType) -> Option<&WindowState> {
        match connection_type {
            ConnectionType::Http => self.http.as_ref(),
            ConnectionType::Websocket => self.websocket.as_ref(),
        }
    }

    /// The standing at `now`.
    pub fn standing(&self, now: Instant) -> Standing {
        let live = |t: Option<Instant>| t.filter(|&t| t > now);
        if let Some(t) = live(self.banned_until) {
            Standing::Banned(t)
        } else if let Some(t) = live(self.ejected_until) {
            Standing::Ejected(t)
        } else if let Some(t) = live(self.penalised_until) {
            Standing::Penalised(t)
        } else {
            Standing::Ok
        }
    }
}

/// One row of [`Store::list`].
#[derive(Clone, PartialEq, Eq)]
pub struct Listed {
    /// The proxy URL as handed out (may hold a password: redact before showing it).
    pub proxy: Arc<str>,
    /// The exchange id.
    pub exchange: Arc<str>,
    /// Its state.
    pub state: ProxyState,
}

impl fmt::Debug for Listed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listed")
            .field("proxy", &redact_url(&self.proxy))
            .field("exchange", &self.exchange)
            .field("state", &self.state)
            .finish()
    }
}

/// One page of [`Store::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The rows, ordered by exchange then by an opaque digest of the proxy URL.
    pub entries: Vec<Listed>,
    /// Pass it back for the next page; `None` on the last page. Opaque, and holds no URL.
    pub next_page_token: Option<String>,
}

/// Largest answer [`Store::put_answer`] keeps (larger ones are dropped: the caller still has it).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest TTL of a shared answer or flight lock (longer ones are cut to it).
pub const MAX_ANSWER_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most answers [`Store::add_answer`] keeps per key (the default `max_candidates_per_key`).
pub const MAX_SHARED_ANSWERS: usize = 32;
/// Most bytes of answers [`Store::add_answer`] keeps per key (at least one largest answer).
pub const MAX_SHARED_ANSWERS_BYTES: usize = 4 * MAX_ANSWER_BYTES;
/// How often a follower re-checks [`Store::get_answer`] while it waits for another broker's
/// flight (besides waking on [`Store::flights`]).
pub const FLIGHT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Most rows in one page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Rows in a page when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// What changed for a (proxy, exchange).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Banned until then.
    Banned(Instant),
    /// Penalised until then.
    Penalised(Instant),
    /// Ejected until then.
    Ejected(Instant),
    /// An ejection was lifted (exchange outage).
    Lifted,
}

/// A published change (see [`Store::subscribe`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Change {
    /// The proxy URL (may hold a password).
    pub proxy: Arc<str>,
    /// The exchange id.
    pub exchange: Arc<str>,
    /// What happened.
    pub kind: ChangeKind,
}

impl fmt::Debug for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Change")
            .field("proxy", &redact_url(&self.proxy))
            .field("exchange", &self.exchange)
            .field("kind", &self.kind)
            .finish()
    }
}

/// What [`Store::outage_report`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutageReport {
    /// Whether this report started or ended the exchange's outage.
    pub transition: Transition,
    /// Whether the exchange is in an outage after it.
    pub in_outage: bool,
}

/// Why a store operation failed (the memory store fails only on bad page tokens; a shared store
/// also when it cannot be reached).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The page token is not one this store issued.
    #[error("page_token: {0}")]
    BadPageToken(String),
    /// The store could not be reached or answered nonsense (shared stores).
    #[error("brokering state store unavailable: {0}")]
    Unavailable(String),
}

/// Per-(proxy, exchange) state. See the module docs for the semantics every implementation keeps.
#[tonic::async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// One atomic step: if `hand_out.budget` has room in the window of its connection type, count
    /// one attempt, one hand-out and one lease of `hand_out.lease`; else change nothing. Creates
    /// the entry.
    async fn try_attempt(&self, key: StateKey<'_>, hand_out: HandOut) -> Result<Attempt, StoreError>;

    /// Snapshots of `proxies` for `exchange`, in order (`None`: no entry, i.e. a clean slate).
    async fn states(&self, exchange: &str, proxies: &[&str]) -> Result<Vec<Option<ProxyState>>, StoreError>;

    /// Snapshots for choosing among candidates on the hot path: as [`Store::states`], or a
    /// replica-local view that a shared store keeps current from its change feed (bans,
    /// penalties, ejections) and that may under-count fleet-wide windows, since
    /// [`Store::try_attempt`] checks the budget on its own anyway.
    async fn choice_states(
        &self,
        exchange: &str,
        proxies: &[&str],
    ) -> Result<Vec<Option<ProxyState>>, StoreError> {
        self.states(exchange, proxies).await
    }

    /// [`Store::choice_states`] at once, when this store answers it from memory without waiting
    /// (the in-process store, and the fleet store's local mirror): a choice then polls no boxed
    /// future. `None` (the default): call [`Store::choice_states`].
    fn choice_states_now(&self, _exchange: &str, _proxies: &[&str]) -> Option<Vec<Option<ProxyState>>> {
        None
    }

    /// [`Store::choice_states_now`] of one proxy (the usual candidate set holds one): its state,
    /// or `Some(None)` when it has none. The in-process store answers it without allocating.
    fn choice_state_now(&self, exchange: &str, proxy: &str) -> Option<Option<ProxyState>> {
        self.choice_states_now(exchange, &[proxy])
            .map(|states| states.into_iter().next().flatten())
    }

    /// The snapshot of one (proxy, exchange), `None` when there is no entry.
    async fn state(&self, key: StateKey<'_>) -> Result<Option<ProxyState>, StoreError> {
        Ok(self.states(key.exchange, &[key.proxy]).await?.pop().flatten())
    }

    /// Bans the proxy for the exchange: until the later of the current ban's end and now +
    /// `length` (a doubling length counts one more strike; strikes are forgotten a day after the
    /// last ban ended). Publishes [`ChangeKind::Banned`]. Returns the ban's end, `None` when there
    /// is no entry and `create` is false.
    async fn ban(
        &self,
        key: StateKey<'_>,
        length: BanLength,
        create: bool,
    ) -> Result<Option<Instant>, StoreError>;

    /// Penalises the proxy for the exchange until the later of the current penalty's end and now
    /// + `length`. Publishes [`ChangeKind::Penalised`].
    async fn penalise(
        &self,
        key: StateKey<'_>,
        length: Duration,
        create: bool,
    ) -> Result<Option<Instant>, StoreError>;

    /// Counts one failure report (a count whose last failure is an hour old is forgotten
    /// first). Returns the consecutive count.
    async fn record_failure(&self, key: StateKey<'_>, create: bool) -> Result<Option<u32>, StoreError>;

    /// A success report: the consecutive-failure count restarts. Never creates an entry.
    async fn record_success(&self, key: StateKey<'_>) -> Result<(), StoreError>;

    /// Ejects the proxy for the exchange for `EJECTION_BASE × ejections` (at most `EJECTION_MAX`,
    /// as embedded pools do) and restarts its failure count. Publishes [`ChangeKind::Ejected`].
    async fn eject(&self, key: StateKey<'_>, create: bool) -> Result<Option<Instant>, StoreError>;

    /// Lifts a running ejection (and takes back its strike). Publishes [`ChangeKind::Lifted`].
    /// Returns whether one was running.
    async fn lift_ejection(&self, key: StateKey<'_>) -> Result<bool, StoreError>;

    /// Ends the proxy's soonest-ending live lease. Returns whether one was live.
    async fn release(&self, key: StateKey<'_>) -> Result<bool, StoreError>;

    /// A page of entries, optionally of one exchange; `page_size` 0 means the default, more than
    /// [`MAX_PAGE_SIZE`] is clamped.
    async fn list(
        &self,
        exchange: Option<&str>,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<Page, StoreError>;

    /// The change feed. A receiver that falls behind gets `RecvError::Lagged` and should
    /// re-check the state of whatever it watches.
    fn subscribe(&self) -> broadcast::Receiver<Change>;

    /// Keeps `bytes` as the answer for cache key `key` for `ttl` (at most [`MAX_ANSWER_TTL`]),
    /// replacing any earlier one; answers over [`MAX_ANSWER_BYTES`] and a zero `ttl` are ignored.
    async fn put_answer(&self, key: &str, bytes: &[u8], ttl: Duration) -> Result<(), StoreError>;

    /// The answer kept for `key` and its remaining TTL, `None` when there is none (or it expired).
    async fn get_answer(&self, key: &str) -> Result<Option<(Vec<u8>, Duration)>, StoreError>;

    /// Adds `bytes` as the answer naming `proxy` to the shared candidates of cache key `key`, for
    /// `ttl` (at most [`MAX_ANSWER_TTL`]): re-adding a proxy replaces its bytes and restarts its
    /// TTL; expired answers are dropped, and beyond [`MAX_SHARED_ANSWERS`] or
    /// [`MAX_SHARED_ANSWERS_BYTES`] the soonest-ending ones (never this one). Answers over
    /// [`MAX_ANSWER_BYTES`] and a zero `ttl` are ignored. `proxy` may hold a password: a shared
    /// store keys it by digest.
    async fn add_answer(&self, key: &str, proxy: &str, bytes: &[u8], ttl: Duration)
    -> Result<(), StoreError>;

    /// The live shared candidates of `key` ([`Store::add_answer`]), longest-lived first, each with
    /// its remaining TTL; empty when there are none.
    async fn get_answers(&self, key: &str) -> Result<Vec<(Vec<u8>, Duration)>, StoreError>;

    /// Takes the flight lock of `key` for `lock_ttl` if nobody holds it: `true` = this broker
    /// leads the upstream call for the key. See the module docs for the follower's loop.
    async fn lead_flight(&self, key: &str, lock_ttl: Duration) -> Result<bool, StoreError>;

    /// Ends this broker's flight for `key` (answer stored or call failed): frees the lock if this
    /// broker holds it, and announces `key` on [`Store::flights`] to every broker.
    async fn end_flight(&self, key: &str) -> Result<(), StoreError>;

    /// Keys whose flight ended, on whichever broker led it. A receiver that falls behind gets
    /// `RecvError::Lagged`: its followers should re-check `get_answer`.
    fn flights(&self) -> broadcast::Receiver<Arc<str>>;

    /// Records `proxy`'s latest report for `exchange` (`failing`: a plain failure) and settles
    /// the exchange by `rule`, in one atomic step. See the module docs.
    async fn outage_report(
        &self,
        exchange: &str,
        proxy: &str,
        failing: bool,
        rule: &OutageSettings,
    ) -> Result<OutageReport, StoreError>;

    /// Remembers that `proxy` was ejected for `exchange`, for the lift when an outage starts
    /// within the window. Returns `true` (and remembers nothing) when the exchange is in an
    /// outage already: the caller lifts the ejection itself.
    async fn outage_note_ejection(
        &self,
        exchange: &str,
        proxy: &str,
        rule: &OutageSettings,
    ) -> Result<bool, StoreError>;

    /// The outage state of `exchange` (or of every tracked exchange when `None`, sorted by id, at
    /// most [`crate::brokering::outage::MAX_EXCHANGES`]), as of now. Changes nothing: an
    /// exchange whose reports aged out shows no outage.
    async fn outages(
        &self,
        exchange: Option<&str>,
        rule: &OutageSettings,
    ) -> Result<Vec<(Arc<str>, OutageStatus)>, StoreError>;

    /// Whether other brokers see this store's answers and flights (a shared store). The broker
    /// skips [`Store::put_answer`], [`Store::get_answer`], [`Store::add_answer`],
    /// [`Store::get_answers`] and [`Store::lead_flight`] when not:
    /// its own cache and single flight already do that work in one process, and keeping every
    /// answer twice would double the memory of a large cache.
    fn shares_answers(&self) -> bool {
        false
    }
}
