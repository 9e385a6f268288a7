//! The broker configuration each scenario runs with, written as a file for `--config`.
//!
//! Only keys today's broker accepts are written (it rejects unknown keys); settings added later
//! (e.g. `proxy.external_service.hedge_delay_ms`) are passed with `--broker-env` instead, so the
//! same tool runs against the broker before and after they exist. The file is JSON, which is YAML.

use std::net::SocketAddr;

use serde_json::{Map, Value, json};

/// Bearer token the broker sends to the loopback upstreams (they do not check it).
pub const UPSTREAM_TOKEN: &str = "bench-upstream-token";

/// What a scenario needs from the broker's configuration.
#[derive(Debug, Clone)]
pub struct ConfigSpec {
    /// Upstream base URLs; empty turns delegation off.
    pub endpoints: Vec<String>,
    /// `proxy.external_service.timeout_seconds` (None: the broker's default).
    pub timeout_seconds: Option<u32>,
    /// `proxy.external_service.fallback_to_embedded` (None: the broker's default).
    pub fallback_to_embedded: Option<bool>,
    /// `proxy.default` for both connection types, so a fallback is visible as EMBEDDED.
    pub embedded_default: Option<String>,
    /// Embedded `proxy.exchanges` entries to generate, each with an http and a websocket pool.
    pub exchanges: usize,
    /// Members of each generated pool.
    pub pool_size: usize,
}

impl ConfigSpec {
    /// Delegation to `endpoints`, every other key at the broker's default.
    pub fn delegation(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            timeout_seconds: None,
            fallback_to_embedded: None,
            embedded_default: None,
            exchanges: 0,
            pool_size: 3,
        }
    }

    /// Embedded configuration only, with `exchanges` generated entries.
    pub fn embedded(exchanges: usize) -> Self {
        Self {
            embedded_default: Some("socks5://default.embedded.test:1080".into()),
            exchanges,
            ..Self::delegation(Vec::new())
        }
    }

    /// The whole file, listening on `listen` (gRPC) and `metrics_listen`.
    pub fn render(&self, listen: SocketAddr, metrics_listen: SocketAddr) -> Value {
        let mut proxy = Map::new();
        proxy.insert("enabled".into(), json!(true));
        if let Some(url) = &self.embedded_default {
            proxy.insert("default".into(), json!({"http": url, "websocket": url}));
        }
        if self.exchanges > 0 {
            let exchanges: Map<String, Value> = (0..self.exchanges)
                .map(|i| {
                    let id = exchange_id("ex", i);
                    let entry = json!({
                        "http": {"pool": {"strategy": "round_robin", "proxies": self.pool(&id, "h")}},
                        "websocket": {"pool": {"strategy": "least_connections", "proxies": self.pool(&id, "w")}},
                    });
                    (id, entry)
                })
                .collect();
            proxy.insert("exchanges".into(), Value::Object(exchanges));
        }
        if !self.endpoints.is_empty() {
            let mut external = Map::new();
            external.insert("enabled".into(), json!(true));
            external.insert("endpoints".into(), json!(self.endpoints));
            external.insert("auth_method".into(), json!("bearer_token"));
            external.insert("auth_credentials".into(), json!({"token": UPSTREAM_TOKEN}));
            if let Some(t) = self.timeout_seconds {
                external.insert("timeout_seconds".into(), json!(t));
            }
            if let Some(f) = self.fallback_to_embedded {
                external.insert("fallback_to_embedded".into(), json!(f));
            }
            proxy.insert("external_service".into(), Value::Object(external));
        }
        json!({
            "proxy": proxy,
            "server": {
                "listen": listen.to_string(),
                "metrics_listen": metrics_listen.to_string(),
                // The benchmark never edits the file; no watcher needed.
                "reload": false,
            },
        })
    }

    fn pool(&self, id: &str, kind: &str) -> Value {
        (0..self.pool_size.max(1))
            .map(|m| json!({"url": format!("socks5://{id}-{kind}{m}.pool.test:1080")}))
            .collect()
    }
}

/// A valid, distinct exchange id: `prefix` plus `i` zero-padded to six digits.
pub fn exchange_id(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:06}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> (SocketAddr, SocketAddr) {
        (
            SocketAddr::from(([127, 0, 0, 1], 50051)),
            SocketAddr::from(([127, 0, 0, 1], 9090)),
        )
    }

    /// Loads `config` with the broker's own loader and a clean environment.
    fn load(config: &Value) -> Result<proxy_broker::BrokerConfig, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("broker.yaml");
        std::fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
        proxy_broker::BrokerConfig::loader(Some(&path))
            .env_vars(Vec::<(String, String)>::new())
            .load()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_generated_config_is_accepted_by_the_broker_loader() {
        let (listen, metrics) = addrs();
        let mut hedge =
            ConfigSpec::delegation(vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()]);
        hedge.timeout_seconds = Some(1);
        hedge.fallback_to_embedded = Some(false);
        let mut big = ConfigSpec::delegation(vec!["http://127.0.0.1:1".into()]);
        big.embedded_default = Some("socks5://e.test:1080".into());
        let cases = [
            (
                "delegation",
                ConfigSpec::delegation(vec!["http://127.0.0.1:1".into()]),
            ),
            ("hedge", hedge),
            ("big-answer", big),
            ("startup small", ConfigSpec::embedded(1)),
            ("startup 1000", ConfigSpec::embedded(1000)),
        ];
        for (name, spec) in cases {
            let loaded = load(&spec.render(listen, metrics)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(loaded.server.listen, listen, "{name}");
            assert!(!loaded.server.reload, "{name}");
            assert_eq!(loaded.proxy.exchanges.len(), spec.exchanges, "{name}");
            assert_eq!(loaded.proxy.external_service.endpoints, spec.endpoints, "{name}");
        }
    }

    #[test]
    fn thousand_exchange_config_has_distinct_ids_and_full_pools() {
        let (listen, metrics) = addrs();
        let config = ConfigSpec::embedded(1000).render(listen, metrics);
        let exchanges = config["proxy"]["exchanges"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert_eq!(exchanges.len(), 1000);
        assert!(exchanges.contains_key("ex000999"));
        let pool = &exchanges["ex000999"]["websocket"]["pool"]["proxies"];
        assert_eq!(pool.as_array().map(Vec::len), Some(3));
        assert_eq!(pool[2]["url"], json!("socks5://ex000999-w2.pool.test:1080"));
    }
}
