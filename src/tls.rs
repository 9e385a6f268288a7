//! Server TLS whose certificate follows its files: cert-manager renews a certificate in place (a
//! Secret update, which the kubelet applies by swapping a `..data` symlink in the mounted
//! directory), and the broker serves the new one to new connections without a restart.
//!
//! - [`ReloadingCert`] is a rustls [`ResolvesServerCert`] holding the certified key in an
//!   [`ArcSwap`]. On a handshake, at most once per [`RECHECK_INTERVAL`], it reads the cert and key
//!   files again (through any symlinks) and, when their contents changed, parses them; a pair that
//!   parses and matches replaces the old one. A pair that does not (half written, key of another
//!   certificate, unreadable) keeps the old one and is logged once, by path and reason, never with
//!   file contents.
//! - Client certificates (mutual TLS, `server.tls.client_ca_file`) are verified against the CA
//!   bundle read at start; changing it needs a restart.
//! - [`incoming`] accepts TCP connections and runs each TLS handshake on its own task with a
//!   [`HANDSHAKE_TIMEOUT`], so a slow or silent client never holds up the accept loop; finished
//!   handshakes are handed to tonic as [`Connection`]s (ALPN `h2`). Handshakes in progress are
//!   bounded by that timeout (and the process's file-descriptor limit), not by a count, so that a
//!   crowd of stalled clients cannot lock out a real one. Without TLS the accepted TCP streams are
//!   handed over as they are.
//! - A failed accept that is about the server rather than one connection (out of file
//!   descriptors, EMFILE/ENFILE, out of memory) fails again at once: [`Incoming`] logs it and
//!   waits before the next accept (10 ms doubling to 1 s, [`AcceptBackoff`], as the metrics
//!   listener does; back to 10 ms after an accept works) instead of spinning on a core. Handshakes
//!   in progress still finish meanwhile. A connection that failed on its own (reset or aborted
//!   before it was accepted) is skipped without waiting.
//!
//! Why not tonic's `ServerTlsConfig`: it takes an identity once, at start.
//! Why reading the files on a handshake rather than watching them (`notify`): a read of two small
//! files at most once a second costs nothing, needs no extra task, and sees every way a file can
//! change (in-place rewrite, rename, symlink swap of the directory) without the event subtleties
//! of each; and the first handshake after a change already gets the new certificate.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, TryLockError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::TlsConfig;
use crate::metrics::AcceptBackoff;

/// Longest a client may take to finish its TLS handshake before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, a handshake makes the broker look at the certificate files again.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Largest certificate, key or CA file read (a PEM chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// Most connections accepted in one poll before finished handshakes get their turn.
const ACCEPT_BATCH: usize = 64;

const CERT_KEY: &str = "server.tls.cert_file";
const KEY_KEY: &str = "server.tls.key_file";
const CA_KEY: &str = "server.tls.client_ca_file";

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key}: cannot read '{path}': {source}")]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A file was read but its contents are not usable.
    #[error("{key}: '{path}' {rule}")]
    Invalid {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong (never the contents).
        rule: String,
    },
}

/// Reads `path` (at most [`MAX_PEM_BYTES`]).
fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(invalid(
            key,
            path,
            format!("is larger than {MAX_PEM_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

fn invalid(key: &'static str, path: &Path, rule: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        key,
        path: path.display().to_string(),
        rule: rule.into(),
    }
}

/// Every certificate in a PEM file (at least one).
fn parse_certs(key: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, path, format!("is not a valid PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(key, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The raw contents of the cert and key files, to tell whether they changed. `Debug` shows sizes
/// only: the key is a secret.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl fmt::Debug for Files {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Files")
            .field("cert_bytes", &self.cert.len())
            .field("key_bytes", &self.key.len())
            .finish()
    }
}

/// What the files looked like when they were last refused.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Contents(Files),
    Unreadable(String),
}

/// What a look at the files did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Looked at less than [`RECHECK_INTERVAL`] ago, or another handshake is looking right now.
    NotDue,
    /// The files hold what is being served.
    Unchanged,
    /// A new certificate is served from now on.
    Reloaded,
    /// The files changed but are not usable: the previous certificate is kept. `warned` is true
    /// the first time these contents (or this read error) were seen.
    Refused {
        /// Whether this look logged the warning.
        warned: bool,
    },
}

#[derive(Debug)]
struct ReloadState {
    checked_at: Instant,
    loaded: Files,
    refused: Option<Refused>,
}

