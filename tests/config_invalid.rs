mod common;

// Every invalid configuration is refused at load time with a message that names the key path and
// the offending value or the rule, and never echoes a secret.

/// The error message (ConfigError's Display) for a configuration that must not load.
fn error(yaml: Option<&str>, env: &[(&str, &str)]) -> String {
    match common::load(yaml, env) {
        Ok(config) => panic!(
            "configuration must be rejected but loaded: {}",
            config.redacted_json()
        ),
        Err(e) => e.to_string(),
    }
}

/// Asserts the configuration is rejected with a message containing every one of `needles`.
fn assert_rejected(yaml: Option<&str>, env: &[(&str, &str)], needles: &[&str]) -> String {
    let message = error(yaml, env);
    assert!(
        message.starts_with("invalid configuration"),
        "unexpected message: {message}"
    );
    for needle in needles {
        assert!(message.contains(needle), "message lacks {needle:?}: {message}");
    }
    message
}

fn assert_yaml_rejected(yaml: &str, needles: &[&str]) -> String {
    assert_rejected(Some(yaml), &[], needles)
}

fn assert_loads(yaml: &str) {
    if let Err(e) = common::load(Some(yaml), &[]) {
        panic!("configuration must load: {e}\n{yaml}");
    }
}

/// A YAML document with one default http entry.
fn http_entry(entry: &str) -> String {
    format!("proxy:\n  default:\n    http:\n{entry}")
}

/// A YAML document whose default websocket entry is a pool with these member lines.
fn pool(extra: &str, members: &str) -> String {
    format!("proxy:\n  default:\n    websocket:\n      pool:\n{extra}        proxies:\n{members}")
}

// --- Unknown keys, at every level ---------------------------------------------------------------

#[test]
fn unknown_key_at_the_root_is_rejected() {
    assert_yaml_rejected(
        "proxy: {}\nproxies: {}\n",
        &[
            "proxies",
            "unknown field `proxies`",
            "`proxy`, `server`, `brokering`",
        ],
    );
}

#[test]
fn unknown_key_in_the_proxy_block_is_rejected_with_its_path() {
    assert_yaml_rejected(
        "proxy:\n  enable: true\n",
        &["proxy.enable: ", "unknown field `enable`"],
    );
}

#[test]
fn unknown_key_in_default_connection_proxies_is_rejected_with_its_path() {
    assert_yaml_rejected(
        "proxy:\n  default:\n    grpc: 'socks5://h:1080'\n",
        &[
            "proxy.default.grpc: ",
            "unknown field `grpc`",
            "`http`, `rest`, `websocket`, `ws`",
        ],
    );
}

#[test]
fn unknown_key_in_an_exchange_entry_is_rejected_with_its_path() {
    assert_yaml_rejected(
        "proxy:\n  exchanges:\n    binance:\n      websockets: 'socks5://h:1080'\n",
        &[
            "proxy.exchanges.binance.websockets: ",
            "unknown field `websockets`",
        ],
    );
}

#[test]
fn unknown_key_in_a_proxy_config_is_rejected_with_its_path() {
    assert_yaml_rejected(
        &http_entry("      url: 'socks5://h:1080'\n      timeout: 5\n"),
        &[
            "proxy.default.http.timeout: ",
            "unknown field `timeout`",
            "`timeout_seconds`",
        ],
    );
}

#[test]
fn unknown_key_in_a_pool_is_rejected_with_its_path() {
    assert_yaml_rejected(
        &pool(
            "        strategy: random\n        sticky: true\n",
            "          - url: 'socks5://h:1080'\n",
        ),
        &["proxy.default.websocket.pool.sticky: ", "unknown field `sticky`"],
    );
}

#[test]
fn unknown_key_in_a_pool_member_is_rejected_with_its_path() {
    assert_yaml_rejected(
        &pool(
            "",
            "          - url: 'socks5://a:1080'\n          - url: 'socks5://b:1080'\n            weigth: 2\n",
        ),
        &[
            "proxy.default.websocket.pool.proxies[1].weigth: ",
            "unknown field `weigth`",
            "`weight`",
        ],
    );
}

#[test]
fn unknown_key_in_external_service_is_rejected_with_its_path() {
    assert_yaml_rejected(
        "proxy:\n  external_service:\n    endpoint: 'https://a:8080'\n",
        &[
            "proxy.external_service.endpoint: ",
            "unknown field `endpoint`",
            "`endpoints`",
        ],
    );
}

#[test]
fn unknown_key_in_the_server_block_is_rejected_with_its_path() {
    assert_yaml_rejected(
        "server:\n  port: 50051\n",
        &["server.port: ", "unknown field `port`", "`listen`"],
    );
}

