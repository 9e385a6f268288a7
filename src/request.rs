//! Validation of incoming requests into checked domain values. Every rule names its field.

use prost::Message;
use proxy_broker_core::ConnectionType;
use proxy_broker_core::redact::{redact_text, redact_url};
use proxy_broker_core::validate::{check_exchange_id, check_proxy_url, check_sticky_key};

use compact_str::CompactString;

use crate::error::Error;
use crate::pb;
use crate::wire::ProxyQuery;

pub use proxy_broker_core::validate::{
    HTTP_STATUS_RANGE, MAX_CLIENT_ID_LEN, MAX_ERROR_DETAILS_LEN, MAX_METADATA_BYTES, MAX_PROXY_URL_LEN,
    MAX_REGION_LEN, MAX_RETRY_AFTER_SECONDS, MAX_STICKY_KEY_LEN,
};

/// A validated `RequestProxy` call. Its strings are the decoded request's own
/// ([`crate::wire::ProxyQuery`]): short ones inline, so a cache hit allocates none.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// Exchange id as sent (matching is case-insensitive).
    pub exchange_id: CompactString,
    /// HTTP or WebSocket.
    pub connection_type: ConnectionType,
    /// Preferred region; `None` when absent or empty.
    pub region: Option<CompactString>,
    /// The feed's id; may be empty.
    pub client_id: CompactString,
    /// Free-form context for upstreams.
    pub metadata: Option<prost_types::Struct>,
    /// Keeps this caller on one proxy (≤ 128 printable ASCII); `None` when absent or empty.
    pub sticky_key: Option<CompactString>,
}

/// Earliest feedback `timestamp` accepted: 1970-01-01T00:00:00Z, in Unix seconds.
pub const MIN_TIMESTAMP_SECONDS: i64 = 0;
/// Latest feedback `timestamp` accepted: 9999-12-31T23:59:59Z (plus nanos), in Unix seconds.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A validated `ReportFeedback` call. `Debug` masks the proxy's userinfo and any URL userinfo in
/// `error_details`.
#[derive(derive_more::Debug, Clone)]
pub struct Feedback {
    /// The proxy used; `None` for a direct connection.
    #[debug("{:?}", proxy_url.as_deref().map(redact_url))]
    pub proxy_url: Option<String>,
    /// Exchange id as sent.
    pub exchange_id: String,
    /// HTTP or WebSocket.
    pub connection_type: ConnectionType,
    /// Whether the connection worked.
    pub success: bool,
    /// Connect latency, if measured.
    pub latency_ms: Option<u32>,
    /// What went wrong, if it failed.
    #[debug("{:?}", error_details.as_deref().map(redact_text))]
    pub error_details: Option<String>,
    /// When it happened (now when the feed did not say); within
    /// [`MIN_TIMESTAMP_SECONDS`]..=[`MAX_TIMESTAMP_SECONDS`], so RFC 3339 formatting cannot fail.
    pub timestamp: std::time::SystemTime,
    /// The reporting feed.
    pub client_id: String,
    /// The exchange's HTTP status (100..=599), when the failure was an HTTP answer.
    pub http_status: Option<u16>,
    /// How long the exchange said to wait (at most [`MAX_RETRY_AFTER_SECONDS`]).
    pub retry_after: Option<std::time::Duration>,
}

fn connection_type(field: &'static str, raw: i32) -> Result<ConnectionType, Error> {
    match pb::ConnectionType::try_from(raw) {
        Ok(pb::ConnectionType::Http) => Ok(ConnectionType::Http),
        Ok(pb::ConnectionType::Websocket) => Ok(ConnectionType::Websocket),
        Ok(pb::ConnectionType::Unspecified) => Err(Error::invalid(
            field,
            "must be CONNECTION_TYPE_HTTP or CONNECTION_TYPE_WEBSOCKET (got UNSPECIFIED)",
        )),
        Err(_) => Err(Error::invalid(
            field,
            format!("must be CONNECTION_TYPE_HTTP or CONNECTION_TYPE_WEBSOCKET (got unknown value {raw})"),
        )),
    }
}

