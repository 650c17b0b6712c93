//! `meshid-ca run`: binds the admin socket, the node API and the ops listener, then serves
//! until shutdown.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind port 0 and a
//! socket in a temporary directory. Four tasks run: the admin API (gRPC on the Unix socket),
//! the node API (gRPC over TLS, [`crate::node`]), the ops HTTP listener (`/healthz`,
//! `/readyz`, `/metrics`) and the rotation check, which also announces bundle changes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::admin::AdminService;
use crate::authority::ensure_private_dir;
use crate::service::{Ca, CaEvent};

/// The listeners `run` serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The admin API socket.
    pub admin: UnixListener,
    /// The node API listener (TLS is done by the server).
    pub node: TcpListener,
    /// The node API's connection limits.
    pub node_limits: crate::node::admission::Limits,
    /// The health and metrics listener.
    pub ops: TcpListener,
    /// The bundle endpoint's listener and, for https_web, its certificate (`None`: the node
    /// API's server SVID, https_spiffe).
    pub bundle_endpoint: Option<(
        TcpListener,
        Option<Arc<crate::federation::endpoint::FileCert>>,
    )>,
    /// What federated https_web endpoints are verified against.
    pub web_roots: crate::federation::fetch::WebRoots,
    /// Where the audit trail is shipped, and how often summaries are recorded.
    pub audit: crate::audit::ship::Shipping,
    /// The web console's listener and settings, if it is on.
    pub console: Option<ConsoleListener>,
}

/// The web console's listener, settings and, for HTTPS from files, its certificate.
pub struct ConsoleListener {
    /// The listener.
    pub listener: TcpListener,
    /// `[console]`.
    pub config: crate::config::ConsoleConfig,
    /// The certificate from `cert_file` and `key_file` (`None`: the CA server's SVID).
    pub cert: Option<Arc<crate::federation::endpoint::FileCert>>,
}

impl std::fmt::Debug for ConsoleListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleListener")
            .field("listener", &self.listener)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The CA's ops endpoint ([`meshid_api::ops`]): ready while the issuing intermediate is valid
/// and the datastore answers and takes writes.
#[derive(Clone)]
pub struct CaOps {
    ca: Ca,
}

impl meshid_api::ops::Ops for CaOps {
    async fn ready(&self) -> Result<(), String> {
        let (intermediate_expiry, _) = self.ca.authority.expiries();
        if intermediate_expiry <= crate::unix_now() {
            return Err("issuing intermediate expired".to_owned());
        }
        let store = &self.ca.store;
        let check = async {
            store.audit_head().await?;
            store.probe_write().await
        };
        match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("datastore: {e}")),
            Err(_) => Err("datastore: timed out".to_owned()),
        }
    }

    fn metrics(&self) -> Result<String, std::fmt::Error> {
        let (intermediate, root) = self.ca.authority.expiries();
        self.ca.metrics.intermediate_expiry.set(intermediate);
        self.ca.metrics.root_expiry.set(root);
        let lag = &self.ca.metrics.agent_bundle_lag;
        lag.clear();
        for (agent, behind) in self.ca.delivery_lags() {
            lag.get_or_create(&crate::metrics::AgentLabels {
                agent: agent.to_string(),
            })
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
        }
        Ok(self.ca.metrics.encode())
    }
}

/// The CA's ops endpoint: what `/readyz` and `/metrics` answer.
pub fn ops(ca: Ca) -> CaOps {
    CaOps { ca }
}

/// The ops HTTP router (`/healthz`, `/readyz`, `/metrics`).
pub fn ops_router(ca: Ca) -> axum::Router {
    meshid_api::ops::router(ops(ca))
}

/// Checks rotation every `interval` until `stop` fires, and publishes
/// [`CaEvent::BundleChanged`] whenever the bundle's sequence moves (this server's rotation or
/// another server's, seen in the journal).
pub async fn rotation_loop(ca: Ca, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut sequence = ca.authority.bundle().sequence;
    let mut cleared = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        match ca.authority.rotate(SystemTime::now()).await {
            Ok(out) => {
                ca.metrics.rotations.inc_by(out.activated.len() as u64);
            }
            Err(e) => {
                ca.metrics.rotation_errors.inc();
                tracing::error!(error = %e, "rotation check failed; will retry");
            }
        }
        if let Err(e) = ca.root_auto_step().await {
            tracing::warn!(error = %e, "automatic root rotation step failed; will retry");
        }
        record_cleared_taints(&ca, &mut cleared).await;
        // CRLs: re-signed when a listed certificate expired or at half their validity; the
        // revocations of certificates expired a day ago are deleted.
        if let Err(e) = ca.refresh_crls(true).await {
            tracing::warn!(error = %e, "cannot refresh the CRLs; will retry");
        }
        if let Err(e) = ca.store.prune_revocations(crate::unix_now() - 86_400).await {
            tracing::warn!(error = %e, "cannot prune expired revocations; will retry");
        }
        let now = ca.authority.bundle().sequence;
        if now != sequence {
            sequence = now;
            tracing::info!(sequence, "trust bundle changed");
            ca.publish(CaEvent::BundleChanged);
        }
    }
}

