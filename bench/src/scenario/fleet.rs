//! `fleet`: issue 10's figures — replicas sharing their brokering state through a real
//! `redis-server` on loopback (`store.backend: redis`) against the same replicas on their own
//! memory (the default):
//! 1. the reconnect storm split over the replicas (upstream calls per key, errors);
//! 2. cache-hit throughput of a fleet replica against a memory broker (an exchange without a
//!    budget, whose hits cost no Redis round-trip), and a budgeted hand-out's throughput;
//! 3. the latency a budgeted hand-out gains from its check-and-count in Redis (p50/p99, one call
//!    at a time), beside an unbudgeted hit's;
//! 4. Redis round-trips per request of each kind, counted by a relay in front of Redis (commands
//!    the broker sends), with the server's own command counts (scripts' inner commands included).
//!
//! The store settings and budgets go to the broker as environment (`PROXY_BROKER_STORE__*`,
//! `PROXY_BROKER_BROKERING__*`), on top of the generated configuration file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::ensure;
use clap::Parser;
use proxy_broker_client::pb::ProxySource;
use tonic::transport::Channel;

use super::fleet_redis::{CountingRelay, RedisServer, StoreUpWatch};
use super::{Ctx, progress};
use crate::broker::{Broker, BrokerCommand, cpu_ticks_of};
use crate::config::{ConfigSpec, exchange_id};
use crate::load::{Recorder, Rpc, Stub, batch, closed_loop, connect};
use crate::machine::{current_affinity, nproc, pin_self};
use crate::stats::{count, median, ms, summarize};
use crate::table::Table;
use crate::upstream::{Upstream, UpstreamOptions};

/// Options of `fleet`.
#[derive(Debug, Clone, Parser)]
pub struct FleetArgs {
    /// Replicas sharing one Redis.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Storm: concurrent RequestProxy calls (all started at once), split over the replicas.
    #[arg(long, default_value_t = 10_000)]
    pub calls: usize,
    /// Storm: distinct cold keys.
    #[arg(long, default_value_t = 100)]
    pub keys: usize,
    /// Storm: upstream answer latency.
    #[arg(long, default_value_t = 50)]
    pub upstream_latency_ms: u64,
    /// Storm: HTTP/2 connections, spread evenly over the replicas.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Storm: deadline of each call.
    #[arg(long, default_value_t = 10)]
    pub deadline_seconds: u64,
    /// Throughput and latency: memory/fleet round pairs per workload (alternating ABBA).
    #[arg(long, default_value_t = 3)]
    pub pairs: usize,
    /// Throughput and latency: length of each round.
    #[arg(long, default_value_t = 3.0)]
    pub round_seconds: f64,
    /// Throughput: HTTP/2 connections.
    #[arg(long, default_value_t = 8)]
    pub hit_connections: usize,
    /// Throughput: calls in flight per connection.
    #[arg(long, default_value_t = 32)]
    pub hit_streams: usize,
    /// Upper bound of calls per round.
    #[arg(long, default_value_t = 5_000_000)]
    pub max_calls_per_round: u64,
    /// Round-trips: calls of each kind.
    #[arg(long, default_value_t = 2_000)]
    pub round_trip_calls: usize,
    /// Core the brokers are pinned to in the throughput and latency rounds.
    #[arg(long, default_value_t = 0)]
    pub server_core: usize,
    /// Core the generator is pinned to in the throughput and latency rounds.
    #[arg(long, default_value_t = 1)]
    pub generator_core: usize,
    /// Do not pin.
    #[arg(long)]
    pub no_pin: bool,
    /// The `redis-server` program.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// `store.redis.operation_timeout_ms` of the fleet replicas (default: the broker's, 50).
    #[arg(long)]
    pub operation_timeout_ms: Option<u32>,
    /// `attempts` of the budgeted exchange's WebSocket budget.
    #[arg(long, default_value_t = 1_000_000)]
    pub budget_attempts: u32,
    /// `per_seconds` of the budgeted exchange's WebSocket budget.
    #[arg(long, default_value_t = 60)]
    pub budget_per_seconds: u32,
    /// Parts to run (comma-separated): storm, round-trips, rounds.
    #[arg(long, value_delimiter = ',', default_value = "storm,round-trips,rounds")]
    pub parts: Vec<Part>,
}

