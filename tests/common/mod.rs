//! Shared test support: start the real broker on 127.0.0.1:0 and talk to it over gRPC.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;

use proxy_broker::BrokerConfig;
use proxy_broker::pb::proxy_broker_admin_client::ProxyBrokerAdminClient;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{ConnectionType, ProxyRequest, ProxyResponse};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A broker running in this test process.
pub struct TestBroker {
    pub addr: SocketAddr,
    broker: std::sync::Arc<proxy_broker::broker::Broker>,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), proxy_broker::server::ServeError>>>,
}

impl TestBroker {
    /// Starts the broker with `config` on an ephemeral loopback port.
    pub async fn start(config: BrokerConfig) -> Self {
        Self::start_broker(std::sync::Arc::new(
            proxy_broker::broker::Broker::new(config).unwrap(),
        ))
        .await
    }

    /// Starts the broker with its cache and circuit breakers on `clock` (tests move it forward).
    pub async fn start_with_clock(
        config: BrokerConfig,
        clock: std::sync::Arc<proxy_broker::clock::ManualClock>,
    ) -> Self {
        Self::start_broker(std::sync::Arc::new(
            proxy_broker::broker::Broker::with_clock(config, clock).unwrap(),
        ))
        .await
    }

    /// Serves an already-built broker on an ephemeral loopback port.
    pub async fn start_broker(broker: std::sync::Arc<proxy_broker::broker::Broker>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy_broker::serve(listener, broker.clone(), async move {
            let _ = rx.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            addr,
            broker,
            channel,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Loads a configuration from YAML text and `env` (instead of the process environment) and
    /// starts the broker with it.
    pub async fn start_yaml(yaml: &str, env: &[(&str, &str)]) -> Self {
        Self::start(load(Some(yaml), env).unwrap()).await
    }

    /// The broker being served.
    pub fn broker(&self) -> &proxy_broker::broker::Broker {
        &self.broker
    }

    pub fn client(&self) -> ProxyBrokerClient<Channel> {
        ProxyBrokerClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> ProxyBrokerAdminClient<Channel> {
        ProxyBrokerAdminClient::new(self.channel.clone())
    }

    /// RequestProxy for `exchange` / `connection_type`, expecting success.
    pub async fn ask(&self, exchange: &str, connection_type: ConnectionType) -> ProxyResponse {
        self.client()
            .request_proxy(ProxyRequest {
                exchange_id: exchange.into(),
                connection_type: connection_type.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Triggers shutdown and waits for the server to stop.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// Loads a configuration from optional YAML text and the given environment variables.
pub fn load(
    yaml: Option<&str>,
    env: &[(&str, &str)],
) -> Result<BrokerConfig, proxy_broker_core::ConfigError> {
    let file = yaml.map(|text| {
        let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f.into_temp_path()
    });
    BrokerConfig::loader(file.as_deref())
        .env_vars(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .load()
}

pub mod ops;
pub mod redis;
