//! [`ResilientStore`]: what `store.backend: redis` runs. The shared [`RedisStore`], with this
//! replica's own [`MemoryStore`] to carry on when Redis is slow or gone, so that `RequestProxy`
//! never fails because of the store.
//!
//! - **Bounded**: every Redis operation on a caller's path is given `operation_timeout_ms`; one
//!   that fails or takes longer is answered from local state instead. The flight's operations and
//!   the heartbeat, which no caller waits on directly, get at least [`BACKGROUND_MIN_TIMEOUT`]
//!   (see [`background_timeout`]).
//! - **A breaker on the store** ([`crate::breaker`], the upstreams' state machine): after
//!   [`FAILURE_THRESHOLD`] consecutive failures it opens and no call waits on Redis any more; a
//!   background probe `PING`s it (every [`PROBE_INTERVAL`] once the open period has passed, each
//!   open period at most [`MAX_OPEN`]), and the first answer closes it, so the replica rejoins
//!   within a few seconds of Redis's return — without a feed's call paying for the probe.
//! - **While Redis is gone** the local store answers: bans, penalties and ejections this replica
//!   learns, its failure counts and leases; connection-attempt budgets then count **per replica**
//!   (so a fleet of N may hand out up to N × the budget). That is logged once per outage at warn
//!   level (and its end at info), and `proxy_broker_store_up` ([`StoreStatus`]) is 0 meanwhile.
//! - **Local state stays warm while Redis is up**: each admitted hand-out is also counted locally,
//!   and every change on the shared feed (whichever replica made it) is applied locally, so an
//!   outage starts from this replica's own attempts and the fleet's bans, not from nothing.
//! - **On return**, the bans and penalties this replica applied while Redis was gone are replayed
//!   to it (with their remaining time), so the rest of the fleet learns them; the local windows
//!   are not merged (Redis's windows go on from what it had).
//! - The change and flight feeds carry the shared feed, plus what this replica changed locally
//!   when Redis did not take it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::memory::{CHANGE_FEED_CAPACITY, DEFAULT_MAX_ENTRIES};
use super::redis::RedisStore;
use super::{
    Attempt, BanLength, Change, ChangeKind, HandOut, MemoryStore, OutageReport, OutageStatus, Page,
    ProxyState, StateKey, Store, StoreError,
};
use crate::breaker::{Breaker, Kind, Policy};
use crate::brokering::settings::OutageSettings;
use crate::clock::Clock;

/// Consecutive failed (or timed-out) operations that open the store's breaker.
pub const FAILURE_THRESHOLD: u32 = 3;
/// The breaker's first open period (doubling while probes fail, up to [`MAX_OPEN`]).
pub const FIRST_OPEN: Duration = Duration::from_millis(500);
/// The breaker's longest open period.
pub const MAX_OPEN: Duration = Duration::from_secs(2);
/// How often the background probe checks whether it may `PING`.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The longest a probe `PING` may take (a reconnect included).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bans and penalties remembered for replay after an outage (the oldest are dropped).
pub const MAX_JOURNAL: usize = 10_000;
/// The shortest bound of an operation no caller waits on directly (see [`background_timeout`]).
pub const BACKGROUND_MIN_TIMEOUT: Duration = Duration::from_millis(250);

/// The bound of the flight's operations (the lock, shared answers and candidates) and of the
/// heartbeat: `operation_timeout_ms`, but at least [`BACKGROUND_MIN_TIMEOUT`]. They run on the
/// lookup's own task (each caller waits for it with its own deadline, and falls back by the usual
/// rules when that passes), so a slower answer costs no caller more than its deadline; a timeout
/// there, though, makes the replica ask upstream on its own. A storm on 2 shared cores delays
/// Redis's answers on the broker's side past 50 ms (the store's breaker opened and 115–200
/// upstream calls were made for 100 keys over 2 replicas), while 250 ms held it at exactly 100:
/// BENCHMARKS.md, "Fleet mode".
pub fn background_timeout(operation_timeout: Duration) -> Duration {
    operation_timeout.max(BACKGROUND_MIN_TIMEOUT)
}

