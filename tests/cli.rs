mod common;

// The `proxy-broker` binary as operators run it: flags, the real process environment, exit codes,
// stdout/stderr. Every child gets a cleared environment plus PATH and the variables a test sets.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_proxy-broker");

/// No config run of the binary should take anywhere near this long; it only bounds a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

/// Runs the binary to completion with only PATH and `env` in its environment.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn proxy-broker");
    tokio::time::timeout(HANG_GUARD, child.wait_with_output())
        .await
        .expect("proxy-broker must exit on its own")
        .expect("wait for proxy-broker")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `--check-config` output, asserting success, parsed as JSON.
async fn check_config(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut all = vec!["--check-config"];
    all.extend_from_slice(args);
    let out = run(&all, env).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("configuration is valid"),
        "{}",
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(&out)))
}

fn write_yaml(text: &str) -> tempfile::TempPath {
    let mut f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write temp file");
    f.into_temp_path()
}

#[tokio::test]
async fn check_config_with_the_shipped_example_exits_0_and_prints_the_config_as_json() {
    let path = example("broker.yaml");
    let json = check_config(&["--config", path.to_str().expect("utf-8 path")], &[]).await;
    assert_eq!(json["proxy"]["enabled"], true);
    assert_eq!(
        json["proxy"]["exchanges"]["binance"]["http"]["url"],
        "http://binance-proxy:8080"
    );
    assert_eq!(
        json["proxy"]["exchanges"]["binance"]["http"]["timeout_seconds"],
        15
    );
    assert_eq!(
        json["proxy"]["exchanges"]["coinbase"]["http"]["url"], "http://coinbase-proxy:3128",
        "`rest` shorthand is printed as http"
    );
    assert_eq!(json["server"]["listen"], "0.0.0.0:50051");
    // Defaults are filled in.
    assert_eq!(json["proxy"]["external_service"]["cache_ttl_seconds"], 300);
}

#[tokio::test]
async fn check_config_accepts_the_shipped_upstream_example() {
    let path = example("broker-upstream.yaml");
    let json = check_config(&["--config", path.to_str().expect("utf-8 path")], &[]).await;
    assert_eq!(json["proxy"]["external_service"]["enabled"], true);
    assert_eq!(
        json["proxy"]["external_service"]["endpoints"],
        serde_json::json!(["https://proxy-service-1:8080", "https://proxy-service-2:8080"])
    );
}

#[tokio::test]
async fn process_env_vars_configure_the_broker_without_a_file() {
    let json = check_config(
        &[],
        &[
            ("CRYPTOFEED_PROXY_ENABLED", "true"),
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://env-proxy:1080"),
            (
                "CRYPTOFEED_PROXY_EXCHANGES__BINANCE_FUTURES__WEBSOCKET__POOL__PROXIES",
                r#"[{"url":"socks5://p1:1080"},{"url":"socks5://p2:1080","weight":2}]"#,
            ),
            ("PROXY_BROKER_LISTEN", "127.0.0.1:6001"),
        ],
    )
    .await;
    assert_eq!(json["proxy"]["enabled"], true);
    assert_eq!(json["proxy"]["default"]["http"]["url"], "socks5://env-proxy:1080");
    assert_eq!(json["proxy"]["default"]["http"]["timeout_seconds"], 30);
    let pool = &json["proxy"]["exchanges"]["binance_futures"]["websocket"]["pool"];
    assert_eq!(pool["proxies"][1]["url"], "socks5://p2:1080");
    assert_eq!(pool["proxies"][1]["weight"], 2.0);
    assert_eq!(json["server"]["listen"], "127.0.0.1:6001");
}

#[tokio::test]
async fn without_file_or_env_the_defaults_are_printed() {
    let json = check_config(&[], &[]).await;
    assert_eq!(json["proxy"]["enabled"], false);
    assert_eq!(json["server"]["listen"], "0.0.0.0:50051");
    assert_eq!(json["server"]["shutdown_grace_seconds"], 10);
}

#[tokio::test]
async fn process_env_wins_over_the_config_file() {
    let path = example("broker.yaml");
    let json = check_config(
        &["--config", path.to_str().expect("utf-8 path")],
        &[
            (
                "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__HTTP__URL",
                "http://env-binance:9090",
            ),
            ("PROXY_BROKER_SHUTDOWN_GRACE_SECONDS", "3"),
        ],
    )
    .await;
    let http = &json["proxy"]["exchanges"]["binance"]["http"];
    assert_eq!(http["url"], "http://env-binance:9090");
    assert_eq!(http["timeout_seconds"], 15, "the file's other keys stay");
    assert_eq!(json["server"]["shutdown_grace_seconds"], 3);
}

#[tokio::test]
async fn lower_case_env_var_names_are_honoured() {
    let json = check_config(
        &[],
        &[
            ("cryptofeed_proxy_enabled", "true"),
            ("cryptofeed_proxy_default__websocket__url", "socks5://lower:1081"),
        ],
    )
    .await;
    assert_eq!(json["proxy"]["enabled"], true);
    assert_eq!(
        json["proxy"]["default"]["websocket"]["url"],
        "socks5://lower:1081"
    );
}