/// A part of the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The storm split over the replicas.
    Storm,
    /// Redis round-trips per request.
    RoundTrips,
    /// Memory vs fleet rounds (throughput, latency).
    Rounds,
}

/// The exchange with a (large) configured WebSocket budget: every hand-out is a check-and-count.
const BUDGETED: &str = "bench";
/// An exchange without a budget (no built-in one): hits stay on the replica.
const UNBUDGETED: &str = "kucoin";

/// The broker command for one mode: the budget of [`BUDGETED`] always; the Redis store under
/// `key_prefix` when `redis_url` is given.
fn command(base: &BrokerCommand, redis_url: Option<&str>, key_prefix: &str, a: &FleetArgs) -> BrokerCommand {
    let mut cmd = base.clone();
    let exchange = BUDGETED.to_uppercase();
    cmd.env.push((
        format!("PROXY_BROKER_BROKERING__EXCHANGES__{exchange}__WEBSOCKET__ATTEMPTS"),
        a.budget_attempts.to_string(),
    ));
    cmd.env.push((
        format!("PROXY_BROKER_BROKERING__EXCHANGES__{exchange}__WEBSOCKET__PER_SECONDS"),
        a.budget_per_seconds.to_string(),
    ));
    if let Some(url) = redis_url {
        cmd.env
            .push(("PROXY_BROKER_STORE__BACKEND".into(), "redis".into()));
        cmd.env
            .push(("PROXY_BROKER_STORE__REDIS__URL".into(), url.into()));
        cmd.env
            .push(("PROXY_BROKER_STORE__REDIS__KEY_PREFIX".into(), key_prefix.into()));
        if let Some(t) = a.operation_timeout_ms {
            cmd.env.push((
                "PROXY_BROKER_STORE__REDIS__OPERATION_TIMEOUT_MS".into(),
                t.to_string(),
            ));
        }
    }
    cmd
}

/// The key of call `i` when calls go to the replicas in turn (call i on replica i mod
/// `replicas`, see [`interleaved`]): runs of `replicas` consecutive calls share a key, so every
/// key is asked of every replica. (`i % keys` would send key k only to replica k mod `replicas`
/// whenever `replicas` divides `keys`, and no flight would ever cross replicas.)
fn spread_key(i: usize, replicas: usize, keys: usize) -> usize {
    (i / replicas.max(1)) % keys.max(1)
}

/// Starts `n` brokers with `cmd` on `spec`.
async fn start_all(
    cmd: &BrokerCommand,
    spec: &ConfigSpec,
    n: usize,
    pin: Option<usize>,
) -> anyhow::Result<Vec<Broker>> {
    let mut brokers = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        brokers.push(Broker::start(cmd, spec, pin).await?);
    }
    Ok(brokers)
}

/// `total` connections spread evenly over `brokers`, interleaved (connection i on broker i mod n),
/// so a round-robin batch alternates replicas.
async fn interleaved(brokers: &[Broker], total: usize) -> anyhow::Result<Vec<Channel>> {
    let per = total.div_ceil(brokers.len().max(1)).max(1);
    let mut each = Vec::with_capacity(brokers.len());
    for broker in brokers {
        each.push(connect(broker.addr, per).await?);
    }
    let mut channels = Vec::with_capacity(per * brokers.len());
    for i in 0..per {
        for list in &each {
            channels.push(list[i].clone());
        }
    }
    Ok(channels)
}

