//! [`Brokering`]: the facade the broker calls. See the module docs of [`crate::brokering`] for
//! how a `RequestProxy` and a `ReportFeedback` flow through it.

use std::any::Any;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use proxy_broker_core::redact::redact_url;
use proxy_broker_core::{ConnectionType, ProxySettings, Strategy};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::bans::{self, Applied, BanPolicy, Verdict};
use super::candidates::{
    Candidate, CandidateKey, EmbeddedCandidates, EmbeddedKind, MAX_CANDIDATE_TTL, RefillOutcome,
    UpstreamCandidates, UpstreamSet,
};
use super::choice::{Choice, Choose, Order, Picked, Shortfall, choose, choose_now};
use super::marks::{HandOutMarks, MAX_MARKS};
use super::outage::{OutageStatus, Transition};
use super::settings::{BrokeringSettings, Budget, Resolved, normalise_exchange};
use crate::clock::Clock;
use crate::store::{Change, Page, StateKey, Store, StoreError};

/// Most upstream refills one call leads (each must have added a new candidate to go on).
pub const MAX_REFILLS_PER_CALL: usize = 8;
/// Share of upstream candidates (and of a single stale or given proxy) that may count as ejected:
/// all of them. `max_ejection_percent` keeps an embedded pool from emptying, since nothing can
/// replace its members; an ejected upstream candidate is replaced by asking upstream again (with
/// it in `exclude_proxies`), as the cache eviction did before per-exchange state.
pub const UPSTREAM_MAX_EJECTION_PERCENT: u8 = 100;
/// Shortest retry hint sent with an exhausted answer.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One validated `RequestProxy`, as the engine needs it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// Exchange id as sent (case-insensitive).
    pub exchange: &'a str,
    /// HTTP or WebSocket.
    pub connection_type: ConnectionType,
    /// Preferred region (keys upstream candidates; embedded entries ignore it).
    pub region: Option<&'a str>,
    /// The request's `sticky_key`, if any.
    pub sticky_key: Option<&'a str>,
    /// The TTL of embedded answers (`cache_ttl_seconds`): their leases are jittered from it.
    pub ttl: Duration,
    /// When the call started on the engine's clock, if the caller has read it: the first choice
    /// of [`Brokering::choose_delegated`] is made at that instant instead of reading the clock
    /// again (a cache hit reads it as few times as it can).
    pub started: Option<Instant>,
}

/// One upstream answer offered as a candidate.
#[derive(Clone)]
pub struct Offer<P> {
    /// The proxy URL (validated by the caller).
    pub url: String,
    /// The answer's TTL (clamped to 1..=3600 s).
    pub ttl: Duration,
    /// Its weight for sticky choice (1 unless the upstream says otherwise).
    pub weight: f64,
    /// What to keep with it (the answer, ready to send).
    pub payload: P,
}

impl<P> fmt::Debug for Offer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offer")
            .field("url", &redact_url(&self.url))
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Nothing with headroom can be had: RESOURCE_EXHAUSTED with `google.rpc.RetryInfo`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Exhausted {
    /// When a retry may succeed (the earliest window frees or ban ends; at least 1 s).
    pub retry_after: Duration,
    /// Which exchange, connection type and budget, and why each candidate was out.
    pub message: String,
}

/// Why a request got no proxy.
#[derive(Debug, Clone)]
pub enum NotPicked<E> {
    /// Every candidate is out and no new one could be had.
    Exhausted(Exhausted),
    /// The upstream refill failed: the caller's error, or `None` when a concurrent call's refill
    /// for the same key failed (this call waited for it rather than ask again). The caller's
    /// usual fallbacks apply (stale answer, embedded configuration, UNAVAILABLE).
    Upstream(Option<E>),
    /// The state store failed.
    Store(StoreError),
}

impl<E> From<StoreError> for NotPicked<E> {
    fn from(e: StoreError) -> Self {
        NotPicked::Store(e)
    }
}

/// What an embedded hand-out carries besides the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedPick {
    /// Static or a pool's strategy (`strategy` in the answer).
    pub kind: EmbeddedKind,
    /// The entry's `timeout_seconds`.
    pub timeout_seconds: i64,
}

