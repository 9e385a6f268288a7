//! `hit-cost`: the instructions the broker executes per cached `RequestProxy` and per
//! `grpc.health.v1.Health/Check`, counted by valgrind's callgrind.
//!
//! `hit-vs-health` measures the goal (throughput on a pinned core), but on a noisy 2-core VM
//! one pair of its rounds moves by ±15 %, more than the difference it looks for. An instruction
//! count does not depend on how fast the machine runs at the moment. What still moves it is how
//! calls share the server's wake-ups and writes (more in flight at once, fewer instructions per
//! call): rounds of one kind differ by up to about 5 %, the median ratio of two runs by about 1 %.
//! A handler's own inclusive count (`--dumps`, then `callgrind_annotate --inclusive=yes`) repeats
//! to within a few instructions. It is the broker's own work (user space, every thread), not a
//! throughput: cache misses, the kernel's share of a call (a syscall counts as one instruction)
//! and lock waits are not in it.
//!
//! The broker runs under `valgrind --tool=callgrind` (about 50 times slower); `callgrind_control`
//! zeroes the counters before each round and dumps them after it, while the generator is idle, so
//! a round's count is that round's calls plus the little the broker does on its own meanwhile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use proxy_broker_client::pb::ProxySource;

use super::hit_vs_health::Kind;
use super::{Ctx, progress};
use crate::broker::{Broker, BrokerCommand};
use crate::config::ConfigSpec;
use crate::load::{Rpc, Stub, closed_loop, connect};
use crate::stats::{count, median};
use crate::table::Table;
use crate::upstream::{Upstream, UpstreamOptions};

/// Options of `hit-cost`.
#[derive(Debug, Clone, Parser)]
pub struct HitCostArgs {
    /// A/B pairs; each pair is one round of cache hits and one of health checks.
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Calls per round.
    #[arg(long, default_value_t = 20_000)]
    pub calls: u64,
    /// Calls of each kind before the first round (pools, caches and buffers reach their size).
    #[arg(long, default_value_t = 4_000)]
    pub warm_up: u64,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 32)]
    pub streams: usize,
    /// Keep callgrind's dumps (one per round, for `callgrind_annotate`) in this directory instead
    /// of a temporary one; it must be empty or not exist.
    #[arg(long)]
    pub dumps: Option<PathBuf>,
}

#[derive(Debug)]
struct Round {
    kind: Kind,
    calls: u64,
    errors: u64,
    instructions: u64,
}

impl Round {
    fn per_call(&self) -> f64 {
        self.instructions as f64 / self.calls.max(1) as f64
    }
}

/// Longest one round may take under callgrind (20,000 calls take about 30 s on the VM of
/// BENCHMARKS.md); the loop stops at its call count long before.
const ROUND_LIMIT: Duration = Duration::from_secs(900);
/// One call's deadline: a call waits behind up to connections × streams others, 50 times slower.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &HitCostArgs) -> anyhow::Result<Vec<Table>> {
    for tool in ["valgrind", "callgrind_control"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        ensure!(
            found,
            "`{tool} --version` failed: hit-cost needs valgrind (Debian package `valgrind`)"
        );
    }
    let temporary = tempfile::tempdir().context("creating a temporary directory for callgrind")?;
    let dir = match &a.dumps {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            ensure!(
                dumps(dir)?.is_empty(),
                "{} already holds callgrind dumps",
                dir.display()
            );
            std::path::absolute(dir)?
        }
        None => temporary.path().to_owned(),
    };
    let wrapper = write_wrapper(&dir, &ctx.broker.path)?;
    let cmd = BrokerCommand {
        path: wrapper,
        ..ctx.broker.clone()
    };

    let upstream = Upstream::start(UpstreamOptions::default()).await?;
    let spec = ConfigSpec::delegation(vec![upstream.url.clone()]);
    progress("hit-cost: starting the broker under callgrind");
    let broker = Broker::start(&cmd, &spec, None).await?;
    let result = measure(a, &broker, &dir).await;
    broker.stop().await;
    let rounds = result?;
    Ok(vec![tables(a, &rounds)])
}

