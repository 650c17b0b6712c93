//! The trust anchor's rotation, in phases that overlap so that nothing fails.
//!
//! 1. **Prepare** ([`Authority::prepare_root`]): a next root (generated here, or the
//!    operator's, read from a path every CA server can read) joins the bundle, and so a new
//!    bundle sequence; the current root cross-signs it. Agents push the two-root bundle to every
//!    workload stream and report it delivered.
//! 2. **Activate** ([`Authority::activate_root`]): refused while a live agent (unbanned, its SVID
//!    unexpired) has not reported that sequence delivered, naming the laggards; `force`
//!    overrides it, on the record. The next root becomes active and the old one superseded;
//!    every server that can sign with the new root issues from a new intermediate under it,
//!    sending the cross-signed root above it, so that a peer still holding only the old root
//!    verifies the new SVIDs through it.
//! 3. **Retire** ([`Authority::retire_root`]): refused while an intermediate under the old root
//!    still signs, or while the issuance records (the audit log, which names the issuing key of
//!    every X.509-SVID) show an unexpired SVID signed under it. Then the old root leaves the
//!    bundle, and the cross-signed copy leaves the chains.
//!
//! Every step is an audit record with who asked, why, and what was measured: how long the
//! agents took to acknowledge, who lagged, what was forced.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use spiffe::SpiffeId;

use super::{
    cert_times, cross_id, key_event, pem_cert, random_id, read_private, sha2_digest, to_unix,
    write_private, Authority, AuthorityError,
};
use crate::config::RootRotation;
use crate::store::{CaKeyKind, CaKeyRecord, CaKeyState};
use crate::svid::{self, CaKey, Issuer};

/// Audit record kinds that say an X.509-SVID was issued (each names its `issuer` and
/// `not_after`).
pub const ISSUANCE_KINDS: &[&str] = &[
    "svid.x509.issued",
    "svid.x509.minted",
    "svid.x509.server",
    "agent.attested",
    "agent.renewed",
];

/// Where a root rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootPhase {
    /// One root, nothing in progress.
    Stable,
    /// A next root is in the bundle and waits for activation.
    Prepared,
    /// The new root signs; the old one is still in the bundle until it is retired.
    Activated,
}

impl RootPhase {
    /// The stable name (admin API, CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            RootPhase::Stable => "stable",
            RootPhase::Prepared => "prepared",
            RootPhase::Activated => "activated",
        }
    }
}

/// What one live agent last reported delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAck {
    /// The agent.
    pub agent: SpiffeId,
    /// The bundle sequence every X.509 stream of its workloads has been handed (0: never
    /// reported).
    pub delivered: u64,
    /// When it reported (unix seconds; 0: never).
    pub reported_at: i64,
    /// The CA server it reported to.
    pub server_id: String,
    /// Its open X.509 streams.
    pub x509_streams: u64,
}

/// Which root a CA server issues under (its active intermediate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIssuer {
    /// The CA server.
    pub server_id: String,
    /// Its active intermediate.
    pub intermediate_id: String,
    /// The root above it.
    pub root_id: String,
}

/// Whether the superseded roots can be retired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetireCheck {
    /// The superseded roots.
    pub roots: Vec<String>,
    /// Why retiring now would be refused (empty: allowed).
    pub blockers: Vec<String>,
    /// Unexpired X.509-SVIDs signed under them, per the issuance records.
    pub unexpired: u64,
    /// The last of those expires at (unix seconds; 0: none).
    pub last_expiry: i64,
}

/// The state of the root rotation.
#[derive(Debug, Clone)]
pub struct RootStatus {
    /// The phase.
    pub phase: RootPhase,
    /// Every root of the journal, oldest first.
    pub roots: Vec<CaKeyRecord>,
    /// Roots that have a cross-signed copy (by the root they replace).
    pub cross_signed: Vec<String>,
    /// The prepared root, if any; its `created_at` is the bundle sequence agents must deliver.
    pub prepared: Option<CaKeyRecord>,
    /// The bundle sequence the agents are measured against: the prepared root's, else the
    /// current bundle's.
    pub target_sequence: u64,
    /// The current bundle sequence.
    pub bundle_sequence: u64,
    /// Live agents (unbanned, SVID unexpired).
    pub live_agents: usize,
    /// Live agents that delivered `target_sequence`.
    pub acknowledged: usize,
    /// Live agents that have not, slowest (lowest sequence, oldest report) first.
    pub lagging: Vec<AgentAck>,
    /// Which root each CA server issues under.
    pub servers: Vec<ServerIssuer>,
    /// Whether the superseded roots can be retired.
    pub retire: RetireCheck,
}

