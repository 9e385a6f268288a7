//! The conformance table: the same cases against every [`Store`] implementation — the memory
//! store, the Redis store on a real `redis-server`, and the resilient fleet store around it —
//! so the semantics in the module docs of [`crate::store`] hold whichever backend runs.
//!
//! Time: the caller's clock is a [`ManualClock`]; "advancing" it also moves the Redis stores'
//! view of the server's clock (their test-only offset), so windows, bans and leases pass without
//! waiting. Key expiry (a server TTL) and answer TTLs run on real time: those cases poll with a
//! deadline.
#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/redis.rs"]
mod redis_server;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_broker_core::ConnectionType;
use proxy_broker_core::embedded::EJECTION_BASE;
use tokio::time::Instant;

pub(crate) use self::redis_server::{RedisCluster, RedisServer};
use super::memory::{BAN_MEMORY, DEFAULT_MAX_ENTRIES, FAILURE_MEMORY};
use super::redis::{RedisStore, Target};
use super::resilient::ResilientStore;
use super::{
    Attempt, BanLength, ChangeKind, DEFAULT_PAGE_SIZE, HandOut, MAX_ANSWER_BYTES, MAX_PAGE_SIZE,
    MAX_SHARED_ANSWERS, MAX_SHARED_ANSWERS_BYTES, MemoryStore, OutageReport, ProxyState, StateKey, Store,
    Transition,
};
use crate::brokering::settings::{Budget, MAX_BAN, OutageSettings};
use crate::clock::{Clock, ManualClock};

const WS: ConnectionType = ConnectionType::Websocket;
/// How far a Redis-backed deadline may be from the expected one (round trips, ms rounding).
const SLOP: Duration = Duration::from_millis(300);
/// Deadline for anything that happens on real time (key expiry, pub/sub delivery).
const DEADLINE: Duration = Duration::from_secs(15);

/// One store under test, with a second replica's view of the same state (`peer`: for the
/// memory store, the store itself).
pub(crate) struct Backend {
    pub name: &'static str,
    pub store: Arc<dyn Store>,
    pub peer: Arc<dyn Store>,
    pub clock: Arc<ManualClock>,
    memory: Option<Arc<MemoryStore>>,
    redis: Vec<Arc<RedisStore>>,
    resilient: Vec<Arc<ResilientStore>>,
}

impl Backend {
    fn memory() -> Self {
        let clock = Arc::new(ManualClock::new());
        let store = Arc::new(MemoryStore::new(DEFAULT_MAX_ENTRIES, clock.clone()));
        Self {
            name: "memory",
            store: store.clone(),
            peer: store.clone(),
            clock,
            memory: Some(store),
            redis: Vec::new(),
            resilient: Vec::new(),
        }
    }

    pub(crate) async fn redis_store(
        server: &RedisServer,
        prefix: &str,
        clock: Arc<ManualClock>,
    ) -> RedisStore {
        let client = ::redis::Client::open(server.url()).unwrap();
        RedisStore::new(Target::Single(client), prefix, Duration::from_secs(2), clock).unwrap()
    }

    async fn redis(server: &RedisServer, prefix: String) -> Self {
        let clock = Arc::new(ManualClock::new());
        let store = Arc::new(Self::redis_store(server, &prefix, clock.clone()).await);
        let peer = Arc::new(Self::redis_store(server, &prefix, clock.clone()).await);
        Self {
            name: "redis",
            store: store.clone(),
            peer: peer.clone(),
            clock,
            memory: None,
            redis: vec![store, peer],
            resilient: Vec::new(),
        }
    }

    fn cluster_store(cluster: &RedisCluster, prefix: &str, clock: Arc<ManualClock>) -> RedisStore {
        let urls = cluster.urls();
        let client = ::redis::cluster::ClusterClientBuilder::new(urls.clone())
            .build()
            .unwrap();
        let seeds = urls
            .iter()
            .map(|u| ::redis::Client::open(u.as_str()).unwrap())
            .collect();
        RedisStore::new(
            Target::Cluster { client, seeds },
            prefix,
            Duration::from_secs(2),
            clock,
        )
        .unwrap()
    }

    async fn cluster(cluster: &RedisCluster, prefix: String) -> Self {
        let clock = Arc::new(ManualClock::new());
        let store = Arc::new(Self::cluster_store(cluster, &prefix, clock.clone()));
        let peer = Arc::new(Self::cluster_store(cluster, &prefix, clock.clone()));
        Self {
            name: "redis cluster",
            store: store.clone(),
            peer: peer.clone(),
            clock,
            memory: None,
            redis: vec![store, peer],
            resilient: Vec::new(),
        }
    }

    async fn resilient(server: &RedisServer, prefix: String) -> Self {
        let clock = Arc::new(ManualClock::new());
        let make = |remote: RedisStore| {
            Arc::new(ResilientStore::new(
                remote,
                Duration::from_secs(2),
                clock.clone() as Arc<dyn Clock>,
            ))
        };
        let store = make(Self::redis_store(server, &prefix, clock.clone()).await);
        let peer = make(Self::redis_store(server, &prefix, clock.clone()).await);
        Self {
            name: "resilient(redis)",
            store: store.clone(),
            peer: peer.clone(),
            clock,
            memory: None,
            redis: Vec::new(),
            resilient: vec![store, peer],
        }
    }