/// A shell script that runs the broker under callgrind with the arguments it is given; `exec`
/// keeps the process id, so the bench's pid is valgrind's (the broker's).
fn write_wrapper(dir: &Path, broker: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;

    let out = dir.join("callgrind.out");
    let log = dir.join("valgrind.log");
    let script = format!(
        "#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file='{}' --log-file='{}' -- '{}' \"$@\"\n",
        out.display(),
        log.display(),
        broker.display()
    );
    ensure!(
        !format!("{}{}", dir.display(), broker.display()).contains('\''),
        "paths with a single quote are not supported: {}",
        broker.display()
    );
    let path = dir.join("broker-under-callgrind.sh");
    std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

async fn measure(a: &HitCostArgs, broker: &Broker, dir: &Path) -> anyhow::Result<Vec<Round>> {
    let channels = connect(broker.addr, a.connections).await?;
    // As in hit-vs-health: an exchange without a connection-attempt budget, and the lean call
    // (the same request on the wire) for the measured hits.
    let full = Rpc::request_proxy("kucoin");
    let hit = Rpc::lean_request_proxy("kucoin");
    let mut stub = Stub::new(channels[0].clone());
    stub.call(&full, CALL_TIMEOUT).await?;
    for rpc in [&full, &hit] {
        let answer = stub.call(rpc, CALL_TIMEOUT).await?;
        ensure!(
            answer.source == Some(ProxySource::Cache),
            "the second RequestProxy was not a cache hit ({:?})",
            answer.source
        );
    }
    progress("hit-cost: warm-up");
    for rpc in [&hit, &Rpc::HealthCheck] {
        closed_loop(&channels, a.streams, rpc, ROUND_LIMIT, a.warm_up, CALL_TIMEOUT).await;
    }
    let mut rounds = Vec::new();
    for pair in 0..a.pairs.max(1) {
        for kind in Kind::abba(pair) {
            progress(&format!("hit-cost: pair {} {}", pair + 1, kind.name()));
            let rpc = match kind {
                Kind::Hit => &hit,
                Kind::Health => &Rpc::HealthCheck,
            };
            callgrind_control(broker.pid, "--zero")?;
            let recorder = closed_loop(&channels, a.streams, rpc, ROUND_LIMIT, a.calls, CALL_TIMEOUT).await;
            let before = dumps(dir)?;
            callgrind_control(broker.pid, "--dump")?;
            let dump = new_dump(dir, &before).await?;
            let instructions = instructions_of(&std::fs::read_to_string(&dump)?)
                .with_context(|| format!("no `summary:` or `totals:` line in {}", dump.display()))?;
            rounds.push(Round {
                kind,
                calls: recorder.calls(),
                errors: recorder.errors(),
                instructions,
            });
        }
    }
    Ok(rounds)
}

fn callgrind_control(pid: u32, action: &str) -> anyhow::Result<()> {
    let output = Command::new("callgrind_control")
        .arg(action)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    if !output.status.success() {
        bail!(
            "callgrind_control {action} {pid} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The dump files callgrind has written so far.
fn dumps(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_dump = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("callgrind.out"));
        if is_dump {
            files.push(path);
        }
    }
    Ok(files)
}

/// The dump that appeared after `before`, once callgrind has finished writing it (its totals line
/// comes last).
async fn new_dump(dir: &Path, before: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for path in dumps(dir)? {
            if !before.contains(&path)
                && std::fs::read_to_string(&path).is_ok_and(|text| instructions_of(&text).is_some())
            {
                return Ok(path);
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "callgrind wrote no new dump in {} within 60 s",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Instructions executed (the first event, `Ir`) of a callgrind dump: its `summary:` line, else
/// its `totals:` line.
fn instructions_of(dump: &str) -> Option<u64> {
    let line = |prefix: &str| {
        dump.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    line("summary:").or_else(|| line("totals:"))
}

fn tables(a: &HitCostArgs, rounds: &[Round]) -> Table {
    let of = |kind: Kind| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r.kind == kind)
            .map(Round::per_call)
            .collect()
    };
    let (hits, health) = (of(Kind::Hit), of(Kind::Health));
    let (h, g) = (median(&hits), median(&health));
    let mut table = Table::new(
        "hit-cost: instructions the broker executes per call (callgrind)",
        &["", Kind::Hit.name(), Kind::Health.name(), "hit / health"],
    );
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| count(x.round() as u64))
            .collect::<Vec<_>>()
            .join(", ")
    };
    table.row([
        "per call, each round".to_owned(),
        show(&hits),
        show(&health),
        String::new(),
    ]);
    table.row([
        "per call, median".to_owned(),
        count(h.round() as u64),
        count(g.round() as u64),
        format!("{:.3}", h / g.max(1e-9)),
    ]);
    let errors: u64 = rounds.iter().map(|r| r.errors).sum();
    table
        .note(format!(
            "{} rounds of {} calls (ABBA) after {} calls of each as warm-up; {} connections × {} calls in flight; {} errors",
            rounds.len(),
            count(a.calls),
            count(a.warm_up),
            a.connections,
            a.streams,
            count(errors)
        ))
        .note(
            "instructions of every broker thread in user space between callgrind_control --zero and --dump, \
             whatever the machine is doing; rounds of one kind differ by up to about 5 % (how calls share \
             wake-ups and writes), so compare medians or a handler's inclusive count (--dumps, \
             callgrind_annotate --inclusive=yes). hit / health is the cost ratio of the broker's own code; \
             the issue's goal (throughput ≥ 0.95 × health) is hit-vs-health's",
        );
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_come_from_the_summary_or_the_totals_line() {
        let dump = "version: 1\nevents: Ir\nfn=main\n1 5\nsummary: 123456\n";
        assert_eq!(instructions_of(dump), Some(123_456));
        assert_eq!(instructions_of("events: Ir Dr\ntotals: 77 3\n"), Some(77));
        assert_eq!(instructions_of("events: Ir\nfn=main\n"), None);
    }
}