/// One validated `ReportFeedback`, as the engine needs it.
#[derive(Clone, Copy)]
pub struct Report<'a> {
    /// Exchange id as sent (case-insensitive).
    pub exchange: &'a str,
    /// The proxy the feed used.
    pub proxy_url: &'a str,
    /// Whether the connection worked.
    pub success: bool,
    /// The exchange's HTTP status, if the feed got one.
    pub http_status: Option<u32>,
    /// The exchange's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("exchange", &self.exchange)
            .field("proxy_url", &redact_url(self.proxy_url))
            .field("success", &self.success)
            .field("http_status", &self.http_status)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

/// What a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// Its verdict.
    pub verdict: Verdict,
    /// Whether the proxy is one the broker handed out for the exchange (or an embedded member).
    /// Reports about other proxies change nothing here (they are still forwarded upstream).
    pub known: bool,
    /// What applying the verdict did.
    pub applied: Applied,
    /// Whether the report started or ended an outage of the exchange.
    pub outage: Transition,
    /// Ejections lifted because an outage started.
    pub lifted: usize,
}

/// The existing outlier-detection settings the engine applies per (proxy, exchange)
/// (`proxy.external_service.eject_after_failures` and `max_ejection_percent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive plain failures that eject a proxy for an exchange.
    pub after_failures: u32,
    /// Most of one candidate set (percent) that may count as ejected at once.
    pub max_percent: u8,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            after_failures: 3,
            max_percent: 50,
        }
    }
}

/// An exchange as `ListExchanges` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeStatus {
    /// Lower-case id.
    pub exchange: String,
    /// WebSocket budget in force, and its source.
    pub websocket: Option<Resolved>,
    /// HTTP budget in force, and its source.
    pub http: Option<Resolved>,
    /// First ban length after a 418/403 without `retry_after_seconds`.
    pub ban: Duration,
    /// Outage state, if the exchange has had reports lately.
    pub outage: Option<OutageStatus>,
}

/// The feed-aware brokering engine. `P` is what the caller keeps with each upstream candidate
/// (the answer ready to send).
pub struct Brokering<P> {
    settings: ArcSwap<BrokeringSettings>,
    embedded: ArcSwap<EmbeddedCandidates>,
    upstream: UpstreamCandidates<P>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    eject_after_failures: AtomicU32,
    max_ejection_percent: AtomicU8,
    /// Unbudgeted upstream hand-outs ([`super::marks`]).
    marks: HandOutMarks,
}

impl<P> fmt::Debug for Brokering<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Brokering")
            .field("settings", &self.settings.load())
            .field("store", &self.store)
            .field("upstream", &self.upstream)
            .field("marks", &self.marks)
            .finish_non_exhaustive()
    }
}

fn order<'a>(sticky_key: Option<&'a str>, default: Order<'a>) -> Order<'a> {
    sticky_key.map_or(default, Order::Sticky)
}

