//! `meshid-proxy run`: wires the credentials, the policy, the listeners and the ops endpoint,
//! and drains on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use meshid_policy::{Policy, PolicyError, Protocol};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::access::AccessLogger;
use crate::config::{Config, InboundProtocol};
use crate::io::Tracker;
use crate::metrics::Metrics;
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
}

/// The listeners of a configuration, bound before anything runs.
#[derive(Debug)]
pub struct Bound {
    /// The ops listener.
    pub ops: TcpListener,
    /// One per `[[inbound]]`, in order.
    pub inbound: Vec<TcpListener>,
    /// One per `[[outbound]]`, in order.
    pub outbound: Vec<TcpListener>,
    /// Transparent mode's outbound and inbound listeners.
    pub transparent: Option<(TcpListener, TcpListener)>,
}

/// Binds every listener of `config`; the error names the address.
pub async fn bind(config: &Config) -> anyhow::Result<Bound> {
    async fn one(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
        TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({what}): {e}"))
    }
    let ops = one(config.ops_address, "ops_address").await?;
    let mut inbound = Vec::new();
    for l in &config.inbound {
        inbound.push(one(l.listen, &format!("inbound {}", l.name)).await?);
    }
    let mut outbound = Vec::new();
    for l in &config.outbound {
        outbound.push(one(l.listen, &format!("outbound {}", l.name)).await?);
    }
    let transparent = match &config.transparent {
        Some(t) => Some((
            one(t.outbound_listen, "transparent.outbound_listen").await?,
            one(t.inbound_listen, "transparent.inbound_listen").await?,
        )),
        None => None,
    };
    Ok(Bound {
        ops,
        inbound,
        outbound,
        transparent,
    })
}

/// The protocols of the inbound ports, for [`Policy::validate_ports`].
pub fn port_protocols(config: &Config) -> Vec<(u16, Protocol)> {
    config
        .inbound
        .iter()
        .filter_map(|l| match l.protocol {
            InboundProtocol::Tcp => Some((l.port, Protocol::Tcp)),
            InboundProtocol::Http => Some((l.port, Protocol::Http)),
            InboundProtocol::Detect => None,
        })
        .chain(
            config
                .transparent
                .iter()
                .flat_map(|t| t.tcp_ports.iter().map(|p| (*p, Protocol::Tcp))),
        )
        .collect()
}

/// The policy in force when no policy file is configured: every inbound caller refused.
pub fn deny_all() -> Result<Policy, PolicyError> {
    Policy::parse(
        "name: deny-all\ndefault: deny\nrules: []\n",
        "(no policy file)",
    )
}

/// Loads the policy file (or [`deny_all`]) and checks it against the listeners.
pub fn load_policy(path: Option<&Path>, ports: &[(u16, Protocol)]) -> Result<Policy, PolicyError> {
    let policy = match path {
        Some(p) => {
            check_policy_mode(p)?;
            Policy::load(p)?
        }
        None => deny_all()?,
    };
    policy.validate_ports(ports)?;
    Ok(policy)
}

/// A policy file any user may write is refused: whoever writes it decides who is let in.
fn check_policy_mode(path: &Path) -> Result<(), PolicyError> {
    meshid_api::config::check_not_world_writable(path, "policy file").map_err(|e| PolicyError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, e),
    })
}

