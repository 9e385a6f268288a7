//! `ProxyResponse` as the server sends it: [`ProxyAnswer`]; `ProxyRequest` as it receives it:
//! [`ProxyQuery`] (see [`query`]).
//!
//! A cache hit answers with the same proxy, strategy, metadata and endpoint every time; only the
//! TTL left, the source and the lease end change per call. Building a [`pb::ProxyResponse`] for
//! each hit clones three strings and the metadata `Struct` and encodes them all again. A
//! [`ProxyAnswer`] instead carries those unchanging fields as a [`Head`] (shared strings, and the
//! strategy and metadata encoded once for every cache entry that has them) and writes the three
//! per-call fields after them.
//! Protobuf readers take fields in any order, so the bytes decode to exactly the message a
//! [`pb::ProxyResponse`] with the same values would.
//!
//! The server side of `ProxyBroker` is generated with this type as its `ProxyResponse`
//! (`build.rs`, [`crate::pb::wire`]); clients and everything else use [`pb::ProxyResponse`].

use std::sync::Arc;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};

use crate::pb;

mod query;
pub use query::ProxyQuery;

/// Field numbers of `ProxyResponse` (see `proto/proxybroker/v1/broker.proto`).
const PROXY_URL: u32 = 1;
const TTL_SECONDS: u32 = 3;
const FALLBACK_POLICY: u32 = 4;
const UPSTREAM_ENDPOINT: u32 = 7;
const SOURCE: u32 = 6;
const LEASE_EXPIRES_AT: u32 = 8;

/// The fields of an answer that never change: everything but `ttl_seconds`, `source` and
/// `lease_expires_at`. The proxy URL and the endpoint are shared strings, written as they are;
/// `strategy` and `metadata` (a `Struct`, the costly part to encode) come already encoded,
/// shared by every cache entry with the same strategy and metadata ([`Head::fixed`]), so a hit
/// neither allocates nor walks the metadata, and an entry that is hit holds no bytes of its own.
#[derive(Clone, PartialEq, Eq)]
pub struct Head {
    proxy_url: Arc<str>,
    fixed: Arc<[u8]>,
    fallback_policy: i32,
    upstream_endpoint: Arc<str>,
}

impl Head {
    /// A head from its parts; `fixed` is [`Head::fixed`] of the answer's strategy and metadata.
    pub fn new(
        proxy_url: Arc<str>,
        fixed: Arc<[u8]>,
        fallback_policy: i32,
        upstream_endpoint: Arc<str>,
    ) -> Self {
        Self {
            proxy_url,
            fixed,
            fallback_policy,
            upstream_endpoint,
        }
    }

    /// `strategy` and `metadata` encoded as fields of a `ProxyResponse`.
    pub fn fixed(strategy: &str, metadata: Option<&prost_types::Struct>) -> Arc<[u8]> {
        let fields = pb::ProxyResponse {
            strategy: strategy.to_owned(),
            metadata: metadata.cloned(),
            ..Default::default()
        };
        Arc::from(fields.encode_to_vec())
    }

    /// `response`'s fields except the three written per call (those are left out even when set).
    pub fn of(response: &pb::ProxyResponse) -> Self {
        Self::new(
            Arc::from(response.proxy_url.as_str()),
            Self::fixed(&response.strategy, response.metadata.as_ref()),
            response.fallback_policy,
            Arc::from(response.upstream_endpoint.as_str()),
        )
    }

    /// Its parts, as a [`HeadSource`] gives them.
    pub fn parts(&self) -> HeadRef<'_> {
        HeadRef {
            proxy_url: &self.proxy_url,
            fixed: &self.fixed,
            fallback_policy: self.fallback_policy,
            upstream_endpoint: &self.upstream_endpoint,
        }
    }
}

impl HeadSource for Head {
    fn head(&self) -> HeadRef<'_> {
        self.parts()
    }
}

