//! Feedback forwarding to upstream proxy services (immediate answer, every field, auth header,
//! routing to the endpoint that served the proxy, retries, bounded queue) and outlier ejection
//! driven by failure reports (cache eviction, embedded pool members).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::time::{Duration, Instant, SystemTime};

use common::TestBroker;
use proxy_broker::pb::{ConnectionType, FeedbackStats, ProxyFeedback, ProxyResponse, ProxySource};
use serde_json::Value;
use upstream::{Reply, TOKEN, Upstream, eventually_async, list_cache, list_upstreams, request};

const HTTP: ConnectionType = ConnectionType::Http;
const WS: ConnectionType = ConnectionType::Websocket;

async fn broker(endpoints: &[&Upstream], settings: &str, embedded: &str) -> TestBroker {
    let urls: Vec<&str> = endpoints.iter().map(|u| u.url.as_str()).collect();
    TestBroker::start(upstream::config(&urls, settings, embedded)).await
}

async fn ask(b: &TestBroker, exchange: &str, ct: ConnectionType) -> ProxyResponse {
    b.client()
        .request_proxy(request(exchange, ct, None))
        .await
        .unwrap()
        .into_inner()
}

fn report(proxy_url: &str, exchange: &str, success: bool) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_url.into(),
        exchange_id: exchange.into(),
        connection_type: HTTP.into(),
        success,
        ..Default::default()
    }
}

async fn send(b: &TestBroker, feedback: ProxyFeedback) {
    let accepted = b
        .client()
        .report_feedback(feedback)
        .await
        .unwrap()
        .into_inner()
        .accepted;
    assert!(accepted);
}

async fn feedback_stats(b: &TestBroker) -> FeedbackStats {
    list_upstreams(b).await.feedback.unwrap()
}

// --- Forwarding -------------------------------------------------------------------------------

#[tokio::test]
async fn report_feedback_answers_at_once_while_the_upstream_feedback_endpoint_hangs() {
    let up = Upstream::start().await;
    up.default_feedback(Reply::Hang);
    let b = broker(&[&up], "timeout_seconds: 10", "").await;
    let proxy = ask(&b, "binance", HTTP).await.proxy_url;
    for _ in 0..20 {
        let started = Instant::now();
        send(&b, report(&proxy, "binance", true)).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "ReportFeedback waited for the upstream: {:?}",
            started.elapsed()
        );
    }
    up.wait_feedback(1).await; // deliveries are under way, and hanging
    let started = Instant::now();
    let r = ask(&b, "kraken", HTTP).await;
    assert_eq!(r.source(), ProxySource::Upstream);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "feedback slowed RequestProxy: {:?}",
        started.elapsed()
    );
    assert_eq!(feedback_stats(&b).await.enqueued, 20);
}