/// What an activation did.
#[derive(Debug, Clone)]
pub struct Activation {
    /// The root now active.
    pub root_id: String,
    /// The roots it superseded.
    pub superseded: Vec<String>,
    /// Whether the delivery gate was overridden.
    pub forced: bool,
    /// The agents that had not acknowledged (forced past).
    pub lagging: Vec<String>,
    /// Seconds from prepare to the last acknowledgement (an upper bound: reports come on change).
    pub acknowledged_within_s: Option<i64>,
}

/// The stamp of a change to the bundle: now, but strictly after the current sequence, so that
/// every content change moves the sequence forward.
fn bundle_stamp(auth: &Authority, now_s: i64) -> i64 {
    now_s.max(i64::try_from(auth.bundle().sequence).unwrap_or(i64::MAX - 1) + 1)
}

impl Authority {
    /// Calls `f` with every issuance record (and its parsed details) of `since` or later, in
    /// the order they were written.
    pub(crate) async fn scan_issuances(
        &self,
        since: i64,
        mut f: impl FnMut(&crate::audit::AuditRecord, &serde_json::Value),
    ) -> Result<(), AuthorityError> {
        let mut after = 0;
        loop {
            let page = self
                .store
                .audit_records_since(since, ISSUANCE_KINDS, after, 10_000)
                .await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            after = last.seq;
            for r in &page {
                if let Ok(d) = serde_json::from_str::<serde_json::Value>(&r.details) {
                    f(r, &d);
                }
            }
        }
    }

    /// The audit event of a root lifecycle step, naming the CA server that took it (peers
    /// replay it from the change feed; this server announced it already).
    fn step_event(&self, kind: &str, actor: &str, rec: &CaKeyRecord) -> crate::audit::AuditEvent {
        let mut event = key_event(kind, actor, rec);
        event.details["ca_server"] = self.server_id.clone().into();
        event
    }

    /// The live agents and what each last reported delivered, measured against `sequence`.
    async fn acknowledgements(
        &self,
        sequence: u64,
        now_s: i64,
    ) -> Result<(usize, usize, Vec<AgentAck>), AuthorityError> {
        let agents = self.store.list_agents().await?;
        let deliveries = self.store.list_deliveries().await?;
        Ok(acknowledgements(&agents, &deliveries, sequence, now_s))
    }

