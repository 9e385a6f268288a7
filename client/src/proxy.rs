//! A proxy URL as the broker hands it out, parsed once: scheme, host, port and credentials.
//!
//! The URL is kept verbatim (feedback must name the proxy exactly as it was handed out), but it is
//! only ever shown with its credentials masked (`Debug`, `Display`, errors, logs).

use std::fmt;

use percent_encoding::percent_decode_str;
use proxy_broker_core::redact::{MASK, redact_url};
use proxy_broker_core::validate::check_proxy_url;

use crate::error::Error;

/// `raw` (a URL, parsed or not) as it may be shown: [`redact_url`], and then, should any user
/// name be left in the authority (user-only tokens, API keys as user names), the whole userinfo
/// replaced by `***`. A guard, so that the client never shows a user name whatever shape the
/// shared redactor masks.
pub(crate) fn shown(raw: &str) -> String {
    let redacted = redact_url(raw);
    let Some(scheme_end) = redacted.find("://") else {
        return redacted;
    };
    let start = scheme_end + 3;
    let rest = &redacted[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) if &authority[..at] != MASK => {
            format!("{}{MASK}{}", &redacted[..start], &rest[at..])
        }
        _ => redacted,
    }
}

/// How the client talks to a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyScheme {
    /// HTTP CONNECT over plain TCP.
    Http,
    /// HTTP CONNECT over TLS to the proxy.
    Https,
    /// SOCKS4: the client resolves the target's name (IPv4 only).
    Socks4,
    /// SOCKS4a: the proxy resolves the target's name.
    Socks4a,
    /// SOCKS5: the client resolves the target's name.
    Socks5,
    /// SOCKS5 with the name resolved by the proxy (`socks5h`).
    Socks5h,
}

impl ProxyScheme {
    /// The URL scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyScheme::Http => "http",
            ProxyScheme::Https => "https",
            ProxyScheme::Socks4 => "socks4",
            ProxyScheme::Socks4a => "socks4a",
            ProxyScheme::Socks5 => "socks5",
            ProxyScheme::Socks5h => "socks5h",
        }
    }

    /// Whether the proxy, not the client, resolves the target's host name.
    pub fn remote_dns(self) -> bool {
        matches!(
            self,
            ProxyScheme::Socks4a | ProxyScheme::Socks5h | ProxyScheme::Http | ProxyScheme::Https
        )
    }
}

/// A validated proxy URL (`scheme://[user:pass@]host:port`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl {
    raw: String,
    scheme: ProxyScheme,
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
}

impl ProxyUrl {
    /// Parses and checks a proxy URL with the same rules as the broker (allowed scheme, host and
    /// port required). The error never contains the password.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let url = check_proxy_url(raw).map_err(Error::ProxyUrl)?;
        let scheme = match url.scheme() {
            "http" => ProxyScheme::Http,
            "https" => ProxyScheme::Https,
            "socks4" => ProxyScheme::Socks4,
            "socks4a" => ProxyScheme::Socks4a,
            "socks5" => ProxyScheme::Socks5,
            _ => ProxyScheme::Socks5h,
        };
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err(Error::ProxyUrl(format!("'{}' has no host", shown(raw)))),
        };
        let port = url.port_or_known_default().unwrap_or(1080);
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let username = (!url.username().is_empty()).then(|| decode(url.username()));
        let password = url.password().map(decode);
        Ok(Self {
            raw: raw.to_owned(),
            scheme,
            host,
            port,
            username,
            password,
        })
    }

    /// The URL exactly as handed out, credentials included (for feedback and for reqwest). Never
    /// log this; use `Display`.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The URL with its credentials (user name and password) masked.
    pub fn redacted(&self) -> String {
        shown(&self.raw)
    }

    /// The scheme.
    pub fn scheme(&self) -> ProxyScheme {
        self.scheme
    }

    /// The proxy's host (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user name from the URL, percent-decoded.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The password from the URL, percent-decoded.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ProxyUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_decoded_and_never_shown() {
        let p = ProxyUrl::parse("socks5h://us%40er:p%3Ass@proxy.example:1080").unwrap();
        assert_eq!(p.scheme(), ProxyScheme::Socks5h);
        assert_eq!((p.host(), p.port()), ("proxy.example", 1080));
        assert_eq!(p.username(), Some("us@er"));
        assert_eq!(p.password(), Some("p:ss"));
        for shown in [p.to_string(), format!("{p:?}"), p.redacted()] {
            assert!(shown.contains("proxy.example:1080"), "{shown}");
            for secret in ["us%40er", "p%3Ass"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
    }

    #[test]
    fn every_shape_of_userinfo_is_masked() {
        // (URL, secrets that must not be shown, what must still be shown)
        let rows = [
            ("socks5://user:pass@h:1080", &["user", "pass"][..], "h:1080"),
            ("socks5://TOKENVALUE@h:1080", &["TOKENVALUE"], "h:1080"),
            ("http://APIKEY123:@proxy:8011", &["APIKEY123"], "proxy:8011"),
            ("http://:onlypass@proxy:8011", &["onlypass"], "proxy:8011"),
            ("socks5://a%40b:c%3Ad@h:1", &["a%40b", "c%3Ad"], "h:1"),
            ("no url here", &[], "no url here"),
            ("socks5://h:1080", &[], "socks5://h:1080"),
        ];
        for (raw, secrets, kept) in rows {
            let out = shown(raw);
            assert!(out.contains(kept), "{raw}: {out}");
            for secret in secrets {
                assert!(!out.contains(secret), "{raw}: {secret} in {out}");
            }
            if let Ok(p) = ProxyUrl::parse(raw) {
                for secret in secrets {
                    assert!(!format!("{p:?} {p}").contains(secret), "{raw}");
                }
            }
        }
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        let p = ProxyUrl::parse("http://[::1]:3128").unwrap();
        assert_eq!(p.host(), "::1");
    }

    #[test]
    fn bad_urls_are_rejected_without_echoing_the_password() {
        let e = ProxyUrl::parse("ftp://u:secret@h:21").unwrap_err().to_string();
        assert!(e.contains("scheme"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(ProxyUrl::parse("socks5://h").is_err());
    }
}