#[tokio::test]
async fn feedback_is_delivered_with_every_field_and_the_auth_header() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;
    let proxy = ask(&b, "binance", WS).await.proxy_url;

    let when = SystemTime::UNIX_EPOCH + Duration::from_millis(1_714_566_896_789); // 2024-05-01T12:34:56.789Z
    send(
        &b,
        ProxyFeedback {
            proxy_url: proxy.clone(),
            exchange_id: "binance".into(),
            connection_type: WS.into(),
            success: false,
            latency_ms: Some(42),
            error_details: Some("handshake timed out".into()),
            timestamp: Some(when.into()),
            client_id: "cryptofeed-host1-4242".into(),
            // Absent: the body keeps exactly the design's fields (see tests/brokering_contract.rs).
            http_status: None,
            retry_after_seconds: None,
        },
    )
    .await;
    // Minimal report: no latency, error, timestamp or client id.
    let sent_at = SystemTime::now();
    send(&b, report(&proxy, "binance", true)).await;

    let got = up.wait_feedback(2).await;
    let full = got.iter().find(|r| r.body["success"] == false).unwrap();
    let minimal = got.iter().find(|r| r.body["success"] == true).unwrap();
    for r in [full, minimal] {
        assert_eq!(r.path, upstream::FEEDBACK_PATH);
        assert_eq!(r.header("authorization"), format!("Bearer {TOKEN}"));
        assert!(r.header("content-type").starts_with("application/json"));
        let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "client_id",
                "connection_type",
                "error_details",
                "exchange_id",
                "latency_ms",
                "proxy_url",
                "success",
                "timestamp"
            ],
            "the design's ProxyFeedback fields: {}",
            r.body
        );
        let ts = r.body["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z'), "RFC 3339 in UTC: {ts}");
    }
    let body = &full.body;
    assert_eq!(body["proxy_url"], proxy.as_str());
    assert_eq!(body["exchange_id"], "binance");
    assert_eq!(body["connection_type"], "websocket");
    assert_eq!(body["success"], false);
    assert_eq!(body["latency_ms"], 42);
    assert_eq!(body["error_details"], "handshake timed out");
    assert_eq!(body["client_id"], "cryptofeed-host1-4242");
    let ts = humantime::parse_rfc3339(body["timestamp"].as_str().unwrap()).unwrap();
    assert_eq!(ts, when, "{}", body["timestamp"]);

    let body = &minimal.body;
    assert_eq!(body["connection_type"], "http");
    assert_eq!(
        (&body["latency_ms"], &body["error_details"]),
        (&Value::Null, &Value::Null)
    );
    let own_id = format!(
        "proxy-broker-{}-{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    );
    assert_eq!(body["client_id"], own_id.as_str());
    let ts = humantime::parse_rfc3339(body["timestamp"].as_str().unwrap()).unwrap();
    let skew = ts
        .duration_since(sent_at)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap();
    assert!(
        skew < Duration::from_secs(5),
        "unset timestamp means now: {}",
        body["timestamp"]
    );

    eventually_async("forwarded to count both", || async {
        (feedback_stats(&b).await.forwarded == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn feedback_goes_to_the_endpoint_that_served_the_proxy() {
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    first.queue_requests([Reply::Status(500)]);
    let b = broker(&[&first, &second], "", "").await;

    let from_second = ask(&b, "binance", HTTP).await;
    assert_eq!(from_second.upstream_endpoint, second.url);
    let from_first = ask(&b, "kraken", HTTP).await;
    assert_eq!(from_first.upstream_endpoint, first.url);

    send(&b, report(&from_second.proxy_url, "binance", false)).await;
    let got = second.wait_feedback(1).await;
    assert_eq!(got[0].body["proxy_url"], second.proxy_url());
    assert_eq!(got[0].header("authorization"), format!("Bearer {TOKEN}"));

    send(&b, report(&from_first.proxy_url, "kraken", true)).await;
    let got = first.wait_feedback(1).await;
    assert_eq!(got[0].body["proxy_url"], first.proxy_url());

    assert_eq!((first.feedback_count(), second.feedback_count()), (1, 1));
}

#[tokio::test]
async fn feedback_for_a_proxy_not_handed_out_goes_to_the_first_healthy_endpoint() {
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    let b = broker(&[&first, &second], "failure_threshold: 1", "").await;

    send(&b, report("socks5://elsewhere.test:1080", "binance", true)).await;
    first.wait_feedback(1).await;

    first.default_request(Reply::Status(500)); // trips the first endpoint's breaker
    ask(&b, "binance", HTTP).await;
    send(&b, report("socks5://elsewhere.test:1080", "binance", true)).await;
    second.wait_feedback(1).await;
    assert_eq!(first.feedback_count(), 1);
}

#[tokio::test]
async fn feedback_is_retried_after_a_500_then_delivered() {
    let up = Upstream::start().await;
    up.queue_feedback([Reply::Status(500)]);
    let b = broker(&[&up], "", "").await;
    let proxy = ask(&b, "binance", HTTP).await.proxy_url;
    send(&b, report(&proxy, "binance", true)).await;

    let got = up.wait_feedback(2).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].body, got[1].body, "the same report, sent again");
    eventually_async("the retried report to count as forwarded", || async {
        let s = feedback_stats(&b).await;
        (s.forwarded == 1).then_some(s)
    })
    .await;
    let s = feedback_stats(&b).await;
    assert_eq!((s.enqueued, s.failed, s.dropped), (1, 0, 0));
}

#[tokio::test]
async fn feedback_queue_overflow_is_counted_as_dropped() {
    let up = Upstream::start().await;
    up.default_feedback(Reply::Hang);
    let b = broker(&[&up], "feedback_queue_size: 4", "").await; // timeout_seconds: 10 (default)
    let proxy = ask(&b, "binance", HTTP).await.proxy_url;
    for _ in 0..200 {
        send(&b, report(&proxy, "binance", true)).await;
    }
    // Every report is accounted for: in flight (stuck upstream), queued, or dropped.
    let (s, in_flight) = eventually_async("overflow to be counted", || async {
        let s = feedback_stats(&b).await;
        let in_flight = up.feedback_count() as u64;
        (s.dropped > 0 && s.dropped + s.queued + in_flight == 200).then_some((s, in_flight))
    })
    .await;
    assert_eq!(s.enqueued, 200);
    assert_eq!(
        s.queued, 4,
        "the queue holds exactly feedback_queue_size reports: {s:?}"
    );
    assert!(
        in_flight > 0 && in_flight <= 16,
        "bounded deliveries in flight: {in_flight}"
    );
    assert_eq!(s.forwarded + s.failed, 0);
}

// --- Outlier ejection -------------------------------------------------------------------------

/// The rows of `ListProxies` for `exchange`.
async fn proxy_rows(b: &TestBroker, exchange: &str) -> Vec<proxy_broker::pb::ProxyStatus> {
    b.admin()
        .list_proxies(proxy_broker::pb::ListProxiesRequest {
            exchange_id: exchange.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .proxies
}

/// The state of `proxy` for `exchange` in `ListProxies`.
async fn proxy_state(b: &TestBroker, proxy: &str, exchange: &str) -> proxy_broker::pb::ProxyState {
    let rows = proxy_rows(b, exchange).await;
    let shown = proxy_broker_core::redact::redact_url(proxy);
    rows.iter()
        .find(|r| r.proxy_url == shown)
        .unwrap_or_else(|| panic!("no row for {shown} in {rows:?}"))
        .state()
}

#[tokio::test]
async fn repeated_failure_reports_eject_the_proxy_for_that_exchange_only() {
    use proxy_broker::pb::ProxyState;
    let up = Upstream::start().await;
    let b = broker(&[&up], "eject_after_failures: 3", "").await;
    let proxy = up.proxy_url().to_owned();
    ask(&b, "binance", HTTP).await;
    ask(&b, "binance", WS).await;
    ask(&b, "kraken", HTTP).await;
    assert_eq!(up.request_count(), 3);

    for _ in 0..2 {
        send(&b, report(&proxy, "binance", false)).await;
    }
    assert_eq!(
        proxy_state(&b, &proxy, "binance").await,
        ProxyState::Ok,
        "two failures do not eject"
    );
    assert_eq!(ask(&b, "binance", HTTP).await.source(), ProxySource::Cache);

    send(&b, report(&proxy, "binance", false)).await;
    assert_eq!(proxy_state(&b, &proxy, "binance").await, ProxyState::Ejected);
    assert_eq!(feedback_stats(&b).await.ejections, 1);

    up.queue_requests([Reply::proxy("socks5://other.test:1080")]);
    let r = ask(&b, "binance", HTTP).await;
    assert_eq!(
        (r.proxy_url.as_str(), r.source()),
        ("socks5://other.test:1080", ProxySource::Upstream),
        "the next binance request asks upstream for another proxy"
    );
    assert_eq!(up.request_count(), 4);
    let excluded = up.requests().last().unwrap().body["metadata"]["exclude_proxies"].clone();
    assert_eq!(&excluded, &serde_json::json!([proxy]), "naming the ejected one");
    // Ejection is scoped to binance: kraken keeps the proxy.
    let kraken = ask(&b, "kraken", HTTP).await;
    assert_eq!(
        (kraken.proxy_url.as_str(), kraken.source()),
        (proxy.as_str(), ProxySource::Cache)
    );
    // Nothing was reported for kraken, which has no budget: the hand-out left a mark and no
    // entry, so kraken lists no state for the proxy (and certainly no ejection).
    let kraken_rows = proxy_rows(&b, "kraken").await;
    assert!(
        kraken_rows.iter().all(|r| r.state() == ProxyState::Ok),
        "{kraken_rows:?}"
    );
}

#[tokio::test]
async fn a_success_report_resets_the_failure_count() {
    use proxy_broker::pb::ProxyState;
    let up = Upstream::start().await;
    let b = broker(&[&up], "eject_after_failures: 3", "").await;
    let proxy = ask(&b, "binance", HTTP).await.proxy_url;
    for success in [false, false, true, false, false] {
        send(&b, report(&proxy, "binance", success)).await;
    }
    assert_eq!(
        proxy_state(&b, &proxy, "binance").await,
        ProxyState::Ok,
        "no three failures in a row yet"
    );
    assert_eq!(feedback_stats(&b).await.ejections, 0);
    send(&b, report(&proxy, "binance", false)).await;
    assert_eq!(proxy_state(&b, &proxy, "binance").await, ProxyState::Ejected);
    assert_eq!(feedback_stats(&b).await.ejections, 1);
}

#[tokio::test]
async fn ejected_pool_members_are_skipped_but_never_more_than_max_ejection_percent() {
    let up = Upstream::start().await;
    up.default_request(Reply::Status(500));
    // Every member that reports fails here: the exchange-outage guard would (rightly) call that an
    // outage of binance and lift the ejections, so it is kept out of this test.
    let yaml = upstream::config_yaml(
        &[&up.url],
        "eject_after_failures: 2\nmax_ejection_percent: 50\ncircuit_breaker_enabled: false",
        r#"
        default:
          http:
            pool:
              strategy: round_robin
              proxies:
                - url: "socks5://pool-a.test:1080"
                - url: "socks5://pool-b.test:1080"
                - url: "socks5://pool-c.test:1080"
                - url: "socks5://pool-d.test:1080"
        "#,
    ) + "brokering:\n  outage: { min_proxies: 10000 }\n";
    let b = TestBroker::start(common::load(Some(&yaml), &[]).unwrap()).await;
    let member = |m: &str| format!("socks5://pool-{m}.test:1080");
    let handed_out = || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..8 {
            let r = ask(&b, "binance", HTTP).await;
            assert_eq!(r.source(), ProxySource::Embedded);
            seen.insert(r.proxy_url.trim_start_matches("socks5://pool-")[..1].to_owned());
        }
        seen.into_iter().collect::<Vec<_>>().join("")
    };
    assert_eq!(handed_out().await, "abcd");

    for _ in 0..2 {
        send(&b, report(&member("a"), "binance", false)).await;
    }
    assert_eq!(handed_out().await, "bcd", "a is ejected");
    for _ in 0..2 {
        send(&b, report(&member("b"), "binance", false)).await;
    }
    assert_eq!(handed_out().await, "cd", "b is ejected: half the pool");
    for _ in 0..2 {
        send(&b, report(&member("c"), "binance", false)).await;
    }
    // c is ejected too, but at most 50 % of the pool counts as ejected at once: the ejections
    // that end soonest (a's, the oldest) are the ones set aside.
    assert_eq!(
        handed_out().await,
        "ad",
        "at most 50 % of the pool is ejected, the newest ejections first"
    );
    assert_eq!(feedback_stats(&b).await.ejections, 3);
    assert!(
        list_cache(&b).await.is_empty(),
        "embedded answers are never cached"
    );
}

#[tokio::test]
async fn direct_connection_feedback_is_forwarded_without_ejecting_anything() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "eject_after_failures: 1", "").await;
    ask(&b, "binance", HTTP).await;
    send(&b, report("", "binance", false)).await;
    let got = up.wait_feedback(1).await;
    assert_eq!(got[0].body["proxy_url"], "");
    assert_eq!(list_cache(&b).await.len(), 1);
    assert_eq!(feedback_stats(&b).await.ejections, 0);
}

// --- ReportFeedbackStream ---------------------------------------------------------------------

/// Opens a `ReportFeedbackStream` call fed from a channel; the call's answer comes from the task.
fn feedback_stream(
    b: &TestBroker,
) -> (
    tokio::sync::mpsc::Sender<ProxyFeedback>,
    tokio::task::JoinHandle<Result<u64, tonic::Status>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut client = b.client();
    let call = tokio::spawn(async move {
        client
            .report_feedback_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().accepted)
    });
    (tx, call)
}

