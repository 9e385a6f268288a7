//! Wiring: health, reflection and the two services on one listener, behind one middleware stack,
//! with graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;

use crate::admin::AdminService;
use crate::auth::{Authenticated, BearerAuth};
use crate::broker::Broker;
use crate::config::{BrokerConfig, Reflection};
use crate::hit::HitPath;
use crate::pb;
use crate::pb::proxy_broker_admin_server::ProxyBrokerAdminServer;
use crate::pb::wire::proxy_broker_server::ProxyBrokerServer;
use crate::service::BrokerService;

/// Every service the broker serves, by its fully-qualified name (health reports each).
pub const SERVICE_NAMES: &[&str] = &[
    <ProxyBrokerServer<BrokerService> as NamedService>::NAME,
    <ProxyBrokerAdminServer<AdminService> as NamedService>::NAME,
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// HTTP/2 flow-control window per stream: a request message is at most `max_message_bytes`
/// (64 KiB by default), so this is what one stream may have in flight.
const STREAM_WINDOW: u32 = 64 * 1024;
/// HTTP/2 flow-control window per connection: what one connection can make the broker buffer.
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Configuration that only shows up when building the broker (e.g. an unreadable credential file).
    #[error(transparent)]
    Config(#[from] proxy_broker_core::ConfigError),
    /// The reflection service could not load the descriptors.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS files cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Builds the broker for `config` and serves it on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve(listener, Arc::new(Broker::new(config)?), shutdown).await
}

/// Serves `broker` on `listener` until `shutdown` completes.
///
/// On shutdown, health turns NOT_SERVING for every service at once, new connections are refused,
/// and in-flight calls get `server.shutdown_grace_seconds` to finish; `WatchProxy` streams end at
/// once with UNAVAILABLE, other long-lived streams (health `Watch`) are cut when the grace period
/// ends. Queued feedback is then flushed best-effort.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let config = broker.config();
    let server_cfg = &config.server;
    let grace = Duration::from_secs(server_cfg.shutdown_grace_seconds.unsigned_abs());
    let max_message = usize::try_from(server_cfg.max_message_bytes).unwrap_or(65_536);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in SERVICE_NAMES {
        health.set_service_status(*name, ServingStatus::Serving).await;
    }

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let auth = BearerAuth::new(broker.clone());

    let draining = Arc::new(Notify::new());
    let signal = {
        let draining = draining.clone();
        let broker = broker.clone();
        async move {
            shutdown.await;
            tracing::info!(
                grace_seconds = grace.as_secs(),
                "shutting down: health NOT_SERVING, draining in-flight calls"
            );
            health.set_service_status("", ServingStatus::NotServing).await;
            for name in SERVICE_NAMES {
                health.set_service_status(*name, ServingStatus::NotServing).await;
            }
            // WatchProxy streams would otherwise hold the drain for the whole grace period.
            broker.close_watchers();
            draining.notify_one();
        }
    };

    // The middleware stacks, outermost first (see `limits` for why feed calls are never shed).
    // Errors they raise become gRPC statuses in tonic (`Overloaded` → RESOURCE_EXHAUSTED; our
    // timeout maps to DEADLINE_EXCEEDED).
    let call_timeout = Duration::from_secs(server_cfg.request_timeout_seconds.unsigned_abs());
    let body_timeout = Duration::from_secs(server_cfg.request_body_timeout_seconds.unsigned_abs());
    let feed_stack = ServiceBuilder::new()
        // A stream that sends headers and never its message ends after `request_body_timeout_seconds`.
        // (No call timeout layer: feed calls bound their own waits, see `limits`.)
        .layer(crate::limits::BodyTimeoutLayer::new(body_timeout))
        .into_inner();
    let other_stack = ServiceBuilder::new()
        // A shed call gets RESOURCE_EXHAUSTED with a retry hint (`google.rpc.RetryInfo`).
        .map_err(map_overloaded)
        // Refuse at once rather than queue when the broker is saturated: an operator can retry,
        // and queued work would only add latency for everyone.
        .load_shed()
        // At most `max_concurrent_requests` admin and reflection calls in flight.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            usize::try_from(server_cfg.max_concurrent_requests).unwrap_or(1024),
        ))
        .map_err(map_timeout)
        .timeout(call_timeout)
        .layer(crate::limits::BodyTimeoutLayer::new(body_timeout))
        .into_inner();

    // Per connection: a bounded number of streams, and flow-control windows that bound the bytes
    // one connection can make the broker buffer (64 KiB per stream, 1 MiB per connection).
    let builder = Server::builder()
        .max_concurrent_streams(u32::try_from(server_cfg.max_concurrent_streams).unwrap_or(256))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(
            (server_cfg.http2_keepalive_interval_seconds > 0)
                .then(|| Duration::from_secs(server_cfg.http2_keepalive_interval_seconds.unsigned_abs())),
        )
        .http2_keepalive_timeout(Some(Duration::from_secs(
            server_cfg.http2_keepalive_timeout_seconds.unsigned_abs(),
        )));
    // TLS (certificates reloaded when their files change) is done by `tls::incoming`, below.
    let mut router = builder
        // Health checks skip the limits, feed calls are never shed (see `limits`).
        .layer(crate::limits::AdmissionLayer::new(feed_stack, other_stack))
        // Health stays open so that probes work whatever the auth settings.
        .add_service(health_service)
        // Cache hits are answered in front of tonic's generic path (see `hit`).
        .add_service(HitPath::new(
            Authenticated::new(
                ProxyBrokerServer::new(BrokerService::new(broker.clone()))
                    .max_decoding_message_size(max_message),
                auth.clone(),
            ),
            BrokerService::new(broker.clone()),
            max_message,
            body_timeout,
            server_cfg.fast_cache_hits,
        ))
        .add_service(Authenticated::new(
            ProxyBrokerAdminServer::new(AdminService::new(broker.clone()))
                .max_decoding_message_size(max_message),
            auth.clone(),
        ));
    router = match server_cfg.reflection {
        Reflection::Public => router
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?),
        Reflection::Authenticated => router
            .add_service(Authenticated::new(reflection().build_v1()?, auth.clone()))
            .add_service(Authenticated::new(reflection().build_v1alpha()?, auth.clone())),
        Reflection::Disabled => router,
    };

    let local = listener.local_addr().ok();
    let incoming = crate::tls::incoming(listener, server_cfg.tls.as_ref())?;
    tracing::info!(address = ?local, tls = server_cfg.tls.is_some(), "serving gRPC");
    let server = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over: closing the remaining connections");
        }
    }
    if let Some(d) = broker.delegation() {
        let flushed = d.feedback.flush(Duration::from_secs(2)).await;
        tracing::info!(remaining = flushed, "queued feedback flushed (best effort)");
    }
    tracing::info!("stopped");
    Ok(())
}

fn map_overloaded(error: tower::BoxError) -> tower::BoxError {
    if error.is::<tower::load_shed::error::Overloaded>() {
        Box::new(crate::error::Error::ResourceExhausted {
            message: "the broker is at server.max_concurrent_requests admin and reflection calls: retry shortly".into(),
            retry_after: Duration::from_secs(1),
        }
        .into_status())
    } else {
        error
    }
}

fn map_timeout(error: tower::BoxError) -> tower::BoxError {
    if error.is::<tower::timeout::error::Elapsed>() {
        Box::new(tonic::Status::deadline_exceeded(
            "the call took longer than server.request_timeout_seconds",
        ))
    } else {
        error
    }
}
