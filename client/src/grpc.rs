//! The gRPC channel to the broker: lazy (building a client never fails because the broker is
//! down), TLS for `https://` URLs, and the auth token on every call.

use std::fmt;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use proxy_broker_core::redact::{MASK, redact_text};

use crate::error::Error;
use crate::pb::proxy_broker_admin_client::ProxyBrokerAdminClient;
use crate::pb::proxy_broker_client::ProxyBrokerClient;
use crate::proxy::shown;

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Auth(Bearer ***)"
        } else {
            "Auth(none)"
        })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The feed-facing stub with the auth interceptor.
pub type BrokerStub = ProxyBrokerClient<InterceptedService<Channel, Auth>>;
/// The operator-facing stub with the auth interceptor.
pub type AdminStub = ProxyBrokerAdminClient<InterceptedService<Channel, Auth>>;

/// How to reach the broker.
#[derive(Clone)]
pub(crate) struct GrpcSettings {
    pub url: String,
    pub token: Option<String>,
    pub ca_pem: Vec<Vec<u8>>,
    pub tls_domain: Option<String>,
    pub connect_timeout: Duration,
}

/// By hand: the token is a secret, and the URL may carry credentials.
impl fmt::Debug for GrpcSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcSettings")
            .field("url", &shown(&self.url))
            .field("token", &self.token.as_ref().map(|_| MASK))
            .field("broker_ca_pems", &self.ca_pem.len())
            .field("tls_domain", &self.tls_domain)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A lazily connected channel plus credentials.
#[derive(Debug, Clone)]
pub(crate) struct Grpc {
    channel: Channel,
    auth: Auth,
}

impl Grpc {
    /// Builds the channel without connecting (needs a Tokio runtime).
    pub(crate) fn new(settings: &GrpcSettings) -> Result<Self, Error> {
        let raw = settings.url.trim_end_matches('/');
        // Shown in errors only with its credentials (if any) masked.
        let url = shown(raw);
        let mut endpoint = Endpoint::from_shared(raw.to_owned())
            .map_err(|e| Error::Settings(format!("broker URL '{url}': {}", redact_text(&e.to_string()))))?
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true);
        check_authority(endpoint.uri(), &url)?;
        match endpoint.uri().scheme_str() {
            Some("http") => {
                if !settings.ca_pem.is_empty() {
                    return Err(Error::Settings(format!(
                        "broker URL '{url}' is plain http but a broker CA certificate was given (use https://)"
                    )));
                }
            }
            Some("https") => {
                let mut tls = ClientTlsConfig::new().with_native_roots();
                for pem in &settings.ca_pem {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                if let Some(domain) = &settings.tls_domain {
                    tls = tls.domain_name(domain.clone());
                }
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| Error::Settings(format!("broker TLS: {e}")))?;
            }
            other => {
                return Err(Error::Settings(format!(
                    "broker URL '{url}' has scheme {other:?} (use http:// or https://)"
                )));
            }
        }
        let auth = match &settings.token {
            None => Auth(None),
            Some(token) => Auth(Some(format!("Bearer {token}").parse().map_err(|_| {
                Error::Settings("auth token contains characters not allowed in a header".into())
            })?)),
        };
        Ok(Self {
            channel: endpoint.connect_lazy(),
            auth,
        })
    }

    pub(crate) fn broker(&self) -> BrokerStub {
        ProxyBrokerClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub(crate) fn admin(&self) -> AdminStub {
        ProxyBrokerAdminClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

/// The broker URL's authority: a host, an optional numeric port, no credentials (gRPC would put
/// them in the `:authority` header and never use them; the token goes in `auth_token`).
fn check_authority(uri: &tonic::codegen::http::Uri, shown: &str) -> Result<(), Error> {
    let Some(authority) = uri.authority() else {
        return Err(Error::Settings(format!("broker URL '{shown}' has no host")));
    };
    if authority.as_str().contains('@') {
        return Err(Error::Settings(format!(
            "broker URL '{shown}' carries credentials, which are not used: give the token with auth_token"
        )));
    }
    let after_host = &authority.as_str()[authority.host().len()..];
    if let Some(port) = after_host.strip_prefix(':')
        && port.parse::<u16>().is_err()
    {
        return Err(Error::Settings(format!(
            "broker URL '{shown}': port '{port}' is not a number in 0..=65535"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, token: Option<&str>) -> GrpcSettings {
        GrpcSettings {
            url: url.into(),
            token: token.map(Into::into),
            ca_pem: Vec::new(),
            tls_domain: None,
            connect_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn the_token_goes_on_every_call_and_is_never_printed() {
        let grpc = Grpc::new(&settings("http://127.0.0.1:1", Some("s3cret"))).unwrap();
        let mut auth = grpc.auth.clone();
        let request = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer s3cret");
        assert!(!format!("{grpc:?}").contains("s3cret"));
        let mut none = Grpc::new(&settings("http://127.0.0.1:1", None)).unwrap().auth;
        assert!(
            none.call(tonic::Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .is_none()
        );
    }

    #[tokio::test]
    async fn broker_urls_must_be_http_or_https() {
        let err = Grpc::new(&settings("ftp://broker:1", None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("http:// or https://"), "{err}");
        let mut plain_with_ca = settings("http://broker:1", None);
        plain_with_ca.ca_pem.push(b"pem".to_vec());
        assert!(Grpc::new(&plain_with_ca).is_err());
        assert!(Grpc::new(&settings("https://broker:443", None)).is_ok());
    }

    #[tokio::test]
    async fn broker_urls_need_a_numeric_port_and_no_credentials() {
        // (URL, what the error says; None: accepted)
        let rows = [
            ("http://broker:50051", None),
            ("http://broker", None),
            ("http://[::1]:50051", None),
            ("https://[::1]", None),
            ("http://broker:not-a-port", Some("port 'not-a-port'")),
            ("http://broker:70000", Some("port '70000'")),
            ("http://user:pass@broker:1", Some("carries credentials")),
            ("http://token@broker:1", Some("carries credentials")),
        ];
        for (url, expected) in rows {
            match (Grpc::new(&settings(url, None)), expected) {
                (Ok(_), None) => {}
                (Err(e), Some(text)) => {
                    let e = e.to_string();
                    assert!(e.contains(text), "{url}: {e}");
                    assert!(!e.contains("pass") && !e.contains("token@"), "{url}: {e}");
                }
                (Ok(_), Some(text)) => panic!("{url}: accepted, expected '{text}'"),
                (Err(e), None) => panic!("{url}: {e}"),
            }
        }
    }
}
