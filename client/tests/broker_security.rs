//! The client against a locked-down broker: bearer-token auth and TLS to the broker.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proxy_broker_client::{ConnectionType, Error, Source};

/// A CA, and a `localhost`/127.0.0.1 server certificate and key signed by it, as PEM.
fn broker_certificates() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "broker test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

const TOKEN: &str = "feed-token-0123456789";

#[tokio::test]
async fn a_client_with_the_token_and_the_ca_resolves_through_a_tls_broker_with_auth() {
    let (ca, cert, key) = broker_certificates();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let broker = TestBroker::start(&format!(
        "server:\n  shutdown_grace_seconds: 0\n  auth_tokens: [\"{TOKEN}\"]\n  tls:\n    cert_file: \"{}\"\n    key_file: \"{}\"\n\
         proxy:\n  enabled: true\n  default:\n    websocket: \"socks5://embedded-proxy:1080\"\n",
        cert_file.display(),
        key_file.display()
    ))
    .await;
    let url = format!("https://localhost:{}", broker.addr.port());

    let good = client(&url)
        .auth_token(TOKEN)
        .broker_ca_pem(ca.clone())
        .build()
        .unwrap();
    let resolved = good
        .resolve("binance", ConnectionType::Websocket, None)
        .await
        .unwrap();
    assert_eq!(resolved.source, Source::Embedded);
    assert_eq!(
        resolved.proxy.unwrap().to_string(),
        "socks5://embedded-proxy:1080"
    );

    // A wrong token is the feed's misconfiguration: surfaced, never papered over with a local
    // fallback or a direct connection.
    let wrong = client(&url)
        .auth_token("not-the-token-000000")
        .broker_ca_pem(ca.clone())
        .local_config(local_env("socks5://local-proxy:1080"))
        .allow_direct_fallback(true)
        .build()
        .unwrap();
    match wrong.resolve("binance", ConnectionType::Websocket, None).await {
        Err(Error::Broker { code, .. }) => assert_eq!(code, tonic::Code::Unauthenticated),
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }

    // A client that does not trust the broker's CA cannot talk to it at all (here: it falls back
    // to its local configuration, as for any unreachable broker).
    let untrusting = client(&url)
        .auth_token(TOKEN)
        .local_config(local_env("socks5://local-proxy:1080"))
        .build()
        .unwrap();
    let local = untrusting
        .resolve("binance", ConnectionType::Websocket, None)
        .await
        .unwrap();
    assert_eq!(local.source, Source::Local);
    broker.stop().await;
}
