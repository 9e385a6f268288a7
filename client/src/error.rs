//! What can go wrong, in one enum. Messages never contain proxy passwords or tokens.

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client's own settings are wrong (broker URL, certificates, runtime).
    #[error("invalid client settings: {0}")]
    Settings(String),
    /// The local embedded configuration (`CRYPTOFEED_PROXY_*`, YAML) is invalid.
    #[error("local proxy configuration: {0}")]
    LocalConfig(#[from] proxy_broker_core::ConfigError),
    /// A caller's argument breaks a rule of the contract (e.g. an empty exchange id).
    #[error("{field}: {rule}")]
    InvalidArgument {
        /// The argument.
        field: &'static str,
        /// The rule it breaks.
        rule: String,
    },
    /// The broker answered with an error that a local fallback would not fix (e.g.
    /// INVALID_ARGUMENT, UNAUTHENTICATED).
    #[error("the broker refused the request ({code:?}): {message}")]
    Broker {
        /// The gRPC status code.
        code: tonic::Code,
        /// The broker's message.
        message: String,
    },
    /// The broker is unreachable and there is no local configuration to fall back on; the client
    /// fails closed rather than connect directly (see `ClientBuilder::allow_direct_fallback`).
    #[error(
        "the broker is unavailable ({reason}) and there is no local proxy configuration \
         (set CRYPTOFEED_PROXY_* or PROXY_BROKER_CLIENT_CONFIG, or allow direct connections): \
         refusing to connect directly"
    )]
    NoRoute {
        /// Why the broker could not answer.
        reason: String,
    },
    /// A proxy URL (from the broker or the local configuration) is not usable.
    #[error("invalid proxy URL: {0}")]
    ProxyUrl(String),
    /// The target URL is not usable.
    #[error("invalid target URL '{url}': {rule}")]
    TargetUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        rule: String,
    },
    /// Opening the connection failed (proxy unreachable, proxy handshake refused, target
    /// unreachable, TLS or WebSocket handshake failed, or timed out).
    #[error("connecting to {target} {via}: {message}")]
    Connect {
        /// The target (`host:port`).
        target: String,
        /// `via socks5://user:***@host:port` or `directly`.
        via: String,
        /// What went wrong (passwords redacted).
        message: String,
    },
    /// An HTTP request failed.
    #[error("HTTP request {via}: {message}")]
    Http {
        /// `via socks5://user:***@host:port` or `directly`.
        via: String,
        /// What went wrong (passwords redacted).
        message: String,
        /// Whether it failed while connecting (the proxy or target could not be reached).
        connect: bool,
    },
    /// The connection failed, and so did the retry the fallback policy called for.
    #[error("{first}; fallback ({policy}) failed too: {fallback}")]
    FallbackFailed {
        /// The first attempt's error.
        first: Box<Error>,
        /// The fallback policy that was applied.
        policy: &'static str,
        /// The retry's error.
        fallback: Box<Error>,
    },
}

impl Error {
    pub(crate) fn invalid(field: &'static str, rule: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            rule: rule.into(),
        }
    }
}