#[tokio::test]
async fn proxy_broker_config_env_var_works_like_the_config_flag() {
    let path = example("broker.yaml");
    let via_env = check_config(
        &[],
        &[("PROXY_BROKER_CONFIG", path.to_str().expect("utf-8 path"))],
    )
    .await;
    let via_flag = check_config(&["--config", path.to_str().expect("utf-8 path")], &[]).await;
    assert_eq!(via_env, via_flag);
    assert_eq!(
        via_env["proxy"]["exchanges"]["binance"]["http"]["url"],
        "http://binance-proxy:8080"
    );
}

#[tokio::test]
async fn missing_config_file_exits_2_naming_the_file() {
    let out = run(&["--check-config", "--config", "/nonexistent/broker.yaml"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/broker.yaml"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
}

#[tokio::test]
async fn invalid_config_exits_2_with_the_key_path_and_binds_no_port() {
    // Hold a loopback port and point the broker at it: had the broker got as far as binding, it
    // would fail with "cannot bind" and exit 1 (see the next test) instead of 2.
    let held = TcpListener::bind("127.0.0.1:0").expect("reserve a port");
    let addr = held.local_addr().expect("local addr").to_string();
    let yaml = write_yaml("proxy:\n  enabled: true\n  default:\n    http: 'ftp://h:21'\n");
    let out = run(
        &["--config", yaml.to_str().expect("utf-8 path")],
        &[("PROXY_BROKER_LISTEN", addr.as_str())],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("proxy.default.http.url"), "{err}");
    assert!(err.contains("has scheme 'ftp'"), "{err}");
    assert!(!err.contains("cannot bind"), "{err}");
    assert_eq!(stdout(&out), "");
}

#[tokio::test]
async fn valid_config_on_a_taken_port_fails_to_bind_and_exits_1() {
    // The contrast to the test above: the same held port with a valid configuration.
    let held = TcpListener::bind("127.0.0.1:0").expect("reserve a port");
    let addr = held.local_addr().expect("local addr").to_string();
    let out = run(&[], &[("PROXY_BROKER_LISTEN", addr.as_str())]).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("cannot bind"), "{}", stderr(&out));
}

#[tokio::test]
async fn invalid_value_from_process_env_exits_2_naming_the_variable() {
    let out = run(
        &["--check-config"],
        &[
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://h:1080"),
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__TIMEOUT_SECONDS", "abc"),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("proxy.default.http.timeout_seconds"), "{err}");
    assert!(
        err.contains("CRYPTOFEED_PROXY_DEFAULT__HTTP__TIMEOUT_SECONDS"),
        "{err}"
    );
    assert_eq!(stdout(&out), "", "nothing is printed for an invalid config");
}

#[tokio::test]
async fn invalid_config_in_check_mode_exits_2_with_every_problem() {
    let yaml = write_yaml(
        "proxy:\n  external_service:\n    timeout_seconds: 0\n    cache_ttl_seconds: 3601\nserver:\n  shutdown_grace_seconds: 301\n",
    );
    let out = run(
        &["--check-config", "--config", yaml.to_str().expect("utf-8 path")],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    for needle in [
        "(3 problems)",
        "proxy.external_service.timeout_seconds: 0 is out of range",
        "proxy.external_service.cache_ttl_seconds: 3601 is out of range",
        "server.shutdown_grace_seconds: 301 is out of range",
    ] {
        assert!(err.contains(needle), "lacks {needle:?}: {err}");
    }
}

#[tokio::test]
async fn check_config_redacts_tokens_and_proxy_passwords() {
    let yaml = write_yaml(
        r#"
proxy:
  enabled: true
  default:
    http: "socks5://alice:hunter2@proxy.example.com:1080"
    websocket:
      pool:
        proxies:
          - url: "socks5h://bob:pa55word@pool-1:1080"
  external_service:
    endpoints: ["https://svc:8080"]
    auth_credentials:
      token: "t0ken-from-file"
"#,
    );
    let out = run(
        &["--check-config", "--config", yaml.to_str().expect("utf-8 path")],
        &[(
            "CRYPTOFEED_PROXY_EXTERNAL_SERVICE__AUTH_CREDENTIALS__API_KEY",
            "k3y-from-env",
        )],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    for secret in ["hunter2", "pa55word", "t0ken-from-file", "k3y-from-env"] {
        assert!(!text.contains(secret), "{secret} printed: {text}");
        assert!(!stderr(&out).contains(secret), "{secret} on stderr");
    }
    let json: serde_json::Value = serde_json::from_str(&text).expect("stdout is JSON");
    let credentials = &json["proxy"]["external_service"]["auth_credentials"];
    assert_eq!(credentials["token"], "***");
    assert_eq!(credentials["api_key"], "***");
    assert_eq!(
        json["proxy"]["default"]["http"]["url"],
        "socks5://***@proxy.example.com:1080"
    );
    assert_eq!(
        json["proxy"]["default"]["websocket"]["pool"]["proxies"][0]["url"],
        "socks5h://***@pool-1:1080"
    );
}