/// Where a ready answer reads its unchanging fields from when it is sent. A cache entry is one
/// itself: the answer holds the entry (the one reference the choice already took), not copies
/// of its three shared strings, whose reference counts every hit would otherwise take and give
/// back (atomic operations that cost far more than their one instruction each).
pub trait HeadSource: Send + Sync {
    /// The fields: the proxy URL, `fixed` ([`Head::fixed`] of strategy and metadata), the
    /// fallback policy and the endpoint.
    fn head(&self) -> HeadRef<'_>;
}

/// A [`Head`]'s fields, borrowed from a [`HeadSource`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HeadRef<'a> {
    /// The proxy to use (may hold credentials).
    pub proxy_url: &'a str,
    /// [`Head::fixed`] of the answer's strategy and metadata.
    pub fixed: &'a [u8],
    /// `FallbackPolicy` as sent.
    pub fallback_policy: i32,
    /// The endpoint that gave the answer.
    pub upstream_endpoint: &'a str,
}

/// `Debug` tells the size only: the proxy URL may hold credentials.
impl std::fmt::Debug for HeadRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeadRef({} bytes)", self.encoded_len())
    }
}

impl HeadRef<'_> {
    fn encoded_len(&self) -> usize {
        let mut len = string_len(PROXY_URL, self.proxy_url) + self.fixed.len();
        if self.fallback_policy != 0 {
            len += prost::encoding::int32::encoded_len(FALLBACK_POLICY, &self.fallback_policy);
        }
        len + string_len(UPSTREAM_ENDPOINT, self.upstream_endpoint)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_string(PROXY_URL, self.proxy_url, buf);
        buf.put_slice(self.fixed);
        if self.fallback_policy != 0 {
            prost::encoding::int32::encode(FALLBACK_POLICY, &self.fallback_policy, buf);
        }
        put_string(UPSTREAM_ENDPOINT, self.upstream_endpoint, buf);
    }
}

/// The encoded size of string field `tag` holding `value` (none when empty, as generated code).
fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        return 0;
    }
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(value.len() as u64) + value.len()
}

/// Writes string field `tag` (nothing when empty, as generated code).
fn put_string(tag: u32, value: &str, buf: &mut impl BufMut) {
    if value.is_empty() {
        return;
    }
    // The key (at most 5 bytes) and the length (at most 10) are gathered on the stack and
    // written at once: every write into tonic's buffer checks its capacity.
    const ROOM: usize = 16;
    let mut prefix = [0u8; ROOM];
    let mut cursor = &mut prefix[..];
    prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut cursor);
    prost::encoding::encode_varint(value.len() as u64, &mut cursor);
    let written = ROOM - cursor.len();
    buf.put_slice(&prefix[..written]);
    buf.put_slice(value.as_bytes());
}

/// The most a [`PerCall`]'s fields take: a TTL (key and a `u32`: 6 bytes), a source (11: a
/// negative enum value is 10 varint bytes) and a lease timestamp (key, length, and two fields of
/// a key and up to 10 bytes: 24).
const PER_CALL_MAX: usize = 6 + 11 + 24;
/// Room for a [`PerCall`]'s fields on the stack.
const PER_CALL_ROOM: usize = 64;
// Any values fit, so writing them on the stack cannot run out of room.
const _: () = assert!(PER_CALL_MAX <= PER_CALL_ROOM);

/// `Debug` tells the size only: the head holds the proxy URL, credentials included.
impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Head({} bytes)", self.parts().encoded_len())
    }
}

/// A `ProxyResponse` to send: built field by field, or a [`HeadSource`] plus the per-call
/// fields.
#[derive(Clone)]
pub struct ProxyAnswer(Repr);

#[derive(Clone)]
enum Repr {
    /// Boxed: a `ProxyResponse` is several times the size of a ready answer, and the answer is
    /// moved a few times on its way out; only answers that are not cache hits build one.
    Built(Box<pb::ProxyResponse>),
    Ready(Arc<dyn HeadSource>, PerCall),
}

