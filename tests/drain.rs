//! Graceful drain of the real binary: on SIGTERM health turns NOT_SERVING at once, new work is
//! refused, calls in flight (held ~1.5 s by a slow upstream) all complete, queued feedback is
//! flushed upstream best-effort, and the process exits 0 within the grace period.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ops::{BrokerProcess, ConfigDir, PROMPT, Reply, Upstream, eventually, proxy_for};
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{ConnectionType, ProxyFeedback, ProxyRequest, ProxySource};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long the upstream holds each lookup.
const UPSTREAM_LATENCY: Duration = Duration::from_millis(1500);
const GRACE_SECONDS: u64 = 5;

fn config_for(upstream: &Upstream) -> ConfigDir {
    ConfigDir::new(&format!(
        r#"
server:
  shutdown_grace_seconds: {GRACE_SECONDS}
proxy:
  enabled: true
  external_service:
    enabled: true
    endpoints: ["{}"]
    auth_credentials: {{ token: "upstream-token" }}
"#,
        upstream.url()
    ))
}

fn lookup(exchange: &str) -> ProxyRequest {
    ProxyRequest {
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Http.into(),
        ..Default::default()
    }
}

fn report(exchange: &str) -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: proxy_for(exchange),
        exchange_id: exchange.into(),
        connection_type: ConnectionType::Http.into(),
        success: true,
        latency_ms: Some(40),
        ..Default::default()
    }
}

