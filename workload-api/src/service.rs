//! The SPIFFE Workload API server (`/SpiffeWorkloadAPI/*`), served on a Unix socket to local
//! workloads, as any SPIFFE client library expects it.
//!
//! Every call goes through the same gate: the `workload.spiffe.io: true` header (else
//! `InvalidArgument`, which clients do not retry), then the caller's pid, uid and gid from the
//! socket (`SO_PEERCRED`), then [`Attestor::attest`] once, at the start of the call or stream.
//! The caller's selectors are matched against the entries of the latest [`Snapshot`].
//!
//! Behaviours chosen where the specification leaves room:
//! - **Entitlement.** A caller that matches no entry gets `PermissionDenied` "no identity issued"
//!   from every RPC that hands out identities or bundles (SPIRE's default; SPIFFE clients back
//!   off and retry). The agent logs the caller's pid, uid and selectors and how many entries it
//!   holds, so an operator can see which entry is missing. `ValidateJWTSVID` answers any
//!   attested caller, as SPIRE's agent does: a verifier needs no identity of its own.
//! - **Order.** A caller's SVIDs are listed by entry id, as SPIRE's agent lists them; the
//!   first is the default.
//! - **Start-up.** While the agent has not synced with the CA, or a matching entry has no SVID
//!   yet, a call waits (bounded, [`DEFAULT_READY_WAIT`]) for the next snapshot instead of
//!   refusing. When the wait ends, `FetchX509SVID` serves the identities that do have an SVID;
//!   with none, or still unsynced, the call fails with `Unavailable`.
//! - **Streams** send the full state first, then again only when what they would send changed
//!   (SVID chains, hints, trust bundle): republishing an identical snapshot sends nothing.
//! - **Redaction.** When a caller with an open stream no longer matches any entry (the entry was
//!   deleted or changed), the stream ends with `PermissionDenied` "no identity issued", as SPIRE
//!   does, rather than an empty message, which clients reject. A snapshot in which the agent is
//!   unsynced, or in which no matching SVID is signed yet, keeps the last state.
//! - **Shutdown.** Under [`WorkloadApi::serve`], streams end with `Unavailable` when the shutdown
//!   future completes, so the graceful shutdown does not wait for workloads to hang up.
//! - **JWT-SVIDs** are minted through [`JwtMinter`], one per SPIFFE ID (entries with the same ID
//!   share it), and cached per (entry, revision, sorted audience) until half their lifetime.
//!
//! Never logged: private keys and tokens.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt as _};
use meshid_api::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use meshid_api::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use spiffe::{SpiffeId, TrustDomain};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use meshid_api::limits::{Audience, AudienceError, RateLimiter};
use meshid_api::policy::policy_delivery_server::{PolicyDelivery, PolicyDeliveryServer};
use meshid_api::policy::{DenialReport, DenialReportResponse, PolicyUpdate, WatchPolicyRequest};

use crate::attest::{AttestError, Attestor};
use crate::cache::{Bundle, Entry, Federated, JwtMinter, MintError, Snapshot, Svid};
use crate::delivery::{Carried, Delivery, Handed, StreamTicket};
use crate::jwt::{self, JwtCache, JwtKey};

/// The metadata key every Workload API request must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long a call waits for the agent to sync or sign before answering.
pub const DEFAULT_READY_WAIT: Duration = Duration::from_secs(10);

/// JWT-SVID mints (cache misses) one caller (uid) may start per second, on average...
pub const JWT_MINTS_PER_SECOND: u32 = 20;

/// ...and at once.
pub const JWT_MINT_BURST: u32 = 100;

/// A Workload API RPC, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rpc {
    /// `FetchX509SVID` (server stream).
    FetchX509Svid,
    /// `FetchX509Bundles` (server stream).
    FetchX509Bundles,
    /// `FetchJWTSVID`.
    FetchJwtSvid,
    /// `FetchJWTBundles` (server stream).
    FetchJwtBundles,
    /// `ValidateJWTSVID`.
    ValidateJwtSvid,
    /// meshid's `PolicyDelivery.Watch` (server stream), for meshid-proxy.
    WatchPolicy,
    /// meshid's `PolicyDelivery.ReportDenials`, from meshid-proxy.
    ReportDenials,
}

impl Rpc {
    /// The RPC's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::FetchX509Svid => "FetchX509SVID",
            Rpc::FetchX509Bundles => "FetchX509Bundles",
            Rpc::FetchJwtSvid => "FetchJWTSVID",
            Rpc::FetchJwtBundles => "FetchJWTBundles",
            Rpc::ValidateJwtSvid => "ValidateJWTSVID",
            Rpc::WatchPolicy => "WatchPolicy",
            Rpc::ReportDenials => "ReportDenials",
        }
    }
}

/// Optional hooks for metrics; every method defaults to doing nothing.
pub trait WorkloadApiMetrics: Send + Sync + 'static {
    /// A unary call finished, or a stream was opened (`Ok`, its first message ready) or
    /// refused, with this code, `elapsed` after the call arrived.
    fn call(&self, rpc: Rpc, code: tonic::Code, elapsed: std::time::Duration) {
        let _ = (rpc, code, elapsed);
    }

    /// A stream sent an update after its first message.
    fn update(&self, rpc: Rpc) {
        let _ = rpc;
    }
}

