//! The datastore: one trait, two real backends.
//!
//! [`sql::SqlStore`] speaks SQLite (the embedded default: one file in the data directory, WAL
//! mode) and PostgreSQL (for several CA servers sharing state). Migrations are versioned and
//! run at open. Every mutating call that an operator or agent causes takes the [`AuditEvent`]
//! describing it and writes the change and the audit record in one transaction, so the audit
//! log can never miss a change that happened.

use async_trait::async_trait;

use spiffe::SpiffeId;

use crate::audit::{AuditEvent, AuditRecord, AuditViolation, ChainVerifier};
use crate::entry::{EntryId, RegistrationEntry};

pub mod sql;

/// Errors from the datastore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The datastore URL is not `sqlite://...` or `postgres://...`.
    #[error("unsupported datastore url {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    /// The backend failed (connection, SQL, I/O).
    #[error("datastore: {0}")]
    Backend(#[from] sqlx::Error),
    /// A migration failed.
    #[error("datastore migration {version}: {source}")]
    Migration {
        /// The migration version that failed.
        version: i64,
        /// What the backend said.
        source: sqlx::Error,
    },
    /// The schema in the database is newer than this binary knows.
    #[error("datastore schema version {found} is newer than this binary supports ({supported}); upgrade meshid-ca")]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Newest version this binary knows.
        supported: i64,
    },
    /// A recent write could not begin or commit (a full disk, a lost database), and none has
    /// committed since.
    #[error("datastore writes are failing: {0}")]
    WriteFailing(String),
    /// A row could not be decoded into its type (a corrupted or hand-edited row).
    #[error("datastore row is corrupt: {0}")]
    Corrupt(String),
    /// The record asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record with this key already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// An update was based on an old revision.
    #[error("entry {id} changed concurrently (expected revision {expected}, found {found}); reload and retry")]
    RevisionConflict {
        /// The entry.
        id: String,
        /// The revision the caller based the update on.
        expected: i64,
        /// The revision in the store.
        found: i64,
    },
    /// A CA key was not in the state a transition expected (another server changed it).
    #[error("CA key {id} is {found}, not {expected}; reload and retry")]
    StateConflict {
        /// The key.
        id: String,
        /// The state the transition expected.
        expected: &'static str,
        /// The state found.
        found: String,
    },
    /// The join token is unknown, already used or expired. Deliberately one variant, so a caller
    /// cannot probe which tokens exist.
    #[error("join token is invalid, expired or already used")]
    TokenRejected,
}

/// A stored join token. Only the SHA-256 of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// SHA-256 of the token secret.
    pub hash: [u8; 32],
    /// A short non-secret identifier (shown to operators, used in the agent's SPIFFE ID).
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; the token is refused from this second on.
    pub expires_at: i64,
    /// Unix seconds when used, if used.
    pub used_at: Option<i64>,
}

/// An attested agent (filled in by node attestation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// How it attested, for example `join_token`.
    pub attestation_type: String,
    /// Serial of the agent SVID currently held, hex.
    pub serial: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Banned agents may not re-attest.
    pub banned: bool,
    /// Serial of the agent SVID the current one replaced, hex (empty when none).
    pub previous_serial: String,
    /// Until when (unix seconds) `previous_serial` is still honoured.
    pub previous_until: i64,
}

/// What an agent last reported delivered to its workloads, to one CA server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// The agent.
    pub agent: SpiffeId,
    /// The CA server it reported to.
    pub server_id: String,
    /// The bundle sequence every open X.509 stream of its workloads has been handed.
    pub bundle_sequence: u64,
    /// How many such streams were open.
    pub x509_streams: u64,
    /// Unix seconds.
    pub reported_at: i64,
    /// The digest of the CRL set every such stream was handed (empty: not known).
    pub crl_digest: String,
    /// The central policy revision the agent holds (0: none).
    pub policy_revision: u64,
}

/// A revoked X.509 certificate (`meshid-ca svid revoke`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The CA journal id of the key that signed it: the issuer of the CRL that lists it.
    pub issuer_id: String,
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// Its SPIFFE ID (a trust domain's ID for an intermediate).
    pub spiffe_id: String,
    /// An issuance kind (`svid.x509.issued`, `agent.attested`, ...) or `x509_intermediate`.
    pub kind: String,
    /// When it expires (Unix seconds): it leaves the CRL then.
    pub not_after: i64,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
}