async fn stop_all(brokers: Vec<Broker>) {
    for broker in brokers {
        broker.stop().await;
    }
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &FleetArgs) -> anyhow::Result<Vec<Table>> {
    let redis = RedisServer::start(&a.redis_server).await?;
    let mut tables = Vec::new();
    if a.parts.contains(&Part::Storm) {
        tables.push(storm(ctx, a, &redis).await?);
    }
    if a.parts.contains(&Part::RoundTrips) {
        tables.push(round_trips(ctx, a, &redis).await?);
    }
    if !a.parts.contains(&Part::Rounds) {
        redis.stop().await;
        return Ok(tables);
    }
    let pin = !a.no_pin && nproc() >= 2;
    let restore = if pin {
        let original = current_affinity()?;
        pin_self(&a.generator_core.to_string())?;
        Some(original)
    } else {
        None
    };
    let rounds = memory_vs_fleet(ctx, a, &redis, pin).await;
    if let Some(original) = restore {
        pin_self(&original)?;
    }
    tables.extend(rounds?);
    redis.stop().await;
    Ok(tables)
}

// --- 1. The storm ------------------------------------------------------------------------------

struct StormRun {
    mode: &'static str,
    run: &'static str,
    recorder: Recorder,
    upstream_calls: u64,
    wall: Duration,
    store_down_seen: bool,
}

/// The metrics addresses of `brokers`.
fn metrics_addrs(brokers: &[Broker]) -> Vec<std::net::SocketAddr> {
    brokers.iter().map(|b| b.metrics_addr).collect()
}

fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

async fn storm(ctx: &Ctx, a: &FleetArgs, redis: &RedisServer) -> anyhow::Result<Table> {
    let upstream = Upstream::start(UpstreamOptions {
        request_delay: Duration::from_millis(a.upstream_latency_ms),
        ..UpstreamOptions::default()
    })
    .await?;
    let spec = ConfigSpec::delegation(vec![upstream.url.clone()]);
    let keys = a.keys.max(1);
    let deadline = Duration::from_secs(a.deadline_seconds.max(1));
    let mut runs = Vec::new();
    for (mode, redis_url, prefix) in [
        ("fleet (redis)", Some(redis.url()), "fleet"),
        ("memory (each replica alone)", None, "memory"),
    ] {
        let cmd = command(&ctx.broker, redis_url.as_deref(), "bench-storm:", a);
        let brokers = start_all(&cmd, &spec, a.replicas, None).await?;
        let channels = interleaved(&brokers, a.connections).await?;
        let rpcs: Vec<Rpc> = (0..a.calls)
            .map(|i| Rpc::request_proxy(exchange_id(prefix, spread_key(i, a.replicas, keys))))
            .collect();
        for run in ["cold storm", "same storm, warm"] {
            progress(&format!("fleet: storm, {mode}, {run} ({} calls)", rpcs.len()));
            let before = upstream.counters.requests();
            let watch = StoreUpWatch::start(metrics_addrs(&brokers))?;
            let started = Instant::now();
            let recorder = batch(&channels, rpcs.clone(), usize::MAX, deadline).await;
            let wall = started.elapsed();
            runs.push(StormRun {
                mode,
                run,
                wall,
                upstream_calls: upstream.counters.requests() - before,
                recorder,
                store_down_seen: watch.finish(),
            });
        }
        stop_all(brokers).await;
    }
    let mut table = Table::new(
        format!(
            "fleet: storm of {} concurrent RequestProxy over {} cold keys split over {} replicas, upstream {} ms",
            count(a.calls as u64),
            count(keys as u64),
            a.replicas,
            a.upstream_latency_ms
        ),
        &[
            "mode",
            "run",
            "calls",
            "OK",
            "errors by code",
            "upstream calls",
            "wall time",
            "p50",
            "p99",
            "answers by source",
            "store_up 0 seen",
        ],
    );
    for r in &mut runs {
        let s = summarize(&mut r.recorder.micros);
        table.row([
            r.mode.to_owned(),
            r.run.to_owned(),
            count(r.recorder.calls()),
            count(r.recorder.ok()),
            r.recorder.errors_text(),
            count(r.upstream_calls),
            ms(r.wall),
            ms(s.p50),
            ms(s.p99),
            r.recorder.sources_text(),
            if r.mode.starts_with("memory") {
                "n/a".into()
            } else {
                yes_no(r.store_down_seen)
            },
        ]);
    }
    table
        .note(format!(
            "{} HTTP/2 connections alternating over the replicas, every call started at once with a {} s deadline; \
             keys fleet000000.. / memory000000.. (no budget), each asked of every replica; each mode on fresh replicas; Redis {} on loopback, \
             persistence off; operation_timeout_ms {}",
            a.connections,
            deadline.as_secs(),
            redis.addr,
            a.operation_timeout_ms.map_or("50 (default)".into(), |t| t.to_string())
        ))
        .note(format!(
            "goal (issue 10): the fleet's cold storm makes {} upstream calls (one per key for the fleet) with 0 errors; \
             memory replicas make up to {} (one per key per replica)",
            keys.min(a.calls),
            keys.min(a.calls) * a.replicas.max(1)
        ));
    Ok(table)
}

