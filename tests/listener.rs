//! The gRPC listener of the real binary when accepting fails for a reason that is not about one
//! connection: out of file descriptors (EMFILE), forced by lowering the running broker's
//! `RLIMIT_NOFILE` with `prlimit` and then opening more connections than it may hold. The accept
//! loop must wait between attempts (not spin on a core), say so in the log a bounded number of
//! times, and serve new connections again once descriptors are free.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::ops::{BrokerProcess, PROMPT, eventually};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// How long the broker is kept out of file descriptors.
const STARVED_FOR: Duration = Duration::from_secs(2);

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u64>().ok())
        .unwrap_or(100);
    ticks as f64 / per_second as f64
}

#[tokio::test]
async fn out_of_file_descriptors_the_listener_backs_off_instead_of_spinning_and_recovers() {
    let mut process = BrokerProcess::spawn(None, &[]);
    let _first = process.wait_serving().await;
    let pid = process.child.id().unwrap();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    // Room for two more connections; the rest wait in the listen backlog, where every accept
    // attempt fails with EMFILE.
    let limit = format!("--nofile={}:{}", open + 2, open + 2);
    let status = Command::new("prlimit")
        .args([&format!("--pid={pid}"), limit.as_str()])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit {limit}: {status}");
    let clients: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(process.addr).unwrap())
        .collect();

    let (cpu_before, started) = (cpu_seconds(pid), Instant::now());
    // The condition under test is a stretch of failing accepts: hold it for a while.
    tokio::time::sleep(STARVED_FOR).await;
    let (cpu, elapsed) = (cpu_seconds(pid) - cpu_before, started.elapsed().as_secs_f64());
    // A spinning accept loop burns a whole core; one that waits 10 ms doubling to 1 s, next to
    // nothing.
    assert!(
        cpu < 0.25 * elapsed,
        "the broker used {cpu:.2} s of CPU in {elapsed:.2} s out of file descriptors"
    );

    drop(clients);
    let addr = process.addr;
    eventually("a new connection to be served", PROMPT, || async move {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await
            .ok()?;
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .ok()
    })
    .await;

    let (exit, log) = process.terminate(PROMPT).await;
    assert_eq!(exit.code(), Some(0), "{log}");
    let warnings = log.matches("accepting a connection failed").count();
    assert!(
        (1..=20).contains(&warnings),
        "{warnings} accept failures logged in about {STARVED_FOR:?} (10 ms doubling to 1 s):\n{log}"
    );
    assert!(log.contains("Too many open files"), "{log}");
}
