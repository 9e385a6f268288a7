//! Fleet mode end to end: a real `redis-server` on loopback (persistence off) and two or three
//! real broker processes sharing it (`store.backend: redis`), each delegating to the same loopback
//! upstream. A ban reported to one replica holds on the others (admin view, hand-outs and
//! `WatchProxy` streams); a connection-attempt budget holds across replicas; Redis killed in the
//! middle of a load fails no call and `proxy_broker_store_up` follows it down and back up (state
//! shared again afterwards); the store password never reaches logs, admin output or metrics; a
//! storm spread over the replica processes makes one upstream call per key (with and without a
//! budget), and the other replica then answers from its cache; callers following another
//! replica's flight are not stranded when that leader dies or cannot reach Redis to publish;
//! `proxy_broker_store_up` says 0 whenever Redis cannot be used, also on an idle replica; an
//! exchange outage is judged from the reports every replica took, and the replica that sees it
//! start lifts ejections made on another; a replica whose candidates are exhausted takes the
//! candidates another replica already fetched before it asks upstream again.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::ops::{BrokerProcess, ConfigDir, Exposition, PROMPT, Reply, Upstream, eventually, scrape};
use common::redis::RedisServer;
use proxy_broker::pb::proxy_broker_admin_client::ProxyBrokerAdminClient;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{
    ConnectionType, GetEffectiveConfigRequest, ListExchangesRequest, ListProxiesRequest, ProxyFeedback,
    ProxyRequest, ProxyResponse, ProxyState, ProxyStatus,
};
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;

/// `operation_timeout_ms` for the tests about shared semantics (bans, budgets, single flight).
/// The machine running them is shared and often loaded: with the default 50 ms a slow Redis
/// answer would send a replica to its local state (budgets per replica, by design), and the test
/// would be measuring the machine's load instead of the sharing. The outage tests keep the default.
const PATIENT_STORE_MS: u32 = 2_000;

/// One broker process of the fleet, serving.
struct Replica {
    process: BrokerProcess,
    channel: Channel,
}

impl Replica {
    fn client(&self) -> ProxyBrokerClient<Channel> {
        ProxyBrokerClient::new(self.channel.clone())
    }

    fn admin(&self) -> ProxyBrokerAdminClient<Channel> {
        ProxyBrokerAdminClient::new(self.channel.clone())
    }

    async fn metrics(&self) -> Exposition {
        Exposition::parse(&scrape(self.process.metrics_addr).await)
    }

    async fn store_up(&self) -> f64 {
        self.metrics().await.value("proxy_broker_store_up", &[])
    }

