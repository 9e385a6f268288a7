//! Reading and validating an upstream answer (the design's ProxyResponse) within fixed limits.
//!
//! The body is read chunk by chunk and given up on as soon as it passes [`MAX_ANSWER_BYTES`] (or
//! when `Content-Length` already says it will), so a huge or endless answer costs at most one
//! chunk beyond the limit in memory. The fields handed to feeds are capped too: `strategy`
//! (short and printable), `metadata` (size and nesting) and `proxy_url` (length).

use proxy_broker_core::validate::{MAX_METADATA_BYTES, check_proxy_url};
use serde_json::{Map, Value};

use crate::pb::FallbackPolicy;

/// Largest upstream answer body read, in bytes; a larger one is an invalid answer.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest `strategy`, in bytes (printable characters only).
pub const MAX_STRATEGY_LEN: usize = 64;
/// Largest answer `metadata`, serialized as JSON, in bytes (what a request's metadata may be).
pub const MAX_ANSWER_METADATA_BYTES: usize = MAX_METADATA_BYTES;
/// Deepest nesting of objects and lists in answer `metadata` (the object itself is level 1).
/// Well below the 100-level recursion limit of protobuf decoders in feeds, since each JSON level
/// becomes up to three `google.protobuf.Struct` levels.
pub const MAX_ANSWER_METADATA_DEPTH: usize = 16;
/// Longest proxy URL, in bytes; the same rule as for configured and reported URLs.
pub use proxy_broker_core::validate::MAX_PROXY_URL_LEN;
/// Shortest TTL an upstream may give.
pub const MIN_ANSWER_TTL: i64 = 60;

/// A validated upstream answer (`Debug` masks the proxy's userinfo).
#[derive(derive_more::Debug, Clone, PartialEq)]
pub struct Answer {
    /// The proxy (allowed scheme, host and port checked).
    #[debug("{:?}", proxy_broker_core::redact::redact_url(proxy_url))]
    pub proxy_url: String,
    /// How the upstream chose it.
    pub strategy: String,
    /// How long it may be cached (≥ 60; the configured default when the upstream gave none).
    pub ttl_seconds: u32,
    /// What the feed should do when the proxy fails.
    pub fallback_policy: FallbackPolicy,
    /// Whatever else the upstream attached.
    pub metadata: Map<String, Value>,
}

/// Collects a body up to [`MAX_ANSWER_BYTES`].
#[derive(Debug, Default)]
pub(super) struct LimitedBody {
    bytes: Vec<u8>,
}

impl LimitedBody {
    /// Starts a body whose sender announced `declared` bytes (`Content-Length`), refusing at once
    /// when that is over the limit.
    pub(super) fn new(declared: Option<u64>) -> Result<Self, String> {
        match declared {
            Some(len) if len > MAX_ANSWER_BYTES as u64 => Err(format!(
                "body of {len} bytes (Content-Length) is over the {MAX_ANSWER_BYTES}-byte limit"
            )),
            Some(len) => Ok(Self {
                bytes: Vec::with_capacity(usize::try_from(len).unwrap_or(0)),
            }),
            None => Ok(Self::default()),
        }
    }

