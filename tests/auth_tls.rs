//! Locking the broker down: bearer-token client auth (tokens from the config and from a file),
//! health open for probes, the reflection setting, server TLS and mutual TLS with certificates
//! made in the test, and the limits of the one middleware stack (message size, concurrency with
//! load shedding, per-call timeout).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::ops::{PROMPT, Reply, Upstream, bearer, connect, eventually, proxy_for};
use proxy_broker::pb::proxy_broker_admin_client::ProxyBrokerAdminClient;
use proxy_broker::pb::proxy_broker_client::ProxyBrokerClient;
use proxy_broker::pb::{ConnectionType, GetEffectiveConfigRequest, ProxyRequest, ProxyResponse, ProxySource};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CONFIG_TOKEN: &str = "config-token-7c1e9a4f2b";
const FILE_TOKEN: &str = "file-token-3d8b6e0a51";

/// The broker library on a loopback port, whatever its transport.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), proxy_broker::server::ServeError>>,
}

impl Server {
    async fn start(yaml: &str) -> Self {
        let config = common::load(Some(yaml), &[]).unwrap_or_else(|e| panic!("{e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy_broker::run(listener, config, async move {
            let _ = stopped.await;
        }));
        // Wait until it accepts connections (TLS or not, a TCP connect is enough).
        eventually("the server to listen", PROMPT, || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(drop)
        })
        .await;
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PROMPT, self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

fn binance() -> ProxyRequest {
    ProxyRequest {
        exchange_id: "binance".into(),
        connection_type: ConnectionType::Http.into(),
        ..Default::default()
    }
}

/// The example's embedded configuration plus `server` settings.
fn yaml_with_server(server: &str) -> String {
    format!("{}\n{server}\n", proxy_block())
}

fn proxy_block() -> &'static str {
    r#"
proxy:
  enabled: true
  default:
    http: "socks5://proxy.example.com:1080"
  exchanges:
    binance: { http: "http://binance-proxy:8080" }
"#
}

async fn ask(channel: &Channel, token: Option<&str>) -> Result<ProxyResponse, Status> {
    let mut client = ProxyBrokerClient::new(channel.clone());
    let request = match token {
        Some(t) => bearer(binance(), t),
        None => tonic::Request::new(binance()),
    };
    client
        .request_proxy(request)
        .await
        .map(tonic::Response::into_inner)
}

async fn admin(channel: &Channel, token: Option<&str>) -> Result<String, Status> {
    let mut client = ProxyBrokerAdminClient::new(channel.clone());
    let request = match token {
        Some(t) => bearer(GetEffectiveConfigRequest {}, t),
        None => tonic::Request::new(GetEffectiveConfigRequest {}),
    };
    client
        .get_effective_config(request)
        .await
        .map(|r| r.into_inner().config_json)
}

