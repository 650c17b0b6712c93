//! The agent's control loop: bootstrap, entry sync, batch signing and rotation.
//!
//! [`Manager::run`] keeps one sync stream open to the CA. The CA pushes the agent's full state
//! first and then every change as it happens; after each message the manager signs whatever
//! is missing or stale (new entries, changed entries, SVIDs past their rotation point) in
//! batches, and publishes a new [`Snapshot`]. A timer wakes it for rotations in between. When
//! the CA is unreachable it keeps serving what it holds and reconnects with jittered
//! exponential backoff; nothing is dropped because the CA is away.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::FutureExt as _;
use meshid_api::node::{self, node_client::NodeClient};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use rustls_pki_types::CertificateDer;
use spiffe::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::cache::{Bundle, Entry, Identity, JwtMinter, MintError, Snapshot, Svid};
use crate::client::{self, AgentIdentity, ClientError};
use crate::config::Config;
use crate::delivery::Delivery;

/// Most CSRs in one signing call.
pub const BATCH: usize = 500;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Counters the ops endpoint exposes.
#[derive(Debug, Default)]
pub struct Stats {
    /// SVIDs signed (first issue and rotations).
    pub signed: Counter,
    /// Rotations (re-signings of an SVID that existed).
    pub rotations: Counter,
    /// Signing requests the CA refused.
    pub sign_errors: Counter,
    /// 1 while a sync stream to the CA is open.
    pub connected: Gauge,
    /// The central policy revision the agent holds (0: none).
    pub policy_revision: Gauge,
    /// Reconnection attempts.
    pub reconnects: Counter,
}

struct Held {
    svid: Arc<Svid>,
    revision: i64,
    renew_at: i64,
}

/// Why an agent without an identity stopped trying.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestFailed {
    /// The CA refused the join token (unknown, used, or expired).
    #[error("the CA refused the join token: {0}")]
    Refused(String),
    /// The CA could not be reached, or kept failing, for this long.
    #[error("could not attest to the CA within {0:?}")]
    TimedOut(Duration),
}

/// How often the manager looks whether what the workloads' streams have changed (a report is
/// sent only when it did).
pub const DELIVERY_CHECK: Duration = Duration::from_millis(100);

/// How often the refusals the proxies reported are forwarded to the CA (when there are any):
/// each report is an audit write, and a port scan of a proxy makes refusals.
pub const DENIAL_REPORT: Duration = Duration::from_secs(5);

/// How many CRL set digests the agent remembers to report which set its streams have.
const CRL_DIGESTS_KEPT: usize = 64;

/// The agent's state and its connection to the CA.
pub struct Manager {
    td: TrustDomain,
    addrs: Vec<String>,
    data_dir: PathBuf,
    bootstrap_bundle: PathBuf,
    rotation_fraction: f64,
    max_backoff: Duration,
    join_token: Option<zeroize::Zeroizing<String>>,
    /// The agent holds (or held) an identity: failures are then never fatal.
    attested: bool,
    attest_timeout: Duration,
    snapshots: watch::Sender<Arc<Snapshot>>,
    channel: Arc<ArcSwapOption<NodeClient<Channel>>>,
    entries: BTreeMap<String, Arc<Entry>>,
    held: HashMap<String, Held>,
    bundle: Arc<Bundle>,
    synced: bool,
    /// The CA asked for the agent's own SVID to be renewed now (`meshid-ca agent rotate`).
    renew_requested: bool,
    /// Tainted intermediates (DER): an SVID whose chain holds one is re-issued now.
    tainted_x509: std::collections::HashSet<Vec<u8>>,
    /// Tainted JWT key ids.
    tainted_jwt: Arc<std::collections::BTreeSet<String>>,
    /// The CA's CRLs (DER), as received.
    crls: Arc<Vec<Vec<u8>>>,
    /// How many CRL sets were received (the streams report which they handed over).
    crl_generation: u64,
    /// The digests ([`meshid_api::tls::revocation::set_digest`]) of the last CRL sets by
    /// generation, newest last: the CA is told the one every stream has been handed, which may
    /// be older than the newest while the sets change faster than streams take them.
    crl_digests: std::collections::VecDeque<(u64, String)>,
    /// The central policy in force, as last received from the CA (or read back from
    /// [`client::POLICY_FILE`] at start).
    policy: Arc<crate::cache::CentralPolicy>,
    /// `policy` merged, for the proxies (`None` until one is held).
    policy_merged: Option<Arc<meshid_policy::Policy>>,
    /// The federated trust domains' bundles, as last received from the CA (or read back from
    /// [`client::FEDERATED_FILE`] at start).
    federated: Arc<crate::cache::Federated>,
    /// Entries whose SVID held a CRL lists: re-issued now.
    revoked_held: std::collections::HashSet<String>,
    /// What the Workload API's X.509 streams have been handed, reported to the CA.
    delivery: Arc<Delivery>,
    /// The refusals the proxies reported (`PolicyDelivery.ReportDenials`), forwarded to the CA.
    denials: Arc<std::sync::Mutex<meshid_api::denials::Tally>>,
    /// Counters.
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("trust_domain", &self.td)
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// Mints JWT-SVIDs through the manager's current CA connection.
#[derive(Clone)]
pub struct Minter {
    channel: Arc<ArcSwapOption<NodeClient<Channel>>>,
}

#[tonic::async_trait]
impl JwtMinter for Minter {
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<(String, i64), MintError> {
        let Some(client) = self.channel.load_full() else {
            return Err(MintError::Unavailable("not connected to the CA".into()));
        };
        let mut client = (*client).clone();
        let req = node::MintJwtSvidRequest {
            entry_id: entry_id.to_owned(),
            audience: audience.to_vec(),
        };
        match tokio::time::timeout(Duration::from_secs(5), client.mint_jwt_svid(req)).await {
            Err(_) => Err(MintError::Unavailable(
                "the CA did not answer in time".into(),
            )),
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                Err(MintError::Unavailable(s.message().to_owned()))
            }
            Ok(Err(s)) => Err(MintError::Refused(s.message().to_owned())),
            Ok(Ok(r)) => {
                let r = r.into_inner();
                Ok((r.token, r.expires_at))
            }
        }
    }
}