    /// Adds one chunk, refusing as soon as the total passes the limit.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        if self.bytes.len().saturating_add(chunk.len()) > MAX_ANSWER_BYTES {
            return Err(format!(
                "body is over the {MAX_ANSWER_BYTES}-byte limit (stopped reading after {} bytes)",
                self.bytes.len().saturating_add(chunk.len())
            ));
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    /// The whole body.
    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Counts the bytes serde_json writes without keeping them.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How deeply `value` nests lists and objects (a scalar is 0).
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn check_metadata(metadata: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let value = Value::Object(metadata);
    let mut size = Counter(0);
    serde_json::to_writer(&mut size, &value).map_err(|e| format!("metadata cannot be encoded ({e})"))?;
    if size.0 > MAX_ANSWER_METADATA_BYTES {
        return Err(format!(
            "metadata is {} bytes as JSON (at most {MAX_ANSWER_METADATA_BYTES})",
            size.0
        ));
    }
    let levels = depth(&value);
    if levels > MAX_ANSWER_METADATA_DEPTH {
        return Err(format!(
            "metadata nests {levels} levels deep (at most {MAX_ANSWER_METADATA_DEPTH})"
        ));
    }
    match value {
        Value::Object(m) => Ok(m),
        _ => Ok(Map::new()),
    }
}

/// Validates an upstream answer (the design's ProxyResponse). Unknown fields are ignored.
pub fn parse_answer(body: &[u8], default_ttl: u32) -> Result<Answer, String> {
    if body.len() > MAX_ANSWER_BYTES {
        return Err(format!(
            "body is {} bytes (at most {MAX_ANSWER_BYTES})",
            body.len()
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(mut obj) = value else {
        return Err("not a JSON object".into());
    };
    let proxy_url = match obj.remove("proxy_url") {
        Some(Value::String(s)) => s,
        Some(_) => return Err("proxy_url is not a string".into()),
        None => return Err("proxy_url is missing".into()),
    };
    if proxy_url.len() > MAX_PROXY_URL_LEN {
        return Err(format!(
            "proxy_url is {} bytes long (at most {MAX_PROXY_URL_LEN})",
            proxy_url.len()
        ));
    }
    check_proxy_url(&proxy_url).map_err(|rule| format!("proxy_url {rule}"))?;
    let strategy = match obj.remove("strategy") {
        Some(Value::String(s)) => s,
        Some(_) => return Err("strategy is not a string".into()),
        None => return Err("strategy is missing".into()),
    };
    if strategy.len() > MAX_STRATEGY_LEN {
        return Err(format!(
            "strategy is {} bytes long (at most {MAX_STRATEGY_LEN} printable characters)",
            strategy.len()
        ));
    }
    if strategy.chars().any(char::is_control) {
        return Err(format!(
            "strategy contains control characters (at most {MAX_STRATEGY_LEN} printable characters)"
        ));
    }
    let ttl_seconds = match obj.remove("ttl_seconds") {
        None | Some(Value::Null) => default_ttl,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(t) if t >= MIN_ANSWER_TTL => u32::try_from(t).unwrap_or(u32::MAX),
            Some(t) => return Err(format!("ttl_seconds {t} is below {MIN_ANSWER_TTL}")),
            None => return Err(format!("ttl_seconds {n} is not a whole number")),
        },
        Some(_) => return Err("ttl_seconds is not a number".into()),
    };
    let fallback_policy = match obj.remove("fallback_policy") {
        None | Some(Value::Null) => FallbackPolicy::EmbeddedFallback,
        Some(Value::String(s)) => match s.as_str() {
            "direct_connection" => FallbackPolicy::DirectConnection,
            "embedded_fallback" => FallbackPolicy::EmbeddedFallback,
            "fail" => FallbackPolicy::Fail,
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(format!(
                    "fallback_policy '{}' is not one of direct_connection, embedded_fallback, fail",
                    shown.escape_debug()
                ));
            }
        },
        Some(_) => return Err("fallback_policy is not a string".into()),
    };
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => check_metadata(m)?,
        Some(_) => return Err("metadata is not an object".into()),
    };
    Ok(Answer {
        proxy_url,
        strategy,
        ttl_seconds,
        fallback_policy,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_answers_parse_with_defaults_and_extra_fields_ignored() {
        let a = parse_answer(
            br#"{"proxy_url":"socks5://p:1080","strategy":"geo","extra":1}"#,
            300,
        )
        .unwrap();
        assert_eq!(a.ttl_seconds, 300);
        assert_eq!(a.fallback_policy, FallbackPolicy::EmbeddedFallback);
        let a = parse_answer(
            br#"{"proxy_url":"http://u:p@p:8080","strategy":"s","ttl_seconds":90,"fallback_policy":"fail","metadata":{"k":"v"}}"#,
            300,
        )
        .unwrap();
        assert_eq!((a.ttl_seconds, a.fallback_policy), (90, FallbackPolicy::Fail));
        assert_eq!(a.metadata["k"], "v");
    }

    fn nested(levels: usize) -> String {
        let mut v = String::from("1");
        for _ in 1..levels {
            v = format!("[{v}]");
        }
        format!(r#"{{"proxy_url":"socks5://p:1","strategy":"s","metadata":{{"k":{v}}}}}"#)
    }

    fn with(field: &str, value: &str) -> String {
        format!(r#"{{"proxy_url":"socks5://p:1","strategy":"s","{field}":{value}}}"#)
    }

    #[test]
    fn answers_at_the_limits_are_accepted() {
        let cases: Vec<(&str, String)> = vec![
            (
                "strategy of 64 bytes",
                with("strategy", &format!("\"{}\"", "s".repeat(64))),
            ),
            ("unicode strategy", with("strategy", "\"géo-ñ 東京\"")),
            ("metadata 16 levels deep", nested(16)),
            (
                "metadata of 8 KiB",
                with(
                    "metadata",
                    &format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_ANSWER_METADATA_BYTES - 8)),
                ),
            ),
            (
                "proxy_url of 2048 bytes",
                format!(
                    r#"{{"proxy_url":"socks5://{}:1","strategy":"s"}}"#,
                    "h".repeat(MAX_PROXY_URL_LEN - 11)
                ),
            ),
        ];
        for (name, body) in cases {
            if let Err(e) = parse_answer(body.as_bytes(), 300) {
                panic!("{name}: rejected: {e}");
            }
        }
    }

    #[test]
    fn invalid_answers_are_rejected_with_the_reason() {
        let cases: Vec<(&str, String, &str)> = vec![
            ("garbage", "garbage".into(), "not JSON"),
            ("a list", "[]".into(), "not a JSON object"),
            (
                "no proxy_url",
                r#"{"strategy":"s"}"#.into(),
                "proxy_url is missing",
            ),
            (
                "ftp proxy",
                r#"{"proxy_url":"ftp://p:1","strategy":"s"}"#.into(),
                "scheme 'ftp'",
            ),
            (
                "no port",
                r#"{"proxy_url":"socks5://p","strategy":"s"}"#.into(),
                "no port",
            ),
            ("short ttl", with("ttl_seconds", "5"), "below 60"),
            (
                "unknown policy",
                with("fallback_policy", "\"retry\""),
                "fallback_policy 'retry'",
            ),
            (
                "no strategy",
                r#"{"proxy_url":"socks5://p:1"}"#.into(),
                "strategy is missing",
            ),
            (
                "metadata list",
                with("metadata", "[1]"),
                "metadata is not an object",
            ),
            (
                "strategy of 65 bytes",
                with("strategy", &format!("\"{}\"", "s".repeat(65))),
                "strategy is 65 bytes long (at most 64",
            ),
            (
                "strategy with a newline",
                with("strategy", r#""geo\nSet-Cookie: x""#),
                "strategy contains control characters",
            ),
            (
                "metadata 17 levels deep",
                nested(17),
                "nests 17 levels deep (at most 16)",
            ),
            (
                "metadata over 8 KiB",
                with(
                    "metadata",
                    &format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_ANSWER_METADATA_BYTES)),
                ),
                "metadata is 8200 bytes as JSON (at most 8192)",
            ),
            (
                "proxy_url over 2048 bytes",
                format!(
                    r#"{{"proxy_url":"socks5://{}:1","strategy":"s"}}"#,
                    "h".repeat(MAX_PROXY_URL_LEN)
                ),
                "proxy_url is 2059 bytes long (at most 2048)",
            ),
            (
                "body over 64 KiB",
                with(
                    "metadata",
                    &format!(r#"{{"k":"{}"}}"#, "x".repeat(MAX_ANSWER_BYTES)),
                ),
                "at most 65536",
            ),
        ];
        for (name, body, want) in cases {
            let err = parse_answer(body.as_bytes(), 300).expect_err(name);
            assert!(err.contains(want), "{name}: {err:?} should contain {want:?}");
        }
    }

    #[test]
    fn a_rejected_proxy_url_never_shows_its_password() {
        let err = parse_answer(br#"{"proxy_url":"ftp://u:hunter2@p:1","strategy":"s"}"#, 300).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_body_is_refused_as_soon_as_it_passes_the_limit() {
        let declared = LimitedBody::new(Some(50_000_000)).unwrap_err();
        assert!(declared.contains("50000000 bytes (Content-Length)"), "{declared}");

        let mut body = LimitedBody::new(Some(MAX_ANSWER_BYTES as u64)).unwrap();
        body.push(&[b' '; MAX_ANSWER_BYTES]).unwrap();
        assert_eq!(
            body.into_bytes().len(),
            MAX_ANSWER_BYTES,
            "exactly the limit is fine"
        );

        let mut body = LimitedBody::new(None).unwrap();
        let chunk = [b' '; 16 * 1024];
        for _ in 0..4 {
            body.push(&chunk).unwrap();
        }
        let err = body.push(b"x").unwrap_err();
        assert!(err.contains("after 65537 bytes"), "{err}");
    }
}
