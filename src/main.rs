//! The `proxy-broker` binary: flags, configuration, logging, signals; the library does the rest.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::Parser;
use proxy_broker::BrokerConfig;
use proxy_broker::broker::Broker;
use tracing_subscriber::EnvFilter;

/// gRPC service that tells crypto market-data feeds which proxy to use.
#[derive(Debug, Parser)]
#[command(name = "proxy-broker", version)]
struct Args {
    /// YAML configuration file (`proxy:` and `server:` blocks). Without it: defaults + environment.
    #[arg(long, env = "PROXY_BROKER_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration (file + environment), print it with secrets redacted, and exit.
    #[arg(long)]
    check_config: bool,
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("PROXY_BROKER_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match BrokerConfig::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("proxy-broker: {error}");
            return ExitCode::from(2);
        }
    };
    if !args.check_config {
        init_logging();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("proxy-broker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Building the broker reads credential files and builds upstream clients: still
        // configuration, so still before any port is bound.
        let printed = args.check_config.then(|| config.redacted_json());
        let listen = config.server.listen;
        let broker = match Broker::new(config) {
            Ok(b) => Arc::new(b),
            Err(error) => {
                eprintln!("proxy-broker: {error}");
                return ExitCode::from(2);
            }
        };
        if let Some(json) = printed {
            println!("{json}");
            eprintln!("proxy-broker: configuration is valid");
            return ExitCode::SUCCESS;
        }
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(error) => {
                tracing::error!(address = %listen, %error, "cannot bind server.listen");
                return ExitCode::FAILURE;
            }
        };
        match proxy_broker::serve(listener, broker, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
