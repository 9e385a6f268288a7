//! Push migration: the registry of `WatchProxy` streams, and the stream each one reads.
//!
//! A watcher is one `WatchProxy` call. It is told its current assignment at once, then a new one
//! whenever
//! - **its proxy is banned or ejected for its exchange** (a [`Change`] from the store, whichever
//!   feed's feedback caused it; penalties and lifted ejections move nobody),
//! - **its lease ends** (`lease_expires_at`, or `ttl_seconds` when an answer has no lease), or
//! - **a reload changes its answer** (the answer is asked again; it is pushed only if it differs).
//!
//! # Who is woken
//! Watchers are filed under the (exchange, proxy) of their current assignment (direct answers
//! under the proxy `""`). One task reads the store's change feed and wakes only the watchers filed
//! under the changed pair: a ban of one proxy for Binance touches nobody else. Two events concern
//! everyone and are spread out instead: a **reload** wakes every watcher to ask again, and a
//! **lagged** change feed (more than [`crate::store::memory::CHANGE_FEED_CAPACITY`] changes
//! unread) re-checks every filed pair against the store. Both run on a second task, in batches of
//! [`RECHECK_BATCH`] with [`RECHECK_PAUSE`] between them, so neither the registry lock nor the
//! broker sees all watchers at once. A watcher also checks the store right after being filed, so
//! a ban published between its answer and its filing is not missed.
//!
//! # What an idle watcher costs
//! No task and no channel of its own: the stream is a state machine that the server's connection
//! task polls (the re-ask future is boxed only while it runs). What it holds is its request, a
//! slot in the index (a shared `Notify` and a reason word), and a timer for its lease end, plus
//! what HTTP/2 and tonic keep per stream. `BENCHMARKS.md` ("WatchProxy: idle watchers") has the
//! measured bytes per idle watcher with 10,000 open.
//!
//! # Bounds
//! At most [`MAX_WATCHERS`] streams at once (RESOURCE_EXHAUSTED past it, with a retry hint). A
//! watcher leaves the registry when its stream is dropped: the caller cancelled, the connection
//! closed, or HTTP/2 keepalive found the peer gone. The index holds only pairs that some open
//! watcher is filed under.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Status;

use crate::error::Error;
use crate::pb;
use crate::store::{Change, ChangeKind, StateKey, Store};

/// Most `WatchProxy` streams open at once. Each idle one costs a few KiB (see the module docs),
/// so this bounds the registry to a few hundred MiB; a fleet that needs more runs more replicas.
pub const MAX_WATCHERS: usize = 50_000;
/// Watchers woken (or pairs checked) per batch during a reload or a lagged re-check.
pub const RECHECK_BATCH: usize = 256;
/// Pause between two batches: 10,000 watchers are all re-checked within about 0.2 s.
pub const RECHECK_PAUSE: Duration = Duration::from_millis(5);
/// Shortest wait for a lease end, so that an answer with a lease in the past (or a TTL of 0) does
/// not make a watcher ask in a loop.
pub const MIN_LEASE_WAIT: Duration = Duration::from_millis(500);
/// Longest wait for a lease end (longer leases are re-asked after a day).
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Retry hint sent when the registry is full.
const FULL_RETRY: Duration = Duration::from_secs(5);

/// Wake reasons (bits of [`Slot::reasons`]).
const CHANGED: u8 = 1;
/// A reload, or changes that may have been missed: ask again, push only if the answer differs.
const RECHECK: u8 = 2;
/// The broker is shutting down: end the stream.
const CLOSED: u8 = 4;
/// The lease ended (set by the stream itself, never stored).
const LEASE: u8 = 8;

/// Immediate re-asks a watcher makes on its own (its new proxy was already out) before it waits
/// for the next event: the engine never hands out a banned proxy, but an answer source outside
/// it (a stale cached answer) might.
const MAX_SELF_WAKES: u8 = 2;

/// One watcher's doorbell.
#[derive(Debug, Default)]
struct Slot {
    notify: Notify,
    reasons: AtomicU8,
}

impl Slot {
    fn wake(&self, reason: u8) {
        self.reasons.fetch_or(reason, Ordering::AcqRel);
        // Stores a permit when the watcher is busy asking: the wake is not lost.
        self.notify.notify_one();
    }
}

/// Watchers of one (exchange, proxy), by id.
type Filed = HashMap<u64, Arc<Slot>>;

#[derive(Debug, Default)]
struct Index {
    /// exchange (lower-case) → proxy URL as handed out (`""`: direct) → watchers.
    pairs: HashMap<Arc<str>, HashMap<Arc<str>, Filed>>,
    /// Pairs in `pairs`.
    pair_count: usize,
}

