//! Opens a URL through the proxy the broker chooses and prints what comes back.
//!
//! ```sh
//! cargo run -p proxy-broker-client --example connect -- \
//!     --broker http://127.0.0.1:50051 --exchange binance --url wss://stream.binance.com:9443/ws/btcusdt@trade
//! ```
//!
//! `ws://` / `wss://`: prints the first text message received. `http://` / `https://`: prints the
//! response body. Exits 0 on success; prints the error and exits 1 on failure (2 on bad usage).
//! When the broker is down it falls back like any feed: `CRYPTOFEED_PROXY_*` variables and the YAML
//! file named by `PROXY_BROKER_CLIENT_CONFIG`.
//!
//! Options: `--region R`, `--token T` (broker auth), `--ca-file PEM` (extra root CA for the
//! target), `--allow-direct` (connect directly if neither broker nor local configuration answers),
//! `--timeout SECONDS` (connect timeout, default 30).

use std::time::Duration;

use futures_util::StreamExt;
use proxy_broker_client::{BrokerClient, Message};

const USAGE: &str = "usage: connect --broker URL --exchange ID --url URL [--region R] [--token T] \
                     [--ca-file PEM] [--allow-direct] [--timeout SECONDS]";

/// Parsed command line.
#[derive(Debug, Default)]
struct Args {
    broker: String,
    exchange: String,
    url: String,
    region: Option<String>,
    token: Option<String>,
    ca_file: Option<String>,
    allow_direct: bool,
    timeout: Option<u64>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut out = Args::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--broker" => out.broker = value()?,
            "--exchange" => out.exchange = value()?,
            "--url" => out.url = value()?,
            "--region" => out.region = Some(value()?),
            "--token" => out.token = Some(value()?),
            "--ca-file" => out.ca_file = Some(value()?),
            "--timeout" => out.timeout = Some(value()?.parse().map_err(|_| "--timeout takes seconds")?),
            "--allow-direct" => out.allow_direct = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.broker.is_empty() || out.exchange.is_empty() || out.url.is_empty() {
        return Err("--broker, --exchange and --url are required".to_owned());
    }
    Ok(out)
}

/// Opens `--url` through the broker's choice; returns what should be printed.
pub async fn run(args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let args = parse(args)?;
    let mut builder = BrokerClient::builder(&args.broker).allow_direct_fallback(args.allow_direct);
    if let Some(region) = &args.region {
        builder = builder.region(region);
    }
    if let Some(token) = &args.token {
        builder = builder.auth_token(token);
    }
    if let Some(path) = &args.ca_file {
        builder = builder.root_ca_pem(std::fs::read(path).map_err(|e| format!("--ca-file {path}: {e}"))?);
    }
    if let Some(seconds) = args.timeout {
        builder = builder.connect_timeout(Duration::from_secs(seconds.max(1)));
    }
    let client = builder.build()?;
    if args.url.starts_with("ws://") || args.url.starts_with("wss://") {
        let mut ws = client.connect_websocket(&args.url, &args.exchange).await?;
        let route = ws.get_ref().route().clone();
        eprintln!(
            "connected {} (source {:?})",
            route.proxy.map_or("directly".to_owned(), |p| format!("via {p}")),
            route.source
        );
        while let Some(message) = ws.next().await {
            if let Message::Text(text) = message? {
                let _ = ws.close(None).await;
                return Ok(text.to_string());
            }
        }
        Err("the WebSocket closed before sending a text message".into())
    } else {
        let response = client.http_get(&args.exchange, &args.url).await?;
        let status = response.status();
        let body = response.text().await?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {body}").into());
        }
        Ok(body)
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(usage) = parse(&args) {
        eprintln!("{usage}\n{USAGE}");
        std::process::exit(2);
    }
    match run(&args).await {
        Ok(output) => println!("{output}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
