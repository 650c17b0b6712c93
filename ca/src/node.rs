//! The node API: what agents call, over TLS, on `node_address`.
//!
//! The CA presents an X509-SVID for `spiffe://<td>/meshid/server`, issued from its own
//! intermediate, held in a [`RotatingCert`] and renewed at half-life. Client certificates are
//! path-validated against the trust bundle's roots; the server configuration is rebuilt when the
//! bundle changes, and each accepted connection takes the newest one. A client without a
//! certificate completes the handshake so that it can call `AttestJoinToken`; every other call
//! needs an agent SVID whose SPIFFE ID (`spiffe://<td>/meshid/agent/...`) names an attested,
//! unbanned agent, checked on every call ([`NodeService`]).
//!
//! `Sync` streams the agent's entries and the bundle: first the full state, then one update per
//! burst of changes, pushed from [`Ca::events`] (no polling). A stream that falls behind gets
//! the full state again. A stream ends with `PermissionDenied` when its agent is evicted or
//! banned, with `Unauthenticated` when the SVID the connection was made with expires (agents
//! reconnect after renewing), and cleanly when the server shuts down.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use meshid_api::node::{self, node_server::NodeServer};
use meshid_api::tls::{self, PeerBundles, RotatingCert, SvidVerifier};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};

use crate::audit::AuditEvent;
use crate::bundle::TrustBundle;
use crate::entry::EntryId;
use crate::entry::{EntrySpec, RegistrationEntry};
use crate::service::{Ca, CaEvent, ServiceError};
use crate::store::StoreError;
use crate::svid::IssuedSvid;

pub mod admission;
use admission::{Admission, Limits, NodeConn};

pub use meshid_api::role::{AGENT_PATH_PREFIX, SERVER_PATH};
/// Most requests in one `BatchSignX509` call.
pub const MAX_BATCH: usize = 500;
/// Lifetime of the CA server's own SVID (capped at the intermediate's remaining life).
pub const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);
/// Retry delay after a failed renewal of the server SVID.
const RETRY: Duration = Duration::from_secs(5);
/// How long in-flight calls may take to finish at shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Most events merged into one sync update.
const MAX_COALESCE: usize = 1024;

/// Errors of node API calls. Mapped to the wire in one place, `From<NodeError> for Status`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The caller may not make this call; the message says why.
    #[error("{0}")]
    Denied(String),
    /// A request field is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The agent asked for more than its rate allows.
    #[error("rate exceeded; retry in {retry_after:?}")]
    RateLimited {
        /// When one more is allowed.
        retry_after: std::time::Duration,
    },
    /// The CA refused or failed.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Denied(msg) => Status::permission_denied(msg),
            NodeError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            NodeError::RateLimited { .. } => Status::resource_exhausted(e.to_string()),
            NodeError::Service(e) => e.into(),
        }
    }
}

/// The CA server's SPIFFE ID.
pub fn server_id(ca: &Ca) -> Result<SpiffeId, NodeError> {
    let td = ca.authority.trust_domain();
    crate::entry::parse_id("server id", &format!("spiffe://{td}{SERVER_PATH}"), td)
        .map_err(|e| NodeError::Service(e.into()))
}

/// The bundle as the node API sends it.
pub fn bundle_to_proto(b: &TrustBundle) -> node::Bundle {
    node::Bundle {
        trust_domain: b.trust_domain.to_string(),
        x509_authorities: b.x509_authorities.iter().map(|c| c.to_vec()).collect(),
        jwt_authorities_json: serde_json::json!({ "keys": b.jwt_authorities }).to_string(),
        sequence: b.sequence,
        refresh_hint: b.refresh_hint.as_secs(),
    }
}

/// An entry as the node API sends it.
pub fn entry_to_proto(e: &RegistrationEntry) -> node::Entry {
    let spec = EntrySpec::from(e);
    node::Entry {
        id: e.id.to_string(),
        spiffe_id: spec.spiffe_id,
        parent_id: spec.parent_id,
        selectors: spec.selectors,
        x509_svid_ttl: spec.x509_svid_ttl,
        jwt_svid_ttl: spec.jwt_svid_ttl,
        dns_names: spec.dns_names,
        federates_with: spec.federates_with,
        admin: spec.admin,
        hint: spec.hint,
        revision: e.revision,
    }
}

