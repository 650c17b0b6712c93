//! Small I/O pieces of the data path: a stream with bytes put back in front of it, protocol
//! detection from the first bytes, and a connection tracker for graceful drain.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Writes pass straight through a read-side wrapper (`$t<T>` with an `inner: T` field).
macro_rules! write_through {
    ($t:ident) => {
        impl<T: AsyncWrite + Unpin> AsyncWrite for $t<T> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

/// A stream whose first bytes were already read (for detection) and are served again.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `prefix` is read before `inner`.
    pub fn new(prefix: Vec<u8>, inner: T) -> Prefixed<T> {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let rest = &self.prefix[self.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

write_through!(Prefixed);

/// How much a [`ReadAhead`] reads at once while a transfer streams.
pub const READ_AHEAD: usize = 64 * 1024;

/// A stream that reads ahead while a transfer streams. rustls reads TLS records at most 4 KiB
/// at a time, so a full 16 KiB record would cost four system calls; once a read fills the
/// reader's buffer (more is likely waiting), this reads [`READ_AHEAD`] bytes at once and serves
/// the small reads from memory. A read that would block releases the buffer, so an idle
/// connection holds none, and reads go straight to the reader's buffer again.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled the reader's buffer.
    streaming: bool,
}

impl<T> ReadAhead<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> ReadAhead<T> {
        ReadAhead {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
            streaming: false,
        }
    }

    /// Bytes read ahead and not yet served.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.start < this.end {
            let n = (this.end - this.start).min(out.remaining());
            out.put_slice(&this.buf[this.start..this.start + n]);
            this.start += n;
            return Poll::Ready(Ok(()));
        }
        if !this.streaming || out.remaining() >= READ_AHEAD {
            let (before, want) = (out.filled().len(), out.remaining());
            match Pin::new(&mut this.inner).poll_read(cx, out) {
                Poll::Ready(Ok(())) => {
                    let n = out.filled().len() - before;
                    this.streaming = n > 0 && n == want;
                    return Poll::Ready(Ok(()));
                }
                other => return other,
            }
        }
        if this.buf.is_empty() {
            this.buf = vec![0; READ_AHEAD];
        }
        let mut ahead = ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.inner).poll_read(cx, &mut ahead) {
            Poll::Ready(Ok(())) => {
                let n = ahead.filled().len();
                let k = n.min(out.remaining());
                out.put_slice(&this.buf[..k]);
                (this.start, this.end) = (k, n);
                if n == 0 {
                    this.buf = Vec::new();
                    this.streaming = false;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Idle: hold nothing while waiting.
                this.buf = Vec::new();
                (this.start, this.end) = (0, 0);
                this.streaming = false;
                Poll::Pending
            }
        }
    }
}

write_through!(ReadAhead);

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
    /// Anything else, or nothing before the deadline.
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];
/// Enough bytes to decide: the longest token we compare against.
const DETECT_BYTES: usize = 24;

