//! `meshid-proxy run`: the wiring. Binds every listener before anything runs, then starts the
//! credentials ([`crate::tls::follow`]), the policy reload ([`crate::policy`]), the listeners
//! and the ops endpoint (`/healthz`, `/readyz`, `/metrics`), and drains on shutdown. What one
//! connection does is in the listeners and their base, [`crate::proxy`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meshid_policy::Policy;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::access::AccessLogger;
use crate::config::Config;
use crate::io::Tracker;
use crate::metrics::Metrics;
use crate::policy::{port_protocols, watch_policy};
use crate::proxy::{ActivePolicy, Shared};
use crate::tls::Credentials;

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
        meshid_api::server::listen_tcp(addr)
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

/// The proxy's ops endpoint ([`meshid_api::ops`]): ready while it holds an SVID and is not
/// draining.
#[derive(Clone)]
struct ProxyOps {
    creds: Arc<Credentials>,
    /// With the policy from the agent: the revision in force (0: none yet, not ready).
    central_policy: Option<Arc<std::sync::atomic::AtomicU64>>,
    drain: watch::Receiver<bool>,
    registry: Arc<prometheus_client::registry::Registry>,
}

impl meshid_api::ops::Ops for ProxyOps {
    async fn ready(&self) -> Result<(), String> {
        if *self.drain.borrow() {
            Err("draining".to_owned())
        } else if self
            .central_policy
            .as_ref()
            .is_some_and(|r| r.load(std::sync::atomic::Ordering::Acquire) == 0)
        {
            Err("no central policy from the agent yet: every inbound caller is refused".to_owned())
        } else if self.creds.ready() {
            Ok(())
        } else {
            Err(self.creds.not_ready_reason().to_owned())
        }
    }

    fn metrics(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The per-listener connection limit: the configured one, or what the open-files limit
/// allows with `listeners` listeners (each connection holds two descriptors: the accepted one
/// and the one it opens; 256 are kept aside), between 64 and 10000. A configured limit the
/// open-files limit cannot hold is kept, with a warning saying what to raise.
pub fn max_connections(configured: Option<usize>, listeners: usize) -> usize {
    let budget = meshid_api::server::open_files_limit().map(|n| {
        usize::try_from(n.saturating_sub(256) / (2 * listeners.max(1) as u64)).unwrap_or(usize::MAX)
    });
    match (configured, budget) {
        (Some(n), Some(b)) if n > b => {
            tracing::warn!(max_connections = n, listeners, open_files_allow = b, "max_connections is more than the open-files limit holds for every listener at once; raise it (LimitNOFILE=) or lower max_connections");
            n
        }
        (Some(n), _) => n,
        (None, Some(b)) => b.clamp(64, 10_000),
        (None, None) => 10_000,
    }
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
    let denials = Arc::new(crate::report::Denials::default());
    tokio::spawn(crate::report::report_loop(
        config.workload_api_socket.clone(),
        Arc::clone(&denials),
        drain.clone(),
    ));
    let listeners = config.inbound.len()
        + config.outbound.len()
        + if config.transparent.is_some() { 2 } else { 0 };
    let shared = Arc::new(Shared {
        denials,
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
        max_connections: max_connections(config.max_connections, listeners),
        max_handshakes: config.max_handshakes,
        max_handshakes_per_source: config.max_handshakes_per_source,
        idle_timeout: config.idle_timeout,
        http_header_timeout: config.http_header_timeout,
        http_max_header_bytes: config.http_max_header_bytes,
        http_max_headers: config.http_max_headers,
        http_max_requests_per_connection: config.http_max_requests_per_connection,
    });
    // Every listener full at once, two descriptors per connection (as `max_connections`
    // counts them).
    let descriptor_table = meshid_api::server::size_descriptor_table(
        u64::try_from(shared.max_connections)
            .unwrap_or(u64::MAX)
            .saturating_mul(2 * listeners.max(1) as u64),
    );
    tracing::info!(
        max_connections = shared.max_connections,
        descriptor_table,
        max_handshakes = shared.max_handshakes,
        max_handshakes_per_source = shared.max_handshakes_per_source,
        idle_timeout = ?shared.idle_timeout,
        http_header_timeout = ?shared.http_header_timeout,
        http_max_header_bytes = shared.http_max_header_bytes,
        http_max_headers = shared.http_max_headers,
        http_max_requests_per_connection = ?shared.http_max_requests_per_connection,
        "connection limits (per listener)"
    );

    tokio::spawn(crate::tls::follow_crls(
        config.workload_api_socket.clone(),
        creds.clone(),
        metrics.clone(),
        drain.clone(),
    ));
    let follow = tokio::spawn(crate::tls::follow(
        config.workload_api_socket.clone(),
        config.spiffe_id.clone(),
        creds.clone(),
        metrics.clone(),
        drain.clone(),
    ));
    let central_policy = config
        .policy_from_agent
        .then(|| Arc::new(std::sync::atomic::AtomicU64::new(0)));
    if let Some(revision) = &central_policy {
        let source = crate::policy::CentralSource::new(&config);
        crate::policy::read_back(&source, &policy, revision, &metrics);
        tokio::spawn(crate::policy::follow_policy(
            source,
            policy.clone(),
            revision.clone(),
            metrics.clone(),
            drain.clone(),
        ));
    } else if let Some(path) = &config.policy_file {
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
    let router = meshid_api::ops::router(ProxyOps {
        creds: creds.clone(),
        central_policy,
        drain: drain.clone(),
        registry,
    });
    let ops_addr = bound.ops.local_addr()?;
    let ops = tokio::spawn(async move {
        if let Err(e) = axum::serve(bound.ops, router).await {
            tracing::error!(error = %e, "ops listener failed");
        }
    });
    let mut tasks = Vec::new();
    for (l, listener) in config.inbound.iter().zip(bound.inbound) {
        tracing::info!(listener = %l.name, listen = %l.listen, forward_to = %l.forward_to, port = l.port, "inbound listening");
        let this = Arc::new(crate::proxy::InboundState {
            config: l.clone(),
            metrics: metrics.listener("inbound", &l.name),
            handshakes: crate::admission::Handshakes::new(
                shared.max_handshakes,
                shared.max_handshakes_per_source,
            ),
            pool: Arc::default(),
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