/// How one connected session ended.
enum SessionEnd {
    /// Reconnect at once (the agent SVID was renewed).
    Reconnect,
    /// Shutting down.
    Shutdown,
}

fn entry_from_wire(e: node::Entry) -> Option<Entry> {
    let spiffe_id = SpiffeId::new(&e.spiffe_id).ok()?;
    let mut selectors = e.selectors;
    selectors.sort();
    Some(Entry {
        id: e.id,
        spiffe_id,
        selectors,
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names,
        federates_with: e.federates_with,
        hint: e.hint,
        revision: e.revision,
    })
}

/// Whether an agent whose current roots (`trusted`) no longer authenticate the CA may try the
/// configured trust bundle (`configured`, its roots), given the digest recorded when that file
/// was last used (`seen`). Only a file the operator changed since counts: the install-time
/// file still holds the roots of before a rotation, and falling back to it would let whoever
/// holds a retired root's key (the reason to rotate, often) pose as the CA.
fn fallback_allowed(
    configured: &[Vec<u8>],
    trusted: &[Vec<u8>],
    seen: Option<&str>,
) -> Result<(), &'static str> {
    if configured.is_empty() {
        return Err("it holds no readable certificates");
    }
    if client::roots_digest(configured) == client::roots_digest(trusted) {
        return Err("it holds the roots the agent trusts already");
    }
    match seen {
        Some(d) if d == client::roots_digest(configured) => Err(
            "it has not changed since the agent last used it (a file from before a rotation must not restore trust in a retired root)",
        ),
        _ => Ok(()),
    }
}

