//! Keeping secrets (proxy passwords, tokens, API keys) out of logs, errors, metrics and admin output.

use serde_json::Value;

/// What replaces a secret.
pub const MASK: &str = "***";

/// A URL with its password replaced by `***` (`socks5://user:***@host:1080`).
///
/// Works on strings that do not parse as URLs too: anything between `://` and the last `@` of the
/// authority that contains a `:` has the part after the `:` masked.
pub fn redact_url(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &raw[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return raw.to_owned();
    };
    let userinfo = &authority[..at];
    let user = match userinfo.find(':') {
        Some(colon) => &userinfo[..colon],
        None => return raw.to_owned(),
    };
    format!("{}{}:{}{}", &raw[..rest_start], user, MASK, &rest[at..])
}

/// Free text (an error message) with the password of every URL in it masked.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        // The URL token starts after the last delimiter before `://`.
        let start = rest[..pos]
            .rfind(|c: char| c.is_whitespace() || "'\"`(<[{,=".contains(c))
            .map_or(0, |i| i + 1);
        let end = pos
            + rest[pos..]
                .find(|c: char| c.is_whitespace() || "'\"`)>]},".contains(c))
                .unwrap_or(rest.len() - pos);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_masked_and_the_rest_kept() {
        assert_eq!(
            redact_url("socks5://alice:s3cret@p1:1080"),
            "socks5://alice:***@p1:1080"
        );
        assert_eq!(redact_url("http://u:p@h:1/x?y#z"), "http://u:***@h:1/x?y#z");
        assert_eq!(redact_url("http://u@h:1"), "http://u@h:1");
        assert_eq!(redact_url("http://h:1"), "http://h:1");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("socks5://a:b@c@h:1"), "socks5://a:***@h:1");
    }

    #[test]
    fn credentials_and_tokens_are_masked_but_file_paths_kept() {
        let v = serde_json::json!({
            "auth_credentials": {"token": "t0k", "token_file": "/run/secrets/token", "x": 5},
            "auth_tokens": ["a", "b"],
            "url": "socks5://u:pw@h:1",
            "plain": "hello"
        });
        let r = redact_json(&v);
        assert_eq!(r["auth_credentials"]["token"], "***");
        assert_eq!(r["auth_credentials"]["x"], "***");
        assert_eq!(r["auth_credentials"]["token_file"], "/run/secrets/token");
        assert_eq!(r["auth_tokens"], serde_json::json!(["***", "***"]));
        assert_eq!(r["url"], "socks5://u:***@h:1");
        assert_eq!(r["plain"], "hello");
    }

    #[test]
    fn every_url_in_text_is_masked() {
        assert_eq!(
            redact_text("bad 'socks5://u:pw@h' and \"http://a:b@c:1/x\" end"),
            "bad 'socks5://u:***@h' and \"http://a:***@c:1/x\" end"
        );
        assert_eq!(redact_text("no urls"), "no urls");
    }

    #[test]
    fn secret_paths_are_recognised() {
        assert!(is_secret_path("proxy.external_service.auth_credentials.token"));
        assert!(is_secret_path("server.auth_tokens[0]"));
        assert!(!is_secret_path("proxy.default.http.url"));
    }
}