/// A certificate resolver that serves the last good pair from the cert and key files and looks
/// for a new one at most once per [`RECHECK_INTERVAL`] (see the module docs).
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    state: Mutex<ReloadState>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair; an error names the key, the file and what is wrong with it.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        let files = read_pair(&cert_path, &key_path)?;
        let certified = certify(&cert_path, &key_path, &files, &provider)?;
        Ok(Self {
            cert_path,
            key_path,
            provider,
            current: ArcSwap::from_pointee(certified),
            state: Mutex::new(ReloadState {
                checked_at: Instant::now(),
                loaded: files,
                refused: None,
            }),
        })
    }

    /// The certificate chain served now (first: the end-entity certificate).
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Looks at the files again if the last look was at least [`RECHECK_INTERVAL`] before `now`.
    pub fn reload_if_due(&self, now: Instant) -> Reload {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Another handshake is reading the files: serve what there is.
            Err(TryLockError::WouldBlock) => return Reload::NotDue,
        };
        if now.saturating_duration_since(state.checked_at) < RECHECK_INTERVAL {
            return Reload::NotDue;
        }
        state.checked_at = now;
        self.reload(&mut state)
    }

    fn reload(&self, state: &mut ReloadState) -> Reload {
        let (seen, outcome) = match read_pair(&self.cert_path, &self.key_path) {
            Ok(files) if files == state.loaded => {
                // Back to what is served (e.g. a broken write was undone): a later break of the
                // same shape is news again.
                state.refused = None;
                return Reload::Unchanged;
            }
            Ok(files) => match certify(&self.cert_path, &self.key_path, &files, &self.provider) {
                Ok(certified) => {
                    self.current.store(Arc::new(certified));
                    state.loaded = files;
                    state.refused = None;
                    tracing::info!(
                        cert_file = %self.cert_path.display(),
                        key_file = %self.key_path.display(),
                        "server TLS certificate reloaded: new connections get the new one"
                    );
                    return Reload::Reloaded;
                }
                Err(error) => (Refused::Contents(files), error),
            },
            Err(error) => (Refused::Unreadable(error.to_string()), error),
        };
        if state.refused.as_ref() == Some(&seen) {
            return Reload::Refused { warned: false };
        }
        tracing::warn!(
            %outcome,
            "server TLS certificate files changed but cannot be used: keeping the previous certificate"
        );
        state.refused = Some(seen);
        Reload::Refused { warned: true }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A blocking read of two small files, at most once per second, on a handshake task.
        self.reload_if_due(Instant::now());
        Some(self.current())
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<Files, TlsError> {
    Ok(Files {
        cert: read_file(CERT_KEY, cert_path)?,
        key: read_file(KEY_KEY, key_path)?,
    })
}

/// The certified key of a cert and key pair, checked to match.
fn certify(
    cert_path: &Path,
    key_path: &Path,
    files: &Files,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = parse_certs(CERT_KEY, cert_path, &files.cert)?;
    // The parser's error could quote a line of the key file: only say that it failed.
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|_| {
        invalid(
            KEY_KEY,
            key_path,
            "holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1)",
        )
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        use tokio_rustls::rustls::{Error, InconsistentKeys};
        let rule = match e {
            Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => format!(
                "is not the private key of the certificate in '{}'",
                cert_path.display()
            ),
            other => format!("cannot be used with the certificate ({other})"),
        };
        invalid(KEY_KEY, key_path, rule)
    })
}

/// The server side of TLS for the gRPC listener: the reloading certificate, client-certificate
/// verification when configured, ALPN `h2`.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    certificate: Arc<ReloadingCert>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files `config` names.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let certificate = Arc::new(ReloadingCert::load(
            &config.cert_file,
            &config.key_file,
            provider.clone(),
        )?);
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(CERT_KEY, Path::new(&config.cert_file), e.to_string()))?;
        let builder = match &config.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca_file) => {
                let path = Path::new(ca_file);
                let mut roots = RootCertStore::empty();
                for cert in parse_certs(CA_KEY, path, &read_file(CA_KEY, path)?)? {
                    roots.add(cert).map_err(|e| {
                        invalid(CA_KEY, path, format!("holds an unusable CA certificate ({e})"))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| invalid(CA_KEY, path, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server = builder.with_cert_resolver(certificate.clone());
        // gRPC is HTTP/2 only.
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            certificate,
        })
    }

    /// The certificate resolver (to look at what is served).
    pub fn certificate(&self) -> &Arc<ReloadingCert> {
        &self.certificate
    }
}

/// Connections for tonic's `serve_with_incoming_shutdown` from `listener`: TLS (per `tls`) or
/// plain TCP.
pub fn incoming(listener: TcpListener, tls: Option<&TlsConfig>) -> Result<Incoming, TlsError> {
    Ok(Incoming::new(listener, tls.map(ServerTls::load).transpose()?))
}

/// Accepted connections, TLS handshakes done (see the module docs). Dropping it closes the
/// listener and abandons the handshakes in progress.
pub struct Incoming {
    listener: TcpListener,
    tls: Option<ServerTls>,
    handshake_timeout: Duration,
    handshakes: JoinSet<Option<TlsStream<TcpStream>>>,
    backoff: AcceptBackoff,
    /// Set after a failed accept: no accept until it fires.
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("listener", &self.listener.local_addr().ok())
            .field("tls", &self.tls)
            .field("handshakes_in_progress", &self.handshakes.len())
            .finish()
    }
}

