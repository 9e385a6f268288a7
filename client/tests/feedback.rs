//! Feedback reaches the broker: the broker forwards every report to the upstream proxy service
//! that handed the proxy out, and that upstream (a real HTTP server here) records what arrived.

mod common;

use std::time::Duration;

use common::*;
use proxy_broker_client::{ConnectionType, Feedback, Source};
use serde_json::Value;

#[tokio::test]
async fn a_successful_websocket_reports_its_latency() {
    let proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let proxy_url = proxy.url("socks5h", None);
    let upstream = Upstream::start(&proxy_url, "fail").await;
    let broker = TestBroker::delegating(&upstream).await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url()).client_id("feed-test-1").build().unwrap();

    let mut socket = client
        .connect_websocket(&ws.url("ws", "localhost"), "Binance")
        .await
        .unwrap();
    assert_eq!(socket.get_ref().route().source, Source::Upstream);
    assert!(proxy.carried(greet_and_echo(&mut socket).await));

    let report = upstream
        .wait_feedback("success report", |f| f["success"] == Value::Bool(true))
        .await;
    assert_eq!(report["proxy_url"], proxy_url.as_str());
    assert_eq!(report["exchange_id"], "binance");
    assert_eq!(report["connection_type"], "websocket");
    assert_eq!(report["client_id"], "feed-test-1");
    assert!(report["latency_ms"].is_u64(), "latency measured: {report}");
    assert!(report["latency_ms"].as_u64().unwrap() < 10_000);
    assert!(report["error_details"].is_null(), "{report}");
    assert_eq!(
        upstream.feedback().len(),
        1,
        "exactly one report: {:?}",
        upstream.feedback()
    );
    eventually("delivery counted", Duration::from_secs(5), || {
        let stats = client.feedback_stats();
        async move { (stats.delivered == 1).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_failed_websocket_reports_the_error() {
    let refusing = TestProxy::start(ProxyKind::Socks5Refusing).await;
    let proxy_url = refusing.url("socks5", Some(("feed", "hunter2")));
    let upstream = Upstream::start(&proxy_url, "fail").await;
    let broker = TestBroker::delegating(&upstream).await;
    let ws = WsServer::start(None).await;
    let client = client(&broker.url()).build().unwrap();

    let err = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "kraken")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("socks5 handshake"), "{err}");

    let report = upstream
        .wait_feedback("failure report", |f| f["success"] == Value::Bool(false))
        .await;
    assert_eq!(
        report["proxy_url"],
        proxy_url.as_str(),
        "the proxy is named as it was handed out"
    );
    assert_eq!(report["exchange_id"], "kraken");
    assert_eq!(report["client_id"], client.client_id());
    let details = report["error_details"].as_str().expect("error details");
    assert!(details.contains("socks5 handshake"), "{details}");
    assert!(details.contains("refused"), "{details}");
    assert!(
        !details.contains("hunter2"),
        "password in error details: {details}"
    );
    assert!(report["latency_ms"].is_null());
}

#[tokio::test]
async fn http_requests_report_as_http() {
    let proxy = TestProxy::start(ProxyKind::Http { auth: None }).await;
    let upstream = Upstream::start(&proxy.url("http", None), "fail").await;
    let broker = TestBroker::delegating(&upstream).await;
    let http = HttpServer::start().await;
    let client = client(&broker.url()).build().unwrap();

    let body = client
        .http_get("coinbase", &http.url("localhost"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(proxy.carried(greeted_peer(&body)));
    let report = upstream
        .wait_feedback("http report", |f| f["connection_type"] == "http")
        .await;
    assert_eq!(report["success"], true);
    assert!(report["latency_ms"].is_u64());
}

#[tokio::test]
async fn report_is_fire_and_forget_even_when_the_broker_is_gone() {
    let dead = dead_addr().await;
    let client = client(&format!("http://{dead}"))
        .feedback_queue(2)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..50 {
        client.report(Feedback {
            proxy_url: Some("socks5://p:1080".into()),
            exchange_id: "binance".into(),
            connection_type: ConnectionType::Websocket,
            success: false,
            latency: None,
            error: Some("boom".into()),
            http_status: None,
            retry_after: None,
        });
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "report must not block"
    );
    let stats = eventually("reports accounted for", Duration::from_secs(20), || {
        let s = client.feedback_stats();
        async move { (s.delivered + s.failed + s.dropped == 50).then_some(s) }
    })
    .await;
    assert_eq!(stats.delivered, 0);
    assert!(stats.dropped > 0, "a queue of 2 overflows: {stats:?}");
}

fn success_report(i: usize) -> Feedback {
    Feedback {
        proxy_url: Some(format!("socks5://p{i}:1080")),
        exchange_id: "kucoin".into(),
        connection_type: ConnectionType::Websocket,
        success: true,
        latency: Some(Duration::from_millis(5)),
        error: None,
        http_status: None,
        retry_after: None,
    }
}

/// Reports that pile up go in batches on `ReportFeedbackStream`; the real broker takes them all
/// and forwards every one upstream.
#[tokio::test]
async fn a_burst_of_reports_is_delivered_in_batches_on_a_feedback_stream() {
    let upstream = Upstream::start("socks5://up:1080", "fail").await;
    let broker = TestBroker::delegating(&upstream).await;
    let client = client(&broker.url()).build().unwrap();
    for i in 0..600 {
        client.report(success_report(i));
    }
    let stats = eventually("600 delivered", Duration::from_secs(20), || {
        let s = client.feedback_stats();
        async move { (s.delivered + s.failed + s.dropped == 600).then_some(s) }
    })
    .await;
    assert_eq!((stats.delivered, stats.failed, stats.dropped), (600, 0, 0));
    eventually("600 forwarded upstream", Duration::from_secs(20), || {
        let n = upstream.feedback().len();
        async move { (n == 600).then_some(()) }
    })
    .await;
}

/// A broker without `ReportFeedbackStream` (UNIMPLEMENTED): the client goes back to single
/// `ReportFeedback` calls and loses nothing.
#[tokio::test]
async fn a_broker_without_feedback_streams_gets_single_reports() {
    let broker = ScriptedBroker::start(Script::Answer(answer("socks5://p:1080", 60))).await;
    let client = client(&broker.url()).build().unwrap();
    for i in 0..300 {
        client.report(success_report(i));
    }
    let stats = eventually("300 delivered", Duration::from_secs(20), || {
        let s = client.feedback_stats();
        async move { (s.delivered + s.failed + s.dropped == 300).then_some(s) }
    })
    .await;
    assert_eq!((stats.delivered, stats.failed, stats.dropped), (300, 0, 0));
}
