//! Engine-level tests of the [`Brokering`] facade: the spread target, feedback, outages.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_broker_core::{
    ConnectionProxies, ConnectionType, PoolConfig, PoolMember, ProxyConfig, ProxySettings, Strategy,
};
use tokio::time::Instant;

use super::bans::Verdict;
use super::outage::Transition;
use super::settings::BudgetSource;
use super::*;
use crate::clock::SystemClock;
use crate::store::ChangeKind;

const WS: ConnectionType = ConnectionType::Websocket;

/// What the test upstreams answer.
type Refilled<P> = std::future::Ready<Result<Option<Offer<P>>, String>>;

fn settings_with(exchange: &str, ws: Budget) -> BrokeringSettings {
    let mut s = BrokeringSettings::default();
    s.exchanges.insert(
        exchange.into(),
        ExchangeSettings {
            websocket: Some(ws),
            ..Default::default()
        },
    );
    s
}

fn pool(urls: &[&str], strategy: Strategy) -> ProxySettings {
    ProxySettings {
        enabled: true,
        default: Some(ConnectionProxies {
            http: None,
            websocket: Some(ProxyConfig {
                url: None,
                timeout_seconds: 20,
                pool: Some(PoolConfig {
                    proxies: urls
                        .iter()
                        .map(|u| PoolMember {
                            url: (*u).into(),
                            weight: 1.0,
                            enabled: true,
                        })
                        .collect(),
                    strategy,
                }),
            }),
        }),
        ..Default::default()
    }
}

fn engine<P: Clone + Send + Sync + 'static>(
    settings: BrokeringSettings,
    proxy: &ProxySettings,
) -> Arc<Brokering<P>> {
    let clock = Arc::new(SystemClock);
    let store = Arc::new(MemoryStore::new(100_000, clock.clone()));
    let ejection = Ejection {
        after_failures: 3,
        max_percent: 100,
    };
    Arc::new(Brokering::new(settings.shared(), proxy, ejection, store, clock))
}

fn ask(exchange: &str) -> Ask<'_> {
    Ask {
        exchange,
        connection_type: WS,
        region: None,
        sticky_key: None,
        ttl: Duration::from_secs(300),
        started: None,
    }
}

/// An upstream that hands out the next of `proxies` on every call, ignoring `exclude`.
fn rotating(calls: &Arc<AtomicUsize>, proxies: usize) -> impl FnMut(Vec<Arc<str>>) -> Refilled<usize> {
    let calls = calls.clone();
    move |_exclude| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Some(Offer {
            url: format!("socks5://u:pw@proxy{}:1080", n % proxies),
            ttl: Duration::from_secs(300),
            weight: 1.0,
            payload: n % proxies,
        })))
    }
}

async fn storm(
    feeds: usize,
    settings: BrokeringSettings,
    exchange: &'static str,
) -> (HashMap<String, usize>, usize, usize, Arc<Brokering<usize>>) {
    let b = engine::<usize>(settings, &ProxySettings::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..feeds)
        .map(|_| {
            let (b, calls) = (b.clone(), calls.clone());
            tokio::spawn(async move {
                b.choose_delegated(&ask(exchange), rotating(&calls, 60))
                    .await
                    .map(|p| p.url.to_string())
            })
        })
        .collect();
    let mut handed = HashMap::new();
    let mut errors = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(url) => *handed.entry(url).or_insert(0) += 1,
            Err(_) => errors += 1,
        }
    }
    (handed, errors, calls.load(Ordering::SeqCst), b)
}

/// The target: 200 concurrent binance/websocket feeds, budget 10 per proxy, an upstream
/// that rotates → 0 errors, no proxy more than 10 times, at most 40 upstream calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_200_feed_storm_spreads_within_the_budget_with_few_refills() {
    let (handed, errors, refills, b) =
        storm(200, settings_with("binance", Budget::new(10, 300)), "binance").await;
    assert_eq!(errors, 0);
    assert_eq!(handed.values().sum::<usize>(), 200);
    assert!(handed.values().all(|&n| n <= 10), "{handed:?}");
    assert!(refills <= 40, "{refills} upstream calls");
    // The store agrees: no proxy's window holds more than the budget.
    let page = b.list_proxies(Some("BINANCE"), None, 1000).await.unwrap();
    assert!(
        page.entries
            .iter()
            .all(|row| row.state.websocket.is_some_and(|w| w.used <= 10))
    );
    assert_eq!(page.entries.iter().map(|r| r.state.hand_outs).sum::<u64>(), 200);
}

