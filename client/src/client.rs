//! [`BrokerClient`]: resolve through the broker (with a TTL cache and the local fallback), report
//! feedback in the background. Connecting lives in [`crate::connect`].

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy_broker_core::ConnectionType;
use proxy_broker_core::redact::redact_text;
use proxy_broker_core::validate::check_exchange_id;
use rustls::pki_types::CertificateDer;
use tokio::time::Instant;

use crate::error::Error;
use crate::feedback::{Feedback, FeedbackQueue, FeedbackStats, pb_connection_type};
use crate::grpc::{AdminStub, BrokerStub, Grpc, GrpcSettings};
use crate::local::{Local, LocalConfig};
use crate::pb;
use crate::proxy::ProxyUrl;
use crate::resolve::{Key, ResolveCache, Resolved};
use proxy_broker_core::validate::MAX_REGION_LEN;

/// Most answers kept in the resolve cache.
const CACHE_ENTRIES: usize = 1024;
/// Longest accepted `broker_timeout`, `connect_timeout` and `broker_retry_after`: anything longer
/// is a mistake (and some of it would overflow a deadline or the `grpc-timeout` header).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most feedback reports that may wait for delivery (`feedback_queue`).
pub const MAX_FEEDBACK_QUEUE: usize = 1 << 20;

/// Settings for a [`BrokerClient`]; start with [`BrokerClient::builder`]. Its `Debug` shows no
/// token and no proxy credentials.
#[derive(Clone)]
#[must_use]
pub struct ClientBuilder {
    grpc: GrpcSettings,
    broker_timeout: Duration,
    connect_timeout: Duration,
    client_id: Option<String>,
    region: Option<String>,
    local: LocalConfig,
    allow_direct_fallback: bool,
    max_cache_ttl: Duration,
    broker_retry_after: Duration,
    feedback_queue: usize,
    root_pem: Vec<Vec<u8>>,
}

impl ClientBuilder {
    fn new(broker_url: &str) -> Self {
        Self {
            grpc: GrpcSettings {
                url: broker_url.to_owned(),
                token: None,
                ca_pem: Vec::new(),
                tls_domain: None,
                connect_timeout: Duration::from_secs(3),
            },
            broker_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(30),
            client_id: None,
            region: None,
            local: LocalConfig::FromEnv,
            allow_direct_fallback: false,
            max_cache_ttl: Duration::from_secs(3600),
            broker_retry_after: Duration::from_secs(10),
            feedback_queue: 1024,
            root_pem: Vec::new(),
        }
    }