/// Resolves when `stop` turns true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Issues a fresh server SVID into `cert` and records it; returns when to renew it.
async fn renew_server_svid(ca: &Ca, cert: &RotatingCert) -> anyhow::Result<tokio::time::Instant> {
    let id = server_id(ca)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate the server key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("cannot build the server CSR")?;
    let svid: IssuedSvid = ca.authority.sign_role_svid(
        csr.der(),
        &id,
        Some(SERVER_SVID_TTL),
        meshid_api::role::Role::Server,
    )?;
    let actor = format!("ca:{}", ca.authority.server_id());
    let event = AuditEvent::new(
        "svid.x509.server",
        &actor,
        serde_json::json!({
            "serial": svid.serial,
            "spiffe_id": id.to_string(),
            "not_after": svid.not_after,
            "issuer": svid.issuer,
        }),
    );
    ca.store.append_audit(&event).await?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    cert.set(svid.chain.clone(), key)?;
    tracing::info!(spiffe_id = %id, serial = %svid.serial, not_after = svid.not_after, "node API server SVID issued");
    let half_life = (svid.not_after - svid.not_before).max(2) / 2;
    let wait = (svid.not_before + half_life - crate::unix_now()).max(1);
    Ok(tokio::time::Instant::now() + Duration::from_secs(wait.unsigned_abs()))
}

/// The TLS identity and configuration of the node API.
struct ServerTls {
    cert: Arc<RotatingCert>,
    config: ArcSwap<ServerConfig>,
}

/// The node API's server configuration: our SVID, and agents' SVIDs verified by meshid-api's
/// one verifier against the bundle's roots. A client certificate is optional (an agent attests
/// before it has one); whom a certificate may call is [`NodeApi::authorize`]'s business.
fn server_config(cert: &Arc<RotatingCert>, bundle: &TrustBundle) -> anyhow::Result<ServerConfig> {
    let bundles =
        PeerBundles::from_roots([(bundle.trust_domain.clone(), bundle.x509_authorities.clone())])?;
    Ok(tls::server_config(
        Arc::clone(cert) as Arc<dyn rustls::server::ResolvesServerCert>,
        Arc::new(SvidVerifier::with_bundles(bundles)),
        false,
    )?)
}

/// Renews the server SVID at half-life and rebuilds the server configuration when the bundle
/// changes, until `stop`.
async fn maintain_identity(
    ca: Ca,
    tls: Arc<ServerTls>,
    mut renew_at: tokio::time::Instant,
    mut sequence: u64,
    mut events: broadcast::Receiver<CaEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let refresh = tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep_until(renew_at) => {
                renew_at = match renew_server_svid(&ca, &tls.cert).await {
                    Ok(at) => at,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "cannot renew the node API server SVID; will retry");
                        tokio::time::Instant::now() + RETRY
                    }
                };
                false
            }
            ev = events.recv() => match ev {
                Ok(CaEvent::RenewAgents) => {
                    // Our own SVID too chains to the new root from now on.
                    renew_at = tokio::time::Instant::now();
                    false
                }
                Ok(CaEvent::BundleChanged) | Err(RecvError::Lagged(_)) => true,
                Ok(_) => false,
                Err(RecvError::Closed) => return,
            },
        };
        if !refresh {
            continue;
        }
        let bundle = ca.authority.bundle();
        if bundle.sequence == sequence {
            continue;
        }
        match server_config(&tls.cert, &bundle) {
            Ok(config) => {
                tls.config.store(Arc::new(config));
                sequence = bundle.sequence;
                tracing::info!(sequence, "node API client roots refreshed");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot rebuild the node API TLS configuration; keeping the previous one");
            }
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes off the accept loop under the
/// [`admission`] limits, handing finished connections to the gRPC server. Failed or slow
/// handshakes are counted and logged at debug.
async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    admission: Arc<Admission>,
    conns: mpsc::Sender<NodeConn>,
    mut stop: watch::Receiver<bool>,
) {
    let accept_failures = meshid_api::uds::admission::RateLimitedLog::default();
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin, and say so
                // at most once a second.
                accept_failures.info(|suppressed| {
                    tracing::warn!(error = %e, failed_since_last_line = suppressed, "node API accept failed");
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut pending = match admission.begin(peer.ip()) {
            Ok(p) => p,
            Err(reason) => {
                tracing::debug!(%peer, reason, "node API connection refused by the connection limits");
                continue;
            }
        };
        let config = tls.config.load_full();
        let conns = conns.clone();
        let admission = Arc::clone(&admission);
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let limits = admission.limits().clone();
            let handshake = async {
                let started = tokio::time::Instant::now();
                let hello = tokio::time::timeout(
                    limits.client_hello_timeout,
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp),
                )
                .await
                .map_err(|_| "hello_timeout")?
                .map_err(|_| "handshake_failed")?;
                tokio::time::timeout_at(
                    started + limits.handshake_timeout,
                    hello.into_stream(config),
                )
                .await
                .map_err(|_| "handshake_timeout")?
                .map_err(|e| {
                    // Why, as the proxy labels it: a refused client certificate names the
                    // X509-SVID rule it broke.
                    tracing::debug!(%peer, reason = tls::verify::io_failure_reason(&e), error = %e, "node API client refused in the handshake");
                    "handshake_failed"
                })
            };
            let result = tokio::select! {
                r = handshake => r,
                () = pending.shed() => Err("shed"),
            };
            match result {
                Ok(stream) => {
                    admission.handshake_done(tls::kx_group_name(stream.get_ref().1));
                    match pending.open() {
                        Ok(open) => {
                            let _ = conns.send(NodeConn::new(stream, open)).await;
                        }
                        Err(reason) => {
                            tracing::debug!(%peer, reason, "node API connection refused by the connection limits");
                        }
                    }
                }
                Err(reason) => {
                    admission.handshake_failed();
                    if reason == "hello_timeout" {
                        admission.limited(reason);
                    }
                    tracing::debug!(%peer, reason, "node API TLS handshake failed");
                }
            }
        });
    }
}

