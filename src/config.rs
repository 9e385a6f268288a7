//! The broker's configuration file: cryptofeed's `proxy:` block (with `external_service`), the
//! broker's own `server:` block, its `brokering:` block and its `store:` block, layered defaults →
//! YAML → environment.

use std::net::SocketAddr;
use std::path::Path;

use proxy_broker_core::load::{Problems, Validate};
use proxy_broker_core::validate::check_range;
use proxy_broker_core::{ConfigError, EnvMapping, Loader, ProxySettings, Secret};
use serde::{Deserialize, Serialize};

use crate::brokering::config::BrokeringConfig;
use crate::store::config::StoreConfig;

/// Environment prefix of cryptofeed's proxy settings, mapped onto `proxy.*`.
pub const PROXY_ENV_PREFIX: &str = "CRYPTOFEED_PROXY_";
/// Environment prefix of the broker's own settings, mapped onto `server.*`.
pub const SERVER_ENV_PREFIX: &str = "PROXY_BROKER_";
/// Environment prefix of the `brokering:` block, mapped onto `brokering.*` (not `server.*`: the
/// longest matching prefix wins).
pub const BROKERING_ENV_PREFIX: &str = "PROXY_BROKER_BROKERING__";
/// Environment prefix of the `store:` block (where brokering state lives: memory, or Redis shared
/// by the fleet), mapped onto `store.*`, e.g. `PROXY_BROKER_STORE__REDIS__URL`.
pub const STORE_ENV_PREFIX: &str = "PROXY_BROKER_STORE__";
/// Shortest accepted `server.auth_tokens` entry.
pub const MIN_AUTH_TOKEN_LEN: usize = 16;
/// Variables with the server prefix that are not `server.*` keys.
pub const NON_KEY_VARS: &[&str] = &["PROXY_BROKER_CONFIG", "PROXY_BROKER_LOG_FORMAT"];

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// cryptofeed's proxy settings plus upstream delegation.
    #[serde(default)]
    pub proxy: ProxySettings,
    /// The broker process itself.
    #[serde(default)]
    pub server: ServerConfig,
    /// Feed-aware brokering: per-exchange budgets, bans, outage guard, leases (hot-reloadable).
    #[serde(default)]
    pub brokering: BrokeringConfig,
    /// Where brokering state lives: this process, or Redis shared by every replica (start-up only).
    #[serde(default)]
    pub store: StoreConfig,
}

/// The `server:` block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address.
    pub metrics_listen: SocketAddr,
    /// How long in-flight calls may take to finish after SIGTERM/SIGINT, 0..=300 seconds.
    pub shutdown_grace_seconds: i64,
    /// Bearer tokens accepted from feeds and operators (secret: `Debug` prints `***`). Empty (and
    /// no file): no auth.
    pub auth_tokens: Vec<Secret>,
    /// File with more accepted tokens, one per line (blank lines and `#` comments ignored).
    pub auth_tokens_file: Option<String>,
    /// Who may use server reflection when auth is on.
    pub reflection: Reflection,
    /// Serve gRPC over TLS.
    pub tls: Option<TlsConfig>,
    /// Largest request message accepted, 1024..=4194304 bytes.
    pub max_message_bytes: i64,
    /// Admin and reflection calls handled at once; more are shed with RESOURCE_EXHAUSTED,
    /// 1..=100000. Feed calls are not counted (see `server::serve`): the work they cause is
    /// bounded by `proxy.external_service.upstream_max_in_flight*` instead.
    pub max_concurrent_requests: i64,
    /// HTTP/2 streams (calls) one connection may have open at once, 1..=10000.
    pub max_concurrent_streams: i64,
    /// HTTP/2 PING interval on idle connections, 0..=3600 seconds (0: no keepalive pings).
    pub http2_keepalive_interval_seconds: i64,
    /// How long a keepalive PING may go unanswered before the connection is closed, 1..=300 s.
    pub http2_keepalive_timeout_seconds: i64,
    /// How long a call's request message may take to arrive after its headers, 1..=300 seconds.
    pub request_body_timeout_seconds: i64,
    /// Longest a call may take, 1..=300 seconds.
    pub request_timeout_seconds: i64,
    /// Watch the configuration file (and credential files) and apply valid changes.
    pub reload: bool,
    /// Answer `RequestProxy` cache hits from their ready bytes in front of tonic's generic unary
    /// path (`crate::hit`); `false` sends every call through tonic.
    pub fast_cache_hits: bool,
}

