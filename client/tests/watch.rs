//! `BrokerClient::watch` and the `watch_reconnect` example against the real broker, and the rule
//! that every new WebSocket connection asks the broker (its last answer serves only while the
//! broker is unreachable).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use proxy_broker_client::{
    Assignments, BrokerClient, ConnectionType, Error, LocalConfig, Resolved, Source, WatchOptions,
};
use tokio::net::TcpListener;

#[allow(dead_code)]
#[path = "../examples/watch_reconnect.rs"]
mod watch_example;

/// Generous: the machine is shared; nothing asserts a tighter upper bound.
const DEADLINE: Duration = Duration::from_secs(20);

fn pool(members: &[String]) -> String {
    let mut yaml = String::from(
        "server:\n  shutdown_grace_seconds: 0\nproxy:\n  enabled: true\n  default:\n    websocket:\n      pool:\n        strategy: round_robin\n        proxies:\n",
    );
    for m in members {
        yaml += &format!("          - url: \"{m}\"\n");
    }
    yaml
}

/// A broker (`proxy_broker::run`, as in production) on `addr`; stopping it frees the address.
async fn broker_at(addr: SocketAddr, yaml: &str) -> TestBrokerAt {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, yaml.as_bytes()).unwrap();
    let config = proxy_broker::BrokerConfig::loader(Some(file.path()))
        .env_vars(Vec::<(String, String)>::new())
        .load::<proxy_broker::BrokerConfig>()
        .unwrap();
    let listener = eventually("the address to be free again", DEADLINE, || async {
        TcpListener::bind(addr).await.ok()
    })
    .await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(proxy_broker::run(listener, config, async move {
        let _ = rx.await;
    }));
    TestBrokerAt { tx, task }
}

struct TestBrokerAt {
    tx: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), proxy_broker::server::ServeError>>,
}