/// One revision of the mesh's central policy (`meshid-ca policy apply`): the whole set of named
/// policy documents as it stood after the change, and who made the change and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRevision {
    /// 1, 2, 3, ... across the trust domain.
    pub revision: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Who (the admin caller).
    pub author: String,
    /// Why (`--reason`).
    pub reason: String,
    /// `apply`, `delete` or `rollback`.
    pub action: String,
    /// The document applied or deleted; for a rollback, the revision rolled back to.
    pub subject: String,
    /// Every policy document in force at this revision: name → YAML text. Empty in listings.
    pub documents: std::collections::BTreeMap<String, String>,
    /// The owner label of each document a mesh file declared (`meshid-ca apply`): name →
    /// owner. A document applied by hand has none. Empty in listings.
    pub owners: std::collections::BTreeMap<String, String>,
}

/// A federation relationship (`meshid-ca federation create`): another trust domain whose
/// bundle this CA fetches from its bundle endpoint and hands to agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRecord {
    /// The other trust domain (never this CA's own).
    pub trust_domain: spiffe::TrustDomain,
    /// Its bundle endpoint, `https://...`.
    pub endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// For `https_spiffe`: the SPIFFE ID the endpoint must present; empty otherwise.
    pub endpoint_spiffe_id: String,
    /// The mesh file owner that declared it (`meshid-ca apply`); empty when made by hand.
    pub owner: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last change of the relationship (not of its bundle).
    pub updated_at: i64,
}

/// A federated trust domain's bundle as stored: the last good document fetched (or the one
/// the operator bootstrapped the relationship with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedBundle {
    /// Whose bundle this is.
    pub trust_domain: spiffe::TrustDomain,
    /// The SPIFFE bundle document (JWKS JSON).
    pub document: String,
    /// Its `spiffe_sequence` (0 when it has none).
    pub sequence: i64,
    /// Unix seconds of the last store.
    pub updated_at: i64,
}

/// What a mesh apply plans against ([`Datastore::apply_mesh`]): the state inside its write
/// transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshState {
    /// Every entry, ordered by id.
    pub entries: Vec<RegistrationEntry>,
    /// The newest policy revision, with its documents and owners.
    pub policy: Option<PolicyRevision>,
    /// Every federation relationship.
    pub federations: Vec<FederationRecord>,
}

/// What a mesh apply writes ([`Datastore::apply_mesh`]), all in one transaction.
#[derive(Debug, Clone)]
pub struct MeshWrite {
    /// New entries.
    pub create: Vec<RegistrationEntry>,
    /// Replacements of stored entries, each at its stored revision plus one (owner included).
    pub update: Vec<RegistrationEntry>,
    /// Entries to delete, each at the revision it was planned against.
    pub delete: Vec<(EntryId, i64)>,
    /// Entries made by hand that become the owner's, otherwise unchanged, each at the revision
    /// it was planned against: only the owner label is written (the revision stays, so agents
    /// see nothing change and re-issue nothing).
    pub adopt: Vec<(EntryId, i64, String)>,
    /// A new policy revision (the head's plus one), if the documents change.
    pub policy: Option<PolicyRevision>,
    /// New federation relationships, each with the bundle it starts from.
    pub federations_created: Vec<(FederationRecord, Option<FederatedBundle>)>,
    /// Relationships whose endpoint (or owner) changes; their bundles stay.
    pub federations_updated: Vec<FederationRecord>,
    /// Relationships deleted, with their bundles.
    pub federations_deleted: Vec<spiffe::TrustDomain>,
    /// The audit records of the apply, in order: one per entry changed, then the apply's own.
    pub audit: Vec<AuditEvent>,
}

/// Plans a mesh apply from the state read inside its transaction: `None` writes nothing.
pub type MeshPlanner<'a> = Box<dyn FnOnce(MeshState) -> Option<MeshWrite> + Send + 'a>;

/// A certificate revocation list signed by one CA key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlRecord {
    /// The CA journal id of the signing key.
    pub issuer_id: String,
    /// The CA server that signed it (the one holding the key).
    pub server_id: String,
    /// The CRL number (increases with every CRL of the issuer).
    pub number: u64,
    /// thisUpdate, Unix seconds.
    pub this_update: i64,
    /// How many certificates it lists.
    pub entries: u64,
    /// The DER.
    pub der: Vec<u8>,
}

/// What a CA key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaKeyKind {
    /// Self-signed trust anchor.
    X509Root,
    /// Issuing intermediate under a root.
    X509Intermediate,
    /// JWT-SVID signing key.
    Jwt,
    /// A root's certificate re-issued by the root it replaces (same subject and key, issued by
    /// the old root): sent above a new root's intermediates while the old root is in the
    /// bundle, so that a peer holding only the old root still verifies. No key of its own;
    /// `parent_id` is the old root, `id` names the new root it certifies after `xsign-`.
    X509CrossSigned,
}