/// Why a Workload API call failed. Converted to a [`Status`] in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request lacks `workload.spiffe.io: true`.
    #[error("security header missing from request")]
    MissingSecurityHeader,
    /// The connection carries no peer credentials (not a Unix socket).
    #[error("caller credentials unavailable; the Workload API must be served on a Unix socket")]
    NoPeerCredentials,
    /// The caller could not be attested.
    #[error("workload attestation failed: {0}")]
    Attestation(#[from] AttestError),
    /// The caller matches no entry (the spiffe client's `NoIdentityIssued`).
    #[error("no identity issued")]
    NoIdentityIssued,
    /// The caller asked for a SPIFFE ID it is not entitled to.
    #[error("no identity issued for {0}")]
    NotEntitled(SpiffeId),
    /// The agent has not synced with the CA, or not signed, within the wait.
    #[error("agent not ready: {0}; retry later")]
    NotReady(&'static str),
    /// A mandatory request field is empty.
    #[error("{0} must be specified")]
    MissingField(&'static str),
    /// The requested audience is missing or out of bounds.
    #[error(transparent)]
    InvalidAudience(AudienceError),
    /// The caller started more JWT-SVID mints than it may.
    #[error("JWT-SVID mint rate exceeded for uid {uid}; retry in {retry_after:?}")]
    RateLimited {
        /// The caller's uid.
        uid: u32,
        /// When one more is allowed.
        retry_after: Duration,
    },
    /// The requested SPIFFE ID does not parse.
    #[error("invalid spiffe_id {id:?}: {source}")]
    InvalidSpiffeId {
        /// What was sent.
        id: String,
        /// Why it is invalid.
        source: spiffe::SpiffeIdError,
    },
    /// The CA could not mint a JWT-SVID.
    #[error("could not fetch JWT-SVID for {spiffe_id}: {source}")]
    Mint {
        /// The identity.
        spiffe_id: SpiffeId,
        /// The minter's error.
        source: MintError,
    },
    /// The JWT-SVID to validate is invalid.
    #[error("invalid JWT-SVID: {0}")]
    InvalidToken(String),
    /// The agent's JWT bundle cannot be used.
    #[error("trust bundle unusable: {0}")]
    Bundle(String),
    /// The agent is shutting down (or its snapshot publisher is gone).
    #[error("agent is shutting down")]
    ShuttingDown,
    /// A denial report is malformed.
    #[error("invalid denial report: {0}")]
    InvalidReport(#[from] meshid_api::denials::DenialError),
}

impl ServiceError {
    /// The gRPC status code of this error: the one place errors meet the wire.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ServiceError::MissingSecurityHeader
            | ServiceError::MissingField(_)
            | ServiceError::InvalidAudience(_)
            | ServiceError::InvalidSpiffeId { .. }
            | ServiceError::InvalidToken(_)
            | ServiceError::InvalidReport(_) => Code::InvalidArgument,
            ServiceError::NoPeerCredentials
            | ServiceError::Attestation(_)
            | ServiceError::NoIdentityIssued
            | ServiceError::NotEntitled(_)
            | ServiceError::Mint {
                source: MintError::Refused(_),
                ..
            } => Code::PermissionDenied,
            ServiceError::NotReady(_)
            | ServiceError::ShuttingDown
            | ServiceError::Mint {
                source: MintError::Unavailable(_),
                ..
            } => Code::Unavailable,
            ServiceError::Bundle(_) => Code::Internal,
            ServiceError::RateLimited { .. } => Code::ResourceExhausted,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Why [`WorkloadApi::serve`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("workload API server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The Workload API service: serves the identities of a stream of [`Snapshot`]s to the callers
/// that match them.
pub struct WorkloadApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    attestor: Arc<Attestor>,
    minter: Arc<dyn JwtMinter>,
    metrics: Option<Arc<dyn WorkloadApiMetrics>>,
    ready_wait: Duration,
    stop: Option<watch::Receiver<bool>>,
    jwt_cache: JwtCache,
    mint_limiter: RateLimiter<u32>,
    admission: Arc<meshid_api::uds::Admission>,
    delivery: Arc<Delivery>,
    denials: Arc<std::sync::Mutex<meshid_api::denials::Tally>>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("ready_wait", &self.ready_wait)
            .finish_non_exhaustive()
    }
}

impl WorkloadApi {
    /// A service answering from `snapshots`, attesting callers with `attestor` and minting
    /// JWT-SVIDs with `minter`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        attestor: Arc<Attestor>,
        minter: Arc<dyn JwtMinter>,
    ) -> Self {
        Self {
            snapshots,
            attestor,
            minter,
            metrics: None,
            ready_wait: DEFAULT_READY_WAIT,
            stop: None,
            jwt_cache: JwtCache::default(),
            mint_limiter: RateLimiter::new(JWT_MINTS_PER_SECOND, JWT_MINT_BURST),
            admission: meshid_api::uds::Admission::new(meshid_api::uds::Limits::default()),
            delivery: Arc::new(Delivery::default()),
            denials: Arc::default(),
        }
    }

    /// What the open X.509 streams have handed over (see [`crate::delivery`]).
    pub fn delivery(&self) -> Arc<Delivery> {
        Arc::clone(&self.delivery)
    }

    /// Records what the X.509 streams hand over in `delivery` (shared with the manager, which
    /// reports it to the CA).
    #[must_use]
    pub fn with_delivery(mut self, delivery: Arc<Delivery>) -> Self {
        self.delivery = delivery;
        self
    }

    /// Counts the refusals proxies report in `denials` (shared with the manager, which forwards
    /// them to the CA).
    #[must_use]
    pub fn with_denials(
        mut self,
        denials: Arc<std::sync::Mutex<meshid_api::denials::Tally>>,
    ) -> Self {
        self.denials = denials;
        self
    }

    /// Admits connections through `admission` (its limits: caps in all and per uid, the
    /// first-request deadline; its counts, for metrics).
    #[must_use]
    pub fn with_admission(mut self, admission: Arc<meshid_api::uds::Admission>) -> Self {
        self.admission = admission;
        self
    }

    /// Reports calls and stream updates to `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<dyn WorkloadApiMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sets how long a call waits for the agent to sync or sign ([`DEFAULT_READY_WAIT`]).
    #[must_use]
    pub fn with_ready_wait(mut self, wait: Duration) -> Self {
        self.ready_wait = wait;
        self
    }

    /// The tonic service, to add to a server of one's own. Its streams end only when the caller
    /// hangs up or the snapshot sender is dropped; [`Self::serve`] also ends them on shutdown.
    pub fn into_server(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// [`Self::into_server`] as routes.
    pub fn router(self) -> tonic::service::Routes {
        tonic::service::Routes::new(self.into_server())
    }

    /// Serves on `listener` until `shutdown` completes; then open streams end with `Unavailable`
    /// and in-flight calls finish.
    pub async fn serve(
        mut self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        self.stop = Some(stop_rx);
        let incoming = meshid_api::uds::incoming_with(listener, Arc::clone(&self.admission));
        let this = Arc::new(self);
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::from_arc(Arc::clone(&this)))
            .add_service(PolicyDeliveryServer::from_arc(this))
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            })
            .await?;
        Ok(())
    }

    fn observe<T>(
        &self,
        rpc: Rpc,
        started: std::time::Instant,
        result: Result<T, ServiceError>,
    ) -> Result<T, Status> {
        if let Some(m) = &self.metrics {
            m.call(
                rpc,
                result
                    .as_ref()
                    .map_or_else(ServiceError::code, |_| tonic::Code::Ok),
                started.elapsed(),
            );
        }
        result.map_err(Status::from)
    }

    /// The gate of every call: header, peer credentials, attestation.
    async fn caller<T>(&self, rpc: Rpc, request: &Request<T>) -> Result<Caller, ServiceError> {
        check_header(request)?;
        let peer = request.extensions().get::<meshid_api::uds::UdsPeer>();
        let cred = peer.and_then(|peer| peer.info.peer_cred);
        let accepted = peer.and_then(|peer| peer.process);
        let Some((cred, pid)) = cred.and_then(|c| c.pid().map(|pid| (c, pid))) else {
            tracing::warn!(
                rpc = rpc.name(),
                "refused: no peer credentials on the connection"
            );
            return Err(ServiceError::NoPeerCredentials);
        };
        let (uid, gid) = (cred.uid(), cred.gid());
        match self
            .attestor
            .attest_connected(pid, uid, gid, accepted)
            .await
        {
            Ok(selectors) => {
                tracing::debug!(rpc = rpc.name(), pid, uid, ?selectors, "workload attested");
                Ok(Caller {
                    pid,
                    uid,
                    selectors: selectors.into(),
                })
            }
            Err(error) => {
                tracing::warn!(rpc = rpc.name(), pid, uid, %error, "refused: workload attestation failed");
                Err(error.into())
            }
        }
    }

    /// Evaluates the latest snapshot for `caller`, waiting (bounded) while it is not ready.
    /// Returns the value and the receiver, positioned on the snapshot it came from.
    async fn ready<V>(
        &self,
        rpc: Rpc,
        caller: &Caller,
        eval: Eval<V>,
    ) -> Result<(V, watch::Receiver<Arc<Snapshot>>), ServiceError> {
        let mut rx = self.snapshots.clone();
        let mut stop = self.stop.clone();
        let deadline = tokio::time::Instant::now() + self.ready_wait;
        loop {
            let snap = Arc::clone(&rx.borrow_and_update());
            let why = match eval(&snap, &caller.selectors, true) {
                Verdict::Ready(v) => return Ok((v, rx)),
                Verdict::Denied => {
                    log_denied(rpc, caller, &snap, "no identity issued");
                    return Err(ServiceError::NoIdentityIssued);
                }
                Verdict::NotReady(why) => why,
            };
            tracing::debug!(
                rpc = rpc.name(),
                pid = caller.pid,
                why,
                "waiting for the agent"
            );
            let waited = tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.changed()) => r,
                () = stopped(&mut stop) => return Err(ServiceError::ShuttingDown),
            };
            match waited {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(ServiceError::ShuttingDown),
                Err(_elapsed) => {}
            }
            // Out of time: take what there is.
            return match eval(&snap, &caller.selectors, false) {
                Verdict::Ready(v) => Ok((v, rx)),
                Verdict::Denied => {
                    log_denied(rpc, caller, &snap, "no identity issued");
                    Err(ServiceError::NoIdentityIssued)
                }
                Verdict::NotReady(why) => {
                    tracing::info!(
                        rpc = rpc.name(),
                        pid = caller.pid,
                        uid = caller.uid,
                        why,
                        waited = ?self.ready_wait,
                        "refused: agent not ready"
                    );
                    Err(ServiceError::NotReady(why))
                }
            };
        }
    }

    /// Opens a stream: first state now, then every change, per the rules in the module docs.
    async fn open_stream<V: View>(
        &self,
        rpc: Rpc,
        request: &Request<impl Send>,
        eval: Eval<V>,
    ) -> Result<BoxStream<'static, Result<V::Message, Status>>, ServiceError> {
        let caller = Arc::new(self.caller(rpc, request).await?);
        let (first, rx) = self.ready(rpc, &caller, eval).await?;
        let state = StreamState {
            rpc,
            caller,
            rx,
            stop: self.stop.clone(),
            sent_first: false,
            done: false,
            ticket: first.carried().map(|c| self.delivery.open(c)),
            pending: None,
            last: first,
            eval,
            metrics: self.metrics.clone(),
        };
        Ok(futures::stream::unfold(state, StreamState::next).boxed())
    }

    async fn fetch_jwt_svids(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<JwtsvidResponse, ServiceError> {
        check_header(&request)?;
        let audience = Audience::parse(&request.get_ref().audience)
            .map_err(ServiceError::InvalidAudience)?
            .sorted();
        let wanted = match request.get_ref().spiffe_id.as_str() {
            "" => None,
            id => Some(
                SpiffeId::new(id).map_err(|source| ServiceError::InvalidSpiffeId {
                    id: id.to_owned(),
                    source,
                })?,
            ),
        };
        let caller = self.caller(Rpc::FetchJwtSvid, &request).await?;
        let (mut entries, _) = self.ready(Rpc::FetchJwtSvid, &caller, eval_entries).await?;
        if let Some(id) = &wanted {
            entries.retain(|e| &e.spiffe_id == id);
            if entries.is_empty() {
                tracing::info!(
                    pid = caller.pid,
                    uid = caller.uid,
                    spiffe_id = %id,
                    selectors = ?caller.selectors,
                    "refused: caller not entitled to the requested SPIFFE ID"
                );
                return Err(ServiceError::NotEntitled(id.clone()));
            }
        }
        // One token per SPIFFE ID, from its first entry in entry id order.
        let mut seen = HashSet::new();
        entries.retain(|e| seen.insert(e.spiffe_id.clone()));

        let mints = entries
            .iter()
            .map(|entry| self.jwt_for(entry, &audience, caller.uid));
        let mut svids = futures::future::try_join_all(mints).await?;
        // Hints must be unique within a response: the first identity keeps a repeated one.
        let mut hints = HashSet::new();
        for svid in &mut svids {
            if !svid.hint.is_empty() && !hints.insert(svid.hint.clone()) {
                svid.hint.clear();
            }
        }
        Ok(JwtsvidResponse { svids })
    }

    /// A JWT-SVID for one entry, from the cache while it is within half its lifetime (and its
    /// signing key is not tainted).
    async fn jwt_for(
        &self,
        entry: &Entry,
        audience: &[String],
        uid: u32,
    ) -> Result<Jwtsvid, ServiceError> {
        let key = JwtKey {
            entry_id: entry.id.clone(),
            revision: entry.revision,
            audience: audience.to_vec(),
        };
        let tainted = Arc::clone(&self.snapshots.borrow().tainted_jwt_kids);
        let cached = self
            .jwt_cache
            .get(&key, meshid_api::unix_now())
            .filter(|token| {
                tainted.is_empty() || !jwt_kid(token).is_some_and(|k| tainted.contains(&k))
            });
        let token = match cached {
            Some(token) => token,
            None => {
                if let Err(retry_after) = self.mint_limiter.take(&uid, std::time::Instant::now()) {
                    tracing::warn!(uid, spiffe_id = %entry.spiffe_id, "refused: JWT-SVID mint rate exceeded");
                    return Err(ServiceError::RateLimited { uid, retry_after });
                }
                let (token, expiry) =
                    self.minter
                        .mint(&entry.id, audience)
                        .await
                        .map_err(|source| {
                            tracing::warn!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, error = %source, "JWT-SVID mint failed");
                            ServiceError::Mint {
                                spiffe_id: entry.spiffe_id.clone(),
                                source,
                            }
                        })?;
                let token = Zeroizing::new(token);
                self.jwt_cache.put(
                    key,
                    Zeroizing::clone(&token),
                    meshid_api::unix_now(),
                    expiry,
                );
                token
            }
        };
        Ok(Jwtsvid {
            spiffe_id: entry.spiffe_id.to_string(),
            svid: token.to_string(),
            hint: entry.hint.clone(),
        })
    }

    async fn validate_jwt(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<ValidateJwtsvidResponse, ServiceError> {
        check_header(&request)?;
        let req = request.get_ref();
        if req.audience.is_empty() {
            return Err(ServiceError::MissingField("audience"));
        }
        if req.svid.is_empty() {
            return Err(ServiceError::MissingField("svid"));
        }
        // Any attested caller may validate, whether or not it has an identity of its own (as
        // SPIRE's agent answers): the keys are public, and a verifier needs no SVID.
        let caller = self.caller(Rpc::ValidateJwtSvid, &request).await?;
        let (view, _) = self
            .ready(Rpc::ValidateJwtSvid, &caller, eval_validation_bundles)
            .await?;
        let federated: Vec<(TrustDomain, Vec<u8>)> = view
            .federated
            .iter()
            .filter_map(|(td, b)| {
                let td = TrustDomain::new(td).ok()?;
                Some((td, jwt::jwt_svid_jwks(&b.jwt_authorities_json)))
            })
            .collect();
        let (spiffe_id, claims) = jwt::validate(
            &req.svid,
            &view.trust_domain,
            &view.jwks(),
            &federated,
            &req.audience,
        )
        .map_err(|e| match e {
            jwt::Invalid::Bundle(reason) => ServiceError::Bundle(reason),
            jwt::Invalid::Token(reason) => {
                tracing::debug!(pid = caller.pid, %reason, "JWT-SVID validation failed");
                ServiceError::InvalidToken(reason)
            }
        })?;
        Ok(ValidateJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            claims: Some(claims),
        })
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<'static, Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = BoxStream<'static, Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = BoxStream<'static, Result<JwtBundlesResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let started = std::time::Instant::now();
        let rpc = Rpc::FetchX509Svid;
        let stream = self.open_stream(rpc, &request, eval_x509_svids).await;
        self.observe(rpc, started, stream).map(Response::new)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let started = std::time::Instant::now();
        let rpc = Rpc::FetchX509Bundles;
        let stream = self.open_stream(rpc, &request, eval_x509_bundles).await;
        self.observe(rpc, started, stream).map(Response::new)
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.fetch_jwt_svids(request).await;
        self.observe(Rpc::FetchJwtSvid, started, result)
            .map(Response::new)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let started = std::time::Instant::now();
        let rpc = Rpc::FetchJwtBundles;
        let stream = self.open_stream(rpc, &request, eval_jwt_bundles).await;
        self.observe(rpc, started, stream).map(Response::new)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.validate_jwt(request).await;
        self.observe(Rpc::ValidateJwtSvid, started, result)
            .map(Response::new)
    }
}

