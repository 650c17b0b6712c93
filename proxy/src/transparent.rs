//! Transparent mode: the application's TCP reaches the proxy through iptables REDIRECT rules
//! (see the binary's `iptables` command), and the proxy recovers where each connection was going with
//! SO_ORIGINAL_DST.
//!
//! - **Outbound** (`outbound_listen`): a destination inside the mesh (a
//!   `[[transparent.destinations]]` address, else a `mesh_cidrs` network) is reached over mTLS
//!   and its server must present the expected SPIFFE ID; any other destination is relayed as
//!   it is (pass-through), so the application's other traffic is untouched.
//! - **Inbound** (`inbound_listen`): a connection that starts a TLS handshake is handled like
//!   an explicit inbound listener's ([`crate::inbound`]): the peer's SVID is verified, the
//!   policy decides with the original destination port, and plaintext is forwarded to the
//!   original destination (or, with `inbound_forward = "loopback"`, to its port on loopback,
//!   for services that listen only there). A connection that does not start with TLS is refused (`strict`,
//!   the default) or forwarded and counted (`permissive`, for migrating a service into the
//!   mesh).
//!
//! The proxy's own connections must not be redirected again: iptables excludes them by the
//! proxy's uid or by the SO_MARK set here on every socket the proxy opens (`mark`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_policy::{AccessRecord, Pattern};
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::ServerName;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{
    canonical_ip, Cidr, Inbound, InboundForward, InboundMode, InboundProtocol, Transparent,
};
use crate::metrics::ListenerMetrics;
use crate::proxy::{accept_loop, connect_to, splice, InboundState, Shared};

/// The listener name of transparent outbound in metrics and logs.
pub const OUTBOUND_NAME: &str = "transparent-outbound";
/// The listener name of transparent inbound in metrics and logs.
pub const INBOUND_NAME: &str = "transparent-inbound";

/// The TLS record type of a handshake: the first byte of every TLS ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;

/// Where a redirected connection was going, from SO_ORIGINAL_DST (IPv4) or
/// IP6T_SO_ORIGINAL_DST (IPv6). A connection that was not redirected reports its own local
/// address.
///
/// On a dual-stack listener (`[::]:port`), an IPv4 connection arrives as an IPv4-mapped IPv6
/// address; its conntrack entry is IPv4, so it is asked with the IPv4 option and answered as
/// a plain IPv4 address.
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(tcp);
    let ipv4 = match tcp.local_addr()? {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if ipv4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST is not an IP address",
        )
    })
}

async fn connect_within(addr: SocketAddr, shared: &Shared) -> io::Result<TcpStream> {
    tokio::time::timeout(shared.connect_timeout, connect_to(addr, shared.mark))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// The original destination of a redirected connection, or `None` (counted and logged) when
/// the connection reached the listener directly: relaying it would loop back to ourselves.
fn redirected(
    tcp: &TcpStream,
    peer: SocketAddr,
    metrics: &ListenerMetrics,
    not_redirected: &Counter,
) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let local = SocketAddr::new(canonical_ip(local.ip()), local.port());
    match original_dst(tcp) {
        Ok(dst) if dst != local => Some(dst),
        Ok(_) => {
            not_redirected.inc();
            tracing::info!(listener = %metrics.name, peer = %peer, local = %local, "connection was not redirected by iptables (it came to the listener directly); closing");
            None
        }
        Err(e) => {
            not_redirected.inc();
            tracing::warn!(listener = %metrics.name, peer = %peer, error = %e, "cannot read the original destination; closing");
            None
        }
    }
}

/// A mesh route: what the server must present, and the TLS configuration that checks it.
#[derive(Debug)]
struct Route {
    expect: Pattern,
    tls: Arc<rustls::ClientConfig>,
}

/// A mesh destination by address, with its route.
#[derive(Debug)]
struct ByAddress {
    /// Canonical (IPv4-mapped addresses as IPv4).
    ip: IpAddr,
    /// `None`: every port.
    port: Option<u16>,
    route: Route,
}

/// Transparent outbound: what every connection shares.
#[derive(Debug)]
pub struct OutboundListener {
    metrics: ListenerMetrics,
    shared: Arc<Shared>,
    /// The `destinations` entries, in order.
    destinations: Vec<ByAddress>,
    /// The `mesh_cidrs` networks.
    mesh_cidrs: Vec<Cidr>,
    /// Their route (present when `mesh_cidrs` is not empty: the config requires `expect`).
    cidrs: Option<Route>,
    mtls: Counter,
    passthrough: Counter,
    not_redirected: Counter,
}

