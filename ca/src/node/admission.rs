//! Admission of node API connections: who gets a TLS handshake slot, and how long a connection
//! may stay.
//!
//! The node API must listen for agents that have no identity yet (they attest with a join
//! token), so anyone who reaches it can open connections. Without limits, about 1,100 silent
//! TCP connections held every handshake slot and locked every agent out, and TLS connections
//! without a certificate that answered HTTP/2 pings stayed open forever. So:
//! - a connection sends its ClientHello within [`Limits::client_hello_timeout`] and finishes
//!   the handshake within [`Limits::handshake_timeout`];
//! - a source address has at most [`Limits::pending_per_source`] handshakes in progress; past
//!   that its newest connection is refused;
//! - when all [`Limits::pending`] slots are taken, the oldest pending handshake is shed for the
//!   new one: to lock agents out, an attacker must now outpace every agent's handshake (a few
//!   milliseconds), not merely hold slots;
//! - open connections are capped globally and per source;
//! - a connection without a client certificate (an agent about to attest) lives at most
//!   [`Limits::certless_lifetime`]. Agents' connections, with an SVID, are not limited.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::metrics::{Metrics, ReasonLabels};

/// The node API's connection limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// TLS handshakes in progress at once; past this the oldest is shed.
    pub pending: usize,
    /// TLS handshakes in progress per source address; past this the newest is refused.
    pub pending_per_source: usize,
    /// How long a new connection may take to send its ClientHello.
    pub client_hello_timeout: Duration,
    /// How long a new connection may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// Open connections at once.
    pub connections: usize,
    /// Open connections per source address.
    pub connections_per_source: usize,
    /// Lifetime of a connection without a client certificate.
    pub certless_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            pending: 1024,
            pending_per_source: 64,
            client_hello_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
            connections: 16_384,
            connections_per_source: 1024,
            certless_lifetime: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Pending handshakes by age (ids increase), with their source and shedding signal.
    pending: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    pending_by_source: HashMap<IpAddr, usize>,
    open: usize,
    open_by_source: HashMap<IpAddr, usize>,
}

fn decrement(map: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = map.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&ip);
        }
    }
}

/// The node API's admission state, shared by the accept loop and every connection.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// Admission under `limits`, counting into `metrics`.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State::default()),
            metrics,
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent; a panic elsewhere cannot break it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection refused, shed or closed for `reason`.
    pub fn limited(&self, reason: &'static str) {
        self.metrics
            .node_connections_limited
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A new TCP connection from `ip` asks for a handshake slot. When every slot is taken the
    /// oldest pending handshake is shed. Refused (with the reason) when its source has too
    /// many handshakes in progress, or too many connections open, or the server has.
    pub fn begin(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, &'static str> {
        let mut st = self.state();
        let reason = self.open_cap(&st, ip).or_else(|| {
            (st.pending_by_source.get(&ip).copied().unwrap_or(0) >= self.limits.pending_per_source)
                .then_some("source_pending")
        });
        if let Some(reason) = reason {
            drop(st);
            self.limited(reason);
            return Err(reason);
        }
        while st.pending.len() >= self.limits.pending.max(1) {
            let Some((_, (old, shed))) = st.pending.pop_first() else {
                break;
            };
            decrement(&mut st.pending_by_source, old);
            let _ = shed.send(());
            self.limited("shed");
        }
        let id = st.next;
        st.next += 1;
        let (tx, rx) = oneshot::channel();
        st.pending.insert(id, (ip, tx));
        *st.pending_by_source.entry(ip).or_default() += 1;
        self.metrics
            .node_handshakes_pending
            .set(i64::try_from(st.pending.len()).unwrap_or(i64::MAX));
        Ok(Pending {
            admission: Arc::clone(self),
            id,
            ip,
            shed: Some(rx),
        })
    }

    /// Counts a completed handshake by its key exchange group.
    pub fn handshake_done(&self, group: &'static str) {
        self.metrics
            .node_handshakes
            .get_or_create(&crate::metrics::GroupLabels { group })
            .inc();
    }

    /// Counts a failed or timed-out handshake.
    pub fn handshake_failed(&self) {
        self.metrics.node_handshake_failures.inc();
    }

    /// The cap on open connections that `ip` would pass, if any.
    fn open_cap(&self, st: &State, ip: IpAddr) -> Option<&'static str> {
        if st.open >= self.limits.connections {
            Some("connections")
        } else if st.open_by_source.get(&ip).copied().unwrap_or(0)
            >= self.limits.connections_per_source
        {
            Some("source_connections")
        } else {
            None
        }
    }

    /// Pending handshakes and open connections (for tests).
    pub fn counts(&self) -> (usize, usize) {
        let st = self.state();
        (st.pending.len(), st.open)
    }
}

