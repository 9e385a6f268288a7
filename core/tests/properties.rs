//! Properties of resolution and loading, for random configurations: override precedence (the
//! exchange entry beats the default; the environment refines the YAML file), pool fairness
//! (round_robin exact, random in proportion to weights), and never picking a disabled or ejected
//! member unless every member is ejected. Each property runs a bounded number of cases and stays
//! well under a few seconds.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use proxy_broker_core::load::{Problems, Validate};
use proxy_broker_core::model::{PoolConfig, PoolMember};
use proxy_broker_core::{
    ConnectionProxies, ConnectionType, EmbeddedResolver, EnvMapping, Loader, ProxyConfig, ProxySettings,
    Strategy as PoolStrategy,
};
use serde::Deserialize;

/// `cases` cases, no regression files (failures print their minimal input).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const TYPES: [ConnectionType; 2] = [ConnectionType::Http, ConnectionType::Websocket];
const IDS: [&str; 4] = ["binance", "kraken", "coinbase", "bybit"];

/// A proxy URL numbered `n` (distinct numbers, distinct URLs).
fn url(n: u16) -> String {
    format!("socks5://p{n}:1080")
}

/// Entries for http and websocket; `None` leaves that type unset.
type Pair = (Option<u16>, Option<u16>);

fn pair() -> impl proptest::strategy::Strategy<Value = Pair> {
    (proptest::option::of(0u16..1000), proptest::option::of(0u16..1000))
}

fn proxies((http, ws): Pair) -> ConnectionProxies {
    ConnectionProxies {
        http: http.map(|n| ProxyConfig::from_url(url(n))),
        websocket: ws.map(|n| ProxyConfig::from_url(url(n))),
    }
}

fn get(pair: &Pair, ct: ConnectionType) -> Option<u16> {
    match ct {
        ConnectionType::Http => pair.0,
        ConnectionType::Websocket => pair.1,
    }
}

/// Exchange ids in a random mix of upper and lower case.
fn spelled(id: &str, mask: u32) -> String {
    id.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 32) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_exchange_entry_beats_the_default_which_beats_direct(
        default in proptest::option::of(pair()),
        exchanges in proptest::collection::btree_map(proptest::sample::select(IDS.to_vec()), pair(), 0..4),
        asked in proptest::sample::select(vec!["binance", "kraken", "coinbase", "bybit", "unknown"]),
        case_mask in any::<u32>(),
    ) {
        let settings = ProxySettings {
            enabled: true,
            default: default.map(proxies),
            exchanges: exchanges.iter().map(|(id, p)| ((*id).to_owned(), proxies(*p))).collect(),
            ..Default::default()
        };
        let resolver = EmbeddedResolver::new(&settings, Duration::from_secs(60));
        for ct in TYPES {
            let want = exchanges
                .get(asked)
                .and_then(|p| get(p, ct))
                .or_else(|| default.as_ref().and_then(|p| get(p, ct)))
                .map(url);
            let got = resolver.resolve(&spelled(asked, case_mask), ct);
            prop_assert_eq!(&got.proxy_url, &want, "{} {}", asked, ct);
            prop_assert_eq!(got.strategy, if want.is_some() { "static" } else { "direct" });
        }
    }
}

/// A cryptofeed-style file: the `proxy:` block.
#[derive(Debug, Deserialize)]
struct File {
    #[serde(default)]
    proxy: ProxySettings,
}

impl Validate for File {
    fn validate(&self, _path: &str, problems: &mut Problems) {
        self.proxy.validate("proxy", problems);
    }
}

/// One scope's entry in YAML (`url` and an optional `timeout_seconds`) and what the environment
/// does to it.
#[derive(Debug, Clone)]
struct Layered {
    yaml: Option<(u16, Option<i64>)>,
    env_url: Option<u16>,
    env_timeout: Option<i64>,
}

fn layered() -> impl proptest::strategy::Strategy<Value = Layered> {
    (
        proptest::option::of((0u16..1000, proptest::option::of(1i64..=300))),
        proptest::option::of(1000u16..2000),
        proptest::option::of(1i64..=300),
    )
        .prop_map(|(yaml, env_url, env_timeout)| Layered {
            yaml,
            env_url,
            // A timeout alone on an entry the file does not have would leave it without a URL.
            env_timeout: if yaml.is_some() || env_url.is_some() {
                env_timeout
            } else {
                None
            },
        })
}

fn yaml_entry(out: &mut String, indent: &str, ct: &str, entry: &Layered) {
    if let Some((n, timeout)) = entry.yaml {
        out.push_str(&format!("{indent}{ct}:\n{indent}  url: \"{}\"\n", url(n)));
        if let Some(t) = timeout {
            out.push_str(&format!("{indent}  timeout_seconds: {t}\n"));
        }
    }
}