impl Manager {
    /// A manager for `config`; `join_token` is used only if no persisted agent identity exists.
    pub fn new(
        config: &Config,
        join_token: Option<String>,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::empty(config.trust_domain.clone())));
        let m = Self {
            td: config.trust_domain.clone(),
            addrs: config.server_addresses.clone(),
            data_dir: config.data_dir.clone(),
            bootstrap_bundle: config.trust_bundle_path.clone(),
            rotation_fraction: config.rotation_fraction,
            max_backoff: config.max_backoff,
            join_token: join_token.map(zeroize::Zeroizing::new),
            attested: false,
            renew_requested: false,
            tainted_x509: std::collections::HashSet::new(),
            tainted_jwt: Arc::default(),
            crls: Arc::default(),
            crl_generation: 0,
            crl_digests: [(0, meshid_api::tls::revocation::set_digest(&[]))].into(),
            revoked_held: Default::default(),
            policy: Arc::default(),
            policy_merged: None,
            federated: Arc::default(),
            attest_timeout: config.attest_timeout,
            snapshots: tx,
            channel: Arc::new(ArcSwapOption::empty()),
            entries: BTreeMap::new(),
            held: HashMap::new(),
            bundle: Arc::new(Bundle::default()),
            synced: false,
            stats: Arc::new(Stats::default()),
            delivery: Arc::new(Delivery::default()),
            denials: Arc::default(),
        };
        (m, rx)
    }

    /// The delivery record the Workload API's streams write and the manager reports to the CA.
    pub fn delivery(&self) -> Arc<Delivery> {
        Arc::clone(&self.delivery)
    }

    /// The refusals the Workload API takes from proxies and the manager forwards to the CA.
    pub fn denials(&self) -> Arc<std::sync::Mutex<meshid_api::denials::Tally>> {
        Arc::clone(&self.denials)
    }

    /// Forwards the refusals counted since the last call, if any; on failure they are counted
    /// again for the next one. `Ok(false)`: the CA does not take them.
    async fn forward_denials(
        &self,
        client: &mut NodeClient<Channel>,
    ) -> Result<bool, tonic::Status> {
        let (counts, dropped) = {
            let mut t = self.denials.lock().unwrap_or_else(|p| p.into_inner());
            if t.is_empty() {
                return Ok(true);
            }
            t.take()
        };
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "refusals past the report's bound were not forwarded"
            );
        }
        if counts.is_empty() {
            return Ok(true);
        }
        let report = node::NodeDenialReport {
            denials: counts
                .iter()
                .map(|(k, n, at)| node::NodeDenialCount {
                    caller: k.caller.clone(),
                    callee: k.callee.clone(),
                    rule: k.rule.clone(),
                    count: *n,
                    last_at: *at,
                })
                .collect(),
        };
        match client.report_denials(report).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(false),
            Err(s) => {
                let mut t = self.denials.lock().unwrap_or_else(|p| p.into_inner());
                t.put_back(counts);
                // Too fast for the CA: they go with the next report, the session goes on.
                if s.code() == tonic::Code::ResourceExhausted {
                    return Ok(true);
                }
                Err(s)
            }
        }
    }

    /// What to report: the bundle sequence every open X.509 stream has been handed (the one
    /// held when none is open), how many are open, the digest of the CRL set every stream
    /// has been handed (empty when that set is too old to be remembered), and the policy
    /// revision every open policy stream has been handed (the one held when none is open).
    fn delivery_report(&self) -> node::DeliveryReport {
        let delivered = self.delivery.delivered();
        let generation = delivered.map_or(self.crl_generation, |d| d.crls);
        let crl_digest = self
            .crl_digests
            .iter()
            .rev()
            .find(|(g, _)| *g == generation)
            .map(|(_, d)| d.clone())
            .unwrap_or_default();
        node::DeliveryReport {
            bundle_sequence: delivered.map_or(self.bundle.sequence, |d| d.bundle),
            x509_streams: u32::try_from(self.delivery.open_streams()).unwrap_or(u32::MAX),
            crl_digest,
            policy_revision: self
                .delivery
                .policy_delivered()
                .unwrap_or(self.policy.revision),
        }
    }

    /// The JWT minter for the Workload API.
    pub fn minter(&self) -> Minter {
        Minter {
            channel: Arc::clone(&self.channel),
        }
    }

    /// The roots to authenticate the CA with: the latest bundle received, else the bootstrap
    /// file.
    fn roots(&self) -> Result<Vec<Vec<u8>>, ClientError> {
        if !self.bundle.x509_authorities.is_empty() {
            return Ok(self.bundle.x509_authorities.clone());
        }
        let saved = self.data_dir.join(client::BUNDLE_FILE);
        if saved.exists() {
            return client::read_certs(&saved);
        }
        client::read_certs(&self.bootstrap_bundle)
    }

    /// Connects to the CA, authenticating it with [`Self::roots`]. When those no longer
    /// authenticate it (a root rotation this agent was away for) and the configured trust
    /// bundle (`--trust-bundle`) holds other roots, tries those: an operator who installed the
    /// current bundle there re-bootstraps the agent without touching its data directory.
    async fn connect_ca(
        &mut self,
        identity: Option<&AgentIdentity>,
    ) -> Result<NodeClient<Channel>, ClientError> {
        let roots = self.roots()?;
        match client::connect(&self.addrs, &self.td, &roots, identity).await {
            Err(ClientError::ServerUntrusted { addr, detail }) => {
                let configured = client::read_certs(&self.bootstrap_bundle).unwrap_or_default();
                let seen = self.trust_bundle_seen();
                if let Err(why) = fallback_allowed(&configured, &roots, seen.as_deref()) {
                    tracing::debug!(bundle = %self.bootstrap_bundle.display(), "not re-bootstrapping from the configured trust bundle: {why}");
                    return Err(ClientError::ServerUntrusted { addr, detail });
                }
                let client = client::connect(&self.addrs, &self.td, &configured, identity).await?;
                tracing::warn!(
                    bundle = %self.bootstrap_bundle.display(),
                    "the CA is not authenticated by the trust bundle last received, but is by the configured one, which changed since this agent last used it: re-bootstrapped from {}",
                    self.bootstrap_bundle.display()
                );
                client::write_file(
                    &self.data_dir.join(client::TRUST_BUNDLE_SEEN_FILE),
                    client::roots_digest(&configured).as_bytes(),
                    0o644,
                )?;
                self.bundle = Arc::new(Bundle {
                    x509_authorities: configured,
                    jwt_authorities_json: String::new(),
                    sequence: 0,
                });
                Ok(client)
            }
            other => other,
        }
    }

    /// The recorded digest of the configured trust bundle as last used.
    fn trust_bundle_seen(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join(client::TRUST_BUNDLE_SEEN_FILE))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Records the configured trust bundle as used, unless a record exists: at the first start
    /// this is the file the agent bootstraps from.
    fn note_configured_bundle(&self) {
        if self.trust_bundle_seen().is_some() {
            return;
        }
        if let Ok(certs) = client::read_certs(&self.bootstrap_bundle) {
            if let Err(e) = client::write_file(
                &self.data_dir.join(client::TRUST_BUNDLE_SEEN_FILE),
                client::roots_digest(&certs).as_bytes(),
                0o644,
            ) {
                tracing::warn!(error = %e, "could not record the configured trust bundle");
            }
        }
    }

    /// The persisted agent identity if usable, else a fresh one from the join token.
    async fn identity(&mut self) -> Result<AgentIdentity, ClientError> {
        if let Some(id) = AgentIdentity::load(&self.data_dir)? {
            if id.not_after > now() + 5 {
                return Ok(id);
            }
            tracing::warn!(spiffe_id = %id.spiffe_id, "persisted agent SVID has expired; attesting again");
        }
        // The token is kept until an attestation succeeds: the CA may not be up yet.
        let Some(token) = self.join_token.as_ref() else {
            return Err(ClientError::Malformed(
                "no usable agent SVID in the data directory and no join token: run with --join-token (from `meshid-ca token generate`)".into(),
            ));
        };
        let token = token.to_string();
        let mut client = self.connect_ca(None).await?;
        let (key, csr) = client::key_and_csr()?;
        let resp = client
            .attest_join_token(node::AttestJoinTokenRequest { token, csr })
            .await?
            .into_inner();
        let id = AgentIdentity::new(resp.chain, key)?;
        id.save(&self.data_dir)?;
        self.join_token = None;
        self.attested = true;
        if let Some(b) = resp.bundle {
            self.apply_bundle(b)?;
        }
        tracing::info!(spiffe_id = %id.spiffe_id, not_after = id.not_after, "attested to the CA");
        Ok(id)
    }

    fn apply_bundle(&mut self, b: node::Bundle) -> Result<(), ClientError> {
        if b.x509_authorities.is_empty() {
            return Err(ClientError::Malformed(
                "CA sent a bundle without X.509 authorities".into(),
            ));
        }
        // A bundle that keeps none of the roots trusted now is no rotation (a rotation adds
        // the new root before it drops the old): it would hand trust to whoever sent it.
        let trusted = self.roots()?;
        if !shares_a_root(&trusted, &b.x509_authorities) {
            tracing::error!(
                sequence = b.sequence,
                "refused a trust bundle that keeps none of the roots trusted now (no overlap)"
            );
            return Err(ClientError::Malformed(
                "the CA sent a trust bundle that keeps none of the roots trusted now; refused \
                 (a root rotation publishes the new root beside the old one first)"
                    .into(),
            ));
        }
        let bundle = Bundle {
            x509_authorities: b.x509_authorities,
            jwt_authorities_json: b.jwt_authorities_json,
            sequence: b.sequence,
        };
        if *self.bundle != bundle {
            client::write_file(
                &self.data_dir.join(client::BUNDLE_FILE),
                meshid_api::files::pem(
                    "CERTIFICATE",
                    bundle.x509_authorities.iter().map(Vec::as_slice),
                )
                .as_bytes(),
                0o644,
            )?;
            tracing::info!(sequence = bundle.sequence, "trust bundle updated");
            self.bundle = Arc::new(bundle);
        }
        Ok(())
    }

    fn apply(&mut self, update: node::SyncUpdate) -> Result<(), ClientError> {
        if update.renew_agent_svid {
            tracing::info!("the CA asks for this agent's SVID to be renewed now");
            self.renew_requested = true;
        }
        if let Some(b) = update.bundle {
            self.apply_bundle(b)?;
        }
        if update.taint_set {
            let x509: std::collections::HashSet<Vec<u8>> =
                update.tainted_x509_authorities.into_iter().collect();
            if x509 != self.tainted_x509 && !x509.is_empty() {
                tracing::warn!(
                    tainted = x509.len(),
                    "the CA tainted an issuing key: re-issuing every SVID it signed now"
                );
                // Our own SVID too, if a tainted key signed it.
                self.renew_requested = true;
            }
            self.tainted_x509 = x509;
            self.tainted_jwt = Arc::new(update.tainted_jwt_key_ids.into_iter().collect());
        }
        if update.crl_set && *self.crls != update.crls {
            // A list that does not parse is not applied: the previous one stays (a CRL only
            // withdraws trust, so keeping more of it is the safe side).
            match meshid_api::tls::revocation::Revocations::from_der(&update.crls) {
                Ok(revoked) => {
                    tracing::info!(
                        crls = update.crls.len(),
                        revoked = revoked.len(),
                        "certificate revocation lists received"
                    );
                    for (id, h) in &self.held {
                        let chain: Vec<CertificateDer<'_>> = h
                            .svid
                            .chain
                            .iter()
                            .map(|c| CertificateDer::from(c.as_slice()))
                            .collect();
                        if let Some(serial) = revoked.revoked_in(&chain) {
                            tracing::warn!(entry_id = %id, serial, "an SVID held here is revoked: re-issuing it now");
                            self.revoked_held.insert(id.clone());
                        }
                    }
                    self.crl_generation += 1;
                    if self.crl_digests.len() == CRL_DIGESTS_KEPT {
                        self.crl_digests.pop_front();
                    }
                    self.crl_digests.push_back((
                        self.crl_generation,
                        meshid_api::tls::revocation::set_digest(&update.crls),
                    ));
                    self.crls = Arc::new(update.crls);
                }
                Err(e) => {
                    tracing::error!(error = %e, "the CA sent a CRL that does not parse; keeping the previous lists")
                }
            }
        }
        if update.policy_set {
            self.take_policy(crate::cache::CentralPolicy {
                revision: update.policy_revision,
                documents: update
                    .policy
                    .into_iter()
                    .map(|d| (d.name, d.text))
                    .collect(),
            });
        }
        if update.federated_set {
            self.take_federated(update.federated_bundles);
        }
        if update.full {
            self.entries.clear();
        }
        for id in update.deleted_ids {
            self.entries.remove(&id);
        }
        for e in update.upserts {
            let id = e.id.clone();
            match entry_from_wire(e) {
                Some(entry) => {
                    self.entries.insert(id, Arc::new(entry));
                }
                None => {
                    tracing::warn!(entry_id = %id, "CA sent an entry with an invalid SPIFFE ID; ignored")
                }
            }
        }
        self.held.retain(|id, _| self.entries.contains_key(id));
        self.synced = true;
        Ok(())
    }

    fn publish(&self) {
        let identities = self
            .entries
            .values()
            .map(|e| Identity {
                entry: Arc::clone(e),
                svid: self.held.get(&e.id).map(|h| Arc::clone(&h.svid)),
            })
            .collect();
        let snap = Snapshot {
            trust_domain: self.td.clone(),
            bundle: Arc::clone(&self.bundle),
            identities,
            synced: self.synced,
            tainted_jwt_kids: Arc::clone(&self.tainted_jwt),
            crls: Arc::clone(&self.crls),
            crl_generation: self.crl_generation,
            policy: Arc::clone(&self.policy),
            policy_merged: self.policy_merged.clone(),
            federated: Arc::clone(&self.federated),
        };
        self.snapshots.send_replace(Arc::new(snap));
    }

    /// Takes the central policy the CA sent, unless it is the one held or it does not merge
    /// (then the one held stays in force: an invalid policy never reaches a proxy), and writes
    /// it to [`client::POLICY_FILE`] for the next start.
    fn take_policy(&mut self, policy: crate::cache::CentralPolicy) {
        if policy == *self.policy {
            return;
        }
        let merged = match policy.merged() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(revision = policy.revision, error = %e, "the CA sent a central policy that does not merge; keeping revision {}", self.policy.revision);
                return;
            }
        };
        match serde_json::to_vec(&policy) {
            Ok(json) => {
                if let Err(e) =
                    client::write_file(&self.data_dir.join(client::POLICY_FILE), &json, 0o600)
                {
                    tracing::warn!(error = %e, "cannot keep the central policy for the next start");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the central policy"),
        }
        tracing::info!(
            revision = policy.revision,
            documents = policy.documents.len(),
            "central policy received"
        );
        self.hold_policy(policy, merged);
    }

    /// Puts `policy` (merged: `merged`) in force here.
    fn hold_policy(&mut self, policy: crate::cache::CentralPolicy, merged: meshid_policy::Policy) {
        self.stats
            .policy_revision
            .set(i64::try_from(policy.revision).unwrap_or(i64::MAX));
        self.policy = Arc::new(policy);
        self.policy_merged = Some(Arc::new(merged));
    }

    /// Takes the federated bundles the CA sent (the complete set): each must be of another
    /// trust domain, with X.509 authorities usable as trust anchors; one that is not is left
    /// out, logged. Keeps them in [`client::FEDERATED_FILE`] (public data: roots and public
    /// keys) for a start while the CA is away.
    fn take_federated(&mut self, bundles: Vec<node::Bundle>) {
        let mut set = crate::cache::Federated::new();
        for b in bundles {
            match self.federated_bundle(&b) {
                Ok(td) => {
                    set.insert(
                        td,
                        Arc::new(Bundle {
                            x509_authorities: b.x509_authorities,
                            jwt_authorities_json: b.jwt_authorities_json,
                            sequence: b.sequence,
                        }),
                    );
                }
                Err(why) => {
                    tracing::error!(trust_domain = %b.trust_domain, reason = %why, "refused a federated bundle from the CA")
                }
            }
        }
        if set == *self.federated {
            return;
        }
        let kept: std::collections::BTreeMap<&String, KeptBundle> =
            set.iter().map(|(td, b)| (td, KeptBundle::of(b))).collect();
        match serde_json::to_vec(&kept) {
            Ok(json) => {
                if let Err(e) =
                    client::write_file(&self.data_dir.join(client::FEDERATED_FILE), &json, 0o644)
                {
                    tracing::warn!(error = %e, "cannot keep the federated bundles for the next start");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the federated bundles"),
        }
        tracing::info!(trust_domains = ?set.keys().collect::<Vec<_>>(), "federated bundles received");
        self.federated = Arc::new(set);
    }

    /// The trust domain of a federated bundle the CA sent, if it is usable.
    fn federated_bundle(&self, b: &node::Bundle) -> Result<String, String> {
        let td = TrustDomain::new(&b.trust_domain).map_err(|e| e.to_string())?;
        if td == self.td {
            return Err("it names this agent's own trust domain".into());
        }
        let roots = b
            .x509_authorities
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        meshid_api::tls::PeerBundles::from_roots([(td.clone(), roots)])
            .map_err(|e| e.to_string())?;
        Ok(td.to_string())
    }

    /// Reads back the federated bundles kept by [`Self::take_federated`] (a file that cannot be
    /// read is ignored, with a warning: the CA sends them again).
    fn load_federated(&mut self) {
        let path = self.data_dir.join(client::FEDERATED_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the kept federated bundles");
                return;
            }
        };
        let kept: std::collections::BTreeMap<String, KeptBundle> = match serde_json::from_slice(
            &text,
        ) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the kept federated bundles are not readable; ignored");
                return;
            }
        };
        let bundles = kept
            .into_iter()
            .filter_map(|(td, k)| k.into_wire(td))
            .collect();
        self.take_federated(bundles);
    }

    /// Reads back the central policy kept by [`Self::take_policy`] (a file that cannot be read
    /// or does not merge is ignored, with a warning: the CA sends the policy again).
    fn load_policy(&mut self) {
        let path = self.data_dir.join(client::POLICY_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the kept central policy");
                return;
            }
        };
        match serde_json::from_slice::<crate::cache::CentralPolicy>(&text).map(|p| (p.merged(), p))
        {
            Ok((Ok(merged), p)) => {
                tracing::info!(
                    revision = p.revision,
                    "central policy read back from the last run"
                );
                self.hold_policy(p, merged);
            }
            Ok((Err(_), _)) => {
                tracing::warn!(path = %path.display(), "the kept central policy does not merge; ignored")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the kept central policy is not readable; ignored")
            }
        }
    }

    fn renew_at(&self, not_before: i64, not_after: i64) -> i64 {
        let life = (not_after - not_before).max(1) as f64;
        let jitter = rand::thread_rng().gen_range(0.9..1.1);
        not_before + (life * self.rotation_fraction * jitter) as i64
    }

    /// Signs every entry that has no SVID, a stale one (entry changed) or one past its
    /// rotation point. Returns when everything due has been attempted.
    async fn sign_due(&mut self, client: &mut NodeClient<Channel>) -> Result<(), ClientError> {
        let t = now();
        let tainted = |h: &Held| {
            !self.tainted_x509.is_empty()
                && h.svid
                    .chain
                    .get(1)
                    .is_some_and(|issuer| self.tainted_x509.contains(issuer))
        };
        let mut due: Vec<(i64, Arc<Entry>)> = self
            .entries
            .values()
            .filter_map(|e| match self.held.get(&e.id) {
                None => Some((i64::MIN, Arc::clone(e))),
                Some(h)
                    if h.revision != e.revision
                        || t >= h.renew_at
                        || tainted(h)
                        || self.revoked_held.contains(&e.id) =>
                {
                    Some((h.svid.not_after, Arc::clone(e)))
                }
                Some(_) => None,
            })
            .collect();
        // Soonest expiry first (missing ones before all): what would lapse first is replaced
        // first when many are due at once (a taint).
        due.sort_by_key(|(not_after, _)| *not_after);
        let due: Vec<Arc<Entry>> = due.into_iter().map(|(_, e)| e).collect();
        for chunk in due.chunks(BATCH) {
            let mut keys = Vec::with_capacity(chunk.len());
            let mut requests = Vec::with_capacity(chunk.len());
            for e in chunk {
                let (key, csr) = client::key_and_csr()?;
                keys.push(key);
                requests.push(node::SignRequest {
                    entry_id: e.id.clone(),
                    csr,
                });
            }
            let resp = client
                .batch_sign_x509(node::BatchSignX509Request { requests })
                .await?
                .into_inner();
            for ((entry, key), result) in chunk.iter().zip(keys).zip(resp.results) {
                if !result.error.is_empty() || result.chain.is_empty() {
                    self.stats.sign_errors.inc();
                    tracing::warn!(entry_id = %entry.id, error = %result.error, "CA refused to sign");
                    continue;
                }
                let not_before = result
                    .chain
                    .first()
                    .and_then(|c| {
                        x509_parser::parse_x509_certificate(c)
                            .ok()
                            .map(|(_, c)| c.validity().not_before.timestamp())
                    })
                    .unwrap_or(t);
                // The lifetime counts from when we asked (`t`), not from the backdated
                // notBefore: with short TTLs the backdating would put the renewal point in
                // the past and the agent would re-sign on every wake.
                let renew_at = self.renew_at(t.max(not_before), result.expires_at);
                let rotated = self.held.contains_key(&entry.id);
                self.revoked_held.remove(&entry.id);
                self.held.insert(
                    entry.id.clone(),
                    Held {
                        svid: Arc::new(Svid {
                            chain: result.chain,
                            key_pkcs8: key,
                            serial: result.serial,
                            not_before,
                            not_after: result.expires_at,
                        }),
                        revision: entry.revision,
                        renew_at,
                    },
                );
                self.stats.signed.inc();
                if rotated {
                    self.stats.rotations.inc();
                }
                tracing::debug!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, not_after = result.expires_at, rotated, "SVID signed");
            }
        }
        Ok(())
    }

    fn next_wakeup(&self, identity: &AgentIdentity) -> i64 {
        let agent_renew = identity.not_before
            + ((identity.not_after - identity.not_before) as f64 * self.rotation_fraction) as i64;
        self.held
            .values()
            .map(|h| h.renew_at)
            .fold(agent_renew, i64::min)
    }

    async fn renew_agent(&self, client: &mut NodeClient<Channel>) -> Result<(), ClientError> {
        let (key, csr) = client::key_and_csr()?;
        let resp = client
            .renew_agent(node::RenewAgentRequest { csr })
            .await?
            .into_inner();
        let id = AgentIdentity::new(resp.chain, key)?;
        id.save(&self.data_dir)?;
        tracing::info!(spiffe_id = %id.spiffe_id, not_after = id.not_after, "agent SVID renewed");
        Ok(())
    }

    /// One connected session: open the sync stream and serve it until it fails, the agent
    /// SVID needs renewal, or shutdown.
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, ClientError> {
        let identity = self.identity().await?;
        let mut client = self.connect_ca(Some(&identity)).await?;
        let mut stream = client.sync(node::SyncRequest {}).await?.into_inner();
        self.channel.store(Some(Arc::new(client.clone())));
        self.stats.connected.set(1);
        tracing::info!(spiffe_id = %identity.spiffe_id, "connected to the CA");
        // Delivery is reported when it changes (and once per session); a CA without the call
        // (older) is not asked again in this session.
        let mut reported: Option<node::DeliveryReport> = None;
        let mut report_tick = tokio::time::interval(DELIVERY_CHECK);
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reporting = true;
        let mut denial_tick = tokio::time::interval(DENIAL_REPORT);
        denial_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut forwarding = true;
        // The timer is set when the next wake-up changes, not on every pass of the loop: the
        // loop also turns for each delivery check, and a timer made anew each time would never
        // fire.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut timer_for: Option<i64> = None;
        loop {
            let wake = self.next_wakeup(&identity);
            if timer_for != Some(wake) {
                let wait = Duration::from_secs(u64::try_from(wake - now()).unwrap_or(0).max(1));
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
                timer_for = Some(wake);
            }
            tokio::select! {
                msg = stream.message() => {
                    match msg? {
                        Some(update) => {
                            self.apply(update)?;
                            // Apply every update already received before signing, so that a
                            // burst of entry changes is signed in batches, not one call each.
                            while let Some(next) = stream.message().now_or_never() {
                                match next? {
                                    Some(update) => self.apply(update)?,
                                    None => return Err(ClientError::Rpc(tonic::Status::unavailable("the CA closed the sync stream"))),
                                }
                            }
                            // Publish entry changes at once (deletions matter), then again
                            // once signed.
                            self.publish();
                            self.sign_due(&mut client).await?;
                            self.publish();
                            if std::mem::take(&mut self.renew_requested) {
                                self.renew_agent(&mut client).await?;
                                return Ok(SessionEnd::Reconnect);
                            }
                        }
                        None => return Err(ClientError::Rpc(tonic::Status::unavailable("the CA closed the sync stream"))),
                    }
                }
                () = &mut timer => {
                    timer_for = None;
                    let t = now();
                    let agent_renew = identity.not_before + ((identity.not_after - identity.not_before) as f64 * self.rotation_fraction) as i64;
                    if t >= agent_renew {
                        self.renew_agent(&mut client).await?;
                        return Ok(SessionEnd::Reconnect);
                    }
                    self.sign_due(&mut client).await?;
                    self.publish();
                }
                _ = report_tick.tick(), if reporting && self.synced => {
                    let report = self.delivery_report();
                    if reported.as_ref() != Some(&report) {
                        match client.report_delivery(report.clone()).await {
                            Ok(_) => reported = Some(report),
                            Err(s) if s.code() == tonic::Code::Unimplemented => {
                                tracing::info!("the CA does not take delivery reports; not reporting");
                                reporting = false;
                            }
                            Err(s) => return Err(ClientError::Rpc(s)),
                        }
                    }
                }
                _ = denial_tick.tick(), if forwarding => {
                    match self.forward_denials(&mut client).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!("the CA does not take denial reports; not forwarding");
                            forwarding = false;
                        }
                        Err(s) => return Err(ClientError::Rpc(s)),
                    }
                }
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    /// Runs until `shutdown` turns true: sessions with the CA, and backoff between them. Ends
    /// with an error only while the agent has no identity: the CA refused its join token, or
    /// attesting kept failing for `attest_timeout`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AttestFailed> {
        let mut backoff = Duration::from_millis(200);
        let first = std::time::Instant::now();
        if !self.attested {
            self.attested = matches!(AgentIdentity::load(&self.data_dir), Ok(Some(_)));
        }
        self.note_configured_bundle();
        self.load_policy();
        self.load_federated();
        self.publish();
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let started = std::time::Instant::now();
            let result = self.session(&mut shutdown).await;
            self.channel.store(None);
            self.stats.connected.set(0);
            match result {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Reconnect) => {
                    backoff = Duration::from_millis(200);
                    continue;
                }
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(200);
                    }
                    let denied = matches!(&e, ClientError::Rpc(s) if s.code() == tonic::Code::PermissionDenied);
                    if !self.attested {
                        if denied {
                            tracing::error!(error = %e, "the CA refuses the join token; get a new one with `meshid-ca token generate`");
                            return Err(AttestFailed::Refused(e.to_string()));
                        }
                        if first.elapsed() >= self.attest_timeout {
                            tracing::error!(error = %e, waited = ?self.attest_timeout, "could not attest to the CA; giving up");
                            return Err(AttestFailed::TimedOut(self.attest_timeout));
                        }
                    }
                    if let ClientError::ServerUntrusted { .. } = &e {
                        tracing::error!(
                            error = %e,
                            bundle_sequence = self.bundle.sequence,
                            trust_bundle = %self.bootstrap_bundle.display(),
                            "cannot authenticate the CA with this agent's trust bundle: the trust domain's root was most likely rotated (and the old one retired) while this agent was away. To fix: on the CA host run `meshid-ca bundle show > bundle.pem`, check it, and install it as this agent's --trust-bundle file ({}); the agent retries with it on its own. If the agent's SVID has expired meanwhile, it also needs a new join token (`meshid-ca token generate`). Serving cached SVIDs until they expire",
                            self.bootstrap_bundle.display()
                        );
                    } else if let ClientError::ClientRefused { .. } = &e {
                        tracing::error!(error = %e, "the CA does not accept this agent's SVID (it chains to a root the trust domain no longer trusts, or the agent was evicted): attest again with a new join token (`meshid-ca token generate`, then --join-token); serving cached SVIDs until they expire");
                    } else if denied {
                        tracing::error!(error = %e, "the CA refuses this agent (evicted or banned?); serving cached SVIDs until they expire; re-attest with a new join token");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?backoff, "CA session ended; serving cached SVIDs and reconnecting");
                    }
                    self.stats.reconnects.inc();
                    let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.0));
                    tokio::select! {
                        _ = tokio::time::sleep(jittered) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
    }
}