impl OutboundListener {
    /// Builds the routes' TLS configurations.
    pub fn new(config: &Transparent, shared: Arc<Shared>) -> anyhow::Result<OutboundListener> {
        let route = |expect: &Pattern| -> anyhow::Result<Route> {
            Ok(Route {
                expect: expect.clone(),
                tls: shared.creds.client_config(expect)?,
            })
        };
        let destinations = config
            .destinations
            .iter()
            .map(|d| {
                Ok(ByAddress {
                    ip: canonical_ip(d.ip),
                    port: d.port,
                    route: route(&d.expect)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cidrs = config.expect.as_ref().map(route).transpose()?;
        let m = &shared.metrics;
        Ok(OutboundListener {
            metrics: m.listener("outbound", OUTBOUND_NAME),
            mtls: m.transparent("outbound", "mtls"),
            passthrough: m.transparent("outbound", "passthrough"),
            not_redirected: m.transparent("outbound", "not_redirected"),
            destinations,
            mesh_cidrs: config.mesh_cidrs.clone(),
            cidrs,
            shared,
        })
    }

    /// The mesh route to `dst`, or `None` for pass-through: an exact `IP:port` destination
    /// first, then an IP-only destination, then the mesh networks.
    fn route(&self, dst: SocketAddr) -> Option<&Route> {
        let ip = canonical_ip(dst.ip());
        let by = |port: Option<u16>| {
            self.destinations
                .iter()
                .find(|d| d.ip == ip && d.port == port)
                .map(|d| &d.route)
        };
        by(Some(dst.port())).or_else(|| by(None)).or_else(|| {
            self.cidrs
                .as_ref()
                .filter(|_| self.mesh_cidrs.iter().any(|c| c.contains(ip)))
        })
    }
}

/// Accepts redirected outbound connections until the drain starts.
pub async fn run_outbound(listener: TcpListener, this: Arc<OutboundListener>) {
    accept_loop(listener, &this.shared, &this.metrics, None, |tcp, peer| {
        let this = this.clone();
        async move { outbound(&this, tcp, peer).await }
    })
    .await;
}

async fn outbound(this: &OutboundListener, app: TcpStream, peer: SocketAddr) {
    let _ = app.set_nodelay(true);
    let start = Instant::now();
    let name = &this.metrics.name;
    let Some(dst) = redirected(&app, peer, &this.metrics, &this.not_redirected) else {
        return;
    };
    let Some(route) = this.route(dst) else {
        this.passthrough.inc();
        passthrough(&this.metrics, &this.shared, "outbound", app, dst, start).await;
        return;
    };
    this.mtls.inc();
    if !this.shared.creds.ready() {
        this.metrics.handshake_failure("no_svid");
        tracing::info!(listener = %name, destination = %dst, "no svid yet; refusing outbound connection");
        return;
    }
    let tcp = match connect_within(dst, &this.shared).await {
        Ok(t) => t,
        Err(e) => {
            this.metrics.handshake_failure("connect");
            tracing::warn!(listener = %name, destination = %dst, error = %e, "cannot reach the destination");
            return;
        }
    };
    let addr = dst.to_string();
    let to = crate::outbound::Upstream {
        addr: &addr,
        port: Some(dst.port()),
        server_name: ServerName::IpAddress(dst.ip().into()),
    };
    tracing::debug!(listener = %name, destination = %dst, expect = %route.expect, "upgrading to mTLS");
    crate::outbound::forward(
        &this.metrics,
        &this.shared,
        &TlsConnector::from(route.tls.clone()),
        to,
        tcp,
        app,
        start,
    )
    .await;
}

/// Relays a connection to `dst` untouched (outbound outside the mesh; permissive inbound
/// plaintext) and writes its access record.
async fn passthrough(
    metrics: &ListenerMetrics,
    shared: &Shared,
    direction: &'static str,
    mut client: TcpStream,
    dst: SocketAddr,
    start: Instant,
) {
    let mut upstream = match connect_within(dst, shared).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(listener = %metrics.name, destination = %dst, error = %e, "cannot reach the destination");
            return;
        }
    };
    let (rx, tx) = splice(&mut client, &mut upstream, shared, metrics).await;
    metrics.rx.inc_by(rx);
    metrics.tx.inc_by(tx);
    if shared.access.enabled() {
        let local = shared.creds.local_id().map(|id| id.to_string());
        let (caller, callee) = match direction {
            "outbound" => (local, None),
            _ => (None, local),
        };
        let reason = match direction {
            "outbound" => "passthrough",
            _ => "plaintext_permissive",
        };
        shared.access.log(AccessRecord {
            caller,
            callee,
            port: Some(dst.port()),
            reason: Some(reason.to_owned()),
            bytes_in: rx,
            bytes_out: tx,
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            ..crate::access::connection(direction, &metrics.name)
        });
    }
}

/// Transparent inbound: what every connection shares.
#[derive(Debug)]
pub struct InboundListener {
    metrics: ListenerMetrics,
    handshakes: Arc<crate::admission::Handshakes>,
    shared: Arc<Shared>,
    listen: SocketAddr,
    mode: InboundMode,
    forward: InboundForward,
    tcp_ports: Vec<u16>,
    /// The application connections, one pool per application address, shared by the callers
    /// going there (at most [`POOLS_MAX`] addresses; past that a connection gets its own).
    pools: std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<crate::upstream::AppPool>>>,
    mtls: Counter,
    plaintext_refused: Counter,
    plaintext_allowed: Counter,
    not_redirected: Counter,
}

impl InboundListener {
    /// The transparent inbound listener of `config`.
    pub fn new(config: &Transparent, shared: Arc<Shared>) -> InboundListener {
        let m = &shared.metrics;
        InboundListener {
            metrics: m.listener("inbound", INBOUND_NAME),
            handshakes: crate::admission::Handshakes::new(
                shared.max_handshakes,
                shared.max_handshakes_per_source,
            ),
            mtls: m.transparent("inbound", "mtls"),
            plaintext_refused: m.transparent("inbound", "plaintext_refused"),
            plaintext_allowed: m.transparent("inbound", "plaintext_allowed"),
            not_redirected: m.transparent("inbound", "not_redirected"),
            listen: config.inbound_listen,
            mode: config.inbound_mode,
            forward: config.inbound_forward,
            tcp_ports: config.tcp_ports.clone(),
            pools: std::sync::Mutex::default(),
            shared,
        }
    }

    /// The pool of application connections to `app`.
    fn pool(&self, app: SocketAddr) -> Arc<crate::upstream::AppPool> {
        let mut pools = self
            .pools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = pools.get(&app) {
            return p.clone();
        }
        let p = Arc::<crate::upstream::AppPool>::default();
        if pools.len() < POOLS_MAX {
            pools.insert(app, p.clone());
        }
        p
    }
}

/// Application addresses with a shared connection pool, per transparent inbound listener.
const POOLS_MAX: usize = 256;

/// Accepts redirected inbound connections until the drain starts.
pub async fn run_inbound(listener: TcpListener, this: Arc<InboundListener>) {
    let acceptor = TlsAcceptor::from(this.shared.creds.server_config());
    let handshakes = this.handshakes.clone();
    accept_loop(
        listener,
        &this.shared,
        &this.metrics,
        Some(&handshakes),
        |tcp, peer| {
            let (this, acceptor) = (this.clone(), acceptor.clone());
            async move { inbound(&this, &acceptor, tcp, peer).await }
        },
    )
    .await;
}

/// Waits for the connection's first byte without consuming it; `None` on timeout or EOF.
async fn first_byte(tcp: &TcpStream, wait: Duration) -> Option<u8> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(wait, tcp.peek(&mut b)).await {
        Ok(Ok(1)) => Some(b[0]),
        _ => None,
    }
}

async fn inbound(this: &InboundListener, acceptor: &TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let start = Instant::now();
    let Some(dst) = redirected(&tcp, peer, &this.metrics, &this.not_redirected) else {
        return;
    };
    // A TLS client speaks first. In strict mode a silent client gets the handshake deadline
    // (it is refused either way); in permissive mode silence past the detect deadline means
    // a plaintext protocol where the server speaks first.
    let wait = match this.mode {
        InboundMode::Strict => this.shared.handshake_timeout,
        InboundMode::Permissive => this.shared.detect_timeout,
    };
    let first = first_byte(&tcp, wait).await;
    let app = this.forward.target(dst);
    if first == Some(TLS_HANDSHAKE) {
        this.mtls.inc();
        let protocol = if this.tcp_ports.contains(&dst.port()) {
            InboundProtocol::Tcp
        } else {
            InboundProtocol::Detect
        };
        // The connection's view of an explicit inbound listener: its service port and
        // application address are where the caller was going.
        let l = Arc::new(InboundState {
            config: Inbound {
                name: this.metrics.name.clone(),
                listen: this.listen,
                forward_to: app.to_string(),
                port: dst.port(),
                protocol,
            },
            metrics: this.metrics.clone(),
            handshakes: this.handshakes.clone(),
            // The application is wherever the caller was going: its pool.
            pool: this.pool(app),
            shared: this.shared.clone(),
        });
        crate::inbound::connection(&l, acceptor, tcp, peer).await;
        return;
    }
    match this.mode {
        InboundMode::Strict => {
            this.plaintext_refused.inc();
            tracing::info!(
                listener = %this.metrics.name, peer = %peer, port = dst.port(),
                reason = if first.is_some() { "plaintext" } else { "no_tls_client_hello" },
                "plaintext inbound refused (inbound_mode = strict)"
            );
        }
        InboundMode::Permissive => {
            this.plaintext_allowed.inc();
            tracing::debug!(listener = %this.metrics.name, peer = %peer, port = dst.port(), "plaintext inbound forwarded (inbound_mode = permissive)");
            passthrough(&this.metrics, &this.shared, "inbound", tcp, app, start).await;
        }
    }
}
