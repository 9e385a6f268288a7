//! The decision: which proxy a feed gets.
//!
//! Every hand-out goes through the feed-aware brokering engine ([`crate::brokering`]): it counts
//! one connection attempt for (proxy, exchange, connection type) against the exchange's per-IP
//! budget, skips proxies banned, ejected or penalised for that exchange, and jitters the lease.
//!
//! With `proxy.enabled` and `external_service.enabled`: a candidate with headroom among the
//! key's distinct upstream answers still within their TTL → else, in fleet mode, one of the
//! fleet's shared candidates for the key that is not among them → else one more upstream lookup (one
//! per key however many feeds ask at once, on a task of its own under the broker's budget, with
//! the exhausted candidates in `metadata.exclude_proxies`; each caller waits until its own
//! deadline) → when upstreams fail: the stale cached answer (stale-if-error), then the embedded
//! configuration if `fallback_to_embedded`, else UNAVAILABLE listing each endpoint's failure →
//! when nothing with headroom can be had: the embedded configuration if it has a proxy with
//! headroom (and `fallback_to_embedded`), else RESOURCE_EXHAUSTED with a retry hint.
//! Otherwise the embedded configuration answers (DIRECT when it names no proxy). The rule is the
//! same for HTTP and WebSocket.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::brokering::{Ask, Brokering, EmbeddedPick, NotPicked, Offer, Picked, Report};
use crate::cache::{CacheKey, Cached};
use crate::clock::{Clock, SystemClock};
use crate::config::BrokerConfig;
use crate::error::Error;
use crate::feedback::Outgoing;
use crate::flight::Missed;
use crate::json::json_to_value;
use crate::metrics::Metrics;
use crate::pb;
use crate::request::{Feedback, Lookup};
use crate::state::{Delegation, State};
use crate::store::{BuiltStore, Change, Store, StoreStatus, build_store};
use crate::upstream::Failure;
use crate::wire::ProxyAnswer;

pub use crate::cache::STALE_ANSWER_TTL;
pub use crate::state::ReloadSummary;

/// Retry hint sent when too many upstream lookups are in flight.
const FLIGHTS_FULL_RETRY: Duration = Duration::from_secs(1);

/// The engine, keeping each upstream answer ready to send with its candidate.
pub type Engine = Brokering<Arc<Cached>>;

/// Shared state behind both gRPC services. Configuration-derived parts live in a [`State`] that
/// [`Broker::reload`] swaps atomically; the brokering engine, counters and metrics outlive
/// reloads. `Debug` prints no secret: no token, and no proxy URL (they may carry credentials).
pub struct Broker {
    state: ArcSwap<State>,
    brokering: Engine,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    reloads: watch::Sender<u64>,
    ejections: AtomicU64,
    /// Whether the state store is reachable (`proxy_broker_store_up`).
    store_status: StoreStatus,
    /// Open `WatchProxy` streams; started by the first one.
    watchers: std::sync::OnceLock<crate::brokering::watch::Watchers>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("state", &**self.state.load())
            .field("brokering", &self.brokering)
            .finish_non_exhaustive()
    }
}

/// Why a refill (one more upstream lookup) gave no candidate.
#[derive(Debug, Clone)]
enum RefillError {
    /// The endpoints failed (or the caller's deadline came first).
    Failed(Arc<Vec<Failure>>),
    /// `upstream_max_in_flight_total` lookups are running: this one could not start.
    FlightsFull,
}