/// Whether the shared store is in use (`proxy_broker_store_up`): cheap to clone and read.
#[derive(Debug, Clone)]
pub struct StoreStatus(Arc<AtomicBool>);

impl StoreStatus {
    /// A status that says up (the memory backend's: there is nothing to lose).
    pub fn up() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    /// Whether the shared store is reachable (1) or the replica runs on local state (0).
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The gauge's value: 1 up, 0 down.
    pub fn gauge_value(&self) -> i64 {
        i64::from(self.is_up())
    }
}

/// A ban or penalty applied locally while Redis was gone, for replay.
#[derive(Debug, Clone)]
struct Journaled {
    proxy: Arc<str>,
    exchange: Arc<str>,
    penalty: bool,
    until: Instant,
}

/// The resilient fleet store. See the module docs. Dropping it stops its tasks.
pub struct ResilientStore {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    remote: Arc<RedisStore>,
    local: Arc<MemoryStore>,
    breaker: Breaker,
    timeout: Duration,
    clock: Arc<dyn Clock>,
    status: StoreStatus,
    last_error: Mutex<String>,
    journal: Mutex<VecDeque<Journaled>>,
    changes: broadcast::Sender<Change>,
    flights: broadcast::Sender<Arc<str>>,
}

impl fmt::Debug for ResilientStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientStore")
            .field("remote", &self.shared.remote)
            .field("local", &self.shared.local)
            .field("timeout", &self.shared.timeout)
            .field("up", &self.shared.status.is_up())
            .finish()
    }
}

impl Drop for ResilientStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a bounded remote call came to.
enum Outcome<T> {
    /// Redis answered.
    Done(T),
    /// Redis refused the request itself (a bad page token): the caller's error, not an outage.
    Refused(StoreError),
    /// Redis failed, was too slow or is skipped: answer locally.
    Local,
}

impl ResilientStore {
    /// Wraps `remote`, bounding each operation by `timeout`, with a local store on `clock`. Must
    /// run inside a Tokio runtime (it starts its probe and feed tasks).
    pub fn new(remote: RedisStore, timeout: Duration, clock: Arc<dyn Clock>) -> Self {
        let policy = Policy {
            failure_threshold: FAILURE_THRESHOLD,
            open: FIRST_OPEN,
            max_open: MAX_OPEN,
            probe_timeout: PROBE_TIMEOUT * 2,
        };
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let (flights, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let shared = Arc::new(Shared {
            remote: Arc::new(remote),
            local: Arc::new(MemoryStore::new(DEFAULT_MAX_ENTRIES, clock.clone())),
            breaker: Breaker::new(Some(policy), clock.clone()),
            timeout,
            clock,
            status: StoreStatus::up(),
            last_error: Mutex::new(String::new()),
            journal: Mutex::new(VecDeque::new()),
            changes,
            flights,
        });
        let tasks = vec![
            tokio::spawn(probe_loop(shared.clone())),
            tokio::spawn(remote_changes(shared.clone(), shared.remote.subscribe())),
            tokio::spawn(remote_flights(shared.clone(), shared.remote.flights())),
        ];
        Self { shared, tasks }
    }

    /// The `proxy_broker_store_up` handle.
    pub fn status(&self) -> StoreStatus {
        self.shared.status.clone()
    }

    /// The shared store inside (tests move its clock).
    #[cfg(test)]
    pub(crate) fn remote(&self) -> &RedisStore {
        &self.shared.remote
    }

    /// The replica's local store (tests and admin: what it would serve during an outage).
    pub fn local(&self) -> &MemoryStore {
        &self.shared.local
    }
}

impl Shared {
    /// Runs `op` on Redis unless the breaker is open, bounded by the operation timeout.
    async fn remote<T>(self: &Arc<Self>, op: impl Future<Output = Result<T, StoreError>>) -> Outcome<T> {
        self.remote_within(self.timeout, op).await
    }