impl TestBrokerAt {
    async fn stop(self) {
        let _ = self.tx.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn next(watch: &mut Assignments) -> Result<Resolved, Error> {
    tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("an item before the deadline")
        .expect("the watch goes on")
}

fn url(r: &Resolved) -> String {
    r.proxy
        .as_ref()
        .map_or_else(String::new, |p| p.as_str().to_owned())
}

/// Reports a ban of `proxy_url` for binance, as another feed would: through the client's own
/// `report`, with the exchange's HTTP status.
async fn report_ban(broker_url: &str, proxy_url: &str) {
    let other = client(broker_url).build().unwrap();
    other.report(proxy_broker_client::Feedback {
        proxy_url: Some(proxy_url.into()),
        exchange_id: "binance".into(),
        connection_type: proxy_broker_client::ConnectionType::Websocket,
        success: false,
        latency: None,
        error: Some("HTTP 403 from the exchange".into()),
        http_status: Some(403),
        retry_after: None,
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while other.feedback_stats().delivered == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ban report was not delivered"
        );
        // Poll interval; the deadline above bounds the wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- Every new WebSocket connection asks the broker ------------------------------------------

#[tokio::test]
async fn every_new_websocket_connection_asks_the_broker_and_its_last_answer_serves_only_while_it_is_down() {
    let first = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let second = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let addr = dead_addr().await;
    let broker = broker_at(
        addr,
        &pool(&[first.url("socks5", None), second.url("socks5", None)]),
    )
    .await;
    let ws = WsServer::start(None).await;
    // A long cache TTL and no local configuration: only the broker can make the proxies alternate.
    let client = client(&format!("http://{addr}"))
        .max_cache_ttl(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut carried_by_first = Vec::new();
    for _ in 0..4 {
        let mut socket = client
            .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
            .await
            .unwrap();
        carried_by_first.push(first.carried(greet_and_echo(&mut socket).await));
    }
    assert_eq!(
        carried_by_first,
        [true, false, true, false],
        "round robin: asked each time"
    );
    broker.stop().await;
    // Broker gone, no local configuration: the last answer (the second proxy) serves.
    let mut socket = client
        .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
        .await
        .unwrap();
    assert!(second.carried(greet_and_echo(&mut socket).await));
    assert_eq!(
        socket.get_ref().route().source,
        Source::Embedded,
        "the broker's own answer"
    );
}

// --- watch -------------------------------------------------------------------------------------

#[tokio::test]
async fn watch_yields_the_assignment_then_moves_off_a_proxy_banned_by_another_feed() {
    let addr = dead_addr().await;
    let broker = broker_at(addr, &pool(&["socks5://a:1080".into(), "socks5://b:1080".into()])).await;
    let url_of_broker = format!("http://{addr}");
    let client = client(&url_of_broker).build().unwrap();
    let mut watch = client
        .watch("binance", ConnectionType::Websocket, &WatchOptions::default())
        .unwrap();
    let first = next(&mut watch).await.unwrap();
    assert_eq!(first.source, Source::Embedded);
    assert!(first.lease_expires_at.is_some(), "{first:?}");
    report_ban(&url_of_broker, &url(&first)).await;
    let moved = next(&mut watch).await.unwrap();
    assert!(!moved.same_route(&first), "{first:?} then {moved:?}");
    drop(watch);
    broker.stop().await;
}

#[tokio::test]
async fn watch_answers_from_the_last_broker_answer_while_the_broker_is_down_and_resumes_after() {
    let addr = dead_addr().await;
    let broker = broker_at(addr, &pool(&["socks5://before:1080".into()])).await;
    let client = client(&format!("http://{addr}")).build().unwrap();
    let mut watch = client
        .watch("binance", ConnectionType::Websocket, &WatchOptions::default())
        .unwrap();
    assert_eq!(url(&next(&mut watch).await.unwrap()), "socks5://before:1080");
    broker.stop().await;
    let meanwhile = next(&mut watch).await.unwrap();
    assert_eq!(url(&meanwhile), "socks5://before:1080", "the last broker answer");
    let broker = broker_at(addr, &pool(&["socks5://after:1080".into()])).await;
    let back = next(&mut watch).await.unwrap();
    assert_eq!(url(&back), "socks5://after:1080", "reconnected to the broker");
    drop(watch);
    broker.stop().await;
}

#[tokio::test]
async fn watch_with_nowhere_to_fall_back_yields_no_route_and_keeps_trying() {
    let addr = dead_addr().await;
    let client = client(&format!("http://{addr}")).build().unwrap();
    let mut watch = client
        .watch("binance", ConnectionType::Websocket, &WatchOptions::default())
        .unwrap();
    let err = next(&mut watch).await.unwrap_err();
    assert!(matches!(err, Error::NoRoute { .. }), "{err}");
    let broker = broker_at(addr, &pool(&["socks5://late:1080".into()])).await;
    assert_eq!(url(&next(&mut watch).await.unwrap()), "socks5://late:1080");
    drop(watch);
    broker.stop().await;
}

#[tokio::test]
async fn watch_falls_back_to_the_local_configuration_when_the_broker_never_answered() {
    let addr = dead_addr().await;
    let client = client(&format!("http://{addr}"))
        .local_config(local_env("socks5://local:1080"))
        .build()
        .unwrap();
    let mut watch = client
        .watch("binance", ConnectionType::Websocket, &WatchOptions::default())
        .unwrap();
    let local = next(&mut watch).await.unwrap();
    assert_eq!(
        (url(&local).as_str(), local.source),
        ("socks5://local:1080", Source::Local)
    );
}

#[tokio::test]
async fn a_refused_watch_yields_the_refusal_and_ends() {
    let addr = dead_addr().await;
    let yaml = pool(&["socks5://a:1080".into()]).replace(
        "server:\n",
        "server:\n  auth_tokens: [\"feed-token-0123456789\"]\n",
    );
    let broker = broker_at(addr, &yaml).await;
    let client = client(&format!("http://{addr}")).build().unwrap();
    let mut watch = client
        .watch("binance", ConnectionType::Websocket, &WatchOptions::default())
        .unwrap();
    match next(&mut watch).await {
        Err(Error::Broker { code, .. }) => assert_eq!(code, tonic::Code::Unauthenticated),
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(DEADLINE, watch.next())
            .await
            .unwrap()
            .is_none()
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_broker_without_watch_proxy_is_polled_with_request_proxy() {
    let broker = ScriptedBroker::start(Script::Answer(answer("socks5://127.0.0.1:1085", 300))).await;
    let client = client(&broker.url()).build().unwrap();
    let mut watch = client
        .watch("binance", ConnectionType::Websocket, &WatchOptions::default())
        .unwrap();
    assert_eq!(url(&next(&mut watch).await.unwrap()), "socks5://127.0.0.1:1085");
    assert_eq!(broker.calls(), 1);
}

#[tokio::test]
async fn watch_arguments_that_break_the_contract_fail_before_any_call() {
    let client = BrokerClient::builder("http://127.0.0.1:1")
        .local_config(LocalConfig::None)
        .build()
        .unwrap();
    let long_region = "r".repeat(65);
    // (row, exchange, options, field named)
    let rows = [
        (
            "bad exchange id",
            "bin ance",
            WatchOptions::default(),
            "exchange_id",
        ),
        (
            "region too long",
            "binance",
            WatchOptions {
                region: Some(long_region),
                ..Default::default()
            },
            "region",
        ),
        (
            "sticky key with a newline",
            "binance",
            WatchOptions {
                sticky_key: Some("feed\n1".into()),
                ..Default::default()
            },
            "sticky_key",
        ),
    ];
    for (row, exchange, options, field) in rows {
        match client.watch(exchange, ConnectionType::Websocket, &options) {
            Err(Error::InvalidArgument { field: got, .. }) => assert_eq!(got, field, "{row}"),
            other => panic!("{row}: expected InvalidArgument, got {other:?}"),
        }
    }
}

// --- The example -------------------------------------------------------------------------------

#[tokio::test]
async fn the_watch_example_moves_its_websocket_to_the_other_proxy_when_one_is_banned() {
    let first = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let second = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let (a, b) = (first.url("socks5", None), second.url("socks5", None));
    let addr = dead_addr().await;
    let broker = broker_at(addr, &pool(&[a.clone(), b.clone()])).await;
    let ws = WsServer::start(None).await;
    let url_of_broker = format!("http://{addr}");
    let args: Vec<String> = [
        "--broker",
        &url_of_broker,
        "--exchange",
        "binance",
        "--url",
        &ws.url("ws", "127.0.0.1"),
        "--moves",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let example = tokio::spawn(async move { watch_example::run(&args).await.map_err(|e| e.to_string()) });
    // The example connects through one proxy; another feed reports that proxy banned.
    let on_first = eventually("the example's first connection", DEADLINE, || async {
        let peers = ws.peers();
        let peer = *peers.first()?;
        // The tunnel is recorded once the proxy connected to the target.
        if first.carried(peer) {
            Some(true)
        } else if second.carried(peer) {
            Some(false)
        } else {
            None
        }
    })
    .await;
    report_ban(&url_of_broker, if on_first { &a } else { &b }).await;
    let transcript = tokio::time::timeout(DEADLINE, example)
        .await
        .expect("the example moves before the deadline")
        .unwrap()
        .unwrap();
    let peers = ws.peers();
    assert_eq!(peers.len(), 2, "{transcript}");
    let moved_to_second = second.carried(peers[1]);
    assert_eq!(
        moved_to_second, on_first,
        "moved to the other proxy: {transcript}"
    );
    assert_eq!(transcript.matches("connected via").count(), 2, "{transcript}");
    broker.stop().await;
}