impl Broker {
    /// A broker for a validated configuration, on the real clock, with the state store its
    /// `store:` block names (in-process by default; Redis for fleet mode). Must run inside a Tokio runtime (the feedback worker is spawned). Fails when
    /// credential files cannot be read.
    pub fn new(config: BrokerConfig) -> Result<Self, proxy_broker_core::ConfigError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`Broker::new`], with the cache, breakers and brokering state on `clock`.
    pub fn with_clock(
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, proxy_broker_core::ConfigError> {
        let built = build_store(&config.store, clock.clone())?;
        Self::with_built_store(config, clock, built)
    }

    /// As [`Broker::with_clock`], on a given brokering state store (on the same clock).
    pub fn with_store(
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
    ) -> Result<Self, proxy_broker_core::ConfigError> {
        let status = StoreStatus::up();
        Self::with_built_store(config, clock, BuiltStore { store, status })
    }

    fn with_built_store(
        config: BrokerConfig,
        clock: Arc<dyn Clock>,
        BuiltStore { store, status }: BuiltStore,
    ) -> Result<Self, proxy_broker_core::ConfigError> {
        let metrics = Arc::new(Metrics::new());
        let state = State::build(config, None, &clock, &metrics)?;
        let brokering = Brokering::new(
            state.brokering.clone(),
            &state.config.proxy,
            state.ejection(),
            store,
            clock.clone(),
        );
        Ok(Self {
            state: ArcSwap::from_pointee(state),
            brokering,
            clock,
            metrics,
            reloads: watch::Sender::new(0),
            ejections: AtomicU64::new(0),
            store_status: status,
            watchers: std::sync::OnceLock::new(),
        })
    }

    /// The state in force (cheap: an `Arc` load).
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The state in force, borrowed for a short while (no reference count touched).
    pub fn state_guard(&self) -> arc_swap::Guard<Arc<State>> {
        self.state.load()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<BrokerConfig> {
        self.state.load().config.clone()
    }

    /// Upstream delegation state, when enabled.
    pub fn delegation(&self) -> Option<Arc<Delegation>> {
        self.state.load().delegation.clone()
    }

    /// The feed-aware brokering engine.
    pub fn brokering(&self) -> &Engine {
        &self.brokering
    }

    /// Bans, penalties, ejections and lifts, as the state store publishes them (for
    /// `WatchProxy`).
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.brokering.subscribe()
    }

    /// A counter bumped by every applied reload that changes the `proxy:` or `brokering:` block
    /// (for `WatchProxy`: the answer may have changed).
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// The registry of open `WatchProxy` streams, started by the first call (inside the runtime
    /// that serves it) on the change feed, the reload counter and the state store.
    pub fn watchers(&self) -> &crate::brokering::watch::Watchers {
        self.watchers.get_or_init(|| {
            crate::brokering::watch::Watchers::start(
                crate::brokering::watch::MAX_WATCHERS,
                self.subscribe_changes(),
                self.reloads(),
                Some(self.brokering.store().clone()),
            )
        })
    }

    /// Ends every `WatchProxy` stream (UNAVAILABLE: watch again elsewhere) and refuses new ones;
    /// called when shutdown starts, so that feeds move at once rather than when the grace ends.
    pub fn close_watchers(&self) {
        if let Some(watchers) = self.watchers.get() {
            watchers.close();
        }
    }

    /// Now on the broker's clock (the instants of its brokering state are on it).
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// (proxy, exchange) ejections so far.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Applies a new, validated configuration. Parts that did not change keep their state;
    /// per-(proxy, exchange) brokering state (budgets, bans, leases) is always kept. Cache entries
    /// and upstream candidates are dropped only when the upstream settings change. On error
    /// nothing changes.
    pub fn reload(&self, config: BrokerConfig) -> Result<ReloadSummary, proxy_broker_core::ConfigError> {
        let current = self.state.load_full();
        let next = State::build(config, Some(&current), &self.clock, &self.metrics)?;
        let summary = ReloadSummary::between(&current, &next);
        if summary.upstreams_changed {
            current.retire_endpoint_metrics(&next);
            self.brokering.clear_upstream_candidates();
        }
        self.brokering
            .reload(next.brokering.clone(), &next.config.proxy, next.ejection());
        // Watchers ask again only when what answers are made of changed: each re-ask counts a
        // connection attempt, so a reload of, say, log settings must not spend the fleet's budgets.
        let answers_changed =
            current.config.proxy != next.config.proxy || current.config.brokering != next.config.brokering;
        self.state.store(Arc::new(next));
        if answers_changed {
            self.reloads.send_modify(|n| *n += 1);
        }
        Ok(summary)
    }

    /// Refreshes gauges from live state, then renders the metrics text.
    pub async fn render_metrics(&self) -> String {
        self.state.load().refresh_gauges(&self.metrics);
        self.metrics.store_up.set(self.store_status.gauge_value());
        self.metrics.set_exchange_outages(
            self.brokering
                .exchanges()
                .await
                .iter()
                .map(|x| (x.exchange.as_str(), x.outage.is_some_and(|o| o.since.is_some()))),
        );
        self.metrics.render()
    }

    /// Answers one validated request, waiting for upstreams until `wait_until` at most (the
    /// caller's deadline or the server's per-call limit, whichever is earlier, less a margin to
    /// answer with a fallback). The upstream lookup itself is not bound by it.
    pub async fn request_proxy(
        &self,
        lookup: &Lookup,
        wait_until: Option<Instant>,
    ) -> Result<pb::ProxyResponse, Error> {
        self.request_answer(lookup, wait_until)
            .await
            .map(ProxyAnswer::into_response)
    }

    /// [`Broker::request_proxy`]'s answer as the server sends it: a cache hit's from the bytes
    /// its entry encoded once ([`Cached::hit_response`]).
    pub async fn request_answer(
        &self,
        lookup: &Lookup,
        wait_until: Option<Instant>,
    ) -> Result<ProxyAnswer, Error> {
        if let Some(answer) = self.answer_now(lookup, Instant::now()) {
            return Ok(answer);
        }
        Box::pin(self.answer_later(lookup, wait_until)).await
    }

    /// The answer when it is at hand: a cache hit of an exchange without a connection-attempt
    /// budget, chosen at once. No future is built for it, no timer armed, no deadline needed,
    /// and the lookup's large state is never allocated. `None`: [`Broker::request_answer`] has
    /// to choose (and maybe wait). `read_at` is the caller's reading of tokio's clock as the
    /// call started (the service has one): the broker's clock is not read again.
    pub fn answer_now(&self, lookup: &Lookup, read_at: Instant) -> Option<ProxyAnswer> {
        self.answer_now_in(&self.state.load(), lookup, read_at)
    }

    /// [`Broker::answer_now`] on `state`, a state in force the caller has loaded already (the
    /// cache-hit path loads one per call, for its auth check and its answer).
    pub fn answer_now_in(&self, state: &State, lookup: &Lookup, read_at: Instant) -> Option<ProxyAnswer> {
        state.delegation.as_ref()?;
        let started = self.clock.at(read_at);
        let ask = ask_for(lookup, state, Some(started));
        let picked = self.brokering.choose_delegated_now(&ask, &state.brokering)?;
        // This call asked nobody: an answer fetched since it started is another call's lookup.
        let upstream = self.count_pick(&picked, started, false);
        Some(self.delegated_answer(picked, upstream, Some(started)))
    }

    /// [`Broker::request_answer`] when [`Broker::answer_now`] had no answer: embedded, or the
    /// delegated choice that may refill and wait (it does not try [`Broker::answer_now`] again).
    pub async fn answer_later(
        &self,
        lookup: &Lookup,
        wait_until: Option<Instant>,
    ) -> Result<ProxyAnswer, Error> {
        let state = self.state.load_full();
        let ask = ask_for(lookup, &state, None);
        let Some(d) = &state.delegation else {
            return Box::pin(self.embedded(&state, &ask)).await.map(ProxyAnswer::from);
        };
        let started = self.clock.now();
        let ask = Ask {
            started: Some(started),
            ..ask
        };
        Box::pin(self.delegated(&state, d, lookup, &ask, started, wait_until)).await
    }

    /// [`Broker::request_answer`] when the answer is not at hand: candidates are chosen again,
    /// and refilled from the cache or upstream (this call's own lookup or one it joins) if none
    /// is eligible; then the fallbacks.
    async fn delegated(
        &self,
        state: &State,
        d: &Arc<Delegation>,
        lookup: &Lookup,
        ask: &Ask<'_>,
        started: Instant,
        wait_until: Option<Instant>,
    ) -> Result<ProxyAnswer, Error> {
        // Built only when needed (a refill or a fallback): a hit does not allocate it.
        let key = || {
            CacheKey::new(
                &lookup.exchange_id,
                lookup.connection_type,
                lookup.region.as_deref(),
            )
        };
        // Whether this call asked upstream itself (else it waited for another call's lookup).
        let asked = std::sync::atomic::AtomicBool::new(false);
        let choice = self.brokering.choose_delegated(ask, |exclude| {
            asked.store(true, Ordering::Relaxed);
            let (d, key) = (d.clone(), key());
            // Boxed: the lookup's state (hedged upstream calls) is large, and a hit never builds
            // it; unboxed it would make every call's future (moved a few times per call) as big.
            Box::pin(async move {
                let cached = self.refill(&d, key, lookup, exclude).await?;
                Ok(Some(Offer {
                    url: cached.proxy_url().to_owned(),
                    ttl: Duration::from_secs(u64::from(cached.ttl_seconds()))
                        .min(cached.fresh_until.saturating_duration_since(d.cache.now())),
                    weight: 1.0,
                    payload: cached,
                }))
            })
        });
        // A hit is ready at its first poll: only a call that has to wait arms a timer.
        let mut choice = std::pin::pin!(choice);
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(choice.as_mut().poll(cx))).await;
        // And it is answered as of when it started (no more clock reads); a call that waited
        // reads the clock again.
        let (choice, answered_at) = match (first, wait_until) {
            (std::task::Poll::Ready(choice), _) => (choice, Some(started)),
            (std::task::Poll::Pending, Some(deadline)) => (
                tokio::time::timeout_at(deadline, choice)
                    .await
                    .unwrap_or_else(|_| {
                        Err(NotPicked::Upstream(Some(RefillError::Failed(deadline_failure()))))
                    }),
                None,
            ),
            (std::task::Poll::Pending, None) => (choice.await, None),
        };
        match choice {
            Ok(picked) => {
                let upstream = self.count_pick(&picked, started, asked.load(Ordering::Relaxed));
                Ok(self.delegated_answer(picked, upstream, answered_at))
            }
            Err(NotPicked::Upstream(e)) => {
                let failures = match e {
                    Some(RefillError::FlightsFull) => None,
                    Some(RefillError::Failed(f)) => Some(f),
                    None => Some(Arc::new(vec![Failure {
                        endpoint: Arc::from("*"),
                        reason: "a concurrent upstream lookup for the same key failed".into(),
                    }])),
                };
                Box::pin(self.upstream_fallback(
                    state,
                    d,
                    &key(),
                    ask,
                    failures.as_deref().map(Vec::as_slice),
                ))
                .await
                .map(ProxyAnswer::from)
            }
            Err(NotPicked::Exhausted(e)) => {
                if state.config.proxy.external_service.fallback_to_embedded
                    && let Ok(Some(picked)) = Box::pin(self.brokering.choose_embedded(ask)).await
                {
                    tracing::debug!(exchange = %lookup.exchange_id, "upstream candidates exhausted: answering from the embedded configuration");
                    return Ok(self.embedded_answer(state, Some(&picked)).into());
                }
                Err(Error::ResourceExhausted {
                    message: e.message,
                    retry_after: e.retry_after,
                })
            }
            Err(NotPicked::Store(e)) => Err(Error::Unavailable(e.to_string())),
        }
    }

    /// One more candidate for `key`: a fresh cached answer not in `exclude`, else (fleet mode) a
    /// shared candidate not in `exclude`, else one more upstream lookup: joins (or starts) the
    /// key's single flight, sending `exclude` in `metadata.exclude_proxies`, and waits for it.
    async fn refill(
        &self,
        d: &Arc<Delegation>,
        key: CacheKey,
        lookup: &Lookup,
        exclude: Vec<Arc<str>>,
    ) -> Result<Arc<Cached>, RefillError> {
        // A fresh cached answer that is not a candidate yet (its set was evicted, or another
        // refill cached it): offer it without asking upstream.
        if let Some(hit) = d.cache.fresh(&key)
            && !exclude.iter().any(|u| **u == *hit.proxy_url())
        {
            return Ok(hit);
        }
        let store = self.brokering.store();
        let shared = store.shares_answers();
        // A shared store is asked inside the flight, once per key and replica, not by every
        // caller: a storm of callers for a few keys makes a few Redis round-trips, not one per
        // caller (which queued on the connection past `operation_timeout_ms`, opened the store's
        // breaker, and then every replica asked upstream on its own).
        let budget = self.brokering.budget(&lookup.exchange_id, lookup.connection_type);
        let ticket = d.flights.join(&key, || {
            let permit = d.flight_permits.clone().try_acquire_owned().ok()?;
            let (d, key, lookup) = (d.clone(), key.clone(), with_exclude(lookup, &exclude));
            let store = shared.then(|| store.clone());
            // The lookup stays in the trace of the call that started it (its upstream requests
            // carry that call's traceparent), though it outlives the call if need be.
            let span = tracing::Span::current();
            Some(
                async move {
                    let fetched = match store {
                        Some(store) => {
                            match d.shared_candidate(&*store, &key, &lookup, &exclude, budget).await {
                                // A candidate another replica fetched (now in this replica's cache
                                // too): the engine adds it to this replica's set, and refills again
                                // for the next one if it must.
                                Some(hit) => Ok(hit),
                                None => d.fetch_shared(&*store, key, &lookup, &exclude, budget).await,
                            }
                        }
                        None => d.fetch(key, &lookup).await,
                    };
                    drop(permit);
                    fetched
                }
                .instrument(span),
            )
        });
        let Some(ticket) = ticket else {
            return Err(RefillError::FlightsFull);
        };
        if !ticket.led {
            self.metrics.coalesced.inc();
        }
        // No deadline here: the caller's deadline bounds the whole choice (and dropping this
        // future leaves the lookup running). A deadline reported from here would be taken as
        // this refill's failure by every call waiting for it.
        match ticket.wait(None).await {
            Ok(Ok(cached)) => Ok(cached),
            Ok(Err(failures)) => Err(RefillError::Failed(failures)),
            Err(Missed::Deadline) => Err(RefillError::Failed(deadline_failure())),
            Err(Missed::Lost) => Err(RefillError::Failed(Arc::new(vec![Failure {
                endpoint: Arc::from("*"),
                reason: "the upstream lookup ended without an answer".into(),
            }]))),
        }
    }

    /// What a caller gets when upstreams did not answer (`failures`; `None`: the lookup could not
    /// start): the stale cached answer if it may be handed out, else the embedded configuration
    /// when `fallback_to_embedded`, else UNAVAILABLE (RESOURCE_EXHAUSTED when the lookup could
    /// not start).
    async fn upstream_fallback(
        &self,
        state: &State,
        d: &Delegation,
        key: &CacheKey,
        ask: &Ask<'_>,
        failures: Option<&[Failure]>,
    ) -> Result<pb::ProxyResponse, Error> {
        let why = failures.map_or_else(|| "too many upstream lookups in flight".to_owned(), summarise);
        if let Some(stale) = d.cache.stale(key) {
            match self.brokering.admit(ask, stale.proxy_url()).await {
                Ok(picked) => {
                    tracing::warn!(exchange = %key.exchange, failures = %why, "no upstream answer: serving a stale cached answer");
                    let mut answer = stale.stale_response(d.cache.now());
                    answer.lease_expires_at = Some(self.wall_time(picked.lease_expires_at));
                    return Ok(answer);
                }
                Err(_) => {
                    tracing::debug!(exchange = %key.exchange, "the stale cached answer may not be handed out (budget, ban or ejection)");
                }
            }
        }
        if state.config.proxy.external_service.fallback_to_embedded {
            tracing::warn!(exchange = %key.exchange, failures = %why, "no upstream answer: answering from the embedded configuration");
            return self.embedded(state, ask).await;
        }
        match failures {
            Some(failures) => Err(Error::Unavailable(format!(
                "every upstream proxy service failed and fallback_to_embedded is false: {}",
                summarise(failures)
            ))),
            None => Err(Error::ResourceExhausted {
                message: format!(
                    "{} upstream lookups are in flight (proxy.external_service.upstream_max_in_flight_total) and fallback_to_embedded is false: retry shortly",
                    d.flight_permits_total
                ),
                retry_after: FLIGHTS_FULL_RETRY,
            }),
        }
    }

    /// The embedded configuration's answer: EMBEDDED with a proxy with headroom, DIRECT when it
    /// names none, RESOURCE_EXHAUSTED when none of its proxies may be handed out now.
    async fn embedded(&self, state: &State, ask: &Ask<'_>) -> Result<pb::ProxyResponse, Error> {
        match self.brokering.choose_embedded(ask).await {
            Ok(picked) => Ok(self.embedded_answer(state, picked.as_ref())),
            Err(NotPicked::Exhausted(e)) => Err(Error::ResourceExhausted {
                message: e.message,
                retry_after: e.retry_after,
            }),
            Err(NotPicked::Store(e)) => Err(Error::Unavailable(e.to_string())),
            Err(NotPicked::Upstream(never)) => match never {
                Some(never) => match never {},
                None => Err(Error::Unavailable("no embedded proxy".into())),
            },
        }
    }

    /// An EMBEDDED answer for `picked`, DIRECT without one.
    fn embedded_answer(&self, state: &State, picked: Option<&Picked<EmbeddedPick>>) -> pb::ProxyResponse {
        let ttl_seconds = u32::try_from(state.embedded_ttl().as_secs()).unwrap_or(300);
        let mut metadata = prost_types::Struct::default();
        let Some(picked) = picked else {
            return pb::ProxyResponse {
                strategy: "direct".into(),
                ttl_seconds,
                fallback_policy: pb::FallbackPolicy::DirectConnection.into(),
                metadata: Some(metadata),
                source: pb::ProxySource::Direct.into(),
                ..Default::default()
            };
        };
        metadata.fields.insert(
            "timeout_seconds".into(),
            json_to_value(&picked.payload.timeout_seconds.into()),
        );
        pb::ProxyResponse {
            proxy_url: picked.url.to_string(),
            strategy: picked.payload.kind.as_str().to_owned(),
            ttl_seconds,
            fallback_policy: pb::FallbackPolicy::EmbeddedFallback.into(),
            metadata: Some(metadata),
            source: pb::ProxySource::Embedded.into(),
            upstream_endpoint: String::new(),
            lease_expires_at: Some(self.wall_time(picked.lease_expires_at)),
        }
    }

    /// Whether `picked` is an UPSTREAM answer for a call that started at `started` (it arrived
    /// since, else it is CACHE), counted as a cache hit, or as coalesced when the lookup that
    /// fetched it was another call's (`asked`: this call asked upstream itself).
    fn count_pick(&self, picked: &Picked<Arc<Cached>>, started: Instant, asked: bool) -> bool {
        let upstream = picked.payload.fetched_at >= started;
        if !upstream {
            self.metrics.cache_hits.inc();
        } else if !asked {
            self.metrics.coalesced.inc();
        }
        upstream
    }

    /// A CACHE answer (UPSTREAM when this call's lookup fetched it) for `picked`, as of `now` on
    /// the broker's clock (`None`: read it).
    fn delegated_answer(
        &self,
        picked: Picked<Arc<Cached>>,
        upstream: bool,
        now: Option<Instant>,
    ) -> ProxyAnswer {
        let now = now.unwrap_or_else(|| self.clock.now());
        let lease_expires_at = self.wall_time_at(picked.lease_expires_at, now);
        if upstream {
            let mut answer = picked.payload.upstream_response();
            answer.lease_expires_at = Some(lease_expires_at);
            answer.into()
        } else {
            // The answer keeps the entry the choice took (no reference counted again).
            picked.payload.hit_response(now, lease_expires_at)
        }
    }

    /// `at` on the broker's clock as a wall-clock timestamp.
    fn wall_time(&self, at: Instant) -> prost_types::Timestamp {
        self.wall_time_at(at, self.clock.now())
    }

    /// [`Broker::wall_time`] with the broker's clock read as `now` (a moment ago); an `at`
    /// already past is now.
    fn wall_time_at(&self, at: Instant, now: Instant) -> prost_types::Timestamp {
        crate::clock::wall_time(now, at.max(now))
    }

    /// Takes a validated feedback report: queues it for upstream (with `http_status` and
    /// `retry_after_seconds`), and lets the brokering engine judge it for (proxy, exchange): a
    /// ban (418/403/451) or penalty (429) for that exchange only, or a counted failure that
    /// ejects the proxy for that exchange after `eject_after_failures` in a row (unless the
    /// exchange is in an outage). A failure also ends the proxy's soonest lease.
    pub async fn report_feedback(&self, feedback: &Feedback) {
        let state = self.state.load_full();
        self.metrics.count_feedback(feedback.success);
        if let Some(d) = &state.delegation {
            let served_by = feedback.proxy_url.as_ref().and_then(|u| d.served_by(u));
            d.feedback.enqueue(Outgoing {
                served_by,
                body: d.upstreams.wire_feedback(feedback),
            });
        }
        let Some(url) = &feedback.proxy_url else { return };
        let report = Report {
            exchange: &feedback.exchange_id,
            proxy_url: url,
            success: feedback.success,
            http_status: feedback.http_status.map(u32::from),
            retry_after: feedback.retry_after,
        };
        match self.brokering.report(&report).await {
            Ok(reported) => {
                if reported.applied.ejected_until.is_some() {
                    self.ejections.fetch_add(1, Ordering::Relaxed);
                    self.metrics.ejections.inc();
                }
            }
            Err(e) => tracing::warn!(error = %e, "feedback not applied to the brokering state"),
        }
    }
}

