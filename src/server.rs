//! Wiring: health, reflection and the two services on one listener, with graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::admin::AdminService;
use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::pb;
use crate::pb::proxy_broker_admin_server::ProxyBrokerAdminServer;
use crate::pb::proxy_broker_server::ProxyBrokerServer;
use crate::service::BrokerService;

/// Every service the broker serves, by its fully-qualified name (health reports each).
pub const SERVICE_NAMES: &[&str] = &[
    <ProxyBrokerServer<BrokerService> as NamedService>::NAME,
    <ProxyBrokerAdminServer<AdminService> as NamedService>::NAME,
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

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
/// and in-flight calls get `server.shutdown_grace_seconds` to finish; long-lived streams (health
/// `Watch`) are cut when the grace period ends.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let grace = Duration::from_secs(broker.config().server.shutdown_grace_seconds.unsigned_abs());

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
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let draining = Arc::new(Notify::new());
    let signal = {
        let draining = draining.clone();
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
            draining.notify_one();
        }
    };

    let local = listener.local_addr().ok();
    tracing::info!(address = ?local, "serving gRPC");
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ProxyBrokerServer::new(BrokerService::new(broker.clone())))
        .add_service(ProxyBrokerAdminServer::new(AdminService::new(broker)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        () = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over: closing the remaining connections");
        }
    }
    tracing::info!("stopped");
    Ok(())
}
