//! Holds one WebSocket open through the proxy the broker assigns, and moves it to a new proxy
//! when the broker says so (`WatchProxy`: the proxy was banned or ejected for the exchange, its
//! lease ended with another answer, or a reload changed it).
//!
//! ```sh
//! cargo run -p proxy-broker-client --example watch_reconnect -- \
//!     --broker http://127.0.0.1:50051 --exchange binance --url wss://stream.binance.com:9443/ws/btcusdt@trade
//! ```
//!
//! Prints `connected via <proxy>` (credentials masked) for each connection and every text message
//! received. A new assignment on the same proxy (a renewed lease) keeps the connection; one on
//! another route opens the new connection first and closes the old one only once the new one is
//! up (if the new one fails, the old one stays). When the broker is unreachable the watch answers
//! like any feed would (the last broker answer, else `CRYPTOFEED_PROXY_*` / the YAML file named
//! by `PROXY_BROKER_CLIENT_CONFIG`) and reconnects to the broker with backoff.
//!
//! Options: `--token T` (broker auth), `--sticky-key K`, `--moves N` (exit 0 after the connection
//! has moved N times; default: run until interrupted).

use std::fmt::Write as _;

use futures_util::StreamExt;
use proxy_broker_client::{
    BrokerClient, ConnectOptions, ConnectionType, Error, Message, Resolved, WatchOptions, WebSocket,
};

const USAGE: &str = "usage: watch_reconnect --broker URL --exchange ID --url ws(s)://… [--token T] [--sticky-key K] [--moves N]";

/// Parsed command line.
#[derive(Debug, Default)]
struct Args {
    broker: String,
    exchange: String,
    url: String,
    token: Option<String>,
    sticky_key: Option<String>,
    moves: Option<usize>,
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
            "--token" => out.token = Some(value()?),
            "--sticky-key" => out.sticky_key = Some(value()?),
            "--moves" => out.moves = Some(value()?.parse().map_err(|_| "--moves takes a count")?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.broker.is_empty() || out.exchange.is_empty() || out.url.is_empty() {
        return Err("--broker, --exchange and --url are required".to_owned());
    }
    Ok(out)
}

/// The connection in use and the assignment it was opened along.
struct Current {
    assignment: Resolved,
    ws: WebSocket,
}

fn shown(r: &Resolved) -> String {
    r.proxy
        .as_ref()
        .map_or_else(|| "directly".to_owned(), |p| format!("via {p}"))
}

/// The next message of the connection in use (never, without one).
async fn next_message(current: &mut Option<Current>) -> Option<Result<Message, String>> {
    match current {
        Some(c) => c.ws.next().await.map(|m| m.map_err(|e| e.to_string())),
        None => std::future::pending().await,
    }
}

fn say(transcript: &mut String, line: String) {
    eprintln!("{line}");
    let _ = writeln!(transcript, "{line}");
}

/// The connection dropped without the broker moving it: a new connection asks the broker again
/// (one `RequestProxy`, one counted attempt), as every new connection should.
async fn reconnect(
    client: &BrokerClient,
    args: &Args,
    lost: Option<Current>,
    transcript: &mut String,
) -> Option<Current> {
    let lost = lost?;
    match client.connect_websocket(&args.url, &args.exchange).await {
        Ok(ws) => {
            let mut assignment = lost.assignment;
            assignment.proxy = ws.get_ref().route().proxy.clone();
            say(transcript, format!("reconnected {}", shown(&assignment)));
            Some(Current { assignment, ws })
        }
        Err(e) => {
            say(
                transcript,
                format!("cannot reconnect: {e}; waiting for the next assignment"),
            );
            None
        }
    }
}

/// Watches and reconnects; returns the transcript once the connection has moved `--moves` times.
pub async fn run(args: &[String]) -> Result<String, Box<dyn std::error::Error>> {
    let args = parse(args)?;
    let mut builder = BrokerClient::builder(&args.broker);
    if let Some(token) = &args.token {
        builder = builder.auth_token(token);
    }
    let client = builder.build()?;
    let options = WatchOptions {
        sticky_key: args.sticky_key.clone(),
        ..Default::default()
    };
    let mut assignments = client.watch(&args.exchange, ConnectionType::Websocket, &options)?;
    let mut transcript = String::new();
    let mut current: Option<Current> = None;
    let mut moves = 0;
    loop {
        tokio::select! {
            assignment = assignments.next() => {
                let assignment = match assignment {
                    None => return Err("the watch ended".into()),
                    Some(Ok(a)) => a,
                    // A refusal (bad token, bad argument): the watch ends after it.
                    Some(Err(e @ Error::Broker { .. })) => return Err(e.into()),
                    Some(Err(e)) => {
                        say(&mut transcript, format!("no assignment right now: {e}"));
                        continue;
                    }
                };
                if current.as_ref().is_some_and(|c| c.assignment.same_route(&assignment)) {
                    continue; // a renewed lease on the same route
                }
                // The broker counted this assignment as one connection attempt: connect along it
                // rather than resolve again.
                let along = ConnectOptions { resolved: Some(assignment.clone()), ..Default::default() };
                match client.connect_websocket_with(args.url.as_str(), &args.exchange, &along).await {
                    Ok(ws) => {
                        say(&mut transcript, format!("connected {}", shown(&assignment)));
                        if let Some(mut old) = current.replace(Current { assignment, ws }) {
                            let _ = old.ws.close(None).await;
                            moves += 1;
                        }
                    }
                    Err(e) => say(&mut transcript, format!("cannot connect {}: {e}; keeping the connection in use", shown(&assignment))),
                }
            }
            message = next_message(&mut current) => match message {
                Some(Ok(Message::Text(text))) => {
                    say(&mut transcript, format!("message: {text}"));
                    if args.moves.is_some_and(|n| moves >= n) {
                        return Ok(transcript);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    say(&mut transcript, format!("connection lost: {e}"));
                    current = reconnect(&client, &args, current.take(), &mut transcript).await;
                }
                None => {
                    say(&mut transcript, "connection closed by the server".to_owned());
                    current = reconnect(&client, &args, current.take(), &mut transcript).await;
                }
            },
        }
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
        Ok(_) => {}
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
