//! Feed-aware brokering against the real broker over gRPC, with real loopback upstreams: spreading
//! a storm within per-proxy budgets, RESOURCE_EXHAUSTED with `RetryInfo`, ban classes scoped per
//! exchange, the exchange-outage guard, sticky assignment, jittered leases, and the admin views.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use common::TestBroker;
use common::ops::{Reply, Upstream};
use proxy_broker::pb::{
    BudgetOrigin, ConnectionType, ListExchangesRequest, ListProxiesRequest, ProxyFeedback, ProxyRequest,
    ProxySource, ProxyState, ProxyStatus,
};
use serde_json::Value;
use tonic::Code;
use tonic_types::StatusExt;

fn ask(exchange: &str, sticky_key: Option<&str>) -> ProxyRequest {
    ProxyRequest {
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Websocket.into(),
        sticky_key: sticky_key.map(str::to_owned),
        ..Default::default()
    }
}

fn report(
    exchange: &str,
    proxy_url: &str,
    http_status: Option<u32>,
    retry_after: Option<u32>,
) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_url.into(),
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Websocket.into(),
        success: false,
        http_status,
        retry_after_seconds: retry_after,
        ..Default::default()
    }
}

fn success(exchange: &str, proxy_url: &str) -> ProxyFeedback {
    ProxyFeedback {
        success: true,
        ..report(exchange, proxy_url, None, None)
    }
}

/// A broker delegating to `upstream`, with `brokering` (YAML of the block's body) and
/// `fallback_to_embedded` off.
async fn delegating(upstream: &Upstream, brokering: &str) -> TestBroker {
    let yaml = format!(
        r#"
proxy:
  enabled: true
  external_service:
    enabled: true
    endpoints: ["{}"]
    auth_credentials: {{ token: "t0ken" }}
    fallback_to_embedded: false
brokering:
{brokering}
"#,
        upstream.url()
    );
    TestBroker::start_yaml(&yaml, &[]).await
}

/// A broker answering from an embedded pool of `members` for every exchange's WebSocket.
async fn pooled(members: &[&str], brokering: &str) -> TestBroker {
    let proxies: String = members
        .iter()
        .map(|m| format!("\n          - url: \"{m}\""))
        .collect();
    let yaml = format!(
        r#"
proxy:
  enabled: true
  external_service:
    eject_after_failures: 2
    max_ejection_percent: 100
  default:
    websocket:
      pool:
        strategy: round_robin
        proxies:{proxies}
brokering:
{brokering}
"#
    );
    TestBroker::start_yaml(&yaml, &[]).await
}

/// An upstream that hands out the next of `n` proxies on every request, ignoring exclusions.
async fn rotating(n: usize) -> Upstream {
    let next = Arc::new(AtomicUsize::new(0));
    Upstream::start_with(Arc::new(move |_: &Value| {
        let i = next.fetch_add(1, Ordering::SeqCst) % n;
        Reply::answer(&format!("socks5://rotating-{i}:1080"))
    }))
    .await
}

/// An upstream that hands out `socks5://shared:1080` unless the broker excludes it, then a proxy
/// of the exchange's own.
async fn shared_unless_excluded() -> Upstream {
    Upstream::start_with(Arc::new(|body: &Value| {
        let excluded = excluded(body);
        let exchange = body["exchange_id"].as_str().unwrap_or("x");
        let url = ["socks5://shared:1080".to_owned()]
            .into_iter()
            .chain((0..10).map(|i| format!("socks5://{exchange}-{i}:1080")))
            .find(|u| !excluded.contains(u))
            .unwrap_or_default();
        Reply::answer(&url)
    }))
    .await
}