impl<P: Clone + Send + Sync + 'static> Brokering<P> {
    /// An engine for `settings` ([`BrokeringSettings::shared`]) over `store`; embedded candidates
    /// from `proxy` (the validated `proxy:` block); `ejection` from `proxy.external_service`.
    /// `clock` must be the store's.
    pub fn new(
        settings: Arc<BrokeringSettings>,
        proxy: &ProxySettings,
        ejection: Ejection,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let marks = HandOutMarks::new(MAX_MARKS, clock.now());
        Self {
            settings: ArcSwap::new(settings),
            embedded: ArcSwap::from_pointee(EmbeddedCandidates::new(proxy)),
            upstream: UpstreamCandidates::default(),
            store,
            clock,
            marks,
            eject_after_failures: AtomicU32::new(ejection.after_failures),
            max_ejection_percent: AtomicU8::new(ejection.max_percent),
        }
    }

    /// Applies reloaded settings. State (windows, bans, leases, outage reports, upstream
    /// candidates) is kept; embedded lists are rebuilt (their round-robin cursors restart).
    /// `settings` as [`BrokeringSettings::shared`] makes them.
    pub fn reload(&self, settings: Arc<BrokeringSettings>, proxy: &ProxySettings, ejection: Ejection) {
        self.settings.store(settings);
        self.embedded.store(Arc::new(EmbeddedCandidates::new(proxy)));
        self.eject_after_failures
            .store(ejection.after_failures, Ordering::Relaxed);
        self.max_ejection_percent
            .store(ejection.max_percent, Ordering::Relaxed);
    }

    /// Drops the upstream candidates of `exchange` (an admin invalidated its cache entries), or
    /// of every exchange.
    pub fn clear_upstream_candidates_of(&self, exchange: Option<&str>) {
        match exchange {
            Some(x) => {
                self.upstream.clear_exchange(&normalise_exchange(x));
            }
            None => self.upstream.clear(),
        }
    }

    /// Drops every upstream candidate (the upstream settings changed).
    pub fn clear_upstream_candidates(&self) {
        self.upstream.clear();
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<BrokeringSettings> {
        self.settings.load_full()
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The budget in force for (exchange, type).
    pub fn budget(&self, exchange: &str, connection_type: ConnectionType) -> Option<Budget> {
        self.settings
            .load()
            .budget(exchange, connection_type)
            .map(|r| r.budget)
    }

    fn exhausted(
        exchange: &str,
        connection_type: ConnectionType,
        budget: Option<Budget>,
        s: &Shortfall,
    ) -> Exhausted {
        let retry_after = s.retry_after.unwrap_or(MIN_RETRY_AFTER).max(MIN_RETRY_AFTER);
        let budget = budget.map_or_else(
            || "no connection-attempt budget".to_owned(),
            |b| format!("connection-attempt budget {b} per proxy"),
        );
        let retry_secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        let message = if s.total == 0 {
            format!(
                "no proxy for {exchange} {connection_type} can be handed out ({budget}): there are no candidates; retry in {retry_secs} s"
            )
        } else {
            format!(
                "no proxy for {exchange} {connection_type} can be handed out ({budget}): of {} candidates, {} used their budget, {} are banned, {} ejected, {} penalised; retry in {retry_secs} s",
                s.total, s.no_headroom, s.banned, s.ejected, s.penalised
            )
        };
        Exhausted { retry_after, message }
    }

    /// A proxy from the embedded configuration: `Ok(None)` means connect directly (no embedded
    /// proxy for this exchange and type). Penalised members are picked when nothing else has
    /// headroom; when none can be handed out, [`NotPicked::Exhausted`].
    pub async fn choose_embedded(
        &self,
        ask: &Ask<'_>,
    ) -> Result<Option<Picked<EmbeddedPick>>, NotPicked<Infallible>> {
        let exchange = normalise_exchange(ask.exchange);
        let settings = self.settings.load_full();
        let embedded = self.embedded.load_full();
        let Some(list) = embedded.get(&exchange, ask.connection_type).cloned() else {
            return Ok(None);
        };
        let budget = settings.budget(&exchange, ask.connection_type).map(|r| r.budget);
        let default = match list.kind {
            EmbeddedKind::Static => Order::Static,
            EmbeddedKind::Pool(s) => Order::Strategy(s),
        };
        let input = Choose {
            exchange: &exchange,
            connection_type: ask.connection_type,
            members: &list.members,
            order: order(ask.sticky_key, default),
            cursor: &list.cursor,
            budget,
            ttl: ask.ttl,
            jitter: settings.jitter(),
            allow_penalised: true,
            max_ejection_percent: self.max_ejection_percent.load(Ordering::Relaxed),
            now: self.clock.now(),
            // Embedded members are few and `least_connections` reads their leases.
            marks: None,
        };
        match choose(&*self.store, input).await? {
            Choice::Picked(p) => Ok(Some(with_payload(
                p,
                EmbeddedPick {
                    kind: list.kind,
                    timeout_seconds: list.timeout_seconds,
                },
            ))),
            Choice::Short(s) => Err(NotPicked::Exhausted(Self::exhausted(
                &exchange,
                ask.connection_type,
                budget,
                &s,
            ))),
        }
    }

    /// Counts one hand-out of a given `url` (a stale cached answer, or any single proxy the
    /// caller decided on), under the same budgets, bans and penalties.
    pub async fn admit(&self, ask: &Ask<'_>, url: &str) -> Result<Picked<()>, NotPicked<Infallible>> {
        let exchange = normalise_exchange(ask.exchange);
        let settings = self.settings.load_full();
        let budget = settings.budget(&exchange, ask.connection_type).map(|r| r.budget);
        let members = [Candidate {
            url: Arc::from(url),
            weight: 1.0,
            expires_at: None,
            payload: (),
        }];
        let cursor = Default::default();
        let input = Choose {
            exchange: &exchange,
            connection_type: ask.connection_type,
            members: &members,
            order: Order::Static,
            cursor: &cursor,
            budget,
            ttl: ask.ttl,
            jitter: settings.jitter(),
            allow_penalised: true,
            max_ejection_percent: UPSTREAM_MAX_EJECTION_PERCENT,
            now: self.clock.now(),
            marks: Some(&self.marks),
        };
        match choose(&*self.store, input).await? {
            Choice::Picked(p) => Ok(p),
            Choice::Short(s) => Err(NotPicked::Exhausted(Self::exhausted(
                &exchange,
                ask.connection_type,
                budget,
                &s,
            ))),
        }
    }

    /// A proxy from the upstream candidates of (exchange, type, region), asking upstream for
    /// another through `refill` when none has headroom.
    ///
    /// `refill(exclude)` asks the upstream once, sending `exclude` (every current candidate) in
    /// `metadata.exclude_proxies`, and returns its answer as an [`Offer`] (`Ok(None)`: no usable
    /// answer). At most one refill per key runs at a time: concurrent callers wait for it (each
    /// within its own deadline: wrap this call in a timeout) and then choose again; when it added
    /// nothing or failed, they do not ask again but fall back at once. Penalised candidates are
    /// picked only when no refill helps. The refill future may be dropped (a caller's deadline):
    /// join a detached single flight inside it if the lookup should go on.
    pub async fn choose_delegated<F, Fut, E>(
        &self,
        ask: &Ask<'_>,
        mut refill: F,
    ) -> Result<Picked<P>, NotPicked<E>>
    where
        F: FnMut(Vec<Arc<str>>) -> Fut,
        Fut: Future<Output = Result<Option<Offer<P>>, E>>,
        E: Clone + Send + Sync + 'static,
    {
        let exchange = normalise_exchange(ask.exchange);
        let settings = self.settings.load_full();
        let budget = settings.budget(&exchange, ask.connection_type).map(|r| r.budget);
        let set = self.upstream.set_of(
            &exchange,
            ask.connection_type,
            ask.region,
            ask.started.unwrap_or_else(|| self.clock.now()),
        );
        let first = std::sync::atomic::AtomicBool::new(true);
        let choose_now = |allow_penalised: bool| {
            let set = set.clone();
            let exchange = exchange.clone();
            let settings = settings.clone();
            let now = match ask.started {
                Some(started) if first.swap(false, Ordering::Relaxed) => started,
                _ => self.clock.now(),
            };
            async move {
                let members = set.snapshot(now);
                let input = self.upstream_choice(&set, &members, &exchange, ask, budget, &settings, now);
                choose(
                    &*self.store,
                    Choose {
                        allow_penalised,
                        ..input
                    },
                )
                .await
            }
        };
        let mut led = 0;
        let mut failure: Option<Option<E>> = None;
        loop {
            let generation = set.generation();
            let short = match choose_now(false).await? {
                Choice::Picked(p) => return Ok(p),
                Choice::Short(s) => s,
            };
            if led >= MAX_REFILLS_PER_CALL {
                break;
            }
            let _refilling = set.refill.lock().await;
            if set.generation() != generation {
                // Another call refilled while this one chose or waited: use what it found.
                match set.last_refill() {
                    RefillOutcome::Added | RefillOutcome::None => continue,
                    RefillOutcome::NothingNew => break,
                    RefillOutcome::Failed(e) => {
                        failure = Some(e.downcast_ref::<E>().cloned());
                        break;
                    }
                }
            }
            led += 1;
            match refill(short.exclude).await {
                Ok(Some(offer)) => {
                    let now = self.clock.now();
                    let ttl = offer.ttl.clamp(MIN_RETRY_AFTER, MAX_CANDIDATE_TTL);
                    let candidate = Candidate {
                        url: Arc::from(offer.url),
                        weight: offer.weight,
                        expires_at: Some(now + ttl),
                        payload: offer.payload,
                    };
                    let added = set.add(candidate, settings.max_candidates_per_key, now);
                    set.finish_refill(if added {
                        RefillOutcome::Added
                    } else {
                        RefillOutcome::NothingNew
                    });
                    if !added {
                        break;
                    }
                }
                Ok(None) => {
                    set.finish_refill(RefillOutcome::NothingNew);
                    break;
                }
                Err(e) => {
                    let shared: Arc<dyn Any + Send + Sync> = Arc::new(e.clone());
                    set.finish_refill(RefillOutcome::Failed(shared));
                    failure = Some(Some(e));
                    break;
                }
            }
        }
        match choose_now(true).await? {
            Choice::Picked(p) => Ok(p),
            Choice::Short(s) => Err(match failure {
                Some(e) => NotPicked::Upstream(e),
                None => NotPicked::Exhausted(Self::exhausted(&exchange, ask.connection_type, budget, &s)),
            }),
        }
    }

    /// [`Brokering::choose_delegated`]'s first choice at once, when it needs nothing that waits
    /// ([`choose_now`]): an eligible candidate of an unbudgeted exchange, from a store that has
    /// the states at hand. `None`: call [`Brokering::choose_delegated`] (which chooses again). The
    /// cache-hit path: no future, no boxed store call. `settings` are the caller's (the broker's
    /// state in force holds the same `Arc` as this engine, so a hit loads one state, not two).
    pub fn choose_delegated_now(&self, ask: &Ask<'_>, settings: &BrokeringSettings) -> Option<Picked<P>> {
        let exchange = normalise_exchange(ask.exchange);
        let budget = settings.budget(&exchange, ask.connection_type).map(|r| r.budget);
        if budget.is_some() {
            return None;
        }
        let now = ask.started.unwrap_or_else(|| self.clock.now());
        let set = self
            .upstream
            .set_of(&exchange, ask.connection_type, ask.region, now);
        let choose = |members: &[Candidate<P>]| {
            let input = self.upstream_choice(&set, members, &exchange, ask, budget, settings, now);
            choose_now(&*self.store, &input)
        };
        // A lone member (most keys) is chosen in place, under the set's lock (the store's and
        // the marks' locks are taken inside it, never the other way round).
        let choice = match set.with_lone(now, |only| choose(std::slice::from_ref(only))) {
            Some(choice) => choice,
            None => choose(&set.snapshot(now)),
        };
        match choice? {
            Choice::Picked(picked) => Some(picked),
            Choice::Short(_) => None,
        }
    }

    /// The input of a choice among the upstream candidates `members` of `set`.
    #[allow(clippy::too_many_arguments)]
    fn upstream_choice<'a>(
        &'a self,
        set: &'a UpstreamSet<P>,
        members: &'a [Candidate<P>],
        exchange: &'a str,
        ask: &Ask<'a>,
        budget: Option<Budget>,
        settings: &BrokeringSettings,
        now: Instant,
    ) -> Choose<'a, P> {
        Choose {
            exchange,
            connection_type: ask.connection_type,
            members,
            order: order(ask.sticky_key, Order::Strategy(Strategy::RoundRobin)),
            cursor: &set.cursor,
            budget,
            ttl: ask.ttl,
            jitter: settings.jitter(),
            allow_penalised: false,
            max_ejection_percent: UPSTREAM_MAX_EJECTION_PERCENT,
            now,
            marks: Some(&self.marks),
        }
    }

    /// The upstream candidates of (exchange, type, region) now (for admin views and tests).
    pub fn upstream_candidates(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        region: Option<&str>,
    ) -> Vec<Candidate<P>> {
        let key = CandidateKey {
            exchange: Arc::from(normalise_exchange(exchange)),
            connection_type,
            region: region.map(Arc::from),
        };
        self.upstream
            .get(&key)
            .map(|s| s.snapshot(self.clock.now()))
            .unwrap_or_default()
    }

    /// Takes one feedback report: classifies it, feeds the outage guard, and applies the verdict
    /// for (proxy, exchange) — see [`super::bans`] and [`super::outage`]. Reports about proxies the
    /// broker did not hand out for that exchange (and that are not embedded members) change
    /// nothing.
    pub async fn report(&self, report: &Report<'_>) -> Result<Reported, StoreError> {
        let exchange = normalise_exchange(report.exchange);
        let settings = self.settings.load_full();
        let now = self.clock.now();
        let policy = BanPolicy {
            ban: settings.ban_for(&exchange),
            penalty: settings.penalty(),
        };
        let verdict = bans::classify(report.success, report.http_status, report.retry_after, policy);
        let key = StateKey {
            proxy: report.proxy_url,
            exchange: &exchange,
        };
        let own = self.embedded.load().contains(report.proxy_url);
        let marked = self.marks.contains(&exchange, report.proxy_url, now);
        let known = own
            || marked
            || self
                .store
                .states(&exchange, &[report.proxy_url])
                .await?
                .first()
                .is_some_and(Option::is_some);
        let mut reported = Reported {
            verdict,
            known,
            applied: Applied::default(),
            outage: Transition::None,
            lifted: 0,
        };
        if !known {
            return Ok(reported);
        }
        let outage = self
            .store
            .outage_report(
                &exchange,
                report.proxy_url,
                verdict.is_plain_failure(),
                &settings.outage,
            )
            .await?;
        reported.outage = outage.transition;
        let in_outage = outage.in_outage;
        let threshold = self.eject_after_failures.load(Ordering::Relaxed);
        reported.applied =
            bans::apply(&*self.store, key, verdict, own || marked, threshold, in_outage).await?;
        let proxy = redact_url(report.proxy_url);
        if let (Verdict::Ban { status, .. }, Some(until)) = (verdict, reported.applied.until) {
            let seconds = until.saturating_duration_since(now).as_secs();
            tracing::info!(%proxy, %exchange, status, seconds, "proxy banned for the exchange");
        }
        if let Some(until) = reported.applied.ejected_until {
            let seconds = until.saturating_duration_since(now).as_secs();
            tracing::warn!(%proxy, %exchange, seconds, "proxy ejected for the exchange after repeated failure reports");
            if self
                .store
                .outage_note_ejection(&exchange, report.proxy_url, &settings.outage)
                .await?
            {
                // An outage started (on some replica) between the report above and this
                // ejection.
                self.store.lift_ejection(key).await?;
            }
        }
        match &reported.outage {
            Transition::Started { lift } => {
                for proxy in lift {
                    let key = StateKey {
                        proxy,
                        exchange: &exchange,
                    };
                    reported.lifted += usize::from(self.store.lift_ejection(key).await?);
                }
                tracing::warn!(
                    %exchange,
                    lifted = reported.lifted,
                    "exchange outage: most proxies reporting for it fail; failures stop ejecting for it"
                );
            }
            Transition::Ended => tracing::info!(%exchange, "exchange outage over"),
            Transition::None => {}
        }
        if matches!(verdict, Verdict::Ban { .. }) {
            self.upstream.remove_from_exchange(&exchange, report.proxy_url);
        }
        Ok(reported)
    }

    /// The change feed (bans, penalties, ejections, lifts), for push migration.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.store.subscribe()
    }

    /// A page of per-(proxy, exchange) state (`ListProxies`).
    pub async fn list_proxies(
        &self,
        exchange: Option<&str>,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<Page, StoreError> {
        let exchange = exchange.map(normalise_exchange);
        self.store.list(exchange.as_deref(), page_token, page_size).await
    }

    /// Exchanges with a budget in force or recent reports, sorted (`ListExchanges`). The outage
    /// state is the fleet's (the store's); when the store cannot say, exchanges are listed
    /// without it.
    pub async fn exchanges(&self) -> Vec<ExchangeStatus> {
        let settings = self.settings.load_full();
        let outages = match self.store.outages(None, &settings.outage).await {
            Ok(o) => o,
            Err(error) => {
                tracing::debug!(%error, "exchange outage state unavailable");
                Vec::new()
            }
        };
        let mut ids = settings.exchanges_with_budgets();
        ids.extend(outages.iter().map(|(x, _)| x.to_string()));
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|exchange| ExchangeStatus {
                websocket: settings.budget(&exchange, ConnectionType::Websocket),
                http: settings.budget(&exchange, ConnectionType::Http),
                ban: settings.ban_for(&exchange),
                outage: outages.iter().find(|(x, _)| **x == *exchange).map(|(_, s)| *s),
                exchange,
            })
            .collect()
    }

    /// Whether `exchange` is in an outage now (`false` when the store cannot say).
    pub async fn in_outage(&self, exchange: &str) -> bool {
        let settings = self.settings.load_full();
        self.store
            .outages(Some(&normalise_exchange(exchange)), &settings.outage)
            .await
            .is_ok_and(|o| o.first().is_some_and(|(_, st)| st.since.is_some()))
    }
}

fn with_payload<P, Q>(p: Picked<P>, payload: Q) -> Picked<Q> {
    Picked {
        url: p.url,
        payload,
        lease_expires_at: p.lease_expires_at,
        expires_at: p.expires_at,
        used: p.used,
        budget: p.budget,
        penalised: p.penalised,
        sticky: p.sticky,
    }
}
