//! The `connect` example: its code (compiled into this test) against the real broker, and the
//! compiled example binary as a user runs it.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;

#[allow(dead_code)]
#[path = "../examples/connect.rs"]
mod connect_example;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn example_prints_the_first_websocket_message_and_the_http_body() {
    let proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let broker = TestBroker::embedded(&proxy.url("socks5h", None)).await;
    let ws = WsServer::start(None).await;
    let http = HttpServer::start().await;

    let out = connect_example::run(&args(&[
        "--broker",
        &broker.url(),
        "--exchange",
        "binance",
        "--url",
        &ws.url("ws", "localhost"),
    ]))
    .await
    .unwrap();
    assert!(proxy.carried(greeted_peer(&out)), "{out}");

    let out = connect_example::run(&args(&[
        "--broker",
        &broker.url(),
        "--exchange",
        "binance",
        "--url",
        &http.url("localhost"),
    ]))
    .await
    .unwrap();
    assert!(proxy.carried(greeted_peer(&out)), "{out}");

    let err = connect_example::run(&args(&["--broker", &broker.url(), "--url", "ws://x:1"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("required"), "{err}");
}

/// `target/debug/examples/connect`, next to this test's own binary (`target/debug/deps/…`).
/// `cargo test` builds examples before running tests.
fn example_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let path = profile_dir
        .join("examples")
        .join(format!("connect{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
}

async fn run_binary(bin: &PathBuf, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the example finishes")
        .unwrap()
}

#[tokio::test]
async fn example_binary_runs_through_the_broker_and_falls_back_to_the_environment() {
    let Some(bin) = example_binary() else {
        // Only when this test is built alone (`cargo test --test example`): `cargo test` and
        // `cargo test --workspace` build the example first.
        eprintln!(
            "SKIPPED: target/debug/examples/connect is not built (run `cargo test` or `cargo build --examples`)"
        );
        return;
    };
    let proxy = TestProxy::start(ProxyKind::Socks5 { auth: None }).await;
    let broker = TestBroker::embedded(&proxy.url("socks5", None)).await;
    let ws = WsServer::start(None).await;
    let url = ws.url("ws", "127.0.0.1");

    let out = run_binary(
        &bin,
        &["--broker", &broker.url(), "--exchange", "binance", "--url", &url],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(proxy.carried(greeted_peer(stdout.trim())), "{stdout}");

    // Broker down, local configuration in the environment: through the local proxy.
    let dead = format!("http://{}", dead_addr().await);
    let local_proxy = TestProxy::start(ProxyKind::Socks4 { user_id: None }).await;
    let env = [
        ("CRYPTOFEED_PROXY_ENABLED", "true".to_owned()),
        (
            "CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WEBSOCKET__URL",
            local_proxy.url("socks4", None),
        ),
    ];
    let out = run_binary(
        &bin,
        &["--broker", &dead, "--exchange", "binance", "--url", &url],
        &env,
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(local_proxy.carried(greeted_peer(stdout.trim())), "{stdout}");

    // Broker down, no local configuration: fails closed, exit 1, nothing reaches the target.
    let before = ws.peers().len();
    let out = run_binary(
        &bin,
        &["--broker", &dead, "--exchange", "binance", "--url", &url],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to connect directly"), "{stderr}");
    assert_eq!(ws.peers().len(), before);

    // Bad usage: exit 2.
    let out = run_binary(&bin, &["--exchange", "binance"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
}