#[test]
fn unknown_key_from_the_environment_names_the_variable() {
    assert_rejected(
        None,
        &[
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://h:1080"),
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__RETRIES", "3"),
        ],
        &[
            "proxy.default.http.retries: ",
            "unknown field `retries`",
            "CRYPTOFEED_PROXY_DEFAULT__HTTP__RETRIES",
        ],
    );
    assert_rejected(
        None,
        &[("PROXY_BROKER_PORT", "50051")],
        &["server.port: ", "unknown field `port`", "PROXY_BROKER_PORT"],
    );
}

// --- Numbers out of range -----------------------------------------------------------------------

#[test]
fn proxy_timeout_seconds_outside_1_to_300_is_rejected() {
    for bad in ["0", "301", "-5"] {
        assert_yaml_rejected(
            &http_entry(&format!(
                "      url: 'socks5://h:1080'\n      timeout_seconds: {bad}\n"
            )),
            &[
                &format!("proxy.default.http.timeout_seconds: {bad} is out of range"),
                "1..=300",
            ],
        );
    }
    for good in ["1", "300"] {
        assert_loads(&http_entry(&format!(
            "      url: 'socks5://h:1080'\n      timeout_seconds: {good}\n"
        )));
    }
}

#[test]
fn pool_timeout_seconds_out_of_range_is_rejected() {
    assert_yaml_rejected(
        "proxy:\n  default:\n    websocket:\n      timeout_seconds: 301\n      pool:\n        proxies: [{url: 'socks5://h:1080'}]\n",
        &["proxy.default.websocket.timeout_seconds: 301 is out of range (allowed 1..=300)"],
    );
}

#[test]
fn pool_member_weight_outside_0_1_to_10_is_rejected() {
    for bad in ["0.05", "10.5", "0", "-1"] {
        assert_yaml_rejected(
            &pool(
                "",
                &format!("          - url: 'socks5://h:1080'\n            weight: {bad}\n"),
            ),
            &[
                &format!("proxy.default.websocket.pool.proxies[0].weight: {bad} is out of range"),
                "0.1..=10.0",
            ],
        );
    }
    for good in ["0.1", "10.0", "10"] {
        assert_loads(&pool(
            "",
            &format!("          - url: 'socks5://h:1080'\n            weight: {good}\n"),
        ));
    }
}

#[test]
fn external_service_timeout_seconds_outside_1_to_60_is_rejected() {
    for bad in ["0", "61"] {
        assert_yaml_rejected(
            &format!("proxy:\n  external_service:\n    timeout_seconds: {bad}\n"),
            &[
                &format!("proxy.external_service.timeout_seconds: {bad} is out of range"),
                "1..=60",
            ],
        );
    }
    for good in ["1", "60"] {
        assert_loads(&format!(
            "proxy:\n  external_service:\n    timeout_seconds: {good}\n"
        ));
    }
}

#[test]
fn external_service_cache_ttl_seconds_outside_60_to_3600_is_rejected() {
    for bad in ["59", "3601"] {
        assert_yaml_rejected(
            &format!("proxy:\n  external_service:\n    cache_ttl_seconds: {bad}\n"),
            &[
                &format!("proxy.external_service.cache_ttl_seconds: {bad} is out of range"),
                "60..=3600",
            ],
        );
    }
    for good in ["60", "3600"] {
        assert_loads(&format!(
            "proxy:\n  external_service:\n    cache_ttl_seconds: {good}\n"
        ));
    }
}

#[test]
fn server_shutdown_grace_seconds_outside_0_to_300_is_rejected() {
    for bad in ["-1", "301"] {
        assert_yaml_rejected(
            &format!("server:\n  shutdown_grace_seconds: {bad}\n"),
            &[
                &format!("server.shutdown_grace_seconds: {bad} is out of range"),
                "0..=300",
            ],
        );
    }
    assert_rejected(
        None,
        &[("PROXY_BROKER_SHUTDOWN_GRACE_SECONDS", "301")],
        &["server.shutdown_grace_seconds: 301 is out of range (allowed 0..=300)"],
    );
    for good in ["0", "300"] {
        assert_loads(&format!("server:\n  shutdown_grace_seconds: {good}\n"));
    }
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let message = assert_yaml_rejected(
        "proxy:\n  external_service:\n    timeout_seconds: 61\n    cache_ttl_seconds: 59\n",
        &[
            "(2 problems)",
            "proxy.external_service.timeout_seconds: 61 is out of range",
            "proxy.external_service.cache_ttl_seconds: 59 is out of range",
        ],
    );
    assert_eq!(message.lines().count(), 3, "{message}");
}