#[tokio::test]
async fn sigterm_with_calls_in_flight_turns_health_not_serving_at_once_completes_every_call_and_exits_zero() {
    let upstream = Upstream::start_with(Arc::new(|body: &serde_json::Value| {
        Reply::answer(&proxy_for(body["exchange_id"].as_str().unwrap_or("x"))).after(UPSTREAM_LATENCY)
    }))
    .await;
    // Feedback deliveries are slow too, so they are still in flight when the signal comes.
    upstream.set_feedback_delay(Duration::from_millis(1000));
    let config = config_for(&upstream);
    let mut process = BrokerProcess::spawn(Some(&config.path), &[]);
    let channel = process.wait_serving().await;
    // A second feed on its own connection.
    let other = Endpoint::from_shared(format!("http://{}", process.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let calls: Vec<_> = (0..4)
        .map(|i| {
            let channel = if i % 2 == 0 {
                channel.clone()
            } else {
                other.clone()
            };
            tokio::spawn(async move {
                ProxyBrokerClient::new(channel)
                    .request_proxy(lookup(&format!("ex{i}")))
                    .await
            })
        })
        .collect();
    eventually("four lookups in flight upstream", PROMPT, || async {
        (upstream.in_flight() == 4).then_some(())
    })
    .await;
    let mut client = ProxyBrokerClient::new(channel.clone());
    for exchange in ["fb0", "fb1", "fb2"] {
        client.report_feedback(report(exchange)).await.unwrap();
    }
    eventually("the feedback deliveries to start", PROMPT, || async {
        (upstream.feedback_started().len() == 3).then_some(())
    })
    .await;

    process.signal("TERM");
    let signalled = Instant::now();
    let status = tokio::time::timeout(PROMPT, async {
        loop {
            match watch.message().await {
                Ok(Some(r)) if r.status() == ServingStatus::Serving => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the watch reports promptly");
    let not_serving_after = signalled.elapsed();
    assert_eq!(
        status.map(|r| r.map(|r| r.status())).map_err(|s| s.code()),
        Ok(Some(ServingStatus::NotServing))
    );
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "NOT_SERVING came before the drain finished ({not_serving_after:?} after SIGTERM)"
    );
    // Let the server close this connection's last stream.
    drop(watch);

    // New work is not taken while draining: a fresh connection gets nowhere.
    let refused = tokio::time::timeout(Duration::from_secs(1), async {
        let channel = Endpoint::from_shared(format!("http://{}", process.addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        ProxyBrokerClient::new(channel)
            .request_proxy(lookup("latecomer"))
            .await
            .map_err(|s| s.to_string())
    })
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a call on a new connection was served while draining"
    );

    for (i, call) in calls.into_iter().enumerate() {
        let answer = call
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("call {i} in flight at SIGTERM failed: {s:?}"))
            .into_inner();
        assert_eq!(answer.source(), ProxySource::Upstream);
        assert_eq!(answer.proxy_url, proxy_for(&format!("ex{i}")));
    }
    let (exit, _) = process.wait_exit(Duration::from_secs(GRACE_SECONDS + 10)).await;
    let took = signalled.elapsed();
    let log = process.stderr().await;
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(
        took < Duration::from_secs(GRACE_SECONDS),
        "exited {took:?} after SIGTERM, grace is {GRACE_SECONDS} s:\n{log}"
    );
    assert_eq!(upstream.requests_for("latecomer"), 0);
    let delivered: Vec<_> = upstream
        .feedback_done()
        .iter()
        .map(|s| s.body["exchange_id"].clone())
        .collect();
    assert_eq!(
        delivered.len(),
        3,
        "feedback delivered before exit: {delivered:?}\n{log}"
    );
    assert!(log.contains("draining in-flight calls"), "{log}");
}

#[tokio::test]
async fn queued_feedback_is_flushed_upstream_before_the_process_exits() {
    let upstream = Upstream::start().await;
    // Each delivery takes a second: with nothing else in flight the server stops at once, and
    // only the flush keeps the process alive long enough.
    upstream.set_feedback_delay(Duration::from_millis(1000));
    let config = config_for(&upstream);
    let mut process = BrokerProcess::spawn(Some(&config.path), &[]);
    let mut client = ProxyBrokerClient::new(process.wait_serving().await);
    for exchange in ["fb0", "fb1", "fb2"] {
        client.report_feedback(report(exchange)).await.unwrap();
    }
    drop(client);
    let (exit, log) = process.terminate(Duration::from_secs(GRACE_SECONDS + 10)).await;
    assert_eq!(exit.code(), Some(0), "{log}");
    let mut delivered: Vec<_> = upstream
        .feedback_done()
        .iter()
        .map(|s| s.body["exchange_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    delivered.sort();
    assert_eq!(delivered, ["fb0", "fb1", "fb2"], "{log}");
    // The reports arrive as sent, password included: the upstream handed that URL out.
    let fb0 = upstream
        .feedback_done()
        .into_iter()
        .find(|s| s.body["exchange_id"] == "fb0")
        .unwrap();
    assert_eq!(fb0.body["proxy_url"], proxy_for("fb0"));
    assert!(log.contains("queued feedback flushed"), "{log}");
}

#[tokio::test]
async fn feedback_that_cannot_be_delivered_does_not_hold_up_the_exit() {
    let upstream = Upstream::start().await;
    upstream.hold();
    let config = config_for(&upstream);
    let mut process = BrokerProcess::spawn(Some(&config.path), &[]);
    let mut client = ProxyBrokerClient::new(process.wait_serving().await);
    client.report_feedback(report("stuck")).await.unwrap();
    eventually("the delivery to hang upstream", PROMPT, || async {
        (upstream.feedback_started().len() == 1).then_some(())
    })
    .await;
    drop(client);
    process.signal("TERM");
    let (exit, took) = process.wait_exit(Duration::from_secs(GRACE_SECONDS + 10)).await;
    let log = process.stderr().await;
    assert_eq!(exit.code(), Some(0), "{log}");
    // The flush is best effort: bounded (2 s), well inside the grace period.
    assert!(took < Duration::from_secs(GRACE_SECONDS), "{took:?}:\n{log}");
    assert!(upstream.feedback_done().is_empty());
    assert!(
        log.contains("remaining=1"),
        "the undelivered report is logged:\n{log}"
    );
    upstream.release();
}

#[tokio::test]
async fn with_no_feedback_pending_sigterm_does_not_wait_out_the_flush_timeout() {
    let upstream = Upstream::start().await;
    let config = config_for(&upstream);
    let mut process = BrokerProcess::spawn(Some(&config.path), &[]);
    let mut client = ProxyBrokerClient::new(process.wait_serving().await);
    // One report, delivered at once: afterwards nothing is pending.
    client.report_feedback(report("fb0")).await.unwrap();
    eventually("the report delivered", PROMPT, || async {
        (upstream.feedback_done().len() == 1).then_some(())
    })
    .await;
    drop(client);
    process.signal("TERM");
    let (exit, took) = process.wait_exit(Duration::from_secs(GRACE_SECONDS + 10)).await;
    let log = process.stderr().await;
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(log.contains("remaining=0"), "nothing was pending:\n{log}");
    // The flush gives up after 2 s; with nothing pending it must not wait at all.
    assert!(took < Duration::from_millis(1500), "exit took {took:?}:\n{log}");
}
