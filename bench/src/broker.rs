//! The real broker binary as a child process on loopback ports, with what the scenarios read
//! from it: start-up time, memory and CPU time from `/proc/<pid>`, `/metrics`, admin RPCs.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use proxy_broker_client::pb::proxy_broker_admin_client::ProxyBrokerAdminClient;
use proxy_broker_client::pb::{FeedbackStats, ListUpstreamsRequest};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::ConfigSpec;

/// Longest a start-up may take before the scenario gives up.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);
/// Longest a SIGTERM'd broker may take to exit before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// How to run the broker, shared by every scenario.
#[derive(Debug, Clone)]
pub struct BrokerCommand {
    /// The `proxy-broker` binary.
    pub path: PathBuf,
    /// Extra environment (e.g. settings today's config file would reject).
    pub env: Vec<(String, String)>,
    /// `RUST_LOG` for the broker; None leaves its default (`info`).
    pub log: Option<String>,
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS), KiB.
    pub hwm_kib: u64,
}

/// A running broker. Killed when dropped (use [`Broker::stop`] for a clean exit).
#[derive(Debug)]
pub struct Broker {
    child: Child,
    /// Process id (also when started through `taskset`, which execs the broker).
    pub pid: u32,
    /// gRPC address.
    pub addr: SocketAddr,
    /// `/metrics` address.
    pub metrics_addr: SocketAddr,
    /// From spawn to the first SERVING health answer.
    pub started_in: Duration,
    /// A channel opened by the start-up probe.
    pub channel: Channel,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Two free loopback ports, bound and released: another process may take one before the broker
/// binds it, which [`Broker::start`] answers by starting again on new ports.
fn free_ports() -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?, b.local_addr()?))
}

impl Broker {
    /// Writes the configuration for `spec`, spawns the broker (on `pin_core` via `taskset` when
    /// given) and waits until it answers health checks SERVING. A start that fails because a
    /// port picked for it was taken meanwhile is made again on new ports (at most 4 starts).
    pub async fn start(
        cmd: &BrokerCommand,
        spec: &ConfigSpec,
        pin_core: Option<usize>,
    ) -> anyhow::Result<Self> {
        let mut starts = 1;
        loop {
            match Self::start_once(cmd, spec, pin_core).await {
                Err(e) if starts < 4 && format!("{e:#}").contains("cannot bind") => starts += 1,
                result => return result,
            }
        }
    }

    async fn start_once(
        cmd: &BrokerCommand,
        spec: &ConfigSpec,
        pin_core: Option<usize>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a temporary directory for the broker")?;
        let (addr, metrics_addr) = free_ports()?;
        let config_path = dir.path().join("broker.yaml");
        let config = spec.render(addr, metrics_addr);
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let log_path = dir.path().join("broker.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = match pin_core {
            Some(core) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(core.to_string()).arg(&cmd.path);
                c
            }
            None => Command::new(&cmd.path),
        };
        command
            .arg("--config")
            .arg(&config_path)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(level) = &cmd.log {
            command.env("RUST_LOG", level);
        }
        for (k, v) in &cmd.env {
            command.env(k, v);
        }
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", cmd.path.display()))?;
        let pid = child.id().context("the broker exited at once")?;
        let channel = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the broker exited during start-up ({status}); its log:\n{}",
                    tail(&log_path)
                );
            }
            if spawned.elapsed() > STARTUP_LIMIT {
                bail!(
                    "the broker did not answer health checks within {STARTUP_LIMIT:?}; its log:\n{}",
                    tail(&log_path)
                );
            }
            if let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(1), probe(addr)).await {
                break channel;
            }
            // Poll interval; STARTUP_LIMIT bounds the wait. Small, so start-up time is precise.
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        Ok(Self {
            started_in: spawned.elapsed(),
            child,
            pid,
            addr,
            metrics_addr,
            channel,
            log_path,
            _dir: dir,
        })
    }

    /// `VmRSS` and `VmHWM` now.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        parse_status(&text).context("VmRSS/VmHWM missing from /proc/<pid>/status")
    }

    /// User + system CPU time used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> anyhow::Result<u64> {
        cpu_ticks_of(&format!("/proc/{}/stat", self.pid))
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.metrics_addr);
        let client = reqwest::Client::builder().no_proxy().build()?;
        let response = client.get(&url).timeout(Duration::from_secs(5)).send().await?;
        Ok(response.error_for_status()?.text().await?)
    }

    /// `ListUpstreams.feedback`.
    pub async fn feedback_stats(&self) -> anyhow::Result<FeedbackStats> {
        let mut request = tonic::Request::new(ListUpstreamsRequest {});
        request.set_timeout(Duration::from_secs(5));
        let answer = ProxyBrokerAdminClient::new(self.channel.clone())
            .list_upstreams(request)
            .await?
            .into_inner();
        Ok(answer.feedback.unwrap_or_default())
    }

    /// Polls until the feedback queue is empty, at most `within`; returns whether it emptied.
    pub async fn wait_feedback_drained(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.feedback_stats().await.is_ok_and(|s| s.queued == 0) {
                return true;
            }
            // Poll interval; `within` bounds the wait.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// SIGTERM, then waits (bounded) for the exit; kills it if it does not exit in time.
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(status) => eprintln!(
                "[bench] the broker exited with {status:?} after SIGTERM; its log:\n{}",
                tail(&self.log_path)
            ),
            Err(_) => {
                eprintln!("[bench] the broker did not exit within {STOP_LIMIT:?} of SIGTERM; killing it");
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
            }
        }
    }
}

