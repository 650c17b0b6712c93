//! The CA's operations.
//!
//! [`Ca`] is the one place where an operation is validated, carried out, measured and written
//! to the audit log; the gRPC services (the admin API in [`crate::admin`], the node API in
//! [`crate::node`]) are thin wrappers over it. Errors reach the wire through exactly one
//! mapping, `From<ServiceError> for tonic::Status`.
//!
//! Changes that agents must hear about (entries, the bundle, evicted or banned agents) are
//! published on [`Ca::events`] after they are committed, in commit order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe::SpiffeId;
use tokio::sync::{broadcast, Mutex};
use tonic::Status;

use crate::audit::AuditEvent;
use crate::authority::{Authority, AuthorityError};
use crate::entry::{self, EntryError, EntryId, EntrySpec, RegistrationEntry};
use crate::metrics::{KindLabels, Metrics, SignLabels};
use crate::store::{AgentRecord, Datastore, StoreError};
use crate::svid::IssuedSvid;
use crate::token::JoinToken;

/// Errors of CA operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request is invalid.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// A request field is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The datastore refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// The audit log failed verification or could not be read.
    #[error(transparent)]
    Audit(#[from] crate::store::AuditVerifyError),
    /// The CA is shutting down and did not finish the change (it may or may not have been
    /// stored).
    #[error("the CA is shutting down; check the state and retry")]
    Interrupted,
    /// The agent may not have this (evicted, never attested, or banned).
    #[error("agent {id} {reason}")]
    AgentDenied {
        /// The agent's SPIFFE ID.
        id: SpiffeId,
        /// Why, e.g. "is banned".
        reason: &'static str,
    },
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::Entry(_) | ServiceError::InvalidArgument { .. } => {
                Status::invalid_argument(msg)
            }
            ServiceError::Store(StoreError::NotFound(_)) => Status::not_found(msg),
            ServiceError::Store(StoreError::AlreadyExists(_)) => Status::already_exists(msg),
            ServiceError::Store(StoreError::RevisionConflict { .. })
            | ServiceError::Store(StoreError::StateConflict { .. })
            | ServiceError::Authority(AuthorityError::Store(StoreError::StateConflict {
                ..
            })) => Status::aborted(msg),
            ServiceError::Authority(AuthorityError::Refused(_)) => Status::failed_precondition(msg),
            ServiceError::Store(StoreError::TokenRejected) | ServiceError::AgentDenied { .. } => {
                Status::permission_denied(msg)
            }
            ServiceError::Authority(
                AuthorityError::Svid(_) | AuthorityError::Jwt(_) | AuthorityError::ForeignId { .. },
            ) => Status::invalid_argument(msg),
            ServiceError::Interrupted => Status::unavailable(msg),
            // No connection to the database within the pool's wait: nothing was begun. The
            // client may retry; the agents keep serving what they hold.
            ServiceError::Store(StoreError::Backend(sqlx::Error::PoolTimedOut))
            | ServiceError::Authority(AuthorityError::Store(StoreError::Backend(
                sqlx::Error::PoolTimedOut,
            ))) => {
                tracing::warn!(error = %msg, "refused: the datastore cannot be reached");
                Status::unavailable(format!(
                    "the datastore cannot be reached, so nothing was changed; retry once it is back ({msg})"
                ))
            }
            _ => {
                tracing::error!(error = %msg, "internal error");
                Status::internal(msg)
            }
        }
    }
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// Why an agent's record says it may not be served.
const NOT_ATTESTED: &str =
    "is not attested (evicted, or never attested): attest again with a new join token";
const BANNED: &str = "is banned";
const SUPERSEDED: &str = "presented a superseded SVID: only the agent's current SVID is honoured \
     (a superseded one used after its successor means the old key may be stolen; audited)";

pub use crate::config::AGENT_SVID_OVERLAP;

/// The longest reason an operator may give for a forced rotation, in bytes.
pub const MAX_REASON_LEN: usize = 1024;

/// A reason an operator gave: at most [`MAX_REASON_LEN`] bytes, one line.
fn check_reason(reason: &str) -> Result<(), ServiceError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(invalid(
            "reason",
            format!("{} bytes is longer than {MAX_REASON_LEN}", reason.len()),
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err(invalid("reason", "contains a control character"));
    }
    Ok(())
}

pub mod ci;
mod denials;
pub mod effect;
pub mod federation;
pub mod mesh;
pub mod policy;
mod revoke;
mod root;

/// How many [`CaEvent`]s a slow subscriber may fall behind before it is told it lagged (and
/// resynchronizes from the store).
pub const EVENT_CAPACITY: usize = 1024;

