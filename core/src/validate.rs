//! The rules of the `proxy:` block, shared by the broker and the client crate.

use url::Url;

pub use crate::load::{Problems, Validate};
use crate::model::{ConnectionProxies, ExternalServiceConfig, PoolConfig, ProxyConfig, ProxySettings};
use crate::redact::redact_url;

/// Proxy URL schemes a feed can use.
pub const PROXY_SCHEMES: &[&str] = &["http", "https", "socks4", "socks4a", "socks5", "socks5h"];

/// Longest exchange id.
pub const MAX_EXCHANGE_ID_LEN: usize = 64;
/// Longest `region` in a request, in bytes (part of the gRPC contract).
pub const MAX_REGION_LEN: usize = 64;
/// Longest `client_id`, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 256;
/// Largest encoded request `metadata`, in bytes.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// Longest feedback `error_details`, in bytes.
pub const MAX_ERROR_DETAILS_LEN: usize = 4 * 1024;
/// Longest request `sticky_key`, in characters (printable ASCII, part of the gRPC contract).
pub const MAX_STICKY_KEY_LEN: usize = 128;
/// Allowed feedback `http_status` (part of the gRPC contract).
pub const HTTP_STATUS_RANGE: std::ops::RangeInclusive<u32> = 100..=599;
/// Longest feedback `retry_after_seconds`: 7 days (exchanges ban for 3 days at most).
pub const MAX_RETRY_AFTER_SECONDS: u32 = 7 * 24 * 3600;

/// Checks a sticky key: at most 128 characters of printable ASCII (0x20..=0x7E). The error is the
/// rule broken; it shows the offending character escaped, never the key.
pub fn check_sticky_key(key: &str) -> Result<(), String> {
    const RULE: &str = "at most 128 characters of printable ASCII, 0x20..=0x7E";
    if let Some((at, c)) = key.char_indices().find(|(_, c)| !matches!(c, ' '..='~')) {
        return Err(format!("contains {c:?} at byte {at} ({RULE})"));
    }
    if key.len() > MAX_STICKY_KEY_LEN {
        return Err(format!("is {} characters long ({RULE})", key.len()));
    }
    Ok(())
}

/// Longest proxy URL, in bytes, wherever one comes from (configuration, feedback, upstream answers):
/// everything keyed by a proxy URL stays bounded.
pub const MAX_PROXY_URL_LEN: usize = 2048;

/// Checks an exchange id: 1..=64 characters of `[A-Za-z0-9._-]`. The error is the rule broken.
pub fn check_exchange_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty (1..=64 characters of [A-Za-z0-9._-])".into());
    }
    if id.len() > MAX_EXCHANGE_ID_LEN {
        return Err(format!(
            "is {} characters long (1..=64 characters of [A-Za-z0-9._-])",
            id.len()
        ));
    }
    // Byte by byte (every call's exchange is checked): a byte past ASCII is refused like any
    // other, and as every byte before it is ASCII, it starts the character the error names.
    let Some(at) = id
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    else {
        return Ok(());
    };
    let c = id
        .get(at..)
        .and_then(|rest| rest.chars().next())
        .unwrap_or_default();
    Err(format!("contains {c:?} (1..=64 characters of [A-Za-z0-9._-])"))
}

/// A URL shown redacted, computed only when displayed.
struct Redacted<'a>(&'a str);

impl std::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(self.0))
    }
}

/// Checks a proxy URL: at most [`MAX_PROXY_URL_LEN`] bytes, an allowed scheme, a host and a port.
/// The error names the rule broken and never contains the userinfo (a too-long URL is not shown at
/// all).
pub fn check_proxy_url(raw: &str) -> Result<Url, String> {
    if raw.len() > MAX_PROXY_URL_LEN {
        return Err(format!(
            "is {} bytes long (at most {MAX_PROXY_URL_LEN}; value not shown)",
            raw.len()
        ));
    }
    // Redacted when an error message is written, not before: it parses the URL a second time.
    let shown = Redacted(raw);
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "'{shown}' contains whitespace or control characters (percent-encode them)"
        ));
    }
    if !raw.contains("://") {
        // `user:pass@host:1` parses as scheme `user`: say so without echoing the user name.
        return Err(format!(
            "'{shown}' is not a valid URL (no scheme; allowed: {}; scheme://[user:pass@]host:port)",
            PROXY_SCHEMES.join(", ")
        ));
    }
    let url = Url::parse(raw).map_err(|e| format!("'{shown}' is not a valid URL ({e})"))?;
    if !PROXY_SCHEMES.contains(&url.scheme()) {
        return Err(format!(
            "'{shown}' has scheme '{}' (allowed: {})",
            url.scheme(),
            PROXY_SCHEMES.join(", ")
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("'{shown}' has no host (scheme://[user:pass@]host:port)"));
    }
    // `Url::port` is None both when absent and when it equals the scheme's default (http:80), so
    // look at the text: a port must be written out.
    if url.port().is_none() && !has_explicit_port(raw) {
        return Err(format!("'{shown}' has no port (scheme://[user:pass@]host:port)"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "'{shown}' has a path, query or fragment (scheme://[user:pass@]host:port)"
        ));
    }
    Ok(url)
}

