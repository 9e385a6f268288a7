//! Server TLS certificates that follow their files: the real broker on a loopback port, clients
//! over real TLS. A certificate rewritten in place, or renewed by a kubelet-style symlink swap of
//! the mounted directory, is served to new connections without a restart; files that cannot be
//! used keep the previous certificate and are logged once, without their contents; mutual TLS
//! still refuses clients without a certificate; slow handshakes hold up nobody; ALPN offers h2.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use proxy_broker::tls::{Incoming, ServerTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// How long a condition may take before the test fails (a bound for failures, not a timing).
const DEADLINE: Duration = Duration::from_secs(20);

// --- Certificates ------------------------------------------------------------------------------

/// A CA that signs server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate (PEM) and its key (PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self) -> (String, String) {
        self.leaf(&["localhost", "127.0.0.1"])
    }
}

// --- The broker --------------------------------------------------------------------------------

/// The broker library with TLS on a loopback port.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), proxy_broker::server::ServeError>>,
}

impl Server {
    async fn start(cert_file: &Path, key_file: &Path, client_ca_file: Option<&Path>) -> Self {
        let client_ca = client_ca_file.map_or(String::new(), |p| {
            format!("    client_ca_file: \"{}\"\n", p.display())
        });
        let yaml = format!(
            "server:\n  shutdown_grace_seconds: 0\n  tls:\n    cert_file: \"{}\"\n    key_file: \"{}\"\n{client_ca}\
             proxy:\n  enabled: true\n  default:\n    http: \"socks5://proxy.example.com:1080\"\n",
            cert_file.display(),
            key_file.display()
        );
        let config = load(&yaml).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy_broker::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

fn load(yaml: &str) -> Result<proxy_broker::BrokerConfig, proxy_broker_core::ConfigError> {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    file.write_all(yaml.as_bytes()).unwrap();
    proxy_broker::BrokerConfig::loader(Some(file.path()))
        .env_vars(Vec::<(String, String)>::new())
        .load()
}

/// A new connection trusting `ca_pem` (optionally with a client identity) and a health check on
/// it: Ok only if both worked.
async fn call(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let attempt = async {
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        check(&channel).await?;
        Ok(channel)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

async fn check(channel: &Channel) -> Result<(), String> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
        .map_err(|s| format!("{s:?}"))
}

/// Polls `probe` until it returns `Some`, failing after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a new connection trusting `ca_pem` works.
async fn served_by(addr: SocketAddr, ca_pem: &str, identity: Option<&(String, String)>, what: &str) {
    eventually(what, || async { call(addr, ca_pem, identity).await.ok() }).await;
}

// --- Log capture -------------------------------------------------------------------------------

/// Everything the broker logs in this test binary (tests tell their lines apart by their
/// temporary directory, which the messages name).
fn logs() -> String {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buffer = LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buffer
    });
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

// --- Tests -------------------------------------------------------------------------------------

#[tokio::test]
async fn a_certificate_rewritten_in_place_is_served_to_new_connections() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (ca1, ca2) = (Ca::new("ca-one"), Ca::new("ca-two"));
    let (cert, key) = ca1.server();
    write(&cert_file, &cert);
    write(&key_file, &key);
    let server = Server::start(&cert_file, &key_file, None).await;
    let old = eventually("the broker to serve CA 1's certificate", || async {
        call(server.addr, &ca1.pem, None).await.ok()
    })
    .await;
    assert!(call(server.addr, &ca2.pem, None).await.is_err(), "not CA 2's yet");

    // Renewed in place, certificate first, then key (not atomic: the broker may see a pair that
    // does not match in between, and must wait for the key).
    let (cert, key) = ca2.server();
    write(&cert_file, &cert);
    write(&key_file, &key);
    served_by(server.addr, &ca2.pem, None, "the renewed certificate").await;
    let error = call(server.addr, &ca1.pem, None)
        .await
        .expect_err("new connections no longer get CA 1's certificate");
    assert!(!error.is_empty());
    // A connection made before the renewal goes on working.
    check(&old).await.unwrap();
    assert!(
        logs().contains("server TLS certificate reloaded"),
        "the reload is logged"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_kubelet_style_symlink_swap_of_the_directory_is_picked_up() {
    logs();
    // The layout of a mounted Secret: files are symlinks through `..data`, which points at a
    // timestamped directory; an update writes a new directory and renames a new `..data` over
    // the old one.
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    let (ca1, ca2) = (Ca::new("ca-one"), Ca::new("ca-two"));
    let version = |name: &str, (cert, key): (String, String)| -> PathBuf {
        let dir = m.join(name);
        std::fs::create_dir(&dir).unwrap();
        write(&dir.join("tls.crt"), &cert);
        write(&dir.join("tls.key"), &key);
        dir
    };
    let first = version("..2026_05_01_00_00_00.1", ca1.server());
    std::os::unix::fs::symlink(first.file_name().unwrap(), m.join("..data")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(Path::new("..data").join(file), m.join(file)).unwrap();
    }
    let server = Server::start(&m.join("tls.crt"), &m.join("tls.key"), None).await;
    served_by(server.addr, &ca1.pem, None, "CA 1's certificate").await;

    let second = version("..2026_06_01_00_00_00.2", ca2.server());
    std::os::unix::fs::symlink(second.file_name().unwrap(), m.join("..data_tmp")).unwrap();
    std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();

    served_by(server.addr, &ca2.pem, None, "the certificate after the swap").await;
    assert!(call(server.addr, &ca1.pem, None).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn files_that_cannot_be_used_keep_the_previous_certificate_and_are_logged_once() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (ca1, ca2) = (Ca::new("ca-one"), Ca::new("ca-two"));
    let (cert1, key1) = ca1.server();
    write(&cert_file, &cert1);
    write(&key_file, &key1);
    let server = Server::start(&cert_file, &key_file, None).await;
    served_by(server.addr, &ca1.pem, None, "CA 1's certificate").await;

    let (cert2, key2) = ca2.server();
    let (_, other_key) = ca2.server();
    let key_body = key2.lines().nth(1).unwrap().to_owned();
    // (what is wrong, cert file, key file or None to delete it, what the warning says)
    let rows: [(&str, String, Option<String>, &str); 5] = [
        (
            "not PEM",
            "this is not a certificate".into(),
            Some(key2.clone()),
            "holds no PEM certificate",
        ),
        (
            "key of another certificate",
            cert2.clone(),
            Some(other_key),
            "is not the private key of the certificate",
        ),
        (
            "empty key",
            cert2.clone(),
            Some(String::new()),
            "holds no usable PEM private key",
        ),
        (
            "key cut short",
            cert2.clone(),
            Some(key2[..key2.len() / 2].to_owned()),
            "holds no usable PEM private key",
        ),
        ("key file missing", cert2.clone(), None, "cannot read"),
    ];
    for (row, cert, key, says) in &rows {
        write(&cert_file, cert);
        match key {
            Some(key) => write(&key_file, key),
            None => std::fs::remove_file(&key_file).unwrap(),
        }
        // Every handshake meanwhile still gets CA 1's certificate; one of them makes the broker
        // look at the files and warn.
        let warning = eventually(&format!("{row}: the warning"), || async {
            call(server.addr, &ca1.pem, None)
                .await
                .unwrap_or_else(|e| panic!("{row}: the previous certificate is still served: {e}"));
            logs()
                .lines()
                .find(|l| {
                    l.contains("WARN") && l.contains(&*dir.path().to_string_lossy()) && l.contains(says)
                })
                .map(str::to_owned)
        })
        .await;
        assert!(
            warning.contains("keeping the previous certificate"),
            "{row}: {warning}"
        );
        assert!(call(server.addr, &ca2.pem, None).await.is_err(), "{row}");
    }
    let ours: Vec<String> = logs()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&*dir.path().to_string_lossy()))
        .map(str::to_owned)
        .collect();
    for (row, _, _, says) in &rows[..2] {
        // Rows 3 and 4 share their message; each distinct broken pair warns once.
        assert_eq!(
            ours.iter().filter(|l| l.contains(says)).count(),
            1,
            "{row}: warned once: {ours:#?}"
        );
    }
    for line in &ours {
        assert!(
            !line.contains("PRIVATE KEY") && !line.contains(&key_body),
            "no key material: {line}"
        );
        assert!(!line.contains("BEGIN CERTIFICATE"), "no file contents: {line}");
    }

    // A good pair after the broken ones is taken.
    write(&key_file, &key2);
    served_by(server.addr, &ca2.pem, None, "the good pair after the broken ones").await;
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_still_refuses_clients_without_a_certificate_after_a_reload() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file, ca_file) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("clients-ca.crt"),
    );
    let (ca1, ca2, clients, stranger) = (
        Ca::new("ca-one"),
        Ca::new("ca-two"),
        Ca::new("clients-ca"),
        Ca::new("stranger-ca"),
    );
    let feed = clients.leaf(&["feed-1"]);
    let (cert, key) = ca1.server();
    write(&cert_file, &cert);
    write(&key_file, &key);
    write(&ca_file, &clients.pem);
    let server = Server::start(&cert_file, &key_file, Some(&ca_file)).await;
    served_by(
        server.addr,
        &ca1.pem,
        Some(&feed),
        "CA 1's certificate, with mTLS",
    )
    .await;
    assert!(
        call(server.addr, &ca1.pem, None).await.is_err(),
        "no client certificate"
    );

