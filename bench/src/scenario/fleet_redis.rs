//! What the `fleet` scenario needs of Redis: a real `redis-server` (Debian's package) on a free
//! loopback port with persistence off, its `INFO` read over a plain RESP connection, and a relay
//! that counts the commands a broker sends (its round-trips).
//!
//! No Redis client crate: the bench speaks two commands (`PING`, `INFO`) and counts RESP arrays,
//! which is less code than wiring a client and keeps the bench's dependencies those of issue 8.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Longest `redis-server` may take to answer `PING`.
const START_LIMIT: Duration = Duration::from_secs(20);
/// Longest one `INFO` may take.
const INFO_LIMIT: Duration = Duration::from_secs(5);
/// Largest `INFO` answer read.
const MAX_INFO_BYTES: usize = 1 << 20;

/// A running `redis-server`; killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// Its loopback address.
    pub addr: SocketAddr,
    child: Child,
}

impl RedisServer {
    /// Starts `program` (e.g. `redis-server`) on a free loopback port, no persistence, and waits
    /// until it answers `PING`.
    pub async fn start(program: &str) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new(program)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {program} (Debian: `apt-get install -y redis-server`)"))?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("{program} exited at start ({status}); is port {port} free?");
            }
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), command(addr, "PING")).await
                && reply.starts_with(b"+PONG")
            {
                return Ok(Self { addr, child });
            }
            if started.elapsed() > START_LIMIT {
                bail!("{program} did not answer PING within {START_LIMIT:?}");
            }
            // Poll interval; START_LIMIT bounds the wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `INFO <section>` as text.
    pub async fn info(&self, section: &str) -> anyhow::Result<String> {
        let reply = tokio::time::timeout(INFO_LIMIT, command(self.addr, &format!("INFO {section}")))
            .await
            .context("INFO timed out")??;
        bulk_text(&reply)
    }

    /// `total_commands_processed` (every command, those run inside scripts included) and the
    /// calls of each command (`INFO commandstats`, `cmdstat_<name>:calls=N,...`).
    pub async fn command_counts(&self) -> anyhow::Result<(u64, BTreeMap<String, u64>)> {
        let stats = self.info("stats").await?;
        let total = stats
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no total_commands_processed in INFO stats")?;
        let per_command = parse_commandstats(&self.info("commandstats").await?);
        Ok((total, per_command))
    }

    /// Kills the server and waits for it to go.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// `cmdstat_<name>:calls=N,...` lines → name → N.
pub fn parse_commandstats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .trim()
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Sends one inline command on a fresh connection and returns the raw reply (a simple string,
/// or a whole bulk string).
async fn command(addr: SocketAddr, line: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(format!("{line}\r\n").as_bytes()).await?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("Redis closed the connection mid-reply");
        }
        reply.extend_from_slice(&chunk[..n]);
        if reply_complete(&reply)? {
            return Ok(reply);
        }
        if reply.len() > MAX_INFO_BYTES {
            bail!("a Redis reply over {MAX_INFO_BYTES} bytes");
        }
    }
}

/// Whether `reply` holds a whole simple string, error or bulk string.
fn reply_complete(reply: &[u8]) -> anyhow::Result<bool> {
    let Some(end) = find_crlf(reply, 0) else {
        return Ok(false);
    };
    match reply.first() {
        Some(b'+' | b'-' | b':') => Ok(true),
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&reply[1..end])?.parse()?;
            Ok(len < 0 || reply.len() >= end + 2 + len as usize + 2)
        }
        other => bail!("unexpected Redis reply type {other:?}"),
    }
}

/// The text of a bulk-string reply.
fn bulk_text(reply: &[u8]) -> anyhow::Result<String> {
    if reply.first() == Some(&b'-') {
        bail!("Redis: {}", String::from_utf8_lossy(reply).trim());
    }
    let end = find_crlf(reply, 0).context("no CRLF in the reply")?;
    Ok(String::from_utf8_lossy(&reply[end + 2..reply.len().saturating_sub(2)]).into_owned())
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// Counts whole commands in a RESP byte stream from a client: each top-level array
/// (`*<n>\r\n` and n bulk strings) or inline line is one command. Bytes of a command not yet
/// complete are kept for the next chunk.
#[derive(Debug, Default)]
pub struct CommandParser {
    pending: Vec<u8>,
}

impl CommandParser {
    /// Feeds `chunk`; returns the commands it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        self.pending.extend_from_slice(chunk);
        let mut at = 0;
        let mut commands = 0;
        while let Some(next) = command_end(&self.pending, at) {
            at = next;
            commands += 1;
        }
        self.pending.drain(..at);
        commands
    }
}

