//! A short soak (well under 15 s): the real broker delegating to two flapping loopback upstreams
//! (healthy, answering 500, hanging: out of phase), with concurrent feeds calling `RequestProxy`
//! and `ReportFeedback` in a loop bounded in count and time. With `fallback_to_embedded: true`
//! no call may fail; afterwards the server still answers health checks and, once the upstreams
//! have recovered, every breaker closes again.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/upstream.rs"]
mod upstream;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::ops::{LocalBroker, PROMPT, eventually};
use proxy_broker::pb::{BreakerState, ConnectionType, ListUpstreamsRequest, ProxyFeedback, ProxySource};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use upstream::{Reply, Upstream, config, flap, request};

const FEEDS: usize = 8;
/// Calls per feed at most (the loop also stops at [`SOAK`]).
const CALLS_PER_FEED: usize = 400;
/// How long the feeds keep calling.
const SOAK: Duration = Duration::from_millis(7200);
/// One phase of the flapping upstreams; three phases per round, three rounds fill [`SOAK`].
const PHASE: Duration = Duration::from_millis(800);
const EMBEDDED: &str = "socks5://embedded.test:1080";

async fn breaker_states(b: &LocalBroker) -> Vec<(String, BreakerState)> {
    b.admin()
        .list_upstreams(ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .upstreams
        .iter()
        .map(|u| (u.endpoint.clone(), u.breaker_state()))
        .collect()
}

/// Sends fresh misses until the breaker of `url` is closed (probes need traffic).
async fn wait_closed(b: &LocalBroker, url: &str, what: &str) {
    let mut n = 0;
    eventually(what, PROMPT, || {
        n += 1;
        let key = format!("recover-{n}");
        async move {
            b.client()
                .request_proxy(request(&key, ConnectionType::Http, None))
                .await
                .unwrap();
            let states = breaker_states(b).await;
            states
                .iter()
                .any(|(e, s)| e == url && *s == BreakerState::Closed)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_upstreams_never_fail_a_call_and_the_breakers_close_after_recovery() {
    let first = Upstream::start().await;
    let second = Upstream::start().await;
    let hang = Reply::Hang;
    let fail = Reply::Status(500);
    let first_flap = flap(
        &first,
        vec![
            (Reply::proxy(first.proxy_url()), PHASE),
            (fail.clone(), PHASE),
            (hang.clone(), PHASE),
        ],
        3,
        Reply::proxy(first.proxy_url()),
    );
    let second_flap = flap(
        &second,
        vec![
            (fail.clone(), PHASE),
            (hang.clone(), PHASE),
            (Reply::proxy(second.proxy_url()), PHASE),
        ],
        3,
        Reply::proxy(second.proxy_url()),
    );
    let b = LocalBroker::start(config(
        &[&first.url, &second.url],
        "timeout_seconds: 1\nfailure_threshold: 2\nopen_seconds: 1\nmax_open_seconds: 2\nfallback_to_embedded: true",
        &format!("default:\n  http: \"{EMBEDDED}\""),
    ))
    .await;

    let until = Instant::now() + SOAK;
    let feeds: Vec<_> = (0..FEEDS)
        .map(|feed| {
            let mut client = b.client();
            tokio::spawn(async move {
                let mut sources: BTreeMap<String, usize> = BTreeMap::new();
                let mut errors = Vec::new();
                for i in 0..CALLS_PER_FEED {
                    if Instant::now() >= until {
                        break;
                    }
                    // Mostly fresh keys (misses go upstream), every fourth call repeats one.
                    let key = format!("soak-{feed}-{}", if i % 4 == 3 { i - 1 } else { i });
                    match client
                        .request_proxy(request(&key, ConnectionType::Http, None))
                        .await
                    {
                        Ok(r) => {
                            let r = r.into_inner();
                            *sources.entry(format!("{:?}", r.source())).or_default() += 1;
                            if i % 5 == 0 {
                                let report = ProxyFeedback {
                                    proxy_url: r.proxy_url.clone(),
                                    exchange_id: key.clone(),
                                    connection_type: ConnectionType::Http.into(),
                                    success: i % 10 == 0,
                                    ..Default::default()
                                };
                                if let Err(s) = client.report_feedback(report).await {
                                    errors.push(format!("ReportFeedback {key}: {s:?}"));
                                }
                            }
                        }
                        Err(s) => errors.push(format!("RequestProxy {key}: {s:?}")),
                    }
                }
                (sources, errors)
            })
        })
        .collect();
    let mut sources: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors = Vec::new();
    for feed in feeds {
        let (s, e) = feed.await.unwrap();
        for (k, v) in s {
            *sources.entry(k).or_default() += v;
        }
        errors.extend(e);
    }
    let calls: usize = sources.values().sum();
    println!("soak: {calls} calls by source {sources:?}");
    assert!(
        errors.is_empty(),
        "{} of {} calls failed: {:?}",
        errors.len(),
        calls + errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(sources.get("Upstream").is_some_and(|&n| n > 0), "{sources:?}");
    assert!(
        sources.get("Embedded").is_some_and(|&n| n > 0),
        "both upstreams were down at times: {sources:?}"
    );

    // Still serving.
    let health = HealthClient::new(b.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    // Recovery. The second endpoint only gets traffic while the first fails, so it recovers
    // first (the first failing fast), then the first.
    first_flap.await.unwrap();
    second_flap.await.unwrap();
    first.default_request(Reply::Status(500));
    wait_closed(&b, &second.url, "the second endpoint's breaker to close").await;
    first.default_request(Reply::proxy(first.proxy_url()));
    wait_closed(&b, &first.url, "the first endpoint's breaker to close").await;
    let states = breaker_states(&b).await;
    assert!(
        states.iter().all(|(_, s)| *s == BreakerState::Closed),
        "{states:?}"
    );
    let r = b
        .client()
        .request_proxy(request("after-soak", ConnectionType::Http, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.source(), r.upstream_endpoint.as_str()),
        (ProxySource::Upstream, first.url.as_str())
    );
    b.stop().await;
}