impl Incoming {
    /// Connections from `listener`, through `tls` when given.
    pub fn new(listener: TcpListener, tls: Option<ServerTls>) -> Self {
        Self {
            listener,
            tls,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshakes: JoinSet::new(),
            backoff: AcceptBackoff::default(),
            paused: None,
        }
    }

    /// Replaces [`HANDSHAKE_TIMEOUT`].
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Whether the listener registered this task for wake-up (it did unless a full batch of
        // connections was accepted).
        let mut listener_pending = false;
        if let Some(pause) = &mut this.paused {
            match pause.as_mut().poll(cx) {
                // Registered for wake-up when the pause ends.
                Poll::Pending => listener_pending = true,
                Poll::Ready(()) => this.paused = None,
            }
        }
        for _ in 0..ACCEPT_BATCH {
            if listener_pending {
                break;
            }
            let (tcp, peer) = match this.listener.poll_accept(cx) {
                Poll::Ready(Ok(accepted)) => {
                    this.backoff.reset();
                    accepted
                }
                Poll::Ready(Err(error)) if is_connection_error(&error) => {
                    tracing::debug!(%error, "a connection failed before it was accepted");
                    continue;
                }
                Poll::Ready(Err(error)) => {
                    // Would fail again at once (tonic itself retries at once): wait first.
                    let wait = this.backoff.next_wait();
                    tracing::warn!(%error, retry_in_ms = wait.as_millis(), "accepting a connection failed");
                    let mut pause = Box::pin(tokio::time::sleep(wait));
                    if pause.as_mut().poll(cx).is_pending() {
                        this.paused = Some(pause);
                        listener_pending = true;
                    }
                    continue;
                }
                Poll::Pending => {
                    listener_pending = true;
                    break;
                }
            };
            // Answers are small and latency matters more than packet count (tonic's own
            // `tcp_nodelay` setting does not apply to connections handed to it).
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &this.tls else {
                return Poll::Ready(Some(Ok(Connection(Io::Plain(tcp)))));
            };
            let (acceptor, timeout) = (tls.acceptor.clone(), this.handshake_timeout);
            this.handshakes.spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => Some(stream),
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(%peer, ?timeout, "TLS handshake timed out");
                        None
                    }
                }
            });
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(stream)))) => {
                    return Poll::Ready(Some(Ok(Connection(Io::Tls(Box::new(stream))))));
                }
                // Failed (logged by the task) or abandoned.
                Poll::Ready(Some(Ok(None) | Err(_))) => {}
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if !listener_pending {
            // More connections may be waiting: poll again after the others had their turn.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

/// Whether a failed accept is about that one connection (the next accept may well work), as
/// hyper's own accept loop used to tell them apart.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection, plain TCP or TLS over TCP.
#[derive(Debug)]
pub struct Connection(Io);

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection {
    fn tcp(&self) -> &TcpStream {
        match &self.0 {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Whether TLS runs on this connection.
    pub fn is_tls(&self) -> bool {
        matches!(self.0, Io::Tls(_))
    }
}

/// The TCP addresses, for TLS connections too (`Request::remote_addr` works either way; client
/// certificates are checked in the handshake and not passed on).
impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp().connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Io::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            Io::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Io::Plain(tcp) => tcp.is_write_vectored(),
            Io::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    struct OnDisk {
        _dir: tempfile::TempDir,
        cert: PathBuf,
        key: PathBuf,
    }

    impl OnDisk {
        fn new((cert, key): &(String, String)) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let files = Self {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                _dir: dir,
            };
            files.write((cert, key));
            files
        }

        fn write(&self, (cert, key): (&str, &str)) {
            std::fs::write(&self.cert, cert).unwrap();
            std::fs::write(&self.key, key).unwrap();
        }

        fn resolver(&self) -> ReloadingCert {
            let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
            ReloadingCert::load(&self.cert, &self.key, provider).unwrap()
        }
    }

    fn served(resolver: &ReloadingCert) -> Vec<u8> {
        resolver.current().cert[0].to_vec()
    }

    #[tokio::test(start_paused = true)]
    async fn the_files_are_looked_at_no_more_than_once_per_interval() {
        let (first, second) = (pair(), pair());
        let files = OnDisk::new(&first);
        let resolver = files.resolver();
        let before = served(&resolver);
        files.write((&second.0, &second.1));
        tokio::time::advance(RECHECK_INTERVAL / 2).await;
        assert_eq!(resolver.reload_if_due(Instant::now()), Reload::NotDue);
        assert_eq!(served(&resolver), before);
        tokio::time::advance(RECHECK_INTERVAL / 2).await;
        assert_eq!(resolver.reload_if_due(Instant::now()), Reload::Reloaded);
        assert_ne!(served(&resolver), before);
        // Just looked: not again before another interval, and nothing new then.
        assert_eq!(resolver.reload_if_due(Instant::now()), Reload::NotDue);
        tokio::time::advance(RECHECK_INTERVAL).await;
        assert_eq!(resolver.reload_if_due(Instant::now()), Reload::Unchanged);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_pair_keeps_the_old_certificate_and_warns_once_per_shape() {
        let (first, second) = (pair(), pair());
        let files = OnDisk::new(&first);
        let resolver = files.resolver();
        let before = served(&resolver);
        let look = || resolver.reload_if_due(Instant::now());
        // (files written, outcome of the first look, outcome of the next)
        let rows: [((&str, &str), Reload, Reload); 5] = [
            // The new certificate with the old key: refused, warned once.
            (
                (&second.0, &first.1),
                Reload::Refused { warned: true },
                Reload::Refused { warned: false },
            ),
            // Another broken shape: a new warning.
            (
                (&second.0, ""),
                Reload::Refused { warned: true },
                Reload::Refused { warned: false },
            ),
            // Back to what is served: nothing to do, and the next break is news again.
            ((&first.0, &first.1), Reload::Unchanged, Reload::Unchanged),
            (
                (&second.0, ""),
                Reload::Refused { warned: true },
                Reload::Refused { warned: false },
            ),
            // A good pair at last.
            ((&second.0, &second.1), Reload::Reloaded, Reload::Unchanged),
        ];
        for (i, (written, first_look, next_look)) in rows.into_iter().enumerate() {
            files.write(written);
            tokio::time::advance(RECHECK_INTERVAL).await;
            assert_eq!(look(), first_look, "row {i}");
            tokio::time::advance(RECHECK_INTERVAL).await;
            assert_eq!(look(), next_look, "row {i}");
            if i < 4 {
                assert_eq!(served(&resolver), before, "row {i}: the old certificate is kept");
            }
        }
        assert_ne!(served(&resolver), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_file_is_refused_like_a_broken_one() {
        let files = OnDisk::new(&pair());
        let resolver = files.resolver();
        let before = served(&resolver);
        std::fs::remove_file(&files.key).unwrap();
        tokio::time::advance(RECHECK_INTERVAL).await;
        assert_eq!(
            resolver.reload_if_due(Instant::now()),
            Reload::Refused { warned: true }
        );
        tokio::time::advance(RECHECK_INTERVAL).await;
        assert_eq!(
            resolver.reload_if_due(Instant::now()),
            Reload::Refused { warned: false }
        );
        assert_eq!(served(&resolver), before);
    }

    #[test]
    fn debug_shows_paths_and_sizes_never_the_key() {
        let (cert, key) = pair();
        let files = Files {
            cert: cert.clone().into_bytes(),
            key: key.clone().into_bytes(),
        };
        let shown = format!("{files:?}");
        let body = key.lines().nth(1).unwrap().to_owned();
        assert!(!shown.contains(&body) && !shown.contains("PRIVATE"), "{shown}");
        let tmp = OnDisk::new(&(cert, key));
        let shown = format!("{:?}", tmp.resolver());
        assert!(shown.contains("tls.key") && !shown.contains(&body), "{shown}");
    }
}
