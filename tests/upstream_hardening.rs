//! Upstream hardening over real sockets: redirects are not followed, answers are read within a
//! size limit, slow endpoints are hedged (and black-holed ones still trip their breakers), a hedge
//! that loses is cancelled, per-endpoint in-flight limits, connection reuse, feedback redaction,
//! and the new `external_service` keys. Upstreams are real loopback servers (`common/upstream.rs`),
//! including a black hole that accepts TCP and never answers. Nothing here bounds wall-clock time:
//! outcomes are read from upstream counters, admin RPCs and metrics, polled with deadlines.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use common::ops::{Exposition, LocalBroker, PROMPT, eventually};
use proxy_broker::pb::{
    BreakerState, ConnectionType, ListUpstreamsRequest, ProxyFeedback, ProxyResponse, ProxySource,
    UpstreamStatus,
};
use proxy_broker_core::model::HedgeDelay;
use upstream::{BlackHole, Reply, Upstream, config, config_yaml, request};

const HTTP: ConnectionType = ConnectionType::Http;
/// The API key of the redirect test (a secret: must never reach the redirect target).
const API_KEY: &str = "api-KEY-s3cret-9d2e71";

async fn start(endpoints: &[&str], settings: &str) -> LocalBroker {
    LocalBroker::start(config(endpoints, settings, "")).await
}

async fn ask(b: &LocalBroker, exchange: &str) -> ProxyResponse {
    b.client()
        .request_proxy(request(exchange, HTTP, None))
        .await
        .unwrap_or_else(|s| panic!("RequestProxy {exchange}: {s:?}"))
        .into_inner()
}

