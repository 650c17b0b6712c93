//! Trust anchors, issuing intermediates, JWT keys, and their rotation.
//!
//! The [`Authority`] owns this CA server's signing keys. Private keys live in the data
//! directory (`keys/<id>.key.pem`, mode 0600, directory 0700); which keys exist and what state
//! each is in (prepared, active, retired) is the CA journal in the datastore, so every server of
//! a trust domain sees the same bundle.
//!
//! Rotation follows SPIRE's proven schedule, for the intermediate and the JWT key alike: a
//! successor is *prepared* when the active key has half of its life left (a prepared JWT key is
//! published in the bundle at once, so verifiers learn it before it signs), and *activated*
//! when a sixth is left; the old key is then *retired*. Issuance never stops, and an SVID's
//! `notAfter` is capped at its issuer's, so nothing outlives the chain that vouches for it.
//!
//! The signing path ([`Authority::sign_x509_svid`]) takes a read lock, clones an `Arc`, and
//! signs: no I/O, no datastore call. The caller records the issuance in the audit log.

use std::collections::HashMap;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use spiffe::{SpiffeId, TrustDomain};

use crate::audit::AuditEvent;
use crate::bundle::TrustBundle;
use crate::config::CaSettings;
use crate::entry::RegistrationEntry;
use crate::jwt::{self, JwtKey};
use crate::store::{CaKeyKind, CaKeyRecord, CaKeyState, Datastore, StoreError};
use crate::svid::{self, CaKey, IssuedSvid, Issuer};

pub mod revoke;
pub mod root;
pub mod taint;

/// Errors of the authority.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificate work failed (malformed CSR, bad signature, profile violation).
    #[error(transparent)]
    Svid(#[from] svid::SvidError),
    /// JWT work failed.
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
    /// The journal and the data directory disagree, or the upstream authority is unusable.
    #[error("{0}")]
    Inconsistent(String),
    /// A root lifecycle step was refused; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// The SPIFFE ID is outside this trust domain.
    #[error("spiffe id {id} is not in trust domain {trust_domain}")]
    ForeignId {
        /// The ID.
        id: String,
        /// This CA's trust domain.
        trust_domain: String,
    },
}

/// What a rotation check did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RotationOutcome {
    /// Ids of keys prepared.
    pub prepared: Vec<String>,
    /// Ids of keys activated.
    pub activated: Vec<String>,
    /// Ids of keys retired.
    pub retired: Vec<String>,
}

impl RotationOutcome {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.prepared.is_empty() && self.activated.is_empty() && self.retired.is_empty()
    }
}

/// The keys in use, swapped as a whole on rotation.
#[derive(Clone)]
struct Keys {
    root: Arc<Issuer>,
    root_id: String,
    intermediate: Arc<Issuer>,
    intermediate_id: String,
    prepared_intermediate: Option<(String, Arc<Issuer>)>,
    jwt: Arc<JwtKey>,
    jwt_id: String,
    prepared_jwt: Option<(String, Arc<JwtKey>)>,
    journal: Vec<CaKeyRecord>,
}

/// This CA server's signing keys.
pub struct Authority {
    td: TrustDomain,
    server_id: String,
    settings: CaSettings,
    key_dir: PathBuf,
    store: Arc<dyn Datastore>,
    keys: RwLock<Arc<Keys>>,
    /// The configured upstream root and the path of its key.
    upstream: Option<(CertificateDer<'static>, PathBuf)>,
    /// Held by a rotation check and by the root lifecycle steps, so that two never interleave.
    rotation: tokio::sync::Mutex<()>,
    /// The CRLs every server stored ([`Authority::refresh_crls`]).
    crls: RwLock<Arc<CrlSet>>,
    /// The last CRL sets served, newest last.
    crl_history: std::sync::Mutex<std::collections::VecDeque<Arc<CrlSet>>>,
}

/// The CRLs this server serves, and the serials they list ([`revoke`]).
#[derive(Debug, Default)]
pub struct CrlSet {
    /// One per issuer.
    pub records: Vec<crate::store::CrlRecord>,
    /// Every serial listed (lowercase hex).
    pub serials: std::collections::BTreeSet<String>,
    /// [`meshid_api::tls::revocation::set_digest`] of the records' DER: how agents name the set
    /// they delivered.
    pub digest: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.td)
            .field("server_id", &self.server_id)
            .finish_non_exhaustive()
    }
}

fn to_unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 8]>()))
}

fn cert_times(der: &[u8]) -> Result<(i64, i64), AuthorityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
        AuthorityError::Inconsistent(format!("stored certificate does not parse: {e}"))
    })?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Writes a key file (mode 0600, atomically).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), AuthorityError> {
    meshid_api::files::write_private(path, contents).map_err(|source| AuthorityError::KeyFile {
        path: path.to_owned(),
        source,
    })
}

