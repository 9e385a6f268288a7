//! A real `redis-server` (Debian's package) on a free loopback port, persistence off, killed on
//! drop. Used by the store's unit tests (`src/store/conformance.rs` includes this file) and by
//! integration tests. A missing `redis-server` fails the test with what to install: nothing is
//! skipped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start answering.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A running `redis-server`.
#[derive(Debug)]
pub struct RedisServer {
    /// Its loopback address.
    pub addr: SocketAddr,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server without a password.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A server that requires `password` (`--requirepass`).
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with(Some(password.to_owned()))
    }

    fn start_with(password: Option<String>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            password,
            child: None,
        };
        server.restart();
        server
    }

    /// `redis://[:password@]127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@{}/0", self.addr),
            None => format!("redis://{}/0", self.addr),
        }
    }

    /// The URL without the password (for configurations that read it from a file).
    pub fn url_without_password(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: persistence is off).
    pub fn restart(&mut self) {
        self.spawn(&[]);
    }

    fn spawn(&mut self, extra: &[&str]) {
        self.kill();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]);
        cmd.args(extra);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed: install it (`apt-get install -y redis-server`, \
                 Debian's package; CI's .ci/run does) — the fleet-mode store tests need a real one"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls until the server answers PING (or asks for the password), with a deadline.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "redis-server exited at start ({status}); is port {} free?",
                    self.addr.port()
                );
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut reply = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok()
                    && let Ok(n) = s.read(&mut reply)
                    && (reply[..n].starts_with(b"+PONG") || reply[..n].starts_with(b"-NOAUTH"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within {START_DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `n` primaries (no replicas), each a `redis-server` with cluster mode on, on
/// free loopback ports; killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes.
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts `n` (≥ 3) nodes and joins them with `redis-cli --cluster create`, waiting until every
    /// node says `cluster_state:ok`.
    pub fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let nodes: Vec<RedisServer> = (0..n)
            .map(|i| {
                let port = TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free loopback port")
                    .port();
                let node_dir = dir.path().join(format!("node{i}"));
                std::fs::create_dir_all(&node_dir).expect("a node directory");
                let mut server = RedisServer {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    password: None,
                    child: None,
                };
                server.spawn(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &node_dir.join("nodes.conf").display().to_string(),
                    "--dir",
                    &node_dir.display().to_string(),
                ]);
                server
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(node.addr.to_string());
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli (Debian's redis-tools, installed with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + START_DEADLINE;
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.addr.port().to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not become ok within {START_DEADLINE:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes, _dir: dir }
    }

    /// The seed URLs (`redis://127.0.0.1:port`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://{}", n.addr)).collect()
    }
}