/// The README's worked example: 1,000 feeds, Binance's built-in 300 per 5 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_1000_feed_storm_on_binances_built_in_budget_needs_four_proxies() {
    let (handed, errors, refills, _) = storm(1000, BrokeringSettings::default(), "binance").await;
    assert_eq!(errors, 0);
    assert!(handed.values().all(|&n| n <= 300), "{handed:?}");
    assert!(
        handed.len() >= 4 && refills <= 8,
        "{} proxies, {refills} refills",
        handed.len()
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_repeats_itself_is_asked_once_for_all_waiters() {
    let b = engine::<()>(
        settings_with("okx", Budget::new(1, 60)),
        &ProxySettings::default(),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let same = |calls: Arc<AtomicUsize>| {
        move |_: Vec<Arc<str>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                // A slow upstream, so callers pile up behind the refill.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, String>(Some(Offer {
                    url: "http://only:1".into(),
                    ttl: Duration::from_secs(60),
                    weight: 1.0,
                    payload: (),
                }))
            }
        }
    };
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (b, calls) = (b.clone(), calls.clone());
            tokio::spawn(async move { b.choose_delegated(&ask("okx"), same(calls)).await })
        })
        .collect();
    let mut ok = 0;
    let mut exhausted = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(NotPicked::Exhausted(e)) => exhausted.push(e),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(exhausted.len(), 49);
    assert!(
        calls.load(Ordering::SeqCst) <= 3,
        "{} upstream calls",
        calls.load(Ordering::SeqCst)
    );
    let e = &exhausted[0];
    assert!(
        e.message.contains("okx websocket") && e.message.contains("1 per 60 s"),
        "{}",
        e.message
    );
    assert!(e.retry_after >= Duration::from_secs(59) && e.retry_after <= Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_failing_upstream_is_reported_to_the_caller_and_penalised_candidates_fill_in() {
    let b = engine::<u8>(
        settings_with("bybit", Budget::new(5, 60)),
        &ProxySettings::default(),
    );
    let fail = |_: Vec<Arc<str>>| std::future::ready(Err::<Option<Offer<u8>>, _>("upstream down".to_owned()));
    match b.choose_delegated(&ask("bybit"), fail).await {
        Err(NotPicked::Upstream(Some(e))) => assert_eq!(e, "upstream down"),
        other => panic!("{other:?}"),
    }
    // One candidate, then penalised: with the upstream down it is still handed out.
    let offer = |_: Vec<Arc<str>>| {
        std::future::ready(Ok::<_, String>(Some(Offer {
            url: "http://p:1".into(),
            ttl: Duration::from_secs(60),
            weight: 1.0,
            payload: 7,
        })))
    };
    let first = b.choose_delegated(&ask("bybit"), offer).await.unwrap();
    assert_eq!(first.payload, 7);
    let r = b
        .report(&Report {
            exchange: "bybit",
            proxy_url: "http://p:1",
            success: false,
            http_status: Some(429),
            retry_after: Some(Duration::from_secs(10)),
        })
        .await
        .unwrap();
    assert_eq!(r.verdict, Verdict::Penalise(Duration::from_secs(10)));
    let again = b.choose_delegated(&ask("bybit"), fail).await.unwrap();
    assert!(again.penalised && &*again.url == "http://p:1");
}

#[tokio::test(start_paused = true)]
async fn a_ban_is_for_one_exchange_and_drops_the_proxy_from_its_candidates() {
    let b = engine::<()>(BrokeringSettings::default(), &ProxySettings::default());
    let offer = |url: &'static str| {
        move |_: Vec<Arc<str>>| {
            std::future::ready(Ok::<_, Infallible>(Some(Offer {
                url: url.into(),
                ttl: Duration::from_secs(300),
                weight: 1.0,
                payload: (),
            })))
        }
    };
    for exchange in ["binance", "kraken"] {
        b.choose_delegated(&ask(exchange), offer("http://p:1"))
            .await
            .unwrap();
    }
    let mut changes = b.subscribe();
    let r = b
        .report(&Report {
            exchange: "Binance",
            proxy_url: "http://p:1",
            success: false,
            http_status: Some(418),
            retry_after: Some(Duration::from_secs(120)),
        })
        .await
        .unwrap();
    assert!(r.known && r.applied.until.is_some());
    let change = changes.try_recv().unwrap();
    assert_eq!(&*change.exchange, "binance");
    assert!(matches!(change.kind, ChangeKind::Banned(_)));
    assert!(b.upstream_candidates("binance", WS, None).is_empty());
    assert_eq!(b.upstream_candidates("kraken", WS, None).len(), 1);
    // Kraken still hands it out; Binance asks for another.
    assert_eq!(
        &*b.choose_delegated(&ask("kraken"), offer("http://q:1"))
            .await
            .unwrap()
            .url,
        "http://p:1"
    );
    assert_eq!(
        &*b.choose_delegated(&ask("binance"), offer("http://q:1"))
            .await
            .unwrap()
            .url,
        "http://q:1"
    );
}

