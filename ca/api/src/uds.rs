//! Serving gRPC on a Unix socket: the connections of every meshid server that listens on one
//! (the agent's Workload API, the CA's admin API, and any added later).
//!
//! On a Unix socket the HTTP/2 `:authority` names nothing, and clients fill it in as they
//! please: grpc-go sends `localhost`, gRPC C-core (Python, C++, Ruby, PHP, C#) the socket path
//! percent-encoded (`%2Frun%2Fmeshid%2Fagent%2Fapi.sock`), grpc-java and grpc-swift the raw
//! path. The HTTP/2 server under tonic (h2) checks `:authority` as a URI authority and resets
//! every stream that carries a path, before any service sees it, so those clients could not
//! talk to meshid at all, while SPIRE's agent (grpc-go) answers them all.
//!
//! [`incoming`] wraps each accepted connection in a [`UdsConnection`], which reads the
//! client's HTTP/2 frames on their way to h2 and replaces each `:authority` value that h2
//! would refuse with a valid one of the same length (`/run/x.sock` becomes `-run-x.sock`; an
//! empty one becomes `localhost`). Nothing else changes: frames and header blocks are passed
//! on byte for byte, so h2 still decodes and validates every request in full (a missing
//! `:path` or `:method`, a malformed header, bad HPACK, an oversized frame are refused as
//! before). Anything this layer does not understand is passed on untouched, after which the
//! connection is no longer rewritten: it can only fail to accept more, never accept less
//! carefully than h2.
//!
//! Responses are written straight through. The peer credentials (`SO_PEERCRED`) stay
//! available to the service as tonic's `UdsConnectInfo`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::{Connected, UdsConnectInfo};

mod hpack;

/// The HTTP/2 client connection preface (RFC 9113 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The frame size every HTTP/2 peer must accept (`SETTINGS_MAX_FRAME_SIZE` may only raise it).
/// A header frame larger than this is passed on for h2 to judge, and rewritten frames are cut
/// to it.
const MAX_FRAME: usize = 16_384;

/// The largest header block (all its frames) held back for rewriting; a larger one is passed
/// on untouched (h2 refuses header lists above 16 KiB anyway).
const MAX_BLOCK: usize = 64 * 1024;

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

const FRAME_HEADER: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// The accepted connections of `listener`, each a [`UdsConnection`], for
/// `tonic::transport::Server::serve_with_incoming*`.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UdsConnection>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener
            .accept()
            .await
            .map(|(stream, _)| UdsConnection::new(stream));
        Some((accepted, listener))
    })
}

/// An accepted Unix-socket connection whose HTTP/2 `:authority` values are made acceptable to
/// h2 (see the module documentation).
#[derive(Debug)]
pub struct UdsConnection {
    stream: UnixStream,
    reader: Reader,
}

impl UdsConnection {
    /// Wraps an accepted stream.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            reader: Reader::default(),
        }
    }

    /// How many `:authority` values this connection has replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.reader.rewritten
    }
}

impl Connected for UdsConnection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for UdsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.reader.drain_into(buf) {
                return Poll::Ready(Ok(()));
            }
            if this.reader.eof {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.reader.mode, Mode::Raw) && this.reader.is_empty() {
                // Nothing held back and nothing left to look at: read straight through.
                return Pin::new(&mut this.stream).poll_read(cx, buf);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            if read.filled().is_empty() {
                this.reader.finish();
            } else {
                this.reader.push(read.filled());
            }
        }
    }
}

impl AsyncWrite for UdsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Matching the connection preface; this many octets matched so far.
    Preface(usize),
    /// Reading frames.
    Frames,
    /// Passing everything on untouched (not HTTP/2 as expected, or something this layer does
    /// not follow): h2 judges it.
    Raw,
}

/// The client-to-server half: the frame layer around [`hpack::Walker`]. Pure (no I/O), so the
/// tests and the fuzz target feed it bytes directly.
#[derive(Debug)]
pub struct Reader {
    mode: Mode,
    /// Octets read from the socket and not yet handled, from `input_pos`.
    input: Vec<u8>,
    input_pos: usize,
    /// Octets ready for h2, from `output_pos`.
    output: Vec<u8>,
    output_pos: usize,
    /// Payload octets of a passed-on frame still to come.
    payload_left: usize,
    /// The frames (with their headers) of a header block awaiting END_HEADERS.
    block: Vec<u8>,
    block_stream: u32,
    walker: hpack::Walker,
    eof: bool,
    rewritten: u64,
}