    /// Whether the superseded roots of `journal` can be retired at `now_s`, proven from the
    /// journal (no intermediate under them still signs) and the issuance records (no
    /// X.509-SVID signed under them is unexpired).
    async fn retire_check(
        &self,
        journal: &[CaKeyRecord],
        now_s: i64,
    ) -> Result<RetireCheck, AuthorityError> {
        let roots: Vec<&CaKeyRecord> = journal
            .iter()
            .filter(|k| {
                k.kind == CaKeyKind::X509Root
                    && k.state == CaKeyState::Superseded
                    && k.not_after > now_s
            })
            .collect();
        let mut check = RetireCheck {
            roots: roots.iter().map(|r| r.id.clone()).collect(),
            ..RetireCheck::default()
        };
        if roots.is_empty() {
            return Ok(check);
        }
        let under: Vec<&CaKeyRecord> = journal
            .iter()
            .filter(|k| {
                k.kind == CaKeyKind::X509Intermediate
                    && k.parent_id
                        .as_deref()
                        .is_some_and(|p| check.roots.iter().any(|r| r == p))
            })
            .collect();
        for k in &under {
            if k.state != CaKeyState::Retired && k.not_after > now_s {
                check.blockers.push(format!(
                    "intermediate {} of CA server {} still signs under root {} (that server cannot read the active root's key, or has not run a rotation check since activation)",
                    k.id,
                    k.server_id,
                    k.parent_id.as_deref().unwrap_or_default()
                ));
            }
        }
        // No SVID outlives its intermediate, nor the longest X.509 lifetime: only records
        // newer than both bounds can be unexpired.
        let since = under
            .iter()
            .map(|k| k.created_at)
            .min()
            .unwrap_or(now_s)
            .max(now_s - self.longest_x509_ttl_s() - 60);
        let issuers: Vec<&str> = under.iter().map(|k| k.id.as_str()).collect();
        // An agent SVID counts only while it is the agent's current one: an agent opens new
        // connections with its current SVID only, and the one it replaced serves (for the
        // overlap) only connections already established, which retiring a root does not touch
        // (a chain is verified at the handshake). An evicted agent's SVID is refused anyway.
        let agents: HashMap<String, crate::store::AgentRecord> = self
            .store
            .list_agents()
            .await?
            .into_iter()
            .map(|a| (a.spiffe_id.to_string(), a))
            .collect();
        let honoured = |d: &serde_json::Value| {
            let field = |n: &str| d.get(n).and_then(serde_json::Value::as_str).unwrap_or("");
            agents
                .get(field("spiffe_id"))
                .is_some_and(|a| !a.banned && a.serial == field("serial"))
        };
        // A CA server uses only its newest node API SVID.
        let mut server_svids: HashMap<String, (i64, bool)> = HashMap::new();
        let mut by_kind: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let mut count = |kind: &str, not_after: i64, check: &mut RetireCheck| {
            check.unexpired += 1;
            check.last_expiry = check.last_expiry.max(not_after);
            let label = match kind {
                "svid.x509.server" => "CA server",
                k if k.starts_with("agent.") => "agent",
                _ => "workload",
            };
            *by_kind.entry(label).or_default() += 1;
        };
        self.scan_issuances(since, |r, d| {
            // Every issuance record meshid writes has its notAfter.
            let Some(not_after) = d.get("not_after").and_then(serde_json::Value::as_i64) else {
                return;
            };
            // A record without an issuer (written before issuers were recorded) might be
            // under the old root: counted, to be safe.
            let under_old = match d.get("issuer").and_then(serde_json::Value::as_str) {
                Some(issuer) => issuers.contains(&issuer),
                None => true,
            };
            if r.kind == "svid.x509.server" {
                server_svids.insert(r.actor.clone(), (not_after, under_old));
                return;
            }
            if not_after <= now_s || !under_old {
                return;
            }
            if r.kind.starts_with("agent.") && !honoured(d) {
                return;
            }
            count(&r.kind, not_after, &mut check);
        })
        .await?;
        for (not_after, under_old) in server_svids.into_values() {
            if under_old && not_after > now_s {
                count("svid.x509.server", not_after, &mut check);
            }
        }
        if check.unexpired > 0 {
            let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
            check.blockers.push(format!(
                "{} X.509-SVID(s) signed under the superseded root are unexpired ({}); the last expires at {} (in {} s)",
                check.unexpired,
                kinds.join(", "),
                check.last_expiry,
                check.last_expiry - now_s
            ));
        }
        Ok(check)
    }

    /// Where the root rotation stands, measured now.
    pub async fn root_status(&self) -> Result<RootStatus, AuthorityError> {
        let now_s = to_unix(SystemTime::now());
        let journal = self.store.list_ca_keys().await?;
        let bundle_sequence =
            super::bundle_from_journal(&self.td, &journal, &self.settings, SystemTime::now())
                .sequence;
        let roots: Vec<CaKeyRecord> = journal
            .iter()
            .filter(|k| k.kind == CaKeyKind::X509Root)
            .cloned()
            .collect();
        let prepared = roots
            .iter()
            .filter(|k| k.state == CaKeyState::Prepared && k.not_after > now_s)
            .max_by_key(|k| k.created_at)
            .cloned();
        let retire = self.retire_check(&journal, now_s).await?;
        let phase = if prepared.is_some() {
            RootPhase::Prepared
        } else if !retire.roots.is_empty() {
            RootPhase::Activated
        } else {
            RootPhase::Stable
        };
        let target_sequence = prepared
            .as_ref()
            .map_or(bundle_sequence, |p| p.created_at.max(0) as u64);
        let (live_agents, acknowledged, lagging) =
            self.acknowledgements(target_sequence, now_s).await?;
        let cross_signed = journal
            .iter()
            .filter(|k| k.kind == CaKeyKind::X509CrossSigned && k.state != CaKeyState::Retired)
            .filter_map(|k| k.id.strip_prefix("xsign-").map(str::to_owned))
            .collect();
        let servers = journal
            .iter()
            .filter(|k| {
                k.kind == CaKeyKind::X509Intermediate
                    && k.state == CaKeyState::Active
                    && k.not_after > now_s
            })
            .map(|k| ServerIssuer {
                server_id: k.server_id.clone(),
                intermediate_id: k.id.clone(),
                root_id: k.parent_id.clone().unwrap_or_default(),
            })
            .collect();
        Ok(RootStatus {
            phase,
            roots,
            cross_signed,
            prepared,
            target_sequence,
            bundle_sequence,
            live_agents,
            acknowledged,
            lagging,
            servers,
            retire,
        })
    }

