//! Outside input the loader must turn into errors naming the key, never into a panic, an abort or a
//! huge allocation: environment list indexes, YAML top-level keys, alias bombs, and secrets in
//! values that do not parse.

use proxy_broker_core::load::{MAX_ENV_LIST_INDEX, MAX_YAML_NODES, Problems, Validate};
use proxy_broker_core::{ConfigError, EnvMapping, Loader, ProxySettings};
use serde::Deserialize;

/// A cryptofeed-style file: the `proxy:` block and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    proxy: ProxySettings,
}

impl Validate for File {
    fn validate(&self, _path: &str, problems: &mut Problems) {
        self.proxy.validate("proxy", problems);
    }
}

/// Environment variables of a test case.
type Env<'a> = &'a [(&'a str, &'a str)];

fn loader(yaml: Option<&str>, env: &[(&str, &str)]) -> Loader {
    let loader = Loader::new()
        .env_mapping(EnvMapping::new("CRYPTOFEED_PROXY_", "proxy"))
        .env_vars(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .proxy_block("proxy")
        .table("proxy.external_service");
    match yaml {
        Some(text) => loader.yaml_text("test.yaml", text),
        None => loader,
    }
}

fn load(yaml: Option<&str>, env: &[(&str, &str)]) -> Result<File, ConfigError> {
    loader(yaml, env).load::<File>()
}

const POOL_YAML: &str = "proxy:\n  enabled: true\n  exchanges:\n    binance:\n      http:\n        pool:\n          proxies:\n            - url: socks5://a:1080\n            - url: socks5://b:1080\n";

#[test]
fn bad_environment_list_indexes_are_errors_naming_the_key_and_variable() {
    let too_big = format!("{}", MAX_ENV_LIST_INDEX + 1);
    let huge_var = "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__POOL__PROXIES__99999999999__URL";
    let past_var = format!("CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__POOL__PROXIES__{too_big}__URL");
    let overflow_var =
        "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__POOL__PROXIES__99999999999999999999999999__URL";
    let gap_var = "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__POOL__PROXIES__5__URL";
    let endpoints_var = "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS__3";
    // (name, yaml, variable, expected problem path, expected part of the message)
    let cases: &[(&str, Option<&str>, &str, &str, &str)] = &[
        (
            "huge index",
            None,
            huge_var,
            "proxy.exchanges.binance.http.pool.proxies[99999999999]",
            "out of range (0..=9999)",
        ),
        (
            "one past the limit",
            None,
            &past_var,
            &format!("proxy.exchanges.binance.http.pool.proxies[{too_big}]"),
            "out of range",
        ),
        (
            "index that does not fit in usize",
            None,
            overflow_var,
            "proxy.exchanges.binance.http.pool.proxies[99999999999999999999999999]",
            "out of range",
        ),
        (
            "gap after a YAML list",
            Some(POOL_YAML),
            gap_var,
            "proxy.exchanges.binance.http.pool.proxies[2]",
            "sets element 5",
        ),
        (
            "gap without YAML",
            None,
            endpoints_var,
            "proxy.external_service.endpoints[0]",
            "numbered from 0 without gaps",
        ),
    ];
    for (name, yaml, var, path, part) in cases {
        let err = load(*yaml, &[(var, "socks5://c:1080")]).expect_err(name);
        let problem = err
            .problems
            .iter()
            .find(|p| p.path == *path)
            .unwrap_or_else(|| panic!("{name}: no problem at {path}: {err}"));
        assert!(problem.message.contains(part), "{name}: {err}");
        if !name.starts_with("gap") {
            assert!(problem.message.contains(var), "{name}: names the variable: {err}");
        }
    }
}

#[test]
fn environment_indexes_within_the_limit_refine_and_extend_yaml_lists() {
    let cases: &[(&str, Env, &[&str])] = &[
        (
            "refine element 1",
            &[(
                "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__POOL__PROXIES__1__URL",
                "socks5://z:1",
            )],
            &["socks5://a:1080", "socks5://z:1"],
        ),
        (
            "append element 2 (leading zeros allowed)",
            &[(
                "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__POOL__PROXIES__002__URL",
                "socks5://c:1",
            )],
            &["socks5://a:1080", "socks5://b:1080", "socks5://c:1"],
        ),
    ];
    for (name, env, want) in cases {
        let file = load(Some(POOL_YAML), env).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pool = file.proxy.exchanges["binance"]
            .http
            .as_ref()
            .and_then(|h| h.pool.as_ref())
            .unwrap_or_else(|| panic!("{name}: no pool"));
        let urls: Vec<&str> = pool.proxies.iter().map(|m| m.url.as_str()).collect();
        assert_eq!(urls, *want, "{name}");
    }
}

#[test]
fn yaml_that_would_allocate_without_bound_is_refused() {
    let laughs = {
        let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = i - 1;
            y += &format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            );
        }
        y + "proxy:\n  enabled: true\n"
    };
    let cases: &[(&str, &str, &str)] = &[
        (
            "top-level list index",
            "proxy[99999999999]: 1\n",
            "top-level key 'proxy[99999999999]'",
        ),
        (
            "negative top-level index",
            "proxy[-99999999999]: 1\n",
            "contains '[' or ']'",
        ),
        (
            "alias bomb",
            &laughs,
            &format!("more than {MAX_YAML_NODES} values"),
        ),
    ];
    for (name, yaml, part) in cases {
        let err = load(Some(yaml), &[]).expect_err(name);
        assert!(err.to_string().contains(part), "{name}: {err}");
        assert!(
            err.to_string().contains("test.yaml"),
            "{name}: names the file: {err}"
        );
    }
}

