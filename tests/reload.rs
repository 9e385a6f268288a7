//! Hot reload: the configuration file and the credential files it names are watched; a valid
//! change is applied without a restart (dropping only the cache entries it affects), an invalid
//! one keeps the running configuration, is logged with the key named and counted. Kubernetes
//! ConfigMap/Secret updates (an atomic `..data` symlink swap) are picked up.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ops::{
    BrokerProcess, ConfigDir, LocalBroker, PROMPT, Upstream, bearer, eventually, proxy_for, write_atomic,
};
use proxy_broker::BrokerConfig;
use proxy_broker::broker::Broker;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{ConnectionType, ListCacheRequest, ProxyRequest, ProxyResponse, ProxySource};
use tonic::transport::Channel;

// --- Support -------------------------------------------------------------------------------------

/// Log lines written while a test runs (the reload task runs on the test's single thread, so a
/// thread-local subscriber sees it).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (logs, guard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A broker served in process with its configuration file watched.
struct Watched {
    local: LocalBroker,
    _watch: proxy_broker::reload::ReloadHandle,
}

impl Watched {
    async fn start(path: &Path) -> Self {
        let config = BrokerConfig::load(Some(path)).unwrap_or_else(|e| panic!("{e}"));
        let broker = Arc::new(Broker::new(config).unwrap());
        let watch = proxy_broker::reload::watch(broker.clone(), path.to_owned()).unwrap();
        Self {
            local: LocalBroker::start_broker(broker).await,
            _watch: watch,
        }
    }

    fn broker(&self) -> &Broker {
        &self.local.broker
    }

    fn reloads(&self, result: &str) -> u64 {
        self.broker()
            .metrics()
            .config_reloads
            .get_or_create(&vec![("result", result.to_owned())])
            .get()
    }

    async fn ask(&self, exchange: &str) -> ProxyResponse {
        ask(&self.local.channel, exchange).await
    }

    /// Waits until `result` reloads have been counted `n` times.
    async fn wait_reloads(&self, result: &str, n: u64) {
        eventually(&format!("{n} reload(s) with result {result}"), PROMPT, || async {
            (self.reloads(result) >= n).then_some(())
        })
        .await;
    }

