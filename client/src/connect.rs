//! Connecting through the resolved proxy: WebSocket streams and HTTP requests, with the connect
//! latency or the error reported as feedback and the answer's fallback policy applied on failure.
//!
//! On a failed attempt the cached answer is dropped (the next resolve asks the broker again), and:
//! `direct_connection` → one retry without a proxy; `embedded_fallback` → one retry along the local
//! embedded configuration's answer (none when there is no local configuration, or when the failed
//! answer already came from it); `fail` → the error. Every attempt, retries included, is reported.

use std::future::Future;
use std::time::Duration;

use proxy_broker_core::ConnectionType;
use proxy_broker_core::redact::redact_text;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::client::{BrokerClient, lock};
use crate::error::Error;
use crate::feedback::Feedback;
use crate::proxy::ProxyUrl;
use crate::resolve::{FallbackPolicy, Resolved, Source};
use crate::tunnel::{self, Connection, Route};

/// A WebSocket stream through the resolved proxy; `ws.get_ref().route()` tells how it connected.
pub type WebSocket = WebSocketStream<Connection>;

/// Per-call settings for [`BrokerClient::connect_websocket_with`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Preferred region (overrides the client's).
    pub region: Option<String>,
    /// WebSocket protocol settings (message size limits, …).
    pub websocket_config: Option<WebSocketConfig>,
    /// Connect along this answer instead of asking the broker: an assignment from
    /// [`BrokerClient::watch`], which the broker has already counted as this connection's
    /// attempt. `None`: resolve (one `RequestProxy`).
    pub resolved: Option<Resolved>,
}

fn via(route: &Route) -> String {
    match &route.proxy {
        Some(p) => format!("via {p}"),
        None => "directly".to_owned(),
    }
}

/// `e` and its sources, joined, passwords redacted.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    redact_text(&text)
}

fn is_connect_failure(e: &Error) -> bool {
    matches!(e, Error::Connect { .. } | Error::Http { connect: true, .. })
}

impl BrokerClient {
    /// Opens a WebSocket to `url` (`ws://` or `wss://`) for `exchange` through the proxy the broker
    /// chooses, in the client's default region. See [`BrokerClient::connect_websocket_with`].
    pub async fn connect_websocket(&self, url: &str, exchange: &str) -> Result<WebSocket, Error> {
        self.connect_websocket_with(url, exchange, &ConnectOptions::default())
            .await
    }