/// Whether `new` keeps at least one of the `trusted` roots (DER).
fn shares_a_root(trusted: &[Vec<u8>], new: &[Vec<u8>]) -> bool {
    new.iter().any(|root| trusted.contains(root))
}

#[cfg(test)]
mod bundle_tests {
    use super::shares_a_root;

    #[test]
    fn a_bundle_must_keep_a_trusted_root() {
        let (a, b, c) = (vec![1u8], vec![2u8], vec![3u8]);
        let ab = [a.clone(), b.clone()];
        assert!(
            shares_a_root(std::slice::from_ref(&a), &ab),
            "rotation: new beside old"
        );
        assert!(shares_a_root(&ab, &[b]), "rotation: old dropped");
        assert!(
            !shares_a_root(&ab, std::slice::from_ref(&c)),
            "every root replaced"
        );
        assert!(!shares_a_root(&[a], &[]));
        assert!(!shares_a_root(&[], &[c]));
    }
}

#[cfg(test)]
mod tests {
    use super::fallback_allowed;
    use crate::client::roots_digest;

    #[test]
    fn the_configured_bundle_is_a_fallback_only_once_it_changed() {
        let (old, new) = (vec![b"old root".to_vec()], vec![b"new root".to_vec()]);
        // An agent that followed the rotation trusts only the new root; its install-time file
        // (recorded when it first started) holds the retired one: no fallback to it.
        let seen = roots_digest(&old);
        assert!(fallback_allowed(&old, &new, Some(&seen)).is_err());
        // The same roots in another order or layout are the same file.
        let both = vec![b"a".to_vec(), b"b".to_vec()];
        let reordered = vec![b"b".to_vec(), b"a".to_vec(), b"a".to_vec()];
        assert!(fallback_allowed(&reordered, &new, Some(&roots_digest(&both))).is_err());
        // The operator installed the current bundle: allowed.
        assert!(fallback_allowed(&new, &old, Some(&seen)).is_ok());
        // Nothing recorded (never started with this data directory): allowed.
        assert!(fallback_allowed(&new, &old, None).is_ok());
        // The roots it trusts already, or nothing readable: no point.
        assert!(fallback_allowed(&old, &old, None).is_err());
        assert!(fallback_allowed(&[], &old, None).is_err());
    }
}

/// A federated bundle as kept on disk: roots as base64 DER.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptBundle {
    x509_authorities: Vec<String>,
    jwt_authorities_json: String,
    sequence: u64,
}

impl KeptBundle {
    fn of(b: &Bundle) -> Self {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        Self {
            x509_authorities: b.x509_authorities.iter().map(|c| b64.encode(c)).collect(),
            jwt_authorities_json: b.jwt_authorities_json.clone(),
            sequence: b.sequence,
        }
    }

    fn into_wire(self, trust_domain: String) -> Option<node::Bundle> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let x509_authorities = self
            .x509_authorities
            .iter()
            .map(|c| b64.decode(c))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Some(node::Bundle {
            trust_domain,
            x509_authorities,
            jwt_authorities_json: self.jwt_authorities_json,
            sequence: self.sequence,
            refresh_hint: 0,
        })
    }
}