// --- 4. Round-trips per request ------------------------------------------------------------------

/// One kind of request whose Redis cost is counted.
struct Kind {
    name: &'static str,
    rpcs: Vec<Rpc>,
    /// Calls in flight at once.
    concurrency: usize,
    /// Calls to make before counting (to fill caches).
    warm: Vec<Rpc>,
}

async fn round_trips(ctx: &Ctx, a: &FleetArgs, redis: &RedisServer) -> anyhow::Result<Table> {
    let upstream = Upstream::start(UpstreamOptions {
        request_delay: Duration::from_millis(a.upstream_latency_ms),
        ..UpstreamOptions::default()
    })
    .await?;
    let relay = CountingRelay::start(redis.addr)?;
    let spec = ConfigSpec::delegation(vec![upstream.url.clone()]);
    let cmd = command(&ctx.broker, Some(&relay.url()), "bench-rt:", a);
    let brokers = start_all(&cmd, &spec, a.replicas, None).await?;
    let channels = interleaved(&brokers, a.replicas.max(1) * 4).await?;
    let n = a.round_trip_calls.max(1);
    let timeout = Duration::from_secs(a.deadline_seconds.max(1));
    let cold_keys = a.keys.max(1);
    let kinds = vec![
        Kind {
            name: "cache hit, exchange without a budget (kucoin)",
            rpcs: vec![Rpc::request_proxy(UNBUDGETED); n],
            concurrency: 8,
            warm: vec![Rpc::request_proxy(UNBUDGETED); a.replicas.max(1) * 2],
        },
        Kind {
            name: "hand-out with a budget (bench: check-and-count)",
            rpcs: vec![Rpc::request_proxy(BUDGETED); n],
            concurrency: 8,
            warm: vec![Rpc::request_proxy(BUDGETED); a.replicas.max(1) * 2],
        },
        Kind {
            name: "storm over cold keys (one upstream call per key)",
            rpcs: (0..n.max(cold_keys))
                .map(|i| Rpc::request_proxy(exchange_id("rt", spread_key(i, a.replicas, cold_keys))))
                .collect(),
            concurrency: usize::MAX,
            warm: Vec::new(),
        },
        Kind {
            name: "ReportFeedback, success",
            rpcs: vec![Rpc::feedback(format!("socks5://{BUDGETED}.proxy.test:1080"), BUDGETED, true); n],
            concurrency: 8,
            warm: Vec::new(),
        },
    ];
    // What the replicas send while idle (probes, sweeps), to tell apart from the requests'.
    let idle = Duration::from_secs(2);
    let (relay0, t0) = (relay.commands(), Instant::now());
    tokio::time::sleep(idle).await;
    let idle_per_second = (relay.commands() - relay0) as f64 / t0.elapsed().as_secs_f64();

    let mut table = Table::new(
        format!(
            "fleet: Redis round-trips per request ({} replicas, {} calls of each kind)",
            a.replicas,
            count(n as u64)
        ),
        &[
            "request",
            "calls",
            "errors",
            "upstream calls",
            "store_up 0 seen",
            "commands sent by the brokers per call",
            "commands run by Redis per call",
            "most run (per call)",
        ],
    );
    for kind in kinds {
        progress(&format!("fleet: round-trips, {}", kind.name));
        if !kind.warm.is_empty() {
            batch(&channels, kind.warm, 1, timeout).await;
        }
        let (total0, stats0) = redis.command_counts().await?;
        let sent0 = relay.commands();
        let upstream0 = upstream.counters.requests();
        let calls = kind.rpcs.len();
        let watch = StoreUpWatch::start(metrics_addrs(&brokers))?;
        let recorder = batch(&channels, kind.rpcs, kind.concurrency, timeout).await;
        let store_down_seen = watch.finish();
        let sent = relay.commands() - sent0;
        let upstream_calls = upstream.counters.requests() - upstream0;
        let (total1, stats1) = redis.command_counts().await?;
        // The two INFO commands of each reading are counted by Redis too.
        let run = total1.saturating_sub(total0).saturating_sub(2);
        let mut delta: Vec<(String, u64)> = stats1
            .iter()
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, &c)| (name.clone(), c - stats0.get(name).copied().unwrap_or(0)))
            .filter(|(_, c)| *c > 0)
            .collect();
        delta.sort_by_key(|x| std::cmp::Reverse(x.1));
        let top: Vec<String> = delta
            .iter()
            .take(6)
            .map(|(name, c)| format!("{name} {:.2}", *c as f64 / calls as f64))
            .collect();
        table.row([
            kind.name.to_owned(),
            count(calls as u64),
            count(recorder.errors()),
            count(upstream_calls),
            yes_no(store_down_seen),
            format!("{:.2}", sent as f64 / calls as f64),
            format!("{:.2}", run as f64 / calls as f64),
            if top.is_empty() {
                "none".to_owned()
            } else {
                top.join(", ")
            },
        ]);
    }
    stop_all(brokers).await;
    table
        .note(
            "commands sent: RESP commands the replicas wrote, counted by a loopback relay between them and Redis \
             (each is one request on a multiplexed connection; a script is one EVALSHA); commands run: Redis's \
             total_commands_processed, which also counts the commands inside scripts; per-command figures from \
             INFO commandstats",
        )
        .note(format!(
            "idle replicas sent {idle_per_second:.1} commands/s in all (measured over {} s before the rows; not subtracted)",
            idle.as_secs()
        ))
        .note(
            "kinds in turn on the same replicas, calls alternating over them; hits after one warm-up call per replica; \
             the storm row: every call at once over cold keys rt000000..",
        );
    Ok(table)
}