/// The `metadata.exclude_proxies` the broker sent upstream.
fn excluded(body: &Value) -> Vec<String> {
    body["metadata"]["exclude_proxies"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

async fn proxies(broker: &TestBroker, exchange: &str) -> Vec<ProxyStatus> {
    broker
        .admin()
        .list_proxies(ListProxiesRequest {
            exchange_id: exchange.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .proxies
}

fn row<'a>(rows: &'a [ProxyStatus], proxy_url: &str) -> &'a ProxyStatus {
    rows.iter()
        .find(|r| r.proxy_url == proxy_url)
        .unwrap_or_else(|| panic!("no row for {proxy_url} in {rows:?}"))
}

fn seconds_until(t: &prost_types::Timestamp) -> i64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    t.seconds - now
}

#[tokio::test]
async fn a_storm_of_200_feeds_is_spread_within_a_budget_of_10_per_proxy() {
    let upstream = rotating(60).await;
    let broker = delegating(
        &upstream,
        "  exchanges:\n    binance:\n      websocket: { attempts: 10, per_seconds: 300 }",
    )
    .await;
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let mut client = broker.client();
            tokio::spawn(async move { client.request_proxy(ask("binance", None)).await })
        })
        .collect();
    let mut per_proxy: HashMap<String, usize> = HashMap::new();
    for call in calls {
        let answer = call
            .await
            .unwrap()
            .expect("no feed of the storm fails")
            .into_inner();
        *per_proxy.entry(answer.proxy_url).or_default() += 1;
    }
    let most = per_proxy.values().max().copied().unwrap();
    assert!(most <= 10, "a proxy was handed out {most} times: {per_proxy:?}");
    assert!(
        per_proxy.len() >= 20,
        "200 hand-outs need at least 20 proxies: {per_proxy:?}"
    );
    let asked = upstream.requests_for("binance");
    assert!(
        asked <= 40,
        "{asked} upstream calls for a storm that needs 20 proxies"
    );
}