impl Index {
    fn file(&mut self, exchange: &str, proxy: &str, id: u64, slot: Arc<Slot>) -> (Arc<str>, Arc<str>) {
        let (exchange_key, proxies) = match self.pairs.get_key_value(exchange) {
            Some((k, _)) => {
                let k = k.clone();
                (k.clone(), self.pairs.get_mut(&*k))
            }
            None => {
                let k: Arc<str> = Arc::from(exchange);
                self.pairs.insert(k.clone(), HashMap::new());
                (k.clone(), self.pairs.get_mut(&*k))
            }
        };
        let Some(proxies) = proxies else {
            // Just inserted or found above; unreachable, but no panic on a request path.
            return (exchange_key, Arc::from(proxy));
        };
        let proxy_key = match proxies.get_key_value(proxy) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = Arc::from(proxy);
                proxies.insert(k.clone(), HashMap::new());
                self.pair_count += 1;
                k
            }
        };
        if let Some(filed) = proxies.get_mut(&*proxy_key) {
            filed.insert(id, slot);
        }
        (exchange_key, proxy_key)
    }

    fn unfile(&mut self, exchange: &str, proxy: &str, id: u64) {
        let Some(proxies) = self.pairs.get_mut(exchange) else {
            return;
        };
        if let Some(filed) = proxies.get_mut(proxy) {
            filed.remove(&id);
            if filed.is_empty() {
                proxies.remove(proxy);
                self.pair_count -= 1;
            }
        }
        if proxies.is_empty() {
            self.pairs.remove(exchange);
        }
    }

    fn slots_of(&self, exchange: &str, proxy: &str) -> Vec<Arc<Slot>> {
        self.pairs
            .get(exchange)
            .and_then(|p| p.get(proxy))
            .map(|f| f.values().cloned().collect())
            .unwrap_or_default()
    }

    fn all_slots(&self) -> Vec<Arc<Slot>> {
        self.pairs
            .values()
            .flat_map(HashMap::values)
            .flat_map(HashMap::values)
            .cloned()
            .collect()
    }

    fn all_pairs(&self) -> Vec<(Arc<str>, Vec<Arc<str>>)> {
        self.pairs
            .iter()
            .map(|(x, p)| (x.clone(), p.keys().filter(|k| !k.is_empty()).cloned().collect()))
            .collect()
    }
}

#[derive(Debug)]
struct Shared {
    index: Mutex<Index>,
    /// Open watchers (registered, not yet dropped).
    open: AtomicUsize,
    cap: usize,
    next_id: AtomicU64,
    /// Watcher wake-ups so far (each woken watcher counts once per event).
    wakes: AtomicU64,
    /// What the re-check task has to do (bits: [`RECHECK_RELOAD`], [`RECHECK_STANDING`]).
    recheck: AtomicU8,
    recheck_bell: Notify,
    closed: std::sync::atomic::AtomicBool,
    store: Option<Arc<dyn Store>>,
}

const RECHECK_RELOAD: u8 = 1;
const RECHECK_STANDING: u8 = 2;

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_pair(&self, exchange: &str, proxy: &str, reason: u8) -> usize {
        let slots = self.index().slots_of(exchange, proxy);
        for slot in &slots {
            slot.wake(reason);
        }
        self.wakes.fetch_add(slots.len() as u64, Ordering::Relaxed);
        slots.len()
    }

    async fn wake_everyone(&self, reason: u8) {
        let slots = self.index().all_slots();
        for (i, batch) in slots.chunks(RECHECK_BATCH).enumerate() {
            if i > 0 {
                tokio::time::sleep(RECHECK_PAUSE).await;
            }
            for slot in batch {
                slot.wake(reason);
            }
            self.wakes.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }

    /// After a lagged change feed: wakes the watchers of every pair that the store says is banned
    /// or ejected now (without a store, every watcher asks again).
    async fn recheck_standing(&self) {
        let Some(store) = &self.store else {
            self.wake_everyone(RECHECK).await;
            return;
        };
        let pairs = self.index().all_pairs();
        let mut batches = 0usize;
        for (exchange, proxies) in pairs {
            for batch in proxies.chunks(RECHECK_BATCH) {
                if batches > 0 {
                    tokio::time::sleep(RECHECK_PAUSE).await;
                }
                batches += 1;
                let urls: Vec<&str> = batch.iter().map(|p| &**p).collect();
                let states = match store.states(&exchange, &urls).await {
                    Ok(states) => states,
                    Err(e) => {
                        tracing::warn!(%exchange, error = %e, "watchers: cannot re-check proxies against the store: asking again");
                        for proxy in batch {
                            self.wake_pair(&exchange, proxy, RECHECK);
                        }
                        continue;
                    }
                };
                for (proxy, state) in batch.iter().zip(states) {
                    if state.is_some_and(|s| s.banned_until.is_some() || s.ejected_until.is_some()) {
                        self.wake_pair(&exchange, proxy, CHANGED);
                    }
                }
            }
        }
    }

    fn ask_recheck(&self, what: u8) {
        self.recheck.fetch_or(what, Ordering::AcqRel);
        self.recheck_bell.notify_one();
    }
}

