//! `watchers`: what idle `WatchProxy` streams cost the broker — RSS before and after opening
//! 10,000 of them (each waits for its first assignment, then sits idle), and after closing them.

use std::time::{Duration, Instant};

use clap::Parser;
use proxy_broker_client::pb;
use proxy_broker_client::pb::proxy_broker_client::ProxyBrokerClient;
use tonic::transport::Channel;

use super::{Ctx, progress};
use crate::broker::Broker;
use crate::config::{ConfigSpec, exchange_id};
use crate::load::{Rpc, batch, connect};
use crate::stats::{count, mib, mib_delta, ms};
use crate::table::Table;

/// Options of `watchers`.
#[derive(Debug, Clone, Parser)]
pub struct WatchersArgs {
    /// Watchers to open.
    #[arg(long, default_value_t = 10_000)]
    pub watchers: usize,
    /// HTTP/2 connections they are spread over (the broker allows 256 streams per connection).
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// How long to let them sit idle before reading RSS again, in seconds.
    #[arg(long, default_value_t = 3)]
    pub idle_seconds: u64,
}

/// Opens one watcher and waits for its first assignment; returns the open stream.
async fn open(
    channel: Channel,
    exchange: String,
) -> Result<tonic::Streaming<pb::ProxyResponse>, tonic::Status> {
    let mut stub = ProxyBrokerClient::new(channel);
    let mut stream = stub
        .watch_proxy(pb::ProxyRequest {
            exchange_id: exchange,
            connection_type: pb::ConnectionType::Websocket.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    match stream.message().await? {
        Some(_) => Ok(stream),
        None => Err(tonic::Status::internal(
            "the stream ended before its first assignment",
        )),
    }
}

/// Opens `n` watchers over `channels`, 256 opening at a time (bounded in count, and in time by
/// `timeout` each); returns the open streams and the failures by kind.
async fn open_all(
    channels: &[Channel],
    exchange: &str,
    n: usize,
    timeout: Duration,
) -> (
    Vec<tonic::Streaming<pb::ProxyResponse>>,
    std::collections::BTreeMap<String, u64>,
) {
    let mut streams = Vec::with_capacity(n);
    let mut failures = std::collections::BTreeMap::<String, u64>::new();
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    while next < n || !pending.is_empty() {
        while next < n && pending.len() < 256 {
            let channel = channels[next % channels.len()].clone();
            let exchange = exchange.to_owned();
            pending.spawn(async move { tokio::time::timeout(timeout, open(channel, exchange)).await });
            next += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(Ok(stream)))) => streams.push(stream),
            Some(Ok(Ok(Err(status)))) => *failures.entry(format!("{:?}", status.code())).or_default() += 1,
            Some(Ok(Err(_))) => *failures.entry("timeout".into()).or_default() += 1,
            Some(Err(e)) => *failures.entry(format!("task: {e}")).or_default() += 1,
            None => break,
        }
    }
    (streams, failures)
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &WatchersArgs) -> anyhow::Result<Vec<Table>> {
    let broker = Broker::start(&ctx.broker, &ConfigSpec::embedded(1), None).await?;
    let exchange = exchange_id("ex", 0);
    let channels = connect(broker.addr, a.connections).await?;
    let timeout = Duration::from_secs(10);
    // Every connection used once, and one watcher opened and closed, so "before" holds the
    // connections and the registry's task.
    let warm: Vec<Rpc> = (0..channels.len())
        .map(|_| Rpc::request_proxy(exchange.clone()))
        .collect();
    batch(&channels, warm, channels.len(), timeout).await;
    drop(open(channels[0].clone(), exchange.clone()).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = broker.memory()?;

    progress(&format!(
        "watchers: opening {} WatchProxy streams over {} connections",
        a.watchers, a.connections
    ));
    let started = Instant::now();
    let (streams, failures) = open_all(&channels, &exchange, a.watchers, timeout).await;
    let opening = started.elapsed();
    let open_now = broker.memory()?;
    tokio::time::sleep(Duration::from_secs(a.idle_seconds)).await;
    let idle = broker.memory()?;
    let held = streams.len();
    drop(streams);
    // Closed streams leave the registry as their RST_STREAM frames are read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closed = broker.memory()?;
    // The allocator keeps freed memory for reuse: the same number again should need little more.
    let (again, _) = open_all(&channels, &exchange, a.watchers, timeout).await;
    let reopened = broker.memory()?;
    drop(again);
    broker.stop().await;

    let mut table = Table::new(
        format!("watchers: {} idle WatchProxy streams", count(a.watchers as u64)),
        &["", "VmRSS", "VmHWM (peak)"],
    );
    table
        .row([
            format!("{} connections open, no watcher", a.connections),
            mib(before.rss_kib),
            mib(before.hwm_kib),
        ])
        .row([
            format!("{} watchers open (first assignment received)", count(held as u64)),
            mib(open_now.rss_kib),
            mib(open_now.hwm_kib),
        ])
        .row([
            format!("the same, idle {} s later", a.idle_seconds),
            mib(idle.rss_kib),
            mib(idle.hwm_kib),
        ])
        .row([
            "all closed, 2 s later".to_owned(),
            mib(closed.rss_kib),
            mib(closed.hwm_kib),
        ])
        .row([
            format!("{} opened again", count(a.watchers as u64)),
            mib(reopened.rss_kib),
            mib(reopened.hwm_kib),
        ])
        .row([
            "growth with the watchers open (idle)".to_owned(),
            mib_delta(before.rss_kib, idle.rss_kib),
            mib_delta(before.hwm_kib, idle.hwm_kib),
        ]);
    let per_watcher = (idle.rss_kib.saturating_sub(before.rss_kib) * 1024) / held.max(1) as u64;
    let failed = crate::load::tally(&failures);
    table
        .note(format!(
            "bytes per idle watcher ≈ {per_watcher} (RSS growth over watchers held); opened in {}; failures: {failed}",
            ms(opening)
        ))
        .note("goal (issue 9 behaviour 7): < 4 KiB per idle watcher with 10,000 open");
    Ok(vec![table])
}
