//! `memory-100k`: the broker's RSS before and after 100,000 distinct keys are cached.

use std::time::{Duration, Instant};

use clap::Parser;

use super::{Ctx, progress};
use crate::broker::{Broker, metric_sum};
use crate::config::{ConfigSpec, exchange_id};
use crate::load::{Rpc, batch, connect};
use crate::stats::{count, mib, mib_delta, ms};
use crate::table::Table;
use crate::upstream::{Upstream, UpstreamOptions};

/// Options of `memory-100k`.
#[derive(Debug, Clone, Parser)]
pub struct MemoryArgs {
    /// Distinct keys to cache (the broker's default `cache_max_entries` is 100,000).
    #[arg(long, default_value_t = 100_000)]
    pub keys: usize,
    /// RequestProxy calls in flight while filling.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &MemoryArgs) -> anyhow::Result<Vec<Table>> {
    let upstream = Upstream::start(UpstreamOptions::default()).await?;
    let broker = Broker::start(
        &ctx.broker,
        &ConfigSpec::delegation(vec![upstream.url.clone()]),
        None,
    )
    .await?;
    let channels = connect(broker.addr, a.connections).await?;
    let timeout = Duration::from_secs(10);
    // One lookup first, so "before" includes the upstream client and the cache being set up.
    batch(&channels, vec![Rpc::request_proxy("warmup")], 1, timeout).await;
    let before = broker.memory()?;
    progress(&format!("memory-100k: caching {} keys", a.keys));
    let rpcs = (0..a.keys)
        .map(|i| Rpc::request_proxy(exchange_id("m", i)))
        .collect();
    let started = Instant::now();
    let recorder = batch(&channels, rpcs, a.concurrency, timeout).await;
    let wall = started.elapsed();
    let after = broker.memory()?;
    let entries = broker
        .metrics()
        .await
        .ok()
        .and_then(|m| metric_sum(&m, "proxy_broker_cache_entries"));
    let (upstream_calls, connections) = (upstream.counters.requests(), upstream.counters.connections());
    broker.stop().await;

    let mut table = Table::new(
        format!("memory-100k: {} distinct cached keys", count(a.keys as u64)),
        &["", "VmRSS", "VmHWM (peak)"],
    );
    table
        .row([
            "after start-up and one lookup".to_owned(),
            mib(before.rss_kib),
            mib(before.hwm_kib),
        ])
        .row([
            format!("after {} keys", count(a.keys as u64)),
            mib(after.rss_kib),
            mib(after.hwm_kib),
        ])
        .row([
            "growth".to_owned(),
            mib_delta(before.rss_kib, after.rss_kib),
            mib_delta(before.hwm_kib, after.hwm_kib),
        ]);
    let per_key = (after.rss_kib.saturating_sub(before.rss_kib) * 1024) / a.keys.max(1) as u64;
    table
        .note(format!(
            "codes: {}; cache entries (metric): {}; upstream calls: {}; upstream TCP connections accepted: {}; \
             fill took {} with {} in flight; growth per key ≈ {per_key} bytes",
            recorder.codes_text(),
            entries.map_or("n/a".into(), |e| count(e as u64)),
            count(upstream_calls),
            count(connections),
            ms(wall),
            a.concurrency
        ))
        .note("goal (issue 8 item 5): 100,000 cached keys < 64 MiB RSS");
    Ok(vec![table])
}