fn read_private(path: &Path) -> Result<zeroize::Zeroizing<String>, AuthorityError> {
    let err = |source| AuthorityError::KeyFile {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(AuthorityError::Inconsistent(format!(
            "key file {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    std::fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(err)
}

pub use meshid_api::files::ensure_private_dir;

/// Where the private key of root `rec` is, for this server: the configured upstream's key when
/// `rec` is that certificate, the operator's path recorded with the root, or this server's data
/// directory. `None` when this server cannot sign with it.
fn root_key_path(
    rec: &CaKeyRecord,
    upstream: Option<&(CertificateDer<'static>, PathBuf)>,
    key_dir: &Path,
) -> Option<PathBuf> {
    if let Some((der, key)) = upstream {
        if der.as_ref() == rec.public_der.as_slice() {
            return Some(key.clone());
        }
    }
    if !rec.key_path.is_empty() {
        let path = PathBuf::from(&rec.key_path);
        return path.exists().then_some(path);
    }
    let local = key_dir.join(format!("{}.key.pem", rec.id));
    local.exists().then_some(local)
}

/// Loads root `rec` with its key at `path`.
fn load_root(rec: &CaKeyRecord, path: &Path) -> Result<Arc<Issuer>, AuthorityError> {
    let key = CaKey::from_pkcs8_pem(&read_private(path)?)?;
    Ok(Arc::new(Issuer::new(
        CertificateDer::from(rec.public_der.clone()),
        key,
        Vec::new(),
    )?))
}

/// The certificates to send above an intermediate of root `root_id`: the cross-signed copies
/// of that root ([`CaKeyKind::X509CrossSigned`]) whose issuing root is still in the bundle,
/// newest first, so that a peer holding only the older root still finds a path.
fn cross_chain(journal: &[CaKeyRecord], root_id: &str, now_s: i64) -> Vec<CertificateDer<'static>> {
    let in_bundle = |id: &str| {
        journal
            .iter()
            .any(|k| k.id == id && k.kind == CaKeyKind::X509Root && root_in_bundle(k, now_s))
    };
    let mut cross: Vec<&CaKeyRecord> = journal
        .iter()
        .filter(|k| {
            k.kind == CaKeyKind::X509CrossSigned
                && k.state != CaKeyState::Retired
                && k.not_after > now_s
                && k.id == cross_id(root_id)
                && k.parent_id.as_deref().is_some_and(in_bundle)
        })
        .collect();
    cross.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    cross
        .into_iter()
        .map(|k| CertificateDer::from(k.public_der.clone()))
        .collect()
}

/// The journal id of the cross-signed copy of root `root_id`.
pub(crate) fn cross_id(root_id: &str) -> String {
    format!("xsign-{root_id}")
}

/// Whether a root is in the bundle at `now_s`: prepared, active or superseded, and unexpired.
fn root_in_bundle(k: &CaKeyRecord, now_s: i64) -> bool {
    k.state != CaKeyState::Retired && k.not_after > now_s
}

impl Authority {
    /// Loads this server's keys from the journal and the data directory, creating a root (or
    /// adopting the upstream one), an intermediate and a JWT key where none is usable.
    pub async fn load_or_init(
        td: TrustDomain,
        server_id: String,
        settings: CaSettings,
        data_dir: &Path,
        store: Arc<dyn Datastore>,
    ) -> Result<Self, AuthorityError> {
        let key_dir = data_dir.join("keys");
        ensure_private_dir(&key_dir).map_err(|source| AuthorityError::KeyFile {
            path: key_dir.clone(),
            source,
        })?;
        let now = SystemTime::now();
        let mut journal = store.list_ca_keys().await?;
        let actor = format!("ca:{server_id}");

        // Root: the newest active root this server can sign with (its key in the data
        // directory, at the operator's path, or the configured upstream), else the configured
        // upstream root adopted, else a superseded root it can still sign with (the active one's
        // key is out of reach), else a new one.
        let upstream = match &settings.upstream {
            Some(up) => {
                let cert_pem = std::fs::read_to_string(&up.cert).map_err(|source| {
                    AuthorityError::KeyFile {
                        path: up.cert.clone(),
                        source,
                    }
                })?;
                Some((pem_cert(&cert_pem)?, up.key.clone()))
            }
            None => None,
        };
        let now_s = to_unix(now);
        let pick = |journal: &[CaKeyRecord], state: CaKeyState| -> Option<(CaKeyRecord, PathBuf)> {
            journal
                .iter()
                .filter(|k| {
                    k.kind == CaKeyKind::X509Root && k.state == state && k.not_after > now_s
                })
                .filter_map(|k| Some((k.clone(), root_key_path(k, upstream.as_ref(), &key_dir)?)))
                .max_by_key(|(k, _)| k.created_at)
        };
        let upstream_id = upstream
            .as_ref()
            .map(|(der, _)| format!("upstream-{}", &hex::encode(sha2_digest(der.as_ref()))[..16]));
        let chosen = match pick(&journal, CaKeyState::Active) {
            Some(found) => Some(found),
            None if upstream_id
                .as_ref()
                .is_some_and(|id| !journal.iter().any(|k| &k.id == id)) =>
            {
                None
            }
            None => pick(&journal, CaKeyState::Superseded).inspect(|(rec, _)| {
                tracing::warn!(root_id = %rec.id, "no active root whose key this server can read; signing under the superseded root until it can (see meshid-ca ca root status)");
            }),
        };
        let (root_id, root) = match (chosen, &upstream) {
            (Some((rec, path)), _) => (rec.id.clone(), load_root(&rec, &path)?),
            (None, Some((der, key_path))) => {
                let key = CaKey::from_pkcs8_pem(&read_private(key_path)?)?;
                let issuer = Issuer::new(der.clone(), key, Vec::new())?;
                let id = upstream_id.clone().unwrap_or_default();
                if !journal.iter().any(|k| k.id == id) {
                    let (nb, na) = cert_times(der.as_ref())?;
                    let rec = CaKeyRecord {
                        id: id.clone(),
                        kind: CaKeyKind::X509Root,
                        state: CaKeyState::Active,
                        server_id: server_id.clone(),
                        parent_id: None,
                        public_der: der.to_vec(),
                        not_before: nb,
                        not_after: na,
                        created_at: now_s,
                        state_changed_at: now_s,
                        key_path: key_path.display().to_string(),
                        tainted_at: 0,
                    };
                    match store
                        .insert_ca_key(&rec, &key_event("ca.root.adopted", &actor, &rec))
                        .await
                    {
                        Ok(()) => journal.push(rec),
                        // Another server of the trust domain adopted the same root just now.
                        Err(StoreError::AlreadyExists(_)) => journal = store.list_ca_keys().await?,
                        Err(e) => return Err(e.into()),
                    }
                }
                (id, Arc::new(issuer))
            }
            (None, None) => {
                let key = CaKey::generate(settings.key_type)?;
                let der = svid::generate_root(&td, &key, settings.root_ttl, now)?;
                let id = random_id("root");
                write_private(
                    &key_dir.join(format!("{id}.key.pem")),
                    key.to_pkcs8_pem().as_bytes(),
                )?;
                let (nb, na) = cert_times(der.as_ref())?;
                let rec = CaKeyRecord {
                    id: id.clone(),
                    kind: CaKeyKind::X509Root,
                    state: CaKeyState::Active,
                    server_id: server_id.clone(),
                    parent_id: None,
                    public_der: der.to_vec(),
                    not_before: nb,
                    not_after: na,
                    created_at: now_s,
                    state_changed_at: now_s,
                    key_path: String::new(),
                    tainted_at: 0,
                };
                store
                    .insert_ca_key(&rec, &key_event("ca.root.created", &actor, &rec))
                    .await?;
                tracing::info!(root_id = %id, not_after = na, "created trust anchor");
                journal.push(rec);
                let issuer = Issuer::new(der, key, Vec::new())?;
                (id, Arc::new(issuer))
            }
        };

        let this = Self {
            td,
            server_id,
            settings,
            key_dir,
            store,
            upstream,
            rotation: tokio::sync::Mutex::new(()),
            crls: RwLock::default(),
            crl_history: std::sync::Mutex::default(),
            keys: RwLock::new(Arc::new(Keys {
                root: Arc::clone(&root),
                root_id: root_id.clone(),
                // Placeholders replaced below before the authority is returned.
                intermediate: Arc::clone(&root),
                intermediate_id: String::new(),
                prepared_intermediate: None,
                jwt: Arc::new(JwtKey::generate()?),
                jwt_id: String::new(),
                prepared_jwt: None,
                journal: Vec::new(),
            })),
        };
        this.load_slots(root, root_id, journal, now).await?;
        this.refresh_crls().await?;
        Ok(this)
    }

    /// Loads (or creates) the active and prepared intermediate and JWT key of this server.
    async fn load_slots(
        &self,
        root: Arc<Issuer>,
        root_id: String,
        mut journal: Vec<CaKeyRecord>,
        now: SystemTime,
    ) -> Result<(), AuthorityError> {
        let now_s = to_unix(now);
        let mine = |j: &[CaKeyRecord], kind: CaKeyKind, state: CaKeyState| -> Option<CaKeyRecord> {
            j.iter()
                .filter(|k| {
                    k.kind == kind
                        && k.state == state
                        && k.server_id == self.server_id
                        && k.not_after > now_s
                        && k.tainted_at == 0
                        && (kind != CaKeyKind::X509Intermediate
                            || k.parent_id.as_deref() == Some(root_id.as_str()))
                        && self.key_path(&k.id).exists()
                })
                .max_by_key(|k| k.created_at)
                .cloned()
        };

        let chain = cross_chain(&journal, &root_id, now_s);
        let (intermediate_id, intermediate) =
            match mine(&journal, CaKeyKind::X509Intermediate, CaKeyState::Active) {
                Some(rec) => (rec.id.clone(), self.load_intermediate(&rec, chain.clone())?),
                None => {
                    let (rec, issuer) = self
                        .new_intermediate(&root, &root_id, chain.clone(), CaKeyState::Active, now)
                        .await?;
                    journal.push(rec.clone());
                    (rec.id, issuer)
                }
            };
        let prepared_intermediate =
            match mine(&journal, CaKeyKind::X509Intermediate, CaKeyState::Prepared) {
                Some(rec) => Some((rec.id.clone(), self.load_intermediate(&rec, chain.clone())?)),
                None => None,
            };
        let (jwt_id, jwt) = match mine(&journal, CaKeyKind::Jwt, CaKeyState::Active) {
            Some(rec) => (rec.id.clone(), self.load_jwt(&rec)?),
            None => {
                let (rec, key) = self.new_jwt(CaKeyState::Active, now).await?;
                journal.push(rec.clone());
                (rec.id, key)
            }
        };
        let prepared_jwt = match mine(&journal, CaKeyKind::Jwt, CaKeyState::Prepared) {
            Some(rec) => Some((rec.id.clone(), self.load_jwt(&rec)?)),
            None => None,
        };
        // Anything of ours that is still marked active or prepared but was not picked (expired,
        // key file gone, older duplicate) is retired so the journal tells the truth.
        let in_use = [
            Some(intermediate_id.as_str()),
            prepared_intermediate.as_ref().map(|p| p.0.as_str()),
            Some(jwt_id.as_str()),
            prepared_jwt.as_ref().map(|p| p.0.as_str()),
        ];
        let actor = format!("ca:{}", self.server_id);
        for rec in journal.iter_mut() {
            if rec.server_id == self.server_id
                && rec.kind != CaKeyKind::X509Root
                && rec.state != CaKeyState::Retired
                && !in_use.contains(&Some(rec.id.as_str()))
            {
                self.store
                    .set_ca_key_state(
                        &rec.id,
                        CaKeyState::Retired,
                        &key_event("ca.key.retired", &actor, rec),
                    )
                    .await?;
                rec.state = CaKeyState::Retired;
            }
        }
        journal.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        self.swap(Keys {
            root,
            root_id,
            intermediate,
            intermediate_id,
            prepared_intermediate,
            jwt,
            jwt_id,
            prepared_jwt,
            journal,
        });
        Ok(())
    }

    fn swap(&self, keys: Keys) {
        match self.keys.write() {
            Ok(mut guard) => *guard = Arc::new(keys),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
        }
    }

    fn current(&self) -> Arc<Keys> {
        match self.keys.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn key_path(&self, id: &str) -> PathBuf {
        self.key_dir.join(format!("{id}.key.pem"))
    }

    /// Loads intermediate `rec`, sending `chain` above it (the cross-signed roots, if any:
    /// the root itself travels in the bundle).
    fn load_intermediate(
        &self,
        rec: &CaKeyRecord,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<Issuer>, AuthorityError> {
        let key = CaKey::from_pkcs8_pem(&read_private(&self.key_path(&rec.id))?)?;
        Ok(Arc::new(Issuer::new(
            CertificateDer::from(rec.public_der.clone()),
            key,
            chain,
        )?))
    }

    fn load_jwt(&self, rec: &CaKeyRecord) -> Result<Arc<JwtKey>, AuthorityError> {
        Ok(Arc::new(JwtKey::from_pkcs8_pem(&read_private(
            &self.key_path(&rec.id),
        )?)?))
    }

    async fn new_intermediate(
        &self,
        root: &Issuer,
        root_id: &str,
        chain: Vec<CertificateDer<'static>>,
        state: CaKeyState,
        now: SystemTime,
    ) -> Result<(CaKeyRecord, Arc<Issuer>), AuthorityError> {
        let key = CaKey::generate(self.settings.key_type)?;
        let der =
            svid::generate_intermediate(root, &self.td, &key, self.settings.intermediate_ttl, now)?;
        let id = random_id("int");
        write_private(&self.key_path(&id), key.to_pkcs8_pem().as_bytes())?;
        let (nb, na) = cert_times(der.as_ref())?;
        let rec = CaKeyRecord {
            id: id.clone(),
            kind: CaKeyKind::X509Intermediate,
            state,
            server_id: self.server_id.clone(),
            parent_id: Some(root_id.to_owned()),
            public_der: der.to_vec(),
            not_before: nb,
            not_after: na,
            created_at: to_unix(now),
            state_changed_at: to_unix(now),
            key_path: String::new(),
            tainted_at: 0,
        };
        let kind = if state == CaKeyState::Active {
            "ca.intermediate.activated"
        } else {
            "ca.intermediate.prepared"
        };
        self.store
            .insert_ca_key(
                &rec,
                &key_event(kind, &format!("ca:{}", self.server_id), &rec),
            )
            .await?;
        tracing::info!(key_id = %id, not_after = na, state = ?state, "created issuing intermediate");
        Ok((rec, Arc::new(Issuer::new(der, key, chain)?)))
    }

    async fn new_jwt(
        &self,
        state: CaKeyState,
        now: SystemTime,
    ) -> Result<(CaKeyRecord, Arc<JwtKey>), AuthorityError> {
        let key = JwtKey::generate_for(self.settings.jwt_key_type)?;
        let id = format!("jwt-{}", key.kid());
        write_private(&self.key_path(&id), key.to_pkcs8_pem().as_bytes())?;
        let nb = to_unix(now);
        let na = nb + self.settings.jwt_key_ttl.as_secs() as i64;
        let rec = CaKeyRecord {
            id: id.clone(),
            kind: CaKeyKind::Jwt,
            state,
            server_id: self.server_id.clone(),
            parent_id: None,
            public_der: key.public_key_der().to_vec(),
            not_before: nb,
            not_after: na,
            created_at: nb,
            state_changed_at: nb,
            key_path: String::new(),
            tainted_at: 0,
        };
        let kind = if state == CaKeyState::Active {
            "ca.jwt.activated"
        } else {
            "ca.jwt.prepared"
        };
        self.store
            .insert_ca_key(
                &rec,
                &key_event(kind, &format!("ca:{}", self.server_id), &rec),
            )
            .await?;
        tracing::info!(key_id = %id, not_after = na, state = ?state, "created JWT signing key");
        Ok((rec, Arc::new(key)))
    }

    /// Activates the prepared key `next_id` in place of `active` (`label` is `intermediate` or
    /// `jwt`), in the journal and the audit log.
    async fn promote(
        &self,
        label: &str,
        active: &CaKeyRecord,
        next_id: &str,
        journal: &[CaKeyRecord],
        out: &mut RotationOutcome,
    ) -> Result<(), AuthorityError> {
        let actor = format!("ca:{}", self.server_id);
        if let Some(rec) = journal.iter().find(|k| k.id == next_id) {
            let event = key_event(&format!("ca.{label}.activated"), &actor, rec);
            self.store
                .set_ca_key_state(next_id, CaKeyState::Active, &event)
                .await?;
        }
        let event = key_event(&format!("ca.{label}.retired"), &actor, active);
        self.store
            .set_ca_key_state(&active.id, CaKeyState::Retired, &event)
            .await?;
        tracing::info!(kind = label, old = %active.id, new = %next_id, "activated CA key");
        out.activated.push(next_id.to_owned());
        out.retired.push(active.id.clone());
        Ok(())
    }

    /// One rotation check at `now`: follows a root activation (a new intermediate under the
    /// newly active root), prepares successors at half-life, activates them at a sixth of life
    /// left (or at once if the active key has expired), retires what they replace, and keeps the
    /// chain sent above the intermediate in step with the bundle (cross-signed roots).
    pub async fn rotate(&self, now: SystemTime) -> Result<RotationOutcome, AuthorityError> {
        let _one_at_a_time = self.rotation.lock().await;
        self.rotate_locked(now).await
    }

    /// After a key change is committed: follows it now. A failure is logged, not returned:
    /// the change is on record (the caller must still announce it), and the rotation loop
    /// retries on its next tick.
    pub(crate) async fn follow_change(&self, now: SystemTime, change: &str) {
        if let Err(e) = self.rotate_locked(now).await {
            tracing::error!(error = %e, change, "the change is recorded, but this CA server could not follow it yet; its rotation loop retries");
        }
    }

    /// The longest an X.509-SVID can live: entries are capped at [`crate::entry::MAX_X509_TTL`],
    /// SVIDs without an entry's TTL (agents, servers) get the configured default.
    pub(crate) fn longest_x509_ttl_s(&self) -> i64 {
        crate::entry::MAX_X509_TTL
            .max(self.settings.default_x509_svid_ttl)
            .as_secs() as i64
    }

    pub(crate) async fn rotate_locked(
        &self,
        now: SystemTime,
    ) -> Result<RotationOutcome, AuthorityError> {
        let keys = self.current();
        let now_s = to_unix(now);
        let mut out = RotationOutcome::default();
        let mut journal = self.store.list_ca_keys().await?;
        let find = |j: &[CaKeyRecord], id: &str| j.iter().find(|k| k.id == id).cloned();
        let phase = |rec: &CaKeyRecord| {
            let life = (rec.not_after - rec.not_before).max(1);
            let left = rec.not_after - now_s;
            (left * 2 <= life, left * 6 <= life || left <= 0)
        };
        let actor = format!("ca:{}", self.server_id);

        let mut root = (keys.root_id.clone(), Arc::clone(&keys.root));
        let mut intermediate = (keys.intermediate_id.clone(), Arc::clone(&keys.intermediate));
        let mut prepared_intermediate = keys.prepared_intermediate.clone();

        // A root was activated (through this server or another): issue under it from now on.
        if let Some((root_id, issuer)) = self.root_to_follow(&journal, &root.0, now_s)? {
            let chain = cross_chain(&journal, &root_id, now_s);
            let (next, next_issuer) = self
                .new_intermediate(&issuer, &root_id, chain, CaKeyState::Active, now)
                .await?;
            let old = [
                Some(intermediate.0.clone()),
                prepared_intermediate.take().map(|p| p.0),
            ];
            for old in old.into_iter().flatten() {
                if let Some(old_rec) = find(&journal, &old) {
                    let event = key_event("ca.intermediate.retired", &actor, &old_rec);
                    self.store
                        .transition_ca_key(&old, None, CaKeyState::Retired, now_s, &event)
                        .await?;
                    out.retired.push(old);
                }
            }
            tracing::info!(root_id = %root_id, intermediate = %next.id, "issuing under the newly active root");
            out.activated.push(next.id.clone());
            journal.push(next.clone());
            root = (root_id, issuer);
            intermediate = (next.id, next_issuer);
        }

        // A tainted key signs nothing more: the active one is replaced at once, a prepared one
        // dropped (the schedule prepares another).
        let tainted =
            |j: &[CaKeyRecord], id: &str| j.iter().any(|k| k.id == id && k.tainted_at > 0);
        if prepared_intermediate
            .as_ref()
            .is_some_and(|(id, _)| tainted(&journal, id))
        {
            if let Some((id, _)) = prepared_intermediate.take() {
                self.retire_tainted("intermediate", &id, &journal, now_s, &mut out)
                    .await?;
            }
        }
        if tainted(&journal, &intermediate.0) {
            let chain = cross_chain(&journal, &root.0, now_s);
            let (next, next_issuer) = self
                .new_intermediate(&root.1, &root.0, chain, CaKeyState::Active, now)
                .await?;
            self.retire_tainted("intermediate", &intermediate.0, &journal, now_s, &mut out)
                .await?;
            out.activated.push(next.id.clone());
            journal.push(next.clone());
            intermediate = (next.id, next_issuer);
        }
        if let Some(active) = find(&journal, &intermediate.0) {
            let (prepare, activate) = phase(&active);
            if prepare && prepared_intermediate.is_none() {
                let chain = cross_chain(&journal, &root.0, now_s);
                let (rec, issuer) = self
                    .new_intermediate(&root.1, &root.0, chain, CaKeyState::Prepared, now)
                    .await?;
                out.prepared.push(rec.id.clone());
                journal.push(rec.clone());
                prepared_intermediate = Some((rec.id, issuer));
            }
            if activate {
                if let Some((next_id, next)) = prepared_intermediate.take() {
                    self.promote("intermediate", &active, &next_id, &journal, &mut out)
                        .await?;
                    intermediate = (next_id, next);
                }
            }
        }

        let mut jwt = (keys.jwt_id.clone(), Arc::clone(&keys.jwt));
        let mut prepared_jwt = keys.prepared_jwt.clone();
        if prepared_jwt
            .as_ref()
            .is_some_and(|(id, _)| tainted(&journal, id))
        {
            if let Some((id, _)) = prepared_jwt.take() {
                self.retire_tainted("jwt", &id, &journal, now_s, &mut out)
                    .await?;
            }
        }
        if tainted(&journal, &jwt.0) {
            let (next, key) = self.new_jwt(CaKeyState::Active, now).await?;
            self.retire_tainted("jwt", &jwt.0, &journal, now_s, &mut out)
                .await?;
            out.activated.push(next.id.clone());
            journal.push(next.clone());
            jwt = (next.id, key);
        }
        if let Some(active) = find(&journal, &jwt.0) {
            let (prepare, activate) = phase(&active);
            if prepare && prepared_jwt.is_none() {
                let (rec, key) = self.new_jwt(CaKeyState::Prepared, now).await?;
                out.prepared.push(rec.id.clone());
                journal.push(rec.clone());
                prepared_jwt = Some((rec.id, key));
            }
            if activate {
                if let Some((next_id, next)) = prepared_jwt.take() {
                    self.promote("jwt", &active, &next_id, &journal, &mut out)
                        .await?;
                    jwt = (next_id, next);
                }
            }
        }
        if root.1.not_after() - now_s < self.settings.intermediate_ttl.as_secs() as i64 {
            tracing::warn!(root_id = %root.0, not_after = root.1.not_after(), "trust anchor expires within one intermediate lifetime; rotate it (meshid-ca ca root prepare, activate, retire)");
        }
        let journal = if out.is_empty() {
            journal
        } else {
            self.store.list_ca_keys().await?
        };

        // The chain above the intermediates follows the bundle: a cross-signed root is sent while
        // the root that signed it is trusted, and dropped once it is retired.
        let chain = cross_chain(&journal, &root.0, now_s);
        if intermediate.1.chain_to_root() != chain.as_slice() {
            if let Some(rec) = find(&journal, &intermediate.0) {
                intermediate.1 = self.load_intermediate(&rec, chain.clone())?;
            }
        }
        if let Some((id, issuer)) = prepared_intermediate.as_mut() {
            if issuer.chain_to_root() != chain.as_slice() {
                if let Some(rec) = find(&journal, id) {
                    *issuer = self.load_intermediate(&rec, chain.clone())?;
                }
            }
        }
        self.swap(Keys {
            root: root.1,
            root_id: root.0,
            intermediate: intermediate.1,
            intermediate_id: intermediate.0,
            prepared_intermediate,
            jwt: jwt.1,
            jwt_id: jwt.0,
            prepared_jwt,
            journal,
        });
        Ok(out)
    }

    /// Retires this server's tainted key `id` (`label` is `intermediate` or `jwt`).
    async fn retire_tainted(
        &self,
        label: &str,
        id: &str,
        journal: &[CaKeyRecord],
        now_s: i64,
        out: &mut RotationOutcome,
    ) -> Result<(), AuthorityError> {
        let Some(rec) = journal.iter().find(|k| k.id == id) else {
            return Ok(());
        };
        let mut event = key_event(
            &format!("ca.{label}.retired"),
            &format!("ca:{}", self.server_id),
            rec,
        );
        event.details["reason"] = "tainted".into();
        self.store
            .transition_ca_key(id, None, CaKeyState::Retired, now_s, &event)
            .await?;
        tracing::warn!(key_id = %id, "tainted key replaced");
        out.retired.push(id.to_owned());
        Ok(())
    }

    /// The root to issue under instead of `current`, when `current` is no longer the active
    /// root and this server can sign with the one that is (the newest, if several).
    fn root_to_follow(
        &self,
        journal: &[CaKeyRecord],
        current: &str,
        now_s: i64,
    ) -> Result<Option<(String, Arc<Issuer>)>, AuthorityError> {
        let still_active = journal
            .iter()
            .any(|k| k.id == current && k.state == CaKeyState::Active && k.not_after > now_s);
        if still_active {
            return Ok(None);
        }
        let next = journal
            .iter()
            .filter(|k| {
                k.kind == CaKeyKind::X509Root
                    && k.state == CaKeyState::Active
                    && k.not_after > now_s
                    && k.id != current
            })
            .filter_map(|k| Some((k, root_key_path(k, self.upstream.as_ref(), &self.key_dir)?)))
            .max_by_key(|(k, _)| k.created_at);
        match next {
            Some((rec, path)) => Ok(Some((rec.id.clone(), load_root(rec, &path)?))),
            None => {
                if journal
                    .iter()
                    .any(|k| k.kind == CaKeyKind::X509Root && k.state == CaKeyState::Active)
                {
                    tracing::error!(root_id = %current, "the trust domain's active root is not one this server can sign with (its key is neither in this server's data directory nor at a path it can read); still issuing under the superseded root, so it cannot be retired. Give the next root to every server with meshid-ca ca root prepare --upstream-cert/--upstream-key on paths they all read");
                }
                Ok(None)
            }
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// This server's id.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// The settings in force.
    pub fn settings(&self) -> &CaSettings {
        &self.settings
    }

    fn check_member(&self, id: &SpiffeId) -> Result<(), AuthorityError> {
        if id.is_member_of(&self.td) {
            Ok(())
        } else {
            Err(AuthorityError::ForeignId {
                id: id.to_string(),
                trust_domain: self.td.to_string(),
            })
        }
    }

    /// Signs an X.509-SVID for `spiffe_id` over the public key of a DER CSR. Only the key is
    /// taken from the CSR. `ttl` `None` means the configured default.
    pub fn sign_x509_svid(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Option<Duration>,
    ) -> Result<IssuedSvid, AuthorityError> {
        self.check_member(spiffe_id)?;
        let csr = svid::parse_csr(csr_der)?;
        let keys = self.current();
        let mut svid = svid::sign_x509_svid(
            &keys.intermediate,
            &csr,
            spiffe_id,
            dns_names,
            ttl.unwrap_or(self.settings.default_x509_svid_ttl),
            SystemTime::now(),
        )?;
        svid.issuer.clone_from(&keys.intermediate_id);
        Ok(svid)
    }

    /// Signs the X.509-SVID of an agent or a CA server, marked with its `role`.
    pub fn sign_role_svid(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        ttl: Option<Duration>,
        role: meshid_api::role::Role,
    ) -> Result<IssuedSvid, AuthorityError> {
        self.check_member(spiffe_id)?;
        let csr = svid::parse_csr(csr_der)?;
        let keys = self.current();
        let mut svid = svid::sign_role_svid(
            &keys.intermediate,
            &csr,
            spiffe_id,
            ttl.unwrap_or(self.settings.default_x509_svid_ttl),
            SystemTime::now(),
            role,
        )?;
        svid.issuer.clone_from(&keys.intermediate_id);
        Ok(svid)
    }

    /// Signs the X.509-SVID of a registration entry: the identity, DNS names and lifetime come
    /// from the entry, never from the CSR.
    pub fn sign_for_entry(
        &self,
        entry: &RegistrationEntry,
        csr_der: &[u8],
    ) -> Result<IssuedSvid, AuthorityError> {
        self.sign_x509_svid(
            csr_der,
            &entry.spiffe_id,
            &entry.dns_names,
            entry.x509_svid_ttl,
        )
    }

    /// Mints a JWT-SVID. Returns the token and its expiry (unix seconds).
    pub fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<(String, i64), AuthorityError> {
        self.check_member(spiffe_id)?;
        let ttl = ttl
            .unwrap_or(self.settings.default_jwt_svid_ttl)
            .min(self.settings.max_jwt_svid_ttl);
        let now = SystemTime::now();
        let key = Arc::clone(&self.current().jwt);
        let issuer = self.settings.jwt_issuer.as_deref();
        let token = jwt::mint_jwt_svid_from(&key, issuer, spiffe_id, audience, ttl, now)?;
        Ok((token, to_unix(now) + ttl.as_secs() as i64))
    }

    /// The trust bundle: every unexpired root that is prepared or active, and every JWT key
    /// (of any server) that is prepared or active, or retired but possibly still verifying
    /// tokens. The sequence is derived from the journal, so all servers agree on it.
    pub fn bundle(&self) -> TrustBundle {
        bundle_from_journal(
            &self.td,
            &self.current().journal,
            &self.settings,
            SystemTime::now(),
        )
    }

    /// The CA journal as last loaded.
    pub fn journal(&self) -> Vec<CaKeyRecord> {
        self.current().journal.clone()
    }

    /// Expiry (unix seconds) of the active intermediate and root.
    pub fn expiries(&self) -> (i64, i64) {
        let k = self.current();
        (k.intermediate.not_after(), k.root.not_after())
    }

    /// Reloads the journal from the datastore (to see keys other servers added).
    pub async fn refresh_journal(&self) -> Result<(), AuthorityError> {
        let journal = self.store.list_ca_keys().await?;
        let k = self.current();
        self.swap(Keys {
            root: Arc::clone(&k.root),
            root_id: k.root_id.clone(),
            intermediate: Arc::clone(&k.intermediate),
            intermediate_id: k.intermediate_id.clone(),
            prepared_intermediate: k.prepared_intermediate.clone(),
            jwt: Arc::clone(&k.jwt),
            jwt_id: k.jwt_id.clone(),
            prepared_jwt: k.prepared_jwt.clone(),
            journal,
        });
        Ok(())
    }
}

/// Computes the bundle from a journal at `now` (pure, so every server computes the same one).
pub fn bundle_from_journal(
    td: &TrustDomain,
    journal: &[CaKeyRecord],
    settings: &CaSettings,
    now: SystemTime,
) -> TrustBundle {
    let now_s = to_unix(now);
    // No token lives longer than the maximum (the default is within it).
    let jwt_grace = settings
        .default_jwt_svid_ttl
        .max(settings.max_jwt_svid_ttl)
        .as_secs() as i64;
    let mut sequence = 0i64;
    let mut roots = Vec::new();
    let mut jwt_keys = Vec::new();
    let mut seen = HashMap::new();
    for k in journal {
        // When the key left its state for the last one (0: not recorded, rows from before
        // schema version 4; then the key's own end is the bound).
        let retired_at = (k.state == CaKeyState::Retired && k.state_changed_at > 0)
            .then_some(k.state_changed_at);
        match k.kind {
            CaKeyKind::X509Root => {
                if root_in_bundle(k, now_s) {
                    sequence = sequence.max(k.created_at);
                    roots.push(CertificateDer::from(k.public_der.clone()));
                } else {
                    // It left the bundle when it was retired or expired, whichever came first.
                    let left = retired_at.unwrap_or(k.not_after).min(k.not_after);
                    sequence = sequence.max(left.min(now_s));
                }
            }
            CaKeyKind::Jwt => {
                // Published until the last token it can have signed expires: it signs until it
                // is retired or tainted (or expires), and no token lives longer than
                // `jwt_grace`.
                let tainted_at = (k.tainted_at > 0).then_some(k.tainted_at);
                let signed_until = [retired_at, tainted_at]
                    .into_iter()
                    .flatten()
                    .fold(k.not_after, i64::min);
                let leaves = signed_until + jwt_grace;
                if leaves > now_s {
                    sequence = sequence.max(k.created_at);
                    if seen.insert(k.id.clone(), ()).is_none() {
                        if let Ok(jwk) =
                            jwt::jwk_from_spki(&k.public_der, k.id.trim_start_matches("jwt-"))
                        {
                            jwt_keys.push(jwk);
                        }
                    }
                } else {
                    sequence = sequence.max(leaves);
                }
            }
            CaKeyKind::X509Intermediate | CaKeyKind::X509CrossSigned => {}
        }
    }
    TrustBundle {
        trust_domain: td.clone(),
        x509_authorities: roots,
        jwt_authorities: jwt_keys,
        sequence: sequence.max(0) as u64,
        refresh_hint: settings.bundle_refresh_hint,
    }
}

fn key_event(kind: &str, actor: &str, rec: &CaKeyRecord) -> AuditEvent {
    AuditEvent::new(
        kind,
        actor,
        serde_json::json!({
            "key_id": rec.id,
            "server_id": rec.server_id,
            "not_before": rec.not_before,
            "not_after": rec.not_after,
        }),
    )
}

fn sha2_digest(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn pem_cert(pem: &str) -> Result<CertificateDer<'static>, AuthorityError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        AuthorityError::Inconsistent(format!(
            "upstream certificate is not a PEM certificate: {e}"
        ))
    })
}