/// Lists services over reflection v1 (optionally with a token); the status code on failure.
async fn reflection_list(channel: &Channel, token: Option<&str>) -> Result<Vec<String>, Code> {
    use tonic_reflection::pb::v1 as pb;
    let request = pb::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(pb::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let stream = tokio_stream::iter([request]);
    let request = match token {
        Some(t) => bearer(stream, t),
        None => tonic::Request::new(stream),
    };
    let mut responses = pb::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(request)
        .await
        .map_err(|s| s.code())?
        .into_inner();
    match responses.message().await.map_err(|s| s.code())? {
        Some(pb::ServerReflectionResponse {
            message_response:
                Some(pb::server_reflection_response::MessageResponse::ListServicesResponse(list)),
            ..
        }) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn health(channel: &Channel) -> Result<ServingStatus, Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status())
}

/// `server:` with both token sources; the token file lives in `dir`.
fn auth_server_block(dir: &Path, reflection: Option<&str>) -> String {
    let file = dir.join("tokens");
    std::fs::write(&file, format!("# feeds\n\n  {FILE_TOKEN}  \n")).unwrap();
    let reflection = reflection.map_or(String::new(), |r| format!("  reflection: {r}\n"));
    format!(
        "server:\n  auth_tokens: [\"{CONFIG_TOKEN}\"]\n  auth_tokens_file: \"{}\"\n{reflection}",
        file.display()
    )
}

#[track_caller]
fn assert_unauthenticated<T: std::fmt::Debug>(result: Result<T, Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
}

// --- Client auth -------------------------------------------------------------------------------

#[tokio::test]
async fn with_auth_on_both_services_reject_missing_or_wrong_tokens_and_accept_config_and_file_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&yaml_with_server(&auth_server_block(dir.path(), None))).await;
    let channel = connect(server.addr).await;

    assert_unauthenticated(ask(&channel, None).await, "RequestProxy without a token");
    assert_unauthenticated(admin(&channel, None).await, "GetEffectiveConfig without a token");
    for wrong in [
        "wrong-token",
        &CONFIG_TOKEN[..CONFIG_TOKEN.len() - 1],
        &format!("{CONFIG_TOKEN}x"),
        "# feeds",
        "",
    ] {
        assert_unauthenticated(
            ask(&channel, Some(wrong)).await,
            &format!("RequestProxy with {wrong:?}"),
        );
        assert_unauthenticated(
            admin(&channel, Some(wrong)).await,
            &format!("GetEffectiveConfig with {wrong:?}"),
        );
    }
    // Not a bearer credential at all.
    let mut basic = tonic::Request::new(binance());
    basic
        .metadata_mut()
        .insert("authorization", format!("Basic {CONFIG_TOKEN}").parse().unwrap());
    assert_unauthenticated(
        ProxyBrokerClient::new(channel.clone()).request_proxy(basic).await,
        "Basic instead of Bearer",
    );
    let rejected = ask(&channel, Some("wrong-token")).await.unwrap_err();
    assert!(
        !rejected.message().contains("wrong-token"),
        "the presented token is not echoed: {rejected:?}"
    );

    for token in [CONFIG_TOKEN, FILE_TOKEN] {
        let answer = ask(&channel, Some(token)).await.expect(token);
        assert_eq!(answer.proxy_url, "http://binance-proxy:8080");
        let config = admin(&channel, Some(token)).await.expect(token);
        assert!(
            !config.contains(CONFIG_TOKEN) && !config.contains(FILE_TOKEN),
            "tokens are redacted in the effective config: {config}"
        );
        // ReportFeedback is behind the same check.
        let mut client = ProxyBrokerClient::new(channel.clone());
        let feedback = proxy_broker::pb::ProxyFeedback {
            proxy_url: "http://binance-proxy:8080".into(),
            exchange_id: "binance".into(),
            connection_type: ConnectionType::Http.into(),
            success: true,
            ..Default::default()
        };
        assert_unauthenticated(
            client.report_feedback(feedback.clone()).await,
            "ReportFeedback without a token",
        );
        client
            .report_feedback(bearer(feedback, token))
            .await
            .expect(token);
    }
    server.stop().await;
}