    /// As [`Shared::remote`], for an operation no caller waits on directly (a lookup's flight,
    /// which runs on its own task while each caller keeps its own deadline, and the heartbeat):
    /// bounded by [`background_timeout`].
    async fn remote_background<T>(
        self: &Arc<Self>,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Outcome<T> {
        self.remote_within(background_timeout(self.timeout), op).await
    }

    async fn remote_within<T>(
        self: &Arc<Self>,
        timeout: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Outcome<T> {
        let Some(permit) = self.breaker.try_acquire() else {
            return Outcome::Local;
        };
        match tokio::time::timeout(timeout, op).await {
            Ok(Ok(v)) => {
                permit.success();
                self.observe();
                Outcome::Done(v)
            }
            Ok(Err(e @ StoreError::BadPageToken(_))) => {
                permit.success();
                Outcome::Refused(e)
            }
            Ok(Err(e)) => {
                permit.failure();
                self.failed(&e.to_string());
                Outcome::Local
            }
            Err(_) => {
                permit.failure();
                self.failed(&format!("no answer within {} ms", timeout.as_millis()));
                Outcome::Local
            }
        }
    }

    fn failed(self: &Arc<Self>, error: &str) {
        error.clone_into(&mut self.last_error.lock().unwrap_or_else(|e| e.into_inner()));
        self.observe();
    }

    /// Turns the breaker's state into the status, logging each edge once; on return, replays
    /// the outage's journal.
    fn observe(self: &Arc<Self>) {
        let up = self.breaker.snapshot().kind == Kind::Closed;
        let was = self.status.0.swap(up, Ordering::Relaxed);
        if was && !up {
            let error = self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
            tracing::warn!(
                %error,
                "brokering state store (Redis) unreachable: this replica now serves from its local \
                 state, and connection-attempt budgets count per replica until it returns"
            );
        } else if !was && up {
            tracing::info!(
                "brokering state store (Redis) reachable again: state is shared across replicas again"
            );
            let shared = self.clone();
            tokio::spawn(async move { shared.replay().await });
        }
    }

    /// A change made locally (Redis did not take it): on this replica's feed only.
    fn publish(&self, key: StateKey<'_>, kind: ChangeKind) {
        let _ = self.changes.send(Change {
            proxy: Arc::from(key.proxy),
            exchange: Arc::from(key.exchange),
            kind,
        });
    }

    fn journal(&self, key: StateKey<'_>, penalty: bool, until: Instant) {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if journal.len() >= MAX_JOURNAL {
            journal.pop_front();
        }
        journal.push_back(Journaled {
            proxy: Arc::from(key.proxy),
            exchange: Arc::from(key.exchange),
            penalty,
            until,
        });
    }

    /// Sends what was banned or penalised locally during the outage to Redis.
    async fn replay(&self) {
        let entries: Vec<Journaled> = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for j in entries {
            let left = j.until.saturating_duration_since(self.clock.now());
            if left.is_zero() {
                continue;
            }
            let key = StateKey {
                proxy: &j.proxy,
                exchange: &j.exchange,
            };
            let done = if j.penalty {
                tokio::time::timeout(self.timeout, self.remote.penalise(key, left, true)).await
            } else {
                tokio::time::timeout(self.timeout, self.remote.ban(key, BanLength::Exactly(left), true)).await
            };
            if !matches!(done, Ok(Ok(_))) {
                // Down again: keep it for the next return.
                self.journal(key, j.penalty, j.until);
            }
        }
    }

    /// Applies a change seen on the shared feed to the local store.
    async fn mirror(&self, change: &Change) {
        let key = StateKey {
            proxy: &change.proxy,
            exchange: &change.exchange,
        };
        let now = self.clock.now();
        // The local store never fails; its results are not needed.
        let _ = match change.kind {
            ChangeKind::Banned(until) => self
                .local
                .ban(
                    key,
                    BanLength::Exactly(until.saturating_duration_since(now)),
                    true,
                )
                .await
                .map(drop),
            ChangeKind::Penalised(until) => self
                .local
                .penalise(key, until.saturating_duration_since(now), true)
                .await
                .map(drop),
            ChangeKind::Ejected(_) => self.local.eject(key, true).await.map(drop),
            ChangeKind::Lifted => self.local.lift_ejection(key).await.map(drop),
        };
    }
}

/// Connects at start; then `PING`s Redis every [`PROBE_INTERVAL`]: while the breaker is closed as
/// a heartbeat (failures count towards opening it), else, once its open period has passed, as the
/// breaker's probe.
async fn probe_loop(shared: Arc<Shared>) {
    // Connections are made lazily: make this one now, before the first feed's call would pay
    // for it (and likely time out).
    let _ = tokio::time::timeout(PROBE_TIMEOUT, shared.remote.ping()).await;
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.breaker.snapshot().kind == Kind::Closed {
            // A heartbeat: a replica whose calls need no Redis (hits without a budget are served
            // locally) must still notice an outage, for `proxy_broker_store_up` and its log line.
            let _ = shared.remote_background(shared.remote.ping()).await;
            continue;
        }
        let Some(permit) = shared.breaker.try_acquire() else {
            continue;
        };
        match tokio::time::timeout(PROBE_TIMEOUT, shared.remote.ping()).await {
            Ok(Ok(())) => {
                permit.success();
                shared.observe();
            }
            Ok(Err(e)) => {
                permit.failure();
                shared.failed(&e.to_string());
            }
            Err(_) => {
                permit.failure();
                shared.failed("PING unanswered");
            }
        }
    }
}

/// The shared feed: forwarded, and mirrored into the local store.
async fn remote_changes(shared: Arc<Shared>, mut feed: broadcast::Receiver<Change>) {
    loop {
        match feed.recv().await {
            Ok(change) => {
                let _ = shared.changes.send(change.clone());
                shared.mirror(&change).await;
            }
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        }
    }
}

/// The shared flight feed, forwarded.
async fn remote_flights(shared: Arc<Shared>, mut feed: broadcast::Receiver<Arc<str>>) {
    loop {
        match feed.recv().await {
            Ok(key) => {
                let _ = shared.flights.send(key);
            }
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        }
    }
}

#[tonic::async_trait]
impl Store for ResilientStore {
    async fn try_attempt(&self, key: StateKey<'_>, hand_out: HandOut) -> Result<Attempt, StoreError> {
        let s = &self.shared;
        if hand_out.budget.is_none() {
            // Nothing to check fleet-wide: the hand-out and its lease are this replica's (as in an
            // outage), so a cache hit for an exchange without a budget costs no Redis round-trip.
            return s.local.try_attempt(key, hand_out).await;
        }
        match s.remote(s.remote.try_attempt(key, hand_out)).await {
            Outcome::Done(attempt) => {
                if matches!(attempt, Attempt::Admitted { .. }) {
                    // This replica's share, for an outage; its own answer is Redis's.
                    let _ = s.local.try_attempt(key, hand_out).await;
                }
                Ok(attempt)
            }
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.try_attempt(key, hand_out).await,
        }
    }

