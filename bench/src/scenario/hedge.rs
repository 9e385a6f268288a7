//! `hedge`: the first endpoint is black-holed (accepts TCP, never answers), `timeout_seconds: 1`,
//! the second is healthy. Sequential misses (distinct keys): how long does each take?

use std::time::{Duration, Instant};

use clap::Parser;

use super::{Ctx, progress};
use crate::broker::Broker;
use crate::config::{ConfigSpec, exchange_id};
use crate::load::{Recorder, Rpc, Stub, connect};
use crate::stats::{count, ms, summarize};
use crate::table::Table;
use crate::upstream::{BlackHole, Upstream, UpstreamOptions};

/// Options of `hedge`.
#[derive(Debug, Clone, Parser)]
pub struct HedgeArgs {
    /// Sequential misses, each for a new key.
    #[arg(long, default_value_t = 40)]
    pub misses: usize,
    /// A call slower than this counts as slow.
    #[arg(long, default_value_t = 250)]
    pub slow_ms: u64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &HedgeArgs) -> anyhow::Result<Vec<Table>> {
    let hole = BlackHole::start().await?;
    let healthy = Upstream::start(UpstreamOptions::default()).await?;
    let mut spec = ConfigSpec::delegation(vec![hole.url.clone(), healthy.url.clone()]);
    spec.timeout_seconds = Some(1);
    // An answer must come from the healthy endpoint; a fallback would hide a failure.
    spec.fallback_to_embedded = Some(false);
    let broker = Broker::start(&ctx.broker, &spec, None).await?;
    let channels = connect(broker.addr, 1).await?;
    let mut stub = Stub::new(channels[0].clone());
    let slow = Duration::from_millis(a.slow_ms);
    progress(&format!("hedge: {} sequential misses", a.misses));
    let mut recorder = Recorder::default();
    let mut slow_calls = Vec::new();
    for i in 0..a.misses {
        let rpc = Rpc::request_proxy(exchange_id("hedge", i));
        let started = Instant::now();
        let result = stub.call(&rpc, Duration::from_secs(5)).await;
        let elapsed = started.elapsed();
        if elapsed > slow {
            slow_calls.push(format!("#{} {}", i + 1, ms(elapsed)));
        }
        recorder.record(elapsed, &result);
    }
    let from_healthy = recorder.endpoints.get(&healthy.url).copied().unwrap_or(0);
    let first = recorder
        .micros
        .first()
        .map(|&us| Duration::from_micros(u64::from(us)));
    let accepted = hole.accepted();
    broker.stop().await;

    let s = summarize(&mut recorder.micros);
    let mut table = Table::new(
        format!(
            "hedge: first endpoint black-holed, second healthy, timeout_seconds 1, {} sequential misses",
            a.misses
        ),
        &[
            "misses",
            "codes",
            "answered by the healthy endpoint",
            "first call",
            "p50",
            "p99",
            "max",
            &format!("slower than {} ms", a.slow_ms),
        ],
    );
    table.row([
        count(recorder.calls()),
        recorder.codes_text(),
        count(from_healthy),
        first.map_or_else(String::new, ms),
        ms(s.p50),
        ms(s.p99),
        ms(s.max),
        count(slow_calls.len() as u64),
    ]);
    table
        .note(format!(
            "slow calls: {}",
            if slow_calls.is_empty() { "none".into() } else { slow_calls.join(", ") }
        ))
        .note(format!(
            "fallback_to_embedded false, every other key at its default (hedge settings, if any, via --broker-env); \
             black hole accepted {accepted} TCP connections"
        ))
        .note("goal (issue 8 item 4): no miss slower than 250 ms, the first one included");
    Ok(vec![table])
}