/// The registry of open `WatchProxy` streams (see the module docs). Dropping it stops its tasks.
#[derive(Debug)]
pub struct Watchers {
    shared: Arc<Shared>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the registry holds now (for tests, logs and the benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchStats {
    /// Open watchers.
    pub watchers: usize,
    /// Distinct (exchange, proxy) pairs they are filed under.
    pub pairs: usize,
    /// Watcher wake-ups so far (each woken watcher counts once per event).
    pub wakes: u64,
}

impl Watchers {
    /// A registry of at most `cap` watchers, woken by `changes` (the store's change feed) and
    /// `reloads` (bumped on every applied reload). `store` answers the re-checks (after a lagged
    /// feed, and right after a watcher is filed); without it a lagged feed makes every watcher ask
    /// again. Spawns two tasks: call inside a Tokio runtime.
    pub fn start(
        cap: usize,
        changes: broadcast::Receiver<Change>,
        reloads: watch::Receiver<u64>,
        store: Option<Arc<dyn Store>>,
    ) -> Self {
        let shared = Arc::new(Shared {
            index: Mutex::new(Index::default()),
            open: AtomicUsize::new(0),
            cap,
            next_id: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            recheck: AtomicU8::new(0),
            recheck_bell: Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            store,
        });
        let feed = tokio::spawn(read_feed(shared.clone(), changes, reloads));
        let recheck = tokio::spawn(run_rechecks(shared.clone()));
        Self {
            shared,
            tasks: [feed, recheck],
        }
    }

    /// Takes a place for one more watcher, or RESOURCE_EXHAUSTED when [`Watchers::start`]'s cap
    /// is reached (or the broker is shutting down: UNAVAILABLE).
    pub fn register(&self) -> Result<Registration, Status> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "the broker is shutting down: watch again (another replica answers)",
            ));
        }
        let cap = self.shared.cap;
        self.shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1))
            .map_err(|open| {
                Status::from(Error::ResourceExhausted {
                    message: format!(
                        "{open} WatchProxy streams are open, the most this broker serves (MAX_WATCHERS {cap}): retry later, or use RequestProxy"
                    ),
                    retry_after: FULL_RETRY,
                })
            })?;
        Ok(Registration {
            shared: self.shared.clone(),
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            slot: Arc::new(Slot::default()),
            filed: None,
        })
    }

    /// What the registry holds now.
    pub fn stats(&self) -> WatchStats {
        let pairs = self.shared.index().pair_count;
        WatchStats {
            watchers: self.shared.open.load(Ordering::Acquire),
            pairs,
            wakes: self.shared.wakes.load(Ordering::Relaxed),
        }
    }

    /// Ends every stream (UNAVAILABLE, so feeds watch again elsewhere) and refuses new ones: the
    /// broker is shutting down.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        for slot in self.shared.index().all_slots() {
            slot.wake(CLOSED);
        }
    }
}

/// The change-feed task: wakes the watchers of each banned or ejected pair; hands reloads and a
/// lagged feed to the re-check task.
async fn read_feed(shared: Arc<Shared>, changes: broadcast::Receiver<Change>, reloads: watch::Receiver<u64>) {
    let mut changes = Some(changes);
    let mut reloads = Some(reloads);
    loop {
        let change = async {
            match changes.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let reload = async {
            match reloads.as_mut() {
                Some(rx) => rx.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            change = change => match change {
                Ok(Change { proxy, exchange, kind: ChangeKind::Banned(_) | ChangeKind::Ejected(_) }) => {
                    shared.wake_pair(&exchange, &proxy, CHANGED);
                }
                // A penalty only lowers a proxy's rank; a lifted ejection makes one usable again.
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "watchers: the change feed ran ahead; re-checking every watched proxy");
                    shared.ask_recheck(RECHECK_STANDING);
                }
                Err(broadcast::error::RecvError::Closed) => changes = None,
            },
            reload = reload => match reload {
                Ok(()) => shared.ask_recheck(RECHECK_RELOAD),
                Err(_) => reloads = None,
            },
        }
        if changes.is_none() && reloads.is_none() {
            return;
        }
    }
}