    /// Prepares the next root: generated (its key in this server's data directory), or the
    /// operator's `upstream` (certificate and key paths, which every CA server of the trust
    /// domain must be able to read; the key is never copied). It joins the bundle at once,
    /// under a new sequence, and the root this server signs under cross-signs it.
    pub async fn prepare_root(
        &self,
        upstream: Option<(PathBuf, PathBuf)>,
        actor: &str,
        reason: &str,
    ) -> Result<CaKeyRecord, AuthorityError> {
        let _one_at_a_time = self.rotation.lock().await;
        let now = SystemTime::now();
        let now_s = to_unix(now);
        let journal = self.store.list_ca_keys().await?;
        if let Some(p) = journal.iter().find(|k| {
            k.kind == CaKeyKind::X509Root && k.state == CaKeyState::Prepared && k.not_after > now_s
        }) {
            return Err(AuthorityError::Refused(format!(
                "root {} is already prepared; activate it (meshid-ca ca root activate) first",
                p.id
            )));
        }
        let (id, der, key_path, issuer) = match upstream {
            Some((cert, key_file)) => {
                let pem =
                    std::fs::read_to_string(&cert).map_err(|source| AuthorityError::KeyFile {
                        path: cert.clone(),
                        source,
                    })?;
                let der = pem_cert(&pem)?;
                let key = CaKey::from_pkcs8_pem(&read_private(&key_file)?)?;
                let issuer = Issuer::new(der.clone(), key, Vec::new())?;
                if !issuer.is_self_signed() {
                    return Err(AuthorityError::Refused(
                        "the operator's root must be a self-signed CA certificate".into(),
                    ));
                }
                if issuer.trust_domain().is_some_and(|td| td != &self.td) {
                    return Err(AuthorityError::Refused(format!(
                        "the operator's root names another trust domain than {}",
                        self.td
                    )));
                }
                let id = format!("upstream-{}", &hex::encode(sha2_digest(der.as_ref()))[..16]);
                if journal.iter().any(|k| k.id == id) {
                    return Err(AuthorityError::Refused(format!(
                        "root {id} (that certificate) is already in the journal"
                    )));
                }
                let path = std::fs::canonicalize(&key_file).unwrap_or(key_file);
                (id, der, path.display().to_string(), issuer)
            }
            None => {
                let key = CaKey::generate(self.settings.key_type)?;
                let der = svid::generate_root(&self.td, &key, self.settings.root_ttl, now)?;
                let id = random_id("root");
                write_private(&self.key_path(&id), key.to_pkcs8_pem().as_bytes())?;
                let issuer = Issuer::new(der.clone(), key, Vec::new())?;
                (id, der, String::new(), issuer)
            }
        };
        let (nb, na) = cert_times(der.as_ref())?;
        let min_life = self.settings.intermediate_ttl.as_secs() as i64;
        if na - now_s < min_life {
            return Err(AuthorityError::Refused(format!(
                "the next root expires in {} s, less than one intermediate lifetime ({min_life} s)",
                na - now_s
            )));
        }
        // The JWT key follows the same phases: its successor is published now (before the
        // root, so that the root's stamp, the sequence agents must deliver, covers it too) and
        // signs from activation on; the old kid stays published until its last token expires.
        let current = self.current();
        if current.prepared_jwt.is_none() {
            let (jwt, key) = self.new_jwt(CaKeyState::Prepared, now).await?;
            let mut keys = (*current).clone();
            keys.prepared_jwt = Some((jwt.id, key));
            keys.journal = self.store.list_ca_keys().await?;
            self.swap(keys);
        }
        let stamp = bundle_stamp(self, now_s);
        let rec = CaKeyRecord {
            id: id.clone(),
            kind: CaKeyKind::X509Root,
            state: CaKeyState::Prepared,
            server_id: self.server_id.clone(),
            parent_id: None,
            public_der: der.to_vec(),
            not_before: nb,
            not_after: na,
            created_at: stamp,
            state_changed_at: stamp,
            key_path,
            tainted_at: 0,
        };
        let mut event = self.step_event("ca.root.prepared", actor, &rec);
        event.details["reason"] = reason.into();
        event.details["bundle_sequence"] = stamp.into();
        event.details["operator_supplied"] = (!rec.key_path.is_empty()).into();
        self.store.insert_ca_key(&rec, &event).await?;
        drop(issuer);

        // The root this server signs under vouches for the next one, for peers that keep only
        // the old root.
        let current = self.current();
        match svid::cross_sign(&current.root, &der, now) {
            Ok(cross) => {
                let (cnb, cna) = cert_times(cross.as_ref())?;
                let xrec = CaKeyRecord {
                    id: cross_id(&id),
                    kind: CaKeyKind::X509CrossSigned,
                    state: CaKeyState::Active,
                    server_id: self.server_id.clone(),
                    parent_id: Some(current.root_id.clone()),
                    public_der: cross.to_vec(),
                    not_before: cnb,
                    not_after: cna,
                    created_at: stamp,
                    state_changed_at: stamp,
                    key_path: String::new(),
                    tainted_at: 0,
                };
                let event = key_event("ca.root.cross_signed", actor, &xrec);
                self.store.insert_ca_key(&xrec, &event).await?;
            }
            Err(e) => {
                tracing::warn!(root_id = %id, error = %e, "cannot cross-sign the next root; peers that keep only the old root will not verify SVIDs of the new one (the delivery gate still holds)");
            }
        }
        tracing::info!(root_id = %id, bundle_sequence = stamp, actor, reason, "next root prepared");
        self.follow_change(now, "root prepared").await;
        Ok(rec)
    }

