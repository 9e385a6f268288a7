//! `hit-vs-health`: what a cached `RequestProxy` costs next to the same server's
//! `grpc.health.v1.Health/Check`. The broker is pinned to one core (`taskset`), the generator
//! (one thread) to another; rounds of each call alternate (ABBA) in one run so drift and noisy
//! neighbours hit both alike.

use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::Parser;
use proxy_broker_client::pb::ProxySource;

use super::{Ctx, progress};
use crate::broker::{Broker, cpu_ticks_of};
use crate::config::ConfigSpec;
use crate::load::{Rpc, Stub, closed_loop, connect};
use crate::machine::{current_affinity, nproc, pin_self};
use crate::stats::{count, median, ms, summarize};
use crate::table::Table;
use crate::upstream::{Upstream, UpstreamOptions};

/// Options of `hit-vs-health`.
#[derive(Debug, Clone, Parser)]
pub struct HitVsHealthArgs {
    /// A/B pairs; each pair is one RequestProxy round and one Health/Check round.
    #[arg(long, default_value_t = 3)]
    pub pairs: usize,
    /// Length of each round.
    #[arg(long, default_value_t = 3.0)]
    pub round_seconds: f64,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 32)]
    pub streams: usize,
    /// Core the broker is pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
    /// Core the generator is pinned to.
    #[arg(long, default_value_t = 1)]
    pub generator_core: usize,
    /// Do not pin (the generator and the broker then share every core).
    #[arg(long)]
    pub no_pin: bool,
    /// Upper bound of calls per round.
    #[arg(long, default_value_t = 5_000_000)]
    pub max_calls_per_round: u64,
}

/// The two calls compared (also by `hit-cost`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Hit,
    Health,
}

impl Kind {
    /// The order of pair `pair`'s two rounds: ABBA, so drift hits both calls alike.
    pub(super) fn abba(pair: usize) -> [Kind; 2] {
        if pair.is_multiple_of(2) {
            [Kind::Hit, Kind::Health]
        } else {
            [Kind::Health, Kind::Hit]
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Hit => "RequestProxy (cache hit)",
            Kind::Health => "Health/Check",
        }
    }
}