/// The central policy's part that concerns a caller: the rules whose `to` matches one of its
/// SPIFFE IDs, as YAML.
struct PolicyView {
    revision: u64,
    spiffe_ids: Vec<String>,
    policy: Arc<str>,
}

impl PartialEq for PolicyView {
    fn eq(&self, other: &Self) -> bool {
        self.revision == other.revision
            && self.spiffe_ids == other.spiffe_ids
            && self.policy == other.policy
    }
}

impl View for PolicyView {
    type Message = PolicyUpdate;

    fn carried(&self) -> Option<Carried> {
        Some(Carried::Policy(self.revision))
    }

    fn message(&self) -> PolicyUpdate {
        PolicyUpdate {
            revision: self.revision,
            policy: self.policy.to_string(),
            spiffe_ids: self.spiffe_ids.clone(),
        }
    }
}

fn eval_policy(snap: &Snapshot, selectors: &[String], _strict: bool) -> Verdict<PolicyView> {
    if !snap.synced {
        return Verdict::NotReady("not yet synced with the CA");
    }
    let mut ids: Vec<SpiffeId> = snap
        .matching(selectors)
        .map(|i| i.entry.spiffe_id.clone())
        .collect();
    if ids.is_empty() {
        return Verdict::Denied;
    }
    ids.sort_by_key(ToString::to_string);
    ids.dedup();
    let policy = match &snap.policy_merged {
        Some(merged) => merged.restricted_to(&ids).to_yaml(),
        None => meshid_policy::Policy::merge("mesh", &[])
            .map(|p| p.to_yaml())
            .unwrap_or_default(),
    };
    Verdict::Ready(PolicyView {
        revision: snap.policy.revision,
        spiffe_ids: ids.iter().map(ToString::to_string).collect(),
        policy: policy.into(),
    })
}