/// A committed change that agents must hear about, published on [`Ca::events`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CaEvent {
    /// An entry was created or updated.
    EntryUpserted {
        /// The entry as stored now.
        entry: Arc<RegistrationEntry>,
        /// Its parent before an update (`None` on creation). When it differs from the new
        /// parent, the old parent's agent must drop the entry.
        old_parent: Option<SpiffeId>,
    },
    /// An entry was deleted.
    EntryDeleted {
        /// The entry's id.
        id: EntryId,
        /// Its parent.
        parent: SpiffeId,
    },
    /// The trust bundle's sequence changed.
    BundleChanged,
    /// An agent was evicted or banned: its open streams end.
    AgentRemoved {
        /// The agent's SPIFFE ID.
        spiffe_id: SpiffeId,
    },
    /// Every agent renews its own SVID now (and the node API its server SVID): a new root was
    /// activated, or the intermediate that signed them was tainted.
    RenewAgents,
    /// A CA key was tainted: agents re-issue what it signed.
    KeyTainted,
    /// The CRLs served changed (a revocation, or one expired from a list): agents get the
    /// complete set.
    CrlsChanged,
    /// The central policy has a new revision: agents get it whole.
    PolicyChanged,
    /// The federated bundles in force changed: agents get them all.
    FederationChanged,
    /// The operator asked an agent to renew its own SVID now (`agent rotate`).
    AgentRotate {
        /// The agent's SPIFFE ID.
        spiffe_id: SpiffeId,
    },
    /// An agent renewed its SVID: streams opened with another one end after the overlap.
    AgentRenewed {
        /// The agent's SPIFFE ID.
        spiffe_id: SpiffeId,
        /// The serial of its new SVID.
        serial: String,
    },
}

/// Serializes what must not interleave within one CA server.
#[derive(Debug, Default)]
struct Locks {
    /// Entry changes and their events, so events are published in commit order.
    entries: Mutex<()>,
    /// Read-check-write of agent records, so a renewal cannot undo an eviction or a ban.
    agents: Mutex<()>,
    /// Superseded agent SVIDs already audited as used (agent, serial): audited once each.
    superseded_seen: std::sync::Mutex<std::collections::HashSet<(SpiffeId, String)>>,
}

/// The CA: authority, datastore, metrics and defaults, shared by every API.
#[derive(Debug, Clone)]
pub struct Ca {
    /// Signing keys.
    pub authority: Arc<Authority>,
    /// The datastore.
    pub store: Arc<dyn Datastore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
    /// How long an agent's superseded SVID is still honoured after a renewal.
    pub agent_svid_overlap: Duration,
    /// Committed changes, for the node API's sync streams. Subscribe before reading the state
    /// the events apply to. Changes made by another CA server of the trust domain are not seen
    /// here.
    pub events: broadcast::Sender<CaEvent>,
    locks: Arc<Locks>,
    /// The bundle sequence each agent last reported delivered to this server (for `/metrics`).
    delivered: Arc<std::sync::Mutex<std::collections::BTreeMap<SpiffeId, u64>>>,
    /// Lifecycle steps this server took, watched until they are in effect across the mesh.
    effects: Arc<std::sync::Mutex<Vec<Watch>>>,
    /// The central policy in force (its newest revision), for the agents' sync streams.
    policy: Arc<std::sync::RwLock<Option<Arc<crate::store::PolicyRevision>>>>,
    /// The federated bundles in force and their refresh state.
    pub federation: Arc<crate::federation::Federation>,
    /// The CI issuers whose tokens are exchanged.
    pub ci: Arc<crate::ci::state::CiState>,
    /// Refused node API calls and admin reads, counted for the next `audit.summary` record.
    pub audit_counts: Arc<crate::audit::summary::Counts>,
}

/// What a lifecycle step waits for to be in effect ([`effect`]).
#[derive(Debug, Clone)]
pub(crate) enum Awaited {
    /// Every live agent delivered this bundle sequence (or a later one).
    Bundle(u64),
    /// Every live agent delivered a CRL set listing these serials (each until its certificate
    /// expires: then it is trusted nowhere anyway), by their expiry.
    Crls(std::collections::BTreeMap<String, i64>),
    /// These agents (when still live) hold another SVID than the serial they held then.
    Renewed(std::collections::HashMap<SpiffeId, String>),
    /// Every live agent reported this policy revision (or a later one) handed to every policy
    /// stream of its workloads (held, when it has none).
    Policy(u64),
    /// An X.509-SVID was issued for each of these entries after its `entry.rotated` record;
    /// the audit log is read from `cursor` on.
    Issued {
        entries: std::collections::HashSet<String>,
        rotated: std::collections::HashSet<String>,
        cursor: i64,
    },
}

