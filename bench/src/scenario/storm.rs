//! `storm`: the reconnect storm the broker exists for. N concurrent `RequestProxy` over K cold
//! keys with a 50 ms upstream, then the same storm again warm; beside it, what the seed design
//! (one upstream call per feed per miss) costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use tokio::sync::Semaphore;

use super::{Ctx, progress};
use crate::broker::{Broker, metric_sum};
use crate::config::{ConfigSpec, UPSTREAM_TOKEN, exchange_id};
use crate::load::{Recorder, Rpc, batch, connect};
use crate::stats::{count, ms, summarize};
use crate::table::Table;
use crate::upstream::{REQUEST_PATH, Upstream, UpstreamOptions};

/// Options of `storm`.
#[derive(Debug, Clone, Parser)]
pub struct StormArgs {
    /// Concurrent RequestProxy calls (all started at once).
    #[arg(long, default_value_t = 10_000)]
    pub calls: usize,
    /// Distinct cold keys (exchange ids) the calls are spread over.
    #[arg(long, default_value_t = 100)]
    pub keys: usize,
    /// Upstream answer latency.
    #[arg(long, default_value_t = 50)]
    pub upstream_latency_ms: u64,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Deadline of each call.
    #[arg(long, default_value_t = 10)]
    pub deadline_seconds: u64,
    /// Also measure the seed design's cost: the same N lookups sent straight to the upstream.
    #[arg(long)]
    pub seed_design: bool,
    /// Direct upstream calls in flight at once for --seed-design (HTTP/1.1 connections).
    #[arg(long, default_value_t = 512)]
    pub seed_concurrency: usize,
}

struct Run {
    recorder: Recorder,
    wall: Duration,
    upstream_calls: u64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &StormArgs) -> anyhow::Result<Vec<Table>> {
    let upstream = Upstream::start(UpstreamOptions {
        request_delay: Duration::from_millis(a.upstream_latency_ms),
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
    let keys = a.keys.max(1);
    let rpcs: Vec<Rpc> = (0..a.calls)
        .map(|i| Rpc::request_proxy(exchange_id("storm", i % keys)))
        .collect();
    let deadline = Duration::from_secs(a.deadline_seconds.max(1));
    let storm = |label: &'static str| {
        let (rpcs, channels, upstream) = (rpcs.clone(), channels.clone(), &upstream);
        async move {
            progress(&format!("storm: {label} ({} calls)", rpcs.len()));
            let before = upstream.counters.requests();
            let started = Instant::now();
            let recorder = batch(&channels, rpcs, usize::MAX, deadline).await;
            Run {
                wall: started.elapsed(),
                upstream_calls: upstream.counters.requests() - before,
                recorder,
            }
        }
    };
    let mut cold = storm("cold").await;
    let mut warm = storm("warm").await;
    let coalesced = broker
        .metrics()
        .await
        .ok()
        .and_then(|m| metric_sum(&m, "proxy_broker_coalesced_total"));
    let connections = upstream.counters.connections();
    broker.stop().await;

    let mut table = Table::new(
        format!(
            "storm: {} concurrent RequestProxy over {} cold keys, upstream {} ms",
            count(a.calls as u64),
            count(keys as u64),
            a.upstream_latency_ms
        ),
        &[
            "run",
            "calls",
            "OK",
            "errors by code",
            "upstream calls",
            "wall time",
            "p50",
            "p99",
        ],
    );
    for (name, run) in [("cold storm", &mut cold), ("same storm, warm", &mut warm)] {
        let s = summarize(&mut run.recorder.micros);
        table.row([
            name.to_owned(),
            count(run.recorder.calls()),
            count(run.recorder.ok()),
            run.recorder.errors_text(),
            count(run.upstream_calls),
            ms(run.wall),
            ms(s.p50),
            ms(s.p99),
        ]);
    }
    let diff = cold.wall.as_secs_f64() - warm.wall.as_secs_f64();
    table.row([
        "cold − warm".to_owned(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        format!("{:+.0} ms", diff * 1000.0),
    ]);
    table.row([
        "seed design (computed: one upstream call per feed per miss)".to_owned(),
        count(a.calls as u64),
        String::new(),
        String::new(),
        count(a.calls as u64),
    ]);
    if a.seed_design {
        let mut seed = seed_design(&upstream, a.calls, a.seed_concurrency).await?;
        let s = summarize(&mut seed.recorder.micros);
        table.row([
            format!(
                "seed design (measured: {} direct HTTP/1.1 POSTs to the same upstream, {} at a time, no broker)",
                count(a.calls as u64),
                a.seed_concurrency
            ),
            count(seed.recorder.calls()),
            count(seed.recorder.ok()),
            seed.recorder.errors_text(),
            count(seed.upstream_calls),
            ms(seed.wall),
            ms(s.p50),
            ms(s.p99),
        ]);
    }
    table
        .note(format!(
            "default server settings; {} HTTP/2 connections, every call started at once with a {} s deadline; \
             keys storm000000..; the warm storm repeats the same calls once the cache is filled",
            a.connections,
            deadline.as_secs()
        ))
        .note(format!(
            "broker coalesced_total after both storms: {}; upstream TCP connections accepted: {}",
            coalesced.map_or("n/a".into(), |c| count(c as u64)),
            count(connections)
        ))
        .note(format!(
            "goal (issue 8 item 1): 0 errors, exactly {} upstream calls, cold within 1 s of warm",
            keys.min(a.calls)
        ));
    Ok(vec![table])
}

/// The seed design's cost measured: every feed's miss is one upstream call, so N lookups are N
/// POSTs to the upstream (with `concurrency` of them in flight; the 10,000 sockets of a real
/// storm would exceed the generator's descriptor limit).
async fn seed_design(upstream: &Upstream, calls: usize, concurrency: usize) -> anyhow::Result<Run> {
    progress(&format!("storm: seed design, {calls} direct upstream calls"));
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}{REQUEST_PATH}", upstream.url);
    let permits = Arc::new(Semaphore::new(concurrency.clamp(1, 4096)));
    let before = upstream.counters.requests();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        let permit = permits.clone().acquire_owned().await?;
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"exchange_id": exchange_id("seed", i % 100), "connection_type": "websocket",
                              "region": null, "client_id": "feed", "metadata": {}});
            let t = Instant::now();
            let result = client
                .post(&url)
                .bearer_auth(UPSTREAM_TOKEN)
                .json(&body)
                .send()
                .await;
            let ok = match result {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            drop(permit);
            (t.elapsed(), ok)
        }));
    }
    let mut recorder = Recorder::default();
    for task in tasks {
        let (elapsed, ok) = task.await?;
        recorder
            .micros
            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        *recorder
            .codes
            .entry(if ok { "OK" } else { "HTTP_FAILED" })
            .or_default() += 1;
    }
    Ok(Run {
        wall: started.elapsed(),
        upstream_calls: upstream.counters.requests() - before,
        recorder,
    })
}
