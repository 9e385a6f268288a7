//! Opening a byte stream to `host:port`, directly or through a proxy, optionally with TLS inside.
//!
//! - `socks5` / `socks4`: the client resolves the name and hands the proxy an address (IPv4 only
//!   for SOCKS4), trying each resolved address in turn; `socks5h` / `socks4a`: the proxy gets the
//!   name. Credentials come from the proxy URL (SOCKS5 username/password, SOCKS4 user id).
//! - `http` / `https`: `CONNECT host:port` with `Proxy-Authorization: Basic` when the URL has
//!   credentials; `https` speaks TLS to the proxy first.
//! - TLS to the target (`wss://`) runs inside the tunnel.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_socks::tcp::{Socks4Stream, Socks5Stream};

use crate::proxy::{ProxyScheme, ProxyUrl};
use crate::resolve::{FallbackPolicy, Source};

/// Anything the tunnel can be made of.
trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// How a connection was made.
#[derive(Debug, Clone)]
pub struct Route {
    /// The proxy it goes through; `None` for a direct connection.
    pub proxy: Option<ProxyUrl>,
    /// Where that choice came from.
    pub source: Source,
    /// `Some(policy)` when this is the retry a fallback policy called for.
    pub fallback: Option<FallbackPolicy>,
}

/// A connection to the target: through the proxy when there is one, with TLS inside when the
/// target asked for it. This is the stream under a [`crate::WebSocket`].
pub struct Connection {
    io: Box<dyn Io>,
    route: Route,
    local_addr: Option<SocketAddr>,
    peer_addr: Option<SocketAddr>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("route", &self.route)
            .field("local_addr", &self.local_addr)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// How this connection was made (proxy, source, fallback).
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// This end of the TCP connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The other end of the TCP connection: the proxy, or the target when direct.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Longest HTTP CONNECT response head accepted.
const MAX_CONNECT_RESPONSE: usize = 8 * 1024;

/// The client's TLS configuration, or why there is none.
pub(crate) type TlsConfig<'a> = Result<&'a Arc<ClientConfig>, &'a str>;

/// Opens a stream to `host:port` along `route`, with TLS to the target when `target_tls`.
pub(crate) async fn open(
    route: Route,
    host: &str,
    port: u16,
    tls: TlsConfig<'_>,
    target_tls: bool,
) -> Result<Connection, String> {
    let (io, local_addr, peer_addr): (Box<dyn Io>, _, _) = match &route.proxy {
        None => {
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(|e| format!("TCP connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let addrs = (tcp.local_addr().ok(), tcp.peer_addr().ok());
            (Box::new(tcp), addrs.0, addrs.1)
        }
        Some(proxy) => tunnel(proxy, host, port, tls).await?,
    };
    let io = if target_tls {
        Box::new(tls_connect(tls?, host, io).await?)
    } else {
        io
    };
    Ok(Connection {
        io,
        route,
        local_addr,
        peer_addr,
    })
}

type Opened = (Box<dyn Io>, Option<SocketAddr>, Option<SocketAddr>);

async fn connect_proxy(
    proxy: &ProxyUrl,
) -> Result<(TcpStream, Option<SocketAddr>, Option<SocketAddr>), String> {
    let tcp = TcpStream::connect((proxy.host(), proxy.port()))
        .await
        .map_err(|e| format!("cannot reach the proxy: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (local, peer) = (tcp.local_addr().ok(), tcp.peer_addr().ok());
    Ok((tcp, local, peer))
}

async fn tunnel(proxy: &ProxyUrl, host: &str, port: u16, tls: TlsConfig<'_>) -> Result<Opened, String> {
    match proxy.scheme() {
        ProxyScheme::Socks5h | ProxyScheme::Socks4a => {
            let (tcp, local, peer) = connect_proxy(proxy).await?;
            let stream = socks(proxy, tcp, tokio_socks::TargetAddr::Domain(host.into(), port)).await?;
            Ok((stream, local, peer))
        }
        ProxyScheme::Socks5 | ProxyScheme::Socks4 => {
            let v4_only = proxy.scheme() == ProxyScheme::Socks4;
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .filter(|a| !v4_only || a.is_ipv4())
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "resolving {host}: no {}address",
                    if v4_only { "IPv4 " } else { "" }
                ));
            }
            let mut last = String::new();
            for addr in addrs {
                let (tcp, local, peer) = connect_proxy(proxy).await?;
                match socks(proxy, tcp, tokio_socks::TargetAddr::Ip(addr)).await {
                    Ok(stream) => return Ok((stream, local, peer)),
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            Err(last)
        }
        ProxyScheme::Http => {
            let (tcp, local, peer) = connect_proxy(proxy).await?;
            Ok((Box::new(http_connect(tcp, proxy, host, port).await?), local, peer))
        }
        ProxyScheme::Https => {
            let (tcp, local, peer) = connect_proxy(proxy).await?;
            let tls_to_proxy = tls_connect(tls?, proxy.host(), tcp).await?;
            Ok((
                Box::new(http_connect(tls_to_proxy, proxy, host, port).await?),
                local,
                peer,
            ))
        }
    }
}

async fn socks(
    proxy: &ProxyUrl,
    tcp: TcpStream,
    target: tokio_socks::TargetAddr<'_>,
) -> Result<Box<dyn Io>, String> {
    let what = proxy.scheme().as_str();
    let fail = |e: tokio_socks::Error| format!("{what} handshake: {e}");
    let stream: TcpStream = match proxy.scheme() {
        ProxyScheme::Socks5 | ProxyScheme::Socks5h => match (proxy.username(), proxy.password()) {
            (Some(user), pass) => {
                Socks5Stream::connect_with_password_and_socket(tcp, target, user, pass.unwrap_or(""))
                    .await
                    .map_err(fail)?
                    .into_inner()
            }
            (None, _) => Socks5Stream::connect_with_socket(tcp, target)
                .await
                .map_err(fail)?
                .into_inner(),
        },
        _ => match proxy.username() {
            Some(user) => Socks4Stream::connect_with_userid_and_socket(tcp, target, user)
                .await
                .map_err(fail)?
                .into_inner(),
            None => Socks4Stream::connect_with_socket(tcp, target)
                .await
                .map_err(fail)?
                .into_inner(),
        },
    };
    Ok(Box::new(stream))
}

/// `CONNECT host:port` on `io`; returns it once the proxy answered 2xx.
async fn http_connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    proxy: &ProxyUrl,
    host: &str,
    port: u16,
) -> Result<S, String> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(user) = proxy.username() {
        let credentials = format!("{user}:{}", proxy.password().unwrap_or(""));
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        head.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("HTTP CONNECT: {e}"))?;
    io.flush().await.map_err(|e| format!("HTTP CONNECT: {e}"))?;

    // Read the response head one byte at a time so that nothing after it is consumed.
    let mut response = Vec::with_capacity(128);
    while !response.ends_with(b"\r\n\r\n") {
        if response.len() >= MAX_CONNECT_RESPONSE {
            return Err("HTTP CONNECT: response head too long".into());
        }
        let byte = io.read_u8().await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                "HTTP CONNECT: the proxy closed the connection".to_owned()
            } else {
                format!("HTTP CONNECT: {e}")
            }
        })?;
        response.push(byte);
    }
    let text = String::from_utf8_lossy(&response);
    let status_line = text.lines().next().unwrap_or("").trim();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) if status_line.starts_with("HTTP/1.") => Ok(io),
        _ => Err(format!("HTTP CONNECT refused by the proxy: {status_line}")),
    }
}

async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
    config: &Arc<ClientConfig>,
    host: &str,
    io: S,
) -> Result<tokio_rustls::client::TlsStream<S>, String> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("TLS server name '{host}': {e}"))?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, io)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))
}