impl Default for Reader {
    fn default() -> Self {
        Self {
            mode: Mode::Preface(0),
            input: Vec::new(),
            input_pos: 0,
            output: Vec::new(),
            output_pos: 0,
            payload_left: 0,
            block: Vec::new(),
            block_stream: 0,
            walker: hpack::Walker::default(),
            eof: false,
            rewritten: 0,
        }
    }
}

impl Reader {
    /// Takes octets from the client and handles as many whole frames as they complete.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.input_pos == self.input.len() {
            self.input.clear();
            self.input_pos = 0;
        }
        self.input.extend_from_slice(bytes);
        self.process();
    }

    /// The client is done sending: whatever is held back (an unfinished frame or header
    /// block) is passed on as it is, for h2 to see the same truncated stream.
    pub fn finish(&mut self) {
        let block = std::mem::take(&mut self.block);
        self.output.extend_from_slice(&block);
        self.output.extend_from_slice(&self.input[self.input_pos..]);
        self.input_pos = self.input.len();
        self.mode = Mode::Raw;
        self.eof = true;
    }

    /// Takes every octet ready for h2 (for tests and the fuzz target).
    pub fn take_output(&mut self) -> Vec<u8> {
        let out = self.output.split_off(self.output_pos);
        self.output.clear();
        self.output_pos = 0;
        out
    }

    /// How many `:authority` values were replaced.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Whether the reader still follows the frames (false once it passes octets on
    /// untouched).
    pub fn following(&self) -> bool {
        self.mode != Mode::Raw
    }

    fn is_empty(&self) -> bool {
        self.input_pos == self.input.len()
            && self.output_pos == self.output.len()
            && self.block.is_empty()
    }

    /// Copies ready octets into `buf`; false if there were none.
    fn drain_into(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let ready = &self.output[self.output_pos..];
        if ready.is_empty() || buf.remaining() == 0 {
            return false;
        }
        let n = ready.len().min(buf.remaining());
        buf.put_slice(&ready[..n]);
        self.output_pos += n;
        if self.output_pos == self.output.len() {
            self.output.clear();
            self.output_pos = 0;
        }
        true
    }

    /// Moves `n` input octets to the output untouched.
    fn forward(&mut self, n: usize) {
        let end = self.input_pos + n;
        self.output
            .extend_from_slice(&self.input[self.input_pos..end]);
        self.input_pos = end;
    }

    /// Passes the held-back block and everything after it on untouched, for good.
    fn give_up(&mut self) {
        let block = std::mem::take(&mut self.block);
        self.output.extend_from_slice(&block);
        self.mode = Mode::Raw;
    }

    fn process(&mut self) {
        loop {
            let available = self.input.len() - self.input_pos;
            match self.mode {
                Mode::Raw => {
                    self.forward(available);
                    return;
                }
                Mode::Preface(matched) => {
                    let n = available.min(PREFACE.len() - matched);
                    let got = &self.input[self.input_pos..self.input_pos + n];
                    if got != &PREFACE[matched..matched + n] {
                        self.mode = Mode::Raw;
                        continue;
                    }
                    self.forward(n);
                    if matched + n == PREFACE.len() {
                        self.mode = Mode::Frames;
                        continue;
                    }
                    self.mode = Mode::Preface(matched + n);
                    return;
                }
                Mode::Frames => {}
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(available);
                if n == 0 {
                    return;
                }
                self.forward(n);
                self.payload_left -= n;
                continue;
            }
            if available < FRAME_HEADER {
                return;
            }
            let header = &self.input[self.input_pos..self.input_pos + FRAME_HEADER];
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let kind = header[3];
            let flags = header[4];
            let stream =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            let collecting = !self.block.is_empty();
            let is_header_frame = kind == TYPE_HEADERS && !collecting
                || kind == TYPE_CONTINUATION && collecting && stream == self.block_stream;
            if !is_header_frame {
                if collecting || kind == TYPE_CONTINUATION {
                    // A header block interrupted, or a CONTINUATION out of place: a
                    // connection error h2 reports.
                    self.give_up();
                    continue;
                }
                // Any other frame: pass its header on now and its payload as it comes.
                self.forward(FRAME_HEADER);
                self.payload_left = len;
                continue;
            }
            if len > MAX_FRAME || self.block.len() + FRAME_HEADER + len > MAX_BLOCK {
                self.give_up();
                continue;
            }
            if available < FRAME_HEADER + len {
                return;
            }
            let end = self.input_pos + FRAME_HEADER + len;
            self.block
                .extend_from_slice(&self.input[self.input_pos..end]);
            self.input_pos = end;
            self.block_stream = stream;
            if flags & FLAG_END_HEADERS != 0 {
                self.end_block();
            }
        }
    }

    /// A whole header block is held back: pass it on as it is, or rewritten.
    fn end_block(&mut self) {
        let Some(parts) = BlockParts::of(&self.block) else {
            self.give_up();
            return;
        };
        match self.walker.rewrite(&parts.fragment) {
            Ok(None) => {
                let block = std::mem::take(&mut self.block);
                self.output.extend_from_slice(&block);
            }
            Ok(Some(fragment)) => {
                self.rewritten += 1;
                tracing::debug!("replaced an HTTP/2 :authority that h2 refuses");
                parts.write(&fragment, &mut self.output);
                self.block.clear();
            }
            Err(error) => {
                tracing::debug!(%error, "header block not followed; passed on untouched");
                self.give_up();
            }
        }
    }
}

