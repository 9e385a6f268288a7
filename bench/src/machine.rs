//! The machine and binary a run measured, printed above the tables; and CPU pinning.

use std::fmt::Write as _;
use std::process::Stdio;

use crate::broker::BrokerCommand;

/// nproc, CPU model, kernel, load average, the broker binary and the extra environment.
pub fn describe(broker: &BrokerCommand) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let modified = std::fs::metadata(&broker.path)
        .and_then(|m| m.modified())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut out = String::new();
    let _ = writeln!(out, "## proxy-broker-bench\n");
    let _ = writeln!(
        out,
        "- machine: {} cores ({model}), Linux {}",
        nproc(),
        kernel.trim()
    );
    let _ = writeln!(
        out,
        "- load average at start: {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(out, "- broker: `{}` (built {modified})", broker.path.display());
    if !broker.env.is_empty() {
        let env: Vec<String> = broker.env.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
        let _ = writeln!(out, "- broker environment: {}", env.join(", "));
    }
    if let Some(log) = &broker.log {
        let _ = writeln!(out, "- broker RUST_LOG: `{log}`");
    }
    out
}

/// CPUs this process may run on.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Pins every thread of this process to `cpus` (a taskset list such as "1" or "0-1"), with
/// util-linux `taskset` rather than `sched_setaffinity`, which needs `unsafe` (forbidden in this
/// workspace). Threads started later inherit it.
pub fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| anyhow::anyhow!("running taskset (util-linux): {e}"))?;
    anyhow::ensure!(status.success(), "taskset -a -p -c {cpus} failed: {status}");
    Ok(())
}

/// This process's CPU list as taskset prints it ("0,1"), to restore after [`pin_self`].
pub fn current_affinity() -> anyhow::Result<String> {
    let output = std::process::Command::new("taskset")
        .args(["-c", "-p", &std::process::id().to_string()])
        .output()
        .map_err(|e| anyhow::anyhow!("running taskset (util-linux): {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.rsplit_once(": ")
        .map(|(_, list)| list.trim().to_owned())
        .filter(|list| !list.is_empty())
        .ok_or_else(|| anyhow::anyhow!("unexpected taskset output '{}'", text.trim()))
}