/// A step being watched.
#[derive(Debug)]
pub(crate) struct Watch {
    kind: String,
    actor: String,
    details: serde_json::Value,
    started: Instant,
    awaited: Vec<Awaited>,
}

fn ttl(secs: u64, max: Duration, field: &'static str) -> Result<Option<Duration>, ServiceError> {
    if secs == 0 {
        return Ok(None);
    }
    if secs > max.as_secs() {
        return Err(invalid(
            field,
            format!("{secs}s is longer than the maximum {}s", max.as_secs()),
        ));
    }
    Ok(Some(Duration::from_secs(secs)))
}

impl Ca {
    /// A CA over these parts, with a fresh event channel.
    pub fn new(
        authority: Arc<Authority>,
        store: Arc<dyn Datastore>,
        metrics: Arc<Metrics>,
        join_token_ttl: Duration,
    ) -> Self {
        Self {
            authority,
            store,
            metrics,
            join_token_ttl,
            agent_svid_overlap: AGENT_SVID_OVERLAP,
            events: broadcast::channel(EVENT_CAPACITY).0,
            delivered: Arc::default(),
            effects: Arc::default(),
            policy: Arc::default(),
            federation: Arc::default(),
            ci: Arc::default(),
            audit_counts: Arc::default(),
            locks: Arc::default(),
        }
    }

    /// Publishes a committed change (nobody listening is fine).
    pub fn publish(&self, event: CaEvent) {
        let _ = self.events.send(event);
    }

    fn observe<T, E>(&self, kind: &'static str, started: Instant, result: &Result<T, E>) {
        self.observe_elapsed(kind, started.elapsed(), result.is_ok());
    }