/// The re-check task: runs reload and lagged-feed re-checks one at a time, in batches; events that
/// arrive meanwhile are coalesced into the next run.
async fn run_rechecks(shared: Arc<Shared>) {
    loop {
        shared.recheck_bell.notified().await;
        let what = shared.recheck.swap(0, Ordering::AcqRel);
        if what & RECHECK_RELOAD != 0 {
            // Everyone asks again; the standing check would add nothing.
            shared.wake_everyone(RECHECK).await;
        } else if what & RECHECK_STANDING != 0 {
            shared.recheck_standing().await;
        }
    }
}

/// One watcher's place in the registry; dropping it (with its stream) removes it.
#[derive(Debug)]
pub struct Registration {
    shared: Arc<Shared>,
    id: u64,
    slot: Arc<Slot>,
    /// The (exchange, proxy) it is filed under (keys shared with the index).
    filed: Option<(Arc<str>, Arc<str>)>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((exchange, proxy)) = self.filed.take() {
            self.shared.index().unfile(&exchange, &proxy, self.id);
        }
        self.shared.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Registration {
    /// Files the watcher under (exchange, proxy) (`proxy` `""`: direct), leaving its previous
    /// pair. Returns whether the store already has that proxy banned or ejected for the exchange.
    pub async fn file(&mut self, exchange: &str, proxy: &str) -> bool {
        let same = self
            .filed
            .as_ref()
            .is_some_and(|(x, p)| &**x == exchange && &**p == proxy);
        if !same {
            let mut index = self.shared.index();
            if let Some((x, p)) = self.filed.take() {
                index.unfile(&x, &p, self.id);
            }
            self.filed = Some(index.file(exchange, proxy, self.id, self.slot.clone()));
        }
        if proxy.is_empty() {
            return false;
        }
        let Some(store) = &self.shared.store else {
            return false;
        };
        // Filed first, read second: a ban stored after this read is published after the filing,
        // so the feed task finds this watcher.
        match store.state(StateKey { proxy, exchange }).await {
            Ok(Some(s)) => s.banned_until.is_some() || s.ejected_until.is_some(),
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %e, "watcher: cannot check the new proxy against the store");
                false
            }
        }
    }

    /// Waits until the watcher is woken; returns the reasons (bits).
    async fn woken(&self) -> u8 {
        loop {
            self.slot.notify.notified().await;
            let reasons = self.slot.reasons.swap(0, Ordering::AcqRel);
            if reasons != 0 {
                return reasons;
            }
        }
    }

    fn wake_self(&self, reason: u8) {
        self.slot.wake(reason);
    }
}

/// When to ask again for `answer`: its lease end, else its TTL, within
/// [`MIN_LEASE_WAIT`]..=[`MAX_LEASE_WAIT`] from now.
pub fn lease_end(answer: &pb::ProxyResponse, now: Instant) -> Instant {
    let wait = match &answer.lease_expires_at {
        Some(ts) => {
            let secs = u64::try_from(ts.seconds).unwrap_or(0);
            let nanos = u32::try_from(ts.nanos).unwrap_or(0).min(999_999_999);
            let at = SystemTime::UNIX_EPOCH
                .checked_add(Duration::new(secs, nanos))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
        }
        None => Duration::from_secs(answer.ttl_seconds.into()),
    };
    now + wait.clamp(MIN_LEASE_WAIT, MAX_LEASE_WAIT)
}

/// What the feed was last told.
#[derive(Debug)]
struct Told {
    source: i32,
    fallback_policy: i32,
    strategy: String,
    lease_end: Instant,
}

/// An answer's source for comparing answers: a cached upstream answer is the upstream's answer.
fn same_origin(source: i32) -> i32 {
    if source == pb::ProxySource::Cache as i32 {
        pb::ProxySource::Upstream as i32
    } else {
        source
    }
}

struct Watch<A> {
    registration: Registration,
    exchange: Box<str>,
    ask: A,
    /// Boxed: sent at once, then gone; not carried by every idle watcher.
    first: Option<Box<pb::ProxyResponse>>,
    told: Option<Told>,
    self_wakes: u8,
    ended: bool,
}

impl<A> Watch<A> {
    /// Whether `answer` differs from what the feed was told (the lease aside).
    fn differs(&self, answer: &pb::ProxyResponse) -> bool {
        let Some(told) = &self.told else { return true };
        let proxy = self.registration.filed.as_ref().map_or("", |(_, p)| &**p);
        proxy != answer.proxy_url
            || same_origin(told.source) != same_origin(answer.source)
            || told.fallback_policy != answer.fallback_policy
            || told.strategy != answer.strategy
    }