    async fn cache_size(&self) -> usize {
        self.local
            .admin()
            .list_cache(ListCacheRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .len()
    }
}

async fn ask(channel: &Channel, exchange: &str) -> ProxyResponse {
    ProxyBrokerClient::new(channel.clone())
        .request_proxy(ProxyRequest {
            exchange_id: exchange.into(),
            connection_type: ConnectionType::Http.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// An embedded-only configuration answering `binance_proxy` for binance over HTTP.
fn embedded_yaml(binance_proxy: &str, binance_timeout: i64) -> String {
    format!(
        r#"
proxy:
  enabled: true
  default:
    http: "socks5://default-proxy:1080"
  exchanges:
    binance:
      http: {{ url: "{binance_proxy}", timeout_seconds: {binance_timeout} }}
"#
    )
}

/// Delegation to `upstream` with a bearer token read from `token_file`.
fn delegating_yaml(upstream: &Upstream, token_file: &Path, timeout_seconds: u32, exchanges: &str) -> String {
    format!(
        r#"
proxy:
  enabled: true
  default:
    http: "socks5://default-proxy:1080"
  exchanges: {{ {exchanges} }}
  external_service:
    enabled: true
    endpoints: ["{url}"]
    auth_credentials: {{ token_file: "{token}" }}
    timeout_seconds: {timeout_seconds}
"#,
        url = upstream.url(),
        token = token_file.display()
    )
}

/// A directory laid out like a mounted ConfigMap or Secret: `<name>` → `..data/<name>`,
/// `..data` → `..<version>`.
struct Projected {
    dir: tempfile::TempDir,
    name: String,
}

impl Projected {
    fn new(name: &str, text: &str) -> Self {
        let projected = Self {
            dir: tempfile::tempdir().unwrap(),
            name: name.to_owned(),
        };
        let version = projected.write_version("..2026_01_01_00_00_00.000000001", text);
        std::os::unix::fs::symlink(&version, projected.dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink(Path::new("..data").join(name), projected.dir.path().join(name)).unwrap();
        projected
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join(&self.name)
    }

    fn write_version(&self, version: &str, text: &str) -> String {
        let dir = self.dir.path().join(version);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(&self.name), text).unwrap();
        version.to_owned()
    }

    /// What the kubelet does on an update: a new version directory, a temporary symlink to it
    /// renamed over `..data` (atomic), then the old version removed.
    fn update(&self, version: &str, text: &str) {
        let old = std::fs::read_link(self.dir.path().join("..data")).unwrap();
        let version = self.write_version(version, text);
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.path().join(old)).unwrap();
    }
}

// --- Tests ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_valid_change_is_answered_without_restart_and_counted_as_a_successful_reload() {
    let (logs, _guard) = Logs::capture();
    let config = ConfigDir::new(&embedded_yaml("http://old-proxy:8080", 15));
    let watched = Watched::start(&config.path).await;
    assert_eq!(watched.ask("binance").await.proxy_url, "http://old-proxy:8080");

    write_atomic(
        &config.path,
        &format!(
            "{}    kraken: {{ http: \"http://kraken-proxy:3128\" }}\n",
            embedded_yaml("http://new-proxy:8080", 15)
        ),
    );
    eventually("the new answer", PROMPT, || async {
        (watched.ask("binance").await.proxy_url == "http://new-proxy:8080").then_some(())
    })
    .await;
    assert_eq!(watched.ask("kraken").await.proxy_url, "http://kraken-proxy:3128");
    assert!(watched.reloads("success") >= 1);
    assert_eq!(watched.reloads("failure"), 0);
    let metrics = watched.local.scrape().await;
    assert!(metrics.value("proxy_broker_config_reloads_total", &[("result", "success")]) >= 1.0);
    assert!(logs.text().contains("configuration reloaded"), "{}", logs.text());
    watched.local.stop().await;
}

#[tokio::test]
async fn an_invalid_change_keeps_the_running_config_logs_the_key_and_counts_a_failure() {
    let (logs, _guard) = Logs::capture();
    let config = ConfigDir::new(&embedded_yaml("http://old-proxy:8080", 15));
    let watched = Watched::start(&config.path).await;

    write_atomic(&config.path, &embedded_yaml("http://new-proxy:8080", 0));
    watched.wait_reloads("failure", 1).await;
    assert_eq!(watched.reloads("success"), 0);
    let answer = watched.ask("binance").await;
    assert_eq!(
        answer.proxy_url, "http://old-proxy:8080",
        "the old config still answers"
    );
    let log = logs.text();
    assert!(log.contains("configuration reload rejected"), "{log}");
    assert!(
        log.contains("proxy.exchanges.binance.http.timeout_seconds: 0 is out of range"),
        "the error names the key:\n{log}"
    );
    assert_eq!(
        watched
            .local
            .scrape()
            .await
            .value("proxy_broker_config_reloads_total", &[("result", "failure")]),
        1.0
    );

    // YAML that does not even parse is rejected the same way.
    write_atomic(&config.path, "proxy: [unclosed\n");
    watched.wait_reloads("failure", 2).await;
    assert_eq!(watched.ask("binance").await.proxy_url, "http://old-proxy:8080");

    // Fixing the file applies it.
    write_atomic(&config.path, &embedded_yaml("http://new-proxy:8080", 15));
    eventually("the fixed file applied", PROMPT, || async {
        (watched.ask("binance").await.proxy_url == "http://new-proxy:8080").then_some(())
    })
    .await;
    watched.local.stop().await;
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_picked_up() {
    let configmap = Projected::new("broker.yaml", &embedded_yaml("http://v1-proxy:8080", 15));
    let watched = Watched::start(&configmap.path()).await;
    assert_eq!(watched.ask("binance").await.proxy_url, "http://v1-proxy:8080");

    configmap.update(
        "..2026_01_01_00_01_00.000000002",
        &embedded_yaml("http://v2-proxy:8080", 15),
    );
    eventually("the swapped ConfigMap applied", PROMPT, || async {
        (watched.ask("binance").await.proxy_url == "http://v2-proxy:8080").then_some(())
    })
    .await;
    // And a second update (the watch survives the first swap).
    configmap.update(
        "..2026_01_01_00_02_00.000000003",
        &embedded_yaml("http://v3-proxy:8080", 15),
    );
    eventually("the second swap applied", PROMPT, || async {
        (watched.ask("binance").await.proxy_url == "http://v3-proxy:8080").then_some(())
    })
    .await;
    assert_eq!(watched.reloads("failure"), 0);
    watched.local.stop().await;
}

#[tokio::test]
async fn a_rotated_upstream_token_file_is_sent_upstream_without_restart() {
    let upstream = Upstream::start().await;
    // The token is a mounted Secret in its own directory, rotated the kubelet way.
    let secret = Projected::new("token", "token-one\n");
    let config = ConfigDir::new(&delegating_yaml(&upstream, &secret.path(), 10, ""));
    let watched = Watched::start(&config.path).await;
    assert_eq!(watched.ask("binance").await.source(), ProxySource::Upstream);
    assert_eq!(
        upstream.requests()[0].header("authorization").as_deref(),
        Some("Bearer token-one")
    );

    secret.update("..2026_01_01_00_01_00.000000002", "token-two\n");
    // The rotation rebuilds the upstream clients and drops the cache, so the next lookup goes
    // upstream with the new token.
    eventually("the new token upstream", PROMPT, || async {
        let answer = watched.ask("binance").await;
        let last = upstream.requests().last()?.header("authorization")?;
        (answer.source() == ProxySource::Upstream && last == "Bearer token-two").then_some(())
    })
    .await;
    assert!(
        upstream.requests().iter().all(|r| matches!(
            r.header("authorization").as_deref(),
            Some("Bearer token-one" | "Bearer token-two")
        )),
        "never anything else"
    );
    watched.local.stop().await;
}

#[tokio::test]
async fn a_rotated_auth_tokens_file_changes_the_accepted_tokens_without_restart() {
    let config = ConfigDir::new("");
    let tokens = config.file("tokens", "old-token-1234-abcd\n");
    write_atomic(
        &config.path,
        &format!(
            "{}server:\n  auth_tokens_file: \"{}\"\n",
            embedded_yaml("http://p:8080", 15),
            tokens.display()
        ),
    );
    let watched = Watched::start(&config.path).await;
    let call = |token: &'static str| {
        let channel = watched.local.channel.clone();
        async move {
            ProxyBrokerClient::new(channel)
                .request_proxy(bearer(
                    ProxyRequest {
                        exchange_id: "binance".into(),
                        connection_type: ConnectionType::Http.into(),
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    call("old-token-1234-abcd").await.unwrap();
    assert_eq!(
        call("new-token-5678-efgh").await,
        Err(tonic::Code::Unauthenticated)
    );

    write_atomic(&tokens, "new-token-5678-efgh\n");
    eventually("the new token accepted", PROMPT, || async {
        call("new-token-5678-efgh").await.ok()
    })
    .await;
    assert_eq!(
        call("old-token-1234-abcd").await,
        Err(tonic::Code::Unauthenticated)
    );

    // Emptying the file is rejected (auth would be off): the new token stays in force.
    write_atomic(&tokens, "# rotated out\n");
    watched.wait_reloads("failure", 1).await;
    call("new-token-5678-efgh").await.unwrap();
    assert_eq!(
        ProxyBrokerClient::new(watched.local.channel.clone())
            .request_proxy(ProxyRequest {
                exchange_id: "binance".into(),
                connection_type: ConnectionType::Http.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code()),
        Err(tonic::Code::Unauthenticated),
        "still authenticated"
    );
    watched.local.stop().await;
}

#[tokio::test]
async fn an_upstream_settings_change_drops_the_cache_and_an_embedded_only_change_keeps_it() {
    let upstream = Upstream::start().await;
    let config = ConfigDir::new("");
    let token = config.file("token", "upstream-token\n");
    write_atomic(&config.path, &delegating_yaml(&upstream, &token, 10, ""));
    let watched = Watched::start(&config.path).await;
    assert_eq!(watched.ask("binance").await.proxy_url, proxy_for("binance"));
    assert_eq!(watched.ask("binance").await.source(), ProxySource::Cache);
    assert_eq!(watched.cache_size().await, 1);

    // Embedded-only change: a new exchange override.
    write_atomic(
        &config.path,
        &delegating_yaml(&upstream, &token, 10, r#"kraken: "http://kraken-proxy:3128""#),
    );
    eventually("the embedded change applied", PROMPT, || async {
        watched
            .broker()
            .config()
            .proxy
            .exchanges
            .contains_key("kraken")
            .then_some(())
    })
    .await;
    assert_eq!(watched.cache_size().await, 1, "the cache is kept");
    assert_eq!(watched.ask("binance").await.source(), ProxySource::Cache);
    assert_eq!(upstream.requests_for("binance"), 1);

    // Upstream change: another per-attempt timeout.
    write_atomic(
        &config.path,
        &delegating_yaml(&upstream, &token, 9, r#"kraken: "http://kraken-proxy:3128""#),
    );
    eventually("the upstream change applied", PROMPT, || async {
        (watched.broker().config().proxy.external_service.timeout_seconds == 9).then_some(())
    })
    .await;
    assert_eq!(watched.cache_size().await, 0, "the cache is dropped");
    assert_eq!(watched.ask("binance").await.source(), ProxySource::Upstream);
    assert_eq!(upstream.requests_for("binance"), 2);
    assert_eq!(watched.reloads("failure"), 0);
    watched.local.stop().await;
}

#[tokio::test]
async fn the_binary_reloads_a_changed_file_and_logs_a_rejected_one_with_the_key() {
    let config = ConfigDir::new(&embedded_yaml("http://old-proxy:8080", 15));
    let mut process = BrokerProcess::spawn(Some(&config.path), &[]);
    let channel = process.wait_serving().await;
    assert_eq!(ask(&channel, "binance").await.proxy_url, "http://old-proxy:8080");

    write_atomic(&config.path, &embedded_yaml("http://new-proxy:8080", 15));
    eventually("the binary to apply the change", PROMPT, || async {
        (ask(&channel, "binance").await.proxy_url == "http://new-proxy:8080").then_some(())
    })
    .await;

    write_atomic(&config.path, &embedded_yaml("http://newer-proxy:8080", 0));
    eventually("the rejected reload to be counted", PROMPT, || async {
        let metrics = common::ops::Exposition::parse(&common::ops::scrape(process.metrics_addr).await);
        (metrics.value("proxy_broker_config_reloads_total", &[("result", "failure")]) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(ask(&channel, "binance").await.proxy_url, "http://new-proxy:8080");

    let (status, log) = process.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    let rejected = log
        .lines()
        .find(|l| l.contains("configuration reload rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(rejected.contains("ERROR"), "{rejected}");
    assert!(
        rejected.contains("proxy.exchanges.binance.http.timeout_seconds"),
        "{rejected}"
    );
}
