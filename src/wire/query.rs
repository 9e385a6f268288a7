//! `ProxyRequest` as the server receives it: [`ProxyQuery`].
//!
//! The generated `ProxyRequest` holds its strings as `String`s, so decoding one call allocates
//! (and later frees) a buffer for each of `exchange_id` and `client_id`. A cache hit costs little
//! else, so those allocations were a visible part of it. A [`ProxyQuery`] holds the same fields as
//! [`CompactString`]s, which keep up to 24 bytes inline: an exchange id ("binance",
//! "BINANCE_FUTURES") and a usual feed id ("cryptofeed-host1-4242") need no allocation. A string
//! that is longer, split across buffers, or not UTF-8 is decoded by prost's own string code,
//! errors included, so the two types accept and reject exactly the same bytes.
//!
//! The server side of `ProxyBroker` is generated with this type as its `ProxyRequest`
//! (`build.rs`, [`crate::pb::wire`]); clients and everything else use [`pb::ProxyRequest`].
//! Validation is [`crate::request::Lookup`]'s, for both.

use compact_str::CompactString;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};

use crate::pb;

/// Field numbers of `ProxyRequest` (see `proto/proxybroker/v1/broker.proto`).
const EXCHANGE_ID: u32 = 1;
const CONNECTION_TYPE: u32 = 2;
const REGION: u32 = 3;
const CLIENT_ID: u32 = 4;
const METADATA: u32 = 5;
const STICKY_KEY: u32 = 6;

/// A `ProxyRequest`, field for field (see the module docs).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct ProxyQuery {
    /// Exchange identifier, as sent.
    pub exchange_id: CompactString,
    /// `ConnectionType` as sent (not checked here).
    pub connection_type: i32,
    /// Preferred region (`optional`: present-but-empty is kept apart from absent).
    pub region: Option<CompactString>,
    /// The calling feed instance.
    pub client_id: CompactString,
    /// Free-form context for upstreams.
    pub metadata: Option<prost_types::Struct>,
    /// Keeps one caller on one proxy (`optional`, as `region`).
    pub sticky_key: Option<CompactString>,
}

impl From<pb::ProxyRequest> for ProxyQuery {
    fn from(r: pb::ProxyRequest) -> Self {
        Self {
            exchange_id: r.exchange_id.into(),
            connection_type: r.connection_type,
            region: r.region.map(Into::into),
            client_id: r.client_id.into(),
            metadata: r.metadata,
            sticky_key: r.sticky_key.map(Into::into),
        }
    }
}

impl From<ProxyQuery> for pb::ProxyRequest {
    fn from(q: ProxyQuery) -> Self {
        Self {
            exchange_id: q.exchange_id.into_string(),
            connection_type: q.connection_type,
            region: q.region.map(CompactString::into_string),
            client_id: q.client_id.into_string(),
            metadata: q.metadata,
            sticky_key: q.sticky_key.map(CompactString::into_string),
        }
    }
}

/// Replaces `value` with the string field at the front of `buf`. A short UTF-8 string whose
/// length is one byte and which lies in the current chunk (every string of a usual request) is
/// copied straight into `value`; anything else goes through prost's `String` decoding, so errors
/// (wrong wire type, underflow, invalid UTF-8) are prost's own.
fn merge_text(
    wire_type: WireType,
    value: &mut CompactString,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), prost::DecodeError> {
    if wire_type == WireType::LengthDelimited
        && let [len, rest @ ..] = buf.chunk()
        && *len < 0x80
        && let Some(bytes) = rest.get(..usize::from(*len))
        && let Ok(text) = std::str::from_utf8(bytes)
    {
        let taken = 1 + bytes.len();
        *value = CompactString::from(text);
        buf.advance(taken);
        return Ok(());
    }
    let mut text = String::new();
    prost::encoding::string::merge(wire_type, &mut text, buf, ctx)?;
    *value = CompactString::from(text);
    Ok(())
}

/// Writes string field `tag` even when empty (an `optional` field that is present).
fn put_present(tag: u32, value: &str, buf: &mut impl BufMut) {
    prost::encoding::encode_key(tag, WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(value.len() as u64, buf);
    buf.put_slice(value.as_bytes());
}

/// The encoded size of [`put_present`]'s field.
fn present_len(tag: u32, value: &str) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(value.len() as u64) + value.len()
}

