//! The proxy's own credentials: its X509-SVID and the peers' trust bundles, followed from the
//! Workload API through the `spiffe` crate's [`X509Source`], exactly as any workload gets them.
//!
//! [`Credentials`] holds one rustls `ServerConfig` (inbound) and one `ClientConfig` per
//! outbound listener, built once. Both read the certificate from a
//! [`RotatingCert`] resolver and the trust anchors from the shared [`SvidVerifier`], which
//! [`follow`] updates on every Workload API message: new handshakes use the newest
//! credentials, established connections are untouched, and before the first SVID (or after it
//! is withdrawn) every handshake fails closed and `/readyz` reports not ready.
//!
//! meshid-api's provider and protocol versions (TLS 1.3 only, AES-128-GCM preferred), no session resumption (each connection verifies the
//! peer's current certificate against the current bundle).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshid_api::tls::RotatingCert;
use meshid_policy::Pattern;
use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{SpiffeId, TrustDomain, X509BundleSet, X509Source, X509Svid};

use crate::metrics::Metrics;
use meshid_api::tls::revocation::Revocations;
use meshid_api::tls::{
    provider, ClientVerifier, PeerBundles, ServerVerifier, SvidVerifier, PROTOCOL_VERSIONS,
};

/// Errors building TLS configurations or applying an SVID.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration, the key or the chain.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The SVID's certificate and key could not be used.
    #[error("svid: {0}")]
    Svid(#[from] meshid_api::tls::TlsError),
}

/// The proxy's identity and trust, shared by every listener.
#[derive(Debug)]
pub struct Credentials {
    cert: Arc<RotatingCert>,
    verifier: Arc<SvidVerifier>,
    local: ArcSwapOption<SpiffeId>,
    ready: AtomicBool,
    /// The CRLs in force, watched by every established connection ([`Credentials::revoked`]).
    revocations: tokio::sync::watch::Sender<Arc<Revocations>>,
    /// The first CRL set (possibly empty) came from the agent: until then nothing is accepted,
    /// so that a restarted proxy never admits a peer revoked before it started.
    crls_received: AtomicBool,
    server: Arc<ServerConfig>,
    federated: Vec<TrustDomain>,
}