// --- 2 and 3. Memory vs fleet, ABBA ----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Memory,
    Fleet,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Memory => "memory",
            Mode::Fleet => "fleet (redis)",
        }
    }
}

/// A workload measured in both modes.
struct Workload {
    name: &'static str,
    exchange: &'static str,
    connections: usize,
    streams: usize,
}

#[derive(Debug)]
struct Round {
    workload: usize,
    mode: Mode,
    calls: u64,
    errors: u64,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    server_us_per_call: f64,
    sources: String,
    store_down_seen: bool,
}

async fn memory_vs_fleet(
    ctx: &Ctx,
    a: &FleetArgs,
    redis: &RedisServer,
    pin: bool,
) -> anyhow::Result<Vec<Table>> {
    let upstream = Upstream::start(UpstreamOptions::default()).await?;
    let spec = ConfigSpec::delegation(vec![upstream.url.clone()]);
    let core = pin.then_some(a.server_core);
    let memory = Broker::start(&command(&ctx.broker, None, "", a), &spec, core).await?;
    let fleet = Broker::start(
        &command(&ctx.broker, Some(&redis.url()), "bench-abba:", a),
        &spec,
        core,
    )
    .await?;
    let workloads = [
        Workload {
            name: "cache hit, no budget (kucoin), loaded",
            exchange: UNBUDGETED,
            connections: a.hit_connections,
            streams: a.hit_streams,
        },
        Workload {
            name: "budgeted hand-out (bench), loaded",
            exchange: BUDGETED,
            connections: a.hit_connections,
            streams: a.hit_streams,
        },
        Workload {
            name: "cache hit, no budget (kucoin), one call at a time",
            exchange: UNBUDGETED,
            connections: 1,
            streams: 1,
        },
        Workload {
            name: "budgeted hand-out (bench), one call at a time",
            exchange: BUDGETED,
            connections: 1,
            streams: 1,
        },
    ];
    let timeout = Duration::from_secs(5);
    let round = Duration::from_secs_f64(a.round_seconds.clamp(0.5, 60.0));
    let mut rounds = Vec::new();
    for (w, workload) in workloads.iter().enumerate() {
        let rpc = Rpc::request_proxy(workload.exchange);
        let mut channels = BTreeMap::new();
        for (mode, broker) in [(Mode::Memory, &memory), (Mode::Fleet, &fleet)] {
            let list = connect(broker.addr, workload.connections).await?;
            // Fill the cache; the second answer must be a hit.
            let mut stub = Stub::new(list[0].clone());
            stub.call(&rpc, timeout).await?;
            let second = stub.call(&rpc, timeout).await?;
            ensure!(
                second.source == Some(ProxySource::Cache),
                "{}: the second RequestProxy was not a cache hit ({:?})",
                mode.name(),
                second.source
            );
            progress(&format!(
                "fleet: {} — {} warm-up (1 s)",
                workload.name,
                mode.name()
            ));
            closed_loop(
                &list,
                workload.streams,
                &rpc,
                Duration::from_secs(1),
                a.max_calls_per_round,
                timeout,
            )
            .await;
            channels.insert(mode.name(), list);
        }
        for pair in 0..a.pairs.max(1) {
            let order = if pair % 2 == 0 {
                [Mode::Memory, Mode::Fleet]
            } else {
                [Mode::Fleet, Mode::Memory]
            };
            for mode in order {
                progress(&format!(
                    "fleet: {} — pair {} {}",
                    workload.name,
                    pair + 1,
                    mode.name()
                ));
                let broker = if mode == Mode::Memory { &memory } else { &fleet };
                let server0 = broker.cpu_ticks()?;
                let watch = (mode == Mode::Fleet)
                    .then(|| StoreUpWatch::start(vec![broker.metrics_addr]))
                    .transpose()?;
                let started = Instant::now();
                let mut recorder = closed_loop(
                    &channels[mode.name()],
                    workload.streams,
                    &rpc,
                    round,
                    a.max_calls_per_round,
                    timeout,
                )
                .await;
                let wall = started.elapsed().as_secs_f64();
                let store_down_seen = watch.is_some_and(StoreUpWatch::finish);
                let server_s = (broker.cpu_ticks()? - server0) as f64 / ctx.clock_ticks as f64;
                let summary = summarize(&mut recorder.micros);
                rounds.push(Round {
                    workload: w,
                    mode,
                    calls: recorder.calls(),
                    errors: recorder.errors(),
                    per_second: recorder.ok() as f64 / wall,
                    p50: summary.p50,
                    p99: summary.p99,
                    server_us_per_call: server_s * 1e6 / recorder.calls().max(1) as f64,
                    sources: recorder.sources_text(),
                    store_down_seen,
                });
            }
        }
    }
    let redis_cpu = redis
        .pid()
        .and_then(|pid| cpu_ticks_of(&format!("/proc/{pid}/stat")).ok());
    memory.stop().await;
    fleet.stop().await;

    let pick = |w: usize, mode: Mode, f: fn(&Round) -> f64| -> f64 {
        median(
            &rounds
                .iter()
                .filter(|r| r.workload == w && r.mode == mode)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let mut summary = Table::new(
        "fleet: one fleet replica against one memory broker (median of rounds)",
        &[
            "workload",
            "memory req/s",
            "fleet req/s",
            "fleet / memory",
            "memory p50",
            "fleet p50",
            "added p50",
            "memory p99",
            "fleet p99",
            "added p99",
            "broker CPU per call memory / fleet",
        ],
    );
    let secs = |r: &Round| r.p50.as_secs_f64();
    let secs99 = |r: &Round| r.p99.as_secs_f64();
    for (w, workload) in workloads.iter().enumerate() {
        let (m, f) = (
            pick(w, Mode::Memory, |r| r.per_second),
            pick(w, Mode::Fleet, |r| r.per_second),
        );
        let (m50, f50) = (pick(w, Mode::Memory, secs), pick(w, Mode::Fleet, secs));
        let (m99, f99) = (pick(w, Mode::Memory, secs99), pick(w, Mode::Fleet, secs99));
        let (mc, fc) = (
            pick(w, Mode::Memory, |r| r.server_us_per_call),
            pick(w, Mode::Fleet, |r| r.server_us_per_call),
        );
        let d = |s: f64| ms(Duration::from_secs_f64(s.max(0.0)));
        let added = |f: f64, m: f64| {
            let sign = if f >= m { "+" } else { "−" };
            format!("{sign}{}", d((f - m).abs()))
        };
        summary.row([
            workload.name.to_owned(),
            count(m.round() as u64),
            count(f.round() as u64),
            format!("{:.2}", f / m),
            d(m50),
            d(f50),
            added(f50, m50),
            d(m99),
            d(f99),
            added(f99, m99),
            format!("{mc:.1} / {fc:.1} µs"),
        ]);
    }
    let placement = if pin {
        format!(
            "both brokers pinned to core {} (`taskset -c {}`), generator (one thread) to core {}; redis-server not pinned",
            a.server_core, a.server_core, a.generator_core
        )
    } else {
        "not pinned: brokers, generator and redis-server share every core".to_owned()
    };
    summary
        .note(format!(
            "{placement}; loaded: {} connections × {} calls in flight; one at a time: 1 connection × 1 call; {} rounds \
             of {:.1} s per workload alternating memory/fleet ABBA, after 1 s of warm-up each",
            a.hit_connections,
            a.hit_streams,
            a.pairs.max(1) * 2,
            round.as_secs_f64()
        ))
        .note(format!(
            "bench: brokering.exchanges.bench.websocket {{attempts: {}, per_seconds: {}}}; kucoin: no budget \
             (no built-in one); the fleet replica's store: Redis {} on loopback, operation_timeout_ms {}",
            a.budget_attempts,
            a.budget_per_seconds,
            redis.addr,
            a.operation_timeout_ms.map_or("50 (default)".into(), |t| t.to_string())
        ))
        .note(
            "goal (issue 10): cache-hit throughput fleet / memory ≥ 0.9. Added latency = fleet − memory of the \
             medians of the rounds' p50 and p99",
        );
    if let Some(ticks) = redis_cpu {
        summary.note(format!(
            "redis-server CPU time over the whole scenario: {:.1} s",
            ticks as f64 / ctx.clock_ticks as f64
        ));
    }
    let mut detail = Table::new(
        "fleet: memory vs fleet rounds",
        &[
            "workload",
            "mode",
            "calls",
            "errors",
            "req/s",
            "p50",
            "p99",
            "broker CPU per call",
            "answers by source",
            "store_up 0 seen",
        ],
    );
    for r in &rounds {
        detail.row([
            workloads[r.workload].name.to_owned(),
            r.mode.name().to_owned(),
            count(r.calls),
            count(r.errors),
            count(r.per_second.round() as u64),
            ms(r.p50),
            ms(r.p99),
            format!("{:.1} µs", r.server_us_per_call),
            r.sources.clone(),
            match r.mode {
                Mode::Memory => "n/a".into(),
                Mode::Fleet => yes_no(r.store_down_seen),
            },
        ]);
    }
    Ok(vec![summary, detail])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_storm_is_asked_of_every_replica() {
        // (replicas, keys, calls)
        for (replicas, keys, calls) in [(2, 100, 10_000), (2, 10, 200), (3, 100, 1_000), (1, 7, 70)] {
            let mut seen = vec![std::collections::BTreeSet::new(); keys];
            for i in 0..calls {
                seen[spread_key(i, replicas, keys)].insert(i % replicas);
            }
            assert!(
                seen.iter().all(|r| r.len() == replicas),
                "{replicas} replicas, {keys} keys: {seen:?}"
            );
        }
    }
}
