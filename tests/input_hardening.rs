//! Outside input at the edges of what the broker accepts, against the real server with delegation
//! on and a real loopback upstream: feedback times outside 1970..=9999 (once a panic in the
//! handler), proxy URLs past 2,048 bytes from feeds and from upstreams, and configuration from the
//! environment that names absurd list indexes. Each is a clear error naming its field, never a
//! panic, and the server keeps serving.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::time::SystemTime;

use common::TestBroker;
use proxy_broker::pb::{ConnectionType, ProxyFeedback, ProxySource};
use proxy_broker_core::validate::MAX_PROXY_URL_LEN;
use serde_json::json;
use tonic::Code;
use upstream::{Reply, Upstream, request};

const HTTP: ConnectionType = ConnectionType::Http;

async fn broker(up: &Upstream, settings: &str) -> TestBroker {
    TestBroker::start(upstream::config(&[up.url.as_str()], settings, "")).await
}

fn feedback(proxy_url: &str, timestamp: Option<prost_types::Timestamp>) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_url.into(),
        exchange_id: "binance".into(),
        connection_type: HTTP.into(),
        success: false,
        timestamp,
        ..Default::default()
    }
}

fn at(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

/// The broker still answers lookups from the upstream.
async fn assert_still_serving(b: &TestBroker, exchange: &str) {
    let answer = b
        .client()
        .request_proxy(request(exchange, HTTP, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.source(), ProxySource::Upstream, "{answer:?}");
}

#[tokio::test]
async fn feedback_times_outside_1970_to_9999_are_invalid_arguments_and_the_server_keeps_serving() {
    let up = Upstream::start().await;
    let b = broker(&up, "").await;
    let proxy = b
        .client()
        .request_proxy(request("binance", HTTP, None))
        .await
        .unwrap()
        .into_inner()
        .proxy_url;
    let cases = [
        ("one second before 1970", at(-1, 0)),
        ("1969-07-20", at(-14_182_940, 0)),
        ("year 1", at(-62_135_596_800, 0)),
        ("year 10000", at(253_402_300_800, 0)),
        ("most negative", at(i64::MIN, 0)),
    ];
    for (name, timestamp) in cases {
        let status = b
            .client()
            .report_feedback(feedback(&proxy, timestamp))
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains("timestamp"), "{name}: {status:?}");
        assert!(
            status.message().contains("1970-01-01T00:00:00Z..=9999-12-31"),
            "{name}: states the rule: {status:?}"
        );
        assert_still_serving(&b, &format!("after-{}", name.replace(' ', "-"))).await;
    }
    assert_eq!(up.feedback_count(), 0, "nothing invalid was forwarded");

    // The edges themselves are accepted and forwarded in RFC 3339.
    let edges = [
        (at(0, 0), "1970-01-01T00:00:00.000Z"),
        (at(253_402_300_799, 999_999_999), "9999-12-31T23:59:59.999Z"),
    ];
    for (i, (timestamp, forwarded)) in edges.into_iter().enumerate() {
        let accepted = b
            .client()
            .report_feedback(feedback(&proxy, timestamp))
            .await
            .unwrap()
            .into_inner()
            .accepted;
        assert!(accepted);
        let got = up.wait_feedback(i + 1).await;
        assert!(
            got.iter().any(|r| r.body["timestamp"] == forwarded),
            "{forwarded} forwarded: {:?}",
            got.iter().map(|r| &r.body["timestamp"]).collect::<Vec<_>>()
        );
    }
    assert_still_serving(&b, "kraken").await;
    b.stop().await;
}

#[tokio::test]
async fn feedback_proxy_urls_past_2048_bytes_are_invalid_arguments_naming_proxy_url() {
    let up = Upstream::start().await;
    let b = broker(&up, "").await;
    let at_limit = format!("socks5://{}:1080", "h".repeat(MAX_PROXY_URL_LEN - 14));
    assert_eq!(at_limit.len(), MAX_PROXY_URL_LEN);
    let accepted = b
        .client()
        .report_feedback(feedback(&at_limit, None))
        .await
        .unwrap()
        .into_inner()
        .accepted;
    assert!(accepted, "exactly 2,048 bytes is allowed");
    for len in [MAX_PROXY_URL_LEN + 1, 20 * 1024] {
        let url = format!("socks5://user:{}@h:1080", "s".repeat(len - 21));
        assert_eq!(url.len(), len);
        let status = b
            .client()
            .report_feedback(feedback(&url, Some(SystemTime::now().into())))
            .await
            .expect_err("too long");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let message = status.message();
        assert!(message.contains("proxy_url"), "{message}");
        assert!(
            message.contains(&format!("is {len} bytes long (at most 2048")),
            "{message}"
        );
        assert!(!message.contains("sss") && !message.contains("user"), "{message}");
    }
    assert_still_serving(&b, "binance").await;
    b.stop().await;
}

#[tokio::test]
async fn an_upstream_answer_with_a_proxy_url_past_2048_bytes_is_an_invalid_answer() {
    let up = Upstream::start().await;
    let long = format!("socks5://user:{}@h:1080", "s".repeat(3000));
    up.default_request(Reply::ok(json!({"proxy_url": long, "strategy": "test"})));
    let b = broker(&up, "fallback_to_embedded: false\ncircuit_breaker_enabled: false").await;
    let status = b
        .client()
        .request_proxy(request("binance", HTTP, None))
        .await
        .expect_err("invalid answer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(message.contains("invalid answer"), "{message}");
    assert!(message.contains("at most 2048"), "{message}");
    assert!(!message.contains("sss"), "the URL is not echoed: {message}");
    assert!(message.len() < 1024, "{message}");

    // The same upstream with a normal answer is used again.
    up.default_request(Reply::proxy("socks5://p:1080"));
    assert_still_serving(&b, "kraken").await;
    b.stop().await;
}

#[tokio::test]
async fn absurd_environment_list_indexes_are_config_errors_naming_the_key() {
    let huge = "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__POOL__PROXIES__99999999999__URL";
    let yaml = "proxy:\n  enabled: true\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            huge,
            "proxy.exchanges.binance.http.pool.proxies[99999999999]",
            "out of range (0..=9999)",
        ),
        (
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS__184467440737095516150",
            "proxy.external_service.endpoints[184467440737095516150]",
            "out of range",
        ),
        (
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS__2",
            "proxy.external_service.endpoints[0]",
            "without gaps",
        ),
    ];
    for (var, path, rule) in cases {
        let err = common::load(Some(yaml), &[(var, "http://u:1")]).expect_err(var);
        let problem = err
            .problems
            .iter()
            .find(|p| p.path == *path)
            .unwrap_or_else(|| panic!("{var}: no problem at {path}: {err}"));
        assert!(problem.message.contains(rule), "{var}: {err}");
        assert!(problem.message.contains(var), "{var}: names the variable: {err}");
    }
}

#[tokio::test]
async fn debug_of_a_running_broker_prints_no_token_and_no_proxy_credentials() {
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://feeduser:pw-S3CRET-9@cached.test:1080"));
    let token = "server-token-S3CRET-0123456789";
    let yaml = upstream::config_yaml(&[up.url.as_str()], "", "")
        + &format!("server:\n  auth_tokens: [\"{token}\"]\n");
    let broker = std::sync::Arc::new(
        proxy_broker::broker::Broker::new(common::load(Some(&yaml), &[]).unwrap()).unwrap(),
    );
    let b = TestBroker::start_broker(broker.clone()).await;
    let mut client = b.client();
    let mut req = tonic::Request::new(request("binance", ConnectionType::Http, None));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.request_proxy(req).await.unwrap();
    let mut fb = tonic::Request::new(feedback("socks5://feeduser:pw-S3CRET-9@cached.test:1080", None));
    fb.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.report_feedback(fb).await.unwrap();
    let shown = format!("{broker:?} {:?}", broker.state());
    for secret in [token, "pw-S3CRET-9", "feeduser", upstream::TOKEN] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
}
