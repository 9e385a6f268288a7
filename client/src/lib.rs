//! The feed side of proxy-broker: ask the broker which proxy to use for an exchange, open
//! WebSocket streams and HTTP requests through it, tell the broker how it went, and keep working
//! when the broker is down.
//!
//! ```no_run
//! use futures_util::{SinkExt, StreamExt};
//! use proxy_broker_client::{BrokerClient, Message};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Falls back to CRYPTOFEED_PROXY_* / PROXY_BROKER_CLIENT_CONFIG when the broker is down.
//!     let broker = BrokerClient::new("http://proxy-broker:50051")?;
//!     let mut ws = broker.connect_websocket("wss://ws.kraken.com/v2", "kraken").await?;
//!     ws.send(Message::text(r#"{"method":"subscribe","params":{"channel":"ticker","symbol":["BTC/USD"]}}"#)).await?;
//!     let rest = broker.http_get("kraken", "https://api.kraken.com/0/public/Time").await?;
//!     println!("{}", rest.text().await?);
//!     while let Some(message) = ws.next().await {
//!         println!("{}", message?);
//!     }
//!     Ok(())
//! }
//! ```
//!
//! - [`BrokerClient::resolve`]: the proxy (or direct), its TTL, lease, fallback policy and source.
//!   WebSocket resolutions always ask the broker (each is one connection attempt against the
//!   proxy's budget; the last answer serves only while the broker is unreachable); HTTP answers
//!   are cached for their TTL. When the broker is unreachable, times out or answers
//!   UNAVAILABLE, RESOURCE_EXHAUSTED, UNKNOWN or INTERNAL, the local embedded configuration answers — read like cryptofeed reads it, with
//!   the broker's own code from `proxy-broker-core` ([`LocalConfig`]). Without one the call fails
//!   closed ([`Error::NoRoute`]) unless [`ClientBuilder::allow_direct_fallback`] was set.
//! - [`BrokerClient::connect_websocket`]: a tokio-tungstenite stream through `socks5`, `socks5h`,
//!   `socks4`, `socks4a`, `http` or `https` (CONNECT) proxies, TLS inside the tunnel for `wss://`;
//!   reports the connect latency or the error, and applies the answer's [`FallbackPolicy`].
//! - [`BrokerClient::http_client`] / [`BrokerClient::http_request`]: reqwest through the proxy.
//! - [`BrokerClient::watch`]: a stream of assignments (`WatchProxy`): the current one, then a new
//!   one whenever the broker moves the feed (ban, ejection, lease end, reload); it reconnects
//!   with backoff and answers like `resolve` does without the broker while it is away. Connect
//!   along an assignment with [`ConnectOptions::resolved`].
//! - [`BrokerClient::report`]: fire-and-forget feedback through a bounded background queue.
//! - [`pb`]: the generated stubs for the whole `proxybroker.v1` contract.
//!
//! Modules: `client` (builder, resolve, report), `connect` (WebSocket, HTTP, fallback policies),
//! `tunnel` (SOCKS and CONNECT), `tls`, `resolve` (answers and cache), `local` (the local
//! configuration), `feedback` (the queue), `grpc` (channel and auth), `proxy` (proxy URLs),
//! `watch` (`WatchProxy` streams).

mod client;
mod connect;
mod error;
mod feedback;
mod grpc;
mod local;
pub mod pb;
mod proxy;
mod resolve;
mod tls;
mod tunnel;
mod watch;

pub use client::{BrokerClient, ClientBuilder, MAX_FEEDBACK_QUEUE, MAX_TIMEOUT, default_client_id};
pub use connect::{ConnectOptions, WebSocket};
pub use error::Error;
pub use feedback::{Feedback, FeedbackStats};
pub use grpc::{AdminStub, Auth, BrokerStub};
pub use local::{CONFIG_FILE_ENV, LocalConfig, MAX_ENV_LIST_INDEX, PROXY_ENV_PREFIX};
pub use proxy::{ProxyScheme, ProxyUrl};
pub use proxy_broker_core::{ConnectionType, ProxySettings};
pub use resolve::{FallbackPolicy, MAX_TTL, Resolved, Source};
pub use tunnel::{Connection, Route};
pub use watch::{Assignments, MAX_BACKOFF, MIN_BACKOFF, WatchOptions};

/// The WebSocket message type (re-exported from tungstenite).
pub use tokio_tungstenite::tungstenite::Message;
/// Re-exported so feeds use the same versions as the client.
pub use {reqwest, tokio_tungstenite};