    let (cert, key) = ca2.server();
    write(&cert_file, &cert);
    write(&key_file, &key);
    served_by(
        server.addr,
        &ca2.pem,
        Some(&feed),
        "the renewed certificate, with mTLS",
    )
    .await;
    for (what, identity) in [
        ("no client certificate", None),
        (
            "a client certificate from another CA",
            Some(stranger.leaf(&["feed-2"])),
        ),
        ("the server's own certificate as a client one", Some(ca2.server())),
    ] {
        call(server.addr, &ca2.pem, identity.as_ref())
            .await
            .expect_err(what);
    }
    server.stop().await;
}

#[tokio::test]
async fn clients_that_never_finish_their_handshake_hold_up_nobody() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca = Ca::new("ca-one");
    let (cert, key) = ca.server();
    write(&cert_file, &cert);
    write(&key_file, &key);
    let server = Server::start(&cert_file, &key_file, None).await;
    served_by(server.addr, &ca.pem, None, "the broker").await;

    // 50 connections that say nothing and 50 that send the start of a ClientHello and stop.
    let mut stalled = Vec::new();
    for i in 0..100 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 1 {
            tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .unwrap();
        }
        stalled.push(tcp);
    }
    for _ in 0..3 {
        call(server.addr, &ca.pem, None)
            .await
            .expect("a proper client is served at once");
    }
    drop(stalled);
    server.stop().await;
}