#[tokio::test]
async fn with_every_candidate_exhausted_the_answer_is_resource_exhausted_with_a_retry_hint() {
    let upstream = Upstream::start_with(Arc::new(|_: &Value| Reply::answer("socks5://only:1080"))).await;
    let broker = delegating(
        &upstream,
        "  exchanges:\n    binance:\n      websocket: { attempts: 2, per_seconds: 60 }",
    )
    .await;
    let mut client = broker.client();
    for _ in 0..2 {
        let answer = client
            .request_proxy(ask("binance", None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.proxy_url, "socks5://only:1080");
    }
    let status = client.request_proxy(ask("binance", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for said in ["binance", "websocket", "2 per 60 s"] {
        assert!(
            status.message().contains(said),
            "{:?} does not say {said:?}",
            status.message()
        );
    }
    let retry = status.get_details_retry_info().expect("a RetryInfo detail");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(
        (1..=60).contains(&delay.as_secs()),
        "retry in {delay:?}: until the window frees, within 60 s"
    );
    // The broker asked for another proxy, naming the exhausted one.
    let last = upstream.requests().last().unwrap().body.clone();
    assert_eq!(excluded(&last), vec!["socks5://only:1080".to_owned()]);
    // Other exchanges are not affected by binance's budget.
    let other = client
        .request_proxy(ask("kucoin", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.proxy_url, "socks5://only:1080");
}

#[tokio::test]
async fn exhausted_upstream_candidates_fall_back_to_an_embedded_proxy_with_headroom() {
    let upstream = Upstream::start_with(Arc::new(|_: &Value| Reply::answer("socks5://only:1080"))).await;
    let yaml = format!(
        r#"
proxy:
  enabled: true
  external_service:
    enabled: true
    endpoints: ["{}"]
    auth_credentials: {{ token: "t0ken" }}
    fallback_to_embedded: true
  default:
    websocket: {{ url: "socks5://embedded:1080" }}
brokering:
  exchanges:
    deribit:
      websocket: {{ attempts: 1, per_seconds: 60 }}
"#,
        upstream.url()
    );
    let broker = TestBroker::start_yaml(&yaml, &[]).await;
    let mut client = broker.client();
    let first = client
        .request_proxy(ask("deribit", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.proxy_url, "socks5://only:1080");
    let second = client
        .request_proxy(ask("deribit", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.proxy_url.as_str(), second.source()),
        ("socks5://embedded:1080", ProxySource::Embedded)
    );
    // The embedded proxy has a budget of its own, now used up too.
    let third = client.request_proxy(ask("deribit", None)).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn a_ban_holds_for_that_exchange_only_and_the_feed_gets_another_proxy() {
    let upstream = shared_unless_excluded().await;
    let broker = delegating(&upstream, "  penalty_seconds: 30").await;
    let mut client = broker.client();
    for exchange in ["binance", "bybit"] {
        let answer = client
            .request_proxy(ask(exchange, None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.proxy_url, "socks5://shared:1080", "{exchange}");
    }
    client
        .report_feedback(report("binance", "socks5://shared:1080", Some(418), Some(90)))
        .await
        .unwrap();
    let binance = client
        .request_proxy(ask("binance", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(binance.proxy_url, "socks5://binance-0:1080");
    let bybit = client
        .request_proxy(ask("bybit", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bybit.proxy_url, "socks5://shared:1080", "bybit did not ban it");
    let rows = proxies(&broker, "binance").await;
    let banned = row(&rows, "socks5://shared:1080");
    assert_eq!(banned.state(), ProxyState::Banned);
    let left = seconds_until(banned.until.as_ref().unwrap());
    assert!(
        (85..=91).contains(&left),
        "banned for {left} s, not the exchange's 90"
    );
    let rows = proxies(&broker, "bybit").await;
    assert_eq!(row(&rows, "socks5://shared:1080").state(), ProxyState::Ok);
    // The report went upstream with its new fields.
    let forwarded = common::ops::eventually("the feedback forwarded", common::ops::PROMPT, || async {
        upstream.feedback_done().into_iter().next()
    })
    .await;
    assert_eq!(forwarded.body["http_status"], 418);
    assert_eq!(forwarded.body["retry_after_seconds"], 90);
}

/// An upstream proxy handed out for an exchange without a budget leaves no store entry (only a
/// mark), yet feedback about it counts for that exchange; feedback about a proxy never handed out
/// for it still changes nothing.
#[tokio::test]
async fn feedback_counts_for_an_unbudgeted_upstream_hand_out_that_left_no_entry() {
    let upstream = shared_unless_excluded().await;
    let broker = delegating(&upstream, "  penalty_seconds: 30").await;
    let mut client = broker.client();
    // kucoin is not in the built-in table and has no configured budget.
    let answer = client
        .request_proxy(ask("kucoin", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.proxy_url, "socks5://shared:1080");
    assert_eq!(proxies(&broker, "kucoin").await, vec![], "a mark, not an entry");
    // Feedback for an exchange it was not handed out for, and about a proxy never handed out:
    // unknown, so nothing changes.
    for (exchange, stranger) in [
        ("mexc", "socks5://shared:1080"),
        ("kucoin", "socks5://never:1080"),
    ] {
        client
            .report_feedback(report(exchange, stranger, Some(418), Some(90)))
            .await
            .unwrap();
        assert_eq!(
            proxies(&broker, exchange).await,
            vec![],
            "{exchange}: {stranger} got state"
        );
    }
    // The one it handed out: banned for kucoin, and the next feed gets another proxy.
    client
        .report_feedback(report("kucoin", "socks5://shared:1080", Some(418), Some(90)))
        .await
        .unwrap();
    let rows = proxies(&broker, "kucoin").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(row(&rows, "socks5://shared:1080").state(), ProxyState::Banned);
    let next = client
        .request_proxy(ask("kucoin", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.proxy_url, "socks5://kucoin-0:1080");
    broker.stop().await;
}

/// The distinct proxies `n` WebSocket requests for `exchange` are handed.
async fn handed_out(
    client: &mut proxy_broker::pb::proxy_broker_client::ProxyBrokerClient<tonic::transport::Channel>,
    exchange: &str,
    n: usize,
) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        let answer = client.request_proxy(ask(exchange, None)).await.unwrap();
        seen.insert(answer.into_inner().proxy_url);
    }
    seen
}

/// One row per class of feedback: what it does to an embedded pool member for that exchange.
struct BanRow {
    what: &'static str,
    http_status: Option<u32>,
    retry_after: Option<u32>,
    state: ProxyState,
    /// Seconds until the state ends (`None`: no deadline).
    lasts: Option<std::ops::RangeInclusive<i64>>,
    /// Whether the member is still handed out while its peer has headroom.
    handed_out: bool,
}

#[tokio::test]
async fn each_class_of_feedback_does_what_it_says_for_that_exchange() {
    let rows = [
        BanRow {
            what: "418 with Retry-After: banned until then",
            http_status: Some(418),
            retry_after: Some(300),
            state: ProxyState::Banned,
            lasts: Some(295..=301),
            handed_out: false,
        },
        BanRow {
            what: "403 without Retry-After: banned for ban_seconds",
            http_status: Some(403),
            retry_after: None,
            state: ProxyState::Banned,
            lasts: Some(115..=121),
            handed_out: false,
        },
        BanRow {
            what: "451: geo-blocked for a day",
            http_status: Some(451),
            retry_after: None,
            state: ProxyState::Banned,
            lasts: Some(86_395..=86_401),
            handed_out: false,
        },
        BanRow {
            what: "429 without Retry-After: penalised for penalty_seconds",
            http_status: Some(429),
            retry_after: None,
            state: ProxyState::Penalised,
            lasts: Some(25..=31),
            handed_out: false,
        },
        BanRow {
            what: "503 from the exchange: a plain failure, counted",
            http_status: Some(503),
            retry_after: None,
            state: ProxyState::Ok,
            lasts: None,
            handed_out: true,
        },
    ];
    for r in rows {
        let broker = pooled(&["socks5://a:1080", "socks5://b:1080"], "  penalty_seconds: 30").await;
        let mut client = broker.client();
        // Both members are handed out once, so both have state.
        for _ in 0..2 {
            client.request_proxy(ask("binance", None)).await.unwrap();
        }
        client
            .report_feedback(report("binance", "socks5://a:1080", r.http_status, r.retry_after))
            .await
            .unwrap();
        let rows = proxies(&broker, "binance").await;
        let a = row(&rows, "socks5://a:1080");
        assert_eq!(a.state(), r.state, "{}", r.what);
        match (&r.lasts, &a.until) {
            (Some(range), Some(until)) => {
                let left = seconds_until(until);
                assert!(range.contains(&left), "{}: ends in {left} s", r.what);
            }
            (None, None) => assert_eq!(a.consecutive_failures, 1, "{}", r.what),
            other => panic!("{}: {other:?}", r.what),
        }
        let urls: HashSet<String> = handed_out(&mut client, "binance", 4).await;
        assert_eq!(
            urls.contains("socks5://a:1080"),
            r.handed_out,
            "{}: {urls:?}",
            r.what
        );
        // Other exchanges still get it.
        let bybit: HashSet<String> = handed_out(&mut client, "bybit", 4).await;
        assert!(bybit.contains("socks5://a:1080"), "{}: bybit lost it too", r.what);
        broker.stop().await;
    }
}

#[tokio::test]
async fn a_penalised_proxy_is_handed_out_only_when_nothing_else_has_headroom() {
    let broker = pooled(
        &["socks5://a:1080", "socks5://b:1080"],
        "  exchanges:\n    deribit:\n      websocket: { attempts: 3, per_seconds: 600 }",
    )
    .await;
    let mut client = broker.client();
    client.request_proxy(ask("deribit", None)).await.unwrap();
    client
        .report_feedback(report("deribit", "socks5://a:1080", Some(429), Some(600)))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(
            client
                .request_proxy(ask("deribit", None))
                .await
                .unwrap()
                .into_inner()
                .proxy_url,
        );
    }
    // b has 3 attempts; then a (penalised, 1 used) has 2 left.
    assert_eq!(
        got,
        [
            "socks5://b:1080",
            "socks5://b:1080",
            "socks5://b:1080",
            "socks5://a:1080",
            "socks5://a:1080"
        ]
    );
    let status = client.request_proxy(ask("deribit", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn plain_failures_eject_per_exchange_until_an_exchange_outage_lifts_them() {
    let members = ["socks5://a:1080", "socks5://b:1080", "socks5://c:1080"];
    let broker = pooled(
        &members,
        "  outage: { failing_fraction: 0.5, window_seconds: 60, min_proxies: 2 }",
    )
    .await;
    let mut client = broker.client();
    for _ in 0..3 {
        client.request_proxy(ask("binance", None)).await.unwrap();
        client.request_proxy(ask("bybit", None)).await.unwrap();
    }
    // Two failures in a row eject a for binance (eject_after_failures: 2); b reports success.
    client
        .report_feedback(success("binance", "socks5://b:1080"))
        .await
        .unwrap();
    client
        .report_feedback(success("binance", "socks5://c:1080"))
        .await
        .unwrap();
    for _ in 0..2 {
        client
            .report_feedback(report("binance", "socks5://a:1080", None, None))
            .await
            .unwrap();
    }
    let rows = proxies(&broker, "binance").await;
    assert_eq!(row(&rows, "socks5://a:1080").state(), ProxyState::Ejected);
    let rows = proxies(&broker, "bybit").await;
    assert_eq!(
        row(&rows, "socks5://a:1080").state(),
        ProxyState::Ok,
        "scoped to binance"
    );
    // Now b and c fail too: most proxies reporting for binance fail, so binance is down, not
    // its proxies.
    for proxy in ["socks5://b:1080", "socks5://c:1080"] {
        client
            .report_feedback(report("binance", proxy, None, None))
            .await
            .unwrap();
    }
    let exchanges = broker
        .admin()
        .list_exchanges(ListExchangesRequest {
            exchange_id: "binance".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .exchanges;
    assert!(exchanges[0].outage, "{exchanges:?}");
    assert_eq!(
        (exchanges[0].reporting_proxies, exchanges[0].failing_proxies),
        (3, 3)
    );
    let rows = proxies(&broker, "binance").await;
    for proxy in members {
        assert_eq!(
            row(&rows, proxy).state(),
            ProxyState::Ok,
            "{proxy}: no ejection in an outage"
        );
    }
    let metrics = broker_metrics(&broker).await;
    assert!(
        metrics.contains("proxy_broker_exchange_outage{exchange=\"binance\"} 1"),
        "{metrics}"
    );
    // Successes end it.
    for proxy in members {
        client.report_feedback(success("binance", proxy)).await.unwrap();
    }
    let metrics = broker_metrics(&broker).await;
    assert!(
        metrics.contains("proxy_broker_exchange_outage{exchange=\"binance\"} 0"),
        "{metrics}"
    );
}

/// The broker's metrics text, through the broker itself (no URL label may appear in it).
async fn broker_metrics(broker: &TestBroker) -> String {
    let text = broker.broker().render_metrics().await;
    assert!(!text.contains("socks5://"), "a proxy URL in the metrics: {text}");
    text
}

#[tokio::test]
async fn a_sticky_key_keeps_its_proxy_and_a_lost_member_moves_only_its_keys() {
    let members = [
        "socks5://m0:1080",
        "socks5://m1:1080",
        "socks5://m2:1080",
        "socks5://m3:1080",
        "socks5://m4:1080",
    ];
    let broker = pooled(&members, "  penalty_seconds: 30").await;
    let mut client = broker.client();
    let keys: Vec<String> = (0..100).map(|i| format!("feed-{i}")).collect();
    let mut first = HashMap::new();
    for key in &keys {
        let answer = client
            .request_proxy(ask("binance", Some(key)))
            .await
            .unwrap()
            .into_inner();
        first.insert(key.clone(), answer.proxy_url);
    }
    let used: HashSet<&String> = first.values().collect();
    assert!(
        used.len() >= 4,
        "100 keys spread over {} of 5 members",
        used.len()
    );
    for key in &keys[..20] {
        let again = client
            .request_proxy(ask("binance", Some(key)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.proxy_url, first[key], "{key} moved without cause");
    }
    client
        .report_feedback(report("binance", "socks5://m2:1080", Some(403), None))
        .await
        .unwrap();
    for key in &keys {
        let now = client
            .request_proxy(ask("binance", Some(key)))
            .await
            .unwrap()
            .into_inner();
        if first[key] == "socks5://m2:1080" {
            assert_ne!(now.proxy_url, "socks5://m2:1080", "{key} kept a banned proxy");
        } else {
            assert_eq!(now.proxy_url, first[key], "{key} moved though its proxy is fine");
        }
    }
}

#[tokio::test]
async fn leases_are_jittered_within_the_ttl_so_rotations_do_not_line_up() {
    let broker = pooled(&["socks5://a:1080"], "  lease_jitter_percent: 20").await;
    let mut client = broker.client();
    let mut ends = HashSet::new();
    for _ in 0..30 {
        let answer = client
            .request_proxy(ask("kucoin", None))
            .await
            .unwrap()
            .into_inner();
        let ttl = i64::from(answer.ttl_seconds);
        let left = seconds_until(answer.lease_expires_at.as_ref().expect("a lease end"));
        assert!(
            (ttl * 8 / 10 - 1..=ttl).contains(&left),
            "lease ends in {left} s, not within 80..100 % of the {ttl} s TTL"
        );
        let t = answer.lease_expires_at.unwrap();
        ends.insert((t.seconds, t.nanos));
    }
    assert!(ends.len() >= 25, "only {} distinct lease ends of 30", ends.len());
}

#[tokio::test]
async fn list_exchanges_shows_built_in_and_configured_budgets() {
    let broker = pooled(
        &["socks5://a:1080"],
        "  exchanges:\n    binance:\n      websocket: { attempts: 100, per_seconds: 300 }",
    )
    .await;
    let exchanges = broker
        .admin()
        .list_exchanges(ListExchangesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .exchanges;
    let by_id: HashMap<&str, _> = exchanges.iter().map(|x| (x.exchange_id.as_str(), x)).collect();
    let ws = |id: &str| {
        let b = by_id[id].websocket.unwrap();
        (b.origin(), b.budget.map(|b| (b.attempts, b.per_seconds)))
    };
    assert_eq!(ws("binance"), (BudgetOrigin::Configured, Some((100, 300))));
    assert_eq!(ws("bybit"), (BudgetOrigin::BuiltIn, Some((500, 300))));
    assert_eq!(ws("kraken"), (BudgetOrigin::BuiltIn, Some((150, 600))));
    // Sorted, and paged.
    let ids: Vec<&str> = exchanges.iter().map(|x| x.exchange_id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted);
    let mut admin = broker.admin();
    let mut token = String::new();
    let mut paged = Vec::new();
    loop {
        let page = admin
            .list_exchanges(ListExchangesRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.exchanges.into_iter().map(|x| x.exchange_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(paged.len() <= ids.len(), "paging does not end");
    }
    assert_eq!(paged, ids);
}

#[tokio::test]
async fn list_proxies_redacts_pages_and_counts_attempts_and_leases() {
    let members: Vec<String> = (0..5)
        .map(|i| format!("socks5://user:hunter2@p{i}:1080"))
        .collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let broker = pooled(&refs, "  penalty_seconds: 30").await;
    let mut client = broker.client();
    for _ in 0..10 {
        client.request_proxy(ask("binance", None)).await.unwrap();
    }
    let mut admin = broker.admin();
    let mut token = String::new();
    let mut rows = Vec::new();
    loop {
        let page = admin
            .list_proxies(ListProxiesRequest {
                exchange_id: "BINANCE".into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        rows.extend(page.proxies);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(rows.len() <= 5, "paging does not end");
    }
    assert_eq!(rows.len(), 5);
    for r in &rows {
        assert!(!format!("{r:?}").contains("hunter2"), "{r:?}");
        assert!(r.proxy_url.starts_with("socks5://***@p"), "{}", r.proxy_url);
        let ws = r.websocket.unwrap();
        assert_eq!(ws.used, 2, "{r:?}");
        assert_eq!(ws.budget.map(|b| (b.attempts, b.per_seconds)), Some((300, 300)));
        assert_eq!((r.hand_outs, r.live_leases), (2, 2), "{r:?}");
    }
    let bad = admin
        .list_proxies(ListProxiesRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("page_token: "), "{bad:?}");
}