// --- Bad enum values ----------------------------------------------------------------------------

#[test]
fn unknown_pool_strategy_is_rejected_with_the_allowed_values() {
    assert_yaml_rejected(
        &pool(
            "        strategy: fastest\n",
            "          - url: 'socks5://h:1080'\n",
        ),
        &[
            "proxy.default.websocket.pool.strategy: ",
            "unknown variant `fastest`",
            "`round_robin`, `random`, `least_connections`",
        ],
    );
}

#[test]
fn unknown_auth_method_is_rejected_with_the_allowed_values() {
    assert_yaml_rejected(
        "proxy:\n  external_service:\n    auth_method: oauth2\n",
        &[
            "proxy.external_service.auth_method: ",
            "unknown variant `oauth2`",
            "`bearer_token`, `api_key`, `mutual_tls`",
        ],
    );
}

#[test]
fn bad_enum_value_from_the_environment_names_the_variable() {
    assert_rejected(
        None,
        &[("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_METHOD", "basic")],
        &[
            "proxy.external_service.auth_method: ",
            "unknown variant `basic`",
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_METHOD",
        ],
    );
}

// --- Proxy URLs ---------------------------------------------------------------------------------

#[test]
fn proxy_url_without_scheme_is_rejected() {
    assert_yaml_rejected(
        &http_entry("      url: 'proxy.example.com:1080'\n"),
        &[
            "proxy.default.http.url: 'proxy.example.com:1080'",
            "allowed: http, https, socks4, socks4a, socks5, socks5h",
        ],
    );
    assert_yaml_rejected(
        &http_entry("      url: '//proxy.example.com:1080'\n"),
        &["proxy.default.http.url: '//proxy.example.com:1080'"],
    );
}

#[test]
fn proxy_url_without_host_is_rejected() {
    assert_yaml_rejected(
        &http_entry("      url: 'socks5://:1080'\n"),
        &["proxy.default.http.url: 'socks5://:1080'", "host"],
    );
}

#[test]
fn proxy_url_without_port_is_rejected() {
    assert_yaml_rejected(
        &http_entry("      url: 'socks5://proxy.example.com'\n"),
        &[
            "proxy.default.http.url: 'socks5://proxy.example.com' has no port",
            "scheme://[user:pass@]host:port",
        ],
    );
    // http's default port is not implied either.
    assert_yaml_rejected(
        &http_entry("      url: 'http://proxy.example.com'\n"),
        &["proxy.default.http.url: 'http://proxy.example.com' has no port"],
    );
}

#[test]
fn proxy_url_with_scheme_ftp_is_rejected() {
    assert_yaml_rejected(
        &http_entry("      url: 'ftp://proxy.example.com:21'\n"),
        &[
            "proxy.default.http.url: 'ftp://proxy.example.com:21' has scheme 'ftp'",
            "allowed: http, https, socks4, socks4a, socks5, socks5h",
        ],
    );
}

#[test]
fn pool_member_url_is_checked_like_a_proxy_url() {
    assert_yaml_rejected(
        &pool(
            "",
            "          - url: 'socks5://ok:1080'\n          - url: 'ftp://bad:21'\n",
        ),
        &["proxy.default.websocket.pool.proxies[1].url: 'ftp://bad:21' has scheme 'ftp'"],
    );
    assert_yaml_rejected(
        &pool("", "          - url: 'socks5://no-port'\n"),
        &["proxy.default.websocket.pool.proxies[0].url: 'socks5://no-port' has no port"],
    );
}

#[test]
fn every_allowed_scheme_is_accepted() {
    for scheme in ["http", "https", "socks4", "socks4a", "socks5", "socks5h"] {
        assert_loads(&http_entry(&format!("      url: '{scheme}://u:p@h:1'\n")));
    }
}

#[test]
fn bad_proxy_url_from_the_environment_names_the_key_path() {
    assert_rejected(
        None,
        &[("CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WS__URL", "socks5://no-port")],
        &["proxy.exchanges.binance.websocket.url: 'socks5://no-port' has no port"],
    );
}

// --- Entry and pool shape -----------------------------------------------------------------------

#[test]
fn pool_with_no_proxies_is_rejected() {
    assert_yaml_rejected(
        "proxy:\n  default:\n    websocket:\n      pool:\n        proxies: []\n",
        &[
            "proxy.default.websocket.pool.proxies: is empty",
            "at least one proxy",
        ],
    );
}