/// A summary row: its name, the per-round figure, how the median is shown.
type SummaryRow = (&'static str, fn(&Round) -> f64, fn(f64) -> String);

#[derive(Debug)]
struct Round {
    kind: Kind,
    calls: u64,
    errors: u64,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    server_us_per_call: f64,
    server_busy: f64,
    generator_busy: f64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &HitVsHealthArgs) -> anyhow::Result<Vec<Table>> {
    let pin = !a.no_pin && nproc() >= 2;
    let restore = if pin {
        let original = current_affinity()?;
        pin_self(&a.generator_core.to_string())?;
        Some(original)
    } else {
        None
    };
    let result = measure(ctx, a, pin).await;
    if let Some(original) = restore {
        pin_self(&original)?;
    }
    result
}

async fn measure(ctx: &Ctx, a: &HitVsHealthArgs, pin: bool) -> anyhow::Result<Vec<Table>> {
    let upstream = Upstream::start(UpstreamOptions::default()).await?;
    let spec = ConfigSpec::delegation(vec![upstream.url.clone()]);
    let broker = Broker::start(&ctx.broker, &spec, pin.then_some(a.server_core)).await?;
    let channels = connect(broker.addr, a.connections).await?;
    // An exchange without a connection-attempt budget: binance's built-in one (300 hand-outs per
    // proxy per 5 minutes) would end a throughput run after 300 calls. Every hit still goes
    // through the brokering engine (eligibility, the hand-out and its lease are counted).
    let full = Rpc::request_proxy("kucoin");
    // Measured with the lean call: the same request on the wire, but the generator encodes it
    // once and reads only `source` of the answer, so its own cost per call is about a health
    // check's and the ratio is the broker's (the full call's decoding of the larger answer made
    // the generator the limit: see BENCHMARKS.md, session 6).
    let hit = Rpc::lean_request_proxy("kucoin");
    let timeout = Duration::from_secs(5);

    // Fill the cache: the first answer comes from the upstream, the second must be a hit.
    let mut stub = Stub::new(channels[0].clone());
    stub.call(&full, timeout).await?;
    let second = stub.call(&full, timeout).await?;
    ensure!(
        second.source == Some(ProxySource::Cache),
        "the second RequestProxy was not a cache hit ({:?})",
        second.source
    );
    let second = stub.call(&hit, timeout).await?;
    ensure!(
        second.source == Some(ProxySource::Cache),
        "the second RequestProxy was not a cache hit ({:?})",
        second.source
    );

    let round = Duration::from_secs_f64(a.round_seconds.clamp(0.5, 60.0));
    progress("hit-vs-health: warm-up (1 s of each call)");
    for rpc in [&hit, &Rpc::HealthCheck] {
        closed_loop(
            &channels,
            a.streams,
            rpc,
            Duration::from_secs(1),
            a.max_calls_per_round,
            timeout,
        )
        .await;
    }
    let mut rounds = Vec::new();
    let mut hit_sources = crate::load::Recorder::default();
    for pair in 0..a.pairs.max(1) {
        for kind in Kind::abba(pair) {
            progress(&format!("hit-vs-health: pair {} {}", pair + 1, kind.name()));
            let rpc = match kind {
                Kind::Hit => &hit,
                Kind::Health => &Rpc::HealthCheck,
            };
            let (server0, gen0) = (broker.cpu_ticks()?, cpu_ticks_of("/proc/self/stat")?);
            let started = Instant::now();
            let mut recorder =
                closed_loop(&channels, a.streams, rpc, round, a.max_calls_per_round, timeout).await;
            let wall = started.elapsed().as_secs_f64();
            let ticks = ctx.clock_ticks as f64;
            let server_s = (broker.cpu_ticks()? - server0) as f64 / ticks;
            let gen_s = (cpu_ticks_of("/proc/self/stat")? - gen0) as f64 / ticks;
            let summary = summarize(&mut recorder.micros);
            let calls = recorder.calls();
            rounds.push(Round {
                kind,
                calls,
                errors: recorder.errors(),
                per_second: recorder.ok() as f64 / wall,
                p50: summary.p50,
                p99: summary.p99,
                server_us_per_call: server_s * 1e6 / calls.max(1) as f64,
                server_busy: server_s / wall,
                generator_busy: gen_s / wall,
            });
            if kind == Kind::Hit {
                recorder.micros.clear();
                hit_sources.merge(recorder);
            }
        }
    }
    broker.stop().await;

    let mut detail = Table::new(
        "hit-vs-health: rounds",
        &[
            "round",
            "call",
            "calls",
            "errors",
            "req/s",
            "p50",
            "p99",
            "broker CPU per call",
            "broker core busy",
            "generator core busy",
        ],
    );
    for (i, r) in rounds.iter().enumerate() {
        detail.row([
            (i + 1).to_string(),
            r.kind.name().to_owned(),
            count(r.calls),
            count(r.errors),
            count(r.per_second.round() as u64),
            ms(r.p50),
            ms(r.p99),
            format!("{:.1} µs", r.server_us_per_call),
            format!("{:.0} %", r.server_busy * 100.0),
            format!("{:.0} %", r.generator_busy * 100.0),
        ]);
    }
    let pick = |kind: Kind, f: fn(&Round) -> f64| -> f64 {
        median(
            &rounds
                .iter()
                .filter(|r| r.kind == kind)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let mut summary = Table::new(
        "hit-vs-health: summary (median of rounds)",
        &["", Kind::Hit.name(), Kind::Health.name(), "hit / health"],
    );
    let rows: [SummaryRow; 4] = [
        (
            "throughput",
            |r| r.per_second,
            |v| format!("{} req/s", count(v.round() as u64)),
        ),
        (
            "p50 latency",
            |r| r.p50.as_secs_f64(),
            |v| ms(Duration::from_secs_f64(v)),
        ),
        (
            "p99 latency",
            |r| r.p99.as_secs_f64(),
            |v| ms(Duration::from_secs_f64(v)),
        ),
        (
            "broker CPU per call",
            |r| r.server_us_per_call,
            |v| format!("{v:.1} µs"),
        ),
    ];
    for (name, f, show) in rows {
        let (h, g) = (pick(Kind::Hit, f), pick(Kind::Health, f));
        summary.row([name.to_owned(), show(h), show(g), format!("{:.2}", h / g)]);
    }
    // Each pair's two rounds ran next to each other: their ratio shows how far one run's rounds
    // scatter on this machine, which the medians above hide.
    let mut per_pair: Vec<f64> = rounds
        .chunks(2)
        .filter_map(|pair| {
            let of = |kind: Kind| pair.iter().find(|r| r.kind == kind).map(|r| r.per_second);
            Some(of(Kind::Hit)? / of(Kind::Health)?.max(1e-9))
        })
        .collect();
    per_pair.sort_by(f64::total_cmp);
    let scatter = match (per_pair.first(), per_pair.last()) {
        (Some(low), Some(high)) => format!(
            "throughput hit / health per pair of adjacent rounds: lowest {low:.2}, median {:.2}, highest {high:.2} ({} pairs)",
            median(&per_pair),
            per_pair.len()
        ),
        _ => "no complete pair of rounds".to_owned(),
    };
    let placement = if pin {
        format!(
            "broker pinned to core {} (`taskset -c {}`), generator (one thread) pinned to core {}",
            a.server_core, a.server_core, a.generator_core
        )
    } else {
        "not pinned: broker and generator share every core".to_owned()
    };
    summary
        .note(format!(
            "{placement}; {} connections × {} calls in flight; {} rounds of {:.1} s, alternating ABBA, after 1 s of warm-up each",
            a.connections,
            a.streams,
            rounds.len(),
            round.as_secs_f64()
        ))
        .note(scatter)
        .note(format!(
            "RequestProxy answers by source: {} (all must be CACHE)",
            hit_sources.sources_text()
        ))
        .note(
            "goal (issue 8 item 2): throughput hit / health ≥ 0.95. Broker CPU per call is CPU time of the \
             broker process (/proc/<pid>/stat) over calls; it is the comparable figure when the broker core \
             is not saturated (then the generator limits throughput)",
        );
    Ok(vec![summary, detail])
}