/// A held-back header block taken apart: the HEADERS frame's stream, flags and priority, and
/// the header block fragments of all its frames joined.
struct BlockParts {
    stream: u32,
    /// END_STREAM and PRIORITY of the HEADERS frame.
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl BlockParts {
    /// `None` if a frame's padding or priority does not fit it (h2 refuses those).
    fn of(frames: &[u8]) -> Option<Self> {
        let mut rest = frames;
        let mut parts: Option<BlockParts> = None;
        while rest.len() >= FRAME_HEADER {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let flags = rest[4];
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
            let mut payload = rest.get(FRAME_HEADER..FRAME_HEADER + len)?;
            rest = &rest[FRAME_HEADER + len..];
            match &mut parts {
                None => {
                    // The HEADERS frame.
                    if flags & FLAG_PADDED != 0 {
                        let (&pad, body) = payload.split_first()?;
                        payload = body.get(..body.len().checked_sub(usize::from(pad))?)?;
                    }
                    let priority = if flags & FLAG_PRIORITY != 0 {
                        let p: [u8; 5] = payload.get(..5)?.try_into().ok()?;
                        payload = &payload[5..];
                        Some(p)
                    } else {
                        None
                    };
                    parts = Some(BlockParts {
                        stream,
                        flags: flags & (FLAG_END_STREAM | FLAG_PRIORITY),
                        priority,
                        fragment: payload.to_vec(),
                    });
                }
                Some(p) => p.fragment.extend_from_slice(payload),
            }
        }
        parts
    }

    /// Writes a HEADERS frame with `fragment` (and CONTINUATION frames for what does not fit),
    /// without padding.
    fn write(&self, fragment: &[u8], out: &mut Vec<u8>) {
        let priority: &[u8] = self.priority.as_ref().map_or(&[], |p| &p[..]);
        let first = fragment.len().min(MAX_FRAME - priority.len());
        let (head, mut rest) = fragment.split_at(first);
        let end = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(
            out,
            priority.len() + head.len(),
            TYPE_HEADERS,
            self.flags | end,
            self.stream,
        );
        out.extend_from_slice(priority);
        out.extend_from_slice(head);
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let end = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
            frame_header(out, n, TYPE_CONTINUATION, end, self.stream);
            out.extend_from_slice(chunk);
            rest = tail;
        }
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len <= MAX_FRAME`, which fits 24 bits.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

#[cfg(test)]
mod tests;