/// Server reflection access.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reflection {
    /// Anyone may list and describe services (the contract is not a secret).
    #[default]
    Public,
    /// Reflection needs a valid bearer token like every other call.
    Authenticated,
    /// Reflection is not served.
    Disabled,
}

proxy_broker_core::string_enum!(Reflection { "public" => Public, "authenticated" => Authenticated, "disabled" => Disabled });

/// The `server.tls:` block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: String,
    /// PEM private key.
    pub key_file: String,
    /// PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
    #[serde(default)]
    pub client_ca_file: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            shutdown_grace_seconds: 10,
            auth_tokens: Vec::new(),
            auth_tokens_file: None,
            reflection: Reflection::Public,
            tls: None,
            max_message_bytes: 65_536,
            max_concurrent_requests: 1024,
            max_concurrent_streams: 256,
            http2_keepalive_interval_seconds: 30,
            http2_keepalive_timeout_seconds: 10,
            request_body_timeout_seconds: 10,
            request_timeout_seconds: 30,
            fast_cache_hits: true,
            reload: true,
        }
    }
}

impl Validate for BrokerConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        debug_assert!(path.is_empty());
        self.proxy.validate("proxy", problems);
        self.server.validate("server", problems);
        self.brokering.validate("brokering", problems);
        self.store.validate("store", problems);
    }
}

impl Validate for ServerConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        check_range(
            problems,
            format!("{path}.shutdown_grace_seconds"),
            self.shutdown_grace_seconds,
            0,
            300,
        );
        check_range(
            problems,
            format!("{path}.max_message_bytes"),
            self.max_message_bytes,
            1024,
            4_194_304,
        );
        check_range(
            problems,
            format!("{path}.max_concurrent_requests"),
            self.max_concurrent_requests,
            1,
            100_000,
        );
        for (key, value, min, max) in [
            ("max_concurrent_streams", self.max_concurrent_streams, 1, 10_000),
            (
                "http2_keepalive_interval_seconds",
                self.http2_keepalive_interval_seconds,
                0,
                3600,
            ),
            (
                "http2_keepalive_timeout_seconds",
                self.http2_keepalive_timeout_seconds,
                1,
                300,
            ),
            (
                "request_body_timeout_seconds",
                self.request_body_timeout_seconds,
                1,
                300,
            ),
        ] {
            check_range(problems, format!("{path}.{key}"), value, min, max);
        }
        check_range(
            problems,
            format!("{path}.request_timeout_seconds"),
            self.request_timeout_seconds,
            1,
            300,
        );
        for (i, token) in self.auth_tokens.iter().enumerate() {
            // An empty token would admit `authorization: Bearer `. The value is secret: only its
            // length is shown.
            let len = token.expose().trim().chars().count();
            if len < MIN_AUTH_TOKEN_LEN {
                problems.push(
                    format!("{path}.auth_tokens[{i}]"),
                    format!("is {len} characters long (at least {MIN_AUTH_TOKEN_LEN}; value not shown)"),
                );
            }
        }
        if self.listen.port() != 0 && self.listen == self.metrics_listen {
            problems.push(
                format!("{path}.metrics_listen"),
                format!(
                    "'{}' is the same address as server.listen (they must differ)",
                    self.metrics_listen
                ),
            );
        }
    }
}

impl BrokerConfig {
    /// A loader for the broker's layout: `file` (if any) under the environment.
    pub fn loader(file: Option<&Path>) -> Loader {
        let mut server_env = EnvMapping::new(SERVER_ENV_PREFIX, "server");
        for var in NON_KEY_VARS {
            server_env = server_env.exclude(var);
        }
        let loader = Loader::new()
            .env_mapping(EnvMapping::new(PROXY_ENV_PREFIX, "proxy"))
            .env_mapping(server_env)
            .env_mapping(EnvMapping::new(BROKERING_ENV_PREFIX, "brokering"))
            .env_mapping(EnvMapping::new(STORE_ENV_PREFIX, "store"))
            .proxy_block("proxy")
            .exchange_map("brokering.exchanges")
            .table("server")
            .table("proxy.external_service")
            .table("server.tls")
            .table("brokering")
            .table("brokering.outage")
            .table("brokering.exchanges.*")
            .table("brokering.exchanges.*.websocket")
            .table("brokering.exchanges.*.http")
            .table("store")
            .table("store.redis");
        match file {
            Some(path) => loader.file(path),
            None => loader,
        }
    }