#[tonic::async_trait]
impl PolicyDelivery for WorkloadApi {
    type WatchStream = BoxStream<'static, Result<PolicyUpdate, Status>>;

    async fn watch(
        &self,
        request: Request<WatchPolicyRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let started = std::time::Instant::now();
        let rpc = Rpc::WatchPolicy;
        let stream = self.open_stream(rpc, &request, eval_policy).await;
        self.observe(rpc, started, stream).map(Response::new)
    }

    async fn report_denials(
        &self,
        request: Request<DenialReport>,
    ) -> Result<Response<DenialReportResponse>, Status> {
        let started = std::time::Instant::now();
        let rpc = Rpc::ReportDenials;
        let result = self.take_denials(rpc, request).await;
        self.observe(rpc, started, result).map(Response::new)
    }
}

impl WorkloadApi {
    /// `ReportDenials`: the caller attested like any workload; its counts kept when the callee
    /// is one of its own SPIFFE IDs (an empty callee is its first), dropped otherwise; a
    /// malformed report refused whole.
    async fn take_denials(
        &self,
        rpc: Rpc,
        request: Request<DenialReport>,
    ) -> Result<DenialReportResponse, ServiceError> {
        let caller = self.caller(rpc, &request).await?;
        let snap = Arc::clone(&self.snapshots.borrow());
        let mut own: Vec<String> = snap
            .matching(&caller.selectors)
            .map(|i| i.entry.spiffe_id.to_string())
            .collect();
        if own.is_empty() {
            log_denied(rpc, &caller, &snap, "no identity issued");
            return Err(ServiceError::NoIdentityIssued);
        }
        own.sort();
        let report = request.into_inner();
        meshid_api::denials::check_report(
            report
                .denials
                .iter()
                .map(|d| (&*d.caller, &*d.callee, &*d.rule, d.count)),
        )?;
        let (mut kept, mut foreign) = (0u32, None);
        let mut tally = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        for d in report.denials {
            let callee = if d.callee.is_empty() {
                own[0].clone()
            } else {
                d.callee
            };
            if !own.contains(&callee) {
                foreign.get_or_insert(callee);
                continue;
            }
            let key = meshid_api::denials::Key {
                caller: d.caller,
                callee,
                rule: d.rule,
            };
            tally.add(key, d.count, d.last_at);
            kept += 1;
        }
        drop(tally);
        if let Some(callee) = foreign {
            tracing::warn!(pid = caller.pid, uid = caller.uid, callee = %callee, "denial counts for a SPIFFE ID the caller does not hold were dropped");
        }
        Ok(DenialReportResponse { kept })
    }
}

