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
//! The cost is a look at each frame header as it passes: octets are read into h2's own buffer
//! and stay there, and a header block that arrives in one frame (as gRPC clients send them) is
//! walked where it lies. Only a block that must be rewritten, or that is split across reads or
//! CONTINUATION frames, is copied. Responses are written straight through. The peer
//! credentials (`SO_PEERCRED`) stay available to the service as tonic's `UdsConnectInfo`,
//! inside [`UdsPeer`] with the process as it was at accept time.
//!
//! [`bind`] binds the socket itself (a stale one taken over, a live one refused, its mode set
//! before it is reachable).
//!
//! Connections are admitted under [`admission::Limits`] (caps in all and per uid, a deadline
//! for the first request, back-off when accept fails): see [`admission`].

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::{Connected, UdsConnectInfo};

pub mod admission;
mod bind;
mod hpack;

pub use admission::{AcceptedProcess, Admission, Limits, RateLimitedLog};
pub use bind::{bind, Access};

/// The HTTP/2 client connection preface (RFC 9113 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The frame size every HTTP/2 peer must accept (`SETTINGS_MAX_FRAME_SIZE` may only raise it).
/// A header frame larger than this is passed on for h2 to judge, and rewritten frames are cut
/// to it.
const MAX_FRAME: usize = 16_384;

/// The largest header block (all its frames) held back for rewriting; a larger one is passed
/// on untouched (h2 refuses header lists above 16 KiB anyway).
const MAX_BLOCK: usize = 64 * 1024;

const FRAME_HEADER: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// The accepted connections of `listener`, each a [`UdsConnection`], for
/// `tonic::transport::Server::serve_with_incoming*`.
/// Admitted under the default [`Limits`]; see [`incoming_with`].
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UdsConnection>> {
    incoming_with(listener, Admission::new(Limits::default()))
}

/// The accepted connections of `listener` under `admission`, each a [`UdsConnection`] that
/// holds its place and knows its peer's process, for
/// `tonic::transport::Server::serve_with_incoming*`. Accept errors are not passed on: the
/// loop backs off (10 ms, doubling to 1 s) and logs at most once a second.
pub fn incoming_with(
    listener: UnixListener,
    admission: Arc<Admission>,
) -> impl Stream<Item = io::Result<UdsConnection>> {
    let failures = RateLimitedLog::default();
    futures::stream::unfold(
        (listener, admission, failures),
        |(listener, admission, failures)| async move {
            let mut backoff = Duration::from_millis(10);
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        failures.info(|suppressed| {
                            tracing::warn!(
                                %error,
                                failed_since_last_line = suppressed,
                                "Unix socket accept failed; backing off"
                            );
                        });
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let cred = stream.peer_cred().ok();
                let Ok(slot) = admission.admit(cred.map(|c| c.uid())) else {
                    // Closed here, at once: it holds no descriptor.
                    continue;
                };
                let process = cred.and_then(|c| c.pid()).and_then(AcceptedProcess::read);
                let conn = UdsConnection::admitted(stream, slot, process);
                return Some((Ok(conn), (listener, admission, failures)));
            }
        },
    )
}

/// What a service learns of a connection's peer.
#[derive(Clone, Debug)]
pub struct UdsPeer {
    /// Its address and credentials (`SO_PEERCRED`).
    pub info: UdsConnectInfo,
    /// The process behind it when the connection was accepted, if it could be read.
    pub process: Option<AcceptedProcess>,
}

/// An accepted Unix-socket connection whose HTTP/2 `:authority` values are made acceptable to
/// h2 (see the module documentation).
#[derive(Debug)]
pub struct UdsConnection {
    stream: UnixStream,
    reader: Reader,
    /// Its place under the connection caps, if admitted.
    slot: Option<admission::Slot>,
    /// Until the first request arrives: when the connection is closed without one.
    first_request: Option<Pin<Box<tokio::time::Sleep>>>,
    process: Option<AcceptedProcess>,
}