/// Serves the node API on `listener` until `shutdown` completes; then stops accepting, ends
/// the sync streams and lets in-flight calls finish (for at most a few seconds). Fails at
/// once if the server SVID cannot be issued. The server SVID is kept in `cert` (empty until
/// then), which the bundle endpoint (https_spiffe) presents too.
pub async fn serve(
    ca: Ca,
    listener: TcpListener,
    limits: Limits,
    cert: Arc<RotatingCert>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Subscribe before reading the bundle, so no change falls in between.
    let events = ca.events.subscribe();
    let renew_at = renew_server_svid(&ca, &cert)
        .await
        .context("cannot issue the node API server SVID")?;
    let bundle = ca.authority.bundle();
    let tls = Arc::new(ServerTls {
        config: ArcSwap::from_pointee(server_config(&cert, &bundle)?),
        cert,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let identity = tokio::spawn(maintain_identity(
        ca.clone(),
        Arc::clone(&tls),
        renew_at,
        bundle.sequence,
        events,
        stop_rx.clone(),
    ));
    let (conn_tx, conn_rx) = mpsc::channel(64);
    let address = listener.local_addr().ok();
    let admission = Admission::new(limits, Arc::clone(&ca.metrics));
    let acceptor = tokio::spawn(accept_loop(
        listener,
        tls,
        admission,
        conn_tx,
        stop_rx.clone(),
    ));
    let mut server_stop = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(NodeServer::new(NodeService::new(ca, stop_rx)))
        .serve_with_incoming_shutdown(
            ReceiverStream::new(conn_rx).map(Ok::<_, std::io::Error>),
            async move { stopped(&mut server_stop).await },
        );
    let mut server = tokio::spawn(server);
    tracing::info!(address = ?address, "node API serving");
    let early = tokio::select! {
        r = &mut server => Some(r),
        _ = shutdown => None,
    };
    let _ = stop_tx.send(true);
    let _ = acceptor.await;
    let _ = identity.await;
    let result = match early {
        Some(r) => r,
        None => match tokio::time::timeout(DRAIN_GRACE, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("node API calls did not finish in time; closing them");
                server.abort();
                return Ok(());
            }
        },
    };
    result.context("node API server task failed")??;
    Ok(())
}

/// The authenticated caller of a node API call.
#[derive(Debug, Clone)]
struct Caller {
    id: SpiffeId,
    /// notAfter of the certificate the connection was made with.
    not_after: i64,
    /// Its serial, lowercase hex.
    serial: String,
}

/// The node API over a [`Ca`].
#[derive(Debug, Clone)]
pub struct NodeService {
    ca: Ca,
    stop: watch::Receiver<bool>,
    /// JWT-SVID mints per agent (each agent also limits each of its workloads).
    jwt_mints: Arc<meshid_api::limits::RateLimiter<SpiffeId>>,
    /// Denial reports per agent (each is an audit write): one a second, bursts of two.
    denial_reports: Arc<meshid_api::limits::RateLimiter<SpiffeId>>,
}

/// JWT-SVID mints one agent may ask for per second, on average...
pub const AGENT_JWT_MINTS_PER_SECOND: u32 = 500;
/// ...and at once.
pub const AGENT_JWT_MINT_BURST: u32 = 1000;

type Rpc<T> = Result<Response<T>, Status>;

impl NodeService {
    /// Wraps a CA; sync streams end when `stop` turns true.
    pub fn new(ca: Ca, stop: watch::Receiver<bool>) -> Self {
        Self {
            ca,
            stop,
            jwt_mints: Arc::new(meshid_api::limits::RateLimiter::new(
                AGENT_JWT_MINTS_PER_SECOND,
                AGENT_JWT_MINT_BURST,
            )),
            denial_reports: Arc::new(meshid_api::limits::RateLimiter::new(1, 2)),
        }
    }

    fn deny(&self, rpc: &'static str, caller: &str, reason: String) -> NodeError {
        self.ca.metrics.node_denied.inc();
        self.ca.audit_counts.add(
            crate::audit::summary::Kind::NodeRefused,
            caller,
            &format!("{rpc}: {reason}"),
        );
        tracing::warn!(rpc, caller = %caller, reason = %reason, "node API call refused");
        NodeError::Denied(reason)
    }

    /// The caller's agent identity: a client certificate (verified by the handshake) whose
    /// SPIFFE ID is an agent ID of this trust domain, still valid, naming an attested, unbanned
    /// agent.
    async fn authorize<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Caller, NodeError> {
        let certs = req.peer_certs();
        let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
            return Err(self.deny(
                rpc,
                "<no client certificate>",
                "this call needs a client certificate: the agent SVID from AttestJoinToken"
                    .to_owned(),
            ));
        };
        // The handshake verified the chain and the leaf rules; this reads what it verified,
        // from one parse of the leaf.
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| self.deny(rpc, "<unidentified>", format!("client certificate: {e}")))?;
        let id = tls::verify::spiffe_id_of_parsed(&cert)
            .map_err(|e| self.deny(rpc, "<unidentified>", format!("client certificate: {e}")))?;
        let td = self.ca.authority.trust_domain();
        if !id.is_member_of(td) || !meshid_api::role::Role::Agent.claimed_by(&id) {
            return Err(self.deny(
                rpc,
                &id.to_string(),
                format!("{id} is not an agent identity (spiffe://{td}{AGENT_PATH_PREFIX}...)"),
            ));
        }
        let not_after = cert.validity().not_after.timestamp();
        let serial = hex::encode(cert.tbs_certificate.raw_serial());
        let marked = meshid_api::role::Role::Agent.marks_parsed(&cert);
        if not_after <= crate::unix_now() {
            return Err(self.deny(
                rpc,
                &id.to_string(),
                format!("the SVID of {id} expired at {not_after}; reconnect with the renewed one"),
            ));
        }
        if self.ca.authority.crls().serials.contains(&serial) {
            return Err(self.deny(
                rpc,
                &id.to_string(),
                format!("the SVID of {id} (serial {serial}) is revoked (meshid-ca svid revoke): attest again with a new join token"),
            ));
        }
        // Only an SVID the CA issued to an agent carries the agent mark (`marked`). One from
        // before the marks is taken only while it is the agent's current SVID (its serial is
        // on record).
        match self.ca.check_agent_svid(&id, &serial).await {
            Ok(record) if !marked && record.serial != serial => Err(self.deny(
                rpc,
                &id.to_string(),
                format!("{id}: this certificate is not an agent SVID (it lacks the agent mark)"),
            )),
            Ok(_) => Ok(Caller {
                id,
                not_after,
                serial,
            }),
            Err(e @ ServiceError::AgentDenied { .. }) => {
                Err(self.deny(rpc, &id.to_string(), e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn agent_svid(&self, id: &SpiffeId, svid: &IssuedSvid) -> node::AgentSvid {
        node::AgentSvid {
            spiffe_id: id.to_string(),
            chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
            expires_at: svid.not_after,
            bundle: Some(bundle_to_proto(&self.ca.authority.bundle())),
        }
    }

    /// The complete state for an agent: its entries and the bundle.
    async fn full_state(&self, agent: &SpiffeId) -> Result<node::SyncUpdate, NodeError> {
        let entries = self
            .ca
            .store
            .list_entries_by_parent(agent)
            .await
            .map_err(ServiceError::from)?;
        Ok(node::SyncUpdate {
            full: true,
            upserts: entries.iter().map(entry_to_proto).collect(),
            deleted_ids: Vec::new(),
            bundle: Some(bundle_to_proto(&self.ca.authority.bundle())),
            renew_agent_svid: false,
            crl_set: true,
            crls: crl_list(&self.ca),
            federated_set: true,
            federated_bundles: federated_list(&self.ca),
            ..policy_update(&self.ca, taint_update(&self.ca))
        })
    }

    /// Sends `item` unless the client went away or the server is stopping.
    async fn send(
        &self,
        tx: &mpsc::Sender<Result<node::SyncUpdate, Status>>,
        item: Result<node::SyncUpdate, Status>,
    ) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            r = tx.send(item) => r.is_ok(),
            _ = stopped(&mut stop) => false,
        }
    }

    /// Pushes changes to one agent until it goes away, is removed, its SVID expires, or the
    /// server stops.
    async fn sync_loop(
        self,
        caller: Caller,
        mut events: broadcast::Receiver<CaEvent>,
        tx: mpsc::Sender<Result<node::SyncUpdate, Status>>,
    ) {
        let mut stop = self.stop.clone();
        let left = u64::try_from(caller.not_after - crate::unix_now()).unwrap_or(0);
        let mut expiry = tokio::time::Instant::now() + Duration::from_secs(left);
        loop {
            let first = tokio::select! {
                _ = tx.closed() => return,
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep_until(expiry) => {
                    tracing::info!(caller = %caller.id, "agent SVID expired; ending its sync stream");
                    let status = Status::unauthenticated(format!(
                        "the SVID of {} expired; reconnect with the renewed one",
                        caller.id
                    ));
                    self.send(&tx, Err(status)).await;
                    return;
                }
                ev = events.recv() => ev,
            };
            let mut pending = Pending::default();
            let mut resync = false;
            let mut next = Some(first);
            let mut merged = 0;
            while let Some(ev) = next.take() {
                match ev {
                    Ok(ev) => {
                        let applied = pending.apply(ev, &caller);
                        if applied == Applied::Superseded {
                            // Its SVID was renewed: this stream ends after the overlap.
                            expiry = expiry
                                .min(tokio::time::Instant::now() + self.ca.agent_svid_overlap);
                        }
                        if applied == Applied::AgentRemoved {
                            tracing::info!(caller = %caller.id, "agent evicted or banned; ending its sync stream");
                            let status = Status::permission_denied(format!(
                                "agent {} was evicted or banned",
                                caller.id
                            ));
                            self.send(&tx, Err(status)).await;
                            return;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(caller = %caller.id, missed, "sync stream fell behind; resending the full state");
                        resync = true;
                    }
                    Err(RecvError::Closed) => return,
                }
                merged += 1;
                if merged >= MAX_COALESCE {
                    break;
                }
                next = match events.try_recv() {
                    Ok(ev) => Some(Ok(ev)),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                    Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                };
            }
            let update = if resync {
                // A fresh receiver sees only what happens from now on; the state read after it
                // includes everything before, and replaying later events on top converges.
                events = self.ca.events.subscribe();
                let state = match self.ca.check_agent(&caller.id).await {
                    Ok(_) => self.full_state(&caller.id).await,
                    Err(e) => Err(NodeError::from(e)),
                };
                match state {
                    Ok(update) => update,
                    Err(e) => {
                        self.send(&tx, Err(e.into())).await;
                        return;
                    }
                }
            } else if pending.is_empty() {
                continue;
            } else {
                pending.into_update(&self.ca)
            };
            if !self.send(&tx, Ok(update)).await {
                return;
            }
        }
    }
}

/// Changes for one agent, merged from a burst of events.
#[derive(Debug, Default)]
struct Pending {
    upserts: BTreeMap<String, node::Entry>,
    deleted: BTreeSet<String>,
    bundle: bool,
    /// The operator asked this agent to renew its own SVID now.
    renew: bool,
    /// A key was tainted: send the tainted set.
    taint: bool,
    /// The CRLs changed: send them all.
    crls: bool,
    /// The central policy has a new revision: send it.
    policy: bool,
    /// The federated bundles changed: send them all.
    federated: bool,
}

/// Every federated bundle in force.
fn federated_list(ca: &Ca) -> Vec<node::Bundle> {
    ca.federation
        .bundles()
        .values()
        .map(|b| bundle_to_proto(b))
        .collect()
}

/// Every CRL served, DER.
fn crl_list(ca: &Ca) -> Vec<Vec<u8>> {
    ca.authority
        .crls()
        .records
        .iter()
        .map(|c| c.der.clone())
        .collect()
}

/// A sync update carrying only the complete set of tainted keys.
/// `update` with the central policy in force set on it.
fn policy_update(ca: &Ca, update: node::SyncUpdate) -> node::SyncUpdate {
    let head = ca.policy_in_force();
    node::SyncUpdate {
        policy_set: true,
        policy_revision: head.as_ref().map_or(0, |h| h.revision),
        policy: head
            .iter()
            .flat_map(|h| h.documents.iter())
            .map(|(name, text)| node::PolicyDocument {
                name: name.clone(),
                text: text.clone(),
            })
            .collect(),
        ..update
    }
}

fn taint_update(ca: &Ca) -> node::SyncUpdate {
    let (x509, jwt) = ca.authority.tainted_keys();
    node::SyncUpdate {
        taint_set: true,
        tainted_x509_authorities: x509.into_iter().map(|c| c.to_vec()).collect(),
        tainted_jwt_key_ids: jwt,
        ..Default::default()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Merged,
    AgentRemoved,
    /// The agent renewed: the SVID of this stream is superseded.
    Superseded,
}

impl Pending {
    fn apply(&mut self, event: CaEvent, caller: &Caller) -> Applied {
        let agent = &caller.id;
        match event {
            CaEvent::EntryUpserted { entry, old_parent } => {
                let id = entry.id.to_string();
                if entry.parent_id == *agent {
                    self.deleted.remove(&id);
                    self.upserts.insert(id, entry_to_proto(&entry));
                } else if old_parent.as_ref() == Some(agent) {
                    self.upserts.remove(&id);
                    self.deleted.insert(id);
                }
            }
            CaEvent::EntryDeleted { id, parent } => {
                if parent == *agent {
                    let id = id.to_string();
                    self.upserts.remove(&id);
                    self.deleted.insert(id);
                }
            }
            CaEvent::BundleChanged => self.bundle = true,
            CaEvent::AgentRemoved { spiffe_id } => {
                if spiffe_id == *agent {
                    return Applied::AgentRemoved;
                }
            }
            CaEvent::AgentRotate { spiffe_id } => {
                if spiffe_id == *agent {
                    self.renew = true;
                }
            }
            CaEvent::RenewAgents => self.renew = true,
            CaEvent::KeyTainted => self.taint = true,
            CaEvent::CrlsChanged => self.crls = true,
            CaEvent::PolicyChanged => self.policy = true,
            CaEvent::FederationChanged => self.federated = true,
            CaEvent::AgentRenewed { spiffe_id, serial } => {
                if spiffe_id == caller.id && serial != caller.serial {
                    return Applied::Superseded;
                }
            }
        }
        Applied::Merged
    }

    fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.deleted.is_empty()
            && !self.bundle
            && !self.renew
            && !self.taint
            && !self.crls
            && !self.policy
            && !self.federated
    }

    fn into_update(self, ca: &Ca) -> node::SyncUpdate {
        let rest = if self.taint {
            taint_update(ca)
        } else {
            node::SyncUpdate::default()
        };
        let rest = if self.policy {
            policy_update(ca, rest)
        } else {
            rest
        };
        node::SyncUpdate {
            full: false,
            upserts: self.upserts.into_values().collect(),
            deleted_ids: self.deleted.into_iter().collect(),
            bundle: self.bundle.then(|| bundle_to_proto(&ca.authority.bundle())),
            renew_agent_svid: self.renew,
            crl_set: self.crls,
            crls: if self.crls { crl_list(ca) } else { Vec::new() },
            federated_set: self.federated,
            federated_bundles: if self.federated {
                federated_list(ca)
            } else {
                Vec::new()
            },
            ..rest
        }
    }
}

#[tonic::async_trait]
impl node::node_server::Node for NodeService {
    async fn report_delivery(
        &self,
        req: Request<node::DeliveryReport>,
    ) -> Rpc<node::DeliveryReportResponse> {
        let caller = self.authorize(&req, "ReportDelivery").await?;
        let r = req.into_inner();
        // A digest as set_digest writes it (32 lowercase hex), or empty.
        if r.crl_digest.len() > 64
            || !r
                .crl_digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(NodeError::InvalidArgument {
                field: "crl_digest",
                reason: "not a CRL set digest (lowercase hex, at most 64 characters)".into(),
            }
            .into());
        }
        self.ca
            .record_delivery(
                &caller.id,
                r.bundle_sequence,
                u64::from(r.x509_streams),
                &r.crl_digest,
                r.policy_revision,
            )
            .await
            .map_err(NodeError::from)?;
        Ok(Response::new(node::DeliveryReportResponse {}))
    }

    async fn report_denials(
        &self,
        req: Request<node::NodeDenialReport>,
    ) -> Rpc<node::NodeDenialReportResponse> {
        let caller = self.authorize(&req, "ReportDenials").await?;
        if let Err(retry_after) = self
            .denial_reports
            .take(&caller.id, std::time::Instant::now())
        {
            tracing::warn!(caller = %caller.id, "refused: denial reports faster than one a second");
            return Err(NodeError::RateLimited { retry_after }.into());
        }
        let r = req.into_inner();
        let invalid = |reason: String| NodeError::InvalidArgument {
            field: "denials",
            reason,
        };
        meshid_api::denials::check_report(
            r.denials
                .iter()
                .map(|d| (&*d.caller, &*d.callee, &*d.rule, d.count)),
        )
        .map_err(|e| invalid(e.to_string()))?;
        let counts = r
            .denials
            .into_iter()
            .map(|d| {
                let key = meshid_api::denials::Key {
                    caller: d.caller,
                    callee: d.callee,
                    rule: d.rule,
                };
                (key, d.count, d.last_at)
            })
            .collect();
        self.ca
            .record_denials(&caller.id, counts)
            .await
            .map_err(NodeError::from)?;
        Ok(Response::new(node::NodeDenialReportResponse {}))
    }

    async fn attest_join_token(
        &self,
        req: Request<node::AttestJoinTokenRequest>,
    ) -> Rpc<node::AgentSvid> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        match self.ca.attest_join_token(&r.token, &r.csr).await {
            Ok((record, svid)) => Ok(Response::new(self.agent_svid(&record.spiffe_id, &svid))),
            Err(e) => {
                if matches!(
                    e,
                    ServiceError::Store(StoreError::TokenRejected)
                        | ServiceError::AgentDenied { .. }
                ) {
                    // A refusal (not an outage, which is no one's doing): counted into the
                    // audit summary by the address it came from.
                    self.ca.metrics.node_denied.inc();
                    let from = peer.map_or_else(|| "<unknown>".to_owned(), |p| p.ip().to_string());
                    self.ca.audit_counts.add(
                        crate::audit::summary::Kind::NodeRefused,
                        &from,
                        &format!("AttestJoinToken: {e}"),
                    );
                }
                tracing::warn!(peer = ?peer, error = %e, "node attestation refused");
                Err(NodeError::from(e).into())
            }
        }
    }

    async fn renew_agent(&self, req: Request<node::RenewAgentRequest>) -> Rpc<node::AgentSvid> {
        let caller = self.authorize(&req, "RenewAgent").await?;
        let csr = req.into_inner().csr;
        let (record, svid) = self
            .ca
            .renew_agent(&caller.id, &csr)
            .await
            .map_err(NodeError::from)?;
        Ok(Response::new(self.agent_svid(&record.spiffe_id, &svid)))
    }

    type SyncStream = ReceiverStream<Result<node::SyncUpdate, Status>>;

    async fn sync(&self, req: Request<node::SyncRequest>) -> Rpc<Self::SyncStream> {
        // Subscribe before checking the agent and reading the state, so that no change (an
        // eviction included) falls in between.
        let events = self.ca.events.subscribe();
        let caller = self.authorize(&req, "Sync").await?;
        let first = self.full_state(&caller.id).await?;
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(first))
            .map_err(|_| Status::internal("sync stream channel is full"))?;
        tracing::debug!(caller = %caller.id, "sync stream opened");
        tokio::spawn(self.clone().sync_loop(caller, events, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn batch_sign_x509(
        &self,
        req: Request<node::BatchSignX509Request>,
    ) -> Rpc<node::BatchSignX509Response> {
        let caller = self.authorize(&req, "BatchSignX509").await?;
        let requests = req.into_inner().requests;
        if requests.len() > MAX_BATCH {
            return Err(NodeError::InvalidArgument {
                field: "requests",
                reason: format!(
                    "{} requests; send at most {MAX_BATCH} per call",
                    requests.len()
                ),
            }
            .into());
        }
        // Look up only the requested entries (one query), never the agent's whole set.
        let ids: Vec<EntryId> = requests
            .iter()
            .filter_map(|r| r.entry_id.parse().ok())
            .collect();
        let found: std::collections::HashMap<String, RegistrationEntry> = self
            .ca
            .store
            .get_entries(&ids)
            .await
            .map_err(|e| NodeError::from(ServiceError::from(e)))?
            .into_iter()
            .filter(|e| e.parent_id == caller.id)
            .map(|e| (e.id.to_string(), e))
            .collect();
        let mut results = Vec::with_capacity(requests.len());
        let mut work = Vec::with_capacity(requests.len());
        let mut slots = Vec::with_capacity(requests.len());
        for r in requests {
            let mut result = node::SignResult {
                entry_id: r.entry_id,
                ..Default::default()
            };
            // An entry asked for twice in one batch is signed for each request.
            match found.get(&result.entry_id).cloned() {
                None => {
                    result.error = format!(
                        "no entry {:?} is assigned to agent {}",
                        result.entry_id, caller.id
                    );
                }
                Some(entry) => {
                    slots.push(results.len());
                    work.push((entry, r.csr));
                }
            }
            results.push(result);
        }
        let issued = self.ca.issue_batch(work, &caller.id.to_string()).await;
        for (slot, outcome) in slots.into_iter().zip(issued) {
            let result = &mut results[slot];
            match outcome {
                Ok(svid) => {
                    result.chain = svid.chain.iter().map(|c| c.to_vec()).collect();
                    result.expires_at = svid.not_after;
                    result.serial = svid.serial;
                }
                Err(e) => result.error = e.to_string(),
            }
        }
        for result in results.iter().filter(|r| !r.error.is_empty()) {
            self.ca.audit_counts.add(
                crate::audit::summary::Kind::NodeRefused,
                &caller.id.to_string(),
                &format!("BatchSignX509: {}", result.error),
            );
            tracing::info!(caller = %caller.id, entry_id = %result.entry_id, error = %result.error, "SVID request refused");
        }
        Ok(Response::new(node::BatchSignX509Response { results }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<node::MintJwtSvidRequest>,
    ) -> Rpc<node::MintJwtSvidResponse> {
        let caller = self.authorize(&req, "MintJwtSvid").await?;
        if let Err(retry_after) = self.jwt_mints.take(&caller.id, std::time::Instant::now()) {
            tracing::warn!(caller = %caller.id, "refused: JWT-SVID mint rate exceeded");
            return Err(NodeError::RateLimited { retry_after }.into());
        }
        let r = req.into_inner();
        let entry = match r.entry_id.parse() {
            Ok(id) => self
                .ca
                .store
                .get_entry(&id)
                .await
                .map_err(|e| NodeError::from(ServiceError::from(e)))?,
            Err(_) => None,
        };
        let Some(entry) = entry.filter(|e| e.parent_id == caller.id) else {
            return Err(self
                .deny(
                    "MintJwtSvid",
                    &caller.id.to_string(),
                    format!(
                        "no entry {:?} is assigned to agent {}",
                        r.entry_id, caller.id
                    ),
                )
                .into());
        };
        let ttl = entry.jwt_svid_ttl.map_or(0, |d| d.as_secs());
        let (token, expires_at) = self
            .ca
            .mint_jwt(
                &entry.spiffe_id.to_string(),
                &r.audience,
                ttl,
                &caller.id.to_string(),
            )
            .await
            .map_err(NodeError::from)?;
        Ok(Response::new(node::MintJwtSvidResponse {
            token,
            expires_at,
        }))
    }
}

#[cfg(test)]
mod tests;