/// The failure a caller's deadline stands for.
fn deadline_failure() -> Arc<Vec<Failure>> {
    Arc::new(vec![Failure {
        endpoint: Arc::from("*"),
        reason:
            "the caller's deadline came before the upstream lookup ended (it goes on and fills the cache)"
                .into(),
    }])
}

/// `lookup` with `exclude` added as `metadata.exclude_proxies` (a list of URLs), for upstreams
/// that can avoid them.
fn with_exclude(lookup: &Lookup, exclude: &[Arc<str>]) -> Lookup {
    let mut lookup = lookup.clone();
    if !exclude.is_empty() {
        let list = prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(prost_types::ListValue {
                values: exclude
                    .iter()
                    .map(|u| prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(u.to_string())),
                    })
                    .collect(),
            })),
        };
        lookup
            .metadata
            .get_or_insert_with(Default::default)
            .fields
            .insert("exclude_proxies".into(), list);
    }
    lookup
}

/// `endpoint: reason; ...` for logs and errors.
fn summarise(failures: &[Failure]) -> String {
    failures
        .iter()
        .map(|f| format!("{}: {}", f.endpoint, f.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What the engine is asked for `lookup` (embedded leases jittered from `state`'s TTL), started
/// at `started` on the broker's clock when the caller has read it.
fn ask_for<'a>(lookup: &'a Lookup, state: &State, started: Option<Instant>) -> Ask<'a> {
    Ask {
        exchange: &lookup.exchange_id,
        connection_type: lookup.connection_type,
        region: lookup.region.as_deref(),
        sticky_key: lookup.sticky_key.as_deref(),
        ttl: state.embedded_ttl(),
        started,
    }
}