async fn status(b: &LocalBroker, url: &str) -> UpstreamStatus {
    let all = b
        .admin()
        .list_upstreams(ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .upstreams;
    all.iter()
        .find(|u| u.endpoint == url)
        .unwrap_or_else(|| panic!("no endpoint {url} in {all:?}"))
        .clone()
}

async fn metrics(b: &LocalBroker) -> Exposition {
    Exposition::parse(&b.broker.render_metrics().await)
}

/// `proxy_broker_upstream_requests_total{endpoint, outcome}`.
async fn upstream_calls(b: &LocalBroker, endpoint: &str, outcome: &str) -> f64 {
    metrics(b)
        .await
        .get(
            "proxy_broker_upstream_requests_total",
            &[("endpoint", endpoint), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
}

// --- Redirects -------------------------------------------------------------------------------

#[tokio::test]
async fn redirects_are_not_followed_and_the_credentials_never_reach_the_target() {
    for status in [301, 302, 303, 307, 308] {
        let redirecting = Upstream::start().await;
        let elsewhere = Upstream::start().await;
        let healthy = Upstream::start().await;
        // The Location may carry a secret of its own: it must not be echoed either.
        let location = format!("{}/api/v1/proxy/request?sig=loc-SECRET-{status}", elsewhere.url);
        redirecting.default_request(Reply::Redirect(status, location.clone()));
        redirecting.default_feedback(Reply::Redirect(status, location.replace("request", "feedback")));
        let settings = format!("auth_method: api_key\nauth_credentials:\n  api_key: \"{API_KEY}\"");
        let b = start(&[&redirecting.url, &healthy.url], &settings).await;

        let r = ask(&b, "binance").await;
        assert_eq!(
            (r.source(), r.upstream_endpoint.as_str()),
            (ProxySource::Upstream, healthy.url.as_str()),
            "{status}: the next endpoint answers"
        );
        assert_eq!(redirecting.request_count(), 1, "{status}");
        assert_eq!(
            redirecting.requests()[0].header("x-api-key"),
            API_KEY,
            "{status}: the endpoint itself gets the key"
        );
        let s = status_of(&b, &redirecting.url).await;
        assert_eq!(
            (s.total_failures, s.consecutive_failures),
            (1, 1),
            "{status}: {s:?}"
        );
        assert!(
            s.last_error.contains("redirect (not followed)"),
            "{status}: {:?}",
            s.last_error
        );
        assert!(
            !s.last_error.contains("loc-SECRET") && !s.last_error.contains(&elsewhere.url),
            "{status}: the Location is not shown: {:?}",
            s.last_error
        );
        assert_eq!(
            upstream_calls(&b, &redirecting.url, "redirect").await,
            1.0,
            "{status}"
        );

        // Feedback to the redirecting endpoint is not followed either (and not retried).
        b.client()
            .report_feedback(ProxyFeedback {
                proxy_url: redirecting.proxy_url().into(),
                exchange_id: "binance".into(),
                connection_type: HTTP.into(),
                success: false,
                ..Default::default()
            })
            .await
            .unwrap();
        redirecting.wait_feedback(1).await;
        eventually("the redirected feedback to be given up", PROMPT, || async {
            let feedback = b
                .admin()
                .list_upstreams(ListUpstreamsRequest {})
                .await
                .unwrap()
                .into_inner()
                .feedback
                .unwrap();
            (feedback.failed == 1).then_some(())
        })
        .await;
        assert_eq!(
            redirecting.feedback_count(),
            1,
            "{status}: a redirect is not retried"
        );

        assert!(
            elsewhere.recorded().is_empty(),
            "{status}: the redirect target was contacted: {:?}",
            elsewhere.recorded()
        );
        b.stop().await;
    }
}

async fn status_of(b: &LocalBroker, url: &str) -> UpstreamStatus {
    status(b, url).await
}

// --- Answer size limits ----------------------------------------------------------------------

#[tokio::test]
async fn a_50_mb_answer_is_rejected_and_the_next_endpoint_answers() {
    // (name, Content-Length announced, what last_error says)
    let cases = [
        (
            "announced by Content-Length",
            true,
            "(Content-Length) is over the 65536-byte limit",
        ),
        (
            "streamed without a length",
            false,
            "over the 65536-byte limit (stopped reading after",
        ),
    ];
    for (name, declared, error) in cases {
        let huge = Upstream::start().await;
        let healthy = Upstream::start().await;
        huge.default_request(Reply::Huge {
            bytes: 50 * 1024 * 1024,
            declared,
        });
        let b = start(&[&huge.url, &healthy.url], "hedge_delay_ms: 0").await;
        let r = ask(&b, "binance").await;
        assert_eq!(r.upstream_endpoint, healthy.url, "{name}");
        assert_eq!(r.proxy_url, healthy.proxy_url(), "{name}");
        let s = status(&b, &huge.url).await;
        assert_eq!(s.total_failures, 1, "{name}: {s:?}");
        assert!(s.last_error.contains(error), "{name}: {:?}", s.last_error);
        assert_eq!(
            upstream_calls(&b, &huge.url, "invalid_answer").await,
            1.0,
            "{name}"
        );
        b.stop().await;
    }
}

#[tokio::test]
async fn an_answer_just_under_the_limit_is_accepted() {
    let up = Upstream::start().await;
    // A valid answer padded with an ignored field to just under 64 KiB.
    let padding = "p".repeat(proxy_broker::upstream::MAX_ANSWER_BYTES - 200);
    up.default_request(Reply::ok(serde_json::json!({
        "proxy_url": "socks5://padded.test:1080",
        "strategy": "padded",
        "padding": padding,
    })));
    let b = start(&[&up.url], "").await;
    let r = ask(&b, "binance").await;
    assert_eq!(
        (r.source(), r.proxy_url.as_str()),
        (ProxySource::Upstream, "socks5://padded.test:1080")
    );
    b.stop().await;
}

// --- Hedging ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_black_holed_first_endpoint_is_hedged_and_its_breaker_still_counts_timeouts() {
    let hole = BlackHole::start().await;
    let healthy = Upstream::start().await;
    // hedge_delay_ms is auto (the default): the black hole never succeeds, so the 50 ms floor.
    let b = start(
        &[&hole.url, &healthy.url],
        "timeout_seconds: 2\nfailure_threshold: 3\nopen_seconds: 300",
    )
    .await;

    let first = ask(&b, "miss-0").await;
    assert_eq!(first.upstream_endpoint, healthy.url, "the hedge answers");
    assert_eq!(hole.request_count(), 1);
    assert_eq!(
        upstream_calls(&b, &hole.url, "timeout").await,
        0.0,
        "answered before the first endpoint timed out: hedged, not failed over"
    );
    for i in 1..6 {
        let r = ask(&b, &format!("miss-{i}")).await;
        assert_eq!(r.upstream_endpoint, healthy.url, "miss {i}");
        assert_eq!(r.source(), ProxySource::Upstream);
    }

    // The hedged attempts finish in the background: each times out and counts a failure, until
    // the breaker opens.
    eventually("the black hole's breaker to open", PROMPT, || async {
        (status(&b, &hole.url).await.breaker_state() == BreakerState::Open).then_some(())
    })
    .await;
    let s = status(&b, &hole.url).await;
    assert!(s.total_failures >= 3, "{s:?}");
    assert!(s.last_error.contains("timed out"), "{s:?}");
    assert!(upstream_calls(&b, &hole.url, "timeout").await >= 3.0);
    assert_eq!(
        upstream_calls(&b, &hole.url, "cancelled").await,
        0.0,
        "slow attempts are not cancelled"
    );
    assert_eq!(upstream_calls(&b, &healthy.url, "success").await, 6.0);

    // Open: the black hole is skipped, the healthy endpoint answers alone.
    let asked = hole.request_count();
    let r = ask(&b, "after-open").await;
    assert_eq!(r.upstream_endpoint, healthy.url);
    assert_eq!(hole.request_count(), asked, "an open breaker is skipped");
    assert!(upstream_calls(&b, &hole.url, "circuit_open").await >= 1.0);
    b.stop().await;
}

#[tokio::test]
async fn with_hedging_off_the_next_endpoint_is_asked_only_after_the_first_times_out() {
    let hole = BlackHole::start().await;
    let healthy = Upstream::start().await;
    let b = start(
        &[&hole.url, &healthy.url],
        "timeout_seconds: 1\nhedge_delay_ms: 0",
    )
    .await;
    let r = ask(&b, "binance").await;
    assert_eq!(r.upstream_endpoint, healthy.url);
    let waited = healthy.requests()[0].at - hole.request_times()[0];
    assert!(
        waited >= Duration::from_millis(900),
        "sequential: the second endpoint was asked {waited:?} after the first, before its 1 s timeout"
    );
    let s = status(&b, &hole.url).await;
    assert_eq!((s.total_failures, s.consecutive_failures), (1, 1), "{s:?}");
    assert_eq!(upstream_calls(&b, &hole.url, "timeout").await, 1.0);
    assert_eq!(upstream_calls(&b, &hole.url, "cancelled").await, 0.0);
    b.stop().await;
}

#[tokio::test]
async fn a_hedge_that_loses_is_cancelled_without_a_verdict() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let slow = Upstream::start().await;
    let hole = BlackHole::start().await;
    slow.default_request(Reply::Gated(
        gate.clone(),
        Box::new(Reply::proxy("socks5://slow.test:1080")),
    ));
    let b = start(&[&slow.url, &hole.url], "timeout_seconds: 30\nhedge_delay_ms: 50").await;

    let call = {
        let mut client = b.client();
        tokio::spawn(async move { client.request_proxy(request("binance", HTTP, None)).await })
    };
    // The first endpoint holds its answer until the hedge has reached the second one.
    eventually("the hedge to reach the second endpoint", PROMPT, || async {
        (hole.request_count() == 1).then_some(())
    })
    .await;
    gate.add_permits(1);
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(
        (r.upstream_endpoint.as_str(), r.proxy_url.as_str()),
        (slow.url.as_str(), "socks5://slow.test:1080"),
        "the first valid answer wins"
    );
    eventually("the losing hedge's request to be cancelled", PROMPT, || async {
        (hole.closed_count() == 1).then_some(())
    })
    .await;
    assert_eq!(upstream_calls(&b, &hole.url, "cancelled").await, 1.0);
    assert_eq!(upstream_calls(&b, &hole.url, "timeout").await, 0.0);
    let s = status(&b, &hole.url).await;
    assert_eq!(
        (s.total_failures, s.consecutive_failures, s.breaker_state()),
        (0, 0, BreakerState::Closed),
        "no verdict on a cancelled hedge: {s:?}"
    );
    assert_eq!(upstream_calls(&b, &slow.url, "success").await, 1.0);
    b.stop().await;
}

#[tokio::test]
async fn a_fast_failure_fails_over_at_once_whatever_the_hedge_delay() {
    let failing = Upstream::start().await;
    let healthy = Upstream::start().await;
    failing.default_request(Reply::Status(503));
    // A 60 s hedge delay and no embedded fallback: only an immediate failover answers in time.
    let b = start(
        &[&failing.url, &healthy.url],
        "hedge_delay_ms: 60000\nfallback_to_embedded: false",
    )
    .await;
    let mut call = tonic::Request::new(request("binance", HTTP, None));
    call.set_timeout(Duration::from_secs(20));
    let r = b.client().request_proxy(call).await.unwrap().into_inner();
    assert_eq!(r.upstream_endpoint, healthy.url);
    assert!(failing.requests()[0].seq < healthy.requests()[0].seq);
    b.stop().await;
}

// --- In-flight limits and connection reuse -----------------------------------------------------

#[tokio::test]
async fn requests_beyond_upstream_max_in_flight_wait_then_fail_over_as_saturated_without_a_verdict() {
    let hole = BlackHole::start().await;
    let healthy = Upstream::start().await;
    // One slot on the black hole, hedging off: each lookup waits for the slot (at most
    // timeout_seconds), or holds it until it times out, then fails over.
    let b = start(
        &[&hole.url, &healthy.url],
        "timeout_seconds: 2\nupstream_max_in_flight: 1\nhedge_delay_ms: 0",
    )
    .await;
    let lookup = |exchange: &'static str| {
        let mut client = b.client();
        tokio::spawn(async move { client.request_proxy(request(exchange, HTTP, None)).await })
    };
    let holder = lookup("holder");
    eventually("the first lookup to take the only slot", PROMPT, || async {
        (hole.request_count() == 1).then_some(())
    })
    .await;
    // Two more queue for the slot: when the holder times out one of them takes it (and holds it
    // for a whole timeout), so the other's wait (also one timeout) runs out first.
    let waiters = [lookup("waiter-a"), lookup("waiter-b")];
    for call in std::iter::once(holder).chain(waiters) {
        let r = call.await.unwrap().unwrap().into_inner();
        assert_eq!(r.upstream_endpoint, healthy.url, "every lookup fails over");
    }
    let timeouts = upstream_calls(&b, &hole.url, "timeout").await;
    let saturated = upstream_calls(&b, &hole.url, "saturated").await;
    assert!(saturated >= 1.0, "timeouts {timeouts}, saturated {saturated}");
    assert_eq!(timeouts + saturated, 3.0);
    assert_eq!(
        hole.request_count() as f64,
        timeouts,
        "a saturated attempt sends nothing"
    );
    let s = status(&b, &hole.url).await;
    assert_eq!(
        s.total_failures as f64, timeouts,
        "waiting for a slot says nothing about the endpoint: {s:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_miss_storm_stays_within_upstream_max_in_flight_and_reuses_connections() {
    const MISSES: usize = 60;
    let up = Upstream::start().await;
    up.default_request(Reply::proxy("socks5://storm.test:1080").after(Duration::from_millis(20)));
    let b = start(&[&up.url], "upstream_max_in_flight: 4").await;
    let calls: Vec<_> = (0..MISSES)
        .map(|i| {
            let mut client = b.client();
            tokio::spawn(async move {
                client
                    .request_proxy(request(&format!("storm-{i}"), HTTP, None))
                    .await
            })
        })
        .collect();
    for call in calls {
        let r = call.await.unwrap().unwrap().into_inner();
        assert_eq!(r.source(), ProxySource::Upstream);
    }
    assert_eq!(up.request_count(), MISSES);
    assert!(
        up.max_in_flight() <= 4,
        "{} requests in flight at once",
        up.max_in_flight()
    );
    let connections = up.request_connections();
    println!("{MISSES} concurrent misses, upstream_max_in_flight 4: {connections} connections");
    assert!(
        connections <= 2 * 4,
        "{connections} connections for {MISSES} misses: connections are not reused"
    );
    b.stop().await;
}

// --- Feedback --------------------------------------------------------------------------------

#[tokio::test]
async fn feedback_error_details_are_redacted_before_they_are_forwarded() {
    let up = Upstream::start().await;
    let b = start(&[&up.url], "").await;
    b.client()
        .report_feedback(ProxyFeedback {
            proxy_url: "socks5://p.test:1080".into(),
            exchange_id: "binance".into(),
            connection_type: HTTP.into(),
            success: false,
            error_details: Some("CONNECT via http://alice:hunter2@proxy.test:8080 refused".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let sent = up.wait_feedback(1).await;
    let details = sent[0].body["error_details"].as_str().unwrap().to_owned();
    assert!(!details.contains("hunter2"), "{details}");
    assert!(details.contains("proxy.test:8080"), "{details}");
    assert!(!String::from_utf8_lossy(&sent[0].raw).contains("hunter2"));
    b.stop().await;
}

#[tokio::test]
async fn a_feedback_timestamp_outside_1970_to_9999_never_takes_the_handler_down() {
    let up = Upstream::start().await;
    let b = start(&[&up.url], "").await;
    // (seconds since the epoch, what is forwarded when the report is accepted)
    let cases = [
        (-86_400 * 365 * 50, "1970-01-01T00:00:00.000Z"),
        (-62_135_596_800, "1970-01-01T00:00:00.000Z"), // 0001-01-01
        (253_402_300_799, "9999-12-31T23:59:59.000Z"),
    ];
    let mut accepted = 0;
    for (seconds, forwarded) in cases {
        let result = b
            .client()
            .report_feedback(ProxyFeedback {
                proxy_url: "socks5://p.test:1080".into(),
                exchange_id: "binance".into(),
                connection_type: HTTP.into(),
                success: true,
                timestamp: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                ..Default::default()
            })
            .await;
        match result {
            Ok(_) => {
                accepted += 1;
                let sent = up.wait_feedback(accepted).await;
                assert_eq!(sent[accepted - 1].body["timestamp"], forwarded, "{seconds}");
            }
            // Rejecting such a timestamp as invalid is the other acceptable answer.
            Err(status) => assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{seconds}: {status:?}"
            ),
        }
    }
    // The server still answers.
    assert_eq!(ask(&b, "binance").await.source(), ProxySource::Upstream);
    b.stop().await;
}

// --- Configuration ---------------------------------------------------------------------------

/// An environment variable: name, value.
type Var = (&'static str, &'static str);
/// Environment variables.
type Vars = &'static [Var];

#[test]
fn the_hedge_and_in_flight_keys_load_from_yaml_and_the_environment() {
    const ENV: &str = "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__";
    // (name, YAML settings, environment, hedge_delay_ms, upstream_max_in_flight, total)
    let cases: &[(&str, &str, Vars, HedgeDelay, i64, i64)] = &[
        ("defaults", "", &[], HedgeDelay::Auto, 64, 1024),
        (
            "auto in YAML",
            "hedge_delay_ms: auto",
            &[],
            HedgeDelay::Auto,
            64,
            1024,
        ),
        (
            "a number in YAML",
            "hedge_delay_ms: 250",
            &[],
            HedgeDelay::Fixed(250),
            64,
            1024,
        ),
        (
            "off in YAML",
            "hedge_delay_ms: 0",
            &[],
            HedgeDelay::Fixed(0),
            64,
            1024,
        ),
        (
            "limits in YAML",
            "upstream_max_in_flight: 8\nupstream_max_in_flight_total: 100000",
            &[],
            HedgeDelay::Auto,
            8,
            100_000,
        ),
        (
            "a number from the environment",
            "hedge_delay_ms: auto",
            &[("HEDGE_DELAY_MS", "75")],
            HedgeDelay::Fixed(75),
            64,
            1024,
        ),
        (
            "auto from the environment",
            "hedge_delay_ms: 75",
            &[("HEDGE_DELAY_MS", "auto")],
            HedgeDelay::Auto,
            64,
            1024,
        ),
        (
            "limits from the environment",
            "",
            &[
                ("UPSTREAM_MAX_IN_FLIGHT", "10000"),
                ("UPSTREAM_MAX_IN_FLIGHT_TOTAL", "1"),
            ],
            HedgeDelay::Auto,
            10_000,
            1,
        ),
    ];
    for (name, settings, env, hedge, per_endpoint, total) in cases {
        let yaml = config_yaml(&["http://127.0.0.1:9"], settings, "");
        let env: Vec<(String, &str)> = env.iter().map(|(k, v)| (format!("{ENV}{k}"), *v)).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let cfg = common::load(Some(&yaml), &env).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ext = &cfg.proxy.external_service;
        assert_eq!(
            (
                ext.hedge_delay_ms,
                ext.upstream_max_in_flight,
                ext.upstream_max_in_flight_total
            ),
            (*hedge, *per_endpoint, *total),
            "{name}"
        );
    }
}

#[test]
fn bad_hedge_and_in_flight_values_are_rejected_naming_the_key_value_and_rule() {
    // (YAML settings, environment variable, the message)
    let cases: &[(&str, Option<Var>, &str)] = &[
        (
            "hedge_delay_ms: 60001",
            None,
            "proxy.external_service.hedge_delay_ms: 60001 is out of range (allowed 0..=60000)",
        ),
        (
            "hedge_delay_ms: -1",
            None,
            "proxy.external_service.hedge_delay_ms: -1 is out of range (allowed 0..=60000)",
        ),
        (
            "hedge_delay_ms: fast",
            None,
            "proxy.external_service.hedge_delay_ms",
        ),
        (
            "hedge_delay_ms: 2.5",
            None,
            "proxy.external_service.hedge_delay_ms",
        ),
        (
            "",
            Some(("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__HEDGE_DELAY_MS", "soon")),
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__HEDGE_DELAY_MS",
        ),
        (
            "upstream_max_in_flight: 0",
            None,
            "proxy.external_service.upstream_max_in_flight: 0 is out of range (allowed 1..=10000)",
        ),
        (
            "upstream_max_in_flight: 10001",
            None,
            "proxy.external_service.upstream_max_in_flight: 10001 is out of range (allowed 1..=10000)",
        ),
        (
            "upstream_max_in_flight_total: 0",
            None,
            "proxy.external_service.upstream_max_in_flight_total: 0 is out of range (allowed 1..=100000)",
        ),
        (
            "upstream_max_in_flight_total: 100001",
            None,
            "proxy.external_service.upstream_max_in_flight_total: 100001 is out of range (allowed 1..=100000)",
        ),
    ];
    for (settings, env, want) in cases {
        let yaml = config_yaml(&["http://127.0.0.1:9"], settings, "");
        let env: Vec<(&str, &str)> = env.iter().copied().collect();
        let err = common::load(Some(&yaml), &env).expect_err(settings).to_string();
        assert!(err.contains(want), "{settings} {env:?}: {err}");
    }
    let err = common::load(
        Some(&config_yaml(&["http://127.0.0.1:9"], "hedge_delay_ms: fast", "")),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("fast") && err.contains("\"auto\" or a whole number of milliseconds"),
        "{err}"
    );
}

// --- Metric series after a reload ------------------------------------------------------------

#[tokio::test]
async fn a_reload_that_removes_an_endpoint_removes_its_metric_series() {
    let kept = Upstream::start().await;
    let removed = Upstream::start().await;
    kept.default_request(Reply::proxy("socks5://kept.test:1080"));
    removed.default_request(Reply::Status(500));
    let b = start(&[&removed.url, &kept.url], "hedge_delay_ms: 0").await;
    ask(&b, "binance").await;
    let before = metrics(&b).await;
    for (name, labels) in [
        (
            "proxy_broker_upstream_requests_total",
            vec![("endpoint", removed.url.as_str()), ("outcome", "error")],
        ),
        (
            "proxy_broker_circuit_state",
            vec![("endpoint", removed.url.as_str())],
        ),
    ] {
        assert!(
            before.get(name, &labels).is_some(),
            "{name} {labels:?} before the reload"
        );
    }
    b.broker
        .reload(config(&[&kept.url], "hedge_delay_ms: 0", ""))
        .unwrap();
    let after = b.broker.render_metrics().await;
    assert!(
        !after.contains(removed.url.as_str()),
        "no series of the removed endpoint:\n{after}"
    );
    assert!(
        Exposition::parse(&after)
            .get(
                "proxy_broker_upstream_requests_total",
                &[("endpoint", kept.url.as_str()), ("outcome", "success")]
            )
            .is_some(),
        "the kept endpoint keeps its series:\n{after}"
    );
}
