//! An arbitrary environment through the broker's loader: variable names under the broker's two
//! prefixes (`CRYPTOFEED_PROXY_` → `proxy.*`, `PROXY_BROKER_` → `server.*`) or none, with any
//! values (JSON lists and objects included), optionally over a small YAML file. Nothing may panic,
//! abort or allocate without bound (list indexes in names are the classic trap).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use proxy_broker::BrokerConfig;

#[derive(Debug, Arbitrary)]
struct Var {
    prefix: u8,
    name: String,
    value: String,
}

#[derive(Debug, Arbitrary)]
struct Input {
    with_file: bool,
    vars: Vec<Var>,
}

const PREFIXES: [&str; 3] = ["CRYPTOFEED_PROXY_", "PROXY_BROKER_", ""];

const BASE: &str = "proxy:\n  enabled: true\n  default:\n    http:\n      pool:\n        proxies:\n          - url: socks5://a:1080\n          - url: socks5://b:1080\n  exchanges:\n    binance: socks5://c:1080\n  external_service:\n    endpoints: [\"http://127.0.0.1:1\"]\n";

fuzz_target!(|input: Input| {
    let vars: Vec<(String, String)> = input
        .vars
        .into_iter()
        .take(64)
        .map(|v| {
            let prefix = PREFIXES[usize::from(v.prefix) % PREFIXES.len()];
            (format!("{prefix}{}", v.name), v.value)
        })
        .collect();
    let mut loader = BrokerConfig::loader(None).env_vars(vars);
    if input.with_file {
        loader = loader.yaml_text("base.yaml", BASE);
    }
    match loader.load::<BrokerConfig>() {
        Ok(config) => {
            let _ = config.redacted_json();
            let _ = format!("{config:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