/// An attested caller.
#[derive(Debug)]
struct Caller {
    pid: i32,
    uid: u32,
    selectors: Arc<[String]>,
}

/// `workload.spiffe.io` must be present exactly once, with the value `true`.
fn check_header<T>(request: &Request<T>) -> Result<(), ServiceError> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(ServiceError::MissingSecurityHeader),
    }
}

fn log_denied(rpc: Rpc, caller: &Caller, snap: &Snapshot, what: &'static str) {
    tracing::info!(
        rpc = rpc.name(),
        pid = caller.pid,
        uid = caller.uid,
        selectors = ?caller.selectors,
        entries = snap.identities.len(),
        outcome = what,
        "refused: the caller's selectors match no entry"
    );
}

/// Completes when the stop flag is raised or its sender is gone; never without one.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            let _ = rx.wait_for(|s| *s).await;
        }
        None => std::future::pending().await,
    }
}

/// What a snapshot means for a caller.
enum Verdict<V> {
    /// Something to serve.
    Ready(V),
    /// Not yet: unsynced, or nothing signed.
    NotReady(&'static str),
    /// The caller matches no entry.
    Denied,
}

impl<V> Verdict<V> {
    fn map<W>(self, f: impl FnOnce(V) -> W) -> Verdict<W> {
        match self {
            Verdict::Ready(v) => Verdict::Ready(f(v)),
            Verdict::NotReady(why) => Verdict::NotReady(why),
            Verdict::Denied => Verdict::Denied,
        }
    }
}

/// Evaluates a snapshot for a caller's selectors. With `strict`, anything incomplete (a
/// matching entry without its SVID) is `NotReady`.
type Eval<V> = fn(&Snapshot, &[String], bool) -> Verdict<V>;

/// The part of a snapshot one stream serves; equal views send nothing.
trait View: PartialEq + Send + 'static {
    /// The wire message.
    type Message: Send + 'static;
    /// Builds the message.
    fn message(&self) -> Self::Message;
    /// What a message carries that the agent reports to the CA (the bundle sequence and CRL
    /// generation of an X.509 message, the revision of a policy message; `None` for other
    /// streams).
    fn carried(&self) -> Option<Carried> {
        None
    }
}