impl UdsConnection {
    /// Wraps an accepted stream, with no limits.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            reader: Reader::default(),
            slot: None,
            first_request: None,
            process: None,
        }
    }

    fn admitted(
        stream: UnixStream,
        slot: admission::Slot,
        process: Option<AcceptedProcess>,
    ) -> Self {
        let timeout = slot.admission().limits().first_request_timeout;
        Self {
            stream,
            reader: Reader::default(),
            slot: Some(slot),
            first_request: Some(Box::pin(tokio::time::sleep(timeout))),
            process,
        }
    }

    /// Ends the connection once its first-request deadline passed without a request.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let sleep = self.first_request.as_mut()?;
        if self.reader.saw_request() {
            self.first_request = None;
            return None;
        }
        if std::future::Future::poll(sleep.as_mut(), cx).is_pending() {
            return None;
        }
        self.first_request = None;
        if let Some(slot) = &self.slot {
            slot.admission().count_idle_close();
        }
        tracing::debug!("Unix socket connection sent no request in time; closed");
        Some(io::Error::new(
            io::ErrorKind::TimedOut,
            "no request within the first-request deadline",
        ))
    }
}

impl Connected for UdsConnection {
    type ConnectInfo = UdsPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        UdsPeer {
            info: self.stream.connect_info(),
            process: self.process,
        }
    }
}

impl AsyncRead for UdsConnection {
    /// Reads into h2's own buffer and looks at the octets there: what passes unchanged (all of
    /// it, almost always) stays in place; only a header block, or a frame header cut by the
    /// read, is taken out and handed back once complete (rewritten or not).
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.idle_expired(cx) {
            return Poll::Ready(Err(e));
        }
        loop {
            if buf.remaining() == 0 || this.reader.drain_into(buf) || this.reader.eof {
                return Poll::Ready(Ok(()));
            }
            let start = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
            let read = &buf.filled()[start..];
            if read.is_empty() {
                this.reader.finish();
                continue;
            }
            let kept = this.reader.accept(read);
            buf.set_filled(start + kept);
            if kept > 0 {
                return Poll::Ready(Ok(()));
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

/// The client-to-server half: the frame layer around the HPACK walker. Pure (no I/O), so the
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
    /// A header frame [`Self::scan`] has walked and rewritten (its length in the input, and
    /// the frames that replace it), to be swapped in by [`Self::process`].
    replacement: Option<(usize, Vec<u8>)>,
    walker: hpack::Walker,
    eof: bool,
    rewritten: u64,
    /// Complete header blocks seen (requests, and trailers).
    blocks: u64,
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
            replacement: None,
            walker: hpack::Walker::default(),
            eof: false,
            rewritten: 0,
            blocks: 0,
        }
    }
}

impl Reader {
    /// Octets arrived from the client, after everything already given and once the output is
    /// taken: returns how many leading octets pass on as they are, in place. The rest is taken
    /// in and comes out of [`Self::take_output`] (now or once more octets complete it).
    pub fn accept(&mut self, bytes: &[u8]) -> usize {
        let kept = if self.is_empty() { self.scan(bytes) } else { 0 };
        if kept < bytes.len() {
            self.push(&bytes[kept..]);
        }
        kept
    }

    /// Takes octets in and handles as many whole frames as they complete.
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