    async fn proxies(&self, exchange: &str) -> Vec<ProxyStatus> {
        self.admin()
            .list_proxies(ListProxiesRequest {
                exchange_id: exchange.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .proxies
    }

    async fn ask(&self, exchange: &str) -> Result<ProxyResponse, tonic::Status> {
        self.client()
            .request_proxy(websocket(exchange))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// The configuration every replica of a test reads: delegation to `upstream` without the embedded
/// fallback, `brokering` (the block's body), and the Redis store under `key_prefix`. `store_extra`
/// adds lines under `store.redis` (indented by 4).
fn fleet_yaml(
    upstream: &Upstream,
    redis_url: &str,
    key_prefix: &str,
    store_extra: &str,
    brokering: &str,
) -> String {
    format!(
        r#"
proxy:
  enabled: true
  external_service:
    enabled: true
    endpoints: ["{upstream}"]
    auth_credentials: {{ token: "t0ken" }}
    fallback_to_embedded: false
brokering:
  known_exchange_limits: true
{brokering}
store:
  backend: redis
  redis:
    url: "{redis_url}"
    key_prefix: "{key_prefix}"
{store_extra}
"#,
        upstream = upstream.url(),
    )
}

/// Starts `n` replicas on `config` with `env`, all at once, and waits until each serves.
async fn replicas(config: &ConfigDir, n: usize, env: &[(&str, &str)]) -> Vec<Replica> {
    let mut processes: Vec<BrokerProcess> = (0..n)
        .map(|_| BrokerProcess::spawn(Some(&config.path), env))
        .collect();
    let mut out = Vec::with_capacity(n);
    for process in &mut processes {
        let channel = process.wait_serving().await;
        out.push(channel);
    }
    processes
        .into_iter()
        .zip(out)
        .map(|(process, channel)| Replica { process, channel })
        .collect()
}

fn websocket(exchange: &str) -> ProxyRequest {
    ProxyRequest {
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Websocket.into(),
        ..Default::default()
    }
}

fn ban(exchange: &str, proxy_url: &str) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_url.into(),
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Websocket.into(),
        success: false,
        http_status: Some(418),
        retry_after_seconds: Some(120),
        client_id: "feed-on-replica-a".into(),
        ..Default::default()
    }
}

const SHARED: &str = "socks5://shared:1080";

/// An upstream that hands out [`SHARED`] unless the broker excludes it, then a proxy of the
/// exchange's own (`socks5://<exchange>-<i>:1080`).
async fn shared_unless_excluded() -> Upstream {
    Upstream::start_with(Arc::new(|body: &Value| {
        let excluded: Vec<String> = body["metadata"]["exclude_proxies"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let exchange = body["exchange_id"].as_str().unwrap_or("x");
        let url = std::iter::once(SHARED.to_owned())
            .chain((0..10).map(|i| format!("socks5://{exchange}-{i}:1080")))
            .find(|u| !excluded.contains(u))
            .unwrap_or_default();
        Reply::answer(&url)
    }))
    .await
}

fn state_of(rows: &[ProxyStatus], proxy_url: &str) -> Option<ProxyState> {
    rows.iter()
        .find(|r| r.proxy_url == proxy_url)
        .map(ProxyStatus::state)
}

fn seconds_until(t: &prost_types::Timestamp) -> i64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    t.seconds - now
}

/// Reports a 418 for [`SHARED`] on binance to `reporter` and checks that `other` learns it: its
/// `ListProxies` says BANNED (about 120 s left), it hands out another proxy for binance, and still
/// [`SHARED`] for bybit (the ban is binance's), and a `WatchProxy` stream it serves is moved. Returns how long `other` took to show the ban.
async fn ban_on_one_holds_on_the_other(reporter: &Replica, other: &Replica) -> Duration {
    // A feed on `other` watches its binance assignment.
    let mut watch = other
        .client()
        .watch_proxy(websocket("binance"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(PROMPT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.proxy_url, SHARED);
    reporter
        .client()
        .report_feedback(ban("binance", SHARED))
        .await
        .unwrap();
    let reported = Instant::now();
    let rows = eventually("the ban to show on the other replica", PROMPT, || async {
        let rows = other.proxies("binance").await;
        (state_of(&rows, SHARED) == Some(ProxyState::Banned)).then_some(rows)
    })
    .await;
    let took = reported.elapsed();
    let row = rows.iter().find(|r| r.proxy_url == SHARED).unwrap();
    let left = seconds_until(row.until.as_ref().expect("a banned row has an end"));
    assert!(
        (100..=121).contains(&left),
        "banned for {left} s, not the reported 120"
    );
    let moved = other.ask("binance").await.unwrap();
    assert_ne!(
        moved.proxy_url, SHARED,
        "the other replica still hands out the banned proxy"
    );
    assert_eq!(moved.proxy_url, "socks5://binance-0:1080");
    let bybit = other.ask("bybit").await.unwrap();
    assert_eq!(bybit.proxy_url, SHARED, "bybit did not ban it");
    // The watcher on `other` is moved off the banned proxy without asking.
    let moved = tokio::time::timeout(PROMPT, watch.message())
        .await
        .expect("a new assignment for the watcher on the other replica before the deadline")
        .unwrap()
        .expect("the stream goes on");
    assert_ne!(moved.proxy_url, SHARED, "{moved:?}");
    took
}

/// An exchange without a budget: the hand-out is the replica's own (nothing to count fleet-wide),
/// yet feedback about it to that replica is applied and shared: the ban holds on the other one.
#[tokio::test]
async fn feedback_about_an_unbudgeted_hand_out_is_applied_by_its_replica_and_shared() {
    let redis = RedisServer::start();
    let upstream = shared_unless_excluded().await;
    let config = ConfigDir::new(&fleet_yaml(
        &upstream,
        &redis.url(),
        "fleet-unbudgeted:",
        &format!("    operation_timeout_ms: {PATIENT_STORE_MS}"),
        "",
    ));
    let fleet = replicas(&config, 2, &[]).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    // kucoin has no built-in or configured budget.
    assert_eq!(a.ask("kucoin").await.unwrap().proxy_url, SHARED);
    a.client().report_feedback(ban("kucoin", SHARED)).await.unwrap();
    eventually("the ban to show on the other replica", PROMPT, || async {
        (state_of(&b.proxies("kucoin").await, SHARED) == Some(ProxyState::Banned)).then_some(())
    })
    .await;
    assert_eq!(b.ask("kucoin").await.unwrap().proxy_url, "socks5://kucoin-0:1080");
    assert_eq!(a.ask("kucoin").await.unwrap().proxy_url, "socks5://kucoin-0:1080");
}

#[tokio::test]
async fn a_ban_reported_to_one_replica_holds_on_the_others_and_moves_their_watchers() {
    let redis = RedisServer::start();
    let upstream = shared_unless_excluded().await;
    let config = ConfigDir::new(&fleet_yaml(
        &upstream,
        &redis.url(),
        "fleet-ban:",
        &format!("    operation_timeout_ms: {PATIENT_STORE_MS}"),
        "",
    ));
    let fleet = replicas(&config, 3, &[]).await;
    let (a, b, c) = (&fleet[0], &fleet[1], &fleet[2]);
    // Every replica hands SHARED out for binance and bybit, so each holds it as a candidate.
    for replica in &fleet {
        for exchange in ["binance", "bybit"] {
            assert_eq!(
                replica.ask(exchange).await.unwrap().proxy_url,
                SHARED,
                "{exchange}"
            );
        }
    }
    // A feed on C watches its binance assignment.
    let mut watch = c
        .client()
        .watch_proxy(websocket("binance"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(PROMPT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.proxy_url, SHARED);

    let took = ban_on_one_holds_on_the_other(a, b).await;
    eprintln!("replica B showed the ban reported to A after {took:?}");

    // C's watcher is moved off the banned proxy without asking.
    let moved = tokio::time::timeout(PROMPT, watch.message())
        .await
        .expect("a new assignment for C's watcher before the deadline")
        .unwrap()
        .expect("the stream goes on");
    assert_ne!(moved.proxy_url, SHARED, "{moved:?}");
    // And C shows the ban too.
    assert_eq!(
        state_of(&c.proxies("binance").await, SHARED),
        Some(ProxyState::Banned)
    );
    assert_eq!(state_of(&c.proxies("bybit").await, SHARED), Some(ProxyState::Ok));
}

fn plain_failure(exchange: &str, proxy_url: &str) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_url.into(),
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Websocket.into(),
        success: false,
        error_details: Some("connect timeout".into()),
        client_id: "feed".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_exchange_outage_is_judged_from_every_replicas_reports_and_lifts_ejections_fleet_wide() {
    let redis = RedisServer::start();
    let upstream = shared_unless_excluded().await;
    // One attempt per proxy, so the second replica's hand-out needs a second proxy (both are then
    // known to the fleet for binance); two plain failures in a row eject.
    let config = ConfigDir::new(
        &fleet_yaml(
            &upstream,
            &redis.url(),
            "fleet-outage:",
            &format!("    operation_timeout_ms: {PATIENT_STORE_MS}"),
            "  exchanges:\n    binance:\n      websocket: { attempts: 1, per_seconds: 300 }\n  \
             outage: { failing_fraction: 0.5, window_seconds: 60, min_proxies: 2 }",
        )
        .replace(
            "fallback_to_embedded: false",
            "fallback_to_embedded: false\n    eject_after_failures: 2",
        ),
    );
    let fleet = replicas(&config, 2, &[]).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    assert_eq!(a.ask("binance").await.unwrap().proxy_url, SHARED);
    let second = b.ask("binance").await.unwrap().proxy_url;
    assert_eq!(second, "socks5://binance-0:1080", "the budget of SHARED is spent");
    // Two failures of SHARED, reported to A, eject it there (and fleet-wide).
    for _ in 0..2 {
        a.client()
            .report_feedback(plain_failure("binance", SHARED))
            .await
            .unwrap();
    }
    for replica in [a, b] {
        assert_eq!(
            state_of(&replica.proxies("binance").await, SHARED),
            Some(ProxyState::Ejected)
        );
    }
    let outage = |m: &Exposition| m.value("proxy_broker_exchange_outage", &[("exchange", "binance")]);
    assert_eq!(outage(&a.metrics().await), 0.0, "one failing proxy is no outage");
    // The other proxy fails too, reported to B: two of two proxies fail at binance, counting A's
    // reports, so binance is down, not its proxies. B lifts the ejection A made.
    b.client()
        .report_feedback(plain_failure("binance", &second))
        .await
        .unwrap();
    for (name, replica) in [("A", a), ("B", b)] {
        eventually(&format!("{name} to show the outage"), PROMPT, || async {
            (outage(&replica.metrics().await) == 1.0).then_some(())
        })
        .await;
        let exchanges = replica
            .admin()
            .list_exchanges(ListExchangesRequest {
                exchange_id: "binance".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .exchanges;
        assert!(exchanges[0].outage, "{name}: {exchanges:?}");
        assert_eq!(
            (exchanges[0].reporting_proxies, exchanges[0].failing_proxies),
            (2, 2),
            "{name}"
        );
        assert_eq!(
            state_of(&replica.proxies("binance").await, SHARED),
            Some(ProxyState::Ok),
            "{name}: the ejection made on A is lifted by the outage B saw start"
        );
    }
    // During the outage, failures reported to A no longer eject.
    for _ in 0..3 {
        a.client()
            .report_feedback(plain_failure("binance", &second))
            .await
            .unwrap();
    }
    assert_eq!(
        state_of(&b.proxies("binance").await, &second),
        Some(ProxyState::Ok)
    );
    // Successes reported to A end it for both.
    for proxy in [SHARED, second.as_str()] {
        a.client()
            .report_feedback(ProxyFeedback {
                success: true,
                error_details: None,
                ..plain_failure("binance", proxy)
            })
            .await
            .unwrap();
    }
    assert_eq!(outage(&b.metrics().await), 0.0);
}

#[tokio::test]
async fn a_connection_attempt_budget_is_held_across_replicas() {
    let redis = RedisServer::start();
    // Always the same proxy, whatever the broker excludes.
    let upstream = Upstream::start_with(Arc::new(|_: &Value| Reply::answer("socks5://only:1080"))).await;
    let config = ConfigDir::new(&fleet_yaml(
        &upstream,
        &redis.url(),
        "fleet-budget:",
        &format!("    operation_timeout_ms: {PATIENT_STORE_MS}"),
        "  exchanges:\n    deribit:\n      websocket: { attempts: 5, per_seconds: 300 }",
    ));
    let fleet = replicas(&config, 2, &[]).await;
    // 20 concurrent calls, 10 on each replica.
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let mut client = fleet[i % 2].client();
            tokio::spawn(async move { client.request_proxy(websocket("deribit")).await })
        })
        .collect();
    let (mut ok, mut exhausted, mut other) = (0, 0, Vec::new());
    for call in calls {
        match call.await.unwrap() {
            Ok(answer) => {
                assert_eq!(answer.get_ref().proxy_url, "socks5://only:1080");
                ok += 1;
            }
            Err(status) if status.code() == Code::ResourceExhausted => exhausted += 1,
            Err(status) => other.push(status),
        }
    }
    assert!(other.is_empty(), "calls failed otherwise: {other:?}");
    assert_eq!((ok, exhausted), (5, 15), "a budget of 5 per 300 s, fleet-wide");
    // Every replica shows the fleet's count, and a later call on either is refused.
    for replica in &fleet {
        let rows = replica.proxies("deribit").await;
        let row = rows.iter().find(|r| r.proxy_url == "socks5://only:1080").unwrap();
        assert_eq!(row.websocket.as_ref().map(|u| u.used), Some(5), "{row:?}");
        let status = replica.ask("deribit").await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("5 per 300 s"), "{status:?}");
    }
}

/// Counts of a load loop's calls.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

/// Calls RequestProxy on `replica` in a loop (bounded: at most `max` calls and `within`), cycling
/// over `exchanges`, until `stop`; every call has a 5 s gRPC deadline.
fn load(
    replica: &Replica,
    exchanges: &'static [&'static str],
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    max: usize,
    within: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut client = replica.client();
    tokio::spawn(async move {
        let started = Instant::now();
        for i in 0..max {
            if stop.load(Ordering::SeqCst) || started.elapsed() > within {
                break;
            }
            let mut request = tonic::Request::new(websocket(exchanges[i % exchanges.len()]));
            request.set_timeout(Duration::from_secs(5));
            match client.request_proxy(request).await {
                Ok(_) => {
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(status) => tally.failed.lock().unwrap().push(format!("{status:?}")),
            }
            // Pace: a steady trickle, not a saturation test.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Exchanges the outage load cycles over: `kucoin` has no budget (served from the replica's own
/// state), `bench` has a large configured budget (a check-and-count in Redis per hand-out).
const OUTAGE_EXCHANGES: &[&str] = &["kucoin", "bench"];
const BIG_BUDGET: &str = "  exchanges:\n    bench:\n      websocket: { attempts: 1000000, per_seconds: 60 }";

#[tokio::test]
async fn redis_killed_mid_load_fails_no_call_and_the_fleet_rejoins_when_it_returns() {
    let mut redis = RedisServer::start();
    let upstream = shared_unless_excluded().await;
    // The default operation timeout (50 ms): what an operator runs.
    let config = ConfigDir::new(&fleet_yaml(
        &upstream,
        &redis.url(),
        "fleet-outage:",
        "",
        BIG_BUDGET,
    ));
    let fleet = replicas(&config, 2, &[]).await;
    for replica in &fleet {
        assert_eq!(replica.store_up().await, 1.0);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = fleet.iter().map(|_| Arc::default()).collect();
    let loops: Vec<_> = fleet
        .iter()
        .zip(&tallies)
        .map(|(r, t)| {
            load(
                r,
                OUTAGE_EXCHANGES,
                stop.clone(),
                t.clone(),
                20_000,
                Duration::from_secs(120),
            )
        })
        .collect();
    let made = |tallies: &[Arc<Tally>]| -> Vec<usize> {
        tallies.iter().map(|t| t.ok.load(Ordering::SeqCst)).collect()
    };
    eventually("calls on both replicas before the kill", PROMPT, || async {
        made(&tallies).iter().all(|&n| n >= 20).then_some(())
    })
    .await;

    redis.kill();
    let at_kill = made(&tallies);
    for (i, replica) in fleet.iter().enumerate() {
        eventually(&format!("store_up 0 on replica {i}"), PROMPT, || async {
            (replica.store_up().await == 0.0).then_some(())
        })
        .await;
    }
    // The load goes on while Redis is gone.
    eventually("calls on both replicas while Redis is down", PROMPT, || async {
        made(&tallies)
            .iter()
            .zip(&at_kill)
            .all(|(&now, &then)| now >= then + 50)
            .then_some(())
    })
    .await;

    redis.restart();
    let at_restart = made(&tallies);
    for (i, replica) in fleet.iter().enumerate() {
        eventually(&format!("store_up back to 1 on replica {i}"), PROMPT, || async {
            (replica.store_up().await == 1.0).then_some(())
        })
        .await;
    }
    eventually("calls on both replicas after Redis returned", PROMPT, || async {
        made(&tallies)
            .iter()
            .zip(&at_restart)
            .all(|(&now, &then)| now >= then + 20)
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for l in loops {
        l.await.unwrap();
    }
    for (i, tally) in tallies.iter().enumerate() {
        let failed = tally.failed.lock().unwrap();
        assert!(
            failed.is_empty(),
            "replica {i}: {} of {} calls failed, first: {:?}",
            failed.len(),
            failed.len() + tally.ok.load(Ordering::SeqCst),
            failed.first()
        );
    }
    eprintln!(
        "calls per replica: before the kill {at_kill:?}, before the restart {at_restart:?}, total {:?}",
        made(&tallies)
    );

    // State is shared again: both hand SHARED out for binance (the restarted Redis is empty), a
    // ban reported to B holds on A.
    for replica in &fleet {
        for exchange in ["binance", "bybit"] {
            assert_eq!(
                replica.ask(exchange).await.unwrap().proxy_url,
                SHARED,
                "{exchange}"
            );
        }
    }
    ban_on_one_holds_on_the_other(&fleet[1], &fleet[0]).await;
}

const PASSWORD: &str = "st0re-PW-S3CR3T-9f1";
const WRONG_PASSWORD: &str = "wr0ng-PW-S3CR3T-7c2";

#[track_caller]
fn assert_no_password(what: &str, text: &str) {
    for secret in [PASSWORD, WRONG_PASSWORD, "S3CR3T"] {
        if let Some(at) = text.find(secret) {
            let start = text[..at].char_indices().rev().nth(120).map_or(0, |(i, _)| i);
            let end = (at + 80).min(text.len());
            panic!(
                "the store password leaked into {what}: ...{}...",
                &text[start..end]
            );
        }
    }
}

#[tokio::test]
async fn the_store_password_never_appears_in_logs_admin_output_or_metrics() {
    let mut redis = RedisServer::start_with_password(PASSWORD);
    let upstream = shared_unless_excluded().await;
    let yaml = |file: &std::path::Path| {
        fleet_yaml(
            &upstream,
            &redis.url_without_password(),
            "fleet-secret:",
            &format!("    password_file: \"{}\"", file.display()),
            BIG_BUDGET,
        )
    };
    let config = ConfigDir::new("");
    let password_file = config.file("redis-password", &format!("{PASSWORD}\n"));
    std::fs::write(&config.path, yaml(&password_file)).unwrap();
    // A third replica reads a wrong password: it serves on its own state, and says why without
    // the (wrong) password either.
    let wrong = ConfigDir::new("");
    let wrong_file = wrong.file("redis-password", WRONG_PASSWORD);
    std::fs::write(&wrong.path, yaml(&wrong_file)).unwrap();

    let env = [("RUST_LOG", "debug")];
    let mut fleet = replicas(&config, 2, &env).await;
    fleet.extend(
        replicas(
            &wrong,
            1,
            &[("RUST_LOG", "debug"), ("PROXY_BROKER_LOG_FORMAT", "json")],
        )
        .await,
    );
    for replica in &fleet[..2] {
        assert_eq!(replica.store_up().await, 1.0);
    }
    // Traffic through the store: hand-outs (with and without a budget) and a ban.
    for replica in &fleet {
        for exchange in ["binance", "bench", "kucoin"] {
            replica.ask(exchange).await.unwrap();
        }
    }
    // The replica with the wrong password found out (its hand-outs went to Redis and failed).
    eventually(
        "store_up 0 on the replica with the wrong password",
        PROMPT,
        || async {
            if fleet[2].store_up().await == 0.0 {
                return Some(());
            }
            fleet[2].ask("bench").await.unwrap();
            None
        },
    )
    .await;
    fleet[0]
        .client()
        .report_feedback(ban("binance", SHARED))
        .await
        .unwrap();
    eventually("the ban to reach replica 1", PROMPT, || async {
        (state_of(&fleet[1].proxies("binance").await, SHARED) == Some(ProxyState::Banned)).then_some(())
    })
    .await;
    // An outage and a return, so the replicas log about the store.
    redis.kill();
    for replica in &fleet[..2] {
        // Budgeted hand-outs go to Redis, fail, and open the store's breaker.
        eventually("store_up 0", PROMPT, || async {
            replica.ask("bench").await.unwrap();
            (replica.store_up().await == 0.0).then_some(())
        })
        .await;
    }
    redis.restart();
    for replica in &fleet[..2] {
        eventually("store_up 1", PROMPT, || async {
            (replica.store_up().await == 1.0).then_some(())
        })
        .await;
        replica.ask("bench").await.unwrap();
    }

    for (i, replica) in fleet.iter_mut().enumerate() {
        let effective = replica
            .admin()
            .get_effective_config(GetEffectiveConfigRequest {})
            .await
            .unwrap()
            .into_inner();
        let shown = format!("{effective:?}");
        assert_no_password(&format!("replica {i}'s GetEffectiveConfig"), &shown);
        let metrics = replica.metrics().await;
        assert_no_password(&format!("replica {i}'s /metrics"), &metrics.text);
        let log = replica.process.stderr().await;
        assert!(!log.is_empty(), "replica {i} logged nothing at debug");
        assert_no_password(&format!("replica {i}'s log"), &log);
        if i == 2 {
            assert!(
                log.to_lowercase().contains("redis"),
                "replica 2 says nothing about the store: {log}"
            );
        }
    }
}

/// Polls `probe` until it is true, at most `deadline`.
async fn within<F, Fut>(deadline: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if probe().await {
            return true;
        }
        // Poll interval; the deadline above bounds the wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// How a replica comes to be unable to use Redis.
enum Trouble {
    /// Nothing listens on the configured port from the start.
    NothingListens,
    /// Redis requires a password and the replica's file holds another.
    WrongPassword,
    /// Redis answered at start, then was killed (and is restarted afterwards).
    KilledLater,
}

#[tokio::test]
async fn store_up_is_0_while_redis_cannot_be_used_even_on_an_idle_replica() {
    let upstream = shared_unless_excluded().await;
    let mut wrong = Vec::new();
    for (row, trouble) in [
        ("nothing listens on the port", Trouble::NothingListens),
        ("a wrong password", Trouble::WrongPassword),
        ("Redis killed after start", Trouble::KilledLater),
    ] {
        let mut redis = match trouble {
            Trouble::WrongPassword => RedisServer::start_with_password(PASSWORD),
            _ => RedisServer::start(),
        };
        let config = ConfigDir::new("");
        let (url, extra) = match trouble {
            Trouble::NothingListens => (
                format!("redis://127.0.0.1:{}/0", common::ops::free_ports().0),
                String::new(),
            ),
            Trouble::WrongPassword => (
                redis.url_without_password(),
                format!(
                    "    password_file: \"{}\"",
                    config.file("pw", WRONG_PASSWORD).display()
                ),
            ),
            Trouble::KilledLater => (redis.url(), String::new()),
        };
        std::fs::write(
            &config.path,
            fleet_yaml(&upstream, &url, "fleet-store-up:", &extra, BIG_BUDGET),
        )
        .unwrap();
        let fleet = replicas(&config, 1, &[]).await;
        let replica = &fleet[0];
        // It serves a feed whose exchange has no budget (answered from the replica's own state)...
        replica.ask("kucoin").await.unwrap();
        if let Trouble::KilledLater = trouble {
            replica.ask("bench").await.unwrap();
            assert_eq!(replica.store_up().await, 1.0, "{row}");
            redis.kill();
        }
        // ...and, with no call that needs Redis, still says the store is not in use: the
        // shared feed (bans from the other replicas) is not reaching it either.
        if !within(PROMPT, || async { replica.store_up().await == 0.0 }).await {
            wrong.push(format!(
                "{row}: store_up still 1 after {PROMPT:?} on an idle replica"
            ));
            continue;
        }
        if let Trouble::KilledLater = trouble {
            redis.restart();
            if !within(PROMPT, || async { replica.store_up().await == 1.0 }).await {
                wrong.push(format!("{row}: store_up not back to 1 within {PROMPT:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Keys of the single-flight storm: exchanges without a budget, and exchanges with a (large)
/// configured budget, whose hand-outs are counted in Redis.
const UNBUDGETED: [&str; 10] = [
    "plain0", "plain1", "plain2", "plain3", "plain4", "plain5", "plain6", "plain7", "plain8", "plain9",
];
const BUDGETED: [&str; 10] = [
    "budg0", "budg1", "budg2", "budg3", "budg4", "budg5", "budg6", "budg7", "budg8", "budg9",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_split_over_two_replica_processes_makes_one_upstream_call_per_key() {
    let redis = RedisServer::start();
    let upstream = Upstream::start_with(Arc::new(|body: &Value| {
        let exchange = body["exchange_id"].as_str().unwrap_or("x");
        Reply::answer(&format!("socks5://{exchange}.fleet:1080")).after(Duration::from_millis(200))
    }))
    .await;
    let budgets: String = BUDGETED
        .iter()
        .map(|e| format!("    {e}:\n      websocket: {{ attempts: 1000000, per_seconds: 60 }}\n"))
        .collect();
    let config = ConfigDir::new(&fleet_yaml(
        &upstream,
        &redis.url(),
        "fleet-flight:",
        &format!("    operation_timeout_ms: {PATIENT_STORE_MS}"),
        &format!("  exchanges:\n{budgets}"),
    ));
    let fleet = replicas(&config, 2, &[]).await;
    let mut wrong = Vec::new();
    for (row, keys) in [("no budget", UNBUDGETED), ("a budget", BUDGETED)] {
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let mut client = fleet[i % 2].client();
                let exchange = keys[(i / 2) % keys.len()];
                tokio::spawn(async move {
                    let answer = client.request_proxy(websocket(exchange)).await;
                    (exchange, answer)
                })
            })
            .collect();
        let mut errors = Vec::new();
        for call in calls {
            let (exchange, answer) = call.await.unwrap();
            match answer {
                Ok(answer) => assert_eq!(
                    answer.get_ref().proxy_url,
                    format!("socks5://{exchange}.fleet:1080"),
                    "{row}"
                ),
                Err(status) => errors.push(status),
            }
        }
        let per_key: Vec<usize> = keys.iter().map(|k| upstream.requests_for(k)).collect();
        if !errors.is_empty() || per_key.iter().any(|&n| n != 1) {
            wrong.push(format!(
                "{row}: {} errors (first {:?}), upstream calls per key {per_key:?} (want one each)",
                errors.len(),
                errors.first()
            ));
        }
        // Afterwards both replicas answer every key from their cache.
        for replica in &fleet {
            for key in keys {
                replica.ask(key).await.unwrap();
            }
        }
        let after: Vec<usize> = keys.iter().map(|k| upstream.requests_for(k)).collect();
        if after != per_key {
            wrong.push(format!(
                "{row}: hits after the storm asked upstream: {per_key:?} → {after:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// How the leader of a flight fails to tell the fleet it is done.
enum LeaderTrouble {
    /// The leading replica is killed (SIGKILL) while its upstream request is in flight.
    Killed,
    /// Redis stops answering (`CLIENT PAUSE 3000 ALL`) long enough for the leader's store breaker
    /// to open before its answer arrives, so its `put_answer` and `end_flight` never reach Redis
    /// (they are answered from its local state); then Redis answers again.
    RedisPausedAsItPublishes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_on_another_replica_are_not_stranded_when_the_leader_cannot_finish_its_flight() {
    let mut wrong = Vec::new();
    for (row, trouble) in [
        ("the leader replica is killed", LeaderTrouble::Killed),
        (
            "Redis pauses as the leader publishes",
            LeaderTrouble::RedisPausedAsItPublishes,
        ),
    ] {
        let redis = RedisServer::start();
        let upstream = Upstream::start_with(Arc::new(|body: &Value| {
            let exchange = body["exchange_id"].as_str().unwrap_or("x");
            Reply::answer(&format!("socks5://{exchange}.fleet:1080"))
        }))
        .await;
        // The default operation timeout (50 ms) and request timeout (30 s).
        let config = ConfigDir::new(&fleet_yaml(&upstream, &redis.url(), "fleet-stranded:", "", ""));
        let mut fleet = replicas(&config, 2, &[]).await;
        upstream.hold();
        // Replica A leads the flight for `stranded`: its upstream request is held.
        let mut on_a = fleet[0].client();
        let leader_call = tokio::spawn(async move { on_a.request_proxy(websocket("stranded")).await });
        eventually(&format!("{row}: A's upstream request"), PROMPT, || async {
            (upstream.requests_for("stranded") == 1).then_some(())
        })
        .await;
        // Feeds on replica B ask for the same key, each with a 10 s deadline: they follow A.
        let followers: Vec<_> = (0..5)
            .map(|_| {
                let mut client = fleet[1].client();
                tokio::spawn(async move {
                    let mut request = tonic::Request::new(websocket("stranded"));
                    request.set_timeout(Duration::from_secs(10));
                    client.request_proxy(request).await
                })
            })
            .collect();
        // Let B's calls reach their flight (a settle, not a bound: nothing is asserted on it).
        tokio::time::sleep(Duration::from_millis(300)).await;
        match trouble {
            LeaderTrouble::Killed => {
                fleet[0].process.signal("KILL");
                let _ = fleet[0].process.wait_exit(PROMPT).await;
                upstream.release();
            }
            LeaderTrouble::RedisPausedAsItPublishes => {
                let paused = std::process::Command::new("redis-cli")
                    .args([
                        "-p",
                        &redis.addr.port().to_string(),
                        "CLIENT",
                        "PAUSE",
                        "3000",
                        "ALL",
                    ])
                    .output()
                    .expect("redis-cli (Debian's redis-tools)");
                assert!(paused.status.success(), "{paused:?}");
                // Calls on A that need the store (cold keys: a shared-answer read each) fail
                // against the paused Redis and open A's store breaker.
                let others: Vec<_> = (0..5)
                    .map(|i| {
                        let mut client = fleet[0].client();
                        tokio::spawn(
                            async move { client.request_proxy(websocket(&format!("other{i}"))).await },
                        )
                    })
                    .collect();
                eventually(&format!("{row}: store_up 0 on A"), PROMPT, || async {
                    (fleet[0].store_up().await == 0.0).then_some(())
                })
                .await;
                upstream.release();
                for other in others {
                    let _ = other.await;
                }
                let led = leader_call.await.unwrap();
                assert_eq!(
                    led.map(|r| r.into_inner().proxy_url).ok().as_deref(),
                    Some("socks5://stranded.fleet:1080"),
                    "{row}: the leader's own call"
                );
            }
        }
        let mut outcomes = Vec::new();
        for follower in followers {
            outcomes.push(match follower.await.unwrap() {
                Ok(answer) => answer.into_inner().proxy_url,
                Err(status) => format!("{:?}: {}", status.code(), status.message()),
            });
        }
        // A feed asking B afterwards (5 s deadline) gets it too.
        let mut request = tonic::Request::new(websocket("stranded"));
        request.set_timeout(Duration::from_secs(5));
        outcomes.push(match fleet[1].client().request_proxy(request).await {
            Ok(answer) => answer.into_inner().proxy_url,
            Err(status) => format!("later call: {:?}: {}", status.code(), status.message()),
        });
        if outcomes.iter().any(|o| o != "socks5://stranded.fleet:1080") {
            wrong.push(format!(
                "{row}: B's callers got {outcomes:?} (upstream asked {} times)",
                upstream.requests_for("stranded")
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Budget window of the shared-candidates test: long enough that its calls on one replica run
/// inside one window (waiting for it to pass is a lower bound on the test's time, not a bound on
/// the broker's).
const CANDIDATE_WINDOW_SECS: u64 = 8;

/// The upstream of the shared-candidates test: `socks5://rot-<n>:1080` on its n-th lookup (from
/// 1), whatever the broker excludes, so every upstream call yields a new candidate.
async fn rotating() -> Upstream {
    let calls = Arc::new(AtomicUsize::new(0));
    Upstream::start_with(Arc::new(move |_: &Value| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        Reply::answer(&format!("socks5://rot-{n}:1080"))
    }))
    .await
}

fn rot(n: usize) -> String {
    format!("socks5://rot-{n}:1080")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_takes_the_candidates_another_replica_fetched_before_asking_upstream() {
    let redis = RedisServer::start();
    let upstream = rotating().await;
    let exchange = "candx";
    let config = ConfigDir::new(&fleet_yaml(
        &upstream,
        &redis.url(),
        "fleet-candidates:",
        &format!("    operation_timeout_ms: {PATIENT_STORE_MS}"),
        &format!(
            "  exchanges:\n    {exchange}:\n      websocket: {{ attempts: 2, per_seconds: {CANDIDATE_WINDOW_SECS} }}"
        ),
    ));
    let fleet = replicas(&config, 2, &[]).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let calls = || upstream.requests_for(exchange);

    // B's candidate set is {rot-1}.
    assert_eq!(b.ask(exchange).await.unwrap().proxy_url, rot(1));
    assert_eq!(calls(), 1);
    // A refills (each candidate's budget of 2 running out) until the fleet knows 3 candidates.
    let mut on_a = Vec::new();
    let deadline = Instant::now() + PROMPT;
    while calls() < 3 {
        assert!(
            Instant::now() < deadline,
            "A did not refill to three candidates within {PROMPT:?}: {on_a:?}"
        );
        on_a.push(a.ask(exchange).await.unwrap().proxy_url);
    }
    assert_eq!(calls(), 3, "A's hand-outs {on_a:?}");
    let known = [rot(1), rot(2), rot(3)];
    assert!(on_a.iter().all(|p| known.contains(p)), "{on_a:?}");
    // The window passes: every known candidate has its budget again, fleet-wide.
    eventually("the budget window to pass", PROMPT * 3, || async {
        let rows = b.proxies(exchange).await;
        known
            .iter()
            .all(|p| {
                rows.iter()
                    .find(|r| r.proxy_url == *p)
                    .and_then(|r| r.websocket.as_ref())
                    .is_some_and(|w| w.used == 0)
            })
            .then_some(())
    })
    .await;

    // B hands out the three candidates the fleet knows (2 attempts each) without asking upstream:
    // its own rot-1, then those A fetched.
    let mut on_b = Vec::new();
    for _ in 0..6 {
        on_b.push(b.ask(exchange).await.unwrap().proxy_url);
    }
    let distinct: std::collections::BTreeSet<&String> = on_b.iter().collect();
    assert_eq!(
        (calls(), distinct.len()),
        (3, 3),
        "B asked upstream instead of taking the fleet's candidates: B handed out {on_b:?}"
    );
    assert!(on_b.iter().all(|p| known.contains(p)), "{on_b:?}");
    // Only once every shared candidate is exhausted fleet-wide does B ask upstream.
    assert_eq!(b.ask(exchange).await.unwrap().proxy_url, rot(4));
    assert_eq!(calls(), 4);
    // And A, exhausted too, takes B's new candidate from the fleet.
    assert_eq!(a.ask(exchange).await.unwrap().proxy_url, rot(4));
    assert_eq!(calls(), 4);
}