#[tokio::test]
async fn a_feedback_stream_takes_every_report_as_report_feedback_would() {
    use proxy_broker::pb::ProxyState;
    let up = Upstream::start().await;
    let b = broker(&[&up], "eject_after_failures: 3", "").await;
    let proxy = ask(&b, "kraken", HTTP).await.proxy_url;
    let (tx, call) = feedback_stream(&b);
    for i in 0..300 {
        // 297 successes, then three failures in a row: the proxy is ejected for kraken.
        tx.send(report(&proxy, "kraken", i < 297)).await.unwrap();
    }
    drop(tx);
    assert_eq!(call.await.unwrap().unwrap(), 300);
    assert_eq!(feedback_stats(&b).await.enqueued, 300);
    assert_eq!(proxy_state(&b, &proxy, "kraken").await, ProxyState::Ejected);
    // Forwarded upstream like single reports.
    up.wait_feedback(300).await;
}

#[tokio::test]
async fn an_invalid_report_ends_the_stream_naming_its_position_and_field() {
    let up = Upstream::start().await;
    let b = broker(&[&up], "", "").await;
    let proxy = ask(&b, "kraken", HTTP).await.proxy_url;
    let (tx, call) = feedback_stream(&b);
    for _ in 0..3 {
        tx.send(report(&proxy, "kraken", true)).await.unwrap();
    }
    let secret = format!("socks5://user:hunter2@{}:1080", "h".repeat(2100));
    tx.send(report(&secret, "kraken", true)).await.unwrap();
    // Not read: the call has ended (sending may fail once the broker has answered).
    let _ = tx.send(report(&proxy, "kraken", true)).await;
    drop(tx);
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("message 3"), "{}", status.message());
    assert!(status.message().contains("proxy_url"), "{}", status.message());
    assert!(!status.message().contains("hunter2"), "{}", status.message());
    assert_eq!(
        feedback_stats(&b).await.enqueued,
        3,
        "the three before it were taken"
    );
}

#[tokio::test]
async fn a_feedback_stream_lives_while_it_sends_and_ends_after_a_silence() {
    let up = Upstream::start().await;
    let mut config = upstream::config(&[up.url.as_str()], "", "");
    config.server.request_body_timeout_seconds = 1;
    let b = TestBroker::start(config).await;
    let proxy = ask(&b, "kraken", HTTP).await.proxy_url;
    // Busy for 2.5 s, longer than the body timeout, with gaps shorter than it: answered.
    let (tx, call) = feedback_stream(&b);
    for _ in 0..10 {
        tx.send(report(&proxy, "kraken", true)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(tx);
    assert_eq!(call.await.unwrap().unwrap(), 10);
    // Silent after one report (the sender still open): the broker ends the call after about the
    // timeout instead of holding it, answering with what it took.
    let (tx, call) = feedback_stream(&b);
    tx.send(report(&proxy, "kraken", true)).await.unwrap();
    let accepted = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the silent stream was not ended")
        .unwrap()
        .unwrap();
    assert_eq!(accepted, 1);
    drop(tx);
    assert_eq!(feedback_stats(&b).await.enqueued, 11);
}
