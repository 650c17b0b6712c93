//! The listener's connections to its local application ([`AppPool`]), and the body wrapper
//! that counts what crosses them ([`Metered`]). Used by [`crate::http`]; kept apart from it so
//! that the listener state ([`crate::proxy::InboundState`]) can own a pool without importing
//! the HTTP server.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A request body on its way to the application.
pub type RequestBody = Metered<Incoming>;

/// A body that counts its data bytes and reports the count once, when it is dropped (complete
/// or abandoned).
pub struct Metered<B> {
    inner: B,
    bytes: u64,
    on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl<B> Metered<B> {
    pub(crate) fn new(inner: B, on_end: Box<dyn FnOnce(u64) + Send + Sync>) -> Metered<B> {
        Metered {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/1 application connections kept idle for reuse, per listener, at most.
const POOL_IDLE_MAX: usize = 128;
/// Response buffers kept per listener between exchanges, at most.
const BUFS_KEPT: usize = 64;
/// An idle HTTP/1 application connection older than this is not reused (it is closed).
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) type H1Sender = hyper::client::conn::http1::SendRequest<RequestBody>;
pub(crate) type H2Sender = hyper::client::conn::http2::SendRequest<RequestBody>;

/// A listener's connections to its local application, shared by all its callers' connections:
/// HTTP/1 connections idle between requests (most recently used first), and one HTTP/2
/// connection that every HTTP/2 request multiplexes on.
#[derive(Default)]
pub struct AppPool {
    h1: std::sync::Mutex<Vec<(H1Sender, Instant)>>,
    /// HTTP/1 connections of the fast path ([`crate::h1`]), idle between requests, oldest
    /// first.
    raw: std::sync::Mutex<std::collections::VecDeque<(tokio::net::TcpStream, Instant)>>,
    /// Response buffers of the fast path between exchanges (so that a busy listener does not
    /// allocate and free one per request).
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
    pub(crate) h2: tokio::sync::Mutex<Option<H2Sender>>,
}

impl std::fmt::Debug for AppPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppPool")
            .field("h1_idle", &self.idle_h1())
            .field("raw_idle", &self.idle_raw())
            .finish_non_exhaustive()
    }
}

impl AppPool {
    fn h1(&self) -> std::sync::MutexGuard<'_, Vec<(H1Sender, Instant)>> {
        self.h1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// HTTP/1 connections idle in the pool now.
    pub fn idle_h1(&self) -> usize {
        self.h1().len()
    }

    /// An idle HTTP/1 connection that can take a request, if one is left. A connection given
    /// back may need a moment before it is ready (its dispatcher finishing the last response);
    /// one that cannot be ready soon (closed, or its last response abandoned) is dropped.
    pub(crate) async fn checkout_h1(&self) -> Option<H1Sender> {
        loop {
            let (mut s, since) = self.h1().pop()?;
            if s.is_closed() || since.elapsed() >= POOL_IDLE_TIMEOUT {
                continue;
            }
            let ready = tokio::time::timeout(std::time::Duration::from_secs(1), s.ready());
            if matches!(ready.await, Ok(Ok(()))) {
                return Some(s);
            }
        }
    }

    /// Gives an HTTP/1 connection back once its response is done (dropped if the pool is full
    /// or the connection cannot take another request).
    pub(crate) fn checkin_h1(&self, s: H1Sender) {
        let mut idle = self.h1();
        idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT);
        if !s.is_closed() && idle.len() < POOL_IDLE_MAX {
            idle.push((s, Instant::now()));
        }
    }

    fn raw(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(tokio::net::TcpStream, Instant)>>
    {
        self.raw
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fast-path HTTP/1 connections idle in the pool now.
    pub fn idle_raw(&self) -> usize {
        self.raw().len()
    }

    /// An idle fast-path connection, most recently used first. One the application has closed
    /// (readable: its EOF, or bytes it should not have sent) is dropped; so are those idle too
    /// long.
    pub(crate) fn checkout_raw(&self) -> Option<tokio::net::TcpStream> {
        let mut idle = self.raw();
        while let Some((s, since)) = idle.pop_back() {
            if since.elapsed() >= POOL_IDLE_TIMEOUT {
                // The rest are older.
                idle.clear();
                return None;
            }
            let mut probe = [0u8; 1];
            if matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                return Some(s);
            }
        }
        None
    }

    /// Gives a fast-path connection back after a complete exchange (the oldest idle one is
    /// dropped if the pool is full).
    pub(crate) fn checkin_raw(&self, s: tokio::net::TcpStream) {
        let now = Instant::now();
        let mut idle = self.raw();
        while idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= POOL_IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() >= POOL_IDLE_MAX {
            idle.pop_front();
        }
        idle.push_back((s, now));
    }

    /// A response buffer with at least `min` bytes of capacity, empty.
    pub(crate) fn take_buf(&self, min: usize) -> Vec<u8> {
        let mut b = self
            .bufs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        b.clear();
        b.reserve(min);
        b
    }

    /// Keeps `b` for the next exchange, unless enough are kept or it grew past `max`.
    pub(crate) fn give_buf(&self, b: Vec<u8>, max: usize) {
        if b.capacity() > max {
            return;
        }
        let mut bufs = self
            .bufs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if bufs.len() < BUFS_KEPT {
            bufs.push(b);
        }
    }
}
