//! The base every listener builds on: the state shared by all connections ([`Shared`], the
//! [`ActivePolicy`]), the accept loop, connecting upstream, splicing bytes, and the inbound
//! listener's decision accounting. It knows no listener kind beyond that; the listeners
//! ([`crate::inbound`], [`crate::outbound`], [`crate::transparent`], and [`crate::http`] under
//! inbound) use it, and [`crate::server`] wires them together.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshid_policy::{AccessRecord, Decision, Policy, SpiffeId};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::access::AccessLogger;
use crate::config::Inbound;
use crate::io::Tracker;
use crate::metrics::{ListenerMetrics, Metrics};
use crate::tls::Credentials;

/// The policy in force and its decision counters.
#[derive(Debug)]
pub struct ActivePolicy {
    /// The policy.
    pub policy: Policy,
    /// Its decision counters.
    pub counters: crate::metrics::DecisionCounters,
}

impl ActivePolicy {
    /// Wraps a freshly loaded policy.
    pub fn new(policy: Policy, metrics: &Arc<Metrics>) -> ActivePolicy {
        ActivePolicy {
            counters: metrics.decision_counters(&policy),
            policy,
        }
    }
}

/// State shared by every listener and connection.
#[derive(Debug)]
pub struct Shared {
    /// The refusals reported to the agent for the CA's console ([`crate::report`]).
    pub denials: Arc<crate::report::Denials>,
    /// The proxy's SVID and trust.
    pub creds: Arc<Credentials>,
    /// The policy in force (swapped on reload).
    pub policy: Arc<ArcSwap<ActivePolicy>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Access log.
    pub access: AccessLogger,
    /// Open connections.
    pub tracker: Arc<Tracker>,
    /// Becomes `true` when the drain starts.
    pub drain: watch::Receiver<bool>,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// Protocol detection deadline.
    pub detect_timeout: Duration,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// SO_MARK of the proxy's own upstream and forwarding sockets (transparent mode).
    pub mark: Option<u32>,
    /// Connections open at once per listener.
    pub max_connections: usize,
    /// Handshakes in progress at once per inbound listener.
    pub max_handshakes: usize,
    /// Handshakes in progress at once per source address per inbound listener.
    pub max_handshakes_per_source: usize,
    /// A connection idle (no byte either way) for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/1 request head deadline.
    pub http_header_timeout: Duration,
    /// HTTP request head size limit.
    pub http_max_header_bytes: usize,
    /// HTTP/1 request header count limit.
    pub http_max_headers: usize,
    /// Requests per caller connection (`None`: no limit).
    pub http_max_requests_per_connection: Option<u64>,
}

/// Completes once the drain has started (the guard of the watch value is not held).
pub async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// Accepts connections on `listener` until the drain starts. Each connection runs `serve` in
/// its own task, tracked for the drain and counted in the listener's `connections` and `open`
/// metrics. Accept errors (for example, out of file descriptors) are logged and retried.
/// While `max_connections` are open, the oldest handshake in progress (`handshakes`, inbound
/// listeners) is shed for a new connection; when there is none, the new connection is closed at
/// once (before any TLS byte), counted as `limited{reason="max_connections"}`, and logged once
/// per burst.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: &Shared,
    metrics: &ListenerMetrics,
    handshakes: Option<&crate::admission::Handshakes>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut drain = shared.drain.clone();
    let max = i64::try_from(shared.max_connections).unwrap_or(i64::MAX);
    let mut refused_in_burst: u64 = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = %metrics.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drained(&mut drain) => return,
        };
        // Full, with handshakes in progress: the oldest of them makes room (connections that
        // never finish their handshake cannot fill the listener); full of established
        // connections: the newcomer is refused.
        if metrics.open.get() >= max && handshakes.is_some_and(|h| h.shed_oldest()) {
            metrics.limited("handshake_shed");
        } else if metrics.open.get() >= max {
            drop(tcp);
            metrics.limited("max_connections");
            if refused_in_burst == 0 {
                tracing::warn!(listener = %metrics.name, max_connections = shared.max_connections, peer = %peer, "listener full: refusing new connections until some close");
            }
            refused_in_burst += 1;
            continue;
        }
        if refused_in_burst > 0 {
            tracing::info!(listener = %metrics.name, refused = refused_in_burst, "listener accepting again");
            refused_in_burst = 0;
        }
        let tracked = shared.tracker.track();
        let (connections, open) = (metrics.connections.clone(), metrics.open.clone());
        // Counted open before the task runs, so that a burst of accepts sees itself.
        open.inc();
        let conn = serve(tcp, peer);
        tokio::spawn(async move {
            let _tracked = tracked;
            connections.inc();
            conn.await;
            open.dec();
        });
    }
}

