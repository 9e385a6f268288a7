//! The contract additions of feed-aware brokering, against the real broker over gRPC: validation
//! of `sticky_key`, `http_status` and `retry_after_seconds` (INVALID_ARGUMENT naming the field),
//! forwarding of the new feedback fields to upstream services, and the new RPCs being served.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use common::TestBroker;
use proxy_broker::pb::{
    ConnectionType, ListExchangesRequest, ListProxiesRequest, ProxyFeedback, ProxyRequest, ProxySource,
};
use proxy_broker::request::{MAX_RETRY_AFTER_SECONDS, MAX_STICKY_KEY_LEN};
use tonic::Code;
use upstream::Upstream;

const EXAMPLE: &str = include_str!("../examples/broker.yaml");

async fn broker() -> TestBroker {
    TestBroker::start_yaml(EXAMPLE, &[]).await
}

fn request(sticky_key: Option<&str>) -> ProxyRequest {
    ProxyRequest {
        exchange_id: "binance".into(),
        connection_type: ConnectionType::Http.into(),
        sticky_key: sticky_key.map(str::to_owned),
        ..Default::default()
    }
}

fn failure(http_status: Option<u32>, retry_after_seconds: Option<u32>) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: "http://binance-proxy:8080".into(),
        exchange_id: "binance".into(),
        connection_type: ConnectionType::Websocket.into(),
        success: false,
        http_status,
        retry_after_seconds,
        ..Default::default()
    }
}

/// Asserts INVALID_ARGUMENT whose message starts with `<field>: ` and contains every one of
/// `said` (the value and the rule).
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(
    row: &str,
    result: Result<T, tonic::Status>,
    field: &str,
    said: &[&str],
) {
    let status = result.expect_err(row);
    assert_eq!(status.code(), Code::InvalidArgument, "{row}: {status:?}");
    let message = status.message();
    assert!(
        message.starts_with(&format!("{field}: ")),
        "{row}: message {message:?} does not name the field {field:?}"
    );
    for needle in said {
        assert!(
            message.contains(needle),
            "{row}: message {message:?} lacks {needle:?}"
        );
    }
}

// --- sticky_key ----------------------------------------------------------------------------------

#[tokio::test]
async fn sticky_keys_beyond_128_printable_ascii_are_invalid_argument_naming_the_field() {
    let b = broker().await;
    let too_long = "k".repeat(MAX_STICKY_KEY_LEN + 1);
    // (row, key, what the message says)
    let cases = [
        ("129 characters", too_long.as_str(), "is 129 characters long"),
        ("newline", "feed-1\nbtc", "contains '\\n' at byte 6"),
        ("tab", "feed\t1", "contains '\\t'"),
        ("NUL", "feed\u{0}", "contains '\\0'"),
        ("DEL", "feed\u{7f}", "contains '\\u{7f}'"),
        ("non-ASCII", "feed-ключ", "contains 'к'"),
    ];
    const RULE: &str = "at most 128 characters of printable ASCII, 0x20..=0x7E";
    for (row, key, said) in cases {
        let result = b.client().request_proxy(request(Some(key))).await;
        assert_invalid(row, result, "sticky_key", &[said, RULE]);
        // WatchProxy validates its request the same way.
        let watched = b.client().watch_proxy(request(Some(key))).await;
        assert_invalid(row, watched.map(|_| ()), "sticky_key", &[said, RULE]);
    }
    b.stop().await;
}

#[tokio::test]
async fn sticky_keys_within_the_rule_are_answered() {
    let b = broker().await;
    let longest = "~".repeat(MAX_STICKY_KEY_LEN);
    let cases = [
        ("absent", None),
        ("empty means none", Some("")),
        ("128 characters", Some(longest.as_str())),
        ("space and punctuation", Some("feed 1/BTC-USDT:perp {a}")),
    ];
    for (row, key) in cases {
        let answer = b
            .client()
            .request_proxy(request(key))
            .await
            .unwrap_or_else(|s| panic!("{row}: {s:?}"))
            .into_inner();
        assert_eq!(answer.proxy_url, "http://binance-proxy:8080", "{row}");
        assert_eq!(answer.source(), ProxySource::Embedded, "{row}");
    }
    b.stop().await;
}

// --- http_status, retry_after_seconds ----------------------------------------------------------