fn eval_entries(snap: &Snapshot, selectors: &[String], _strict: bool) -> Verdict<Vec<Arc<Entry>>> {
    if !snap.synced {
        return Verdict::NotReady("not yet synced with the CA");
    }
    let entries: Vec<_> = snap
        .matching(selectors)
        .map(|i| Arc::clone(&i.entry))
        .collect();
    if entries.is_empty() {
        Verdict::Denied
    } else {
        Verdict::Ready(entries)
    }
}

/// The X.509-SVIDs of a caller and the bundle they come with.
struct X509View {
    svids: Vec<(Arc<Entry>, Arc<Svid>)>,
    bundle: Arc<Bundle>,
    crls: Arc<Vec<Vec<u8>>>,
    crl_generation: u64,
    /// The bundles of the trust domains these SVIDs' entries federate with.
    federated: Federated,
}

/// Whether two sets of federated bundles have the same X.509 authorities.
fn same_x509(a: &Federated, b: &Federated) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((t1, b1), (t2, b2))| {
            t1 == t2 && (Arc::ptr_eq(b1, b2) || b1.x509_authorities == b2.x509_authorities)
        })
}

/// The Workload API's form of federated X.509 bundles: trust domain ID → concatenated DER.
fn federated_x509(federated: &Federated) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    federated
        .iter()
        .map(|(td, b)| (format!("spiffe://{td}"), b.x509_concat()))
}

