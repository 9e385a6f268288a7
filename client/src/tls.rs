//! One rustls configuration (aws-lc-rs) for every TLS connection the client opens itself: `wss://`
//! targets and `https://` proxies. Roots: the platform's, plus any the caller adds.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::error::Error;

/// Parses every certificate in a PEM bundle.
pub(crate) fn parse_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Settings(format!("root certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Settings(
            "root certificate PEM holds no certificate".into(),
        ));
    }
    Ok(certs)
}

/// The client configuration, or why there is none (e.g. no platform roots and none added): the
/// error surfaces when a TLS connection is attempted, not when the client is built.
pub(crate) fn client_config(extra_roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
        extra_roots.iter().cloned(),
        provider.clone(),
    )
    .map_err(|e| format!("TLS roots: {e}"))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}