/// Records, once per tainted key, that nothing it signed is left (`ca.key.taint_cleared`, with
/// the measured seconds from the taint to the last re-issue).
async fn record_cleared_taints(ca: &Ca, cleared: &mut std::collections::HashSet<String>) {
    let progress = match ca.authority.taint_progress().await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot measure taint progress; will retry");
            return;
        }
    };
    for p in progress {
        let Some(after) = p.cleared_after_s else {
            continue;
        };
        if !cleared.insert(p.key_id.clone()) {
            continue;
        }
        let event = crate::audit::AuditEvent::new(
            "ca.key.taint_cleared",
            format!("ca:{}", ca.authority.server_id()),
            serde_json::json!({"key_id": p.key_id, "tainted_at": p.tainted_at,
                "replaced": p.replaced, "cleared_after_s": after}),
        );
        if let Err(e) = ca.store.append_audit(&event).await {
            cleared.remove(&p.key_id);
            tracing::warn!(error = %e, "cannot record a cleared taint; will retry");
        } else {
            tracing::info!(key_id = %p.key_id, replaced = p.replaced, cleared_after_s = after, "nothing signed by the tainted key is left");
        }
    }
}

/// Checks, every [`EFFECT_CHECK`](crate::service::effect::EFFECT_CHECK), whether the
/// lifecycle steps this server took are in effect across the mesh, and records those that are
/// (see [`crate::service::effect`]).
pub async fn effect_loop(ca: Ca, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(crate::service::effect::EFFECT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        ca.check_effects().await;
    }
}

/// How often a CA server on PostgreSQL reads its peers' changes from the audit log.
pub const CHANGE_FEED_INTERVAL: Duration = Duration::from_millis(250);
/// How long the change feed waits after a notification before it reads, so that a burst of
/// commits is one read.
const CHANGE_FEED_COALESCE: Duration = Duration::from_millis(5);

/// Replays to this server's agents the entry and agent changes that *other* CA servers of the
/// trust domain made, reading them from the shared audit log, which records every change in
/// commit order. Only meaningful on PostgreSQL (several servers share one database); changes
/// this server made itself were published when they were made and are skipped.
pub async fn change_feed_loop(ca: Ca, interval: Duration, mut stop: watch::Receiver<bool>) {
    let me = ca.authority.server_id().to_owned();
    let mut last = loop {
        match ca.store.audit_head().await {
            Ok(head) => break head.map_or(0, |(seq, _)| seq),
            Err(e) => {
                tracing::warn!(error = %e, "change feed: cannot read the audit head; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal = ca.store.change_signal();
    let notified = || async {
        match &signal {
            Some(s) => s.notified().await,
            None => std::future::pending().await,
        }
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = notified() => {
                // Commits come in bursts: one read for those of the next few milliseconds.
                tokio::time::sleep(CHANGE_FEED_COALESCE).await;
            }
            _ = stop.changed() => return,
        }
        let records = match ca.store.audit_records(last, 1000).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "change feed: cannot read the audit log; will retry");
                continue;
            }
        };
        for record in records {
            last = record.seq;
            if let Err(e) = replay(&ca, &me, &record).await {
                tracing::warn!(seq = record.seq, kind = %record.kind, error = %e, "change feed: cannot replay a change; agents get it on their next resync");
            }
        }
    }
}