impl CaKeyKind {
    /// The stable name (datastore column, admin API, CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            CaKeyKind::X509Root => "x509_root",
            CaKeyKind::X509Intermediate => "x509_intermediate",
            CaKeyKind::Jwt => "jwt",
            CaKeyKind::X509CrossSigned => "x509_cross_signed",
        }
    }

    /// The kind named by [`CaKeyKind::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        [
            CaKeyKind::X509Root,
            CaKeyKind::X509Intermediate,
            CaKeyKind::Jwt,
            CaKeyKind::X509CrossSigned,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// Where a CA key is in its life (the CA journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CaKeyState {
    /// Created, published in the bundle where that applies, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// A root that a newer root has replaced: still in the bundle, so that what its
    /// intermediates signed keeps verifying, but no longer signing intermediates. Retired once
    /// nothing it vouches for is unexpired (`meshid-ca ca root retire`).
    Superseded,
    /// No longer signing; kept until what it signed has expired (a root: out of the bundle).
    Retired,
}

impl CaKeyState {
    /// The stable name (datastore column, admin API, CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            CaKeyState::Prepared => "prepared",
            CaKeyState::Active => "active",
            CaKeyState::Superseded => "superseded",
            CaKeyState::Retired => "retired",
        }
    }

    /// The state named by [`CaKeyState::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        [
            CaKeyState::Prepared,
            CaKeyState::Active,
            CaKeyState::Superseded,
            CaKeyState::Retired,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// One row of the CA journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaKeyRecord {
    /// Unique id (also names the key file in the data directory).
    pub id: String,
    /// What the key is for.
    pub kind: CaKeyKind,
    /// Lifecycle state.
    pub state: CaKeyState,
    /// The CA server that owns this key (intermediates are per server; roots and JWT keys are
    /// shared by every server of the trust domain).
    pub server_id: String,
    /// For an intermediate: the id of the root it chains to.
    pub parent_id: Option<String>,
    /// DER certificate (roots, intermediates) or DER SubjectPublicKeyInfo (JWT keys).
    pub public_der: Vec<u8>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last state change (`created_at` until the first; 0 for keys from
    /// before schema version 4, whose changes were not recorded).
    pub state_changed_at: i64,
    /// For a root supplied by the operator: the path of its private key, which every CA server
    /// of the trust domain reads (never copied). Empty for keys in a server's data directory.
    pub key_path: String,
    /// When the operator tainted the key (`meshid-ca ca taint`), unix seconds; 0: never. A
    /// tainted key signs nothing more, and everything it signed is re-issued.
    pub tainted_at: i64,
}

