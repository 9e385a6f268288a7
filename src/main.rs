//! The `proxy-broker` binary: flags, configuration, logging, signals; the library does the rest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use proxy_broker::BrokerConfig;
use proxy_broker::broker::Broker;

/// jemalloc instead of glibc's malloc: with glibc, 100,000 cached keys took about 93 MiB of RSS
/// for about 57 MB of live heap (fragmented per-thread arenas; `MALLOC_ARENA_MAX=2` changed
/// nothing). See BENCHMARKS.md, "memory-100k".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// gRPC service that tells crypto market-data feeds which proxy to use.
#[derive(Debug, Parser)]
#[command(name = "proxy-broker", version)]
struct Args {
    /// YAML configuration file (`proxy:`, `server:` and `brokering:` blocks). Without it: defaults +
    /// environment.
    #[arg(long, env = "PROXY_BROKER_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration (file + environment), print it with secrets redacted, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Validate the whole configuration before anything else, and before any port is bound.
    let config = match BrokerConfig::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("proxy-broker: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("proxy-broker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if args.check_config {
            // Building the broker reads credential and token files: still configuration.
            let json = config.redacted_json();
            return match Broker::new(config) {
                Ok(_) => {
                    println!("{json}");
                    eprintln!("proxy-broker: configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("proxy-broker: {error}");
                    ExitCode::from(2)
                }
            };
        }
        // Signal handlers go in before any port is bound, so a SIGTERM that arrives while the
        // broker starts is a clean shutdown rather than the default "terminate".
        let shutdown = match Shutdown::install() {
            Ok(s) => s,
            Err(error) => {
                eprintln!("proxy-broker: cannot install signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        let telemetry = proxy_broker::telemetry::init();
        let code = serve(args.config, config, shutdown).await;
        telemetry.shutdown();
        code
    })
}

async fn serve(config_path: Option<PathBuf>, config: BrokerConfig, shutdown: Shutdown) -> ExitCode {
    let (listen, metrics_listen, reload) = (
        config.server.listen,
        config.server.metrics_listen,
        config.server.reload,
    );
    let broker = match Broker::new(config) {
        Ok(b) => Arc::new(b),
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(address = %listen, %error, "cannot bind server.listen");
            return ExitCode::FAILURE;
        }
    };
    let metrics_listener = match tokio::net::TcpListener::bind(metrics_listen).await {
        Ok(l) => l,
        Err(error) => {
            tracing::error!(address = %metrics_listen, %error, "cannot bind server.metrics_listen");
            return ExitCode::FAILURE;
        }
    };
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = {
        let broker = broker.clone();
        tokio::spawn(proxy_broker::metrics::serve_metrics(
            metrics_listener,
            move || {
                let broker = broker.clone();
                async move { broker.render_metrics().await }
            },
            async move {
                let _ = metrics_stopped.await;
            },
        ))
    };
    tracing::info!(address = %metrics_listen, "serving Prometheus metrics at /metrics");
    let _watch = match (&config_path, reload) {
        (Some(path), true) => match proxy_broker::reload::watch(broker.clone(), path.clone()) {
            Ok(handle) => Some(handle),
            Err(error) => {
                tracing::warn!(%error, "cannot watch the configuration; hot reload is off");
                None
            }
        },
        _ => None,
    };
    let result = proxy_broker::serve(listener, broker, shutdown.wait()).await;
    let _ = stop_metrics.send(());
    let _ = metrics.await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT, listened for from start-up.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
