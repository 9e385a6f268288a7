//! A YAML configuration file through the broker's own loader (layering, normalization,
//! deserialization, validation), then everything the broker does with a loaded configuration
//! before serving: the embedded resolver, the redacted JSON and `Debug`. Nothing may panic, abort
//! or allocate without bound, and neither `Debug` nor the redacted JSON shows the userinfo of any
//! proxy or endpoint URL in the configuration (no more than `redact_url` shows).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxy_broker::BrokerConfig;
use proxy_broker_core::redact::redact_url;
use proxy_broker_core::{ConnectionType, EmbeddedResolver};

/// Every proxy and endpoint URL in a configuration.
fn urls(config: &BrokerConfig) -> Vec<&str> {
    let p = &config.proxy;
    let mut out: Vec<&str> = p.external_service.endpoints.iter().map(String::as_str).collect();
    for scope in p.default.iter().chain(p.exchanges.values()) {
        for entry in [&scope.http, &scope.websocket].into_iter().flatten() {
            out.extend(entry.url.as_deref());
            for member in entry.pool.iter().flat_map(|pool| &pool.proxies) {
                out.push(&member.url);
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = BrokerConfig::loader(None)
        .yaml_text("fuzz.yaml", text)
        .env_vars(Vec::<(String, String)>::new())
        .load::<BrokerConfig>();
    match loaded {
        Ok(config) => {
            let ttl = Duration::from_secs(config.proxy.external_service.cache_ttl_seconds.unsigned_abs());
            let resolver = EmbeddedResolver::new(&config.proxy, ttl);
            for id in config.proxy.exchanges.keys().map(String::as_str).chain(["other"]) {
                for ct in [ConnectionType::Http, ConnectionType::Websocket] {
                    if let Some(url) = resolver.resolve(id, ct).proxy_url {
                        resolver.release(&url);
                        resolver.eject(&url, 50);
                    }
                }
            }
            let json = config.redacted_json();
            let debug = format!("{config:?}");
            for url in urls(&config) {
                let Some((_, rest)) = url.split_once("://") else {
                    continue;
                };
                let Some((userinfo, _)) = rest.rsplit_once('@') else {
                    continue;
                };
                let shown = format!("{userinfo}@");
                // `proxy_url` checks `redact_url` itself; here: Debug and JSON show no more.
                if userinfo.len() >= 4 && !redact_url(url).contains(&shown) {
                    assert!(!debug.contains(&shown), "Debug shows {shown:?}: {debug}");
                    assert!(!json.contains(&shown), "JSON shows {shown:?}: {json}");
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