fn max_len(field: &'static str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long (at most {max})", value.len()),
        ));
    }
    Ok(())
}

fn exchange_id(field: &'static str, id: &str) -> Result<(), Error> {
    check_exchange_id(id).map_err(|rule| Error::invalid(field, rule))
}

impl TryFrom<pb::ProxyRequest> for Lookup {
    type Error = Error;

    fn try_from(req: pb::ProxyRequest) -> Result<Self, Error> {
        Lookup::try_from(ProxyQuery::from(req))
    }
}

impl TryFrom<ProxyQuery> for Lookup {
    type Error = Error;

    fn try_from(req: ProxyQuery) -> Result<Self, Error> {
        exchange_id("exchange_id", &req.exchange_id)?;
        let connection_type = connection_type("connection_type", req.connection_type)?;
        let region = req.region.filter(|r| !r.is_empty());
        if let Some(region) = &region {
            max_len("region", region, MAX_REGION_LEN)?;
        }
        max_len("client_id", &req.client_id, MAX_CLIENT_ID_LEN)?;
        if let Some(metadata) = &req.metadata {
            let size = metadata.encoded_len();
            if size > MAX_METADATA_BYTES {
                return Err(Error::invalid(
                    "metadata",
                    format!("is {size} bytes encoded (at most {MAX_METADATA_BYTES})"),
                ));
            }
        }
        let sticky_key = req.sticky_key.filter(|k| !k.is_empty());
        if let Some(key) = &sticky_key {
            check_sticky_key(key).map_err(|rule| Error::invalid("sticky_key", rule))?;
        }
        Ok(Lookup {
            exchange_id: req.exchange_id,
            connection_type,
            region,
            client_id: req.client_id,
            metadata: req.metadata,
            sticky_key,
        })
    }
}

impl TryFrom<pb::ProxyFeedback> for Feedback {
    type Error = Error;