impl Credentials {
    /// Empty credentials: every handshake fails closed until [`Credentials::apply`].
    /// `federated` are the other trust domains whose SVIDs peers may present.
    pub fn new(federated: Vec<TrustDomain>) -> Result<Arc<Credentials>, TlsError> {
        let cert = Arc::new(RotatingCert::new());
        let verifier = Arc::new(SvidVerifier::new());
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_client_cert_verifier(Arc::new(ClientVerifier::new(verifier.clone())))
            .with_cert_resolver(cert.clone());
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Arc::new(Credentials {
            cert,
            verifier,
            local: ArcSwapOption::empty(),
            ready: AtomicBool::new(false),
            revocations: tokio::sync::watch::Sender::new(Arc::new(Revocations::default())),
            crls_received: AtomicBool::new(false),
            server: Arc::new(server),
            federated,
        }))
    }

    /// The inbound (server side) configuration.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// An outbound configuration whose handshakes succeed only with a server presenting a
    /// valid SVID matching `expect`.
    pub fn client_config(&self, expect: &Pattern) -> Result<Arc<ClientConfig>, TlsError> {
        let pattern = expect.clone();
        let verifier = ServerVerifier::new(
            self.verifier.clone(),
            Arc::new(move |id: &SpiffeId| pattern.matches(id)),
            expect.to_string(),
        );
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.cert.clone());
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The proxy's SPIFFE ID, once it holds an SVID.
    pub fn local_id(&self) -> Option<Arc<SpiffeId>> {
        self.local.load_full()
    }

    /// Whether an SVID and the CRLs are held (`/readyz`).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.crls_received.load(Ordering::Acquire)
    }

    /// What is missing for [`Credentials::ready`].
    pub fn not_ready_reason(&self) -> &'static str {
        if !self.ready.load(Ordering::Acquire) {
            "no svid yet"
        } else {
            "no certificate revocation lists from the Workload API yet"
        }
    }

    /// Installs the CRLs: new handshakes are checked against them, and connections whose peer
    /// chain holds a listed certificate are closed ([`Credentials::revoked`]).
    pub fn set_revocations(&self, revocations: Revocations) {
        self.verifier.set_revocations(revocations);
        self.revocations.send_replace(self.verifier.revocations());
        self.crls_received.store(true, Ordering::Release);
    }

    /// Resolves when a CRL lists a certificate of `chain` (an established connection's peer,
    /// leaf first), with that certificate's serial; never, otherwise.
    pub async fn revoked(&self, chain: &[CertificateDer<'static>]) -> String {
        let mut rx = self.revocations.subscribe();
        loop {
            if let Some(serial) = rx.borrow_and_update().revoked_in(chain) {
                return serial;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Installs an SVID and the bundles: new handshakes use them from now on.
    pub fn apply(&self, svid: &X509Svid, bundles: &X509BundleSet) -> Result<(), TlsError> {
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.private_key().as_bytes().to_vec(),
        ));
        let local_td = svid.spiffe_id().trust_domain().clone();
        let federated = &self.federated;
        let accept = |td: &TrustDomain| *td == local_td || federated.contains(td);
        // Trust first, then the certificate: a peer that already has a new SVID from a new
        // intermediate is accepted before ours changes.
        self.verifier
            .set_bundles(PeerBundles::from_bundle_set(bundles, &accept));
        self.cert.set(chain, key)?;
        self.local.store(Some(Arc::new(svid.spiffe_id().clone())));
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Updates only the bundles (an update that carries no usable SVID keeps the trust
    /// current).
    pub fn apply_bundles(&self, bundles: &X509BundleSet) {
        let Some(local) = self.local_id() else {
            return;
        };
        let local_td = local.trust_domain().clone();
        let federated = &self.federated;
        let accept = |td: &TrustDomain| *td == local_td || federated.contains(td);
        self.verifier
            .set_bundles(PeerBundles::from_bundle_set(bundles, &accept));
    }

    /// Forgets the SVID (withdrawn by the agent): handshakes fail closed.
    pub fn clear(&self) {
        self.ready.store(false, Ordering::Release);
        self.cert.clear();
    }
}

/// Which SVID to use when the Workload API offers several.
#[derive(Debug)]
struct PickById(SpiffeId);

impl spiffe::x509_source::SvidPicker for PickById {
    fn pick_svid(&self, svids: &[Arc<X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| *s.spiffe_id() == self.0)
    }
}

fn expiry_unix(svid: &X509Svid) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Follows the Workload API at `endpoint` until `shutdown`: connects (retrying with backoff
/// while the agent is not there or has no identity for us yet), applies every SVID and bundle
/// update to `creds`, and updates the expiry and rotation metrics.
pub async fn follow(
    endpoint: String,
    pick: Option<SpiffeId>,
    creds: Arc<Credentials>,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let source = loop {
        let mut builder = X509Source::builder()
            .endpoint(&endpoint)
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5))
            .initial_sync_timeout(Duration::from_secs(10));
        if let Some(id) = &pick {
            builder = builder.picker(PickById(id.clone()));
        }
        tokio::select! {
            r = builder.build() => match r {
                Ok(source) => break source,
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint, error = %e, "no SVID from the Workload API yet; retrying");
                }
            },
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    let mut updates = source.updated();
    let mut first = true;
    loop {
        match (source.svid(), source.bundle_set()) {
            (Ok(svid), Ok(bundles)) => match creds.apply(&svid, &bundles) {
                Ok(()) => {
                    let expiry = expiry_unix(&svid).unwrap_or(0);
                    metrics.svid_expiry.set(expiry);
                    if first {
                        tracing::info!(spiffe_id = %svid.spiffe_id(), expiry, "svid received; ready");
                    } else {
                        metrics.rotations.inc();
                        tracing::info!(spiffe_id = %svid.spiffe_id(), expiry, "svid rotated");
                    }
                    first = false;
                }
                Err(e) => tracing::error!(error = %e, "cannot use the svid from the Workload API"),
            },
            (Err(e), bundles) => {
                if let Ok(b) = bundles {
                    creds.apply_bundles(&b);
                }
                if creds.ready() {
                    tracing::warn!(error = %e, "svid withdrawn by the Workload API; refusing handshakes");
                }
                creds.clear();
            }
            (Ok(_), Err(e)) => tracing::warn!(error = %e, "no trust bundle from the Workload API"),
        }
        tokio::select! {
            r = updates.changed() => if let Err(e) = r {
                tracing::error!(error = %e, "workload api source closed");
                break;
            },
            _ = shutdown.changed() => break,
        }
    }
    source.shutdown().await;
}

/// Follows the certificate revocation lists from the Workload API at `endpoint` until
/// `shutdown`: a FetchX509Bundles stream, whose `crl` field carries them (the `spiffe` crate's
/// sources do not surface it). Every message replaces the set; a message whose CRLs do not
/// parse is logged and skipped, keeping the last good set. Reconnects with backoff.
pub async fn follow_crls(
    endpoint: String,
    creds: Arc<Credentials>,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use meshid_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let (endpoint, creds, metrics) = (&endpoint, &creds, &metrics);
    keep_following(
        "CRL stream from the Workload API",
        endpoint,
        shutdown,
        || async move {
            let channel = workload_channel(endpoint).await?;
            let mut stream = SpiffeWorkloadApiClient::new(channel)
                .fetch_x509_bundles(agent_request(meshid_api::workload::X509BundlesRequest {}))
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            while let Some(msg) = stream
                .message()
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            {
                match Revocations::from_der(&msg.crl) {
                    Ok(set) => {
                        let listed = set.len();
                        let first = !creds.crls_received.load(Ordering::Acquire);
                        creds.set_revocations(set);
                        metrics
                            .revoked_listed
                            .set(i64::try_from(listed).unwrap_or(i64::MAX));
                        if first {
                            tracing::info!(
                                crls = msg.crl.len(),
                                revoked = listed,
                                "certificate revocation lists received"
                            );
                        } else {
                            tracing::info!(
                                crls = msg.crl.len(),
                                revoked = listed,
                                "certificate revocation lists updated"
                            );
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the Workload API sent a CRL that does not parse; keeping the previous lists")
                    }
                }
            }
            anyhow::Ok(())
        },
    )
    .await;
}

/// Runs `session` (one stream from the agent at `endpoint`) again whenever it ends, until the
/// drain starts: each end is logged as `what`, and followed by a backoff of 100 ms doubling to
/// 5 s, back to 100 ms after a session that ended cleanly or lasted 5 s.
pub(crate) async fn keep_following<F, Fut>(
    what: &'static str,
    endpoint: &str,
    mut drain: tokio::sync::watch::Receiver<bool>,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    const FIRST: Duration = Duration::from_millis(100);
    let mut backoff = FIRST;
    loop {
        let started = std::time::Instant::now();
        tokio::select! {
            r = session() => match r {
                Ok(()) => backoff = FIRST,
                Err(e) => {
                    if started.elapsed() >= Duration::from_secs(5) {
                        backoff = FIRST;
                    }
                    tracing::warn!(endpoint, error = %e, "{what} ended; reconnecting");
                }
            },
            _ = drain.wait_for(|d| *d) => return,
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = drain.wait_for(|d| *d) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A request to the agent's socket, with the Workload API's security header.
pub(crate) fn agent_request<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// A gRPC channel to a Workload API endpoint (`unix:` path or `tcp:` address).
pub(crate) async fn workload_channel(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    if let Some(rest) = endpoint.strip_prefix("unix:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        return Ok(meshid_api::client::connect_unix(path).await?);
    }
    let addr = endpoint.strip_prefix("tcp:").unwrap_or(endpoint);
    let addr = addr.strip_prefix("//").unwrap_or(addr);
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    )
}