    /// Records `answer` as told and files the watcher under its proxy; wakes itself when that
    /// proxy is already out.
    async fn adopt(&mut self, answer: &pb::ProxyResponse, previous_proxy: Option<&str>) {
        self.told = Some(Told {
            source: answer.source,
            fallback_policy: answer.fallback_policy,
            strategy: answer.strategy.clone(),
            lease_end: lease_end(answer, Instant::now()),
        });
        let out = self.registration.file(&self.exchange, &answer.proxy_url).await;
        if out && previous_proxy != Some(&answer.proxy_url) && self.self_wakes < MAX_SELF_WAKES {
            self.self_wakes += 1;
            self.registration.wake_self(CHANGED);
        }
    }
}

/// The stream of one `WatchProxy` call: `first` at once, then a new answer from `ask` on each
/// event (see the module docs). A failed re-ask ends the stream with its status; so does a
/// shutdown (UNAVAILABLE). `exchange` must be lower-case, as the store publishes it.
pub fn assignments<A, F>(
    registration: Registration,
    exchange: &str,
    first: pb::ProxyResponse,
    ask: A,
) -> impl tokio_stream::Stream<Item = Result<pb::ProxyResponse, Status>> + Send + 'static
where
    A: FnMut() -> F + Send + 'static,
    F: Future<Output = Result<pb::ProxyResponse, Status>> + Send + 'static,
{
    let watch = Watch {
        registration,
        exchange: exchange.into(),
        ask,
        first: Some(Box::new(first)),
        told: None,
        self_wakes: 0,
        ended: false,
    };
    futures_util::stream::unfold(watch, step)
}