fn has_explicit_port(raw: &str) -> bool {
    let after_scheme = raw.split_once("://").map_or(raw, |(_, r)| r);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let port = match host_port.rfind(']') {
        Some(close) => host_port[close + 1..].strip_prefix(':'),
        None => host_port.rsplit_once(':').map(|(_, p)| p),
    };
    port.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks an upstream endpoint: an http(s) URL with a host.
pub fn check_endpoint_url(raw: &str) -> Result<Url, String> {
    let shown = redact_url(raw);
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("'{shown}' contains whitespace or control characters"));
    }
    if !raw.contains("://") {
        return Err(format!(
            "'{shown}' is not a valid URL (no scheme; allowed: http, https)"
        ));
    }
    let url = Url::parse(raw).map_err(|e| format!("'{shown}' is not a valid URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "'{shown}' has scheme '{}' (allowed: http, https)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("'{shown}' has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "'{shown}' has a query or fragment (a base URL is expected)"
        ));
    }
    Ok(url)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Checks `value` against an inclusive range; records a problem naming the rule if outside.
pub fn check_range(problems: &mut Problems, path: String, value: i64, min: i64, max: i64) {
    if !(min..=max).contains(&value) {
        problems.push(path, format!("{value} is out of range (allowed {min}..={max})"));
    }
}

impl Validate for ProxySettings {
    fn validate(&self, path: &str, problems: &mut Problems) {
        if let Some(default) = &self.default {
            default.validate(&join(path, "default"), problems);
        }
        let mut seen = std::collections::BTreeMap::new();
        for (id, proxies) in &self.exchanges {
            let p = join(path, &format!("exchanges.{id}"));
            if let Err(rule) = check_exchange_id(id) {
                problems.push(p.clone(), format!("exchange id '{id}' {rule}"));
            }
            if let Some(other) = seen.insert(id.to_lowercase(), id) {
                problems.push(
                    p.clone(),
                    format!("exchange ids '{other}' and '{id}' are the same (ids are case-insensitive)"),
                );
            }
            proxies.validate(&p, problems);
        }
        self.external_service
            .validate(&join(path, "external_service"), problems);
    }
}

impl Validate for ConnectionProxies {
    fn validate(&self, path: &str, problems: &mut Problems) {
        if let Some(http) = &self.http {
            http.validate(&join(path, "http"), problems);
        }
        if let Some(ws) = &self.websocket {
            ws.validate(&join(path, "websocket"), problems);
        }
    }
}

impl Validate for ProxyConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        check_range(
            problems,
            join(path, "timeout_seconds"),
            self.timeout_seconds,
            1,
            300,
        );
        match (&self.url, &self.pool) {
            (Some(url), None) => {
                if let Err(rule) = check_proxy_url(url) {
                    problems.push(join(path, "url"), rule);
                }
            }
            (None, Some(pool)) => pool.validate(&join(path, "pool"), problems),
            (None, None) => problems.push(path, "needs `url` or `pool` (neither is set)"),
            (Some(_), Some(_)) => problems.push(
                path,
                "sets both `url` and `pool`; set one (a pool entry picks among its members, a url entry always answers that url)",
            ),
        }
    }
}

impl Validate for PoolConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        let list = join(path, "proxies");
        if self.proxies.is_empty() {
            problems.push(list.clone(), "is empty (a pool needs at least one proxy)");
        } else if !self.proxies.iter().any(|m| m.enabled) {
            problems.push(
                list.clone(),
                "has no enabled member (at least one must be enabled)",
            );
        }
        for (i, member) in self.proxies.iter().enumerate() {
            let p = format!("{list}[{i}]");
            if let Err(rule) = check_proxy_url(&member.url) {
                problems.push(format!("{p}.url"), rule);
            }
            if !(member.weight.is_finite() && (0.1..=10.0).contains(&member.weight)) {
                problems.push(
                    format!("{p}.weight"),
                    format!("{} is out of range (allowed 0.1..=10.0)", member.weight),
                );
            }
        }
    }
}