    async fn states(&self, exchange: &str, proxies: &[&str]) -> Result<Vec<Option<ProxyState>>, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.states(exchange, proxies)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.states(exchange, proxies).await,
        }
    }

    /// From the local mirror: it holds this replica's own state plus every ban, penalty and
    /// ejection the fleet published (the change feed is mirrored into it), so choosing among
    /// candidates costs no Redis round-trip. Its window counts are this replica's share only;
    /// the fleet-wide check is [`Store::try_attempt`]'s script, which refuses a hand-out over
    /// budget whatever this snapshot said (the engine then tries the next candidate).
    async fn choice_states(
        &self,
        exchange: &str,
        proxies: &[&str],
    ) -> Result<Vec<Option<ProxyState>>, StoreError> {
        self.shared.local.states(exchange, proxies).await
    }

    fn choice_states_now(&self, exchange: &str, proxies: &[&str]) -> Option<Vec<Option<ProxyState>>> {
        Some(self.shared.local.states_now(exchange, proxies))
    }

    fn choice_state_now(&self, exchange: &str, proxy: &str) -> Option<Option<ProxyState>> {
        Some(self.shared.local.state_now(exchange, proxy))
    }

    async fn ban(
        &self,
        key: StateKey<'_>,
        length: BanLength,
        create: bool,
    ) -> Result<Option<Instant>, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.ban(key, length, create)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => {
                let until = s.local.ban(key, length, create).await?;
                if let Some(t) = until {
                    s.journal(key, false, t);
                    s.publish(key, ChangeKind::Banned(t));
                }
                Ok(until)
            }
        }
    }

    async fn penalise(
        &self,
        key: StateKey<'_>,
        length: Duration,
        create: bool,
    ) -> Result<Option<Instant>, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.penalise(key, length, create)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => {
                let until = s.local.penalise(key, length, create).await?;
                if let Some(t) = until {
                    s.journal(key, true, t);
                    s.publish(key, ChangeKind::Penalised(t));
                }
                Ok(until)
            }
        }
    }

    async fn record_failure(&self, key: StateKey<'_>, create: bool) -> Result<Option<u32>, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.record_failure(key, create)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.record_failure(key, create).await,
        }
    }

    async fn record_success(&self, key: StateKey<'_>) -> Result<(), StoreError> {
        let s = &self.shared;
        // Both: a success also ends the local count, which an outage would start from.
        let _ = s.local.record_success(key).await;
        match s.remote(s.remote.record_success(key)).await {
            Outcome::Done(()) | Outcome::Local => Ok(()),
            Outcome::Refused(e) => Err(e),
        }
    }

    async fn eject(&self, key: StateKey<'_>, create: bool) -> Result<Option<Instant>, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.eject(key, create)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => {
                let until = s.local.eject(key, create).await?;
                if let Some(t) = until {
                    s.publish(key, ChangeKind::Ejected(t));
                }
                Ok(until)
            }
        }
    }

    async fn lift_ejection(&self, key: StateKey<'_>) -> Result<bool, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.lift_ejection(key)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => {
                let lifted = s.local.lift_ejection(key).await?;
                if lifted {
                    s.publish(key, ChangeKind::Lifted);
                }
                Ok(lifted)
            }
        }
    }

    async fn release(&self, key: StateKey<'_>) -> Result<bool, StoreError> {
        let s = &self.shared;
        // Both: the local leases are this replica's share, which an outage would start from.
        let local = s.local.release(key).await?;
        match s.remote(s.remote.release(key)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => Ok(local),
        }
    }

    async fn list(
        &self,
        exchange: Option<&str>,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<Page, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.list(exchange, page_token, page_size)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.list(exchange, page_token, page_size).await,
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }

    async fn put_answer(&self, key: &str, bytes: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let s = &self.shared;
        // Kept locally too: an outage then still has this replica's answers.
        s.local.put_answer(key, bytes, ttl).await?;
        match s.remote_background(s.remote.put_answer(key, bytes, ttl)).await {
            Outcome::Refused(e) => Err(e),
            Outcome::Done(()) | Outcome::Local => Ok(()),
        }
    }

    async fn get_answer(&self, key: &str) -> Result<Option<(Vec<u8>, Duration)>, StoreError> {
        let s = &self.shared;
        match s.remote_background(s.remote.get_answer(key)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.get_answer(key).await,
        }
    }

    async fn add_answer(
        &self,
        key: &str,
        proxy: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let s = &self.shared;
        // Kept locally too, as answers are.
        s.local.add_answer(key, proxy, bytes, ttl).await?;
        match s
            .remote_background(s.remote.add_answer(key, proxy, bytes, ttl))
            .await
        {
            Outcome::Refused(e) => Err(e),
            Outcome::Done(()) | Outcome::Local => Ok(()),
        }
    }

    async fn get_answers(&self, key: &str) -> Result<Vec<(Vec<u8>, Duration)>, StoreError> {
        let s = &self.shared;
        match s.remote_background(s.remote.get_answers(key)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.get_answers(key).await,
        }
    }

    async fn lead_flight(&self, key: &str, lock_ttl: Duration) -> Result<bool, StoreError> {
        let s = &self.shared;
        match s.remote_background(s.remote.lead_flight(key, lock_ttl)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.lead_flight(key, lock_ttl).await,
        }
    }

    async fn end_flight(&self, key: &str) -> Result<(), StoreError> {
        let s = &self.shared;
        match s.remote_background(s.remote.end_flight(key)).await {
            Outcome::Done(()) => Ok(()),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => {
                s.local.end_flight(key).await?;
                let _ = s.flights.send(Arc::from(key));
                Ok(())
            }
        }
    }

    fn flights(&self) -> broadcast::Receiver<Arc<str>> {
        self.shared.flights.subscribe()
    }

    fn shares_answers(&self) -> bool {
        true
    }

    // While Redis is gone, outages are judged from this replica's own reports (as a lone broker
    // would); the fleet's reports count again when it returns.

    async fn outage_report(
        &self,
        exchange: &str,
        proxy: &str,
        failing: bool,
        rule: &OutageSettings,
    ) -> Result<OutageReport, StoreError> {
        let s = &self.shared;
        // Both: the local guard is what an outage of the store starts from.
        let local = s.local.outage_report(exchange, proxy, failing, rule).await?;
        match s
            .remote(s.remote.outage_report(exchange, proxy, failing, rule))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => Ok(local),
        }
    }

    async fn outage_note_ejection(
        &self,
        exchange: &str,
        proxy: &str,
        rule: &OutageSettings,
    ) -> Result<bool, StoreError> {
        let s = &self.shared;
        let local = s.local.outage_note_ejection(exchange, proxy, rule).await?;
        match s
            .remote(s.remote.outage_note_ejection(exchange, proxy, rule))
            .await
        {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => Ok(local),
        }
    }

    async fn outages(
        &self,
        exchange: Option<&str>,
        rule: &OutageSettings,
    ) -> Result<Vec<(Arc<str>, OutageStatus)>, StoreError> {
        let s = &self.shared;
        match s.remote(s.remote.outages(exchange, rule)).await {
            Outcome::Done(v) => Ok(v),
            Outcome::Refused(e) => Err(e),
            Outcome::Local => s.local.outages(exchange, rule).await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;
    use crate::brokering::settings::Budget;
    use crate::clock::ManualClock;
    use crate::store::conformance::{Backend, RedisServer};
    use proxy_broker_core::ConnectionType;

    const OP_TIMEOUT: Duration = Duration::from_millis(50);
    const DEADLINE: Duration = Duration::from_secs(30);

    /// Log lines, captured.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    async fn replica(server: &RedisServer, prefix: &str, clock: &Arc<ManualClock>) -> ResilientStore {
        let remote = Backend::redis_store(server, prefix, clock.clone()).await;
        let store = ResilientStore::new(remote, OP_TIMEOUT, clock.clone());
        let deadline = std::time::Instant::now() + DEADLINE;
        while !store.remote().is_subscribed() {
            assert!(
                std::time::Instant::now() < deadline,
                "the change feed never connected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store
    }

    fn k(i: usize) -> String {
        format!("http://u:pw@p{}:1", i % 20)
    }

    /// One round of a feed's calls: a hand-out, a state read, a failure report. Every one must
    /// answer, whatever Redis is doing.
    async fn round(store: &ResilientStore, i: usize) {
        let proxy = k(i);
        let key = StateKey {
            proxy: &proxy,
            exchange: "binance",
        };
        let hand_out = HandOut {
            connection_type: ConnectionType::Websocket,
            budget: Some(Budget::new(100_000, 300)),
            lease: Duration::from_secs(60),
        };
        assert!(matches!(
            store.try_attempt(key, hand_out).await,
            Ok(Attempt::Admitted { .. })
        ));
        store.states("binance", &[&proxy]).await.unwrap();
        store.record_failure(key, false).await.unwrap();
    }

    async fn until(
        what: &str,
        stores: &[&ResilientStore],
        mut done: impl FnMut() -> bool,
    ) -> (usize, Duration) {
        let start = std::time::Instant::now();
        let mut i = 0;
        while !done() {
            assert!(start.elapsed() < DEADLINE, "{what}: not within {DEADLINE:?}");
            for s in stores {
                round(s, i).await;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (i, start.elapsed())
    }

    #[tokio::test]
    async fn calls_keep_answering_while_redis_is_killed_and_replicas_rejoin_when_it_returns() {
        let logs = Logs::default();
        let sink = logs.clone();
        let _log = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || sink.clone())
                .with_ansi(false)
                .finish(),
        );
        let mut server = RedisServer::start();
        let clock = Arc::new(ManualClock::new());
        let a = replica(&server, "fleet:", &clock).await;
        let b = replica(&server, "fleet:", &clock).await;
        let (sa, sb) = (a.status(), b.status());

        for i in 0..200 {
            round(&a, i).await;
            round(&b, i).await;
        }
        assert!(sa.is_up() && sb.is_up());

        server.kill();
        until("both replicas see the store down", &[&a, &b], || {
            !sa.is_up() && !sb.is_up()
        })
        .await;
        for i in 0..200 {
            round(&a, i).await;
            round(&b, i).await;
        }
        let outage_ban = StateKey {
            proxy: "http://banned-in-the-outage:1",
            exchange: "okx",
        };
        let local_ban = a
            .ban(outage_ban, BanLength::Exactly(Duration::from_secs(600)), true)
            .await
            .unwrap();
        assert!(
            local_ban.is_some(),
            "a ban still applies (locally) while Redis is gone"
        );

        server.restart();
        let (_, rejoined) = until("both replicas rejoin", &[&a, &b], || sa.is_up() && sb.is_up()).await;
        eprintln!("store_up back to 1 {rejoined:?} after redis-server restarted");

        // Shared again: a ban on one replica holds on the other, and the outage's ban was replayed.
        let after = StateKey {
            proxy: "http://banned-after:1",
            exchange: "okx",
        };
        a.ban(after, BanLength::Exactly(Duration::from_secs(600)), true)
            .await
            .unwrap();
        let start = std::time::Instant::now();
        loop {
            let seen = b.state(after).await.unwrap().and_then(|s| s.banned_until);
            let replayed = b.state(outage_ban).await.unwrap().and_then(|s| s.banned_until);
            if seen.is_some() && replayed.is_some() {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "state not shared again ({seen:?}, {replayed:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let text = logs.text();
        let warnings = text.matches("unreachable").count();
        assert_eq!(
            warnings, 2,
            "one warning per replica per outage, not per call:\n{text}"
        );
        assert!(text.contains("reachable again"), "{text}");
        assert!(!text.contains("pw@"), "a proxy password in the logs:\n{text}");
    }

    #[tokio::test]
    async fn a_stalled_redis_is_not_waited_for_and_budgets_then_count_per_replica() {
        let server = RedisServer::start();
        let clock = Arc::new(ManualClock::new());
        let a = replica(&server, "stall:", &clock).await;
        let b = replica(&server, "stall:", &clock).await;
        let key = StateKey {
            proxy: "http://p:1",
            exchange: "okx",
        };
        let hand_out = HandOut {
            connection_type: ConnectionType::Websocket,
            budget: Some(Budget::new(1, 300)),
            lease: Duration::from_secs(60),
        };
        assert!(matches!(
            b.try_attempt(key, hand_out).await.unwrap(),
            Attempt::Admitted { .. }
        ));
        assert!(
            matches!(
                a.try_attempt(key, hand_out).await.unwrap(),
                Attempt::Exhausted { .. }
            ),
            "the budget is fleet-wide while Redis answers"
        );
        // Stall every client for far longer than the operation timeout.
        let mut admin = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(3_000)
            .arg("ALL")
            .query_async(&mut admin)
            .await
            .unwrap();
        // Redis would refuse (its window is full); an answer now can only be the local one.
        let attempt = a.try_attempt(key, hand_out).await.unwrap();
        assert!(
            matches!(attempt, Attempt::Admitted { used: 1, .. }),
            "answered from this replica's own window: {attempt:?}"
        );
    }
}
