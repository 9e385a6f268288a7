//! The JSON bodies sent upstream: the design's ProxyRequest and ProxyFeedback.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};

/// The design's ProxyRequest, as sent upstream.
#[derive(Debug, Serialize)]
pub(super) struct WireRequest<'a> {
    pub exchange_id: &'a str,
    pub connection_type: &'a str,
    pub region: Option<&'a str>,
    pub client_id: &'a str,
    pub metadata: Map<String, Value>,
}

/// The design's ProxyFeedback, as sent upstream.
#[derive(Debug, Serialize)]
pub struct WireFeedback {
    pub(super) proxy_url: String,
    pub(super) exchange_id: String,
    pub(super) connection_type: &'static str,
    pub(super) success: bool,
    pub(super) latency_ms: Option<u32>,
    pub(super) error_details: Option<String>,
    pub(super) timestamp: String,
    pub(super) client_id: String,
    /// Left out when absent, so upstreams that predate the field see the report unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) http_status: Option<u16>,
    /// Left out when absent, as `http_status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) retry_after_seconds: Option<u64>,
}

impl WireFeedback {
    /// The reporting feed's id (for logs and tests).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// About how much memory the report holds (its strings plus a fixed overhead), for
    /// bounding the forwarding queue in bytes.
    pub fn approx_bytes(&self) -> usize {
        const OVERHEAD: usize = std::mem::size_of::<WireFeedback>();
        OVERHEAD
            + self.proxy_url.len()
            + self.exchange_id.len()
            + self.error_details.as_ref().map_or(0, String::len)
            + self.timestamp.len()
            + self.client_id.len()
    }
}

/// The last instant RFC 3339 can write with a four-digit year: 9999-12-31T23:59:59.999Z.
const LAST_RFC3339: Duration = Duration::from_millis(253_402_300_799_999);

/// `time` as RFC 3339 UTC with milliseconds. Total: a time before 1970 is written as the epoch
/// and one past year 9999 as its last millisecond (the formatter would panic on either), so a
/// report that got past validation somehow still cannot take the broker down.
pub(super) fn rfc3339_millis(time: SystemTime) -> String {
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(LAST_RFC3339);
    humantime::format_rfc3339_millis(UNIX_EPOCH + since_epoch).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_written_for_any_time_without_panicking() {
        let year_10k = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        let cases = [
            ("epoch", UNIX_EPOCH, "1970-01-01T00:00:00.000Z"),
            (
                "ordinary",
                UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
                "2023-11-14T22:13:20.123Z",
            ),
            (
                "before 1970",
                UNIX_EPOCH - Duration::from_secs(86_400 * 365 * 100),
                "1970-01-01T00:00:00.000Z",
            ),
            ("year 10000", year_10k, "9999-12-31T23:59:59.999Z"),
            (
                "far future",
                year_10k + Duration::from_secs(1 << 40),
                "9999-12-31T23:59:59.999Z",
            ),
        ];
        for (name, time, want) in cases {
            assert_eq!(rfc3339_millis(time), want, "{name}");
        }
    }
}