fn env_entry(env: &mut Vec<(String, String)>, prefix: &str, ct: &str, entry: &Layered) {
    let ct = ct.to_ascii_uppercase();
    if let Some(n) = entry.env_url {
        env.push((format!("{prefix}__{ct}__URL"), url(n)));
    }
    if let Some(t) = entry.env_timeout {
        env.push((format!("{prefix}__{ct}__TIMEOUT_SECONDS"), t.to_string()));
    }
}

fn expected(entry: &Layered) -> Option<(String, i64)> {
    let n = entry.env_url.or(entry.yaml.map(|(n, _)| n))?;
    let timeout = entry
        .env_timeout
        .or(entry.yaml.and_then(|(_, t)| t))
        .unwrap_or(proxy_broker_core::model::DEFAULT_PROXY_TIMEOUT_SECONDS);
    Some((url(n), timeout))
}

fn actual(entry: Option<&ProxyConfig>) -> Option<(String, i64)> {
    entry.map(|p| (p.url.clone().unwrap_or_default(), p.timeout_seconds))
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn the_environment_refines_the_yaml_file_key_by_key(
        default in (layered(), layered()),
        exchanges in proptest::collection::btree_map(
            proptest::sample::select(IDS.to_vec()), (layered(), layered(), any::<u32>()), 0..4),
    ) {
        let mut yaml = String::from("proxy:\n  enabled: true\n  default:\n");
        yaml_entry(&mut yaml, "    ", "http", &default.0);
        yaml_entry(&mut yaml, "    ", "websocket", &default.1);
        if !exchanges.is_empty() {
            yaml.push_str("  exchanges:\n");
        }
        let mut env = Vec::new();
        env_entry(&mut env, "CRYPTOFEED_PROXY_DEFAULT", "http", &default.0);
        env_entry(&mut env, "CRYPTOFEED_PROXY_DEFAULT", "websocket", &default.1);
        for (id, (http, ws, mask)) in &exchanges {
            // YAML spells the id in any case; the environment in upper case: one exchange.
            let empty = if http.yaml.is_none() && ws.yaml.is_none() { " {}" } else { "" };
            yaml.push_str(&format!("    {}:{empty}\n", spelled(id, *mask)));
            yaml_entry(&mut yaml, "      ", "http", http);
            yaml_entry(&mut yaml, "      ", "websocket", ws);
            let prefix = format!("CRYPTOFEED_PROXY_EXCHANGES__{}", id.to_ascii_uppercase());
            env_entry(&mut env, &prefix, "http", http);
            env_entry(&mut env, &prefix, "websocket", ws);
        }
        // Empty mappings (`default:` with nothing under it) read as null, which is allowed.
        let file: File = Loader::new()
            .env_mapping(EnvMapping::new("CRYPTOFEED_PROXY_", "proxy"))
            .env_vars(env.clone())
            .proxy_block("proxy")
            .yaml_text("random.yaml", &yaml)
            .load()
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}\n{env:?}")))?;
        let settings = file.proxy;
        let scope = |c: Option<&ConnectionProxies>, ct| actual(c.and_then(|c| c.get(ct)));
        prop_assert_eq!(scope(settings.default.as_ref(), ConnectionType::Http), expected(&default.0));
        prop_assert_eq!(scope(settings.default.as_ref(), ConnectionType::Websocket), expected(&default.1));
        for (id, (http, ws, _)) in &exchanges {
            let got = settings.exchanges.get(*id);
            prop_assert_eq!(scope(got, ConnectionType::Http), expected(http), "{} http", id);
            prop_assert_eq!(scope(got, ConnectionType::Websocket), expected(ws), "{} websocket", id);
        }
        let unexpected: Vec<&String> = settings
            .exchanges
            .keys()
            .filter(|k| !exchanges.contains_key(k.as_str()))
            .collect();
        prop_assert!(unexpected.is_empty(), "{:?}", unexpected);
    }
}

fn pool(strategy: PoolStrategy, members: Vec<PoolMember>) -> EmbeddedResolver {
    let settings = ProxySettings {
        enabled: true,
        default: Some(ConnectionProxies {
            http: Some(ProxyConfig {
                url: None,
                timeout_seconds: 30,
                pool: Some(PoolConfig {
                    proxies: members,
                    strategy,
                }),
            }),
            websocket: None,
        }),
        ..Default::default()
    };
    EmbeddedResolver::new(&settings, Duration::from_secs(300))
}