/// The fields of a ready answer written per call, after its [`Head`].
#[derive(Clone, PartialEq)]
struct PerCall {
    ttl_seconds: u32,
    source: i32,
    lease_expires_at: Option<prost_types::Timestamp>,
}

impl PerCall {
    // As generated code does: default values are not written.
    fn encoded_len(&self) -> usize {
        let mut len = 0;
        if self.ttl_seconds != 0 {
            len += prost::encoding::uint32::encoded_len(TTL_SECONDS, &self.ttl_seconds);
        }
        if self.source != 0 {
            len += prost::encoding::int32::encoded_len(SOURCE, &self.source);
        }
        if let Some(at) = &self.lease_expires_at {
            len += prost::encoding::message::encoded_len(LEASE_EXPIRES_AT, at);
        }
        len
    }

    /// The fields in one write (they always fit in [`PER_CALL_ROOM`]), instead of a dozen
    /// small writes.
    fn encode(&self, buf: &mut impl BufMut) {
        let mut room = [0u8; PER_CALL_ROOM];
        let mut cursor = &mut room[..];
        self.encode_fields(&mut cursor);
        let written = PER_CALL_ROOM - cursor.len();
        buf.put_slice(&room[..written]);
    }

    fn encode_fields(&self, buf: &mut impl BufMut) {
        if self.ttl_seconds != 0 {
            prost::encoding::uint32::encode(TTL_SECONDS, &self.ttl_seconds, buf);
        }
        if self.source != 0 {
            prost::encoding::int32::encode(SOURCE, &self.source, buf);
        }
        if let Some(at) = &self.lease_expires_at {
            prost::encoding::message::encode(LEASE_EXPIRES_AT, at, buf);
        }
    }
}

impl Default for ProxyAnswer {
    fn default() -> Self {
        Self(Repr::Built(Box::default()))
    }
}

impl From<pb::ProxyResponse> for ProxyAnswer {
    fn from(response: pb::ProxyResponse) -> Self {
        Self(Repr::Built(Box::new(response)))
    }
}

impl ProxyAnswer {
    /// `head`'s fields with the fields that change per call.
    pub fn ready(
        head: Arc<dyn HeadSource>,
        ttl_seconds: u32,
        source: pb::ProxySource,
        lease_expires_at: Option<prost_types::Timestamp>,
    ) -> Self {
        Self(Repr::Ready(
            head,
            PerCall {
                ttl_seconds,
                source: source.into(),
                lease_expires_at,
            },
        ))
    }

    /// The same answer as a [`pb::ProxyResponse`] (a ready one is decoded from its bytes).
    pub fn into_response(self) -> pb::ProxyResponse {
        match self.0 {
            Repr::Built(response) => *response,
            Repr::Ready(..) => {
                // A head is encoded from a valid `ProxyResponse` by this process: it decodes.
                pb::ProxyResponse::decode(self.encode_to_vec().as_slice()).unwrap_or_default()
            }
        }
    }

    /// Where it came from.
    pub fn source(&self) -> pb::ProxySource {
        match &self.0 {
            Repr::Built(response) => response.source(),
            Repr::Ready(_, call) => pb::ProxySource::try_from(call.source).unwrap_or_default(),
        }
    }

    /// The upstream endpoint that gave it (empty for an embedded answer).
    pub fn upstream_endpoint(&self) -> &str {
        match &self.0 {
            Repr::Built(response) => &response.upstream_endpoint,
            Repr::Ready(head, _) => head.head().upstream_endpoint,
        }
    }

    /// Whether it is sent from a [`Head`].
    pub fn is_ready(&self) -> bool {
        matches!(self.0, Repr::Ready(..))
    }
}

