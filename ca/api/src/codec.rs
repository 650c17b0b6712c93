//! The protobuf codec of the Workload API: tonic's prost codec with a small encode buffer.
//!
//! tonic keeps each server stream's encode buffer for the stream's whole life; with the
//! default 8 KiB, 10,000 open FetchX509SVID streams hold 80 MiB of mostly empty buffers. The
//! Workload API's messages are a few KiB and its streams are long-lived and mostly idle, so it
//! starts at 512 bytes (the buffer still grows to fit any message). Measured in BENCHMARKS.md
//! ("Agent memory").

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial encode buffer of a Workload API stream.
pub const ENCODE_BUFFER: usize = 512;
/// Data buffered before a yield (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec whose encoder starts with a [`ENCODE_BUFFER`]-byte buffer.
#[derive(Debug, Clone, Default)]
pub struct LeanCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        self.inner.decoder()
    }
}