impl PartialEq for X509View {
    fn eq(&self, other: &Self) -> bool {
        self.bundle.x509_authorities == other.bundle.x509_authorities
            && same_x509(&self.federated, &other.federated)
            && self.crl_generation == other.crl_generation
            && (Arc::ptr_eq(&self.crls, &other.crls) || self.crls == other.crls)
            && self.svids.len() == other.svids.len()
            && self
                .svids
                .iter()
                .zip(&other.svids)
                .all(|((e1, s1), (e2, s2))| {
                    e1.id == e2.id
                        && e1.spiffe_id == e2.spiffe_id
                        && e1.hint == e2.hint
                        && (Arc::ptr_eq(s1, s2) || s1.chain == s2.chain)
                })
    }
}

impl View for X509View {
    type Message = X509svidResponse;

    fn carried(&self) -> Option<Carried> {
        Some(Carried::X509(Handed {
            bundle: self.bundle.sequence,
            crls: self.crl_generation,
        }))
    }

    fn message(&self) -> X509svidResponse {
        let bundle = self.bundle.x509_concat();
        let mut hints = HashSet::new();
        let svids = self
            .svids
            .iter()
            .map(|(entry, svid)| {
                // Hints must be unique within a response: the first entry keeps a repeated one.
                let hint = if entry.hint.is_empty() || hints.insert(entry.hint.as_str()) {
                    entry.hint.clone()
                } else {
                    tracing::warn!(entry_id = %entry.id, hint = %entry.hint, "duplicate hint omitted");
                    String::new()
                };
                X509svid {
                    spiffe_id: entry.spiffe_id.to_string(),
                    x509_svid: svid.chain_concat(),
                    x509_svid_key: svid.key_pkcs8.to_vec(),
                    bundle: bundle.clone(),
                    hint,
                }
            })
            .collect();
        X509svidResponse {
            svids,
            crl: self.crls.to_vec(),
            federated_bundles: federated_x509(&self.federated).collect(),
        }
    }
}

fn eval_x509_svids(snap: &Snapshot, selectors: &[String], strict: bool) -> Verdict<X509View> {
    if !snap.synced {
        return Verdict::NotReady("not yet synced with the CA");
    }
    let mut matching = 0;
    let mut svids = Vec::new();
    for identity in snap.matching(selectors) {
        matching += 1;
        if let Some(svid) = &identity.svid {
            svids.push((Arc::clone(&identity.entry), Arc::clone(svid)));
        }
    }
    if matching == 0 {
        return Verdict::Denied;
    }
    if snap.bundle.x509_authorities.is_empty() {
        return Verdict::NotReady("no X.509 trust bundle yet");
    }
    if svids.is_empty() || (strict && svids.len() < matching) {
        return Verdict::NotReady("X.509-SVID not signed yet");
    }
    Verdict::Ready(X509View {
        federated: snap.federated_for(svids.iter().map(|(e, _)| e.as_ref())),
        svids,
        bundle: Arc::clone(&snap.bundle),
        crls: Arc::clone(&snap.crls),
        crl_generation: snap.crl_generation,
    })
}

/// The X.509 trust bundles: the local trust domain's, and those of the trust domains the
/// caller's entries federate with.
struct X509BundlesView {
    trust_domain: TrustDomain,
    bundle: Arc<Bundle>,
    crls: Arc<Vec<Vec<u8>>>,
    crl_generation: u64,
    federated: Federated,
}

impl PartialEq for X509BundlesView {
    fn eq(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain
            && self.bundle.x509_authorities == other.bundle.x509_authorities
            && same_x509(&self.federated, &other.federated)
            && self.crl_generation == other.crl_generation
            && (Arc::ptr_eq(&self.crls, &other.crls) || self.crls == other.crls)
    }
}

impl View for X509BundlesView {
    type Message = X509BundlesResponse;

    fn carried(&self) -> Option<Carried> {
        Some(Carried::X509(Handed {
            bundle: self.bundle.sequence,
            crls: self.crl_generation,
        }))
    }

    fn message(&self) -> X509BundlesResponse {
        let local = (self.trust_domain.id_string(), self.bundle.x509_concat());
        X509BundlesResponse {
            crl: self.crls.to_vec(),
            bundles: std::iter::once(local)
                .chain(federated_x509(&self.federated))
                .collect(),
        }
    }
}

fn eval_x509_bundles(
    snap: &Snapshot,
    selectors: &[String],
    _strict: bool,
) -> Verdict<X509BundlesView> {
    if !snap.synced {
        return Verdict::NotReady("not yet synced with the CA");
    }
    if snap.matching(selectors).next().is_none() {
        return Verdict::Denied;
    }
    if snap.bundle.x509_authorities.is_empty() {
        return Verdict::NotReady("no X.509 trust bundle yet");
    }
    Verdict::Ready(X509BundlesView {
        federated: snap.federated_for(snap.matching(selectors).map(|i| i.entry.as_ref())),
        trust_domain: snap.trust_domain.clone(),
        bundle: Arc::clone(&snap.bundle),
        crls: Arc::clone(&snap.crls),
        crl_generation: snap.crl_generation,
    })
}

