mod common;

use common::TestBroker;
use proxy_broker::pb::{ConnectionType, FallbackPolicy, ProxySource};

#[tokio::test]
async fn design_example_resolves_override_pool_and_default() {
    let broker = TestBroker::start_yaml(include_str!("../examples/broker.yaml"), &[]).await;
    let r = broker.ask("binance", ConnectionType::Http).await;
    assert_eq!(r.proxy_url, "http://binance-proxy:8080");
    assert_eq!(r.source(), ProxySource::Embedded);
    assert_eq!(r.fallback_policy(), FallbackPolicy::EmbeddedFallback);
    assert_eq!(r.ttl_seconds, 300);
    assert_eq!(r.strategy, "static");
    let a = broker.ask("BINANCE", ConnectionType::Websocket).await;
    let b = broker.ask("Binance", ConnectionType::Websocket).await;
    assert_eq!(
        (a.proxy_url.as_str(), b.proxy_url.as_str()),
        ("socks5://de-1:1080", "socks5://nl-1:1080")
    );
    assert_eq!(a.strategy, "round_robin");
    let k = broker.ask("kraken", ConnectionType::Websocket).await;
    assert_eq!(k.proxy_url, "socks5://proxy.example.com:1081");
    broker.stop().await;
}