impl Validate for ExternalServiceConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        check_range(
            problems,
            join(path, "timeout_seconds"),
            self.timeout_seconds,
            1,
            60,
        );
        check_range(
            problems,
            join(path, "cache_ttl_seconds"),
            self.cache_ttl_seconds,
            60,
            3600,
        );
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if let Err(rule) = check_endpoint_url(endpoint) {
                problems.push(format!("{}[{i}]", join(path, "endpoints")), rule);
            }
        }
        check_range(
            problems,
            join(path, "failure_threshold"),
            self.failure_threshold,
            1,
            100,
        );
        check_range(problems, join(path, "open_seconds"), self.open_seconds, 1, 300);
        check_range(
            problems,
            join(path, "max_open_seconds"),
            self.max_open_seconds,
            self.open_seconds.max(1),
            3600,
        );
        check_range(
            problems,
            join(path, "stale_if_error_seconds"),
            self.stale_if_error_seconds,
            0,
            86_400,
        );
        check_range(
            problems,
            join(path, "cache_max_entries"),
            self.cache_max_entries,
            1,
            10_000_000,
        );
        check_range(
            problems,
            join(path, "feedback_queue_size"),
            self.feedback_queue_size,
            1,
            1_000_000,
        );
        check_range(
            problems,
            join(path, "eject_after_failures"),
            self.eject_after_failures,
            1,
            100,
        );
        check_range(
            problems,
            join(path, "max_ejection_percent"),
            self.max_ejection_percent,
            0,
            100,
        );
        if let crate::model::HedgeDelay::Fixed(ms) = self.hedge_delay_ms {
            check_range(problems, join(path, "hedge_delay_ms"), ms, 0, 60_000);
        }
        check_range(
            problems,
            join(path, "upstream_max_in_flight"),
            self.upstream_max_in_flight,
            1,
            10_000,
        );
        check_range(
            problems,
            join(path, "upstream_max_in_flight_total"),
            self.upstream_max_in_flight_total,
            1,
            100_000,
        );
        const KNOWN: &[&str] = &[
            "token",
            "token_file",
            "api_key",
            "api_key_file",
            "cert_file",
            "key_file",
            "ca_file",
        ];
        for key in self.auth_credentials.keys() {
            if !KNOWN.contains(&key.as_str()) {
                problems.push(
                    format!("{}.{key}", join(path, "auth_credentials")),
                    format!("unknown credential (allowed: {})", KNOWN.join(", ")),
                );
            }
        }
        if self.enabled {
            let creds = &self.auth_credentials;
            let has = |k: &str| creds.get(k).is_some_and(|v| !v.is_empty());
            let cred_path = join(path, "auth_credentials");
            match self.auth_method {
                crate::model::AuthMethod::BearerToken if !has("token") && !has("token_file") => problems
                    .push(
                        cred_path,
                        "auth_method bearer_token needs `token` or `token_file` (neither is set)",
                    ),
                crate::model::AuthMethod::BearerToken if has("token") && has("token_file") => {
                    problems.push(cred_path, "set `token` or `token_file`, not both")
                }
                crate::model::AuthMethod::ApiKey if !has("api_key") && !has("api_key_file") => problems.push(
                    cred_path,
                    "auth_method api_key needs `api_key` or `api_key_file` (neither is set)",
                ),
                crate::model::AuthMethod::ApiKey if has("api_key") && has("api_key_file") => {
                    problems.push(cred_path, "set `api_key` or `api_key_file`, not both")
                }
                crate::model::AuthMethod::MutualTls => {
                    let missing: Vec<_> = ["cert_file", "key_file", "ca_file"]
                        .into_iter()
                        .filter(|k| !has(k))
                        .collect();
                    if !missing.is_empty() {
                        problems.push(
                            cred_path,
                            format!(
                                "auth_method mutual_tls needs cert_file, key_file and ca_file (missing: {})",
                                missing.join(", ")
                            ),
                        );
                    }
                }
                _ => {}
            }
        }
        if self.enabled && self.endpoints.is_empty() {
            problems.push(
                join(path, "endpoints"),
                "is empty while `enabled` is true (at least one endpoint is needed)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_need_scheme_host_and_port() {
        let long_host = format!("socks5://{}:1080", "h".repeat(MAX_PROXY_URL_LEN - 14));
        assert_eq!(long_host.len(), MAX_PROXY_URL_LEN);
        let too_long = format!("socks5://user:{}@h:1080", "p".repeat(MAX_PROXY_URL_LEN));
        // (name, url, None = valid | Some(part of the error))
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("plain", "socks5://h:1080", None),
            ("with credentials", "http://user:pw@h:80", None),
            ("ipv6", "socks5h://[::1]:1080", None),
            ("exactly the longest", &long_host, None),
            ("no port", "http://h", Some("no port")),
            ("bad scheme", "ftp://h:21", Some("scheme 'ftp'")),
            ("no scheme", "h:1080", Some("no scheme")),
            ("no host", "socks5://:1080", Some("")),
            ("surrounding whitespace", "  http://p:3128  ", Some("whitespace")),
            (
                "whitespace in password",
                "http://alice:hun ter2@h:1",
                Some("whitespace"),
            ),
            (
                "one byte too long",
                &format!("{long_host}0"),
                Some("is 2049 bytes long (at most 2048"),
            ),
            ("much too long", &too_long, Some("bytes long (at most 2048")),
        ];
        for (name, url, want) in cases {
            match (check_proxy_url(url), want) {
                (Ok(_), None) => {}
                (Err(e), Some(part)) => assert!(e.contains(part), "{name}: {e}"),
                (got, _) => panic!("{name}: {url:?} gave {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn proxy_url_errors_never_echo_userinfo_or_overlong_urls() {
        let too_long = format!("socks5://user:{}@h:1080", "p".repeat(MAX_PROXY_URL_LEN));
        let cases = [
            ("bad scheme", "gopher://u:topsecret@h:1".to_owned(), "topsecret"),
            ("user-only token", "ftp://TOKEN1234@h:1".to_owned(), "TOKEN1234"),
            ("api key as user", "http://APIKEY99:@h".to_owned(), "APIKEY99"),
            (
                "unparsable password",
                "socks5://u:p#ssword@h:1".to_owned(),
                "ssword",
            ),
            ("no scheme", "alice:s3cret@h:1".to_owned(), "s3cret"),
            (
                "no scheme, user shown as scheme",
                "alice:s3cret@h:1".to_owned(),
                "alice",
            ),
            ("too long", too_long, "pppp"),
        ];
        for (name, url, secret) in cases {
            let err = check_proxy_url(&url).expect_err(name);
            assert!(!err.contains(secret), "{name}: {err}");
            assert!(err.len() < 200, "{name}: {err}");
        }
    }

    #[test]
    fn exchange_ids_follow_the_charset_and_length() {
        assert!(check_exchange_id("binance_futures").is_ok());
        assert!(check_exchange_id("Binance.US-2").is_ok());
        assert!(check_exchange_id("").is_err());
        assert!(check_exchange_id(&"a".repeat(65)).is_err());
        assert!(check_exchange_id("bin ance").is_err());
    }

    #[test]
    fn an_exchange_id_error_names_the_first_character_outside_the_charset() {
        let err = check_exchange_id("bin ance").unwrap_err();
        assert!(err.starts_with("contains ' '"), "{err}");
        let err = check_exchange_id("bin\u{e4}nce/x").unwrap_err();
        assert!(err.starts_with("contains '\u{e4}'"), "{err}");
        let err = check_exchange_id("\u{1f600}").unwrap_err();
        assert!(err.starts_with("contains '\u{1f600}'"), "{err}");
    }

    proptest::proptest! {
        /// The byte-wise check says what the rule says character by character, and names the
        /// same character.
        #[test]
        fn the_exchange_id_check_is_the_character_rule(id in "[a-zA-Z0-9._ /-]{0,70}|\\PC{0,70}") {
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            let expected = if id.is_empty() || id.len() > MAX_EXCHANGE_ID_LEN {
                None
            } else {
                Some(id.chars().find(|c| !allowed(*c)))
            };
            match (check_exchange_id(&id), expected) {
                (Ok(()), Some(None)) | (Err(_), None) => {}
                (Err(err), Some(Some(c))) => {
                    let prefix = format!("contains {c:?}");
                    proptest::prop_assert!(err.starts_with(&prefix), "{} for {:?}", err, id);
                }
                (got, want) => proptest::prop_assert!(false, "{:?} for {:?}, rule {:?}", got, id, want),
            }
        }
    }
}
