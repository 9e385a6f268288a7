//! Support for the operations tests: a loopback upstream proxy service that records what it is
//! sent, the broker binary as a child process, an in-process broker with its `/metrics` endpoint,
//! a parser for the Prometheus/OpenMetrics exposition, and polling with deadlines.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use proxy_broker::BrokerConfig;
use proxy_broker::broker::Broker;
use proxy_broker::pb::proxy_broker_admin_client::ProxyBrokerAdminClient;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Bound for anything that should happen promptly (a reload, a delivery, a state change).
pub const PROMPT: Duration = Duration::from_secs(10);
/// How long the binary may take to start answering on a loaded machine.
pub const STARTUP: Duration = Duration::from_secs(30);

// --- Polling -----------------------------------------------------------------------------------

/// Polls `probe` until it yields `Some`, at most `within`; panics naming `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        // Poll interval; the deadline above bounds the wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- Upstream proxy service --------------------------------------------------------------------

/// What the upstream answers to one `POST /api/v1/proxy/request`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    /// 200 with a valid answer naming `proxy_url`.
    pub fn answer(proxy_url: &str) -> Self {
        Self {
            status: 200,
            body: serde_json::json!({"proxy_url": proxy_url, "strategy": "s", "ttl_seconds": 300})
                .to_string(),
            delay: Duration::ZERO,
        }
    }

    /// An error status with a short body.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: "upstream says no".into(),
            delay: Duration::ZERO,
        }
    }

    /// This reply, sent after `delay`.
    pub fn after(self, delay: Duration) -> Self {
        Self { delay, ..self }
    }
}

/// The proxy URL the default responder hands out for `exchange`: its password is `secretpw`.
pub fn proxy_for(exchange: &str) -> String {
    format!("socks5://u:secretpw@{exchange}:1080")
}

/// Decides the reply from the request body (the broker's JSON ProxyRequest).
pub type Responder = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

/// The default responder: a valid answer with [`proxy_for`] the requested exchange.
pub fn default_responder() -> Responder {
    Arc::new(|body: &Value| Reply::answer(&proxy_for(body["exchange_id"].as_str().unwrap_or("x"))))
}

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub headers: HeaderMap,
    pub body: Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

struct Shared {
    responder: Mutex<Responder>,
    feedback_delay: Mutex<Duration>,
    /// Open (`true`) lets held requests continue.
    gate: watch::Sender<bool>,
    requests: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    feedback_started: Mutex<Vec<Seen>>,
    feedback_done: Mutex<Vec<Seen>>,
}

/// A loopback upstream proxy service (`/api/v1/proxy/request`, `/api/v1/proxy/feedback`) that
/// records every request.
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn on_request(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.requests.lock().unwrap().push(Seen {
        headers,
        body: body.clone(),
    });
    s.in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = InFlight(&s.in_flight);
    let mut gate = s.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    let responder = s.responder.lock().unwrap().clone();
    let reply = responder(&body);
    tokio::time::sleep(reply.delay).await;
    (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        reply.body,
    )
}