async fn step<A, F>(mut w: Watch<A>) -> Option<(Result<pb::ProxyResponse, Status>, Watch<A>)>
where
    A: FnMut() -> F + Send + 'static,
    F: Future<Output = Result<pb::ProxyResponse, Status>> + Send + 'static,
{
    if w.ended {
        return None;
    }
    if let Some(first) = w.first.take() {
        // Boxed, like the re-ask below: what is not needed while idle is not kept while idle.
        Box::pin(w.adopt(&first, None)).await;
        return Some((Ok(*first), w));
    }
    loop {
        let lease_end = w.told.as_ref().map_or_else(Instant::now, |t| t.lease_end);
        let reasons = tokio::select! {
            reasons = w.registration.woken() => reasons,
            () = tokio::time::sleep_until(lease_end) => LEASE,
        };
        if reasons & CLOSED != 0 {
            w.ended = true;
            return Some((
                Err(Status::unavailable(
                    "the broker is shutting down: watch again (another replica answers)",
                )),
                w,
            ));
        }
        if reasons & LEASE != 0 {
            w.self_wakes = 0;
        }
        // Boxed: the (large) request future exists only while it runs, not in an idle watcher.
        let asked: std::pin::Pin<Box<F>> = Box::pin((w.ask)());
        match asked.await {
            Err(status) => {
                w.ended = true;
                return Some((Err(status), w));
            }
            Ok(answer) => {
                let moved = reasons & (CHANGED | LEASE) != 0;
                if moved || w.differs(&answer) {
                    let previous = w.registration.filed.as_ref().map(|(_, p)| p.clone());
                    Box::pin(w.adopt(&answer, previous.as_deref())).await;
                    return Some((Ok(answer), w));
                }
                // A re-check found the same answer: the feed keeps what it was told.
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::MemoryStore;
    use std::sync::atomic::AtomicUsize;
    use tokio_stream::StreamExt;

    fn answer(proxy: &str, ttl: u32) -> pb::ProxyResponse {
        pb::ProxyResponse {
            proxy_url: proxy.into(),
            ttl_seconds: ttl,
            ..Default::default()
        }
    }

    struct Fixture {
        watchers: Watchers,
        store: Arc<MemoryStore>,
        reloads: watch::Sender<u64>,
    }

    fn fixture(cap: usize) -> Fixture {
        let store = Arc::new(MemoryStore::new(1000, Arc::new(SystemClock)));
        let (reloads, rx) = watch::channel(0);
        let watchers = Watchers::start(cap, store.subscribe(), rx, Some(store.clone() as Arc<dyn Store>));
        Fixture {
            watchers,
            store,
            reloads,
        }
    }

    /// A stream whose re-asks answer from `answers` in turn (the last one repeats), counting calls.
    fn stream_of(
        f: &Fixture,
        exchange: &str,
        answers: Vec<&'static str>,
    ) -> (
        impl tokio_stream::Stream<Item = Result<pb::ProxyResponse, Status>>,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let first = answer(answers[0], 3600);
        let counted = calls.clone();
        let ask = move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let url = answers[n.min(answers.len() - 1)];
            async move { Ok(answer(url, 3600)) }
        };
        let reg = f.watchers.register().unwrap();
        (Box::pin(assignments(reg, exchange, first, ask)), calls)
    }

    async fn next_url(
        s: &mut (impl tokio_stream::Stream<Item = Result<pb::ProxyResponse, Status>> + Unpin),
    ) -> String {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("an answer before the deadline")
            .expect("the stream goes on")
            .expect("an answer, not a status")
            .proxy_url
    }

    /// Polls `s` for a while (as the server does) and fails if it yields anything.
    async fn assert_quiet(
        s: &mut (impl tokio_stream::Stream<Item = Result<pb::ProxyResponse, Status>> + Unpin),
    ) {
        let nothing = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
        assert!(nothing.is_err(), "pushed: {nothing:?}");
    }

    fn key<'a>(proxy: &'a str, exchange: &'a str) -> StateKey<'a> {
        StateKey { proxy, exchange }
    }

    #[tokio::test]
    async fn a_ban_wakes_only_the_watchers_of_that_proxy_and_exchange() {
        let f = fixture(100);
        let (mut banned, banned_calls) = stream_of(&f, "binance", vec!["socks5://a:1", "socks5://b:1"]);
        let (mut same_proxy_other_exchange, other_calls) = stream_of(&f, "bybit", vec!["socks5://a:1"]);
        let (mut other_proxy, third_calls) = stream_of(&f, "binance", vec!["socks5://c:1"]);
        assert_eq!(next_url(&mut banned).await, "socks5://a:1");
        assert_eq!(next_url(&mut same_proxy_other_exchange).await, "socks5://a:1");
        assert_eq!(next_url(&mut other_proxy).await, "socks5://c:1");
        assert_eq!(f.watchers.stats().pairs, 3);
        let wakes = f.watchers.stats().wakes;
        f.store
            .ban(
                key("socks5://a:1", "binance"),
                crate::store::BanLength::Exactly(Duration::from_secs(60)),
                true,
            )
            .await
            .unwrap();
        assert_eq!(next_url(&mut banned).await, "socks5://b:1");
        assert_eq!(f.watchers.stats().wakes, wakes + 1, "one watcher woken");
        // The others, polled as the server polls them, ask nothing and push nothing.
        assert_quiet(&mut same_proxy_other_exchange).await;
        assert_quiet(&mut other_proxy).await;
        assert_eq!(banned_calls.load(Ordering::SeqCst), 1);
        assert_eq!(other_calls.load(Ordering::SeqCst), 0);
        assert_eq!(third_calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn penalties_and_lifts_move_nobody() {
        let f = fixture(100);
        let (mut s, calls) = stream_of(&f, "binance", vec!["socks5://a:1", "socks5://b:1"]);
        let (mut marker, _) = stream_of(&f, "binance", vec!["socks5://z:1", "socks5://y:1"]);
        assert_eq!(next_url(&mut s).await, "socks5://a:1");
        assert_eq!(next_url(&mut marker).await, "socks5://z:1");
        let k = key("socks5://a:1", "binance");
        f.store.penalise(k, Duration::from_secs(30), true).await.unwrap();
        f.store.lift_ejection(k).await.unwrap();
        // Then an ejection of the marker's proxy: once the marker moves, the feed task has read
        // the two changes above (the feed is ordered).
        f.store.eject(key("socks5://z:1", "binance"), true).await.unwrap();
        assert_eq!(next_url(&mut marker).await, "socks5://y:1");
        assert_quiet(&mut s).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        f.store.eject(k, true).await.unwrap();
        assert_eq!(next_url(&mut s).await, "socks5://b:1");
    }

    #[tokio::test]
    async fn a_reload_pushes_only_answers_that_changed() {
        let f = fixture(100);
        let (mut moving, moving_calls) = stream_of(&f, "binance", vec!["socks5://a:1", "socks5://b:1"]);
        let (mut staying, staying_calls) = stream_of(&f, "kraken", vec!["socks5://k:1"]);
        assert_eq!(next_url(&mut moving).await, "socks5://a:1");
        assert_eq!(next_url(&mut staying).await, "socks5://k:1");
        f.reloads.send_modify(|n| *n += 1);
        assert_eq!(next_url(&mut moving).await, "socks5://b:1");
        // The unchanged watcher asks too (while polled, as the server polls every stream), and
        // pushes nothing.
        assert_quiet(&mut staying).await;
        assert_eq!(staying_calls.load(Ordering::SeqCst), 1);
        assert_eq!(moving_calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lagged_feed_rechecks_every_watched_proxy_against_the_store() {
        let store = Arc::new(MemoryStore::new(1000, Arc::new(SystemClock)));
        // A feed of its own, so the watchers never hear of the ban below: as if it had been lost.
        let (feed, changes) = broadcast::channel(4);
        let (_reloads, rx) = watch::channel(0);
        let f = Fixture {
            watchers: Watchers::start(100, changes, rx, Some(store.clone() as Arc<dyn Store>)),
            store,
            reloads: watch::channel(0).0,
        };
        let (mut moved, _) = stream_of(&f, "binance", vec!["socks5://a:1", "socks5://b:1"]);
        let (mut kept, kept_calls) = stream_of(&f, "binance", vec!["socks5://c:1", "socks5://d:1"]);
        assert_eq!(next_url(&mut moved).await, "socks5://a:1");
        assert_eq!(next_url(&mut kept).await, "socks5://c:1");
        f.store
            .ban(
                key("socks5://a:1", "binance"),
                crate::store::BanLength::Exactly(Duration::from_secs(60)),
                true,
            )
            .await
            .unwrap();
        f.watchers.shared.ask_recheck(RECHECK_STANDING);
        assert_eq!(next_url(&mut moved).await, "socks5://b:1");
        // c is fine: its watcher was not even woken.
        assert_quiet(&mut kept).await;
        assert_eq!(kept_calls.load(Ordering::SeqCst), 0);
        drop(feed);
    }

    #[tokio::test]
    async fn a_watcher_filed_on_an_already_banned_proxy_moves_at_once() {
        let f = fixture(100);
        f.store
            .ban(
                key("socks5://a:1", "binance"),
                crate::store::BanLength::Exactly(Duration::from_secs(60)),
                true,
            )
            .await
            .unwrap();
        let (mut s, _) = stream_of(&f, "binance", vec!["socks5://a:1", "socks5://b:1"]);
        assert_eq!(next_url(&mut s).await, "socks5://a:1");
        assert_eq!(next_url(&mut s).await, "socks5://b:1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_end_brings_a_new_answer() {
        let f = fixture(100);
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let ask = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok(answer("socks5://b:1", 60)) }
        };
        let reg = f.watchers.register().unwrap();
        let mut s = Box::pin(assignments(reg, "binance", answer("socks5://a:1", 30), ask));
        assert_eq!(next_url(&mut s).await, "socks5://a:1");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(next_url(&mut s).await, "socks5://b:1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn past_the_cap_is_resource_exhausted_and_dropping_frees_the_place() {
        let f = fixture(2);
        let a = f.watchers.register().unwrap();
        let _b = f.watchers.register().unwrap();
        let status = f.watchers.register().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("MAX_WATCHERS 2"),
            "{}",
            status.message()
        );
        drop(a);
        assert!(f.watchers.register().is_ok());
    }

    #[tokio::test]
    async fn dropped_streams_leave_the_registry_empty() {
        let f = fixture(100);
        let mut streams = Vec::new();
        for _ in 0..10 {
            let (mut s, _) = stream_of(&f, "binance", vec!["socks5://a:1", "socks5://b:1"]);
            next_url(&mut s).await;
            streams.push(s);
        }
        assert_eq!(f.watchers.stats().watchers, 10);
        assert_eq!(f.watchers.stats().pairs, 1);
        drop(streams);
        assert_eq!(f.watchers.stats().watchers, 0);
        assert_eq!(f.watchers.stats().pairs, 0);
        assert!(f.watchers.shared.index().pairs.is_empty());
    }

    #[tokio::test]
    async fn closing_ends_every_stream_with_unavailable() {
        let f = fixture(100);
        let (mut s, _) = stream_of(&f, "binance", vec!["socks5://a:1"]);
        next_url(&mut s).await;
        f.watchers.close();
        let end = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .unwrap();
        assert_eq!(end.unwrap().unwrap_err().code(), tonic::Code::Unavailable);
        assert!(
            tokio::time::timeout(Duration::from_secs(10), s.next())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            f.watchers.register().unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn a_failed_re_ask_ends_the_stream_with_its_status() {
        let f = fixture(100);
        let reg = f.watchers.register().unwrap();
        let ask = || async { Err(Status::resource_exhausted("no proxy has headroom")) };
        let mut s = Box::pin(assignments(reg, "binance", answer("socks5://a:1", 3600), ask));
        next_url(&mut s).await;
        f.store
            .ban(
                key("socks5://a:1", "binance"),
                crate::store::BanLength::Exactly(Duration::from_secs(60)),
                true,
            )
            .await
            .unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .unwrap();
        assert_eq!(end.unwrap().unwrap_err().code(), tonic::Code::ResourceExhausted);
        assert!(s.next().await.is_none());
        drop(s);
        assert_eq!(f.watchers.stats().watchers, 0);
    }

    #[tokio::test]
    async fn a_re_check_counts_only_real_changes_of_the_answer() {
        let f = fixture(10);
        let told = pb::ProxyResponse {
            proxy_url: "socks5://a:1".into(),
            strategy: "round_robin".into(),
            source: pb::ProxySource::Upstream.into(),
            fallback_policy: pb::FallbackPolicy::EmbeddedFallback.into(),
            ttl_seconds: 300,
            ..Default::default()
        };
        let mut w = Watch {
            registration: f.watchers.register().unwrap(),
            exchange: "binance".into(),
            ask: (),
            first: None,
            told: None,
            self_wakes: 0,
            ended: false,
        };
        w.adopt(&told, None).await;
        let with = |change: fn(&mut pb::ProxyResponse)| {
            let mut a = told.clone();
            change(&mut a);
            a
        };
        // (row, the new answer, whether it differs)
        let rows = [
            ("identical", told.clone(), false),
            ("another TTL and lease", with(|a| a.ttl_seconds = 60), false),
            (
                "from the cache now",
                with(|a| a.source = pb::ProxySource::Cache.into()),
                false,
            ),
            (
                "another proxy",
                with(|a| a.proxy_url = "socks5://b:1".into()),
                true,
            ),
            ("direct now", with(|a| a.proxy_url.clear()), true),
            (
                "embedded now",
                with(|a| a.source = pb::ProxySource::Embedded.into()),
                true,
            ),
            (
                "another policy",
                with(|a| a.fallback_policy = pb::FallbackPolicy::Fail.into()),
                true,
            ),
            ("another strategy", with(|a| a.strategy = "random".into()), true),
        ];
        for (row, answer, differs) in rows {
            assert_eq!(w.differs(&answer), differs, "{row}");
        }
    }

    #[test]
    fn an_idle_watcher_stream_is_small() {
        let f = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = f.enter();
        let fx = fixture(1);
        let reg = fx.watchers.register().unwrap();
        let broker_like = (Arc::new(()), Duration::ZERO, Arc::new(String::new()));
        let ask = move || {
            let _ = &broker_like;
            async { Ok(answer("socks5://b:1", 60)) }
        };
        let stream = assignments(reg, "binance", answer("socks5://a:1", 60), ask);
        let size = std::mem::size_of_val(&stream);
        eprintln!("an idle watcher's stream state: {size} bytes");
        // Reported, not a budget: the registry slot, the request and HTTP/2 add to it (see
        // BENCHMARKS.md for the measured whole).
        assert!(size < 2048, "{size}");
    }

    #[test]
    fn lease_ends_come_from_the_lease_else_the_ttl_within_bounds() {
        let now = Instant::now();
        let wall = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let at = |secs: i64| {
            Some(prost_types::Timestamp {
                seconds: i64::try_from(wall.as_secs()).unwrap() + secs,
                nanos: 0,
            })
        };
        /// (row, lease_expires_at, ttl_seconds, expected wait range in seconds)
        type Row = (&'static str, Option<prost_types::Timestamp>, u32, (f64, f64));
        let rows: [Row; 6] = [
            ("lease in 60 s", at(60), 300, (58.0, 61.0)),
            ("no lease: the TTL", None, 120, (120.0, 120.0)),
            ("lease in the past", at(-60), 300, (0.5, 0.5)),
            ("TTL 0", None, 0, (0.5, 0.5)),
            ("lease in a year", at(365 * 86_400), 300, (86_400.0, 86_400.0)),
            (
                "nonsense timestamp",
                Some(prost_types::Timestamp {
                    seconds: i64::MIN,
                    nanos: -1,
                }),
                300,
                (0.5, 0.5),
            ),
        ];
        for (row, lease, ttl, (low, high)) in rows {
            let mut a = answer("socks5://a:1", ttl);
            a.lease_expires_at = lease;
            let wait = lease_end(&a, now).duration_since(now).as_secs_f64();
            assert!((low..=high).contains(&wait), "{row}: {wait}");
        }
    }
}