#[tokio::test]
async fn with_auth_on_health_needs_no_token_and_reflection_is_public_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&yaml_with_server(&auth_server_block(dir.path(), None))).await;
    let channel = connect(server.addr).await;
    assert_eq!(health(&channel).await.unwrap(), ServingStatus::Serving);
    let services = reflection_list(&channel, None).await.unwrap();
    assert!(
        services.contains(&"proxybroker.v1.ProxyBroker".to_owned()),
        "{services:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn reflection_authenticated_needs_the_token_and_disabled_is_unimplemented() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&yaml_with_server(&auth_server_block(
        dir.path(),
        Some("authenticated"),
    )))
    .await;
    let channel = connect(server.addr).await;
    assert_eq!(reflection_list(&channel, None).await, Err(Code::Unauthenticated));
    assert_eq!(
        reflection_list(&channel, Some("wrong-token")).await,
        Err(Code::Unauthenticated)
    );
    let services = reflection_list(&channel, Some(FILE_TOKEN)).await.unwrap();
    assert!(
        services.contains(&"proxybroker.v1.ProxyBrokerAdmin".to_owned()),
        "{services:?}"
    );
    assert_eq!(health(&channel).await.unwrap(), ServingStatus::Serving);
    server.stop().await;

    let server = Server::start(&yaml_with_server(&auth_server_block(
        dir.path(),
        Some("disabled"),
    )))
    .await;
    let channel = connect(server.addr).await;
    assert_eq!(reflection_list(&channel, None).await, Err(Code::Unimplemented));
    assert_eq!(
        reflection_list(&channel, Some(CONFIG_TOKEN)).await,
        Err(Code::Unimplemented)
    );
    ask(&channel, Some(CONFIG_TOKEN)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn with_auth_off_no_token_is_needed_and_a_presented_one_is_ignored() {
    let server = Server::start(&yaml_with_server("server:\n  reflection: authenticated\n")).await;
    let channel = connect(server.addr).await;
    ask(&channel, None).await.unwrap();
    admin(&channel, None).await.unwrap();
    ask(&channel, Some("anything")).await.unwrap();
    // With no token configured, `authenticated` reflection is open too.
    reflection_list(&channel, None).await.unwrap();
    server.stop().await;
}

// --- TLS ---------------------------------------------------------------------------------------

/// A CA and PEM files for a server certificate (SAN localhost, 127.0.0.1) and a client
/// certificate it signed.
struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(names: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new(name: &str) -> Self {
        let (ca_pem, issuer) = ca(name);
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &issuer);
        let (client_cert, client_key) = leaf(&["feed-1"], &issuer);
        Self {
            ca_pem,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// Writes the server's TLS files into `dir`; returns the `server:` block.
fn tls_server_block(dir: &Path, pki: &Pki, client_ca: Option<&str>) -> String {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let cert = write("server.crt", &pki.server_cert);
    let key = write("server.key", &pki.server_key);
    let client_ca = client_ca.map_or(String::new(), |pem| {
        format!("    client_ca_file: \"{}\"\n", write("clients-ca.crt", pem))
    });
    format!("server:\n  tls:\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n{client_ca}")
}

/// Connects over TLS trusting `ca_pem`, optionally presenting a client identity; `domain`
/// overrides the name checked against the certificate (else the URI's IP address).
async fn connect_tls(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    domain: Option<&str>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = domain {
        tls = tls.domain_name(domain);
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A call over a channel that may not even connect: Ok only when the call succeeded.
async fn call_over(channel: Result<Channel, String>) -> Result<ProxyResponse, String> {
    let channel = channel?;
    tokio::time::timeout(PROMPT, ask(&channel, None))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn tls_server_is_reached_by_clients_trusting_its_ca_by_name_and_by_ip() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("broker-test-ca");
    let server = Server::start(&yaml_with_server(&tls_server_block(dir.path(), &pki, None))).await;

    let answer = call_over(connect_tls(server.addr, &pki.ca_pem, None, Some("localhost")).await)
        .await
        .expect("TLS with the server name");
    assert_eq!(answer.proxy_url, "http://binance-proxy:8080");
    call_over(connect_tls(server.addr, &pki.ca_pem, None, None).await)
        .await
        .expect("TLS with the IP address SAN");
    // Health works over TLS too (probes use the same port).
    let channel = connect_tls(server.addr, &pki.ca_pem, None, Some("localhost"))
        .await
        .unwrap();
    assert_eq!(health(&channel).await.unwrap(), ServingStatus::Serving);
    server.stop().await;
}

#[tokio::test]
async fn tls_server_refuses_plaintext_clients_and_clients_trusting_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("broker-test-ca");
    let server = Server::start(&yaml_with_server(&tls_server_block(dir.path(), &pki, None))).await;

    let plaintext = async {
        let channel = Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"));
        call_over(channel).await
    };
    let error = plaintext
        .await
        .expect_err("plaintext must not reach a TLS server");
    assert!(!error.is_empty());

    let stranger = Pki::new("some-other-ca");
    let error = call_over(connect_tls(server.addr, &stranger.ca_pem, None, Some("localhost")).await)
        .await
        .expect_err("a client must not trust a certificate from another CA");
    assert!(!error.is_empty());
    // A name the certificate does not carry.
    call_over(connect_tls(server.addr, &pki.ca_pem, None, Some("broker.example.com")).await)
        .await
        .expect_err("the certificate is not valid for broker.example.com");

    // The server is still fine for a proper client.
    call_over(connect_tls(server.addr, &pki.ca_pem, None, Some("localhost")).await)
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_accepts_only_client_certificates_signed_by_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_pki = Pki::new("server-ca");
    let clients = Pki::new("clients-ca");
    let server = Server::start(&yaml_with_server(&tls_server_block(
        dir.path(),
        &server_pki,
        Some(&clients.ca_pem),
    )))
    .await;

    let answer = call_over(
        connect_tls(
            server.addr,
            &server_pki.ca_pem,
            Some((&clients.client_cert, &clients.client_key)),
            Some("localhost"),
        )
        .await,
    )
    .await
    .expect("a client certificate from the client CA");
    assert_eq!(answer.proxy_url, "http://binance-proxy:8080");

    call_over(connect_tls(server.addr, &server_pki.ca_pem, None, Some("localhost")).await)
        .await
        .expect_err("no client certificate");
    let stranger = Pki::new("stranger-ca");
    call_over(
        connect_tls(
            server.addr,
            &server_pki.ca_pem,
            Some((&stranger.client_cert, &stranger.client_key)),
            Some("localhost"),
        )
        .await,
    )
    .await
    .expect_err("a client certificate from another CA");
    // The server's own CA signed a client certificate too, but it is not the client CA.
    call_over(
        connect_tls(
            server.addr,
            &server_pki.ca_pem,
            Some((&server_pki.client_cert, &server_pki.client_key)),
            Some("localhost"),
        )
        .await,
    )
    .await
    .expect_err("a client certificate from the server CA");
    server.stop().await;
}

// --- Limits ------------------------------------------------------------------------------------

/// A `Struct` with one string field of `len` bytes.
fn metadata_of(len: usize) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "k".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("v".repeat(len))),
            },
        )]
        .into_iter()
        .collect(),
    }
}