#[test]
fn pool_without_a_proxies_key_is_rejected() {
    assert_yaml_rejected(
        "proxy:\n  default:\n    websocket:\n      pool:\n        strategy: random\n",
        &["proxy.default.websocket.pool", "missing", "proxies"],
    );
}

#[test]
fn pool_whose_members_are_all_disabled_is_rejected() {
    assert_yaml_rejected(
        &pool(
            "",
            "          - {url: 'socks5://a:1080', enabled: false}\n          - {url: 'socks5://b:1080', enabled: false}\n",
        ),
        &[
            "proxy.default.websocket.pool.proxies: has no enabled member",
            "at least one must be enabled",
        ],
    );
}

#[test]
fn entry_with_neither_url_nor_pool_is_rejected() {
    assert_yaml_rejected(
        &http_entry("      timeout_seconds: 10\n"),
        &["proxy.default.http: needs `url` or `pool` (neither is set)"],
    );
    assert_rejected(
        None,
        &[(
            "CRYPTOFEED_PROXY_EXCHANGES__KRAKEN__WEBSOCKET__TIMEOUT_SECONDS",
            "10",
        )],
        &["proxy.exchanges.kraken.websocket: needs `url` or `pool`"],
    );
}

#[test]
fn entry_with_both_url_and_pool_is_rejected() {
    assert_yaml_rejected(
        &http_entry(
            "      url: 'socks5://h:1080'\n      pool:\n        proxies: [{url: 'socks5://p:1080'}]\n",
        ),
        &["proxy.default.http: sets both `url` and `pool`; set one"],
    );
}

// --- external_service ---------------------------------------------------------------------------

#[test]
fn endpoints_that_are_not_http_urls_are_rejected_each_with_its_index() {
    let message = assert_yaml_rejected(
        "proxy:\n  external_service:\n    endpoints:\n      - 'https://ok:8080'\n      - 'socks5://svc:1080'\n      - 'svc.example.com'\n      - 'https://:8080'\n",
        &[
            "(3 problems)",
            "proxy.external_service.endpoints[1]: 'socks5://svc:1080' has scheme 'socks5' (allowed: http, https)",
            "proxy.external_service.endpoints[2]: 'svc.example.com' is not a valid URL",
            "proxy.external_service.endpoints[3]: 'https://:8080'",
        ],
    );
    assert!(!message.contains("endpoints[0]"), "{message}");
}

#[test]
fn external_service_enabled_without_endpoints_is_rejected() {
    assert_yaml_rejected(
        "proxy:\n  external_service:\n    enabled: true\n",
        &[
            "proxy.external_service.endpoints: is empty while `enabled` is true",
            "at least one endpoint",
        ],
    );
    assert_rejected(
        None,
        &[
            ("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENABLED", "true"),
            ("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS", "[]"),
        ],
        &["proxy.external_service.endpoints: is empty while `enabled` is true"],
    );
}

// --- Environment values -------------------------------------------------------------------------

#[test]
fn invalid_json_in_an_env_var_names_the_variable_and_the_key_path() {
    assert_rejected(
        None,
        &[(
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS",
            r#"["https://a:8080", "https://b:8080""#,
        )],
        &[
            "proxy.external_service.endpoints: ",
            "from environment variable CRYPTOFEED_PROXY_EXTERNAL_SERVICE__ENDPOINTS is not valid JSON",
        ],
    );
    assert_rejected(
        None,
        &[(
            "CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET__POOL__PROXIES",
            r#"[{url: "socks5://p1:1080"}]"#,
        )],
        &[
            "proxy.default.websocket.pool.proxies: ",
            "CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET__POOL__PROXIES is not valid JSON",
        ],
    );
}

#[test]
fn wrong_type_from_env_names_the_variable_the_key_path_and_the_value() {
    assert_rejected(
        None,
        &[
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://h:1080"),
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__TIMEOUT_SECONDS", "abc"),
        ],
        &[
            "proxy.default.http.timeout_seconds: ",
            "\"abc\"",
            "expected an integer",
            "(set by environment variable CRYPTOFEED_PROXY_DEFAULT__HTTP__TIMEOUT_SECONDS)",
        ],
    );
    assert_rejected(
        None,
        &[("CRYPTOFEED_PROXY_ENABLED", "maybe")],
        &["proxy.enabled: ", "maybe", "CRYPTOFEED_PROXY_ENABLED"],
    );
}

#[test]
fn env_var_name_with_an_empty_segment_is_rejected() {
    assert_rejected(
        None,
        &[("CRYPTOFEED_PROXY_DEFAULT____HTTP", "socks5://h:1080")],
        &[
            "CRYPTOFEED_PROXY_DEFAULT____HTTP",
            "cannot be mapped to a configuration key",
        ],
    );
}