    /// Opens a WebSocket for `exchange` through the resolved proxy (`socks5`, `socks5h`,
    /// `socks4`, `socks4a`, `http`/`https` CONNECT), or directly when the answer says so; `wss://`
    /// runs TLS inside the tunnel. The connect latency (or the error) is reported as feedback, and
    /// the answer's fallback policy decides what happens on failure (module docs).
    pub async fn connect_websocket_with<R: IntoClientRequest>(
        &self,
        request: R,
        exchange: &str,
        options: &ConnectOptions,
    ) -> Result<WebSocket, Error> {
        let request = request.into_client_request().map_err(|e| Error::TargetUrl {
            url: String::new(),
            rule: e.to_string(),
        })?;
        let uri = request.uri().clone();
        let bad = |rule: &str| Error::TargetUrl {
            url: redact_text(&uri.to_string()),
            rule: rule.to_owned(),
        };
        let target_tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(bad("the scheme must be ws or wss")),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if target_tls { 443 } else { 80 });
        let region = options.region.as_deref().or(self.inner.region.as_deref());
        let resolved = match &options.resolved {
            Some(resolved) => resolved.clone(),
            None => self.resolve(exchange, ConnectionType::Websocket, region).await?,
        };
        let config = options.websocket_config;
        self.with_fallback(
            exchange,
            ConnectionType::Websocket,
            region,
            resolved,
            |route, timeout| {
                let request = request.clone();
                let host = host.clone();
                async move {
                    let target = format!("{host}:{port}");
                    let via = via(&route);
                    let open = async {
                        let tls = self.inner.tls.as_ref().map_err(String::as_str);
                        let conn = tunnel::open(route, &host, port, tls, target_tls).await?;
                        let (ws, _response) =
                            tokio_tungstenite::client_async_with_config(request, conn, config)
                                .await
                                .map_err(|e| format!("WebSocket handshake: {}", chain(&e)))?;
                        Ok::<_, String>(ws)
                    };
                    match tokio::time::timeout(timeout, open).await {
                        Ok(Ok(ws)) => Ok(ws),
                        Ok(Err(message)) => Err(Error::Connect {
                            target,
                            via,
                            message: redact_text(&message),
                        }),
                        Err(_) => Err(Error::Connect {
                            target,
                            via,
                            message: format!("timed out after {timeout:?}"),
                        }),
                    }
                }
            },
        )
        .await
    }

    /// A `reqwest::Client` for REST calls to `exchange`, configured with the proxy the broker
    /// chooses (all schemes; the proxy URL's credentials are used) or none when the answer is
    /// direct. Build it when needed and keep it no longer than the answer's TTL; it does not
    /// report feedback or apply fallback policies by itself (use [`BrokerClient::http_request`]).
    pub async fn http_client(&self, exchange: &str) -> Result<reqwest::Client, Error> {
        let resolved = self
            .resolve(exchange, ConnectionType::Http, self.inner.region.as_deref())
            .await?;
        let timeout = resolved.connect_timeout.unwrap_or(self.inner.connect_timeout);
        self.reqwest_for(resolved.proxy.as_ref(), timeout)
    }

    /// Sends the request `build` makes with a client for `exchange` (see
    /// [`BrokerClient::http_client`]), reports the outcome as feedback (latency = time to the
    /// response head) and applies the answer's fallback policy when it cannot connect. `build` is
    /// called again for a retry. Any HTTP status counts as a working connection.
    pub async fn http_request<F>(&self, exchange: &str, build: F) -> Result<reqwest::Response, Error>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let region = self.inner.region.as_deref();
        let resolved = self.resolve(exchange, ConnectionType::Http, region).await?;
        self.with_fallback(
            exchange,
            ConnectionType::Http,
            region,
            resolved,
            |route, timeout| {
                let request = self
                    .reqwest_for(route.proxy.as_ref(), timeout)
                    .map(|client| build(&client));
                async move {
                    let via = via(&route);
                    let send = request?.send();
                    match tokio::time::timeout(timeout, send).await {
                        Ok(Ok(response)) => Ok(response),
                        Ok(Err(e)) => Err(Error::Http {
                            via,
                            message: chain(&e),
                            connect: e.is_connect() || e.is_timeout(),
                        }),
                        Err(_) => Err(Error::Http {
                            via,
                            message: format!("no response within {timeout:?}"),
                            connect: true,
                        }),
                    }
                }
            },
        )
        .await
    }

    /// `GET url` through [`BrokerClient::http_request`].
    pub async fn http_get(&self, exchange: &str, url: &str) -> Result<reqwest::Response, Error> {
        self.http_request(exchange, |client| client.get(url)).await
    }

    /// A reqwest client for `proxy` (kept per proxy URL and timeout, so connections are reused).
    fn reqwest_for(
        &self,
        proxy: Option<&ProxyUrl>,
        connect_timeout: Duration,
    ) -> Result<reqwest::Client, Error> {
        let key = (proxy.cloned(), connect_timeout);
        if let Some(client) = lock(&self.inner.http_clients).get(&key) {
            return Ok(client.clone());
        }
        let settings = |e: reqwest::Error| Error::Settings(format!("HTTP client: {}", chain(&e)));
        let certs = self
            .inner
            .roots
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(settings)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tls_certs_merge(certs);
        builder = match proxy {
            Some(p) => builder.proxy(
                reqwest::Proxy::all(p.as_str())
                    .map_err(|e| Error::ProxyUrl(format!("{p}: {}", chain(&e))))?,
            ),
            None => builder.no_proxy(),
        };
        let client = builder.build().map_err(settings)?;
        let mut clients = lock(&self.inner.http_clients);
        if clients.len() >= 64 {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Runs `attempt` along the resolved route, reports how it went, and on a connect failure
    /// applies the fallback policy (module docs).
    async fn with_fallback<T, F, Fut>(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        region: Option<&str>,
        resolved: Resolved,
        attempt: F,
    ) -> Result<T, Error>
    where
        F: Fn(Route, Duration) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let route = Route {
            proxy: resolved.proxy.clone(),
            source: resolved.source,
            fallback: None,
        };
        let timeout = resolved.connect_timeout.unwrap_or(self.inner.connect_timeout);
        let first = match self
            .reported(exchange, connection_type, route, timeout, &attempt)
            .await
        {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if !is_connect_failure(&first) {
            return Err(first);
        }
        self.forget(exchange, connection_type, region, &resolved);
        let policy = resolved.fallback_policy;
        let retry = match policy {
            FallbackPolicy::Fail => None,
            FallbackPolicy::DirectConnection => resolved.proxy.is_some().then(|| {
                let route = Route {
                    proxy: None,
                    source: resolved.source,
                    fallback: Some(policy),
                };
                (route, self.inner.connect_timeout)
            }),
            FallbackPolicy::EmbeddedFallback => match (&self.inner.local, resolved.source) {
                (_, Source::Local | Source::AllowedDirect) => None,
                (None, _) => {
                    tracing::warn!(%exchange, "embedded_fallback: there is no local proxy configuration to retry with");
                    None
                }
                (Some(local), _) => {
                    let local = local.resolve(exchange, connection_type)?;
                    let route = Route {
                        proxy: local.proxy,
                        source: Source::Local,
                        fallback: Some(policy),
                    };
                    Some((route, local.connect_timeout.unwrap_or(self.inner.connect_timeout)))
                }
            },
        };
        let Some((route, timeout)) = retry else {
            return Err(first);
        };
        tracing::warn!(%exchange, %connection_type, error = %first, policy = policy.as_str(), via = %via(&route), "connection failed: retrying as the fallback policy says");
        self.reported(exchange, connection_type, route, timeout, &attempt)
            .await
            .map_err(|second| Error::FallbackFailed {
                first: Box::new(first),
                policy: policy.as_str(),
                fallback: Box::new(second),
            })
    }

    /// One attempt, reported as feedback (latency on success, the error on failure).
    async fn reported<T, F, Fut>(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        route: Route,
        timeout: Duration,
        attempt: &F,
    ) -> Result<T, Error>
    where
        F: Fn(Route, Duration) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let proxy_url = route.proxy.as_ref().map(|p| p.as_str().to_owned());
        let started = Instant::now();
        let result = attempt(route, timeout).await;
        let latency = started.elapsed();
        self.report(Feedback {
            proxy_url,
            exchange_id: exchange.to_owned(),
            connection_type,
            success: result.is_ok(),
            latency: result.is_ok().then_some(latency),
            error: result.as_ref().err().map(ToString::to_string),
            http_status: None,
            retry_after: None,
        });
        result
    }
}