impl Message for ProxyQuery {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        super::put_string(EXCHANGE_ID, &self.exchange_id, buf);
        if self.connection_type != 0 {
            prost::encoding::int32::encode(CONNECTION_TYPE, &self.connection_type, buf);
        }
        if let Some(region) = &self.region {
            put_present(REGION, region, buf);
        }
        super::put_string(CLIENT_ID, &self.client_id, buf);
        if let Some(metadata) = &self.metadata {
            prost::encoding::message::encode(METADATA, metadata, buf);
        }
        if let Some(key) = &self.sticky_key {
            put_present(STICKY_KEY, key, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Errors name the field as generated code does.
        let at = |field: &'static str| {
            move |mut e: prost::DecodeError| {
                e.push("ProxyRequest", field);
                e
            }
        };
        match tag {
            EXCHANGE_ID => merge_text(wire_type, &mut self.exchange_id, buf, ctx).map_err(at("exchange_id")),
            CONNECTION_TYPE => prost::encoding::int32::merge(wire_type, &mut self.connection_type, buf, ctx)
                .map_err(at("connection_type")),
            REGION => {
                merge_text(wire_type, self.region.get_or_insert_default(), buf, ctx).map_err(at("region"))
            }
            CLIENT_ID => merge_text(wire_type, &mut self.client_id, buf, ctx).map_err(at("client_id")),
            METADATA => {
                prost::encoding::message::merge(wire_type, self.metadata.get_or_insert_default(), buf, ctx)
                    .map_err(at("metadata"))
            }
            STICKY_KEY => merge_text(wire_type, self.sticky_key.get_or_insert_default(), buf, ctx)
                .map_err(at("sticky_key")),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let mut len =
            super::string_len(EXCHANGE_ID, &self.exchange_id) + super::string_len(CLIENT_ID, &self.client_id);
        if self.connection_type != 0 {
            len += prost::encoding::int32::encoded_len(CONNECTION_TYPE, &self.connection_type);
        }
        if let Some(region) = &self.region {
            len += present_len(REGION, region);
        }
        if let Some(metadata) = &self.metadata {
            len += prost::encoding::message::encoded_len(METADATA, metadata);
        }
        if let Some(key) = &self.sticky_key {
            len += present_len(STICKY_KEY, key);
        }
        len
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        // Short and long (past the inline size and the one-byte length), ASCII and not.
        prop_oneof!["[a-zA-Z0-9._-]{0,30}", "\\PC{0,40}", "[a-z]{100,300}",]
    }

    fn request() -> impl Strategy<Value = pb::ProxyRequest> {
        (
            text(),
            any::<i32>(),
            proptest::option::of(text()),
            text(),
            proptest::option::of(text()),
            any::<bool>(),
        )
            .prop_map(
                |(exchange_id, connection_type, region, client_id, sticky_key, meta)| {
                    let metadata = meta.then(|| {
                        let mut s = prost_types::Struct::default();
                        s.fields.insert(
                            "k".into(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(exchange_id.clone())),
                            },
                        );
                        s
                    });
                    pb::ProxyRequest {
                        exchange_id,
                        connection_type,
                        region,
                        client_id,
                        metadata,
                        sticky_key,
                    }
                },
            )
    }

    proptest! {
        /// What the generated type encodes, this one decodes to the same fields, and the
        /// other way round, byte for byte.
        #[test]
        fn decodes_and_encodes_as_the_generated_type(req in request()) {
            let bytes = req.encode_to_vec();
            let query = ProxyQuery::decode(bytes.as_slice()).unwrap();
            prop_assert_eq!(pb::ProxyRequest::from(query.clone()), req.clone());
            prop_assert_eq!(query.encoded_len(), bytes.len());
            prop_assert_eq!(query.encode_to_vec(), bytes);
        }

        /// Any bytes: both types accept or both reject, and what is accepted is the same.
        #[test]
        fn accepts_exactly_what_the_generated_type_accepts(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ours = ProxyQuery::decode(bytes.as_slice());
            let theirs = pb::ProxyRequest::decode(bytes.as_slice());
            match (ours, theirs) {
                (Ok(q), Ok(r)) => prop_assert_eq!(pb::ProxyRequest::from(q), r),
                (Err(_), Err(_)) => {}
                (ours, theirs) => prop_assert!(false, "ours {ours:?}, generated {theirs:?}"),
            }
        }
    }

    #[test]
    fn a_string_split_across_chunks_decodes_as_prost_does() {
        use prost::bytes::Buf as _;
        let req = pb::ProxyRequest {
            exchange_id: "binance".into(),
            client_id: "cryptofeed-host1-4242".into(),
            connection_type: 2,
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        // Every split point: the fast path sees a chunk that ends inside a string.
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            let query = ProxyQuery::decode(a.chain(b)).unwrap();
            assert_eq!(pb::ProxyRequest::from(query), req, "split at {at}");
        }
    }

    #[test]
    fn invalid_utf8_is_prost_s_error_naming_the_field() {
        // Field 4 (client_id), length 2, bytes that are not UTF-8.
        let bytes = [0x22, 0x02, 0xff, 0xfe];
        let ours = ProxyQuery::decode(&bytes[..]).unwrap_err().to_string();
        let theirs = pb::ProxyRequest::decode(&bytes[..]).unwrap_err().to_string();
        assert_eq!(ours, theirs);
        assert!(ours.contains("client_id"), "{ours}");
    }

    #[test]
    fn usual_strings_are_held_inline() {
        let req = pb::ProxyRequest {
            exchange_id: "BINANCE_FUTURES".into(),
            client_id: "cryptofeed-host1-4242".into(),
            ..Default::default()
        };
        let query = ProxyQuery::decode(req.encode_to_vec().as_slice()).unwrap();
        assert!(!query.exchange_id.is_heap_allocated());
        assert!(!query.client_id.is_heap_allocated());
    }
}