    /// Waits until every Redis store's change feed is connected (as a replica's is soon after
    /// start), so a case sees the other replica's changes.
    async fn subscribed(&self) {
        let mut remotes: Vec<&RedisStore> = self.redis.iter().map(|r| &**r).collect();
        remotes.extend(self.resilient.iter().map(|r| r.remote()));
        for r in remotes {
            eventually("the change feed connects", || async { r.is_subscribed() }).await;
        }
    }

    /// Moves time forward for the caller and for the store.
    fn advance(&self, by: Duration) {
        self.clock.advance(by);
        for r in &self.redis {
            r.advance(by);
        }
        for r in &self.resilient {
            r.remote().advance(by);
        }
    }

    /// Lets idle entries go (the memory store purges on demand; Redis expires keys itself).
    fn purge(&self) {
        if let Some(m) = &self.memory {
            m.purge();
        }
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    async fn state(&self, proxy: &str, exchange: &str) -> Option<ProxyState> {
        self.store.state(key(proxy, exchange)).await.unwrap()
    }
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

#[track_caller]
fn near(actual: Duration, want: Duration, what: &str) {
    let diff = actual.abs_diff(want);
    assert!(diff <= SLOP, "{what}: {actual:?}, expected {want:?} (± {SLOP:?})");
}

#[track_caller]
fn near_instant(actual: Instant, want: Instant, what: &str) {
    let diff = if actual > want {
        actual - want
    } else {
        want - actual
    };
    assert!(diff <= SLOP, "{what}: {diff:?} apart");
}

/// Polls `check` until it holds, failing after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cases, one behaviour each.
#[derive(Debug, Clone, Copy)]
enum Case {
    BudgetHoldsUnder200ConcurrentAttemptsAcrossReplicas,
    FullWindowSaysWhenItFreesThenAdmits,
    BudgetsCountPerExchangeAndConnectionType,
    BansDoubleUpToTheCapAndAreForgottenAfterADay,
    ShorterBanOrPenaltyNeverShortensARunningOne,
    FeedbackForUnknownProxyCreatesNothingUnlessAsked,
    FailuresCountUntilSuccessEjectionOrAnHour,
    ReleaseEndsTheSoonestLeaseAndLeasesEnd,
    ChangesArePublishedToEveryReplica,
    ReplicasShareState,
    ListingPagesThroughEveryEntryOnce,
    BadPageTokenNamesTheField,
    IdleEntriesExpire,
    AnswersAreSharedAndExpire,
    FlightsLeadOnceAndAnnounceTheirEnd,
    OutagesAreJudgedFromEveryReplicasReports,
    SharedCandidatesKeepOnePerProxyEachWithItsTtl,
    SharedCandidatesAreBoundedInCountAndBytes,
}

const CASES: &[Case] = &[
    Case::BudgetHoldsUnder200ConcurrentAttemptsAcrossReplicas,
    Case::FullWindowSaysWhenItFreesThenAdmits,
    Case::BudgetsCountPerExchangeAndConnectionType,
    Case::BansDoubleUpToTheCapAndAreForgottenAfterADay,
    Case::ShorterBanOrPenaltyNeverShortensARunningOne,
    Case::FeedbackForUnknownProxyCreatesNothingUnlessAsked,
    Case::FailuresCountUntilSuccessEjectionOrAnHour,
    Case::ReleaseEndsTheSoonestLeaseAndLeasesEnd,
    Case::ChangesArePublishedToEveryReplica,
    Case::ReplicasShareState,
    Case::ListingPagesThroughEveryEntryOnce,
    Case::BadPageTokenNamesTheField,
    Case::IdleEntriesExpire,
    Case::AnswersAreSharedAndExpire,
    Case::FlightsLeadOnceAndAnnounceTheirEnd,
    Case::OutagesAreJudgedFromEveryReplicasReports,
    Case::SharedCandidatesKeepOnePerProxyEachWithItsTtl,
    Case::SharedCandidatesAreBoundedInCountAndBytes,
];

async fn run_case(case: Case, b: &Backend) {
    match case {
        Case::BudgetHoldsUnder200ConcurrentAttemptsAcrossReplicas => budget_holds(b).await,
        Case::FullWindowSaysWhenItFreesThenAdmits => window_frees(b).await,
        Case::BudgetsCountPerExchangeAndConnectionType => budgets_per_exchange_and_type(b).await,
        Case::BansDoubleUpToTheCapAndAreForgottenAfterADay => bans_double(b).await,
        Case::ShorterBanOrPenaltyNeverShortensARunningOne => never_shortened(b).await,
        Case::FeedbackForUnknownProxyCreatesNothingUnlessAsked => unknown_proxies(b).await,
        Case::FailuresCountUntilSuccessEjectionOrAnHour => failures_and_ejections(b).await,
        Case::ReleaseEndsTheSoonestLeaseAndLeasesEnd => leases(b).await,
        Case::ChangesArePublishedToEveryReplica => changes_published(b).await,
        Case::ReplicasShareState => replicas_share_state(b).await,
        Case::ListingPagesThroughEveryEntryOnce => listing(b).await,
        Case::BadPageTokenNamesTheField => bad_page_token(b).await,
        Case::IdleEntriesExpire => idle_entries_expire(b).await,
        Case::AnswersAreSharedAndExpire => answers(b).await,
        Case::FlightsLeadOnceAndAnnounceTheirEnd => flights(b).await,
        Case::OutagesAreJudgedFromEveryReplicasReports => outages(b).await,
        Case::SharedCandidatesKeepOnePerProxyEachWithItsTtl => shared_candidates(b).await,
        Case::SharedCandidatesAreBoundedInCountAndBytes => shared_candidates_bounded(b).await,
    }
}

async fn budget_holds(b: &Backend) {
    let budget = Some(Budget::new(25, 300));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = if i % 2 == 0 {
                b.store.clone()
            } else {
                b.peer.clone()
            };
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
    let st = b.state("http://p:1", "binance").await.unwrap();
    assert_eq!(st.hand_outs, 25);
    assert_eq!(st.live_leases, 25);
    assert_eq!(st.websocket.unwrap().used, 25);
    assert_eq!(st.websocket.unwrap().budget, Budget::new(25, 300));
}

async fn window_frees(b: &Backend) {
    let budget = Some(Budget::new(2, 10));
    let k = key("http://p:1", "okx");
    for _ in 0..2 {
        let attempt = b.store.try_attempt(k, hand_out(budget)).await.unwrap();
        assert!(matches!(attempt, Attempt::Admitted { .. }), "{attempt:?}");
    }
    b.advance(Duration::from_secs(4));
    let Attempt::Exhausted { retry_after } = b.store.try_attempt(k, hand_out(budget)).await.unwrap() else {
        panic!("admitted over budget");
    };
    near(retry_after, Duration::from_secs(6), "retry_after");
    let frees_at = b
        .state(k.proxy, k.exchange)
        .await
        .unwrap()
        .websocket
        .unwrap()
        .frees_at
        .unwrap();
    near_instant(frees_at, b.now() + Duration::from_secs(6), "frees_at");
    b.advance(retry_after + Duration::from_millis(5));
    assert_eq!(
        b.store.try_attempt(k, hand_out(budget)).await.unwrap(),
        Attempt::Admitted { used: 1, budget }
    );
}

async fn budgets_per_exchange_and_type(b: &Backend) {
    let budget = Some(Budget::new(1, 60));
    let p = "http://p:1";
    let http = HandOut {
        connection_type: ConnectionType::Http,
        ..hand_out(budget)
    };
    // (row, key, hand-out, admitted)
    let rows = [
        ("first binance ws", key(p, "binance"), hand_out(budget), true),
        ("second binance ws", key(p, "binance"), hand_out(budget), false),
        ("bybit ws", key(p, "bybit"), hand_out(budget), true),
        ("binance http", key(p, "binance"), http, true),
    ];
    for (row, k, h, admitted) in rows {
        let attempt = b.store.try_attempt(k, h).await.unwrap();
        assert_eq!(
            matches!(attempt, Attempt::Admitted { .. }),
            admitted,
            "row {row}: {attempt:?}"
        );
    }
}

async fn bans_double(b: &Backend) {
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
        let start = b.now();
        let until = b.store.ban(k, length, true).await.unwrap().unwrap();
        near(until - start, Duration::from_secs(secs), row);
        assert!(
            b.state(k.proxy, k.exchange).await.unwrap().banned_until.is_some(),
            "{row}"
        );
        b.advance(Duration::from_secs(secs));
    }
    b.advance(BAN_MEMORY + Duration::from_millis(10));
    let start = b.now();
    let until = b.store.ban(k, length, true).await.unwrap().unwrap();
    near(
        until - start,
        base,
        "a ban a day after the last one is a first ban again",
    );
    assert_eq!(b.state(k.proxy, k.exchange).await.unwrap().ban_strikes, 1);
}

async fn never_shortened(b: &Backend) {
    let k = key("http://p:1", "binance");
    let long = b
        .store
        .ban(k, BanLength::Exactly(Duration::from_secs(600)), true)
        .await
        .unwrap();
    let short = b
        .store
        .ban(k, BanLength::Exactly(Duration::from_secs(10)), true)
        .await
        .unwrap();
    near_instant(short.unwrap(), long.unwrap(), "ban");
    let long = b.store.penalise(k, Duration::from_secs(60), true).await.unwrap();
    let short = b.store.penalise(k, Duration::from_secs(1), true).await.unwrap();
    near_instant(short.unwrap(), long.unwrap(), "penalty");
    let huge = b
        .store
        .ban(k, BanLength::Exactly(Duration::MAX), true)
        .await
        .unwrap()
        .unwrap();
    assert!(huge <= b.now() + MAX_BAN + SLOP, "a ban is at most a day");
}

async fn unknown_proxies(b: &Backend) {
    let s = &b.store;
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
    assert_eq!(b.state(k.proxy, k.exchange).await, None);
    assert_eq!(s.list(None, None, 0).await.unwrap().entries, vec![]);
    assert_eq!(s.record_failure(k, true).await.unwrap(), Some(1));
    assert_eq!(
        b.state(k.proxy, k.exchange).await.unwrap().consecutive_failures,
        1
    );
}

async fn failures_and_ejections(b: &Backend) {
    let s = &b.store;
    let k = key("http://p:1", "kraken");
    for n in 1..=3 {
        assert_eq!(s.record_failure(k, true).await.unwrap(), Some(n));
    }
    s.record_success(k).await.unwrap();
    assert_eq!(s.record_failure(k, true).await.unwrap(), Some(1));
    b.advance(FAILURE_MEMORY);
    assert_eq!(
        s.record_failure(k, true).await.unwrap(),
        Some(1),
        "an hour of quiet forgets"
    );
    let first = s.eject(k, true).await.unwrap().unwrap();
    near(first - b.now(), EJECTION_BASE, "first ejection");
    let st = b.state(k.proxy, k.exchange).await.unwrap();
    assert_eq!((st.consecutive_failures, st.ejections), (0, 1));
    let second = s.eject(k, true).await.unwrap().unwrap();
    near(second - b.now(), EJECTION_BASE * 2, "second ejection");
    assert!(s.lift_ejection(k).await.unwrap());
    assert!(!s.lift_ejection(k).await.unwrap(), "nothing left to lift");
    let st = b.state(k.proxy, k.exchange).await.unwrap();
    assert_eq!((st.ejected_until, st.ejections), (None, 1));
}

/// A budget these cases never reach: hand-outs without a budget stay replica-local in a shared
/// store (no Redis round-trip for them), so cases about shared entries count against one.
const GENEROUS: Budget = Budget::new(100_000, 3600);

async fn leases(b: &Backend) {
    let s = &b.store;
    let k = key("http://p:1", "binance");
    for secs in [30, 10, 20] {
        let h = HandOut {
            lease: Duration::from_secs(secs),
            ..hand_out(Some(GENEROUS))
        };
        s.try_attempt(k, h).await.unwrap();
    }
    assert_eq!(b.state(k.proxy, k.exchange).await.unwrap().live_leases, 3);
    assert!(s.release(k).await.unwrap());
    b.advance(Duration::from_secs(25));
    // The 10 s lease was released, the 20 s one ended: the 30 s one is left.
    assert_eq!(b.state(k.proxy, k.exchange).await.unwrap().live_leases, 1);
    b.advance(Duration::from_millis(5_010));
    assert_eq!(b.state(k.proxy, k.exchange).await.unwrap().live_leases, 0);
    assert!(!s.release(k).await.unwrap());
    assert_eq!(b.state(k.proxy, k.exchange).await.unwrap().hand_outs, 3);
}

async fn changes_published(b: &Backend) {
    let mut mine = b.store.subscribe();
    let mut theirs = b.peer.subscribe();
    let k = key("http://u:pw@p:1", "binance");
    b.store
        .ban(k, BanLength::Exactly(Duration::from_secs(5)), true)
        .await
        .unwrap();
    b.store.penalise(k, Duration::from_secs(5), true).await.unwrap();
    b.store.eject(k, true).await.unwrap();
    b.store.lift_ejection(k).await.unwrap();
    for (who, feed) in [("this replica", &mut mine), ("the other replica", &mut theirs)] {
        let mut kinds = Vec::new();
        for _ in 0..4 {
            let change = tokio::time::timeout(DEADLINE, feed.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((&*change.proxy, &*change.exchange), (k.proxy, "binance"), "{who}");
            assert!(
                !format!("{change:?}").contains("pw"),
                "{who}: Debug shows the password"
            );
            kinds.push(change.kind);
        }
        assert!(matches!(kinds[0], ChangeKind::Banned(_)), "{who}: {kinds:?}");
        assert!(matches!(kinds[1], ChangeKind::Penalised(_)), "{who}: {kinds:?}");
        assert!(matches!(kinds[2], ChangeKind::Ejected(_)), "{who}: {kinds:?}");
        assert_eq!(kinds[3], ChangeKind::Lifted, "{who}");
        if let ChangeKind::Banned(until) = kinds[0] {
            near_instant(until, b.now() + Duration::from_secs(5), who);
        }
    }
    assert!(!format!("{:?}", b.store).contains("pw"));
}

async fn replicas_share_state(b: &Backend) {
    let k = key("http://p:1", "bybit");
    let until = b
        .store
        .ban(k, BanLength::Exactly(Duration::from_secs(60)), true)
        .await
        .unwrap()
        .unwrap();
    let seen = b.peer.state(k).await.unwrap().unwrap();
    near_instant(
        seen.banned_until.unwrap(),
        until,
        "the other replica's view of the ban",
    );
    assert_eq!(seen.ban_strikes, 1);
    b.peer.record_failure(k, false).await.unwrap();
    assert_eq!(
        b.state(k.proxy, k.exchange).await.unwrap().consecutive_failures,
        1
    );
}

async fn listing(b: &Backend) {
    let s = &b.store;
    let h = hand_out(Some(GENEROUS));
    let mut expected = HashSet::new();
    for i in 0..57 {
        let proxy = format!("http://user:secret{i}@p{i}:1");
        let exchange = ["binance", "bybit", "okx"][i % 3];
        s.try_attempt(key(&proxy, exchange), h).await.unwrap();
        expected.insert((proxy, exchange.to_owned()));
    }
    for (filter, page_size) in [
        (None, 10),
        (Some("bybit"), 4),
        (None, 0),
        (None, 5000),
        (Some("kraken"), 3),
    ] {
        let mut seen = HashSet::new();
        let mut token: Option<String> = None;
        let mut last_order: Option<String> = None;
        loop {
            let page = b.peer.list(filter, token.as_deref(), page_size).await.unwrap();
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
                assert_eq!(row.state.live_leases, 1);
                let order = format!(
                    "{},{:016x}",
                    row.exchange,
                    crate::brokering::sticky::digest64(&[row.proxy.as_bytes()])
                );
                assert!(last_order.as_ref().is_none_or(|l| *l < order), "out of order");
                last_order = Some(order);
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

async fn bad_page_token(b: &Backend) {
    for token in [
        "nonsense",
        "binance/xyz",
        "binance/0123456789abcdefg",
        "/",
        "http://u:pw@h:1",
    ] {
        let err = b.store.list(None, Some(token), 10).await.unwrap_err().to_string();
        assert!(
            err.starts_with("page_token: ") && err.contains("not a page token"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
    }
}

async fn idle_entries_expire(b: &Backend) {
    let leased = key("http://leased:1", "binance");
    let penalised = key("http://penalised:1", "binance");
    let banned = key("http://banned:1", "binance");
    let short = HandOut {
        lease: Duration::from_millis(300),
        ..hand_out(Some(Budget::new(100_000, 1)))
    };
    b.store.try_attempt(leased, short).await.unwrap();
    b.store
        .penalise(penalised, Duration::from_millis(300), true)
        .await
        .unwrap();
    b.store
        .ban(banned, BanLength::Exactly(Duration::from_millis(300)), true)
        .await
        .unwrap();
    for k in [leased, penalised] {
        eventually("an idle entry goes", || async {
            b.purge();
            b.state(k.proxy, k.exchange).await.is_none()
        })
        .await;
    }
    b.purge();
    let st = b.state(banned.proxy, banned.exchange).await;
    assert_eq!(
        st.map(|s| (s.banned_until, s.ban_strikes)),
        Some((None, 1)),
        "a past ban is remembered for a day (its repeat doubles)"
    );
}

async fn answers(b: &Backend) {
    let s = &b.store;
    s.put_answer("binance/websocket/eu", b"answer-1", Duration::from_secs(60))
        .await
        .unwrap();
    for who in [&b.store, &b.peer] {
        let (bytes, left) = who.get_answer("binance/websocket/eu").await.unwrap().unwrap();
        assert_eq!(bytes, b"answer-1");
        assert!(
            left <= Duration::from_secs(60) && left > Duration::from_secs(58),
            "{left:?}"
        );
    }
    s.put_answer("binance/websocket/eu", b"answer-2", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        b.peer
            .get_answer("binance/websocket/eu")
            .await
            .unwrap()
            .unwrap()
            .0,
        b"answer-2"
    );
    // (row, key, bytes, ttl): none of these is kept
    let big = vec![7u8; MAX_ANSWER_BYTES + 1];
    let rows: [(&str, &str, &[u8], Duration); 2] = [
        ("too large", "big", &big, Duration::from_secs(60)),
        ("no ttl", "zero", b"x", Duration::ZERO),
    ];
    for (row, k, bytes, ttl) in rows {
        s.put_answer(k, bytes, ttl).await.unwrap();
        assert_eq!(s.get_answer(k).await.unwrap(), None, "row {row}");
    }
    assert_eq!(s.get_answer("never").await.unwrap(), None);
    s.put_answer("short", b"x", Duration::from_millis(200))
        .await
        .unwrap();
    eventually("an answer expires", || async {
        s.get_answer("short").await.unwrap().is_none()
    })
    .await;
}

async fn flights(b: &Backend) {
    let mut ended = b.peer.flights();
    let k = "binance/websocket/";
    assert!(
        b.store.lead_flight(k, Duration::from_secs(30)).await.unwrap(),
        "first leads"
    );
    assert!(
        !b.store.lead_flight(k, Duration::from_secs(30)).await.unwrap(),
        "held"
    );
    assert!(
        !b.peer.lead_flight(k, Duration::from_secs(30)).await.unwrap(),
        "held fleet-wide"
    );
    b.store.end_flight(k).await.unwrap();
    let key = tokio::time::timeout(DEADLINE, ended.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&*key, k);
    assert!(
        b.peer.lead_flight(k, Duration::from_secs(30)).await.unwrap(),
        "free again"
    );
    b.peer.end_flight(k).await.unwrap();
    // A leader that dies frees the lock when it expires.
    assert!(
        b.store
            .lead_flight("orphan", Duration::from_millis(200))
            .await
            .unwrap()
    );
    eventually("an orphaned lock expires", || async {
        b.peer
            .lead_flight("orphan", Duration::from_secs(30))
            .await
            .unwrap()
    })
    .await;
}

async fn outages(b: &Backend) {
    let rule = OutageSettings {
        failing_fraction: 0.5,
        window_seconds: 60,
        min_proxies: 2,
    };
    let p = |i: usize| format!("http://user:pw@p{i}:1");
    let (s, peer) = (&b.store, &b.peer);
    let report = |store: &Arc<dyn Store>, i: usize, failing: bool| {
        let (store, proxy) = (store.clone(), p(i));
        async move { store.outage_report("okx", &proxy, failing, &rule).await.unwrap() }
    };
    let status = |store: &Arc<dyn Store>| {
        let store = store.clone();
        async move {
            let all = store.outages(Some("okx"), &rule).await.unwrap();
            assert!(all.len() <= 1, "{all:?}");
            all.first().map(|(x, st)| {
                assert_eq!(&**x, "okx");
                *st
            })
        }
    };
    assert!(!s.outage_note_ejection("okx", &p(9), &rule).await.unwrap());
    let first = report(s, 1, true).await;
    assert_eq!(first, OutageReport::default(), "one failing proxy is not enough");
    // The second failing proxy reports to the other replica: it starts the outage and gets the
    // ejection noted by the first to lift.
    let started = report(peer, 2, true).await;
    assert_eq!(
        started.transition,
        Transition::Started {
            lift: vec![Arc::from(p(9).as_str())]
        }
    );
    assert!(started.in_outage);
    for store in [s, peer] {
        let st = status(store).await.unwrap();
        assert_eq!((st.reporters, st.failing), (2, 2));
        near_instant(st.since.unwrap(), b.now(), "the outage's start");
    }
    let listed = peer.outages(None, &rule).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        s.outage_note_ejection("okx", &p(3), &rule).await.unwrap(),
        "an ejection during the outage is the caller's to lift"
    );
    assert_eq!(report(s, 3, true).await.transition, Transition::None);
    assert_eq!(
        report(peer, 1, false).await,
        OutageReport {
            transition: Transition::None,
            in_outage: true
        },
        "2 of 3 still fail"
    );
    assert_eq!(
        report(s, 2, false).await.transition,
        Transition::Ended,
        "the latest report of each proxy counts, whoever took it"
    );
    assert!(status(peer).await.unwrap().since.is_none());
    // Another outage, then its reports age out: it shows no more, and nothing is listed.
    assert_eq!(
        report(peer, 1, true).await.transition,
        Transition::Started { lift: vec![] },
        "2 of 3 fail again; the ejection made during the last outage was not noted for a lift"
    );
    b.advance(Duration::from_secs(59));
    assert!(status(peer).await.unwrap().since.is_some());
    b.advance(Duration::from_secs(2));
    for store in [s, peer] {
        let st = status(store).await;
        assert!(
            st.is_none_or(|st| st.since.is_none() && st.reporters == 0),
            "{st:?}"
        );
        assert!(store.outages(None, &rule).await.unwrap().is_empty());
    }
    // Other exchanges were never touched.
    assert!(s.outages(Some("binance"), &rule).await.unwrap().is_empty());
}

/// A key's shared candidates as `(bytes, remaining secs)` seen by `who`, longest-lived first.
async fn candidates_of(who: &Arc<dyn Store>, k: &str) -> Vec<(String, Duration)> {
    who.get_answers(k)
        .await
        .unwrap()
        .into_iter()
        .map(|(bytes, left)| (String::from_utf8(bytes).unwrap(), left))
        .collect()
}

#[track_caller]
fn assert_candidates(seen: &[(String, Duration)], want: &[(&str, u64)], what: &str) {
    let names: Vec<&str> = seen.iter().map(|(b, _)| b.as_str()).collect();
    let wanted: Vec<&str> = want.iter().map(|(b, _)| *b).collect();
    assert_eq!(names, wanted, "{what}");
    for ((bytes, left), (_, secs)) in seen.iter().zip(want) {
        near(
            *left,
            Duration::from_secs(*secs),
            &format!("{what}: {bytes}'s TTL"),
        );
    }
}

async fn shared_candidates(b: &Backend) {
    let k = "binance/websocket/eu";
    let p1 = "socks5://user:pw-1@p1:1080";
    let p2 = "socks5://p2:1080";
    let p3 = "socks5://p3:1080";
    let add = |who: &Arc<dyn Store>, proxy: &'static str, bytes: &'static str, secs: u64| {
        let who = who.clone();
        async move {
            who.add_answer(k, proxy, bytes.as_bytes(), Duration::from_secs(secs))
                .await
                .unwrap();
        }
    };
    assert!(b.store.get_answers(k).await.unwrap().is_empty(), "none yet");
    add(&b.store, p1, "a1", 60).await;
    add(&b.peer, p2, "a2", 120).await;
    add(&b.store, p3, "a3", 30).await;
    for who in [&b.store, &b.peer] {
        assert_candidates(
            &candidates_of(who, k).await,
            &[("a2", 120), ("a1", 60), ("a3", 30)],
            "three proxies, longest-lived first, on either replica",
        );
    }
    // The latest answer is another operation: the set does not touch it, nor it the set.
    assert_eq!(b.peer.get_answer(k).await.unwrap(), None);
    // Adding a proxy again replaces its answer and restarts its TTL: still one per proxy.
    add(&b.peer, p1, "a1-again", 200).await;
    assert_candidates(
        &candidates_of(&b.store, k).await,
        &[("a1-again", 200), ("a2", 120), ("a3", 30)],
        "p1 refreshed",
    );
    // Each answer expires on its own.
    b.advance(Duration::from_secs(31));
    assert_candidates(
        &candidates_of(&b.peer, k).await,
        &[("a1-again", 169), ("a2", 89)],
        "p3's answer expired",
    );
    b.advance(Duration::from_secs(90));
    add(&b.store, p3, "a3-later", 10).await;
    assert_candidates(
        &candidates_of(&b.peer, k).await,
        &[("a1-again", 79), ("a3-later", 10)],
        "p2's answer expired (and an add drops it), p3 is back",
    );
    // (row, key, bytes, ttl): none of these is kept
    let big = vec![7u8; MAX_ANSWER_BYTES + 1];
    let rows: [(&str, &str, &[u8], Duration); 2] = [
        ("too large", "big", &big, Duration::from_secs(60)),
        ("no ttl", "zero", b"x", Duration::ZERO),
    ];
    for (row, k, bytes, ttl) in rows {
        b.store.add_answer(k, p1, bytes, ttl).await.unwrap();
        assert!(b.peer.get_answers(k).await.unwrap().is_empty(), "row {row}");
    }
    // Other keys are other sets.
    assert!(
        b.peer
            .get_answers("binance/websocket/us")
            .await
            .unwrap()
            .is_empty()
    );
    // Concurrent adds from both replicas lose none.
    let adds: Vec<_> = (0..20)
        .map(|i| {
            let who = if i % 2 == 0 {
                b.store.clone()
            } else {
                b.peer.clone()
            };
            tokio::spawn(async move {
                let proxy = format!("socks5://c{i}:1080");
                who.add_answer("concurrent", &proxy, proxy.as_bytes(), Duration::from_secs(60))
                    .await
                    .unwrap();
            })
        })
        .collect();
    for a in adds {
        a.await.unwrap();
    }
    let kept: HashSet<String> = candidates_of(&b.peer, "concurrent")
        .await
        .into_iter()
        .map(|(bytes, _)| bytes)
        .collect();
    assert_eq!(kept.len(), 20, "{kept:?}");
}

async fn shared_candidates_bounded(b: &Backend) {
    // Count: the soonest-ending go first.
    let extra = 5;
    for i in 0..MAX_SHARED_ANSWERS + extra {
        let proxy = format!("socks5://p{i}:1080");
        b.store
            .add_answer(
                "many",
                &proxy,
                proxy.as_bytes(),
                Duration::from_secs(100 + i as u64),
            )
            .await
            .unwrap();
    }
    let kept = candidates_of(&b.peer, "many").await;
    assert_eq!(kept.len(), MAX_SHARED_ANSWERS);
    let want: Vec<String> = (extra..MAX_SHARED_ANSWERS + extra)
        .rev()
        .map(|i| format!("socks5://p{i}:1080"))
        .collect();
    assert_eq!(kept.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(), want);
    // ... but never the one being added, however soon it ends.
    b.peer
        .add_answer("many", "socks5://short:1080", b"short", Duration::from_secs(5))
        .await
        .unwrap();
    let kept = candidates_of(&b.store, "many").await;
    assert_eq!(kept.len(), MAX_SHARED_ANSWERS);
    assert_eq!(kept.last().map(|(b, _)| b.as_str()), Some("short"));
    assert!(
        !kept.iter().any(|(b, _)| *b == format!("socks5://p{extra}:1080")),
        "the soonest-ending of the others made room"
    );
    // Bytes: at most MAX_SHARED_ANSWERS_BYTES per key.
    let fit = MAX_SHARED_ANSWERS_BYTES / MAX_ANSWER_BYTES;
    for i in 0..fit + 2 {
        let bytes = vec![b'a' + i as u8; MAX_ANSWER_BYTES];
        b.store
            .add_answer(
                "large",
                &format!("socks5://l{i}:1080"),
                &bytes,
                Duration::from_secs(100 + i as u64),
            )
            .await
            .unwrap();
    }
    let kept = b.peer.get_answers("large").await.unwrap();
    assert_eq!(kept.len(), fit);
    assert!(kept.iter().map(|(b, _)| b.len()).sum::<usize>() <= MAX_SHARED_ANSWERS_BYTES);
    assert_eq!(
        kept.first().map(|(b, _)| b[0]),
        Some(b'a' + (fit + 1) as u8),
        "the last added is kept"
    );
}

/// Runs every case on a fresh backend from `make`, and fails naming each failed case.
async fn conform<F, Fut>(make: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Backend>,
{
    let mut failed = Vec::new();
    for (i, &case) in CASES.iter().enumerate() {
        let backend = Arc::new(make(i).await);
        backend.subscribed().await;
        let name = backend.name;
        let b = backend.clone();
        let run = tokio::spawn(async move { run_case(case, &b).await });
        if let Err(e) = run.await {
            failed.push(format!("{name}: {case:?}: {e}"));
        }
    }
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
}

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

fn prefix() -> String {
    format!("t{}:", PREFIXES.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_memory_store_conforms() {
    conform(|_| async { Backend::memory() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_redis_store_conforms() {
    let server = RedisServer::start();
    conform(|_| Backend::redis(&server, prefix())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_redis_store_conforms_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    conform(|_| Backend::cluster(&cluster, prefix())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_resilient_store_conforms_while_redis_is_up() {
    let server = RedisServer::start();
    conform(|_| Backend::resilient(&server, prefix())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redis_key_expires_and_no_key_name_holds_a_proxy_url() {
    let server = RedisServer::start();
    let b = Backend::redis(&server, "ttl:".to_owned()).await;
    let k = key("http://user:secret-pw@proxy-host.example:3128", "binance");
    b.store
        .try_attempt(k, hand_out(Some(Budget::new(5, 60))))
        .await
        .unwrap();
    b.store
        .try_attempt(
            k,
            HandOut {
                connection_type: ConnectionType::Http,
                ..hand_out(Some(Budget::new(5, 60)))
            },
        )
        .await
        .unwrap();
    b.store
        .ban(k, BanLength::Exactly(Duration::from_secs(60)), true)
        .await
        .unwrap();
    b.store.record_failure(k, true).await.unwrap();
    b.store
        .put_answer("binance/websocket/", b"a", Duration::from_secs(60))
        .await
        .unwrap();
    b.store
        .lead_flight("binance/websocket/", Duration::from_secs(60))
        .await
        .unwrap();
    let rule = OutageSettings {
        failing_fraction: 0.5,
        window_seconds: 60,
        min_proxies: 1,
    };
    b.store
        .outage_note_ejection("binance", k.proxy, &rule)
        .await
        .unwrap();
    let started = b
        .store
        .outage_report("binance", k.proxy, true, &rule)
        .await
        .unwrap();
    assert!(started.in_outage);
    let mut conn = ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    // entry, two windows, leases, index, answer, flight lock; the outage's reporters, failing
    // reporters, start, index marker (its ejections were lifted: no key) and exchange index
    assert_eq!(keys.len(), 12, "{keys:?}");
    for name in keys {
        assert!(name.starts_with("ttl:"), "{name} is outside the key prefix");
        assert!(
            !name.contains("secret") && !name.contains("proxy-host"),
            "{name} holds the URL"
        );
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{name} has no TTL ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_candidate_keys_expire_share_a_slot_and_hold_no_proxy_url() {
    let server = RedisServer::start();
    let b = Backend::redis(&server, "cand:".to_owned()).await;
    let secret = "http://user:secret-pw@proxy-host.example:3128";
    for (proxy, secs) in [(secret, 60), ("socks5://other:1080", 30)] {
        b.store
            .add_answer("binance/websocket/", proxy, b"answer", Duration::from_secs(secs))
            .await
            .unwrap();
    }
    let mut conn = ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    // the ends and the bytes
    assert_eq!(keys.len(), 2, "{keys:?}");
    let mut tags = HashSet::new();
    for name in &keys {
        assert!(name.starts_with("cand:"), "{name} is outside the key prefix");
        assert!(
            !name.contains("secret") && !name.contains("proxy-host") && !name.contains("binance"),
            "{name} holds the URL or the cache key"
        );
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(name)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 59_000 && ttl <= 61_000,
            "{name} lives as long as its longest-lived answer ({ttl} ms)"
        );
        // One Cluster slot for both: the same hash tag.
        let tag = name
            .split_once('{')
            .and_then(|(_, t)| t.split_once('}'))
            .map(|(t, _)| t.to_owned());
        tags.insert(tag.expect("a hash tag"));
        let mut members = if name.ends_with(":se") {
            ::redis::cmd("ZRANGE")
        } else {
            ::redis::cmd("HKEYS")
        };
        members.arg(name);
        if name.ends_with(":se") {
            members.arg(0).arg(-1);
        }
        let members: Vec<String> = members.query_async(&mut conn).await.unwrap();
        assert_eq!(members.len(), 2, "{name}: {members:?}");
        assert!(
            members
                .iter()
                .all(|m| !m.contains("secret") && !m.contains("proxy-host")),
            "{name}'s members hold the URL: {members:?}"
        );
    }
    assert_eq!(tags.len(), 1, "both keys under one hash tag: {keys:?}");
}