/// One health check on a fresh connection; the channel when SERVING.
async fn probe(addr: SocketAddr) -> anyhow::Result<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await?;
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status();
    if status == ServingStatus::Serving {
        Ok(channel)
    } else {
        bail!("health is {status:?}")
    }
}

/// The last lines of the broker's log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `VmRSS` and `VmHWM` from the text of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// utime + stime (fields 14 and 15) from the text of `/proc/<pid>/stat`. The command name (field
/// 2) may contain spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_cpu(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field n is at index n - 3.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks used by the process whose `stat` file is `path`.
pub fn cpu_ticks_of(path: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    parse_stat_cpu(&text).with_context(|| format!("cannot parse {path}"))
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when getconf is missing).
pub fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// The sum of every sample of metric `name` (any labels) in an OpenMetrics/Prometheus text;
/// None when no sample has that name.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `name{...} v` or `name v`, not `name_other v`.
        let value = match rest.chars().next() {
            Some('{') => rest.rsplit_once('}').map(|(_, v)| v),
            Some(' ') => Some(rest),
            _ => None,
        };
        if let Some(v) = value
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_stat_are_parsed() {
        let status = "Name:\tproxy-broker\nVmHWM:\t   20480 kB\nVmRSS:\t   14848 kB\n";
        assert_eq!(
            parse_status(status),
            Some(Memory {
                rss_kib: 14848,
                hwm_kib: 20480
            })
        );
        assert_eq!(parse_status("Name: x\n"), None);
        // pid (comm with ") " inside) state ppid ... utime=14 stime=15
        let stat = "42 (a) b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3";
        assert_eq!(parse_stat_cpu(stat), Some(300));
        assert_eq!(parse_stat_cpu("42 (x) S 1"), None);
    }

    #[test]
    fn metric_sum_adds_every_label_set_of_exactly_that_name() {
        let text = "# TYPE proxy_broker_feedback counter\n\
                    proxy_broker_feedback_total{success=\"true\"} 10\n\
                    proxy_broker_feedback_total{success=\"false\"} 5\n\
                    proxy_broker_feedback_dropped_total 7\n";
        let cases = [
            ("proxy_broker_feedback_total", Some(15.0)),
            ("proxy_broker_feedback_dropped_total", Some(7.0)),
            ("proxy_broker_feedback", None),
            ("proxy_broker_missing_total", None),
        ];
        for (name, want) in cases {
            assert_eq!(metric_sum(text, name), want, "{name}");
        }
    }
}