#[tokio::test(start_paused = true)]
async fn feedback_about_a_proxy_never_handed_out_changes_nothing() {
    let b = engine::<()>(BrokeringSettings::default(), &ProxySettings::default());
    for status in [Some(418), Some(500), None] {
        let r = b
            .report(&Report {
                exchange: "binance",
                proxy_url: "http://stranger:1",
                success: false,
                http_status: status,
                retry_after: None,
            })
            .await
            .unwrap();
        assert!(!r.known);
        assert_eq!(r.outage, Transition::None);
    }
    assert!(b.list_proxies(None, None, 0).await.unwrap().entries.is_empty());
    assert!(!b.in_outage("binance").await);
}

#[tokio::test(start_paused = true)]
async fn embedded_pools_respect_budgets_and_say_which_budget_ran_out() {
    let proxy = pool(&["socks5://a:1", "socks5://b:1"], Strategy::RoundRobin);
    let b = engine::<()>(settings_with("coinbase", Budget::new(2, 1)), &proxy);
    let mut urls = Vec::new();
    for _ in 0..4 {
        let p = b.choose_embedded(&ask("coinbase")).await.unwrap().unwrap();
        assert_eq!(p.payload.kind.as_str(), "round_robin");
        assert_eq!(p.payload.timeout_seconds, 20);
        urls.push(p.url.to_string());
    }
    urls.sort();
    assert_eq!(
        urls,
        ["socks5://a:1", "socks5://a:1", "socks5://b:1", "socks5://b:1"]
    );
    let Err(NotPicked::Exhausted(e)) = b.choose_embedded(&ask("coinbase")).await else {
        panic!("over budget");
    };
    assert_eq!(
        e.message,
        "no proxy for coinbase websocket can be handed out (connection-attempt budget 2 per 1 s per proxy): of 2 candidates, 2 used their budget, 0 are banned, 0 ejected, 0 penalised; retry in 1 s"
    );
    assert_eq!(e.retry_after, Duration::from_secs(1));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        b.choose_embedded(&ask("coinbase")).await.unwrap().is_some(),
        "the window slid"
    );
    // No embedded proxy: direct.
    let direct = engine::<()>(BrokeringSettings::default(), &ProxySettings::default());
    assert!(direct.choose_embedded(&ask("coinbase")).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn embedded_feedback_bans_and_ejects_per_exchange() {
    let proxy = pool(&["socks5://a:1", "socks5://b:1"], Strategy::RoundRobin);
    let b = engine::<()>(BrokeringSettings::default(), &proxy);
    let fail = |exchange| Report {
        exchange,
        proxy_url: "socks5://a:1",
        success: false,
        http_status: Some(503),
        retry_after: None,
    };
    // Embedded members are the broker's own: feedback counts before any hand-out.
    for n in 1..=3u32 {
        let r = b.report(&fail("kraken")).await.unwrap();
        assert_eq!(
            r.applied.consecutive_failures,
            if n < 3 { Some(n) } else { Some(3) }
        );
    }
    for _ in 0..4 {
        let p = b.choose_embedded(&ask("kraken")).await.unwrap().unwrap();
        assert_eq!(&*p.url, "socks5://b:1", "a is ejected for kraken");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(
            b.choose_embedded(&ask("bybit"))
                .await
                .unwrap()
                .unwrap()
                .url
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 2, "ejection at kraken is not ejection at bybit");
}

#[tokio::test(start_paused = true)]
async fn an_exchange_outage_stops_ejections_and_lifts_recent_ones() {
    let urls = ["socks5://a:1", "socks5://b:1", "socks5://c:1"];
    let b = engine::<()>(BrokeringSettings::default(), &pool(&urls, Strategy::RoundRobin));
    let report = |proxy_url, success, http_status| Report {
        exchange: "binance",
        proxy_url,
        success,
        http_status,
        retry_after: None,
    };
    b.report(&report(urls[2], true, None)).await.unwrap();
    // a fails three times: ejected (1 of 2 reporters failing is not an outage).
    for _ in 0..3 {
        b.report(&report(urls[0], false, Some(502))).await.unwrap();
    }
    let state = |url| {
        let b = b.clone();
        async move {
            b.store()
                .states("binance", &[url])
                .await
                .unwrap()
                .pop()
                .flatten()
                .unwrap_or_default()
        }
    };
    assert!(state(urls[0]).await.ejected_until.is_some());
    // b fails too: 2 of 3 failing → outage; a's ejection is lifted.
    let r = b.report(&report(urls[1], false, None)).await.unwrap();
    assert!(matches!(r.outage, Transition::Started { .. }), "{r:?}");
    assert_eq!(r.lifted, 1);
    assert!(b.in_outage("BINANCE").await);
    assert_eq!(state(urls[0]).await.ejected_until, None);
    // In the outage, failures neither count nor eject.
    for _ in 0..5 {
        let r = b.report(&report(urls[1], false, None)).await.unwrap();
        assert_eq!(r.applied.consecutive_failures, None);
    }
    assert_eq!(state(urls[1]).await.ejected_until, None);
    // Bans still apply.
    let r = b.report(&report(urls[2], false, Some(451))).await.unwrap();
    assert!(r.applied.until.is_some());
    // Successes end it: a's success leaves 1 of 3 failing.
    let r = b.report(&report(urls[0], true, None)).await.unwrap();
    assert_eq!(r.outage, Transition::Ended);
    assert!(!b.in_outage("binance").await);
    let listed = b.exchanges().await;
    let binance = listed.iter().find(|x| x.exchange == "binance").unwrap();
    assert_eq!(binance.outage.unwrap().since, None);
    assert_eq!(binance.websocket.unwrap().source, BudgetSource::BuiltIn);
}

#[tokio::test(start_paused = true)]
async fn a_sticky_key_keeps_its_embedded_proxy_until_it_is_banned() {
    let urls = ["socks5://a:1", "socks5://b:1", "socks5://c:1", "socks5://d:1"];
    let b = engine::<()>(BrokeringSettings::default(), &pool(&urls, Strategy::RoundRobin));
    let sticky = Ask {
        sticky_key: Some("feed-42"),
        ..ask("okx")
    };
    let first = b.choose_embedded(&sticky).await.unwrap().unwrap();
    assert!(first.sticky);
    // OKX allows 3 per second: the key keeps its proxy for those 3.
    for _ in 0..2 {
        assert_eq!(b.choose_embedded(&sticky).await.unwrap().unwrap().url, first.url);
    }
    let moved = b.choose_embedded(&sticky).await.unwrap().unwrap();
    assert_ne!(moved.url, first.url, "no headroom left: moved");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        b.choose_embedded(&sticky).await.unwrap().unwrap().url,
        first.url,
        "back once the window frees"
    );
}

#[tokio::test(start_paused = true)]
async fn admit_counts_a_single_url_under_the_same_budget() {
    let b = engine::<()>(
        settings_with("okx", Budget::new(1, 10)),
        &ProxySettings::default(),
    );
    let stale = ask("okx");
    let p = b.admit(&stale, "http://stale:1").await.unwrap();
    assert!(p.lease_expires_at <= Instant::now() + Duration::from_secs(300));
    let Err(NotPicked::Exhausted(e)) = b.admit(&stale, "http://stale:1").await else {
        panic!("over budget");
    };
    assert_eq!(e.retry_after, Duration::from_secs(10));
}

fn assert_send<T: Send>(_: &T) {}

#[test]
fn engine_futures_can_run_on_a_multi_threaded_server() {
    let b = engine::<Arc<str>>(BrokeringSettings::default(), &ProxySettings::default());
    let ask = ask("binance");
    assert_send(&b.choose_delegated(&ask, |_| std::future::ready(Ok::<_, String>(None))));
    assert_send(&b.choose_embedded(&ask));
    assert_send(&b.admit(&ask, "http://p:1"));
    let report = Report {
        exchange: "binance",
        proxy_url: "http://p:1",
        success: true,
        http_status: None,
        retry_after: None,
    };
    assert_send(&b.report(&report));
    assert_send(&b.list_proxies(None, None, 10));
}

#[test]
fn debug_of_engine_types_never_shows_a_password() {
    let report = Report {
        exchange: "binance",
        proxy_url: "socks5://u:hunter2@p:1",
        success: false,
        http_status: None,
        retry_after: None,
    };
    let offer = Offer {
        url: "socks5://u:hunter2@p:1".into(),
        ttl: Duration::from_secs(1),
        weight: 1.0,
        payload: "socks5://u:hunter2@p:1",
    };
    let text = format!("{report:?} {offer:?}");
    assert!(!text.contains("hunter2"), "{text}");
}
