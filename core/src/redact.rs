//! Keeping secrets (proxy passwords, user names, tokens, API keys) out of logs, errors, metrics and
//! admin output.
//!
//! A URL's whole userinfo is a secret: commercial proxy providers put API keys and tokens in the
//! user name (`http://APIKEY:@proxy:8011`, `socks5://TOKEN@host:1080`), so the user name is masked
//! along with the password. Masking works on the text, not on a parsed URL, so strings that do not
//! parse (an unencoded `#` or `/` in a password) are masked too: everything between `://` and the
//! last `@` is replaced by `***`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What replaces a secret.
pub const MASK: &str = "***";

/// A secret string (a token, an API key): `Debug` and `Display` print `***`, so a configuration
/// printed with `{:?}` or an error built with `{}` never shows it. Serializes as the plain string
/// (configuration round-trips through serde); admin output masks it by key with [`redact_json`].
#[derive(Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (a header, a comparison). Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// A URL with its whole userinfo replaced by `***` (`socks5://***@host:1080`).
///
/// Text based, so it works on strings that do not parse as URLs too: everything between `://` and
/// the last `@` is masked (an `@` in a path or query masks too much, never too little). A string
/// without `://` that holds an `@` (`user:pass@host:1`, a URL missing its scheme) has everything
/// before its last `@` masked. Strings without an `@` are returned unchanged.
pub fn redact_url(raw: &str) -> String {
    let (keep, rest) = match raw.find("://") {
        Some(scheme_end) => raw.split_at(scheme_end + 3),
        None => ("", raw),
    };
    match rest.rfind('@') {
        Some(0) | None => raw.to_owned(),
        Some(at) => format!("{keep}{MASK}{}", &rest[at..]),
    }
}

/// Free text (an error message, feedback `error_details`) with the userinfo of every URL in it
/// masked as [`redact_url`] does.
///
/// A URL starts at its scheme (after the last whitespace or one of `'"`(<[{,=` before its `://`)
/// and ends at the next whitespace, so a password holding quotes, brackets or an unencoded `#` is
/// masked whole. A password holding whitespace cannot be told apart from the text around it.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let start = rest[..pos]
            .char_indices()
            .rev()
            .find(|&(_, c)| c.is_whitespace() || "'\"`(<[{,=".contains(c))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let end = rest[pos..]
            .find(char::is_whitespace)
            .map_or(rest.len(), |i| pos + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Keys whose values are secrets wherever they appear in a configuration tree.
const SECRET_KEYS: &[&str] = &["token", "api_key", "password", "secret", "auth_tokens"];
/// Keys whose every value is a secret (except `*_file` paths, which only point at secrets).
const SECRET_MAPS: &[&str] = &["auth_credentials"];

/// A configuration tree (as JSON) with every secret replaced by `***`: credential values, tokens and
/// the passwords inside proxy URLs.
pub fn redact_json(value: &Value) -> Value {
    redact_value(value, false)
}

fn redact_value(value: &Value, secret: bool) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let child_secret = if SECRET_MAPS.contains(&k.as_str()) {
                        true
                    } else if secret {
                        !k.ends_with("_file")
                    } else {
                        SECRET_KEYS.contains(&k.as_str())
                    };
                    (k.clone(), redact_value(v, child_secret))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact_value(v, secret)).collect()),
        Value::String(_) | Value::Number(_) | Value::Bool(_) if secret => Value::String(MASK.into()),
        Value::String(s) => Value::String(redact_url(s)),
        other => other.clone(),
    }
}

/// Whether a configuration key path holds a secret, so error messages must not echo its value.
pub fn is_secret_path(path: &str) -> bool {
    path.split(['.', '['])
        .any(|segment| SECRET_MAPS.contains(&segment) || SECRET_KEYS.contains(&segment))
}

/// `Debug` of a credentials map (`auth_credentials`): every value masked except `*_file` paths,
/// which only point at secrets. Used by the configuration types' `Debug`.
pub struct DebugCredentials<'a>(pub &'a std::collections::BTreeMap<String, String>);

impl fmt::Debug for DebugCredentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if k.ends_with("_file") { v.as_str() } else { MASK };
                (k, shown)
            }))
            .finish()
    }
}

/// `Debug` of a list of URLs with their userinfo masked (upstream endpoints).
pub struct DebugUrls<'a>(pub &'a [String]);

