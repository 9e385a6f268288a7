//! `storm-spread`: issue 9's reconnect storm. N concurrent `binance`/`websocket` RequestProxy
//! against an upstream that rotates over P proxies, under Binance's built-in budget of 300
//! connection attempts per proxy per 300 s: how many proxies the storm is spread over, the most
//! hand-outs of one proxy, and how many upstream calls it took. Before feed-aware brokering every
//! feed got the one cached answer (1 proxy, N hand-outs, 1 upstream call).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;

use super::{Ctx, progress};
use crate::broker::Broker;
use crate::config::ConfigSpec;
use crate::load::{Rpc, Stub, code_name, connect, tally};
use crate::stats::{count, ms, summarize};
use crate::table::Table;
use crate::upstream::{Answer, Upstream, UpstreamOptions};

/// Options of `storm-spread`.
#[derive(Debug, Clone, Parser)]
pub struct StormSpreadArgs {
    /// Concurrent RequestProxy calls (all started at once).
    #[arg(long, default_value_t = 1_000)]
    pub calls: usize,
    /// Distinct proxies the upstream rotates over.
    #[arg(long, default_value_t = 60)]
    pub proxies: usize,
    /// Upstream answer latency.
    #[arg(long, default_value_t = 50)]
    pub upstream_latency_ms: u64,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Deadline of each call.
    #[arg(long, default_value_t = 10)]
    pub deadline_seconds: u64,
}

/// Binance's built-in WebSocket budget per proxy (`brokering.known_exchange_limits`).
const BUDGET: usize = 300;

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &StormSpreadArgs) -> anyhow::Result<Vec<Table>> {
    let upstream = Upstream::start(UpstreamOptions {
        request_delay: Duration::from_millis(a.upstream_latency_ms),
        answer: Answer::Rotating {
            proxies: a.proxies.max(1),
        },
        ttl_seconds: 300,
        ..UpstreamOptions::default()
    })
    .await?;
    let broker = Broker::start(
        &ctx.broker,
        &ConfigSpec::delegation(vec![upstream.url.clone()]),
        None,
    )
    .await?;
    let channels = connect(broker.addr, a.connections).await?;
    let deadline = Duration::from_secs(a.deadline_seconds.max(1));
    progress(&format!("storm-spread: {} calls", a.calls));
    let started = Instant::now();
    let tasks: Vec<_> = (0..a.calls)
        .map(|i| {
            let mut stub = Stub::new(channels[i % channels.len()].clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let result = stub.call(&Rpc::request_proxy("binance"), deadline).await;
                (t.elapsed(), result)
            })
        })
        .collect();
    let mut per_proxy: HashMap<String, u64> = HashMap::new();
    let mut errors: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut micros = Vec::with_capacity(a.calls);
    for task in tasks {
        let (elapsed, result) = task.await?;
        micros.push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        match result {
            Ok(answer) => *per_proxy.entry(answer.proxy_url).or_default() += 1,
            Err(status) => *errors.entry(code_name(status.code())).or_default() += 1,
        }
    }
    let wall = started.elapsed();
    let upstream_calls = upstream.counters.requests();
    broker.stop().await;

    let ok: u64 = per_proxy.values().sum();
    let most = per_proxy.values().max().copied().unwrap_or(0);
    let s = summarize(&mut micros);
    let mut table = Table::new(
        format!(
            "storm-spread: {} concurrent binance/websocket RequestProxy, upstream rotating over {} proxies ({} ms)",
            count(a.calls as u64),
            a.proxies,
            a.upstream_latency_ms
        ),
        &[
            "calls",
            "OK",
            "errors by code",
            "proxies used",
            "most hand-outs of one proxy",
            "upstream calls",
            "wall time",
            "p50",
            "p99",
        ],
    );
    table.row([
        count(a.calls as u64),
        count(ok),
        if errors.is_empty() {
            "none".to_owned()
        } else {
            tally(&errors)
        },
        count(per_proxy.len() as u64),
        count(most),
        count(upstream_calls),
        ms(wall),
        ms(s.p50),
        ms(s.p99),
    ]);
    let needed = a.calls.div_ceil(BUDGET);
    table
        .note(format!(
            "budget: binance's built-in {BUDGET} WebSocket connection attempts per proxy per 300 s; {} HTTP/2 connections, every call started at once with a {} s deadline",
            a.connections,
            deadline.as_secs()
        ))
        .note(format!(
            "goal (issue 9): 0 errors, no proxy over {BUDGET}, about {needed} upstream calls (the storm needs {needed} proxies); \
             before feed-aware brokering: 1 proxy, {} hand-outs, 1 upstream call",
            count(a.calls as u64)
        ));
    Ok(vec![table])
}
