//! No secret in what the client shows: `Debug` of the builder, the client, answers, feedback and
//! errors, and the `Display` of errors, for every shape of credentials a proxy URL can carry
//! (user and password, a user-only token, an API key as user name, a password only) and for the
//! broker token. The assertions are that the secret text is absent, not the exact mask.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proxy_broker_client::{BrokerClient, ConnectionType, Feedback, LocalConfig, ProxySettings};

const TOKEN: &str = "BROKERTOKEN-0123456789";

/// Everything `shown` must not contain.
fn assert_hidden(shown: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(!shown.contains(secret), "{what}: '{secret}' shown in: {shown}");
    }
}

#[tokio::test]
async fn debug_and_errors_never_show_proxy_credentials_or_the_token() {
    let dead = dead_addr().await;
    let ws = WsServer::start(None).await;
    let http = HttpServer::start().await;
    // (the broker's answer, the secrets in it)
    let rows: &[(String, &[&str])] = &[
        (
            format!("socks5://PROXYUSER:PROXYPASS@{dead}"),
            &["PROXYUSER", "PROXYPASS"],
        ),
        (format!("socks5h://USERONLYTOKEN@{dead}"), &["USERONLYTOKEN"]),
        (format!("http://APIKEYASUSER:@{dead}"), &["APIKEYASUSER"]),
        (format!("http://:ONLYAPASSWORD@{dead}"), &["ONLYAPASSWORD"]),
        (
            format!("https://PCT%40USER:PCT%3APASS@{dead}"),
            &["PCT%40USER", "PCT%3APASS", "PCT@USER", "PCT:PASS"],
        ),
    ];
    let local_url = "socks5://LOCALUSER:LOCALPASS@127.0.0.1:9";
    let mut everywhere = vec![TOKEN, "LOCALUSER", "LOCALPASS", "ENDPOINTUSER", "ENDPOINTPASS"];
    for (_, secrets) in rows {
        everywhere.extend_from_slice(secrets);
    }

    for (url, secrets) in rows {
        let mut scripted = answer(url, 300);
        scripted.upstream_endpoint = "https://ENDPOINTUSER:ENDPOINTPASS@up.example:443".into();
        let broker = ScriptedBroker::start(Script::Answer(scripted)).await;
        let builder = client(&broker.url())
            .auth_token(TOKEN)
            .local_config(local_env(local_url))
            .connect_timeout(Duration::from_secs(5));
        assert_hidden(&format!("{builder:?}"), &everywhere, "builder");
        let client = builder.build().unwrap();

        let resolved = client
            .resolve("binance", ConnectionType::Websocket, None)
            .await
            .unwrap();
        assert_eq!(
            resolved.proxy.as_ref().unwrap().as_str(),
            url,
            "the URL itself is intact"
        );
        let wire = client
            .raw()
            .request_proxy(proxy_broker_client::pb::ProxyRequest {
                exchange_id: "binance".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let shown = format!("{resolved:?} {} {wire:?}", resolved.proxy.as_ref().unwrap());
        assert!(shown.contains(&dead.to_string()), "{shown}");
        assert_hidden(&shown, &everywhere, url);

        // The proxy is dead: both helpers fail, with the proxy named in the error.
        let ws_err = client
            .connect_websocket(&ws.url("ws", "127.0.0.1"), "binance")
            .await
            .unwrap_err();
        let http_err = client
            .http_get("binance", &http.url("127.0.0.1"))
            .await
            .unwrap_err();
        for err in [&ws_err, &http_err] {
            let shown = format!("{err} {err:?}");
            assert!(shown.contains(&dead.port().to_string()), "{shown}");
            assert_hidden(&shown, &everywhere, url);
        }

        // The client now holds the answer, a reqwest client for the proxy and queued feedback.
        assert_hidden(&format!("{client:?}"), &everywhere, "client");
        let feedback = Feedback {
            proxy_url: Some(url.clone()),
            exchange_id: "binance".into(),
            connection_type: ConnectionType::Websocket,
            success: false,
            latency: None,
            error: Some(format!("could not reach {url}")),
            http_status: None,
            retry_after: None,
        };
        // The URL is masked whole; the free-text error by the shared `redact_text`, which masks
        // passwords (and, with the whole-userinfo redactor, user names too).
        let shown = format!("{feedback:?}");
        assert!(shown.contains(&dead.to_string()), "{shown}");
        let (url_part, error_part) = shown.split_once("error:").unwrap();
        assert_hidden(url_part, secrets, "feedback proxy_url");
        assert_hidden(
            error_part,
            &["PROXYPASS", "ONLYAPASSWORD", "PCT%3APASS"],
            "feedback error",
        );
    }
}

#[tokio::test]
async fn settings_and_their_errors_never_show_the_token_or_url_credentials() {
    let secrets = [TOKEN, "URLUSER", "URLPASS", "ENVPASS", "SETTINGSPASS"];
    // A broker URL the client refuses, with credentials in it.
    for url in [
        "ftp://URLUSER:URLPASS@broker:1",
        "http://URLUSER:URLPASS@broker:50051",
        "http://URLUSER:URLPASS@broker:not-a-port",
        "https://URLUSER@broker:1",
        "https://URLUSER@bro ker:1",
    ] {
        let builder = BrokerClient::builder(url)
            .auth_token(TOKEN)
            .local_config(LocalConfig::None);
        assert_hidden(&format!("{builder:?}"), &secrets, url);
        let err = builder.build().expect_err(url);
        assert_hidden(&format!("{err} {err:?}"), &secrets, url);
    }
    // An invalid token is refused without being echoed.
    let err = BrokerClient::builder("http://127.0.0.1:1")
        .auth_token("BROKERTOKEN-0123456789\n")
        .local_config(LocalConfig::None)
        .build()
        .unwrap_err();
    assert_hidden(&format!("{err} {err:?}"), &secrets, "bad token");

    // The local configuration's Debug names its source, never its values.
    let env = LocalConfig::EnvVars(vec![(
        "CRYPTOFEED_PROXY_DEFAULT__HTTP__URL".into(),
        "http://ENVUSER:ENVPASS@p:1".into(),
    )]);
    let settings: ProxySettings = serde_json::from_value(serde_json::json!({
        "enabled": true,
        "default": {"http": "http://SETTINGSUSER:SETTINGSPASS@p:1"},
    }))
    .unwrap();
    for local in [env, LocalConfig::Settings(Box::new(settings))] {
        let builder = BrokerClient::builder("http://127.0.0.1:1")
            .auth_token(TOKEN)
            .local_config(local.clone());
        let shown = format!("{local:?} {builder:?}");
        assert_hidden(&shown, &secrets, "local configuration");
        assert_hidden(&shown, &["ENVUSER", "SETTINGSUSER"], "local configuration");
        let client = builder.build().unwrap();
        assert_hidden(&format!("{client:?}"), &secrets, "client");
    }
}
