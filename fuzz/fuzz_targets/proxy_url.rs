//! Proxy URL validation and redaction.
//!
//! Any string: `check_proxy_url`, `redact_url` and `redact_text` never panic.
//! A URL with userinfo, built from arbitrary parts: the redacted forms (`redact_url`,
//! `redact_text` on a sentence holding it, `redact_json` on a config holding it) and the
//! validation error never contain the user name or the password, when that part is at least four
//! characters long and does not appear in what may legitimately be shown: what the same URL with an
//! innocent userinfo shows (its scheme, host and port), and the rule texts.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use proxy_broker_core::redact::{redact_json, redact_text, redact_url};
use proxy_broker_core::validate::{PROXY_SCHEMES, check_proxy_url};

#[derive(Debug, Arbitrary)]
struct Parts {
    scheme: u8,
    user: String,
    password: Option<String>,
    host: String,
    port: String,
}

#[derive(Debug, Arbitrary)]
enum Input {
    Raw(String),
    Built(Parts),
}

/// Every fixed text a validation error may contain besides the (redacted) URL.
const RULES: &str = "contains whitespace or control characters (percent-encode them) \
    is not a valid URL (no scheme; allowed: http, https, socks4, socks4a, socks5, socks5h; \
    scheme://[user:pass@]host:port) has scheme (allowed: ) has no host has no port \
    has a path, query or fragment bytes long (at most 2048; value not shown) \
    empty host invalid international domain name invalid port number invalid IPv4 address \
    invalid IPv6 address invalid domain character relative URL without a base \
    relative URL with a cannot-be-a-base base a cannot-be-a-base URL doesn't have a host to set \
    URLs more than 4 GB are not supported";

fn no_leak(what: &str, shown: &str, secret: &str, visible: &str) {
    if secret.chars().count() >= 4 && !visible.contains(secret) && !RULES.contains(secret) {
        assert!(!shown.contains(secret), "{what} shows {secret:?}: {shown:?}");
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(raw) => {
            let _ = check_proxy_url(&raw);
            let _ = redact_url(&raw);
            let _ = redact_text(&raw);
        }
        Input::Built(p) => {
            let scheme = PROXY_SCHEMES[usize::from(p.scheme) % PROXY_SCHEMES.len()];
            let userinfo = match &p.password {
                Some(pw) => format!("{}:{pw}", p.user),
                None => p.user.clone(),
            };
            let raw = format!("{scheme}://{userinfo}@{}:{}", p.host, p.port);
            // What may be shown is what the same URL with an innocent userinfo shows (scheme, host
            // and port; redacted, quoted, in the sentence, in its error) and the rule texts.
            let innocent = format!("{scheme}://x@{}:{}", p.host, p.port);
            let visible = format!(
                "'{}' {} {} {RULES}",
                redact_url(&innocent),
                redact_text(&format!("connect via {innocent} failed")),
                check_proxy_url(&innocent).err().unwrap_or_default(),
            );
            let secrets: Vec<&str> = std::iter::once(p.user.as_str())
                .chain(p.password.as_deref())
                .collect();
            let url = redact_url(&raw);
            let json = redact_json(&serde_json::json!({ "url": raw }))["url"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let error = check_proxy_url(&raw).err().unwrap_or_default();
            // Text is split at whitespace: a secret holding whitespace cannot be found in it.
            let text = (!secrets.iter().any(|s| s.contains(char::is_whitespace)))
                .then(|| redact_text(&format!("connect via {raw} failed")));
            for secret in &secrets {
                no_leak("redact_url", &url, secret, &visible);
                no_leak("redact_json", &json, secret, &visible);
                no_leak("check_proxy_url", &error, secret, &visible);
                if let Some(text) = &text {
                    no_leak("redact_text", text, secret, &visible);
                }
            }
        }
    }
});