async fn replay(ca: &Ca, me: &str, record: &crate::audit::AuditRecord) -> anyhow::Result<()> {
    use crate::service::CaEvent;
    let details: serde_json::Value = serde_json::from_str(&record.details)?;
    let field = |name: &str| details.get(name).and_then(serde_json::Value::as_str);
    let parse_id = |s: Option<&str>| s.and_then(|s| spiffe::SpiffeId::new(s).ok());
    match record.kind.as_str() {
        "entry.created" | "entry.updated" | "entry.rotated" | "entry.deleted"
            if field("ca_server") != Some(me) =>
        {
            replay_entry(
                ca,
                &details,
                record.kind == "entry.deleted",
                parse_id(field("old_parent_id")),
            )
            .await?;
        }
        // Another server applied a mesh file: its entries have records of their own (above);
        // its policy revision, if it made one, is this one's.
        "mesh.apply"
            if field("ca_server") != Some(me)
                && details.get("policy_revision").is_some_and(|r| !r.is_null()) =>
        {
            ca.refresh_policy().await?;
        }
        "agent.rotated" if field("ca_server") != Some(me) => {
            if let Some(spiffe_id) = parse_id(field("spiffe_id")) {
                ca.publish(CaEvent::AgentRotate { spiffe_id });
            }
        }
        "ca.key.tainted" if field("ca_server") != Some(me) => {
            ca.authority.rotate(std::time::SystemTime::now()).await?;
            ca.publish(CaEvent::KeyTainted);
            if field("kind") == Some("x509_intermediate") {
                ca.publish(CaEvent::RenewAgents);
            }
            ca.publish(CaEvent::BundleChanged);
        }
        "ca.root.prepared" | "ca.root.activated" | "ca.root.retired"
            if field("ca_server") != Some(me) =>
        {
            // Another server took a root step: follow it now rather than at the next rotation
            // check (a new intermediate under an activated root), and tell our agents.
            ca.authority.rotate(std::time::SystemTime::now()).await?;
            if record.kind != "ca.root.prepared" {
                ca.publish(CaEvent::RenewAgents);
            }
            ca.publish(CaEvent::BundleChanged);
        }
        // Another server recorded a revocation: sign the CRLs of the keys this one holds.
        "svid.revoked" if field("ca_server") != Some(me) => {
            ca.refresh_crls(true).await?;
        }
        // Another server signed a CRL: serve it too.
        "ca.crl.signed" if field("ca_server") != Some(me) => {
            ca.refresh_crls(false).await?;
        }
        // Another server changed the central policy: push the new revision to our agents.
        "policy.apply" | "policy.delete" | "policy.rollback" if field("ca_server") != Some(me) => {
            ca.refresh_policy().await?;
        }
        "agent.evicted" | "agent.banned" => {
            if let Some(spiffe_id) = parse_id(field("spiffe_id")) {
                ca.publish(CaEvent::AgentRemoved { spiffe_id });
            }
        }
        _ => {}
    }
    Ok(())
}

/// Tells this server's agents about an entry another server changed (`details` names it, as
/// `entry_id`, with its `parent_id`); the current state decides: an entry updated and then
/// deleted is a deletion.
async fn replay_entry(
    ca: &Ca,
    details: &serde_json::Value,
    deleted: bool,
    old_parent: Option<spiffe::SpiffeId>,
) -> anyhow::Result<()> {
    use crate::service::CaEvent;
    let field = |name: &str| details.get(name).and_then(serde_json::Value::as_str);
    let id: crate::entry::EntryId = field("entry_id").unwrap_or_default().parse()?;
    match ca.store.get_entry(&id).await? {
        Some(entry) if !deleted => ca.publish(CaEvent::EntryUpserted {
            entry: Arc::new(entry),
            old_parent,
        }),
        Some(_) => {}
        None => {
            let parent = field("parent_id").and_then(|s| spiffe::SpiffeId::new(s).ok());
            if let Some(parent) = old_parent.or(parent) {
                ca.publish(CaEvent::EntryDeleted { id, parent });
            }
        }
    }
    Ok(())
}