async fn on_feedback(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let seen = Seen {
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    s.feedback_started.lock().unwrap().push(seen.clone());
    let delay = *s.feedback_delay.lock().unwrap();
    let mut gate = s.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    tokio::time::sleep(delay).await;
    // Recorded only when the handler runs to completion (the broker waited for the answer).
    s.feedback_done.lock().unwrap().push(seen);
    StatusCode::OK
}

impl Upstream {
    /// Starts on 127.0.0.1:0 with the [`default_responder`].
    pub async fn start() -> Self {
        Self::start_with(default_responder()).await
    }

    /// Starts on 127.0.0.1:0 answering with `responder`.
    pub async fn start_with(responder: Responder) -> Self {
        let shared = Arc::new(Shared {
            responder: Mutex::new(responder),
            feedback_delay: Mutex::new(Duration::ZERO),
            gate: watch::Sender::new(true),
            requests: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            feedback_started: Mutex::default(),
            feedback_done: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/api/v1/proxy/request", post(on_request))
            .route("/api/v1/proxy/feedback", post(on_feedback))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    /// The base URL to configure as an endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_responder(&self, responder: Responder) {
        *self.shared.responder.lock().unwrap() = responder;
    }

    /// Feedback deliveries take `delay` before they are answered.
    pub fn set_feedback_delay(&self, delay: Duration) {
        *self.shared.feedback_delay.lock().unwrap() = delay;
    }

    /// Holds every request (proxy lookups and feedback) until [`Upstream::release`].
    pub fn hold(&self) {
        self.shared.gate.send_replace(false);
    }

    pub fn release(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Every proxy lookup received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Lookups received for `exchange`.
    pub fn requests_for(&self, exchange: &str) -> usize {
        self.requests()
            .iter()
            .filter(|s| s.body["exchange_id"] == exchange)
            .count()
    }

    /// Proxy lookups being handled right now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Feedback deliveries that arrived (answered or not).
    pub fn feedback_started(&self) -> Vec<Seen> {
        self.shared.feedback_started.lock().unwrap().clone()
    }

    /// Feedback deliveries answered with 200 (the broker stayed to read the answer).
    pub fn feedback_done(&self) -> Vec<Seen> {
        self.shared.feedback_done.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback URL nothing listens on (connections are refused at once).
pub fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Two distinct loopback ports that were free a moment ago.
pub fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// Writes `text` to `path` atomically (temporary file in the same directory, then rename), as
/// editors and config management do, so a watcher never sees a half-written file.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// --- gRPC helpers ------------------------------------------------------------------------------

/// `message` with `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Connects to a plaintext gRPC server.
pub async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap()
}

// --- In-process broker with /metrics ------------------------------------------------------------

/// The broker library serving gRPC and `/metrics` on loopback, with the [`Broker`] at hand.
pub struct LocalBroker {
    pub broker: Arc<Broker>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), proxy_broker::server::ServeError>>>,
    metrics_task: JoinHandle<()>,
}

impl LocalBroker {
    pub async fn start(config: BrokerConfig) -> Self {
        Self::start_broker(Arc::new(Broker::new(config).unwrap())).await
    }

    pub async fn start_broker(broker: Arc<Broker>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let metrics_task = {
            let broker = broker.clone();
            tokio::spawn(proxy_broker::metrics::serve_metrics(
                metrics_listener,
                move || {
                    let broker = broker.clone();
                    async move { broker.render_metrics().await }
                },
                std::future::pending(),
            ))
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy_broker::serve(listener, broker.clone(), async move {
            let _ = stopped.await;
        }));
        let channel = connect(addr).await;
        Self {
            broker,
            addr,
            metrics_addr,
            channel,
            stop: Some(stop),
            task: Some(task),
            metrics_task,
        }
    }

    pub fn client(&self) -> ProxyBrokerClient<Channel> {
        ProxyBrokerClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> ProxyBrokerAdminClient<Channel> {
        ProxyBrokerAdminClient::new(self.channel.clone())
    }

    /// `GET /metrics`, parsed.
    pub async fn scrape(&self) -> Exposition {
        Exposition::parse(&scrape(self.metrics_addr).await)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.metrics_task.abort();
    }
}

// --- The binary --------------------------------------------------------------------------------

/// The `proxy-broker` binary on loopback ports, with its stderr captured.
pub struct BrokerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    stderr: Option<JoinHandle<String>>,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
}

/// How many times start-up is retried on new ports when the ones picked were taken meanwhile.
const BIND_ATTEMPTS: usize = 4;

impl BrokerProcess {
    /// Runs the binary with `--config <config>` (if any), a clean environment plus `env`, and
    /// loopback listen addresses.
    ///
    /// The ports are picked free here and bound by the child a moment later; another process may
    /// take one in between (an outgoing connection's ephemeral port, another test's listener).
    /// [`BrokerProcess::wait_serving`] then starts the binary again on new ports.
    pub fn spawn(config: Option<&Path>, env: &[(&str, &str)]) -> Self {
        let config = config.map(Path::to_path_buf);
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, addr, metrics_addr, stderr) = Self::launch(config.as_deref(), &env);
        Self {
            child,
            addr,
            metrics_addr,
            stderr: Some(stderr),
            config,
            env,
        }
    }

    fn launch(
        config: Option<&Path>,
        env: &[(String, String)],
    ) -> (Child, SocketAddr, SocketAddr, JoinHandle<String>) {
        let (port, metrics_port) = free_ports();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
        let mut command = Command::new(env!("CARGO_BIN_EXE_proxy-broker"));
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PROXY_BROKER_LISTEN", addr.to_string())
            .env("PROXY_BROKER_METRICS_LISTEN", metrics_addr.to_string());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the proxy-broker binary starts");
        let mut pipe = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes).await;
            String::from_utf8_lossy(&bytes).into_owned()
        });
        (child, addr, metrics_addr, stderr)
    }

    /// Polls health until SERVING; returns a connected channel.
    pub async fn wait_serving(&mut self) -> Channel {
        let deadline = Instant::now() + STARTUP;
        let mut last = String::from("no attempt yet");
        let mut launches = 1;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = self.stderr().await;
                // Only the ports this harness picked: a test that sets its own listen address
                // and gets it refused sees the failure.
                let ours = !self.env.iter().any(|(k, _)| k.ends_with("_LISTEN"));
                if ours && log.contains("cannot bind") && launches < BIND_ATTEMPTS {
                    launches += 1;
                    let (child, addr, metrics_addr, stderr) = Self::launch(self.config.as_deref(), &self.env);
                    (self.child, self.addr, self.metrics_addr) = (child, addr, metrics_addr);
                    self.stderr = Some(stderr);
                    continue;
                }
                panic!("the broker exited during start-up ({status}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not answer within {STARTUP:?} ({last})"
            );
            let attempt = async {
                let channel = Endpoint::from_shared(format!("http://{}", self.addr))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest::default())
                    .await
                    .map_err(|s| s.to_string())?
                    .into_inner()
                    .status();
                if status == ServingStatus::Serving {
                    Ok(channel)
                } else {
                    Err(format!("health is {status:?}"))
                }
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(channel)) => return channel,
                Ok(Err(e)) => last = e,
                Err(_) => last = "attempt timed out".into(),
            }
            // Poll interval; the deadline above bounds the wait.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `kill -<name>` to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the broker is still running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// Waits (bounded) for the exit; returns the status and how long it took.
    pub async fn wait_exit(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => (status.unwrap(), started.elapsed()),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!(
                    "the broker did not exit within {within:?}:\n{}",
                    self.stderr().await
                );
            }
        }
    }

    /// SIGTERM, then the exit status (bounded by `within`) and the whole log.
    pub async fn terminate(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let (status, _) = self.wait_exit(within).await;
        (status, self.stderr().await)
    }

    /// The log; complete once the process has exited (kills it if still running).
    pub async fn stderr(&mut self) -> String {
        let _ = self.child.start_kill();
        match self.stderr.take() {
            Some(handle) => tokio::time::timeout(PROMPT, handle)
                .await
                .map(|r| r.unwrap_or_default())
                .unwrap_or_else(|_| "<stderr not closed>".into()),
            None => String::new(),
        }
    }
}