    fn observe_elapsed(&self, kind: &'static str, elapsed: Duration, ok: bool) {
        self.metrics
            .signed
            .get_or_create(&SignLabels {
                kind,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        if ok {
            self.metrics
                .sign_seconds
                .get_or_create(&KindLabels { kind })
                .observe(elapsed.as_secs_f64());
        }
    }

    fn issued_event(
        kind: &str,
        actor: &str,
        svid: &IssuedSvid,
        spiffe_id: &SpiffeId,
        entry: Option<&EntryId>,
    ) -> AuditEvent {
        AuditEvent::new(
            kind,
            actor,
            serde_json::json!({
                "serial": svid.serial,
                "spiffe_id": spiffe_id.to_string(),
                "entry_id": entry.map(ToString::to_string),
                "not_after": svid.not_after,
                "issuer": svid.issuer,
            }),
        )
    }

    async fn audit_issued(
        &self,
        kind: &str,
        actor: &str,
        svid: &IssuedSvid,
        spiffe_id: &SpiffeId,
        entry: Option<&EntryId>,
    ) -> Result<(), ServiceError> {
        let event = Self::issued_event(kind, actor, svid, spiffe_id, entry);
        self.store.append_audit(&event).await?;
        tracing::info!(spiffe_id = %spiffe_id, serial = %svid.serial, not_after = svid.not_after, caller = %actor, "issued X509-SVID");
        Ok(())
    }

    /// Signs the X.509-SVIDs of several entries for `caller` (the node API's batch signing)
    /// and records every issuance in one audit transaction. An SVID is returned only once its
    /// audit record is committed: if the audit write fails, every item fails.
    pub async fn issue_batch(
        &self,
        items: Vec<(RegistrationEntry, Vec<u8>)>,
        caller: &str,
    ) -> Vec<Result<IssuedSvid, ServiceError>> {
        let count = items.len();
        let authority = Arc::clone(&self.authority);
        let signed = tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .map(|(entry, csr)| {
                    let started = Instant::now();
                    let result = authority.sign_for_entry(&entry, &csr);
                    (entry, started.elapsed(), result)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let signed = match signed {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "signing task failed");
                return (0..count).map(|_| Err(ServiceError::Interrupted)).collect();
            }
        };
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(signed.len());
        for (entry, elapsed, result) in signed {
            self.observe_elapsed("x509", elapsed, result.is_ok());
            if let Ok(svid) = &result {
                events.push(Self::issued_event(
                    "svid.x509.issued",
                    caller,
                    svid,
                    &entry.spiffe_id,
                    Some(&entry.id),
                ));
            }
            results.push(result.map(|svid| (entry, svid)).map_err(ServiceError::from));
        }
        if let Err(e) = self.store.append_audit_batch(&events).await {
            tracing::error!(error = %e, caller = %caller, "cannot record issuances; withholding the SVIDs");
            let msg = e.to_string();
            return results
                .into_iter()
                .map(|r| {
                    r.and_then(|_| {
                        Err(ServiceError::Store(StoreError::Corrupt(format!(
                            "audit log unavailable: {msg}"
                        ))))
                    })
                })
                .collect();
        }
        // One info line per batch (the audit log has every issuance); each SVID at debug.
        tracing::info!(caller = %caller, issued = events.len(), "issued X509-SVIDs");
        results
            .into_iter()
            .map(|r| {
                r.map(|(entry, svid)| {
                    tracing::debug!(spiffe_id = %entry.spiffe_id, serial = %svid.serial, not_after = svid.not_after, caller = %caller, "issued X509-SVID");
                    svid
                })
            })
            .collect()
    }

    /// Signs the X.509-SVID of `entry` for `caller` and records the issuance. The identity,
    /// DNS names and lifetime come from the entry; only the public key comes from the CSR.
    pub async fn issue_for_entry(
        &self,
        entry: &RegistrationEntry,
        csr_der: &[u8],
        caller: &str,
    ) -> Result<IssuedSvid, ServiceError> {
        let started = Instant::now();
        let result = self.authority.sign_for_entry(entry, csr_der);
        self.observe("x509", started, &result);
        let svid = result?;
        self.audit_issued(
            "svid.x509.issued",
            caller,
            &svid,
            &entry.spiffe_id,
            Some(&entry.id),
        )
        .await?;
        Ok(svid)
    }

    /// Mints an X.509-SVID for any ID of the trust domain (operator debugging, `x509 mint`).
    pub async fn mint_x509(
        &self,
        spiffe_id: &str,
        csr_der: &[u8],
        ttl_secs: u64,
        dns_names: &[String],
        caller: &str,
    ) -> Result<IssuedSvid, ServiceError> {
        let id = entry::parse_workload_id("spiffe_id", spiffe_id, self.authority.trust_domain())?;
        for name in dns_names {
            entry::validate_dns_name(name)?;
        }
        let ttl = ttl(ttl_secs, entry::MAX_X509_TTL, "ttl")?;
        let started = Instant::now();
        let result = self.authority.sign_x509_svid(csr_der, &id, dns_names, ttl);
        self.observe("x509", started, &result);
        let svid = result?;
        self.audit_issued("svid.x509.minted", caller, &svid, &id, None)
            .await?;
        Ok(svid)
    }

    /// Mints a JWT-SVID and records it (never the token itself).
    pub async fn mint_jwt(
        &self,
        spiffe_id: &str,
        audience: &[String],
        ttl_secs: u64,
        caller: &str,
    ) -> Result<(String, i64), ServiceError> {
        let id = entry::parse_workload_id("spiffe_id", spiffe_id, self.authority.trust_domain())?;
        // Bounded (16 values of at most 256 bytes): the token and its audit record with it.
        let audience = meshid_api::limits::Audience::parse(audience)
            .map_err(|e| invalid("audience", e.to_string()))?;
        let audience = audience.values();
        let ttl = ttl(ttl_secs, entry::MAX_JWT_TTL, "ttl")?;
        let started = Instant::now();
        let result = self.authority.mint_jwt_svid(&id, audience, ttl);
        self.observe("jwt", started, &result);
        let (token, exp) = result?;
        let event = AuditEvent::new(
            "svid.jwt.minted",
            caller,
            serde_json::json!({"spiffe_id": id.to_string(), "audience": audience, "exp": exp}),
        );
        self.store.append_audit(&event).await?;
        Ok((token, exp))
    }

    /// Validates and stores a new entry.
    pub async fn create_entry(
        &self,
        spec: &EntrySpec,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        spec.check_writable(self.authority.trust_domain())?;
        let entry = spec.validate(self.authority.trust_domain(), crate::unix_now())?;
        let event = entry_event(
            "entry.created",
            caller,
            &entry,
            self.authority.server_id(),
            None,
        );
        let (ca, stored) = (self.clone(), entry.clone());
        detached(async move {
            let _order = ca.locks.entries.lock().await;
            ca.store.create_entry(&stored, &event).await?;
            ca.publish(CaEvent::EntryUpserted {
                entry: Arc::new(stored),
                old_parent: None,
            });
            Ok(())
        })
        .await?;
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, caller = %caller, "entry created");
        Ok(entry)
    }

    /// Replaces an entry. `spec` must carry the id, and `revision` must be the stored one.
    pub async fn update_entry(
        &self,
        spec: &EntrySpec,
        revision: i64,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        let id: EntryId = spec
            .id
            .as_deref()
            .ok_or_else(|| invalid("entry.id", "is required"))?
            .parse()?;
        spec.check_writable(self.authority.trust_domain())?;
        let mut entry = spec.validate(self.authority.trust_domain(), crate::unix_now())?;
        let (ca, caller) = (self.clone(), caller.to_owned());
        detached(async move {
            let _order = ca.locks.entries.lock().await;
            let old = ca
                .store
                .get_entry(&id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
            entry.created_at = old.created_at;
            // The store keeps the owner: an entry a mesh file declared stays its file's.
            entry.owner = old.owner.clone();
            entry.revision = if revision == 0 {
                old.revision + 1
            } else {
                revision + 1
            };
            ca.store
                .update_entry(
                    &entry,
                    &entry_event(
                        "entry.updated",
                        &caller,
                        &entry,
                        ca.authority.server_id(),
                        Some(&old.parent_id),
                    ),
                )
                .await?;
            ca.publish(CaEvent::EntryUpserted {
                entry: Arc::new(entry.clone()),
                old_parent: Some(old.parent_id),
            });
            Ok(entry)
        })
        .await
    }

    /// Records an agent's delivery report (see the node API's `ReportDelivery`): in the
    /// datastore, per agent and per CA server, and here for this server's `/metrics`.
    pub async fn record_delivery(
        &self,
        agent: &SpiffeId,
        bundle_sequence: u64,
        x509_streams: u64,
        crl_digest: &str,
        policy_revision: u64,
    ) -> Result<(), ServiceError> {
        self.store
            .record_delivery(&crate::store::DeliveryRecord {
                agent: agent.clone(),
                server_id: self.authority.server_id().to_owned(),
                bundle_sequence,
                x509_streams,
                reported_at: crate::unix_now(),
                crl_digest: crl_digest.to_owned(),
                policy_revision,
            })
            .await?;
        self.delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(agent.clone(), bundle_sequence);
        tracing::debug!(agent = %agent, bundle_sequence, x509_streams, "delivery reported");
        Ok(())
    }

    /// How far behind the current bundle each agent that reported to this server is, in
    /// bundle sequences (0: every workload stream has the current bundle).
    pub fn delivery_lags(&self) -> Vec<(SpiffeId, u64)> {
        let current = self.authority.bundle().sequence;
        self.delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(agent, seq)| (agent.clone(), current.saturating_sub(*seq)))
            .collect()
    }

    /// Forgets an agent's delivery (evicted or banned: it no longer holds workloads here).
    fn forget_delivery(&self, agent: &SpiffeId) {
        self.delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(agent);
    }

    /// Forces the SVIDs of an entry to be replaced now: the entry is stored again unchanged but
    /// for its revision, which its agent sees as a change and re-issues at once (recorded as
    /// `entry.rotated` with who asked, why, and the new revision); then watches for the new
    /// SVID's issuance (`entry.rotated.effective`).
    pub async fn rotate_entry(
        &self,
        id: &str,
        reason: &str,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        let cursor = self.audit_cursor().await?;
        let entry = self.rotate_entry_quietly(id, reason, caller).await?;
        self.watch_effect(
            "entry.rotated",
            caller,
            serde_json::json!({"entry_id": entry.id.to_string(), "spiffe_id": entry.spiffe_id.to_string(), "revision": entry.revision}),
            vec![Awaited::Issued {
                entries: [entry.id.to_string()].into(),
                rotated: Default::default(),
                cursor,
            }],
        );
        Ok(entry)
    }

    /// Forces the SVIDs of an entry to be replaced now: the entry is stored again unchanged but
    /// for its revision (and `updated_at`), which every agent holding it sees as a change, so it
    /// generates a new key and has it signed at once. Recorded as `entry.rotated` with who
    /// asked, why, and the new revision.
    async fn rotate_entry_quietly(
        &self,
        id: &str,
        reason: &str,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        let id: EntryId = id.parse()?;
        check_reason(reason)?;
        let (ca, caller, reason) = (self.clone(), caller.to_owned(), reason.to_owned());
        detached(async move {
            let _order = ca.locks.entries.lock().await;
            let mut entry = ca
                .store
                .get_entry(&id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
            entry.revision += 1;
            entry.updated_at = crate::unix_now();
            let mut event = entry_event(
                "entry.rotated",
                &caller,
                &entry,
                ca.authority.server_id(),
                Some(&entry.parent_id),
            );
            if let Some(details) = event.details.as_object_mut() {
                details.insert("reason".to_owned(), serde_json::Value::String(reason.clone()));
            }
            ca.store.update_entry(&entry, &event).await?;
            ca.publish(CaEvent::EntryUpserted {
                entry: Arc::new(entry.clone()),
                old_parent: Some(entry.parent_id.clone()),
            });
            tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, revision = entry.revision, caller = %caller, reason = %reason, "entry rotated: its SVIDs are replaced now");
            Ok(entry)
        })
        .await
    }

    /// Forces an agent to replace its own SVID and those of all its workloads now: each of its
    /// entries is rotated as by [`Self::rotate_entry`] (each audited as `entry.rotated`), and
    /// the agent is told to renew its own SVID at once (`agent.rotated`). Returns the agent and
    /// how many entries were rotated. A banned or unknown agent is refused.
    pub async fn rotate_agent(
        &self,
        id: &str,
        reason: &str,
        caller: &str,
    ) -> Result<(AgentRecord, usize), ServiceError> {
        let id = entry::parse_id("spiffe_id", id, self.authority.trust_domain())?;
        check_reason(reason)?;
        let why = if reason.is_empty() {
            "agent rotate".to_owned()
        } else {
            format!("agent rotate: {reason}")
        };
        // Checked before anything is rotated: each entry's record carries it.
        check_reason(&why)?;
        let record = match self.store.get_agent(&id).await? {
            None => return Err(StoreError::NotFound(format!("agent {id}")).into()),
            Some(r) if r.banned => {
                return Err(ServiceError::AgentDenied { id, reason: BANNED });
            }
            Some(r) => r,
        };
        let entries = self.store.list_entries_by_parent(&id).await?;
        let cursor = self.audit_cursor().await?;
        let mut rotated = 0;
        let mut ids = std::collections::HashSet::new();
        for e in &entries {
            match self.rotate_entry_quietly(e.id.as_str(), &why, caller).await {
                Ok(e) => {
                    rotated += 1;
                    ids.insert(e.id.to_string());
                }
                // Deleted meanwhile: nothing to rotate.
                Err(ServiceError::Store(StoreError::NotFound(_))) => {}
                Err(e) => return Err(e),
            }
        }
        let event = AuditEvent::new(
            "agent.rotated",
            caller,
            serde_json::json!({
                "spiffe_id": id.to_string(),
                "reason": reason,
                "entries": rotated,
                "ca_server": self.authority.server_id(),
            }),
        );
        self.store.append_audit(&event).await?;
        self.publish(CaEvent::AgentRotate {
            spiffe_id: id.clone(),
        });
        self.watch_effect(
            "agent.rotated",
            caller,
            serde_json::json!({"spiffe_id": id.to_string(), "entries": rotated}),
            vec![
                Awaited::Renewed([(id.clone(), record.serial.clone())].into()),
                Awaited::Issued {
                    entries: ids,
                    rotated: Default::default(),
                    cursor,
                },
            ],
        );
        tracing::info!(agent = %id, entries = rotated, caller = %caller, reason = %reason, "agent rotated: it renews its SVID and its workloads' now");
        Ok((record, rotated))
    }

    /// Deletes an entry.
    pub async fn delete_entry(
        &self,
        id: &str,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        let id: EntryId = id.parse()?;
        let (ca, caller) = (self.clone(), caller.to_owned());
        detached(async move {
            let _order = ca.locks.entries.lock().await;
            let old = ca
                .store
                .get_entry(&id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
            let event = entry_event(
                "entry.deleted",
                &caller,
                &old,
                ca.authority.server_id(),
                Some(&old.parent_id),
            );
            let entry = ca.store.delete_entry(&id, &event).await?;
            ca.publish(CaEvent::EntryDeleted {
                id: entry.id.clone(),
                parent: entry.parent_id.clone(),
            });
            Ok(entry)
        })
        .await
    }

    /// Generates a join token; returns it with its secret, which is shown once.
    pub async fn generate_token(
        &self,
        ttl_secs: u64,
        caller: &str,
    ) -> Result<JoinToken, ServiceError> {
        let ttl = match ttl_secs {
            0 => self.join_token_ttl,
            s if s > 7 * 24 * 3600 => {
                return Err(invalid("ttl", "a join token may live at most 7 days"))
            }
            s => Duration::from_secs(s),
        };
        let token = JoinToken::generate(crate::unix_now(), ttl);
        let event = AuditEvent::new(
            "token.created",
            caller,
            serde_json::json!({"token_id": token.record.id, "expires_at": token.record.expires_at}),
        );
        self.store.create_join_token(&token.record, &event).await?;
        Ok(token)
    }

    /// Uses a join token (node attestation): single use, refused once expired.
    pub async fn consume_token(
        &self,
        secret: &str,
        caller: &str,
    ) -> Result<crate::store::JoinTokenRecord, ServiceError> {
        let hash = crate::token::hash_token(secret);
        let event = AuditEvent::new(
            "token.used",
            caller,
            serde_json::json!({"token_id": crate::token::token_id(&hash)}),
        );
        Ok(self
            .store
            .consume_join_token(&hash, crate::unix_now(), &event)
            .await?)
    }

    /// Signs an agent SVID (the CA's default X.509 lifetime) and measures it.
    fn sign_agent_svid(&self, id: &SpiffeId, csr_der: &[u8]) -> Result<IssuedSvid, ServiceError> {
        let started = Instant::now();
        let result =
            self.authority
                .sign_role_svid(csr_der, id, None, meshid_api::role::Role::Agent);
        self.observe("agent", started, &result);
        Ok(result?)
    }

    /// Node attestation with a join token: uses the token (single use, refused once expired:
    /// one error for unknown, used and expired), and signs an SVID for
    /// `spiffe://<td>/meshid/agent/join_token/<token id>` over the CSR's key. The CSR is checked
    /// before the token is used, so a malformed request does not burn it. A banned ID is
    /// refused.
    pub async fn attest_join_token(
        &self,
        secret: &str,
        csr_der: &[u8],
    ) -> Result<(AgentRecord, IssuedSvid), ServiceError> {
        if secret.is_empty() {
            return Err(invalid("token", "is required"));
        }
        crate::svid::parse_csr(csr_der).map_err(AuthorityError::from)?;
        let token = self.consume_token(secret, "node:attest").await?;
        let td = self.authority.trust_domain();
        let id = entry::parse_id(
            "agent id",
            &format!("spiffe://{td}/meshid/agent/join_token/{}", token.id),
            td,
        )?;
        let id_text = id.to_string();
        let _agents = self.locks.agents.lock().await;
        if let Some(existing) = self.store.get_agent(&id).await? {
            if existing.banned {
                return Err(ServiceError::AgentDenied { id, reason: BANNED });
            }
        }
        let svid = self.sign_agent_svid(&id, csr_der)?;
        let record = AgentRecord {
            spiffe_id: id.clone(),
            attestation_type: "join_token".to_owned(),
            serial: svid.serial.clone(),
            expires_at: svid.not_after,
            created_at: crate::unix_now(),
            banned: false,
            previous_serial: String::new(),
            previous_until: 0,
        };
        let event = AuditEvent::new(
            "agent.attested",
            &id_text,
            serde_json::json!({
                "spiffe_id": id_text,
                "attestation_type": record.attestation_type,
                "token_id": token.id,
                "serial": svid.serial,
                "not_after": svid.not_after,
                "issuer": svid.issuer,
            }),
        );
        self.store.upsert_agent(&record, &event).await?;
        tracing::info!(spiffe_id = %id_text, serial = %svid.serial, not_after = svid.not_after, "agent attested");
        Ok((record, svid))
    }

    /// Renews an attested agent's SVID. Refused when the agent has been evicted or banned.
    pub async fn renew_agent(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
    ) -> Result<(AgentRecord, IssuedSvid), ServiceError> {
        let id_text = id.to_string();
        let _agents = self.locks.agents.lock().await;
        let Some(record) = self.store.get_agent(id).await? else {
            return Err(ServiceError::AgentDenied {
                id: id.clone(),
                reason: NOT_ATTESTED,
            });
        };
        if record.banned {
            return Err(ServiceError::AgentDenied {
                id: id.clone(),
                reason: BANNED,
            });
        }
        let svid = self.sign_agent_svid(id, csr_der)?;
        let event = AuditEvent::new(
            "agent.renewed",
            &id_text,
            serde_json::json!({
                "spiffe_id": id_text,
                "serial": svid.serial,
                "not_after": svid.not_after,
                "issuer": svid.issuer,
            }),
        );
        // Conditional in the store: another CA server may have evicted or banned the agent
        // since the check above, and the renewal must not undo that.
        let record = match self
            .store
            .renew_agent(
                id,
                &svid.serial,
                svid.not_after,
                crate::unix_now() + i64::try_from(self.agent_svid_overlap.as_secs()).unwrap_or(0),
                &event,
            )
            .await
        {
            Ok(r) => r,
            Err(StoreError::NotFound(_)) => {
                return Err(ServiceError::AgentDenied {
                    id: id.clone(),
                    reason: NOT_ATTESTED,
                })
            }
            Err(e) => return Err(e.into()),
        };
        self.publish(CaEvent::AgentRenewed {
            spiffe_id: id.clone(),
            serial: svid.serial.clone(),
        });
        tracing::info!(spiffe_id = %id_text, serial = %svid.serial, not_after = svid.not_after, "agent renewed");
        Ok((record, svid))
    }

    /// Checks that `id` names an attested, unbanned agent.
    pub async fn check_agent(&self, id: &SpiffeId) -> Result<AgentRecord, ServiceError> {
        match self.store.get_agent(id).await? {
            None => Err(ServiceError::AgentDenied {
                id: id.clone(),
                reason: NOT_ATTESTED,
            }),
            Some(r) if r.banned => Err(ServiceError::AgentDenied {
                id: id.clone(),
                reason: BANNED,
            }),
            Some(r) => Ok(r),
        }
    }

    /// [`Self::check_agent`] for a caller presenting the SVID with `serial` (lowercase hex):
    /// only the current SVID is honoured, and the one it replaced until the overlap ends. A
    /// superseded SVID used after that is refused, counted, logged and audited (once per
    /// serial): its key may have been stolen.
    pub async fn check_agent_svid(
        &self,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<AgentRecord, ServiceError> {
        let record = self.check_agent(id).await?;
        if record.serial == serial
            || (!record.previous_serial.is_empty()
                && record.previous_serial == serial
                && crate::unix_now() < record.previous_until)
        {
            return Ok(record);
        }
        self.metrics.node_superseded_svids.inc();
        tracing::warn!(
            agent = %id,
            serial,
            current = %record.serial,
            "a superseded agent SVID was used after its successor: refused (its key may be stolen)"
        );
        let first = self
            .locks
            .superseded_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((id.clone(), serial.to_owned()));
        if first {
            let event = AuditEvent::new(
                "agent.superseded_svid_used",
                id.to_string(),
                serde_json::json!({
                    "spiffe_id": id.to_string(),
                    "serial": serial,
                    "current_serial": record.serial,
                }),
            );
            if let Err(error) = self.store.append_audit(&event).await {
                tracing::error!(agent = %id, %error, "cannot audit a superseded agent SVID");
            }
        }
        Err(ServiceError::AgentDenied {
            id: id.clone(),
            reason: SUPERSEDED,
        })
    }

    /// Evicts an agent: deletes its record, so its SVID is no longer honoured and its open
    /// streams end. It may attest again (with a new join token).
    pub async fn evict_agent(&self, id: &str, caller: &str) -> Result<AgentRecord, ServiceError> {
        let id = entry::parse_id("spiffe_id", id, self.authority.trust_domain())?;
        let event = AuditEvent::new(
            "agent.evicted",
            caller,
            serde_json::json!({"spiffe_id": id.to_string()}),
        );
        let (ca, removed) = (self.clone(), id.clone());
        let record = detached(async move {
            let _agents = ca.locks.agents.lock().await;
            let record = ca.store.delete_agent(&removed, &event).await?;
            ca.forget_delivery(&removed);
            ca.publish(CaEvent::AgentRemoved { spiffe_id: removed });
            Ok(record)
        })
        .await?;
        tracing::info!(spiffe_id = %id, caller = %caller, "agent evicted");
        Ok(record)
    }

    /// Bans an agent: nothing is issued to it, its open streams end, and it cannot attest
    /// again under this ID. Banning a banned agent changes nothing.
    pub async fn ban_agent(&self, id: &str, caller: &str) -> Result<AgentRecord, ServiceError> {
        let id = entry::parse_id("spiffe_id", id, self.authority.trust_domain())?;
        let event = AuditEvent::new(
            "agent.banned",
            caller,
            serde_json::json!({"spiffe_id": id.to_string()}),
        );
        let ca = self.clone();
        let (record, changed) = detached(async move {
            let _agents = ca.locks.agents.lock().await;
            let record = ca
                .store
                .get_agent(&id)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
            if record.banned {
                return Ok((record, false));
            }
            let record = AgentRecord {
                banned: true,
                ..record
            };
            ca.store.upsert_agent(&record, &event).await?;
            ca.publish(CaEvent::AgentRemoved { spiffe_id: id });
            Ok((record, true))
        })
        .await?;
        if changed {
            tracing::info!(spiffe_id = %record.spiffe_id, caller = %caller, "agent banned");
        }
        Ok(record)
    }
}

/// Runs a change (a store write and the publication of its event) on its own task, so that a
/// caller going away mid-way (a dropped gRPC call) cannot leave a committed change unannounced.
async fn detached<T: Send + 'static>(
    change: impl std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    match tokio::spawn(change).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(ServiceError::Interrupted),
    }
}

/// The audit event of an entry change. Besides what an auditor needs, it names the CA server
/// that made the change and the entry's previous parent, so that the other servers of a
/// PostgreSQL trust domain can replay it to their agents from the audit log (see
/// [`crate::server::change_feed_loop`]).
fn entry_event(
    kind: &str,
    caller: &str,
    e: &RegistrationEntry,
    server: &str,
    old_parent: Option<&SpiffeId>,
) -> AuditEvent {
    AuditEvent::new(
        kind,
        caller,
        serde_json::json!({
            "entry_id": e.id.to_string(),
            "spiffe_id": e.spiffe_id.to_string(),
            "parent_id": e.parent_id.to_string(),
            "old_parent_id": old_parent.map(ToString::to_string),
            "selectors": e.selectors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "revision": e.revision,
            "ca_server": server,
        }),
    )
}