fn member(i: usize, weight: f64, enabled: bool) -> PoolMember {
    PoolMember {
        url: url(i as u16),
        weight,
        enabled,
    }
}

fn pick(r: &EmbeddedResolver) -> String {
    r.resolve("any", ConnectionType::Http)
        .proxy_url
        .unwrap_or_default()
}

fn counts(r: &EmbeddedResolver, k: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..k {
        *counts.entry(pick(r)).or_insert(0) += 1;
    }
    counts
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn round_robin_gives_each_enabled_member_floor_or_ceil_of_its_share(
        enabled in proptest::collection::vec(any::<bool>(), 1..9)
            .prop_filter("at least one enabled", |e| e.iter().any(|&x| x)),
        k in 0usize..300,
    ) {
        let members: Vec<_> = enabled.iter().enumerate().map(|(i, &on)| member(i, 1.0, on)).collect();
        let r = pool(PoolStrategy::RoundRobin, members);
        let got = counts(&r, k);
        let on: Vec<String> = enabled.iter().enumerate().filter(|(_, on)| **on).map(|(i, _)| url(i as u16)).collect();
        let n = on.len();
        for u in &on {
            let c = got.get(u).copied().unwrap_or(0);
            prop_assert!(c == k / n || c == k.div_ceil(n), "{} got {} of {} over {} members", u, c, k, n);
        }
        prop_assert!(got.keys().all(|u| on.contains(u)), "a disabled member was picked: {:?}", got);
    }
}

proptest! {
    // 20,000 picks per case: each member's share is within 0.025 of its weight's share. The
    // standard deviation of a share is at most sqrt(0.25 / 20000) ≈ 0.0035, so the bound is seven
    // of them: a false failure is about a one-in-10^11 event per member.
    #![proptest_config(config(12))]

    #[test]
    fn random_picks_in_proportion_to_weight(
        weights in proptest::collection::vec(0.1f64..=10.0, 2..6),
    ) {
        const PICKS: usize = 20_000;
        let members: Vec<_> = weights.iter().enumerate().map(|(i, &w)| member(i, w, true)).collect();
        let r = pool(PoolStrategy::Random, members);
        let got = counts(&r, PICKS);
        let total: f64 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let share = got.get(&url(i as u16)).copied().unwrap_or(0) as f64 / PICKS as f64;
            let want = w / total;
            prop_assert!((share - want).abs() < 0.025, "member {} weight {}: share {} want {}", i, w, share, want);
        }
    }
}

/// One step of a random pool session.
#[derive(Debug, Clone)]
enum Op {
    Pick,
    Eject(usize, u8),
    Release(usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Pick),
        2 => (0usize..8, prop_oneof![Just(100u8), 0u8..=100]).prop_map(|(i, p)| Op::Eject(i, p)),
        1 => (0usize..8).prop_map(Op::Release),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_disabled_or_ejected_member_is_never_picked_unless_every_member_is_ejected(
        enabled in proptest::collection::vec(any::<bool>(), 1..9)
            .prop_filter("at least one enabled", |e| e.iter().any(|&x| x)),
        strategy in proptest::sample::select(vec![PoolStrategy::RoundRobin, PoolStrategy::Random, PoolStrategy::LeastConnections]),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let members: Vec<_> = enabled.iter().enumerate().map(|(i, &on)| member(i, 1.0, on)).collect();
        let r = pool(strategy, members);
        let on: Vec<String> = enabled.iter().enumerate().filter(|(_, on)| **on).map(|(i, _)| url(i as u16)).collect();
        let mut ejected: BTreeMap<String, ()> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Pick => {
                    let got = pick(&r);
                    prop_assert!(on.contains(&got), "{:?} picked disabled {}", strategy, got);
                    let all_ejected = on.iter().all(|u| r.is_ejected(u));
                    if !all_ejected {
                        prop_assert!(!r.is_ejected(&got), "{:?} picked ejected {} ({:?})", strategy, got, ejected);
                    }
                }
                Op::Eject(i, percent) => {
                    let url = url(i as u16);
                    if r.eject(&url, percent) > 0 {
                        prop_assert!(on.contains(&url), "disabled {} ejected", url);
                        ejected.insert(url, ());
                        // A granted ejection never takes the pool past the percentage.
                        let now_ejected = on.iter().filter(|u| r.is_ejected(u)).count();
                        prop_assert!(
                            now_ejected <= on.len() * usize::from(percent) / 100,
                            "{} of {} ejected at {}%", now_ejected, on.len(), percent
                        );
                    }
                }
                Op::Release(i) => {
                    r.release(&url(i as u16));
                }
            }
        }
    }
}