/// A config file in a fresh temporary directory.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ConfigDir {
    pub fn new(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.yaml");
        std::fs::write(&path, yaml).unwrap();
        Self { dir, path }
    }

    /// A file next to the configuration.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

// --- Metrics exposition ------------------------------------------------------------------------

/// `GET http://{addr}/metrics`; asserts 200 and the OpenMetrics content type.
pub async fn scrape(addr: SocketAddr) -> String {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}/metrics"))
        .timeout(PROMPT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text") || content_type.starts_with("text/plain"),
        "content type {content_type:?}"
    );
    response.text().await.unwrap()
}

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone)]
pub struct Exposition {
    pub text: String,
    pub samples: Vec<Sample>,
    /// `# TYPE` declarations: metric family → type.
    pub types: BTreeMap<String, String>,
}

fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    // `s` starts just after `{`.
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without `=`")?;
        let key = rest[..eq].trim().to_owned();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err("label value not quoted".into());
        }
        let mut value = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                '"' => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or("unterminated label value")?;
        if labels.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate label {key}"));
        }
        rest = &rest[end..];
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

impl Exposition {
    /// Parses the text format; panics (naming the line) on anything malformed.
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let fail = |why: String| -> ! { panic!("metrics line {}: {why}: {line:?}", n + 1) };
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut parts = comment.split_whitespace();
                if parts.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                        fail("incomplete TYPE".into())
                    };
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value".into()));
            let name = &line[..name_end];
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            {
                fail(format!("bad metric name {name:?}"));
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                parse_labels(&line[name_end + 1..]).unwrap_or_else(|e| fail(e))
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            // `value [timestamp]`; exemplars (` # {...}`) are not expected.
            let mut fields = rest.split_whitespace();
            let value = fields.next().unwrap_or_else(|| fail("no value".into()));
            let value = parse_value(value).unwrap_or_else(|e| fail(e));
            if let Some(extra) = fields.next()
                && extra.parse::<f64>().is_err()
            {
                fail(format!("unexpected {extra:?} after the value"));
            }
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Self {
            text: text.to_owned(),
            samples,
            types,
        }
    }

    /// Samples named `name` whose labels include every pair in `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample named `name` with exactly `labels`; panics when absent.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no sample {name}{labels:?}; samples of that name: {:?}",
                self.matching(name, &[])
            )
        })
    }

    /// The value of the sample named `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Sum over the samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    /// Checks a histogram's series with `labels`: buckets cumulative, `+Inf` equals `_count`,
    /// `_sum` non-negative. Returns `_count`.
    #[track_caller]
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some("histogram"),
            "{name} is declared a histogram"
        );
        let count = self.value(&format!("{name}_count"), labels);
        let sum = self.value(&format!("{name}_sum"), labels);
        assert!(sum >= 0.0 && sum.is_finite(), "{name}_sum = {sum}");
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&format!("{name}_bucket"), labels)
            .iter()
            .filter(|s| s.labels.len() == labels.len() + 1)
            .map(|s| (parse_value(&s.labels["le"]).unwrap(), s.value))
            .collect();
        assert!(buckets.len() >= 2, "{name}_bucket{labels:?}: {buckets:?}");
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets are not cumulative: {buckets:?}"
        );
        let last = buckets.last().unwrap();
        assert_eq!(last.0, f64::INFINITY, "{name} has a +Inf bucket");
        assert_eq!(last.1, count, "{name} +Inf bucket equals _count");
        if count > 0.0 {
            assert!(sum > 0.0, "{name}: {count} observations but _sum {sum}");
        }
        count
    }
}
