//! The broker's configuration file: cryptofeed's `proxy:` block (with `external_service`) and the
//! broker's own `server:` block, layered defaults → YAML → environment.

use std::net::SocketAddr;
use std::path::Path;

use proxy_broker_core::load::{Problems, Validate};
use proxy_broker_core::validate::check_range;
use proxy_broker_core::{ConfigError, EnvMapping, Loader, ProxySettings};
use serde::{Deserialize, Serialize};

/// Environment prefix of cryptofeed's proxy settings, mapped onto `proxy.*`.
pub const PROXY_ENV_PREFIX: &str = "CRYPTOFEED_PROXY_";
/// Environment prefix of the broker's own settings, mapped onto `server.*`.
pub const SERVER_ENV_PREFIX: &str = "PROXY_BROKER_";
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            shutdown_grace_seconds: 10,
        }
    }
}

impl Validate for BrokerConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        debug_assert!(path.is_empty());
        self.proxy.validate("proxy", problems);
        self.server.validate("server", problems);
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
            .proxy_block("proxy")
            .table("server")
            .table("proxy.external_service");
        match file {
            Some(path) => loader.file(path),
            None => loader,
        }
    }

    /// Loads from `file` (if any) and the process environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::loader(file).load()
    }

    /// The configuration as pretty JSON with every secret replaced by `***`.
    pub fn redacted_json(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_default();
        let redacted = proxy_broker_core::redact::redact_json(&value);
        serde_json::to_string_pretty(&redacted).unwrap_or_default()
    }
}