#[tokio::test]
async fn a_request_larger_than_max_message_bytes_is_rejected_out_of_range() {
    let server = Server::start(&yaml_with_server("server:\n  max_message_bytes: 1024\n")).await;
    let mut client = ProxyBrokerClient::new(connect(server.addr).await);
    // 2 KiB of metadata is within the request rules (8 KiB) but over the message limit.
    let status = client
        .request_proxy(ProxyRequest {
            metadata: Some(metadata_of(2048)),
            ..binance()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("1024"), "{status:?}");
    // Under the limit it is served, on the same connection.
    client
        .request_proxy(ProxyRequest {
            metadata: Some(metadata_of(500)),
            ..binance()
        })
        .await
        .unwrap();
    server.stop().await;
}

/// Delegation to `upstream` plus `server` and `external_service` extras.
fn delegating(upstream: &Upstream, server: &str, external: &str) -> String {
    format!(
        r#"
{proxy}
  external_service:
    enabled: true
    endpoints: ["{url}"]
    auth_credentials: {{ token: "upstream-token" }}
{external}
{server}
"#,
        proxy = proxy_block().trim_end(),
        url = upstream.url()
    )
}

#[tokio::test]
async fn beyond_upstream_max_in_flight_total_a_new_lookup_is_refused_with_a_retry_hint_but_joiners_and_probes_are_not()
 {
    let upstream = Upstream::start().await;
    upstream.hold();
    let server = Server::start(&delegating(
        &upstream,
        "",
        "    upstream_max_in_flight_total: 1\n    fallback_to_embedded: false\n",
    ))
    .await;
    let channel = connect(server.addr).await;
    let first = {
        let channel = channel.clone();
        tokio::spawn(async move { ask(&channel, None).await })
    };
    eventually("the first lookup to hold the only slot", PROMPT, || async {
        (upstream.in_flight() == 1).then_some(())
    })
    .await;
    // A caller for the same key joins the running lookup: it costs nothing and is not refused.
    let joiner = {
        let channel = channel.clone();
        tokio::spawn(async move { ask(&channel, None).await })
    };
    let started = Instant::now();
    let shed = ProxyBrokerClient::new(channel.clone())
        .request_proxy(ProxyRequest {
            exchange_id: "kraken".into(),
            ..binance()
        })
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(
        shed.message().contains("upstream_max_in_flight_total"),
        "{shed:?}"
    );
    let retry = tonic_types::StatusExt::get_details_retry_info(&shed).expect("a RetryInfo detail");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()), "{retry:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not queued"
    );
    assert_eq!(
        upstream.requests().len(),
        1,
        "the refused call never reached the upstream"
    );
    // Health checks skip the limits: a busy broker still answers its probes.
    for _ in 0..3 {
        let health = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health is never shed")
            .into_inner();
        assert_eq!(health.status(), ServingStatus::Serving);
    }

    upstream.release();
    for call in [first, joiner] {
        let answer = call.await.unwrap().unwrap();
        assert_eq!(answer.proxy_url, proxy_for("binance"));
    }
    // The slot is free again.
    ProxyBrokerClient::new(channel.clone())
        .request_proxy(ProxyRequest {
            exchange_id: "kraken".into(),
            ..binance()
        })
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_hanging_upstream_gets_the_embedded_fallback_within_request_timeout_seconds() {
    let upstream = Upstream::start().await;
    upstream.hold();
    // The upstream may take 10 s per attempt, the server allows 1 s per call: the broker must
    // give up on the upstream in time to answer from the embedded configuration.
    let server = Server::start(&delegating(
        &upstream,
        "server:\n  request_timeout_seconds: 1\n",
        "    timeout_seconds: 10\n",
    ))
    .await;
    let channel = connect(server.addr).await;
    let started = Instant::now();
    let answer = ask(&channel, None)
        .await
        .expect("an answer, not DEADLINE_EXCEEDED");
    let took = started.elapsed();
    assert_eq!(answer.source(), ProxySource::Embedded);
    assert_eq!(answer.proxy_url, "http://binance-proxy:8080");
    assert!(
        took < Duration::from_secs(1),
        "answered within the 1 s limit ({took:?})"
    );
    assert!(
        took >= Duration::from_millis(500),
        "the upstream had most of the second ({took:?})"
    );
    upstream.release();
    server.stop().await;
}

