//! Cross-replica single flight and shared answers, with two brokers in this process sharing one
//! real `redis-server` (the multi-process fleet tests are `tests/fleet.rs`).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestBroker;
use common::ops::{Reply, Upstream};
use common::redis::RedisServer;
use proxy_broker::pb::{ConnectionType, ProxyRequest};
use serde_json::Value;

fn yaml(upstream: &Upstream, redis: &RedisServer, prefix: &str) -> String {
    format!(
        r#"
proxy:
  enabled: true
  external_service:
    enabled: true
    endpoints: ["{}"]
    auth_credentials: {{ token: "t0ken" }}
    fallback_to_embedded: false
store:
  backend: redis
  redis:
    url: "{}"
    key_prefix: "{prefix}"
    operation_timeout_ms: 500
"#,
        upstream.url(),
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_split_over_two_replicas_makes_one_upstream_call_per_key() {
    let redis = RedisServer::start();
    let upstream = Upstream::start_with(Arc::new(|body: &Value| {
        let exchange = body["exchange_id"].as_str().unwrap_or("x");
        Reply::answer(&format!("socks5://{exchange}.fleet:1080")).after(Duration::from_millis(300))
    }))
    .await;
    let a = TestBroker::start_yaml(&yaml(&upstream, &redis, "flight:"), &[]).await;
    let b = TestBroker::start_yaml(&yaml(&upstream, &redis, "flight:"), &[]).await;
    let keys = 10;
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let mut client = if i % 2 == 0 { a.client() } else { b.client() };
            tokio::spawn(async move {
                client
                    .request_proxy(ProxyRequest {
                        // Pairs of calls share a key and go to different replicas.
                        exchange_id: format!("ex{}", (i / 2) % keys),
                        connection_type: ConnectionType::Http.into(),
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call
            .await
            .unwrap()
            .expect("no call of the storm fails")
            .into_inner();
        assert_eq!(
            answer.proxy_url,
            format!("socks5://ex{}.fleet:1080", (i / 2) % keys)
        );
    }
    assert_eq!(
        upstream.requests().len(),
        keys,
        "one upstream call per key for the fleet"
    );
    // The other replica's answer is in this one's near-cache: hits cost no upstream call.
    for broker in [&a, &b] {
        let again = broker.ask("ex3", ConnectionType::Http).await;
        assert_eq!(again.proxy_url, "socks5://ex3.fleet:1080");
    }
    assert_eq!(upstream.requests().len(), keys);
}