    /// Sends `authorization: Bearer <token>` with every call to the broker.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.grpc.token = Some(token.into());
        self
    }

    /// Trusts this CA (PEM) for an `https://` broker, in addition to the platform's roots.
    pub fn broker_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.grpc.ca_pem.push(pem.into());
        self
    }

    /// The name to verify the broker's certificate against, when it differs from the URL's host.
    pub fn broker_tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.grpc.tls_domain = Some(domain.into());
        self
    }

    /// How long one broker call may take, connecting included (default 3 s). Past it the broker
    /// counts as unavailable and the local configuration answers.
    pub fn broker_timeout(mut self, timeout: Duration) -> Self {
        self.broker_timeout = timeout;
        self.grpc.connect_timeout = timeout;
        self
    }

    /// After the broker was found unavailable, answer from the local configuration without asking
    /// it for this long (default 10 s; zero asks every time).
    pub fn broker_retry_after(mut self, wait: Duration) -> Self {
        self.broker_retry_after = wait;
        self
    }

    /// Connect timeout (proxy, handshakes, TLS, WebSocket upgrade) when the answer does not carry
    /// the proxy's own `timeout_seconds` (default 30 s, as cryptofeed).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// This feed instance's id (default `proxy-broker-client-{hostname}-{pid}`).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// Preferred region for `connect_websocket` and `http_client` (default none).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Where the local embedded configuration comes from (default [`LocalConfig::FromEnv`]).
    pub fn local_config(mut self, local: LocalConfig) -> Self {
        self.local = local;
        self
    }

    /// Shorthand for [`LocalConfig::File`].
    pub fn local_config_file(self, path: impl Into<PathBuf>) -> Self {
        self.local_config(LocalConfig::File(path.into()))
    }

    /// When the broker is unavailable and there is no local configuration, connect directly
    /// instead of failing (default false: fail closed).
    pub fn allow_direct_fallback(mut self, allow: bool) -> Self {
        self.allow_direct_fallback = allow;
        self
    }

    /// Keep broker answers at most this long, even if their TTL is longer (default 1 h; zero
    /// disables the cache).
    pub fn max_cache_ttl(mut self, ttl: Duration) -> Self {
        self.max_cache_ttl = ttl;
        self
    }

    /// Feedback reports that may wait for delivery; more are dropped (default 1024).
    pub fn feedback_queue(mut self, capacity: usize) -> Self {
        self.feedback_queue = capacity;
        self
    }

    /// Trusts this CA (PEM) for the connections the client opens (`wss://` and `https://` targets,
    /// `https` proxies), in addition to the platform's roots.
    pub fn root_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_pem.push(pem.into());
        self
    }

    /// Builds the client: loads and validates the local configuration, prepares TLS and starts the
    /// feedback worker. Does not contact the broker. Must be called inside a Tokio runtime.
    pub fn build(self) -> Result<BrokerClient, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Settings(
                "BrokerClient must be built inside a Tokio runtime".into(),
            ));
        }
        check_duration("broker_timeout", self.broker_timeout, false)?;
        check_duration("connect_timeout", self.connect_timeout, false)?;
        check_duration("broker_retry_after", self.broker_retry_after, true)?;
        if !(1..=MAX_FEEDBACK_QUEUE).contains(&self.feedback_queue) {
            return Err(Error::invalid(
                "feedback_queue",
                format!(
                    "{} is out of range (1..={MAX_FEEDBACK_QUEUE})",
                    self.feedback_queue
                ),
            ));
        }
        if let Some(region) = &self.region {
            check_region(region)?;
        }
        let grpc = Grpc::new(&self.grpc)?;
        let local = Local::load(&self.local)?;
        let mut roots: Vec<CertificateDer<'static>> = Vec::new();
        for pem in &self.root_pem {
            roots.extend(crate::tls::parse_pem(pem)?);
        }
        let client_id = match self.client_id {
            Some(id) if id.is_empty() || id.len() > 256 => {
                return Err(Error::invalid("client_id", "must be 1..=256 bytes"));
            }
            Some(id) => id,
            None => default_client_id(),
        };
        let feedback = FeedbackQueue::start(grpc.clone(), self.feedback_queue, self.broker_timeout);
        Ok(BrokerClient {
            inner: Arc::new(Inner {
                tls: crate::tls::client_config(&roots),
                roots,
                grpc,
                client_id,
                broker_timeout: self.broker_timeout,
                connect_timeout: self.connect_timeout,
                region: self.region,
                local,
                allow_direct_fallback: self.allow_direct_fallback,
                cache: ResolveCache::new(self.max_cache_ttl, CACHE_ENTRIES),
                broker_retry_after: self.broker_retry_after,
                broker_down_until: Mutex::new(None),
                feedback,
                http_clients: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// `proxy-broker-client-{hostname}-{pid}`, like the design's `cryptofeed-{hostname}-{pid}`.
pub fn default_client_id() -> String {
    format!(
        "{}-{}-{}",
        env!("CARGO_PKG_NAME"),
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    )
}

/// `value` must be at most [`MAX_TIMEOUT`], and non-zero unless `zero_ok`.
fn check_duration(field: &'static str, value: Duration, zero_ok: bool) -> Result<(), Error> {
    let (low, low_text) = if zero_ok {
        (Duration::ZERO, "0")
    } else {
        (Duration::from_nanos(1), "greater than 0")
    };
    if value < low || value > MAX_TIMEOUT {
        return Err(Error::invalid(
            field,
            format!(
                "{value:?} is out of range ({low_text} ..= {}s)",
                MAX_TIMEOUT.as_secs()
            ),
        ));
    }
    Ok(())
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("grpc", &self.grpc)
            .field("broker_timeout", &self.broker_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("client_id", &self.client_id)
            .field("region", &self.region)
            .field("local", &self.local)
            .field("allow_direct_fallback", &self.allow_direct_fallback)
            .field("max_cache_ttl", &self.max_cache_ttl)
            .field("broker_retry_after", &self.broker_retry_after)
            .field("feedback_queue", &self.feedback_queue)
            .field("root_ca_pems", &self.root_pem.len())
            .finish()
    }
}

pub(crate) fn check_region(region: &str) -> Result<(), Error> {
    if region.len() > MAX_REGION_LEN {
        return Err(Error::invalid(
            "region",
            format!("is {} bytes long (at most 64)", region.len()),
        ));
    }
    Ok(())
}

/// The feed's handle on the broker. Cheap to clone; clones share the cache and feedback queue.
/// Its `Debug` shows no token and no proxy credentials.
#[derive(Debug, Clone)]
pub struct BrokerClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    grpc: Grpc,
    pub(crate) client_id: String,
    broker_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) region: Option<String>,
    pub(crate) local: Option<Local>,
    allow_direct_fallback: bool,
    cache: ResolveCache,
    broker_retry_after: Duration,
    broker_down_until: Mutex<Option<Instant>>,
    feedback: FeedbackQueue,
    pub(crate) tls: Result<Arc<rustls::ClientConfig>, String>,
    pub(crate) roots: Vec<CertificateDer<'static>>,
    /// reqwest clients by proxy and connect timeout (keyed by [`ProxyUrl`], whose `Debug` hides
    /// its credentials).
    pub(crate) http_clients: Mutex<HashMap<(Option<ProxyUrl>, Duration), reqwest::Client>>,
}

/// By hand: only fields that cannot hold a secret, and no foreign `Debug` that might (reqwest
/// clients carry proxy URLs, the local resolver carries the local configuration).
impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerClient")
            .field("grpc", &self.grpc)
            .field("client_id", &self.client_id)
            .field("broker_timeout", &self.broker_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("region", &self.region)
            .field("local", &self.local)
            .field("allow_direct_fallback", &self.allow_direct_fallback)
            .field("cache", &self.cache)
            .field("broker_retry_after", &self.broker_retry_after)
            .field("feedback", &self.feedback.stats())
            .field(
                "tls",
                &self.tls.as_ref().map(|_| "rustls").map_err(String::as_str),
            )
            .field("root_certificates", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// Why the broker gave no answer.
enum BrokerFailure {
    /// Unreachable, timed out, or a status that says the broker could not decide (see
    /// [`falls_back`]): the local configuration may answer.
    Unavailable(String),
    /// Any other refusal: returned to the caller.
    Refused(Error),
}

/// Whether a status from the broker means "no answer right now" (fall back locally) rather than
/// "your request is wrong" (surface it).
///
/// UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED: the broker or its upstream is down or slow.
/// RESOURCE_EXHAUSTED: the broker shed the call under load. UNKNOWN and INTERNAL: a broker bug,
/// or something between the feed and the broker (a proxy, a load balancer) that does not speak
/// gRPC. None of these is the feed's fault and a local answer is better than none. Everything
/// else (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, UNIMPLEMENTED, ...) is a
/// misconfiguration a fallback would hide, so it is returned.
pub(crate) fn falls_back(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Internal
    )
}

impl BrokerClient {
    /// Settings for a client of the broker at `broker_url` (`http://host:port` or `https://…`).
    pub fn builder(broker_url: &str) -> ClientBuilder {
        ClientBuilder::new(broker_url)
    }

    /// A client with default settings (see [`ClientBuilder`]).
    pub fn new(broker_url: &str) -> Result<Self, Error> {
        Self::builder(broker_url).build()
    }

    /// This feed instance's id, sent with every request and report.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The generated feed-facing stub on the client's channel (auth token included).
    pub fn raw(&self) -> BrokerStub {
        self.inner.grpc.broker()
    }

    /// The generated operator-facing stub on the client's channel (auth token included).
    pub fn admin(&self) -> AdminStub {
        self.inner.grpc.admin()
    }

    /// The gRPC channel to the broker.
    pub fn channel(&self) -> tonic::transport::Channel {
        self.inner.grpc.channel()
    }

    /// Which proxy to use for `exchange` and `connection_type` (optionally in `region`).
    ///
    /// **WebSocket**: the broker is asked every time, since each answer counts one connection
    /// attempt against the proxy's per-exchange budget (resolve once per new connection); its last
    /// answer is cached and serves only while the broker is unreachable. **HTTP**: a cached broker
    /// answer is reused until its TTL passes (REST calls are many and share connections).
    ///
    /// When the broker is unreachable, times out, or answers UNAVAILABLE, RESOURCE_EXHAUSTED,
    /// UNKNOWN or INTERNAL, the cached answer (WebSocket, within its TTL) or else the local
    /// embedded configuration answers ([`crate::Source::Local`]); without one this fails with
    /// [`Error::NoRoute`] unless direct connections were allowed. Other broker errors
    /// (UNAUTHENTICATED, INVALID_ARGUMENT, ...) are returned as [`Error::Broker`].
    pub async fn resolve(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        region: Option<&str>,
    ) -> Result<Resolved, Error> {
        check_exchange_id(exchange).map_err(|rule| Error::invalid("exchange_id", rule))?;
        let region = region.filter(|r| !r.is_empty());
        if let Some(r) = region {
            check_region(r)?;
        }
        let key = cache_key(exchange, connection_type, region);
        if connection_type != ConnectionType::Websocket
            && let Some(hit) = self.inner.cache.get(&key)
        {
            return Ok(hit);
        }
        let reason = match self.ask_broker(exchange, connection_type, region, None).await {
            Ok(resolved) => {
                self.inner.cache.insert(key, &resolved);
                return Ok(resolved);
            }
            Err(BrokerFailure::Refused(e)) => return Err(e),
            Err(BrokerFailure::Unavailable(reason)) => reason,
        };
        self.without_broker(&key, exchange, connection_type, &reason)
    }

    /// The answer while the broker cannot give one: its last WebSocket answer (within its TTL),
    /// else the local configuration, else a direct connection if allowed, else
    /// [`Error::NoRoute`].
    pub(crate) fn without_broker(
        &self,
        key: &Key,
        exchange: &str,
        connection_type: ConnectionType,
        reason: &str,
    ) -> Result<Resolved, Error> {
        if connection_type == ConnectionType::Websocket
            && let Some(hit) = self.inner.cache.get(key)
        {
            tracing::warn!(%exchange, %connection_type, %reason, "broker unavailable: using its last answer (cached)");
            return Ok(hit);
        }
        if let Some(local) = &self.inner.local {
            tracing::warn!(%exchange, %connection_type, %reason, "broker unavailable: using the local proxy configuration");
            return local.resolve(exchange, connection_type);
        }
        if self.inner.allow_direct_fallback {
            tracing::warn!(%exchange, %connection_type, %reason, "broker unavailable and no local configuration: connecting directly (allowed)");
            return Ok(Resolved::allowed_direct());
        }
        Err(Error::NoRoute {
            reason: reason.to_owned(),
        })
    }

    /// Keeps a broker answer as the last one for its key (see [`BrokerClient::without_broker`]).
    pub(crate) fn remember(&self, key: Key, resolved: &Resolved) {
        self.inner.cache.insert(key, resolved);
    }

    /// The broker answered: ask it again at once from now on.
    pub(crate) fn broker_is_up(&self) {
        *lock(&self.inner.broker_down_until) = None;
    }

    /// The broker could not answer: leave it alone for `broker_retry_after`.
    pub(crate) fn broker_is_down(&self) {
        if !self.inner.broker_retry_after.is_zero() {
            // `broker_retry_after` is at most `MAX_TIMEOUT` (checked in `build`); `checked_add`
            // all the same, so that no setting can make this panic.
            *lock(&self.inner.broker_down_until) = Instant::now().checked_add(self.inner.broker_retry_after);
        }
    }

    /// How long one broker call may take.
    pub(crate) fn broker_timeout(&self) -> Duration {
        self.inner.broker_timeout
    }

    async fn ask_broker(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        region: Option<&str>,
        sticky_key: Option<&str>,
    ) -> Result<Resolved, BrokerFailure> {
        let inner = &self.inner;
        if let Some(until) = *lock(&inner.broker_down_until)
            && Instant::now() < until
        {
            return Err(BrokerFailure::Unavailable(
                "it was unavailable moments ago (not asked again yet)".into(),
            ));
        }
        let mut request = tonic::Request::new(pb::ProxyRequest {
            exchange_id: exchange.to_owned(),
            connection_type: pb_connection_type(connection_type).into(),
            region: region.map(str::to_owned),
            client_id: inner.client_id.clone(),
            metadata: None,
            sticky_key: sticky_key.map(str::to_owned),
        });
        request.set_timeout(inner.broker_timeout);
        let mut stub = inner.grpc.broker();
        let outcome = tokio::time::timeout(inner.broker_timeout, stub.request_proxy(request)).await;
        let failure = match outcome {
            Ok(Ok(response)) => {
                self.broker_is_up();
                return Resolved::from_pb(response.into_inner()).map_err(BrokerFailure::Refused);
            }
            Err(_) => format!("no answer within {:?}", inner.broker_timeout),
            Ok(Err(status)) if falls_back(status.code()) => {
                format!("{:?}: {}", status.code(), redact_text(status.message()))
            }
            Ok(Err(status)) => {
                return Err(BrokerFailure::Refused(Error::Broker {
                    code: status.code(),
                    message: redact_text(status.message()),
                }));
            }
        };
        self.broker_is_down();
        Err(BrokerFailure::Unavailable(failure))
    }

    /// Reports how a proxy worked; returns at once and never fails (see [`FeedbackStats`]).
    /// `connect_websocket` and the HTTP helpers report on their own.
    pub fn report(&self, feedback: Feedback) {
        if !feedback.success
            && let (Some(local), Some(url)) = (&self.inner.local, &feedback.proxy_url)
        {
            local.release(url);
        }
        self.inner.feedback.send(feedback.to_pb(&self.inner.client_id));
    }

    /// What happened to the reports so far.
    pub fn feedback_stats(&self) -> FeedbackStats {
        self.inner.feedback.stats()
    }

    /// Drops the cached answer for this key if it still names `proxy` (it just failed).
    pub(crate) fn forget(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        region: Option<&str>,
        resolved: &Resolved,
    ) {
        self.inner.cache.forget(
            &cache_key(exchange, connection_type, region),
            resolved.proxy.as_ref(),
        );
    }
}

/// The cache key of (exchange, type, region).
pub(crate) fn cache_key(exchange: &str, connection_type: ConnectionType, region: Option<&str>) -> Key {
    (
        exchange.to_lowercase(),
        connection_type,
        region.map(str::to_owned),
    )
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_client_id_is_crate_host_pid() {
        let id = default_client_id();
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        assert_eq!(id, format!("proxy-broker-client-{host}-{}", std::process::id()));
    }

    #[test]
    fn building_outside_a_runtime_is_an_error_not_a_panic() {
        let err = BrokerClient::new("http://127.0.0.1:1").unwrap_err().to_string();
        assert!(err.contains("Tokio runtime"), "{err}");
    }

    #[tokio::test]
    async fn out_of_range_settings_are_errors_naming_the_setting_not_panics() {
        type Set = fn(ClientBuilder) -> ClientBuilder;
        // (setting, builder change, the value as shown in the error); each of these used to
        // panic later (grpc-timeout encoding, `Instant + Duration`, the queue's channel).
        let rows: [(&str, Set, &str); 7] = [
            (
                "broker_timeout",
                |b| b.broker_timeout(Duration::MAX),
                "18446744073709551615.",
            ),
            ("broker_timeout", |b| b.broker_timeout(Duration::ZERO), "0ns"),
            (
                "connect_timeout",
                |b| b.connect_timeout(Duration::from_secs(3601)),
                "3601s",
            ),
            ("connect_timeout", |b| b.connect_timeout(Duration::ZERO), "0ns"),
            (
                "broker_retry_after",
                |b| b.broker_retry_after(Duration::MAX),
                "18446744073709551615.",
            ),
            (
                "feedback_queue",
                |b| b.feedback_queue(usize::MAX),
                "18446744073709551615",
            ),
            ("feedback_queue", |b| b.feedback_queue(0), "0 is out of range"),
        ];
        for (field, set, value) in rows {
            let builder = set(BrokerClient::builder("http://127.0.0.1:1").local_config(LocalConfig::None));
            match builder.build() {
                Err(Error::InvalidArgument { field: got, rule }) => {
                    assert_eq!(got, field, "{rule}");
                    assert!(
                        rule.contains(value) && rule.contains("out of range"),
                        "{field}: {rule}"
                    );
                }
                other => panic!("{field}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_longest_allowed_settings_work() {
        let client = BrokerClient::builder("http://127.0.0.1:1")
            .local_config(LocalConfig::None)
            .allow_direct_fallback(true)
            .broker_timeout(MAX_TIMEOUT)
            .connect_timeout(MAX_TIMEOUT)
            .broker_retry_after(MAX_TIMEOUT)
            .max_cache_ttl(Duration::MAX)
            .feedback_queue(MAX_FEEDBACK_QUEUE)
            .build()
            .unwrap();
        // Nothing listens on port 1: the broker is down, and `broker_retry_after` starts.
        for _ in 0..2 {
            let r = client
                .resolve("binance", ConnectionType::Http, None)
                .await
                .unwrap();
            assert_eq!(r.source, crate::Source::AllowedDirect);
        }
    }

    #[tokio::test]
    async fn bad_arguments_are_rejected_before_asking_the_broker() {
        let client = BrokerClient::builder("http://127.0.0.1:1")
            .local_config(LocalConfig::None)
            .build()
            .unwrap();
        let err = client
            .resolve("bad id!", ConnectionType::Http, None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    field: "exchange_id",
                    ..
                }
            ),
            "{err}"
        );
        let long = "r".repeat(65);
        let err = client
            .resolve("binance", ConnectionType::Http, Some(&long))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { field: "region", .. }),
            "{err}"
        );
    }
}