    /// Follows `bytes` (what comes after everything seen so far) as far as they pass on
    /// unchanged, and returns how many that is: up to the first HEADERS or CONTINUATION frame,
    /// or a frame header not yet complete.
    fn scan(&mut self, bytes: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            let rest = &bytes[pos..];
            match self.mode {
                Mode::Raw => return bytes.len(),
                Mode::Preface(matched) => {
                    let n = rest.len().min(PREFACE.len() - matched);
                    if rest[..n] != PREFACE[matched..matched + n] {
                        self.mode = Mode::Raw;
                        continue;
                    }
                    pos += n;
                    if matched + n < PREFACE.len() {
                        self.mode = Mode::Preface(matched + n);
                        return pos;
                    }
                    self.mode = Mode::Frames;
                    continue;
                }
                Mode::Frames => {}
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(rest.len());
                if n == 0 {
                    return pos;
                }
                pos += n;
                self.payload_left -= n;
                continue;
            }
            if !self.block.is_empty() || rest.len() < FRAME_HEADER {
                return pos;
            }
            let kind = rest[3];
            let len = frame_len(rest);
            if kind == TYPE_HEADERS
                && rest[4] & FLAG_END_HEADERS != 0
                && len <= MAX_FRAME
                && rest.len() >= FRAME_HEADER + len
            {
                // A whole header block in one frame, here: walked where it lies.
                match self.walk(&rest[..FRAME_HEADER + len]) {
                    Walked::Pass => pos += FRAME_HEADER + len,
                    Walked::Replace(frames) => {
                        self.replacement = Some((FRAME_HEADER + len, frames));
                        return pos;
                    }
                    Walked::GiveUp => self.mode = Mode::Raw,
                }
                continue;
            }
            if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                return pos;
            }
            // Any other frame: its header now, its payload as it comes.
            self.payload_left = len;
            pos += FRAME_HEADER;
        }
    }

    /// Handles the octets taken in: what [`Self::scan`] passes is moved to the output, header
    /// blocks are held back until complete.
    fn process(&mut self) {
        loop {
            if let Some((skip, frames)) = self.replacement.take() {
                // A frame [`Self::scan`] walked and rewrote: it is the next input.
                self.input_pos += skip;
                self.output.extend_from_slice(&frames);
                continue;
            }
            let input = std::mem::take(&mut self.input);
            let passed = self.scan(&input[self.input_pos..]);
            self.input = input;
            self.forward(passed);
            if self.replacement.is_some() {
                continue;
            }
            let available = self.input.len() - self.input_pos;
            if self.mode == Mode::Raw {
                self.forward(available);
                return;
            }
            if available < FRAME_HEADER || self.payload_left > 0 || self.mode != Mode::Frames {
                return;
            }
            let header = &self.input[self.input_pos..self.input_pos + FRAME_HEADER];
            let len = frame_len(header);
            let flags = header[4];
            let stream = frame_stream(header);
            let expected = if self.block.is_empty() {
                header[3] == TYPE_HEADERS
            } else {
                header[3] == TYPE_CONTINUATION && stream == self.block_stream
            };
            if !expected {
                // A header block interrupted, or a CONTINUATION out of place: a connection
                // error h2 reports.
                self.give_up();
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
        let block = std::mem::take(&mut self.block);
        match self.walk(&block) {
            Walked::Pass => self.output.extend_from_slice(&block),
            Walked::Replace(frames) => self.output.extend_from_slice(&frames),
            Walked::GiveUp => {
                self.block = block;
                self.give_up();
            }
        }
    }

    /// Whether a request has arrived: a complete header block, or bytes this layer does not
    /// follow (h2 judges them).
    pub fn saw_request(&self) -> bool {
        self.blocks > 0 || self.mode == Mode::Raw
    }

    /// Walks the complete header block in `frames` (its HEADERS and CONTINUATION frames).
    fn walk(&mut self, frames: &[u8]) -> Walked {
        self.blocks += 1;
        let Some(parts) = BlockParts::of(frames) else {
            return Walked::GiveUp;
        };
        match self.walker.rewrite(&parts.fragment) {
            Ok(None) => Walked::Pass,
            Ok(Some(fragment)) => {
                self.rewritten += 1;
                tracing::debug!("replaced an HTTP/2 :authority that h2 refuses");
                let mut out = Vec::with_capacity(fragment.len() + 2 * FRAME_HEADER);
                parts.write(&fragment, &mut out);
                Walked::Replace(out)
            }
            Err(error) => {
                tracing::debug!(%error, "header block not followed; passed on untouched");
                Walked::GiveUp
            }
        }
    }
}

/// What became of a header block.
enum Walked {
    /// Nothing to change: its frames pass as they are.
    Pass,
    /// These frames replace it.
    Replace(Vec<u8>),
    /// Not followed: it and everything after pass untouched.
    GiveUp,
}

/// A held-back header block taken apart: the HEADERS frame's stream, flags and priority, and
/// the header block fragments of all its frames joined.
struct BlockParts<'a> {
    stream: u32,
    /// END_STREAM and PRIORITY of the HEADERS frame.
    flags: u8,
    priority: Option<[u8; 5]>,
    /// Borrowed from a block of one frame, joined from several.
    fragment: Cow<'a, [u8]>,
}

impl<'a> BlockParts<'a> {
    /// `None` if a frame's padding or priority does not fit it (h2 refuses those).
    fn of(frames: &'a [u8]) -> Option<Self> {
        let mut rest = frames;
        let mut parts: Option<BlockParts<'a>> = None;
        while rest.len() >= FRAME_HEADER {
            let len = frame_len(rest);
            let flags = rest[4];
            let stream = frame_stream(rest);
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
                        fragment: Cow::Borrowed(payload),
                    });
                }
                Some(p) => p.fragment.to_mut().extend_from_slice(payload),
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

/// The payload length in a frame header.
fn frame_len(header: &[u8]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// The stream identifier in a frame header.
fn frame_stream(header: &[u8]) -> u32 {
    u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len <= MAX_FRAME`, which fits 24 bits.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

#[cfg(test)]
mod tests;