impl fmt::Debug for DebugUrls<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|u| redact_url(u)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_userinfo_of_a_url_is_masked_and_the_rest_kept() {
        let cases = [
            (
                "user and password",
                "socks5://alice:s3cret@p1:1080",
                "socks5://***@p1:1080",
            ),
            (
                "user only (token)",
                "socks5://TOKEN@host:1080",
                "socks5://***@host:1080",
            ),
            (
                "api key, empty password",
                "http://APIKEY:@proxy:8011",
                "http://***@proxy:8011",
            ),
            (
                "short user and password",
                "http://user:pass@h:1",
                "http://***@h:1",
            ),
            (
                "path, query and fragment kept",
                "http://u:p@h:1/x?y#z",
                "http://***@h:1/x?y#z",
            ),
            ("no userinfo", "http://h:1", "http://h:1"),
            ("empty userinfo", "http://@h:1", "http://@h:1"),
            ("not a url", "not a url", "not a url"),
            ("@ in the password", "socks5://a:b@c@h:1", "socks5://***@h:1"),
            (
                "unencoded # in the password",
                "socks5://u:p#ss@h:1",
                "socks5://***@h:1",
            ),
            (
                "unencoded / in the password",
                "http://user:12/ss@h:1",
                "http://***@h:1",
            ),
            (
                "whitespace in the password",
                "http://alice:hun ter2@h:1",
                "http://***@h:1",
            ),
            ("no scheme", "alice:s3cret@h:1", "***@h:1"),
            (
                "percent-encoded user",
                "socks5h://us%40er:p%3Ass@px:1080",
                "socks5h://***@px:1080",
            ),
            ("multi-byte text", "socks5://ü:ñ@h:1", "socks5://***@h:1"),
        ];
        for (name, raw, want) in cases {
            assert_eq!(redact_url(raw), want, "{name}");
        }
    }

    #[test]
    fn every_url_in_text_is_masked() {
        let cases = [
            (
                "quoted urls",
                "bad 'socks5://u:pw@h' and \"http://a:b@c:1/x\" end",
                "bad 'socks5://***@h' and \"http://***@c:1/x\" end",
            ),
            ("no urls", "no urls", "no urls"),
            (
                "user-only token",
                "via socks5://TOKEN@host:1080 failed",
                "via socks5://***@host:1080 failed",
            ),
            (
                "api key as user",
                "proxy http://APIKEY:@proxy:8011: refused",
                "proxy http://***@proxy:8011: refused",
            ),
            (
                "# in the password",
                "url=socks5://u:p#ss@h:1, retrying",
                "url=socks5://***@h:1, retrying",
            ),
            (
                "bracket in the password",
                "(socks5://u:p)ss@h:1)",
                "(socks5://***@h:1)",
            ),
            (
                "two urls in one token",
                "a=http://u:p@h:1,http://v:q@g:2",
                "a=http://***@g:2",
            ),
            (
                "unicode whitespace before",
                "x\u{3000}http://u:pw@h:1",
                "x\u{3000}http://***@h:1",
            ),
            ("url at the very end", "to http://u:pw@h:1", "to http://***@h:1"),
            ("scheme only", "://", "://"),
        ];
        for (name, text, want) in cases {
            assert_eq!(redact_text(text), want, "{name}");
        }
    }

    #[test]
    fn credentials_and_tokens_are_masked_but_file_paths_kept() {
        let v = serde_json::json!({
            "auth_credentials": {"token": "t0k", "token_file": "/run/secrets/token", "x": 5},
            "auth_tokens": ["a", "b"],
            "url": "socks5://u:pw@h:1",
            "user_only": "socks5://TOKEN@h:1",
            "plain": "hello"
        });
        let r = redact_json(&v);
        assert_eq!(r["auth_credentials"]["token"], "***");
        assert_eq!(r["auth_credentials"]["x"], "***");
        assert_eq!(r["auth_credentials"]["token_file"], "/run/secrets/token");
        assert_eq!(r["auth_tokens"], serde_json::json!(["***", "***"]));
        assert_eq!(r["url"], "socks5://***@h:1");
        assert_eq!(r["user_only"], "socks5://***@h:1");
        assert_eq!(r["plain"], "hello");
    }

    #[test]
    fn secrets_print_as_the_mask_but_serialize_as_themselves() {
        let s = Secret::from("tok-0123456789abcdef");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "tok-0123456789abcdef");
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(json, "\"tok-0123456789abcdef\"");
        let back: Secret = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, s);
    }

    #[test]
    fn credential_and_url_debug_helpers_mask_secrets() {
        let creds: std::collections::BTreeMap<String, String> = [
            ("token".to_owned(), "t0k-secret".to_owned()),
            ("ca_file".to_owned(), "/etc/ca.pem".to_owned()),
        ]
        .into();
        assert_eq!(
            format!("{:?}", DebugCredentials(&creds)),
            r#"{"ca_file": "/etc/ca.pem", "token": "***"}"#
        );
        let urls = ["https://u:pw@up:1".to_owned(), "https://up2:1".to_owned()];
        assert_eq!(
            format!("{:?}", DebugUrls(&urls)),
            r#"["https://***@up:1", "https://up2:1"]"#
        );
    }

    #[test]
    fn secret_paths_are_recognised() {
        assert!(is_secret_path("proxy.external_service.auth_credentials.token"));
        assert!(is_secret_path("server.auth_tokens[0]"));
        assert!(!is_secret_path("proxy.default.http.url"));
    }
}