#[test]
fn a_few_aliases_are_still_fine() {
    let yaml =
        "proxy:\n  enabled: true\n  default:\n    http: &p\n      url: socks5://a:1080\n    websocket: *p\n";
    let file = load(Some(yaml), &[]).unwrap_or_else(|e| panic!("{e}"));
    let default = file.proxy.default.unwrap_or_default();
    assert_eq!(default.websocket, default.http);
}

#[test]
fn values_that_do_not_parse_are_never_echoed_with_their_userinfo() {
    let cases: &[(&str, Option<&str>, Env, &[&str])] = &[
        (
            "unencoded # in a YAML proxy password",
            Some("proxy:\n  enabled: true\n  default: \"socks5://alice:p#ssw0rd@h:1\"\n"),
            &[],
            &["alice", "ssw0rd"],
        ),
        (
            "user-only token from the environment",
            None,
            &[("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "ftp://TOKEN1234@h:21")],
            &["TOKEN1234"],
        ),
        (
            "api key as user in a pool member",
            Some(
                "proxy:\n  enabled: true\n  default:\n    http:\n      pool:\n        proxies:\n          - url: \"http://APIKEY99:@h\"\n",
            ),
            &[],
            &["APIKEY99"],
        ),
        (
            "bad JSON holding a proxy URL",
            None,
            &[(
                "CRYPTOFEED_PROXY_DEFAULT",
                "{\"http\": \"socks5://bob:hunter22@p:1\"",
            )],
            &["bob", "hunter22"],
        ),
        (
            "proxy URL without a scheme",
            Some("proxy:\n  enabled: true\n  default: \"carol:letmein9@h:1\"\n"),
            &[],
            &["carol", "letmein9"],
        ),
    ];
    for (name, yaml, env, secrets) in cases {
        let err = load(*yaml, env).expect_err(name).to_string();
        for secret in *secrets {
            assert!(!err.contains(secret), "{name}: {secret} in {err}");
        }
        assert!(err.contains("***@"), "{name}: shows the masked URL: {err}");
    }
}

#[test]
fn a_proxy_url_where_a_mapping_belongs_is_shown_masked() {
    let cases: &[(&str, &str)] = &[
        (
            "pool member as a bare string",
            "proxy:\n  enabled: true\n  default:\n    http:\n      pool:\n        proxies:\n          - \"socks5://memberuser:memberpw@h:1\"\n",
        ),
        (
            "pool as a bare string",
            "proxy:\n  enabled: true\n  default:\n    http:\n      pool: \"socks5://memberuser:memberpw@h:1\"\n",
        ),
    ];
    for (name, yaml) in cases {
        let err = load(Some(yaml), &[]).expect_err(name).to_string();
        assert!(
            !err.contains("memberuser") && !err.contains("memberpw"),
            "{name}: {err}"
        );
        assert!(err.contains("socks5://***@h:1"), "{name}: {err}");
    }
}

#[test]
fn debug_of_a_loader_shows_no_yaml_text_or_environment_value() {
    let l = loader(
        Some("proxy:\n  default: \"socks5://yamluser:yamlpw@h:1\"\n"),
        &[(
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS__TOKEN",
            "envtoken-123",
        )],
    );
    let shown = format!("{l:?}");
    for secret in ["yamluser", "yamlpw", "envtoken-123"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(
        shown.contains("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS__TOKEN"),
        "{shown}"
    );
}