#[tokio::test]
async fn feedback_statuses_outside_100_to_599_and_waits_over_7_days_are_invalid_argument() {
    let b = broker().await;
    let over = MAX_RETRY_AFTER_SECONDS + 1;
    // (row, http_status, retry_after_seconds, field, rule)
    let cases = [
        (
            "status 0",
            Some(0),
            None,
            "http_status",
            "0 is not an HTTP status (allowed 100..=599)",
        ),
        (
            "status 99",
            Some(99),
            None,
            "http_status",
            "99 is not an HTTP status",
        ),
        (
            "status 600",
            Some(600),
            None,
            "http_status",
            "600 is not an HTTP status",
        ),
        (
            "status u32::MAX",
            Some(u32::MAX),
            None,
            "http_status",
            "4294967295 is not",
        ),
        (
            "wait of 7 days and a second",
            Some(418),
            Some(over),
            "retry_after_seconds",
            "604801 is more than 7 days (allowed 0..=604800)",
        ),
        (
            "wait u32::MAX",
            None,
            Some(u32::MAX),
            "retry_after_seconds",
            "is more than 7 days",
        ),
    ];
    for (row, status, wait, field, rule) in cases {
        let result = b.client().report_feedback(failure(status, wait)).await;
        assert_invalid(row, result, field, &[rule]);
    }
    b.stop().await;
}

#[tokio::test]
async fn feedback_statuses_and_waits_within_the_rule_are_accepted() {
    let b = broker().await;
    let cases = [
        ("no status, no wait", None, None),
        ("lowest status", Some(100), None),
        ("highest status", Some(599), None),
        ("ban with a wait", Some(418), Some(120)),
        ("geo-block", Some(451), None),
        ("slow down, retry now", Some(429), Some(0)),
        ("wait of exactly 7 days", Some(403), Some(MAX_RETRY_AFTER_SECONDS)),
        ("wait without a status", None, Some(30)),
    ];
    for (row, status, wait) in cases {
        let receipt = b
            .client()
            .report_feedback(failure(status, wait))
            .await
            .unwrap_or_else(|s| panic!("{row}: {s:?}"))
            .into_inner();
        assert!(receipt.accepted, "{row}");
    }
    b.stop().await;
}

#[tokio::test]
async fn feedback_is_forwarded_upstream_with_http_status_and_retry_after_seconds() {
    let up = Upstream::start().await;
    let b = TestBroker::start(upstream::config(&[&up.url], "", "")).await;
    let proxy = b.ask("binance", ConnectionType::Websocket).await.proxy_url;
    let report = |client_id: &str, status, wait| ProxyFeedback {
        proxy_url: proxy.clone(),
        client_id: client_id.into(),
        ..failure(status, wait)
    };
    for fb in [
        report("banned", Some(418), Some(7200)),
        report("limited", Some(429), None),
        report("plain", None, None),
    ] {
        assert!(
            b.client()
                .report_feedback(fb)
                .await
                .unwrap()
                .into_inner()
                .accepted
        );
    }
    let got = up.wait_feedback(3).await;
    let body = |client_id: &str| {
        got.iter()
            .find(|r| r.body["client_id"] == client_id)
            .unwrap_or_else(|| panic!("no report from {client_id}: {got:?}"))
            .body
            .clone()
    };
    // (client id, http_status, retry_after_seconds): absent fields are left out of the body, so
    // upstreams that predate them see the design's ProxyFeedback unchanged.
    let cases = [
        ("banned", Some(418), Some(7200)),
        ("limited", Some(429), None),
        ("plain", None, None),
    ];
    for (client_id, status, wait) in cases {
        let body = body(client_id);
        let object = body.as_object().unwrap();
        assert_eq!(
            object.get("http_status").and_then(|v| v.as_u64()),
            status,
            "{body}"
        );
        assert_eq!(
            object.get("retry_after_seconds").and_then(|v| v.as_u64()),
            wait,
            "{body}"
        );
        assert_eq!(body["proxy_url"], proxy.as_str(), "{body}");
        assert_eq!(body["success"], false, "{body}");
    }
    b.stop().await;
}

// --- New RPCs ------------------------------------------------------------------------------------

/// The admin RPCs validate their paging like `ListCache` (their behaviour: `tests/brokering.rs`).
#[tokio::test]
async fn list_proxies_and_list_exchanges_refuse_bad_paging_naming_the_field() {
    let b = broker().await;
    let mut admin = b.admin();
    let cases = [
        (
            "ListProxies page_size",
            admin
                .list_proxies(ListProxiesRequest {
                    page_size: 1001,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "page_size",
        ),
        (
            "ListProxies page_token",
            admin
                .list_proxies(ListProxiesRequest {
                    page_token: "zz".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "page_token",
        ),
        (
            "ListExchanges page_size",
            admin
                .list_exchanges(ListExchangesRequest {
                    page_size: 5000,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "page_size",
        ),
        (
            "ListExchanges page_token",
            admin
                .list_exchanges(ListExchangesRequest {
                    page_token: "not hex".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "page_token",
        ),
    ];
    for (row, result, field) in cases {
        assert_invalid(row, result, field, &[]);
    }
    b.stop().await;
}
