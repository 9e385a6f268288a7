//! `proxy-broker-bench`: starts the real broker binary (a release build) with a generated
//! configuration on loopback ports, loopback upstreams in process, drives the broker with a tonic
//! load generator and prints one Markdown table (or more) per scenario.
//!
//! ```sh
//! cargo build --release --locked -p proxy-broker     # or pass --build
//! cargo run --release -p proxy-broker-bench -- all
//! cargo run --release -p proxy-broker-bench -- storm --calls 2000 --keys 20
//! ```
//!
//! The generator runs on a single-threaded Tokio runtime, so it uses one core.

mod broker;
mod config;
mod load;
mod machine;
mod scenario;
mod stats;
mod table;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

use crate::broker::BrokerCommand;
use crate::scenario::{Ctx, Scenario};

/// Load and benchmark scenarios against the real proxy-broker binary (loopback only).
#[derive(Debug, Parser)]
#[command(name = "proxy-broker-bench")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// The broker binary (default: the workspace's target/release/proxy-broker).
    #[arg(long, global = true, value_name = "PATH")]
    broker: Option<PathBuf>,
    /// Run `cargo build --release --locked -p proxy-broker` first.
    #[arg(long, global = true)]
    build: bool,
    /// Extra environment for the broker, e.g.
    /// `CRYPTOFEED_PROXY_EXTERNAL_SERVICE__HEDGE_DELAY_MS=auto` (repeatable). Use it for settings
    /// the configuration file of today's broker would reject.
    #[arg(long = "broker-env", global = true, value_name = "KEY=VALUE", value_parser = parse_env)]
    broker_env: Vec<(String, String)>,
    /// `RUST_LOG` for the broker (default: unset, i.e. the broker's default `info`).
    #[arg(long, global = true, value_name = "FILTER")]
    broker_log: Option<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// Where cargo puts the release binary of this workspace.
fn default_broker_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/proxy-broker")
}

fn build_broker() -> anyhow::Result<()> {
    let status = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "--locked", "-p", "proxy-broker"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(
        status.success(),
        "cargo build --release -p proxy-broker failed: {status}"
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("proxy-broker-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    if cli.build {
        build_broker()?;
    }
    let path = cli.broker.unwrap_or_else(default_broker_path);
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    anyhow::ensure!(
        path.is_file(),
        "no broker binary at {} — run `cargo build --release --locked -p proxy-broker` first \
         (or pass --build, or --broker PATH)",
        path.display()
    );
    let ctx = Ctx {
        broker: BrokerCommand {
            path,
            env: cli.broker_env,
            log: cli.broker_log,
        },
        clock_ticks: broker::clock_ticks_per_second(),
    };
    println!("{}", machine::describe(&ctx.broker));
    // One thread: the generator (and the in-process upstreams) use one core, and scenarios that
    // pin it pin the whole generator.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the Tokio runtime")?;
    Ok(runtime.block_on(scenario::run(&ctx, &cli.scenario)))
}