    /// Activates the prepared root, if every live agent has delivered its bundle (or `force`).
    pub async fn activate_root(
        &self,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> Result<Activation, AuthorityError> {
        let _one_at_a_time = self.rotation.lock().await;
        let now = SystemTime::now();
        let now_s = to_unix(now);
        let journal = self.store.list_ca_keys().await?;
        let prepared = journal
            .iter()
            .filter(|k| {
                k.kind == CaKeyKind::X509Root
                    && k.state == CaKeyState::Prepared
                    && k.not_after > now_s
            })
            .max_by_key(|k| k.created_at)
            .cloned();
        // An activation that stopped half-way (the new root active, the old one not yet
        // superseded: the two are separate steps in the datastore) is finished by the next.
        let active: Vec<&CaKeyRecord> = journal
            .iter()
            .filter(|k| {
                k.kind == CaKeyKind::X509Root
                    && k.state == CaKeyState::Active
                    && k.not_after > now_s
            })
            .collect();
        let resumed = if prepared.is_none() && active.len() > 1 {
            active
                .iter()
                .max_by_key(|k| k.created_at)
                .map(|k| (*k).clone())
        } else {
            None
        };
        let Some(next) = prepared.or(resumed.clone()) else {
            return Err(AuthorityError::Refused(
                "no root is prepared (meshid-ca ca root prepare)".into(),
            ));
        };
        let sequence = next.created_at.max(0) as u64;
        let (live, acked, lagging) = self.acknowledgements(sequence, now_s).await?;
        if !lagging.is_empty() && !force && resumed.is_none() {
            let names: Vec<String> = lagging
                .iter()
                .take(10)
                .map(|a| {
                    if a.reported_at == 0 {
                        format!("{} (never reported)", a.agent)
                    } else {
                        format!(
                            "{} (delivered {}, reported at {})",
                            a.agent, a.delivered, a.reported_at
                        )
                    }
                })
                .collect();
            let more = lagging.len().saturating_sub(names.len());
            return Err(AuthorityError::Refused(format!(
                "{acked} of {live} live agents have delivered bundle sequence {sequence} (root {}) to their workloads; waiting for: {}{}. Retry when they have (meshid-ca ca root status --watch), or override with --force",
                next.id,
                names.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            )));
        }
        let deliveries = self.store.list_deliveries().await?;
        let acknowledged_within_s = deliveries
            .iter()
            .filter(|d| d.bundle_sequence >= sequence)
            .map(|d| (d.reported_at - next.created_at).max(0))
            .max();
        let mut event = self.step_event("ca.root.activated", actor, &next);
        event.details["reason"] = reason.into();
        event.details["forced"] = force.into();
        event.details["agents_live"] = live.into();
        event.details["agents_acknowledged"] = acked.into();
        event.details["lagging"] = lagging
            .iter()
            .map(|a| a.agent.to_string())
            .collect::<Vec<_>>()
            .into();
        event.details["acknowledged_within_s"] = acknowledged_within_s.into();
        if resumed.is_none() {
            self.store
                .transition_ca_key(
                    &next.id,
                    Some(CaKeyState::Prepared),
                    CaKeyState::Active,
                    now_s,
                    &event,
                )
                .await?;
        } else {
            tracing::warn!(root_id = %next.id, "finishing an activation that stopped before the old root was superseded");
        }
        let mut superseded = Vec::new();
        for old in journal.iter().filter(|k| {
            k.kind == CaKeyKind::X509Root && k.state == CaKeyState::Active && k.id != next.id
        }) {
            let mut event = key_event("ca.root.superseded", actor, old);
            event.details["by"] = next.id.clone().into();
            match self
                .store
                .transition_ca_key(
                    &old.id,
                    Some(CaKeyState::Active),
                    CaKeyState::Superseded,
                    now_s,
                    &event,
                )
                .await
            {
                Ok(()) => superseded.push(old.id.clone()),
                Err(crate::store::StoreError::StateConflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The JWT key prepared with the root signs from now on.
        let keys = self.current();
        if let Some((jwt_id, jwt)) = keys.prepared_jwt.clone() {
            let journal = self.store.list_ca_keys().await?;
            if let Some(active) = journal.iter().find(|k| k.id == keys.jwt_id).cloned() {
                let mut out = super::RotationOutcome::default();
                self.promote("jwt", &active, &jwt_id, &journal, &mut out)
                    .await?;
                let mut next_keys = (*keys).clone();
                next_keys.jwt = jwt;
                next_keys.jwt_id = jwt_id;
                next_keys.prepared_jwt = None;
                self.swap(next_keys);
            }
        }
        if force && !lagging.is_empty() {
            tracing::warn!(root_id = %next.id, lagging = lagging.len(), actor, reason, "root activated by force before every live agent acknowledged it");
        } else {
            tracing::info!(root_id = %next.id, actor, reason, "root activated");
        }
        self.follow_change(now, "root activated").await;
        Ok(Activation {
            root_id: next.id,
            superseded,
            forced: force && !lagging.is_empty(),
            lagging: lagging.iter().map(|a| a.agent.to_string()).collect(),
            acknowledged_within_s,
        })
    }

    /// Retires the superseded roots, once nothing they vouch for is unexpired.
    pub async fn retire_root(
        &self,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<String>, AuthorityError> {
        let _one_at_a_time = self.rotation.lock().await;
        let now = SystemTime::now();
        let now_s = to_unix(now);
        let journal = self.store.list_ca_keys().await?;
        let check = self.retire_check(&journal, now_s).await?;
        if check.roots.is_empty() {
            return Err(AuthorityError::Refused(
                "no root is superseded; nothing to retire".into(),
            ));
        }
        if !check.blockers.is_empty() {
            return Err(AuthorityError::Refused(format!(
                "cannot retire {} yet: {}",
                check.roots.join(", "),
                check.blockers.join("; ")
            )));
        }
        let stamp = bundle_stamp(self, now_s);
        for id in &check.roots {
            let Some(rec) = journal.iter().find(|k| &k.id == id) else {
                continue;
            };
            let mut event = self.step_event("ca.root.retired", actor, rec);
            event.details["reason"] = reason.into();
            event.details["bundle_sequence"] = stamp.into();
            event.details["superseded_for_s"] = (now_s - rec.state_changed_at).into();
            self.store
                .transition_ca_key(
                    id,
                    Some(CaKeyState::Superseded),
                    CaKeyState::Retired,
                    stamp,
                    &event,
                )
                .await?;
            for x in journal.iter().filter(|k| {
                k.kind == CaKeyKind::X509CrossSigned
                    && k.parent_id.as_deref() == Some(id.as_str())
                    && k.state != CaKeyState::Retired
            }) {
                let event = key_event("ca.root.cross_signed.retired", actor, x);
                self.store
                    .transition_ca_key(&x.id, None, CaKeyState::Retired, stamp, &event)
                    .await?;
            }
            tracing::info!(root_id = %id, actor, reason, "root retired");
        }
        self.follow_change(now, "root retired").await;
        Ok(check.roots)
    }

    /// One step of the automatic mode (`ca.root_rotation = "auto"`), by the active root's age:
    /// prepares the next root at half its life, activates it with a sixth left once every live
    /// agent has delivered it, retires the old one once nothing under it is unexpired. Only for
    /// a root this server generated (an operator's root is rotated by the operator). Returns
    /// what it did.
    pub async fn auto_root(&self) -> Result<Option<String>, AuthorityError> {
        if self.settings.root_rotation != RootRotation::Auto {
            return Ok(None);
        }
        let now_s = to_unix(SystemTime::now());
        let journal = self.store.list_ca_keys().await?;
        // An expired prepared or superseded root is no phase in progress (nothing can chain
        // to it): it must not hold the automatic mode back forever.
        let status_needed = journal.iter().any(|k| {
            k.kind == CaKeyKind::X509Root
                && matches!(k.state, CaKeyState::Prepared | CaKeyState::Superseded)
                && k.not_after > now_s
        });
        let current = self.current();
        let Some(root) = journal.iter().find(|k| k.id == current.root_id).cloned() else {
            return Ok(None);
        };
        let own =
            root.key_path.is_empty() && root.server_id == self.server_id && self.upstream.is_none();
        let life = (root.not_after - root.not_before).max(1);
        let left = root.not_after - now_s;
        const AUTO: &str = "automatic rotation by the root's age";
        if !status_needed {
            if own && root.state == CaKeyState::Active && left * 2 <= life {
                let next = self
                    .prepare_root(None, &format!("ca:{}", self.server_id), AUTO)
                    .await?;
                return Ok(Some(format!("prepared root {}", next.id)));
            }
            return Ok(None);
        }
        let status = self.root_status().await?;
        let actor = format!("ca:{}", self.server_id);
        if status.phase == RootPhase::Prepared && left * 6 <= life {
            if status.lagging.is_empty() {
                let a = self.activate_root(&actor, AUTO, false).await?;
                return Ok(Some(format!("activated root {}", a.root_id)));
            }
            tracing::warn!(lagging = status.lagging.len(), first = %status.lagging[0].agent, "the next root waits for agents to deliver it before activation; see meshid-ca ca root status");
        }
        if status.phase == RootPhase::Activated && status.retire.blockers.is_empty() {
            let retired = self.retire_root(&actor, AUTO).await?;
            return Ok(Some(format!("retired root {}", retired.join(", "))));
        }
        Ok(None)
    }
}

/// How many agents are live (unbanned, SVID unexpired at `now_s`), how many of them reported
/// `sequence` (or later) delivered, and the others, slowest first: the activation gate, and how
/// the CA measures a bundle change's effect.
pub(crate) fn acknowledgements(
    agents: &[crate::store::AgentRecord],
    deliveries: &[crate::store::DeliveryRecord],
    sequence: u64,
    now_s: i64,
) -> (usize, usize, Vec<AgentAck>) {
    let mut best: HashMap<&SpiffeId, &crate::store::DeliveryRecord> = HashMap::new();
    for d in deliveries {
        let slot = best.entry(&d.agent).or_insert(d);
        if (d.bundle_sequence, d.reported_at) > (slot.bundle_sequence, slot.reported_at) {
            *slot = d;
        }
    }
    let mut live = 0;
    let mut acked = 0;
    let mut lagging = Vec::new();
    for a in agents.iter().filter(|a| !a.banned && a.expires_at > now_s) {
        live += 1;
        let d = best.get(&a.spiffe_id);
        let delivered = d.map_or(0, |d| d.bundle_sequence);
        if delivered >= sequence {
            acked += 1;
        } else {
            lagging.push(AgentAck {
                agent: a.spiffe_id.clone(),
                delivered,
                reported_at: d.map_or(0, |d| d.reported_at),
                server_id: d.map(|d| d.server_id.clone()).unwrap_or_default(),
                x509_streams: d.map_or(0, |d| d.x509_streams),
            });
        }
    }
    lagging.sort_by(|a, b| {
        (a.delivered, a.reported_at, a.agent.to_string()).cmp(&(
            b.delivered,
            b.reported_at,
            b.agent.to_string(),
        ))
    });
    (live, acked, lagging)
}
