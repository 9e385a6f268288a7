//! The protobuf codec of every generated service: tonic-prost's, with a smaller encode buffer
//! and fewer steps per message.
//!
//! tonic allocates the encoder's buffer when a response starts and keeps it for the whole call
//! (8 KiB by default, `tonic::codec::BufferSettings`). For a unary call that is one short-lived
//! allocation, but a `WatchProxy` stream holds it for as long as the feed watches: with 10,000
//! watchers, 80 MB for messages of a few hundred bytes. Answers here are small (a
//! `ProxyResponse` is ~100–300 bytes; larger ones and admin pages grow the buffer as needed), so the
//! encoder starts at [`ENCODE_BUFFER`]. Decoding keeps tonic's default (a request may be up to
//! `server.max_message_bytes`, and its buffer is released when the call has read it).
//!
//! Two steps of tonic-prost's are left out, both on every call (BENCHMARKS "Session 12"):
//! - [`Decode`] decodes from the message's bytes as one slice. tonic hands a decoder the whole
//!   message in one contiguous buffer behind its `DecodeBuf`, whose every `chunk` and `advance`
//!   (a few per field) goes through two layers of checks; on a slice they are a bounds check.
//! - [`Encode`] writes the message without working out its length first: prost's
//!   `Message::encode` does so only to refuse a buffer that is too small, and tonic's grows.
//!
//! Hand-written because tonic-prost has no setting for any of it; `build.rs` points the generated
//! code here with `codec_path`. Errors are tonic-prost's: a request that does not decode is
//! INTERNAL with prost's message.

use std::marker::PhantomData;

use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Initial capacity of a response's encode buffer, in bytes.
pub const ENCODE_BUFFER: usize = 512;
/// tonic's default: how many bytes of ready messages a stream batches into one write.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// tonic-prost's `ProstCodec` with an [`ENCODE_BUFFER`]-byte encode buffer, [`Encode`] and
/// [`Decode`].
#[derive(Debug, Clone, Copy)]
pub struct ProstCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = Encode<T>;
    type Decoder = Decode<U>;

    fn encoder(&mut self) -> Self::Encoder {
        Encode(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decode(PhantomData)
    }
}

/// Writes a `T` into tonic's buffer (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Encode<T>(PhantomData<fn(T)>);

impl<T: prost::Message> Encoder for Encode<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // `encode_raw` is the whole encoding; `encode` adds only the capacity check, which
        // tonic's growing buffer always passes.
        item.encode_raw(buf);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD)
    }
}

/// Reads a `U` from the message tonic has gathered (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Decode<U>(PhantomData<fn() -> U>);

impl<U: prost::Message + Default> Decoder for Decode<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        let decoded = match buf.chunk().get(..len) {
            Some(message) => {
                let decoded = U::decode(message);
                buf.advance(len);
                decoded
            }
            // Not contiguous (tonic's buffer always is): through the `Buf`, as tonic-prost does.
            None => U::decode(&mut *buf),
        };
        // As tonic-prost maps it (gRPC's status codes: a parse error is INTERNAL).
        decoded.map(Some).map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use tonic::codec::Encoder;

    #[test]
    fn responses_start_with_the_small_buffer_and_requests_with_the_default() {
        let mut codec = ProstCodec::<pb::ProxyResponse, pb::ProxyRequest>::default();
        // `BufferSettings` has no getters; its `Debug` shows the fields.
        let encode = format!("{:?}", codec.encoder().buffer_settings());
        assert!(encode.contains("buffer_size: 512,"), "{encode}");
        let decode = format!("{:?}", tonic::codec::Decoder::buffer_settings(&codec.decoder()));
        assert!(decode.contains("buffer_size: 8192,"), "{decode}");
    }
}