/// A handshake slot. Dropping it frees the slot.
#[derive(Debug)]
pub struct Pending {
    admission: Arc<Admission>,
    id: u64,
    ip: IpAddr,
    shed: Option<oneshot::Receiver<()>>,
}

impl Pending {
    /// Completes when this handshake is shed for a newer one.
    pub fn shed(&mut self) -> impl Future<Output = ()> + '_ {
        let rx = self.shed.as_mut();
        async move {
            match rx {
                // An error means the sender is gone: shed (or the state dropped it).
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        }
    }

    /// The handshake finished: the slot becomes an open connection, unless the caps filled
    /// up meanwhile.
    pub fn open(self) -> Result<Open, &'static str> {
        let admission = Arc::clone(&self.admission);
        let ip = self.ip;
        let mut st = admission.state();
        if st.pending.remove(&self.id).is_some() {
            decrement(&mut st.pending_by_source, ip);
        }
        admission
            .metrics
            .node_handshakes_pending
            .set(i64::try_from(st.pending.len()).unwrap_or(i64::MAX));
        if let Some(reason) = admission.open_cap(&st, ip) {
            drop(st);
            admission.limited(reason);
            return Err(reason);
        }
        st.open += 1;
        *st.open_by_source.entry(ip).or_default() += 1;
        admission
            .metrics
            .node_connections
            .set(i64::try_from(st.open).unwrap_or(i64::MAX));
        drop(st);
        Ok(Open { admission, ip })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        if st.pending.remove(&self.id).is_some() {
            decrement(&mut st.pending_by_source, self.ip);
        }
        self.admission
            .metrics
            .node_handshakes_pending
            .set(i64::try_from(st.pending.len()).unwrap_or(i64::MAX));
    }
}

/// An open connection's place under the caps. Dropping it frees the place.
#[derive(Debug)]
pub struct Open {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        st.open = st.open.saturating_sub(1);
        decrement(&mut st.open_by_source, self.ip);
        self.admission
            .metrics
            .node_connections
            .set(i64::try_from(st.open).unwrap_or(i64::MAX));
    }
}

/// An established node API connection, counted under the caps; one without a client
/// certificate fails its reads and writes once its lifetime is over, which ends it.
#[derive(Debug)]
pub struct NodeConn {
    inner: TlsStream<TcpStream>,
    open: Open,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: bool,
}

impl NodeConn {
    /// Wraps an established connection.
    pub fn new(inner: TlsStream<TcpStream>, open: Open) -> Self {
        let certless = inner
            .get_ref()
            .1
            .peer_certificates()
            .is_none_or(<[_]>::is_empty);
        let lifetime = open.admission.limits.certless_lifetime;
        Self {
            inner,
            open,
            expires: certless.then(|| Box::pin(tokio::time::sleep(lifetime))),
            expired: false,
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let sleep = self.expires.as_mut()?;
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        if !self.expired {
            // Once: afterwards the connection is only being torn down.
            self.expired = true;
            self.open.admission.limited("certless_lifetime");
            tracing::debug!(
                ip = %self.open.ip,
                "node API connection without a client certificate reached its lifetime; closed"
            );
        }
        Some(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection without a client certificate reached its lifetime",
        ))
    }
}

impl AsyncRead for NodeConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for NodeConn {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