/// `Debug` leaves the proxy URL out (it may carry credentials).
impl std::fmt::Debug for ProxyAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Repr::Built(response) => f
                .debug_struct("ProxyAnswer")
                .field("source", &response.source())
                .field("ttl_seconds", &response.ttl_seconds)
                .finish_non_exhaustive(),
            Repr::Ready(head, call) => f
                .debug_struct("ProxyAnswer")
                .field("head", &head.head())
                .field("source", &call.source)
                .field("ttl_seconds", &call.ttl_seconds)
                .finish_non_exhaustive(),
        }
    }
}

impl Message for ProxyAnswer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.0 {
            Repr::Built(response) => response.encode_raw(buf),
            Repr::Ready(head, call) => {
                head.head().encode(buf);
                call.encode(buf);
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Decoding is for completeness (the server only sends answers): as a built response.
        if self.is_ready() {
            let built = std::mem::take(self).into_response();
            *self = Self(Repr::Built(Box::new(built)));
        }
        match &mut self.0 {
            Repr::Built(response) => response.merge_field(tag, wire_type, buf, ctx),
            Repr::Ready(..) => Ok(()),
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.0 {
            Repr::Built(response) => response.encoded_len(),
            Repr::Ready(head, call) => head.head().encoded_len() + call.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn response() -> pb::ProxyResponse {
        let mut metadata = prost_types::Struct::default();
        metadata.fields.insert(
            "stale".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::BoolValue(false)),
            },
        );
        metadata.fields.insert(
            "region".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("eu".into())),
            },
        );
        pb::ProxyResponse {
            proxy_url: "socks5://user:secret@proxy.test:1080".into(),
            strategy: "rotating".into(),
            ttl_seconds: 300,
            fallback_policy: pb::FallbackPolicy::DirectConnection.into(),
            metadata: Some(metadata),
            source: pb::ProxySource::Upstream.into(),
            upstream_endpoint: "http://upstream.test:8080".into(),
            lease_expires_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 7,
            }),
        }
    }

    #[test]
    fn a_ready_answer_decodes_to_the_response_with_its_per_call_fields() {
        let head = Head::of(&response());
        let lease = prost_types::Timestamp {
            seconds: 1_900_000_000,
            nanos: 42,
        };
        let answer = ProxyAnswer::ready(Arc::new(head), 120, pb::ProxySource::Cache, Some(lease));
        let bytes = answer.encode_to_vec();
        assert_eq!(bytes.len(), answer.encoded_len());
        let decoded = pb::ProxyResponse::decode(bytes.as_slice()).unwrap();
        let expected = pb::ProxyResponse {
            ttl_seconds: 120,
            source: pb::ProxySource::Cache.into(),
            lease_expires_at: Some(lease),
            ..response()
        };
        assert_eq!(decoded, expected);
        assert_eq!(answer.source(), pb::ProxySource::Cache);
        assert_eq!(answer.clone().into_response(), expected);
    }

    #[test]
    fn per_call_fields_at_their_defaults_are_left_out_as_generated_code_leaves_them() {
        let fixed = pb::ProxyResponse {
            proxy_url: "socks5://proxy.test:1080".into(),
            ..Default::default()
        };
        let answer = ProxyAnswer::ready(Arc::new(Head::of(&fixed)), 0, pb::ProxySource::Unspecified, None);
        assert_eq!(answer.encode_to_vec(), fixed.encode_to_vec());
        assert_eq!(answer.encoded_len(), fixed.encoded_len());
    }

    #[test]
    fn a_built_answer_encodes_as_its_response_and_decodes_back() {
        let built = ProxyAnswer::from(response());
        assert_eq!(built.encode_to_vec(), response().encode_to_vec());
        let mut merged = ProxyAnswer::ready(
            Arc::new(Head::of(&pb::ProxyResponse::default())),
            1,
            pb::ProxySource::Cache,
            None,
        );
        merged.merge(response().encode_to_vec().as_slice()).unwrap();
        assert_eq!(merged.into_response().proxy_url, response().proxy_url);
    }

    fn any_value() -> impl Strategy<Value = prost_types::Value> {
        use prost_types::value::Kind;
        prop_oneof![
            any::<bool>().prop_map(Kind::BoolValue),
            // Finite numbers: NaN would make equal answers compare unequal.
            (-1e12f64..1e12).prop_map(Kind::NumberValue),
            ".{0,40}".prop_map(Kind::StringValue),
            Just(Kind::NullValue(0)),
        ]
        .prop_map(|kind| prost_types::Value { kind: Some(kind) })
    }

    fn any_response() -> impl Strategy<Value = pb::ProxyResponse> {
        let metadata = proptest::option::of(
            proptest::collection::btree_map(".{0,12}", any_value(), 0..5)
                .prop_map(|fields| prost_types::Struct { fields }),
        );
        let source = prop_oneof![
            Just(pb::ProxySource::Unspecified),
            Just(pb::ProxySource::Upstream),
            Just(pb::ProxySource::Cache),
            Just(pb::ProxySource::Embedded),
        ];
        let lease = proptest::option::of(
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
        );
        // URLs up to and past 128 bytes (a two-byte length prefix), strings in any script.
        (
            (".{0,300}", ".{0,40}", metadata, any::<i32>(), ".{0,200}"),
            (any::<u32>(), source, lease),
        )
            .prop_map(
                |(
                    (proxy_url, strategy, metadata, fallback_policy, upstream_endpoint),
                    (ttl_seconds, source, lease),
                )| {
                    pb::ProxyResponse {
                        proxy_url,
                        strategy,
                        ttl_seconds,
                        fallback_policy,
                        metadata,
                        source: source.into(),
                        upstream_endpoint,
                        lease_expires_at: lease,
                    }
                },
            )
    }

    proptest! {
        /// Whatever the values, a ready answer's bytes are as long as it says and decode to the
        /// response a built one would send.
        #[test]
        fn a_ready_answer_decodes_to_its_response_for_any_values(response in any_response()) {
            let answer = ProxyAnswer::ready(
                Arc::new(Head::of(&response)),
                response.ttl_seconds,
                response.source(),
                response.lease_expires_at,
            );
            let bytes = answer.encode_to_vec();
            prop_assert_eq!(bytes.len(), answer.encoded_len());
            prop_assert_eq!(bytes.len(), response.encoded_len());
            prop_assert_eq!(&pb::ProxyResponse::decode(bytes.as_slice()).unwrap(), &response);
            prop_assert_eq!(answer.upstream_endpoint(), response.upstream_endpoint.as_str());
            prop_assert_eq!(&answer.into_response(), &response);
        }
    }

    proptest! {
        /// The per-call fields gathered on the stack are the bytes prost writes for them.
        #[test]
        fn per_call_fields_are_written_as_prost_writes_them(
            ttl_seconds in any::<u32>(),
            source in any::<i32>(),
            lease in proptest::option::of((any::<i64>(), any::<i32>())),
        ) {
            let call = PerCall {
                ttl_seconds,
                source,
                lease_expires_at: lease.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
            };
            let (mut ours, mut prost) = (Vec::new(), Vec::new());
            call.encode(&mut ours);
            call.encode_fields(&mut prost);
            prop_assert_eq!(&ours, &prost);
            prop_assert_eq!(ours.len(), call.encoded_len());
        }
    }

    #[test]
    fn per_call_max_is_the_largest_encoding() {
        let largest = PerCall {
            ttl_seconds: u32::MAX,
            source: -1,
            lease_expires_at: Some(prost_types::Timestamp {
                seconds: -1,
                nanos: -1,
            }),
        };
        assert_eq!(largest.encoded_len(), PER_CALL_MAX);
    }

    #[test]
    fn debug_never_shows_the_proxy_url() {
        let ready = ProxyAnswer::ready(Arc::new(Head::of(&response())), 1, pb::ProxySource::Cache, None);
        for shown in [
            format!("{ready:?}"),
            format!("{:?}", ProxyAnswer::from(response())),
        ] {
            assert!(!shown.contains("secret") && !shown.contains("user"), "{shown}");
        }
    }
}