    fn try_from(fb: pb::ProxyFeedback) -> Result<Self, Error> {
        let proxy_url = if fb.proxy_url.is_empty() {
            None
        } else {
            check_proxy_url(&fb.proxy_url).map_err(|rule| Error::invalid("proxy_url", rule))?;
            Some(fb.proxy_url)
        };
        exchange_id("exchange_id", &fb.exchange_id)?;
        let connection_type = connection_type("connection_type", fb.connection_type)?;
        if let Some(details) = &fb.error_details {
            max_len("error_details", details, MAX_ERROR_DETAILS_LEN)?;
        }
        max_len("client_id", &fb.client_id, MAX_CLIENT_ID_LEN)?;
        let timestamp = match fb.timestamp {
            None => std::time::SystemTime::now(),
            Some(ts) => {
                // nanos in 0..=999_999_999 (prost's conversion would silently normalise), and a time
                // the broker can forward: upstreams get RFC 3339, which has no years before 1970
                // in the formatter used, nor after 9999. Rejected rather than clamped: a feed that
                // sends such a time has a broken clock or a bug, and should hear about it.
                if !(0..1_000_000_000).contains(&ts.nanos)
                    || !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds)
                {
                    return Err(Error::invalid(
                        "timestamp",
                        format!(
                            "{}s {}ns is not a valid feedback time: outside \
                             1970-01-01T00:00:00Z..=9999-12-31T23:59:59.999999999Z \
                             (seconds {MIN_TIMESTAMP_SECONDS}..={MAX_TIMESTAMP_SECONDS}, nanos 0..=999999999)",
                            ts.seconds, ts.nanos
                        ),
                    ));
                }
                std::time::SystemTime::try_from(ts)
                    .map_err(|e| Error::invalid("timestamp", format!("is not a valid time ({e})")))?
            }
        };
        let http_status = match fb.http_status {
            None => None,
            Some(status) if HTTP_STATUS_RANGE.contains(&status) => u16::try_from(status).ok(),
            Some(status) => {
                return Err(Error::invalid(
                    "http_status",
                    format!(
                        "{status} is not an HTTP status (allowed {}..={})",
                        HTTP_STATUS_RANGE.start(),
                        HTTP_STATUS_RANGE.end()
                    ),
                ));
            }
        };
        let retry_after = match fb.retry_after_seconds {
            None => None,
            Some(s) if s <= MAX_RETRY_AFTER_SECONDS => Some(std::time::Duration::from_secs(u64::from(s))),
            Some(s) => {
                return Err(Error::invalid(
                    "retry_after_seconds",
                    format!("{s} is more than 7 days (allowed 0..={MAX_RETRY_AFTER_SECONDS})"),
                ));
            }
        };
        Ok(Feedback {
            proxy_url,
            exchange_id: fb.exchange_id,
            connection_type,
            success: fb.success,
            latency_ms: fb.latency_ms,
            error_details: fb.error_details,
            timestamp,
            client_id: fb.client_id,
            http_status,
            retry_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feedback(proxy_url: &str, timestamp: Option<prost_types::Timestamp>) -> pb::ProxyFeedback {
        pb::ProxyFeedback {
            proxy_url: proxy_url.into(),
            exchange_id: "binance".into(),
            connection_type: pb::ConnectionType::Http.into(),
            timestamp,
            ..Default::default()
        }
    }

    fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn feedback_timestamps_outside_1970_to_9999_are_invalid_arguments() {
        // (name, timestamp, accepted)
        let cases = [
            ("absent", None, true),
            ("the epoch", ts(0, 0), true),
            (
                "last instant of 9999",
                ts(MAX_TIMESTAMP_SECONDS, 999_999_999),
                true,
            ),
            ("a second before 1970", ts(-1, 0), false),
            ("year 1", ts(-62_135_596_800, 0), false),
            ("year 10000", ts(MAX_TIMESTAMP_SECONDS + 1, 0), false),
            ("most negative", ts(i64::MIN, 0), false),
            ("largest", ts(i64::MAX, 999_999_999), false),
            ("negative nanos", ts(1_700_000_000, -1), false),
            ("a billion nanos", ts(1_700_000_000, 1_000_000_000), false),
        ];
        for (name, timestamp, accepted) in cases {
            match Feedback::try_from(feedback("", timestamp)) {
                Ok(fb) => {
                    assert!(accepted, "{name}: accepted");
                    // What the upstream forwarder does with it must not panic.
                    let _ = humantime::format_rfc3339_millis(fb.timestamp).to_string();
                }
                Err(e) => {
                    assert!(!accepted, "{name}: rejected: {e}");
                    let status = tonic::Status::from(e);
                    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
                    assert!(status.message().contains("timestamp"), "{name}: {status:?}");
                    assert!(status.message().contains("1970-01-01"), "{name}: {status:?}");
                }
            }
        }
    }

    #[test]
    fn feedback_proxy_urls_longer_than_the_limit_are_invalid_arguments_without_the_url() {
        let at_limit = format!("socks5://{}:1080", "h".repeat(MAX_PROXY_URL_LEN - 14));
        let over = format!("socks5://user:{}@h:1080", "s".repeat(20 * 1024));
        assert!(Feedback::try_from(feedback(&at_limit, None)).is_ok());
        let status = tonic::Status::from(Feedback::try_from(feedback(&over, None)).expect_err("too long"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("proxy_url"), "{status:?}");
        assert!(status.message().contains("at most 2048"), "{status:?}");
        assert!(!status.message().contains("sss"), "{status:?}");
    }

    #[test]
    fn debug_of_feedback_masks_proxy_userinfo_and_urls_in_error_details() {
        let mut fb = feedback("socks5://feeduser:feedpass@p:1080", None);
        fb.error_details = Some("connect via http://APIKEY77:@other:8011 refused".into());
        let shown = format!("{:?}", Feedback::try_from(fb).expect("valid"));
        for secret in ["feeduser", "feedpass", "APIKEY77"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("socks5://***@p:1080"), "{shown}");
    }
}
