//! Validation of incoming requests into checked domain values. Every rule names its field.

use prost::Message;
use proxy_broker_core::ConnectionType;
use proxy_broker_core::redact::{redact_text, redact_url};
use proxy_broker_core::validate::{check_exchange_id, check_proxy_url};

use crate::error::Error;
use crate::pb;

pub use proxy_broker_core::validate::{
    MAX_CLIENT_ID_LEN, MAX_ERROR_DETAILS_LEN, MAX_METADATA_BYTES, MAX_PROXY_URL_LEN, MAX_REGION_LEN,
};

/// A validated `RequestProxy` call.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// Exchange id as sent (matching is case-insensitive).
    pub exchange_id: String,
    /// HTTP or WebSocket.
    pub connection_type: ConnectionType,
    /// Preferred region; `None` when absent or empty.
    pub region: Option<String>,
    /// The feed's id; may be empty.
    pub client_id: String,
    /// Free-form context for upstreams.
    pub metadata: Option<prost_types::Struct>,
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
        Ok(Lookup {
            exchange_id: req.exchange_id,
            connection_type,
            region,
            client_id: req.client_id,
            metadata: req.metadata,
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
        Ok(Feedback {
            proxy_url,
            exchange_id: fb.exchange_id,
            connection_type,
            success: fb.success,
            latency_ms: fb.latency_ms,
            error_details: fb.error_details,
            timestamp,
            client_id: fb.client_id,
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