/// Serves the admin API, the node API, the ops listener and the rotation check until
/// `shutdown` completes, then stops accepting and lets in-flight calls finish (the node API's
/// sync streams end).
pub async fn run(
    ca: Ca,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let interval = ca.authority.settings().rotation_interval;
    let rotation = tokio::spawn(rotation_loop(ca.clone(), interval, stop_rx.clone()));
    let effects = tokio::spawn(effect_loop(ca.clone(), stop_rx.clone()));
    let feed = (ca.store.backend() == "postgres").then(|| {
        tokio::spawn(change_feed_loop(
            ca.clone(),
            CHANGE_FEED_INTERVAL,
            stop_rx.clone(),
        ))
    });

    let summary_interval = if listeners.audit.summary_interval.is_zero() {
        Duration::from_secs(60)
    } else {
        listeners.audit.summary_interval
    };
    // The audit tasks stop last, each on its own signal: the summary of the servers' last
    // calls is recorded after they have finished, and shipped after it is recorded.
    let (summary_stop, summary_rx) = watch::channel(false);
    let (ship_stop, ship_rx) = watch::channel(false);
    let summaries = tokio::spawn(crate::audit::ship::summary_loop(
        ca.clone(),
        summary_interval,
        summary_rx,
    ));

    let server_cert = Arc::new(meshid_api::tls::RotatingCert::new());
    let console = listeners.console.map(|c| {
        let console = crate::console::Console::new(ca.clone(), &c.config);
        let transport = match (c.config.tls(), c.cert) {
            (false, _) => crate::console::Transport::Plain,
            (true, Some(file)) => crate::console::Transport::Https(file),
            (true, None) => crate::console::Transport::Https(
                Arc::clone(&server_cert) as Arc<dyn rustls::server::ResolvesServerCert>
            ),
        };
        let serving = crate::console::serve(
            Arc::clone(&console),
            c.listener,
            transport,
            stop_rx.clone(),
        );
        let task = tokio::spawn(async move {
            let result = serving.await;
            if let Err(e) = &result {
                tracing::error!(error = %format!("{e:#}"), "the console stopped; the CA serves on without it");
            }
            result
        });
        (console, task)
    });

    let mut admin_stop = stop_rx.clone();
    let counts = Arc::clone(&ca.audit_counts);
    let admin = tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(move |inner| {
            crate::admin::CountReads::new(inner, Arc::clone(&counts))
        }))
        .add_routes(
            AdminService::new(ca.clone())
                .with_console(console.as_ref().map(|(c, _)| Arc::clone(c)))
                .routes(),
        )
        .serve_with_incoming_shutdown(meshid_api::uds::incoming(listeners.admin), async move {
            let _ = admin_stop.changed().await;
        });
    let admin = tokio::spawn(admin);

    let mut node_stop = stop_rx.clone();
    let node = tokio::spawn(crate::node::serve(
        ca.clone(),
        listeners.node,
        listeners.node_limits,
        Arc::clone(&server_cert),
        async move {
            let _ = node_stop.changed().await;
        },
    ));
    let federation = tokio::spawn(crate::federation::refresh::refresh_loop(
        ca.clone(),
        listeners.web_roots,
        stop_rx.clone(),
    ));
    let bundle_endpoint = listeners.bundle_endpoint.map(|(listener, web)| {
        let certs: Arc<dyn rustls::server::ResolvesServerCert> = match web {
            Some(file) => file,
            None => server_cert,
        };
        tokio::spawn(crate::federation::endpoint::serve(
            ca.clone(),
            listener,
            certs,
            stop_rx.clone(),
        ))
    });

    let shipper = tokio::spawn(crate::audit::ship::ship_loop(
        ca.clone(),
        listeners.audit,
        ship_rx,
    ));

    let mut ops_stop = stop_rx;
    let ops = axum::serve(listeners.ops, ops_router(ca)).with_graceful_shutdown(async move {
        let _ = ops_stop.changed().await;
    });
    let ops = tokio::spawn(async move { ops.await });

    tracing::info!("meshid-ca serving");
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = rotation.await;
    let _ = effects.await;
    let _ = federation.await;
    if let Some(endpoint) = bundle_endpoint {
        if let Ok(Err(e)) = endpoint.await {
            tracing::warn!(error = %format!("{e:#}"), "the bundle endpoint stopped with an error");
        }
    }
    if let Some(feed) = feed {
        let _ = feed.await;
    }
    if let Some((_, task)) = console {
        let _ = task.await;
    }
    let admin_result = admin.await;
    let node_result = node.await;
    // After the servers: the summary of their last calls, then everything shipped.
    let _ = summary_stop.send(true);
    let _ = summaries.await;
    let _ = ship_stop.send(true);
    let _ = shipper.await;
    let ops_result = ops.await;
    admin_result??;
    node_result??;
    ops_result??;
    Ok(())
}

/// Everything `meshid-ca run` builds from a config before binding.
pub async fn build(config: &crate::config::Config) -> anyhow::Result<Ca> {
    use anyhow::Context;
    ensure_private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let store: Arc<dyn crate::store::Datastore> = Arc::new(
        crate::store::sql::SqlStore::open(config.datastore.as_str())
            .await
            .with_context(|| {
                format!(
                    "cannot open datastore {}",
                    crate::config::redact_url(config.datastore.as_str())
                )
            })?,
    );
    let authority = crate::authority::Authority::load_or_init(
        config.trust_domain.clone(),
        config.server_id.clone(),
        config.ca.clone(),
        &config.data_dir,
        Arc::clone(&store),
    )
    .await
    .context("cannot load or create the CA keys")?;
    let mut ca = Ca::new(
        Arc::new(authority),
        store,
        Arc::new(crate::metrics::Metrics::new()),
        config.join_token_ttl,
    );
    ca.agent_svid_overlap = config.agent_svid_overlap;
    ca.ci = Arc::new(
        crate::ci::state::CiState::new(&config.ci_issuers)
            .context("cannot load the roots of a CI issuer's JWKS")?,
    );
    ca.refresh_policy()
        .await
        .context("cannot read the central policy")?;
    Ok(ca)
}
