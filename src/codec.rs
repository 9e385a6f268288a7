//! The protobuf codec of every generated service: tonic-prost's, with a smaller encode buffer.
//!
//! tonic allocates the encoder's buffer when a response starts and keeps it for the whole call
//! (8 KiB by default, `tonic::codec::BufferSettings`). For a unary call that is one short-lived
//! allocation, but a `WatchProxy` stream holds it for as long as the feed watches: with 10,000
//! watchers, 80 MB for messages of a few hundred bytes. Answers here are small (a
//! `ProxyResponse` is ~100–300 bytes; larger ones and admin pages grow the buffer as needed), so the
//! encoder starts at [`ENCODE_BUFFER`]. Decoding keeps tonic's default (a request may be up to
//! `server.max_message_bytes`, and its buffer is released when the call has read it).
//! Hand-written because tonic-prost has no setting for it; `build.rs` points the generated code
//! here with `codec_path`.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial capacity of a response's encode buffer, in bytes.
pub const ENCODE_BUFFER: usize = 512;
/// tonic's default: how many bytes of ready messages a stream batches into one write.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with an [`ENCODE_BUFFER`]-byte encode buffer.
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
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
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