/// The JWT authorities: the local trust domain's, and (FetchJWTBundles) those of the trust
/// domains the caller's entries federate with.
struct JwtBundlesView {
    trust_domain: TrustDomain,
    bundle: Arc<Bundle>,
    federated: Federated,
}

impl PartialEq for JwtBundlesView {
    fn eq(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain
            && self.bundle.jwt_authorities_json == other.bundle.jwt_authorities_json
            && self.federated.len() == other.federated.len()
            && self
                .federated
                .iter()
                .zip(&other.federated)
                .all(|((t1, b1), (t2, b2))| {
                    t1 == t2 && b1.jwt_authorities_json == b2.jwt_authorities_json
                })
    }
}

impl JwtBundlesView {
    /// The JWKS with only `use: "jwt-svid"` keys that carry a `kid`.
    fn jwks(&self) -> Vec<u8> {
        jwt::jwt_svid_jwks(&self.bundle.jwt_authorities_json)
    }
}

impl View for JwtBundlesView {
    type Message = JwtBundlesResponse;

    fn message(&self) -> JwtBundlesResponse {
        let federated = self.federated.iter().map(|(td, b)| {
            (
                format!("spiffe://{td}"),
                jwt::jwt_svid_jwks(&b.jwt_authorities_json),
            )
        });
        JwtBundlesResponse {
            bundles: std::iter::once((self.trust_domain.id_string(), self.jwks()))
                .chain(federated)
                .collect(),
        }
    }
}

fn eval_jwt_bundles(
    snap: &Snapshot,
    selectors: &[String],
    strict: bool,
) -> Verdict<JwtBundlesView> {
    if snap.synced && snap.matching(selectors).next().is_none() {
        return Verdict::Denied;
    }
    eval_local_jwt_bundle(snap, selectors, strict).map(|mut view| {
        view.federated = snap.federated_for(snap.matching(selectors).map(|i| i.entry.as_ref()));
        view
    })
}

/// Every JWT authority the agent holds, local and federated, for `ValidateJWTSVID` (any
/// attested caller may validate: the keys are public).
fn eval_validation_bundles(
    snap: &Snapshot,
    selectors: &[String],
    strict: bool,
) -> Verdict<JwtBundlesView> {
    eval_local_jwt_bundle(snap, selectors, strict).map(|mut view| {
        view.federated = (*snap.federated).clone();
        view
    })
}

/// The local JWT authorities for a caller that need not match any entry.
fn eval_local_jwt_bundle(
    snap: &Snapshot,
    _selectors: &[String],
    _strict: bool,
) -> Verdict<JwtBundlesView> {
    if !snap.synced {
        return Verdict::NotReady("not yet synced with the CA");
    }
    Verdict::Ready(JwtBundlesView {
        trust_domain: snap.trust_domain.clone(),
        bundle: Arc::clone(&snap.bundle),
        federated: Federated::new(),
    })
}

/// The state of one open stream.
struct StreamState<V> {
    rpc: Rpc,
    caller: Arc<Caller>,
    rx: watch::Receiver<Arc<Snapshot>>,
    stop: Option<watch::Receiver<bool>>,
    /// What was sent last (or is about to be sent first).
    last: V,
    sent_first: bool,
    done: bool,
    eval: Eval<V>,
    metrics: Option<Arc<dyn WorkloadApiMetrics>>,
    /// This stream's place in the delivery record (X.509 and policy streams).
    ticket: Option<StreamTicket>,
    /// What the message last yielded carries, counted once the transport asks for the next
    /// one.
    pending: Option<Carried>,
}

impl<V: View> StreamState<V> {
    async fn next(mut self) -> Option<(Result<V::Message, Status>, Self)> {
        // Asked for the next message: the last one was taken by the transport.
        if let (Some(ticket), Some(handed)) = (&self.ticket, self.pending.take()) {
            ticket.handed(handed);
        }
        if self.done {
            return None;
        }
        if !self.sent_first {
            self.sent_first = true;
            let first = self.last.message();
            self.pending = self.last.carried();
            return Some((Ok(first), self));
        }
        loop {
            let changed = tokio::select! {
                r = self.rx.changed() => r.is_ok(),
                () = stopped(&mut self.stop) => false,
            };
            if !changed {
                self.done = true;
                return Some((Err(ServiceError::ShuttingDown.into()), self));
            }
            let snap = Arc::clone(&self.rx.borrow_and_update());
            match (self.eval)(&snap, &self.caller.selectors, false) {
                Verdict::Ready(view) if view != self.last => {
                    self.last = view;
                    if let Some(m) = &self.metrics {
                        m.update(self.rpc);
                    }
                    tracing::debug!(
                        rpc = self.rpc.name(),
                        pid = self.caller.pid,
                        "stream update"
                    );
                    let message = self.last.message();
                    self.pending = self.last.carried();
                    return Some((Ok(message), self));
                }
                Verdict::Ready(_) | Verdict::NotReady(_) => continue,
                Verdict::Denied => {
                    log_denied(self.rpc, &self.caller, &snap, "identity withdrawn");
                    self.done = true;
                    return Some((Err(ServiceError::NoIdentityIssued.into()), self));
                }
            }
        }
    }
}

/// The `kid` of a JWT's header, if it has one.
fn jwt_kid(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("kid")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests;
