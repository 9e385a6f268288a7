//! A YAML configuration file through the broker's own loader (layering, normalization,
//! deserialization, validation), then everything the broker does with a loaded configuration
//! before serving: the embedded resolver, the redacted JSON and `Debug`. Nothing may panic, abort
//! or allocate without bound.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxy_broker::BrokerConfig;
use proxy_broker_core::{ConnectionType, EmbeddedResolver};

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
            let _ = config.redacted_json();
            let _ = format!("{config:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