/// Where the command starting at `at` ends, if it is complete.
fn command_end(buf: &[u8], at: usize) -> Option<usize> {
    let line_end = find_crlf(buf, at)?;
    if buf.get(at) != Some(&b'*') {
        // An inline command (or a stray empty line): up to its CRLF.
        return Some(line_end + 2);
    }
    let elements: i64 = std::str::from_utf8(&buf[at + 1..line_end]).ok()?.parse().ok()?;
    let mut pos = line_end + 2;
    for _ in 0..elements.max(0) {
        let header_end = find_crlf(buf, pos)?;
        if buf.get(pos) != Some(&b'$') {
            // Clients send arrays of bulk strings only; anything else: skip the line.
            pos = header_end + 2;
            continue;
        }
        let len: i64 = std::str::from_utf8(&buf[pos + 1..header_end])
            .ok()?
            .parse()
            .ok()?;
        pos = header_end + 2 + usize::try_from(len.max(0)).ok()? + 2;
        if pos > buf.len() {
            return None;
        }
    }
    Some(pos)
}

/// A loopback TCP relay in front of Redis that counts the commands clients send through it. It
/// runs on a thread of its own (with its own single-threaded runtime), so a busy load generator
/// does not delay the brokers' Redis traffic.
#[derive(Debug)]
pub struct CountingRelay {
    /// Where clients connect.
    pub addr: SocketAddr,
    commands: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CountingRelay {
    /// Listens on a free loopback port and relays every connection to `redis`.
    pub fn start(redis: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the relay's runtime")?;
        let commands = Arc::new(AtomicU64::new(0));
        let counter = commands.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("redis-relay".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        () = accept_loop(listener, redis, counter) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here ends every connection's task.
            })?;
        Ok(Self {
            addr,
            commands,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `redis://<relay>/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Commands relayed so far.
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, redis: SocketAddr, counter: Arc<AtomicU64>) {
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(relay(client, redis, counter.clone()));
    }
}

/// Relays one client connection, counting its commands.
async fn relay(client: TcpStream, redis: SocketAddr, counter: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(redis).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut parser = CommandParser::default();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            counter.fetch_add(parser.feed(&chunk[..n]), Ordering::Relaxed);
            if server_write.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// Samples `proxy_broker_store_up` of some brokers every 100 ms and remembers whether any said 0.
#[derive(Debug)]
pub struct StoreUpWatch {
    down_seen: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

/// Longest a [`StoreUpWatch`] samples.
const WATCH_LIMIT: Duration = Duration::from_secs(600);

impl StoreUpWatch {
    /// Starts sampling the `/metrics` of `metrics_addrs`.
    pub fn start(metrics_addrs: Vec<SocketAddr>) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let down_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = down_seen.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < WATCH_LIMIT {
                for addr in &metrics_addrs {
                    let text = match client
                        .get(format!("http://{addr}/metrics"))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                    {
                        Ok(response) => response.text().await.unwrap_or_default(),
                        Err(_) => continue,
                    };
                    if crate::broker::metric_sum(&text, "proxy_broker_store_up") == Some(0.0) {
                        seen.store(true, Ordering::Relaxed);
                    }
                }
                // Sampling interval; WATCH_LIMIT bounds the loop.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Self { down_seen, task })
    }

    /// Stops sampling; whether any broker said `proxy_broker_store_up 0`.
    pub fn finish(self) -> bool {
        self.task.abort();
        self.down_seen.load(Ordering::Relaxed)
    }
}

impl Drop for StoreUpWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parser_counts_whole_commands_across_chunk_boundaries() {
        let get = b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n";
        let evalsha = b"*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n0\r\n$5\r\nx\r\nyz\r\n";
        let mut stream = Vec::new();
        stream.extend_from_slice(get);
        stream.extend_from_slice(evalsha);
        stream.extend_from_slice(b"PING\r\n");
        stream.extend_from_slice(get);
        // (row, chunk size)
        for size in [1, 2, 3, 7, 13, stream.len()] {
            let mut parser = CommandParser::default();
            let counted: u64 = stream.chunks(size).map(|c| parser.feed(c)).sum();
            assert_eq!(counted, 4, "chunks of {size}");
            assert!(parser.pending.is_empty(), "chunks of {size}");
        }
        let mut parser = CommandParser::default();
        assert_eq!(
            parser.feed(&get[..get.len() - 1]),
            0,
            "an incomplete command is kept"
        );
        assert_eq!(parser.feed(b"\n"), 1);
    }

    #[test]
    fn commandstats_lines_are_read_by_name() {
        let text = "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=40,usec_per_call=3.33,rejected_calls=0\r\n\
                    cmdstat_set:calls=3,usec=1\r\nnot a stat\r\n";
        let stats = parse_commandstats(text);
        assert_eq!(stats.get("evalsha"), Some(&12));
        assert_eq!(stats.get("set"), Some(&3));
        assert_eq!(stats.len(), 2);
    }

    #[test]
    fn replies_are_complete_only_with_their_whole_bulk() {
        let rows: &[(&[u8], bool)] = &[
            (b"+PONG\r\n", true),
            (b"+PON", false),
            (b"$5\r\nhel", false),
            (b"$5\r\nhello\r\n", true),
            (b"$-1\r\n", true),
            (b"-ERR nope\r\n", true),
        ];
        for (reply, complete) in rows {
            assert_eq!(reply_complete(reply).unwrap(), *complete, "{reply:?}");
        }
        assert_eq!(bulk_text(b"$5\r\nhello\r\n").unwrap(), "hello");
    }
}