#[tokio::test]
async fn a_handshake_that_does_not_finish_in_time_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (cert, key) = Ca::new("ca-one").server();
    write(&cert_file, &cert);
    write(&key_file, &key);
    let tls = ServerTls::load(&tls_config(&cert_file, &key_file)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Incoming::new(listener, Some(tls)).handshake_timeout(Duration::from_millis(200));
    let accepted = tokio::spawn(async move {
        let mut count = 0;
        while let Some(connection) = incoming.next().await {
            if connection.is_ok() {
                count += 1;
            }
        }
        count
    });

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(DEADLINE, silent.read(&mut buf))
        .await
        .expect("the server closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "closed, not answered: {read:?}");
    accepted.abort();
}

#[tokio::test]
async fn the_server_offers_h2_over_alpn_and_refuses_clients_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca = Ca::new("ca-one");
    let (cert, key) = ca.server();
    write(&cert_file, &cert);
    write(&key_file, &key);
    let tls = ServerTls::load(&tls_config(&cert_file, &key_file)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Incoming::new(listener, Some(tls));
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(connection) = incoming.next().await {
            held.push(connection);
        }
    });

    let handshake = |alpn: Vec<Vec<u8>>| {
        let ca = ca.pem.clone();
        async move {
            use tokio_rustls::rustls;
            use tokio_rustls::rustls::pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = alpn;
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
    };
    assert_eq!(
        handshake(vec![b"h2".to_vec(), b"http/1.1".to_vec()])
            .await
            .unwrap(),
        Some(b"h2".to_vec())
    );
    let error = handshake(vec![b"http/1.1".to_vec()])
        .await
        .expect_err("no protocol in common");
    assert!(
        error.contains("NoApplicationProtocol")
            || error.contains("no_application_protocol")
            || error.contains("application protocol"),
        "{error}"
    );
    server.abort();
}

#[tokio::test]
async fn unusable_tls_files_at_start_are_errors_naming_the_key_without_the_contents() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca-one");
    let (cert, key) = ca.server();
    let (_, other_key) = ca.server();
    let key_body = key.lines().nth(1).unwrap().to_owned();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        write(&path, text);
        path
    };
    let (good_cert, good_key) = (file("good.crt", &cert), file("good.key", &key));
    let missing = dir.path().join("missing.pem");
    // (what, cert, key, client CA, expected text)
    let rows: [(&str, PathBuf, PathBuf, Option<PathBuf>, &str); 6] = [
        (
            "missing cert",
            missing.clone(),
            good_key.clone(),
            None,
            "server.tls.cert_file: cannot read",
        ),
        (
            "missing key",
            good_cert.clone(),
            missing.clone(),
            None,
            "server.tls.key_file: cannot read",
        ),
        (
            "garbage key",
            good_cert.clone(),
            file("garbage.key", &format!("-----BEGIN PRIVATE KEY-----\n{key_body}")),
            None,
            "server.tls.key_file",
        ),
        (
            "mismatched key",
            good_cert.clone(),
            file("other.key", &other_key),
            None,
            "is not the private key of the certificate",
        ),
        (
            "key as the certificate",
            good_key.clone(),
            good_key.clone(),
            None,
            "server.tls.cert_file",
        ),
        (
            "garbage client CA",
            good_cert.clone(),
            good_key.clone(),
            Some(file("ca.crt", "not a CA")),
            "server.tls.client_ca_file",
        ),
    ];
    for (what, cert, key, ca_file, expected) in rows {
        let mut config = tls_config(&cert, &key);
        config.client_ca_file = ca_file.map(|p| p.display().to_string());
        let error = ServerTls::load(&config).expect_err(what).to_string();
        assert!(error.contains(expected), "{what}: {error}");
        assert!(
            !error.contains(&key_body) && !error.contains("PRIVATE KEY-----"),
            "{what}: {error}"
        );
    }
}

fn tls_config(cert: &Path, key: &Path) -> proxy_broker::config::TlsConfig {
    proxy_broker::config::TlsConfig {
        cert_file: cert.display().to_string(),
        key_file: key.display().to_string(),
        client_ca_file: None,
    }
}