#[tokio::test]
async fn an_upstream_cut_short_by_the_server_limit_counts_against_its_breaker() {
    let upstream = Upstream::start().await;
    upstream.hold();
    let server = Server::start(&delegating(
        &upstream,
        "server:\n  request_timeout_seconds: 1\n",
        "    timeout_seconds: 10\n    failure_threshold: 2\n",
    ))
    .await;
    let channel = connect(server.addr).await;
    for _ in 0..2 {
        let answer = ask(&channel, None).await.unwrap();
        assert_eq!(answer.source(), ProxySource::Embedded);
    }
    // The broker gave the endpoint its whole budget twice: two failures open the breaker, so a
    // hanging upstream stops costing every call its full second.
    let status = ProxyBrokerAdminClient::new(channel.clone())
        .list_upstreams(proxy_broker::pb::ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.upstreams[0].breaker_state(),
        proxy_broker::pb::BreakerState::Open,
        "{status:?}"
    );
    let started = Instant::now();
    assert_eq!(ask(&channel, None).await.unwrap().source(), ProxySource::Embedded);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "open breaker skipped without waiting"
    );
    upstream.release();
    server.stop().await;
}

#[tokio::test]
async fn a_hanging_upstream_without_fallback_is_unavailable_within_request_timeout_seconds() {
    let upstream = Upstream::start_with(std::sync::Arc::new(|_: &serde_json::Value| {
        Reply::answer(&proxy_for("late"))
    }))
    .await;
    upstream.hold();
    let server = Server::start(&delegating(
        &upstream,
        "server:\n  request_timeout_seconds: 1\n",
        "    timeout_seconds: 10\n    fallback_to_embedded: false\n",
    ))
    .await;
    let channel = connect(server.addr).await;
    let started = Instant::now();
    let status = ask(&channel, None).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    upstream.release();
    server.stop().await;
}