    /// Loads from `file` (if any) and the process environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::loader(file).load()
    }

    /// Every token feeds may present: `auth_tokens` plus the lines of `auth_tokens_file`.
    pub fn accepted_tokens(&self) -> Result<Vec<String>, proxy_broker_core::ConfigError> {
        let mut tokens: Vec<String> = self
            .server
            .auth_tokens
            .iter()
            .map(|t| t.expose().to_owned())
            .collect();
        if let Some(file) = &self.server.auth_tokens_file {
            let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
                problems: vec![proxy_broker_core::Problem {
                    path: "server.auth_tokens_file".into(),
                    message: format!("cannot read '{file}': {e}"),
                }],
            })?;
            let before = tokens.len();
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                if line.len() < 16 || line.chars().any(char::is_whitespace) {
                    return Err(ConfigError {
                        problems: vec![proxy_broker_core::Problem {
                            path: "server.auth_tokens_file".into(),
                            message: format!(
                                "'{file}' line {}: a token must be at least 16 characters without whitespace (value not shown)",
                                number + 1
                            ),
                        }],
                    });
                }
                tokens.push(line.to_owned());
            }
            // Fail closed: a configured but empty file (a Secret not populated yet) must not
            // silently turn authentication off.
            if tokens.len() == before {
                return Err(ConfigError {
                    problems: vec![proxy_broker_core::Problem {
                        path: "server.auth_tokens_file".into(),
                        message: format!(
                            "'{file}' holds no token (one per line; blank lines and # comments are ignored)"
                        ),
                    }],
                });
            }
        }
        Ok(tokens)
    }

    /// The configuration as pretty JSON with every secret replaced by `***`.
    pub fn redacted_json(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_default();
        let redacted = proxy_broker_core::redact::redact_json(&value);
        serde_json::to_string_pretty(&redacted).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration holding every kind of secret the broker knows, each one unique.
    const SECRETS_YAML: &str = r#"
server:
  auth_tokens: ["srvtoken-AAAA-0123456789"]
proxy:
  enabled: true
  default:
    http: "socks5://defuser:defpass@p1:1080"
    websocket:
      pool:
        proxies:
          - url: "http://POOLKEY1:@p2:8011"
          - url: "socks5://POOLTOKEN2@p3:1080"
  exchanges:
    kraken:
      http:
        url: "http://kruser:krpass@p4:3128"
  external_service:
    enabled: true
    endpoints: ["https://epuser:eppass@up:8443"]
    auth_method: api_key
    auth_credentials:
      api_key: "apikey-BBBB-0123456789"
      ca_file: "/etc/broker/ca.pem"
"#;

    const SECRETS: &[&str] = &[
        "srvtoken-AAAA",
        "defuser",
        "defpass",
        "POOLKEY1",
        "POOLTOKEN2",
        "kruser",
        "krpass",
        "epuser",
        "eppass",
        "apikey-BBBB",
    ];

    fn secrets_config() -> BrokerConfig {
        BrokerConfig::loader(None)
            .yaml_text("secrets.yaml", SECRETS_YAML)
            .env_vars(Vec::<(String, String)>::new())
            .load()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn debug_of_the_configuration_prints_no_secret() {
        let config = secrets_config();
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            for secret in SECRETS {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            // What is not secret is still there to debug with.
            assert!(shown.contains("/etc/broker/ca.pem"), "{shown}");
            assert!(shown.contains("socks5://***@p1:1080"), "{shown}");
        }
    }

    #[test]
    fn the_redacted_json_masks_every_secret_and_the_config_round_trips() {
        let config = secrets_config();
        let json = config.redacted_json();
        for secret in SECRETS {
            assert!(!json.contains(secret), "{secret} in {json}");
        }
        assert!(json.contains("\"***\""), "{json}");
        // Secrets serialize as themselves, so the configuration survives a serde round trip.
        let plain = serde_json::to_string(&config).unwrap_or_default();
        let back: BrokerConfig = serde_json::from_str(&plain).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, config);
        assert_eq!(
            config.accepted_tokens().unwrap_or_default(),
            vec!["srvtoken-AAAA-0123456789".to_owned()]
        );
    }
}