// --- Exchange ids -------------------------------------------------------------------------------

#[test]
fn yaml_exchange_ids_differing_only_by_case_are_rejected() {
    assert_yaml_rejected(
        "proxy:\n  exchanges:\n    Binance: 'http://a:8080'\n    BINANCE: 'http://b:8080'\n",
        &["proxy.exchanges", "'Binance'", "'BINANCE'", "case-insensitive"],
    );
}

#[test]
fn exchange_id_with_characters_outside_the_charset_is_rejected() {
    assert_yaml_rejected(
        "proxy:\n  exchanges:\n    'bin ance': 'http://a:8080'\n",
        &["proxy.exchanges.bin ance", "[A-Za-z0-9._-]"],
    );
}

// --- server block -------------------------------------------------------------------------------

#[test]
fn bad_server_listen_is_rejected_with_the_value() {
    assert_yaml_rejected(
        "server:\n  listen: 'localhost'\n",
        &["server.listen: 'localhost'", "invalid socket address"],
    );
    assert_rejected(
        None,
        &[("PROXY_BROKER_LISTEN", "0.0.0.0:99999")],
        &[
            "server.listen: '0.0.0.0:99999'",
            "(set by environment variable PROXY_BROKER_LISTEN)",
        ],
    );
}

#[test]
fn metrics_listen_equal_to_listen_is_rejected() {
    assert_yaml_rejected(
        "server:\n  listen: '127.0.0.1:7000'\n  metrics_listen: '127.0.0.1:7000'\n",
        &["server.metrics_listen: '127.0.0.1:7000' is the same address as server.listen"],
    );
}

// --- Secrets are never echoed -------------------------------------------------------------------

#[test]
fn invalid_proxy_url_with_a_password_is_shown_with_the_password_masked() {
    let message = assert_yaml_rejected(
        &http_entry("      url: 'ftp://alice:hunter2@proxy.example.com:21'\n"),
        &["proxy.default.http.url: 'ftp://***@proxy.example.com:21' has scheme 'ftp'"],
    );
    assert!(!message.contains("hunter2"), "{message}");

    let message = assert_rejected(
        None,
        &[(
            "CRYPTOFEED_PROXY_DEFAULT__HTTP__URL",
            "socks5://alice:hunter2@proxy.example.com",
        )],
        &["proxy.default.http.url: 'socks5://***@proxy.example.com' has no port"],
    );
    assert!(!message.contains("hunter2"), "{message}");

    let message = assert_yaml_rejected(
        &pool("", "          - url: 'gopher://bob:hunter2@p:70'\n"),
        &["proxy.default.websocket.pool.proxies[0].url: 'gopher://***@p:70'"],
    );
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn invalid_json_holding_a_proxy_password_is_shown_with_the_password_masked() {
    let message = assert_rejected(
        None,
        &[(
            "CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET__POOL__PROXIES",
            r#"[{"url":"socks5://alice:hunter2@p1:1080"}"#,
        )],
        &["not valid JSON", "***@p1:1080"],
    );
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn bad_auth_credentials_values_are_never_echoed() {
    type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        (
            Some("proxy:\n  external_service:\n    auth_credentials:\n      token: [s3cr3t-t0ken]\n"),
            &[],
        ),
        (
            Some("proxy:\n  external_service:\n    auth_credentials: s3cr3t-t0ken\n"),
            &[],
        ),
        (
            None,
            &[(
                "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS",
                "s3cr3t-t0ken",
            )],
        ),
        (
            None,
            &[(
                "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS",
                r#"{"token": "s3cr3t-t0ken""#,
            )],
        ),
        (
            None,
            &[(
                "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS__API_KEY",
                r#"["s3cr3t-t0ken""#,
            )],
        ),
    ];
    for (yaml, env) in cases {
        let message = assert_rejected(yaml, env, &["proxy.external_service.auth_credentials"]);
        assert!(
            !message.contains("s3cr3t"),
            "secret echoed for {yaml:?} {env:?}: {message}"
        );
    }
}

// --- Shapes that must not load ------------------------------------------------------------------

#[test]
fn scalar_in_place_of_the_proxy_block_is_rejected() {
    assert_yaml_rejected("proxy: true\n", &["proxy", "invalid type"]);
}

#[test]
fn list_in_place_of_the_proxy_block_is_rejected() {
    assert_yaml_rejected("proxy: [true]\n", &["proxy", "invalid type"]);
    assert_yaml_rejected("server: ['127.0.0.1:1']\n", &["server", "invalid type"]);
}