/// Classifies `buf`: `Some` when the bytes decide, `None` when more are needed.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let mut undecided = false;
    for m in METHODS {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            if n == m.len() {
                return Some(Detected::Http1);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Reads the first bytes of `io` until they say HTTP/1, HTTP/2 or something else, or until
/// `timeout` passes (silence: a protocol where the server speaks first). Returns the verdict
/// and the bytes read, which the caller must replay ([`Prefixed`]).
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> io::Result<(Detected, Vec<u8>)> {
    let mut buf = Vec::with_capacity(DETECT_BYTES);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut chunk = [0u8; DETECT_BYTES];
        let want = DETECT_BYTES - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Err(_) => return Ok((Detected::Opaque, buf)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok((Detected::Opaque, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(d) = classify(&buf) {
            return Ok((d, buf));
        }
        if buf.len() >= DETECT_BYTES {
            return Ok((Detected::Opaque, buf));
        }
    }
}

/// Counts open connections so a drain can wait for them.
#[derive(Debug, Default)]
pub struct Tracker {
    open: AtomicUsize,
    idle: Notify,
}

/// Held by a connection; dropping it ends the connection's share.
#[derive(Debug)]
pub struct Tracked(Arc<Tracker>);

impl Tracker {
    /// Registers a connection.
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.open.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Completes when no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The first buffer of each direction of a relay.
pub const RELAY_BUF_MIN: usize = 4 * 1024;
/// The largest buffer a relay direction grows to.
pub const RELAY_BUF_MAX: usize = 64 * 1024;

/// One direction of a relay. Its buffer starts small, so an idle or chatty connection holds
/// little memory, and doubles (up to [`RELAY_BUF_MAX`]) each time a read fills it, so bulk
/// transfers move large chunks: fewer system calls, larger TLS writes.
#[derive(Debug)]
struct Direction {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    done: bool,
    shut: bool,
    flush: bool,
    total: u64,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            buf: Vec::new(),
            start: 0,
            end: 0,
            done: false,
            shut: false,
            flush: false,
            total: 0,
        }
    }

    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down) or nothing more can
    /// be done now. `Ready(Ok)` once finished.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.start == self.end && !self.done {
                if self.buf.is_empty() {
                    self.buf = vec![0; RELAY_BUF_MIN];
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.done = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                            if n == self.buf.len() && self.buf.len() < RELAY_BUF_MAX {
                                // Grow for the next read; this one's bytes move first.
                                self.buf.resize((self.buf.len() * 2).min(RELAY_BUF_MAX), 0);
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.flush {
                            match w.as_mut().poll_flush(cx) {
                                Poll::Ready(Ok(())) => self.flush = false,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                match w.as_mut().poll_write(cx, &self.buf[self.start..self.end]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "peer accepts no more bytes",
                        )))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        self.total += n as u64;
                        self.flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.done {
                if self.flush {
                    match w.as_mut().poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.flush = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                if !self.shut {
                    match w.as_mut().poll_shutdown(cx) {
                        Poll::Ready(_) => self.shut = true,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relays bytes both ways between `a` and `b` until both directions have ended (each end's
/// EOF is passed on as a write shutdown, so half-closed protocols work), or one fails, or
/// (with `idle`) no byte moved either way for that long (an error of kind `TimedOut`).
/// Returns the bytes moved a→b and b→a, also when a direction failed.
///
/// The idle check costs one timer per connection, re-armed once per `idle` period, not per
/// read: when it fires, the bytes moved are compared with those at the last firing.
pub async fn relay<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<Duration>,
) -> (u64, u64, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Direction::new();
    let mut ba = Direction::new();
    let mut ab_done = false;
    let mut ba_done = false;
    let mut idle_check = idle.map(|d| (d, Box::pin(tokio::time::sleep(d)), 0u64));
    let err = std::future::poll_fn(|cx| {
        if let Some((period, sleep, seen)) = idle_check.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                let moved = ab.total + ba.total;
                if moved == *seen {
                    return Poll::Ready(Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no byte moved either way within the idle timeout",
                    )));
                }
                *seen = moved;
                sleep.as_mut().reset(tokio::time::Instant::now() + *period);
                // Registers the re-armed timer with this task.
                let _ = sleep.as_mut().poll(cx);
            }
        }
        if !ab_done {
            match ab.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                Poll::Ready(Ok(())) => ab_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(e)),
                Poll::Pending => {}
            }
        }
        if !ba_done {
            match ba.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                Poll::Ready(Ok(())) => ba_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(e)),
                Poll::Pending => {}
            }
        }
        if ab_done && ba_done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await;
    (ab.total, ba.total, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"POST /x"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"GEX"), Some(Detected::Opaque));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0"), Some(Detected::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Opaque));
        assert_eq!(classify(b""), None);
    }

    #[tokio::test]
    async fn detection_waits_for_a_decision_then_times_out_on_silence() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let t = tokio::spawn(async move { detect(&mut b, Duration::from_millis(300)).await });
        use tokio::io::AsyncWriteExt;
        a.write_all(b"GE").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.write_all(b"T /x HTTP/1.1\r\n").await.unwrap();
        let (d, bytes) = t.await.unwrap().unwrap();
        assert_eq!(d, Detected::Http1);
        assert!(bytes.starts_with(b"GET /"));

        let (_a, mut b) = tokio::io::duplex(64);
        let start = std::time::Instant::now();
        let (d, bytes) = detect(&mut b, Duration::from_millis(100)).await.unwrap();
        assert_eq!(d, Detected::Opaque);
        assert!(bytes.is_empty());
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn read_ahead_serves_small_reads_of_a_stream_from_few_large_ones_and_idles_empty() {
        use tokio::io::AsyncWriteExt;
        /// Counts the reads that reach the stream.
        struct Counted<T>(T, std::sync::Arc<AtomicUsize>);
        impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                self.1.fetch_add(1, Ordering::Relaxed);
                Pin::new(&mut self.0).poll_read(cx, buf)
            }
        }
        let reads = std::sync::Arc::new(AtomicUsize::new(0));
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(Counted(b, reads.clone()));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        a.write_all(&data).await.unwrap();
        // A reader taking 4 KiB at a time, as rustls does.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        let n = reads.load(Ordering::Relaxed);
        assert!(
            n < data.len() / READ_AHEAD + 4,
            "{n} reads reached the stream"
        );
        // Drained and waiting: no buffer held; a small message is read straight through.
        let pending = tokio::time::timeout(Duration::from_millis(50), r.read(&mut chunk)).await;
        assert!(pending.is_err());
        assert_eq!((r.buf.capacity(), r.buffered()), (0, 0));
        a.write_all(b"ping").await.unwrap();
        drop(a);
        let n = r.read(&mut chunk).await.unwrap();
        assert_eq!(&chunk[..n], b"ping");
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0);
        assert_eq!(r.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn relay_closes_a_connection_idle_for_the_timeout_not_a_busy_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(200);
        let start = std::time::Instant::now();
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, Some(idle)).await });
        // Busy for five idle periods: bytes every 100 ms keep it open.
        let mut buf = [0u8; 4];
        for _ in 0..10 {
            client.write_all(b"ping").await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "closed while busy");
        let busy = start.elapsed();
        // Then silent: closed within two periods, as TimedOut, with what was moved.
        let (ab, ba, err) = relay.await.unwrap();
        let silent = start.elapsed() - busy;
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
        assert_eq!((ab, ba), (40, 0));
        assert!(
            silent < Duration::from_millis(700),
            "closed {silent:?} after the last byte"
        );
    }

    #[tokio::test]
    async fn relay_moves_everything_both_ways_and_passes_half_close_on() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, None).await });
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "a to b, then EOF");
        server.write_all(b"reply after half close").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let back = writer.await.unwrap();
        assert_eq!(back, b"reply after half close");
        let (ab, ba, err) = relay.await.unwrap();
        assert_eq!(ab, 1_000_000);
        assert_eq!(ba, 22);
        assert!(err.is_none(), "{err:?}");
    }

    #[tokio::test]
    async fn tracker_waits_for_open_connections() {
        let t = Arc::new(Tracker::default());
        let a = t.track();
        let b = t.track();
        assert_eq!(t.open(), 2);
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