/// The datastore. Implementations must be safe to share between tasks and, for PostgreSQL,
/// between CA servers.
#[async_trait]
pub trait Datastore: Send + Sync + 'static {
    /// Which backend this is, for logs and metrics (`sqlite` or `postgres`).
    fn backend(&self) -> &'static str;

    /// Woken when another process may have committed a change (PostgreSQL: every write
    /// transaction notifies at commit), for the change feed to read at once rather than at its
    /// next poll; the poll stays behind it, for what a lost connection missed. `None` where
    /// there is none (SQLite serves one process). Must be called within a Tokio runtime.
    fn change_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    /// Stores a new entry. Fails with [`StoreError::AlreadyExists`] if the id is taken.
    async fn create_entry(
        &self,
        entry: &RegistrationEntry,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Looks up one entry.
    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError>;
    /// The entries with these ids that exist, in no particular order (one query per 500 ids).
    async fn get_entries(&self, ids: &[EntryId]) -> Result<Vec<RegistrationEntry>, StoreError>;
    /// All entries, ordered by id.
    async fn list_entries(&self) -> Result<Vec<RegistrationEntry>, StoreError>;
    /// Entries whose parent is `parent_id`, ordered by id.
    async fn list_entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError>;
    /// Replaces an entry whose stored revision is `entry.revision - 1` (optimistic concurrency).
    async fn update_entry(
        &self,
        entry: &RegistrationEntry,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Deletes an entry and returns it.
    async fn delete_entry(
        &self,
        id: &EntryId,
        audit: &AuditEvent,
    ) -> Result<RegistrationEntry, StoreError>;

    /// Stores a new join token.
    async fn create_join_token(
        &self,
        token: &JoinTokenRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Marks the token with this hash used, if it exists, is unused and `now < expires_at`;
    /// atomic, so two concurrent uses cannot both succeed.
    async fn consume_join_token(
        &self,
        hash: &[u8; 32],
        now: i64,
        audit: &AuditEvent,
    ) -> Result<JoinTokenRecord, StoreError>;

    /// Inserts or replaces an agent.
    async fn upsert_agent(&self, agent: &AgentRecord, audit: &AuditEvent)
        -> Result<(), StoreError>;
    /// Records a renewed agent SVID, only if the agent exists and is not banned; atomic, so a
    /// renewal racing an eviction or a ban (on any CA server) can never undo it. The serial it
    /// replaces becomes `previous_serial`, honoured until `previous_until`. `NotFound` when
    /// the agent is gone or banned.
    async fn renew_agent(
        &self,
        spiffe_id: &SpiffeId,
        serial: &str,
        expires_at: i64,
        previous_until: i64,
        audit: &AuditEvent,
    ) -> Result<AgentRecord, StoreError>;
    /// Looks up an agent.
    async fn get_agent(&self, spiffe_id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError>;
    /// All agents, ordered by SPIFFE ID.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Deletes an agent (eviction) and returns it; [`StoreError::NotFound`] if there is none.
    async fn delete_agent(
        &self,
        spiffe_id: &SpiffeId,
        audit: &AuditEvent,
    ) -> Result<AgentRecord, StoreError>;

    /// Adds a CA journal row.
    async fn insert_ca_key(&self, key: &CaKeyRecord, audit: &AuditEvent) -> Result<(), StoreError>;
    /// Changes a CA key's state, stamping the change now.
    async fn set_ca_key_state(
        &self,
        id: &str,
        state: CaKeyState,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        self.transition_ca_key(id, None, state, crate::unix_now(), audit)
            .await
    }
    /// Changes a CA key's state to `to`, stamped `at` (unix seconds), if it is in state `from`
    /// (any state when `None`); [`StoreError::StateConflict`] names the state found otherwise, so
    /// that two CA servers racing on one key change it once.
    async fn transition_ca_key(
        &self,
        id: &str,
        from: Option<CaKeyState>,
        to: CaKeyState,
        at: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Marks a CA key tainted at `at`; [`StoreError::AlreadyExists`] if it already is.
    async fn taint_ca_key(&self, id: &str, at: i64, audit: &AuditEvent) -> Result<(), StoreError>;
    /// The whole CA journal, ordered by creation time then id.
    async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError>;

    /// Appends an audit record for something that changed nothing else in the store (an
    /// issuance, a mint), chaining it to the current head.
    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError>;
    /// Appends several audit records in one transaction, chained in order (a batch of
    /// issuances). All or nothing.
    async fn append_audit_batch(
        &self,
        events: &[AuditEvent],
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// Up to `limit` audit records with `seq > after`, in ascending seq order, as stored (no
    /// checking: that is [`crate::audit::verify`]'s job).
    async fn audit_records(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError>;
    /// Up to `limit` audit records of the given kinds with `seq > after` and `time >=
    /// since_time`, in ascending seq order (the issuance records a root retirement checks).
    async fn audit_records_since(
        &self,
        since_time: i64,
        kinds: &[&str],
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// The stored head of the chain (last seq and its hash), kept separately from the records
    /// so that truncating the log is detected.
    async fn audit_head(&self) -> Result<Option<(i64, [u8; 32])>, StoreError>;
    /// Records what an agent reported delivered to its workloads, replacing its previous report
    /// to the same CA server. Operational state, not audited (it changes with every bundle).
    async fn record_delivery(&self, delivery: &DeliveryRecord) -> Result<(), StoreError>;
    /// Every agent's reports, ordered by agent then server.
    async fn list_deliveries(&self) -> Result<Vec<DeliveryRecord>, StoreError>;

    /// Records revocations, with `audit`, in one transaction; a certificate already revoked is
    /// left as it was. Returns the ones added.
    async fn insert_revocations(
        &self,
        revocations: &[RevocationRecord],
        audit: &AuditEvent,
    ) -> Result<Vec<RevocationRecord>, StoreError>;
    /// Every revocation of a certificate that expires after `now` (Unix seconds), by issuer
    /// then serial.
    async fn list_revocations(&self, now: i64) -> Result<Vec<RevocationRecord>, StoreError>;
    /// Deletes the revocations of certificates expired before `before`; returns how many.
    async fn prune_revocations(&self, before: i64) -> Result<u64, StoreError>;
    /// Stores the CRL of `crl.issuer_id`, replacing the previous one, with `audit`.
    async fn put_crl(&self, crl: &CrlRecord, audit: &AuditEvent) -> Result<(), StoreError>;
    /// Every stored CRL, by issuer.
    async fn list_crls(&self) -> Result<Vec<CrlRecord>, StoreError>;

    /// Records a new policy revision with its audit record, in one transaction. Refused with
    /// [`StoreError::AlreadyExists`] when `revision.revision` is not the head's plus one (another
    /// change came first: reload and retry).
    async fn append_policy_revision(
        &self,
        revision: &PolicyRevision,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// A policy revision with its documents; the newest when `revision` is `None`. `None` when
    /// there is no such revision (or none at all).
    async fn get_policy_revision(
        &self,
        revision: Option<u64>,
    ) -> Result<Option<PolicyRevision>, StoreError>;
    /// Every policy revision, oldest first, without the documents.
    async fn list_policy_revisions(&self) -> Result<Vec<PolicyRevision>, StoreError>;

    /// A mesh apply in one write transaction, serialized with every other audited write: reads
    /// the entries and the newest policy revision, hands them to `plan`, and writes what it
    /// returns (entries created, updated and deleted, a policy revision and the audit records)
    /// or nothing. Any write that fails (an entry that is not at the revision planned
    /// against, an id taken) rolls everything back. Returns whether anything was written.
    async fn apply_mesh(&self, plan: MeshPlanner<'_>) -> Result<bool, StoreError>;

    /// Stores a new federation relationship, with the bundle it was bootstrapped with (if
    /// any) and its audit record, in one transaction. [`StoreError::AlreadyExists`] when the
    /// trust domain already has one.
    async fn create_federation(
        &self,
        relationship: &FederationRecord,
        bootstrap: Option<&FederatedBundle>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Deletes a federation relationship and its bundle, with the audit record, and returns
    /// it; [`StoreError::NotFound`] when there is none.
    async fn delete_federation(
        &self,
        trust_domain: &spiffe::TrustDomain,
        audit: &AuditEvent,
    ) -> Result<FederationRecord, StoreError>;
    /// Every federation relationship, by trust domain.
    async fn list_federations(&self) -> Result<Vec<FederationRecord>, StoreError>;
    /// Stores a bundle fetched for a relationship, replacing the previous one, with its audit
    /// record; [`StoreError::NotFound`] when the relationship was deleted meanwhile.
    async fn put_federated_bundle(
        &self,
        bundle: &FederatedBundle,
        audit: &AuditEvent,
    ) -> Result<(), StoreError>;
    /// Every federated bundle stored, by trust domain.
    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError>;

    /// Records that the CI token `jti` of `issuer` (valid until `expires_at`) was exchanged;
    /// [`StoreError::AlreadyExists`] when it was before (a replay).
    async fn consume_ci_token(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: i64,
    ) -> Result<(), StoreError>;

    /// Whether a write can commit now: a write transaction that rewrites the audit head with
    /// its own values (nothing changes, but the database must take and store the write).
    /// Readiness uses it, so that a full disk or a lost database shows.
    async fn probe_write(&self) -> Result<(), StoreError>;
}

impl std::fmt::Debug for dyn Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Datastore({})", self.backend())
    }
}

/// Why [`verify_audit`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditVerifyError {
    /// The log could not be read.
    #[error("cannot read the audit log: {0}")]
    Store(#[from] StoreError),
    /// The log was read and has been tampered with.
    #[error(transparent)]
    Violation(#[from] AuditViolation),
}

/// Records read per page by [`verify_audit`].
const VERIFY_PAGE: i64 = 1000;

/// Verifies the audit log in `store`, a page at a time (so a large log is never loaded whole).
///
/// Records appended while it runs are verified too: the head is read after the records, and if
/// it has moved past them the remaining records are read before comparing.
pub async fn verify_audit(store: &dyn Datastore) -> Result<u64, AuditVerifyError> {
    let mut verifier = ChainVerifier::default();
    loop {
        let mut progressed = false;
        loop {
            let after = verifier.last_seq();
            let page = store.audit_records(after, VERIFY_PAGE).await?;
            let full = page.len() as i64 >= VERIFY_PAGE;
            progressed |= !page.is_empty();
            for record in &page {
                verifier.push(record)?;
            }
            if !full {
                break;
            }
        }
        let head = store.audit_head().await?;
        let last_seq = verifier.last_seq();
        // The head is written in the same transaction as its record, so a head beyond the last
        // record read means either a concurrent append (read on) or a truncation (nothing more
        // to read: `finish` reports it).
        match head {
            Some((head_seq, _)) if head_seq > last_seq && progressed => continue,
            _ => return Ok(verifier.finish(head)?),
        }
    }
}