#[test]
fn limits_outside_their_documented_ranges_are_configuration_errors_naming_the_key() {
    for (key, value) in [
        ("max_message_bytes", "0"),
        ("max_message_bytes", "1023"),
        ("max_message_bytes", "4194305"),
        ("max_concurrent_requests", "0"),
        ("max_concurrent_requests", "100001"),
        ("request_timeout_seconds", "0"),
        ("request_timeout_seconds", "301"),
    ] {
        let yaml = yaml_with_server(&format!("server:\n  {key}: {value}\n"));
        let error = common::load(Some(&yaml), &[])
            .expect_err(&format!("{key}: {value} must be rejected"))
            .to_string();
        assert!(
            error.contains(&format!("server.{key}: {value} is out of range")),
            "{error}"
        );
    }
    // The boundaries themselves are valid, from the file and from the environment.
    let yaml = yaml_with_server(
        "server:\n  max_message_bytes: 1024\n  max_concurrent_requests: 1\n  request_timeout_seconds: 300\n",
    );
    common::load(Some(&yaml), &[]).unwrap();
    common::load(
        Some(proxy_block()),
        &[
            ("PROXY_BROKER_MAX_MESSAGE_BYTES", "4194304"),
            ("PROXY_BROKER_MAX_CONCURRENT_REQUESTS", "100000"),
            ("PROXY_BROKER_REQUEST_TIMEOUT_SECONDS", "1"),
        ],
    )
    .unwrap();
}

#[tokio::test]
async fn a_blank_or_short_token_or_an_empty_token_file_is_a_configuration_error_not_auth_off() {
    // A blank entry would admit `authorization: Bearer ` with nothing after it; short ones are
    // below the documented 16 characters.
    let error = common::load(
        Some(&yaml_with_server(
            "server:\n  auth_tokens: [\"real-token-0123456\", \" \", \"short-tok-1234\"]\n",
        )),
        &[],
    )
    .expect_err("a blank and a short token")
    .to_string();
    assert!(
        error.contains("server.auth_tokens[1]: is 0 characters long"),
        "{error}"
    );
    assert!(
        error.contains("server.auth_tokens[2]: is 14 characters long"),
        "{error}"
    );
    assert!(!error.contains("auth_tokens[0]"), "{error}");
    for token in ["real-token-0123456", "short-tok-1234"] {
        assert!(!error.contains(token), "tokens are not echoed: {error}");
    }

    // A token file with nothing but comments (a Secret not populated yet) must not switch
    // authentication off: the broker refuses to start.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# filled in by the deployment\n\n").unwrap();
    let config = common::load(
        Some(&yaml_with_server(&format!(
            "server:\n  auth_tokens_file: \"{}\"\n",
            file.display()
        ))),
        &[],
    )
    .unwrap();
    let error = proxy_broker::broker::Broker::new(config)
        .expect_err("an empty token file")
        .to_string();
    assert!(error.contains("server.auth_tokens_file"), "{error}");
    assert!(error.contains("holds no token"), "{error}");

    // Tokens in the file follow the same rule as `auth_tokens`, and are not echoed either.
    std::fs::write(
        &file,
        "# feeds
short-tok-1234
",
    )
    .unwrap();
    let config = common::load(
        Some(&yaml_with_server(&format!(
            "server:\n  auth_tokens_file: \"{}\"\n",
            file.display()
        ))),
        &[],
    )
    .unwrap();
    let error = proxy_broker::broker::Broker::new(config)
        .expect_err("a short token in the file")
        .to_string();
    assert!(
        error.contains("line 2: a token must be at least 16 characters"),
        "{error}"
    );
    assert!(!error.contains("short-tok-1234"), "{error}");
}
