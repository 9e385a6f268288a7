//! Validation of incoming requests into checked domain values. Every rule names its field.

use prost::Message;
use proxy_broker_core::ConnectionType;
use proxy_broker_core::validate::{check_exchange_id, check_proxy_url};

use crate::error::Error;
use crate::pb;

pub use proxy_broker_core::validate::{
    MAX_CLIENT_ID_LEN, MAX_ERROR_DETAILS_LEN, MAX_METADATA_BYTES, MAX_REGION_LEN,
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

/// A validated `ReportFeedback` call.
#[derive(Debug, Clone)]
pub struct Feedback {
    /// The proxy used; `None` for a direct connection.
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
    pub error_details: Option<String>,
    /// When it happened (now when the feed did not say).
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
                // google.protobuf.Timestamp: nanos in 0..=999_999_999, seconds within
                // 0001-01-01..=9999-12-31 (prost's conversion would silently normalise).
                if !(0..1_000_000_000).contains(&ts.nanos)
                    || !(-62_135_596_800..=253_402_300_799).contains(&ts.seconds)
                {
                    return Err(Error::invalid(
                        "timestamp",
                        format!(
                            "{}s {}ns is not a valid google.protobuf.Timestamp (nanos 0..=999999999, years 1..=9999)",
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