/// Completes once the drain has started (the guard of the watch value is not held).
pub async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// Accepts connections on `listener` until the drain starts. Each connection runs `serve` in
/// its own task, tracked for the drain and counted in the listener's `connections` and `open`
/// metrics. Accept errors (for example, out of file descriptors) are logged and retried.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: &Shared,
    metrics: &crate::metrics::ListenerMetrics,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut drain = shared.drain.clone();
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
        let tracked = shared.tracker.track();
        let (connections, open) = (metrics.connections.clone(), metrics.open.clone());
        let conn = serve(tcp, peer);
        tokio::spawn(async move {
            let _tracked = tracked;
            connections.inc();
            open.inc();
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
            match crate::transparent::connect_to(a, mark).await {
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
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (ab, ba, err) = crate::io::relay(a, b).await;
    if let Some(e) = err {
        tracing::debug!(error = %e, "relay ended with an error");
    }
    (ab, ba)
}

/// Watches the policy file: a valid new version replaces the policy for new connections and
/// requests; an invalid one is logged and counted and the previous policy stays. Checks every
/// `interval` (and on SIGHUP), comparing content, so in-place edits, atomic renames and
/// Kubernetes ConfigMap symlink swaps are all seen.
pub async fn watch_policy(
    path: PathBuf,
    ports: Vec<(u16, Protocol)>,
    current: Arc<ArcSwap<ActivePolicy>>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut drain: watch::Receiver<bool>,
) {
    let mut last = tokio::fs::read(&path).await.ok();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut missing_logged = false;
    // The contents last refused for the file's mode (logged once, not every interval).
    let mut refused_mode: Option<Vec<u8>> = None;
    loop {
        let hup_fut = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let forced = tokio::select! {
            () = tokio::time::sleep(interval) => false,
            () = hup_fut => true,
            () = crate::server::drained(&mut drain) => return,
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                if !missing_logged {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the policy file; keeping the policy in force");
                    missing_logged = true;
                }
                continue;
            }
        };
        missing_logged = false;
        if !forced && last.as_deref() == Some(&bytes[..]) {
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        let origin = path.display().to_string();
        if let Err(e) = check_policy_mode(&path) {
            // Refused for its mode: logged once per contents, looked at again every interval.
            if refused_mode.as_deref() != Some(&bytes[..]) {
                tracing::warn!(path = %origin, error = %e, "policy refused; the previous policy stays in force");
                metrics
                    .policy_reloads
                    .get_or_create(&crate::metrics::ReloadLabels { result: "error" })
                    .inc();
                refused_mode = Some(bytes);
            }
            continue;
        }
        refused_mode = None;
        let result = Policy::parse(&text, &origin).and_then(|p| {
            p.validate_ports(&ports)?;
            Ok(p)
        });
        last = Some(bytes);
        match result {
            Ok(policy) => {
                tracing::info!(path = %origin, policy = policy.name(), "policy reloaded");
                current.store(Arc::new(ActivePolicy::new(policy, &metrics)));
                metrics
                    .policy_reloads
                    .get_or_create(&crate::metrics::ReloadLabels { result: "ok" })
                    .inc();
            }
            Err(e) => {
                tracing::warn!(path = %origin, error = %e, "policy refused; the previous policy stays in force");
                metrics
                    .policy_reloads
                    .get_or_create(&crate::metrics::ReloadLabels { result: "error" })
                    .inc();
            }
        }
    }
}

#[derive(Clone)]
struct OpsState {
    creds: Arc<Credentials>,
    drain: watch::Receiver<bool>,
    registry: Arc<prometheus_client::registry::Registry>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    if *s.drain.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if s.creds.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no svid yet\n")
    }
}

async fn render_metrics(State(s): State<OpsState>) -> axum::response::Response {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &s.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Runs the proxy on already-bound listeners until `shutdown` completes, then drains: stops
/// accepting, reports not ready, lets HTTP connections finish their in-flight requests and
/// waits up to `config.drain_timeout` for open connections to end.
pub async fn run(
    config: Config,
    policy: Policy,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(metrics.registry());
    let creds = Credentials::new(config.federated_trust_domains.clone())?;
    let (access, writer) = AccessLogger::start(&config.access_log, metrics.clone())
        .map_err(|e| anyhow::anyhow!("cannot open the access log: {e}"))?;
    let (drain_tx, drain) = watch::channel(false);
    metrics
        .policy_reloads
        .get_or_create(&crate::metrics::ReloadLabels { result: "ok" })
        .inc();
    tracing::info!(policy = policy.name(), "policy loaded");
    let policy = Arc::new(ArcSwap::from_pointee(ActivePolicy::new(policy, &metrics)));
    let shared = Arc::new(Shared {
        creds: creds.clone(),
        policy: policy.clone(),
        metrics: metrics.clone(),
        access,
        tracker: Arc::new(Tracker::default()),
        drain: drain.clone(),
        handshake_timeout: config.handshake_timeout,
        detect_timeout: config.detect_timeout,
        connect_timeout: config.connect_timeout,
        mark: config.transparent.as_ref().and_then(|t| t.mark),
    });

    let follow = tokio::spawn(crate::tls::follow(
        config.workload_api_socket.clone(),
        config.spiffe_id.clone(),
        creds.clone(),
        metrics.clone(),
        drain.clone(),
    ));
    if let Some(path) = &config.policy_file {
        tokio::spawn(watch_policy(
            path.clone(),
            port_protocols(&config),
            policy,
            metrics.clone(),
            Duration::from_millis(200),
            drain.clone(),
        ));
    } else {
        tracing::warn!("no policy_file: every inbound caller is refused");
    }
    let ops_state = OpsState {
        creds: creds.clone(),
        drain: drain.clone(),
        registry,
    };
    let router = axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(render_metrics))
        .with_state(ops_state);
    let ops_addr = bound.ops.local_addr()?;
    let ops = tokio::spawn(async move {
        if let Err(e) = axum::serve(bound.ops, router).await {
            tracing::error!(error = %e, "ops listener failed");
        }
    });
    let mut tasks = Vec::new();
    for (l, listener) in config.inbound.iter().zip(bound.inbound) {
        tracing::info!(listener = %l.name, listen = %l.listen, forward_to = %l.forward_to, port = l.port, "inbound listening");
        let this = Arc::new(crate::inbound::Listener {
            config: l.clone(),
            metrics: metrics.listener("inbound", &l.name),
            shared: shared.clone(),
        });
        tasks.push(tokio::spawn(crate::inbound::run(listener, this)));
    }
    for (l, listener) in config.outbound.iter().zip(bound.outbound) {
        tracing::info!(listener = %l.name, listen = %l.listen, upstream = %l.upstream, expect = %l.expect, "outbound listening");
        let this = Arc::new(crate::outbound::Listener {
            config: l.clone(),
            metrics: metrics.listener("outbound", &l.name),
            tls: creds.client_config(&l.expect)?,
            server_name: crate::outbound::server_name(&l.upstream),
            shared: shared.clone(),
        });
        tasks.push(tokio::spawn(crate::outbound::run(listener, this)));
    }
    if let (Some(t), Some((out_l, in_l))) = (&config.transparent, bound.transparent) {
        tracing::info!(
            outbound = %t.outbound_listen, inbound = %t.inbound_listen,
            inbound_mode = ?t.inbound_mode, mark = ?t.mark,
            mesh_cidrs = ?t.mesh_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            destinations = t.destinations.len(), "transparent mode listening"
        );
        let out = Arc::new(crate::transparent::OutboundListener::new(
            t,
            shared.clone(),
        )?);
        tasks.push(tokio::spawn(crate::transparent::run_outbound(out_l, out)));
        let inb = Arc::new(crate::transparent::InboundListener::new(t, shared.clone()));
        tasks.push(tokio::spawn(crate::transparent::run_inbound(in_l, inb)));
    }
    tracing::info!(ops = %ops_addr, "meshid-proxy started");

    shutdown.await;
    let open = shared.tracker.open();
    tracing::info!(open, grace = ?config.drain_timeout, "draining");
    let _ = drain_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if tokio::time::timeout(config.drain_timeout, shared.tracker.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.tracker.open(),
            "grace period over; closing the remaining connections"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), follow).await;
    ops.abort();
    drop(shared);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    tracing::info!("meshid-proxy stopped");
    Ok(())
}