impl Shared {
    /// Connects to `addr` (`host:port`) with the connect deadline, `TCP_NODELAY` and the
    /// proxy's SO_MARK (see [`connect`]).
    pub async fn connect(&self, addr: &str) -> std::io::Result<TcpStream> {
        connect(addr, self.mark, self.connect_timeout).await
    }
}

/// Connects to `addr` (`host:port`, resolved; each address tried in turn) within `timeout`,
/// with `TCP_NODELAY` set and, when given, SO_MARK `mark` on the socket, so that transparent
/// mode's iptables rules recognize the proxy's own connections and do not redirect them.
pub async fn connect(
    addr: &str,
    mark: Option<u32>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let attempt = async {
        let mut last = None;
        for a in tokio::net::lookup_host(addr).await? {
            match connect_to(a, mark).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address to connect to")
        }))
    };
    let s = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Relays bytes both ways until both directions end; returns (a to b, b to a). Errors end the
/// relay: what was relayed is still counted.
pub async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    shared: &Shared,
    metrics: &ListenerMetrics,
) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (ab, ba, err) = crate::io::relay(a, b, Some(shared.idle_timeout)).await;
    match err {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => {
            metrics.limited("idle_timeout");
            tracing::debug!(listener = %metrics.name, "idle connection closed");
        }
        Some(e) => tracing::debug!(error = %e, "relay ended with an error"),
        None => {}
    }
    (ab, ba)
}

/// Opens a TCP connection to `addr`, setting SO_MARK `mark` first when given.
pub async fn connect_to(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        SockRef::from(&socket).set_mark(mark).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot set SO_MARK {mark} (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What every connection of one inbound listener shares.
#[derive(Debug)]
pub struct InboundState {
    /// The listener's configuration.
    pub config: Inbound,
    /// Its counters.
    pub metrics: ListenerMetrics,
    /// Its handshakes in progress.
    pub handshakes: Arc<crate::admission::Handshakes>,
    /// Its connections to the local application (HTTP).
    pub pool: Arc<crate::upstream::AppPool>,
    /// Process-wide state.
    pub shared: Arc<Shared>,
}

/// Records a decision: metrics, and a log line for refusals and would-be refusals.
pub fn account(this: &InboundState, active: &ActivePolicy, caller: &SpiffeId, d: &Decision) {
    active.counters.count(d);
    let policy = active.policy.name();
    match d.outcome {
        meshid_policy::Outcome::Allow => {}
        meshid_policy::Outcome::Deny => {
            let local = this.shared.creds.local_id();
            this.shared
                .denials
                .policy(caller, local.as_deref(), d.rule_name());
            tracing::info!(
                listener = %this.config.name, caller = %caller, port = this.config.port,
                policy, rule = d.rule_name(), "refused by policy"
            );
        }
        meshid_policy::Outcome::AuditDeny => tracing::info!(
            listener = %this.config.name, caller = %caller, port = this.config.port,
            policy, rule = d.rule_name(), "audit: would be refused by policy; allowed"
        ),
    }
}

/// The access record skeleton of an inbound connection or request.
pub fn record(
    this: &InboundState,
    kind: &str,
    caller: &SpiffeId,
    local: &SpiffeId,
    group: &str,
    policy: &str,
    d: &Decision,
) -> AccessRecord {
    AccessRecord {
        kind: kind.to_owned(),
        caller: Some(caller.to_string()),
        callee: Some(local.to_string()),
        port: Some(this.config.port),
        policy: Some(policy.to_owned()),
        rule: Some(d.rule_name().to_owned()),
        decision: d.outcome.as_str().to_owned(),
        tls_group: Some(group.to_owned()),
        ..crate::access::connection("inbound", &this.config.name)
    }
}

/// The peer's certificate chain of an established connection, leaf first (kept to check it
/// against CRLs that arrive later).
pub fn peer_chain(
    certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    certs
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

/// Records an established connection closed because a CRL listed a certificate of the peer's
/// chain: a counter, a log line and an access-log record with the reason.
pub fn closed_revoked(
    metrics: &ListenerMetrics,
    shared: &Shared,
    direction: &str,
    caller: Option<&SpiffeId>,
    callee: Option<&SpiffeId>,
    serial: &str,
    start: std::time::Instant,
) {
    metrics.revoked_closed();
    tracing::warn!(listener = %metrics.name, direction, caller = ?caller.map(ToString::to_string), callee = ?callee.map(ToString::to_string), serial, reason = "peer_revoked", "connection closed: the peer's certificate was revoked");
    if shared.access.enabled() {
        shared.access.log(AccessRecord {
            caller: caller.map(ToString::to_string),
            callee: callee.map(ToString::to_string),
            decision: "close".to_owned(),
            reason: Some(format!("peer_revoked serial={serial}")),
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            ..crate::access::connection(direction, &metrics.name)
        });
    }
}
