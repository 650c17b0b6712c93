//! Declarative apply (`meshid-ca apply -f mesh.yaml`): the CA converges to what one owner's
//! mesh file declares (registration entries, named policy documents and federation
//! relationships).
//!
//! Every object a mesh apply creates carries the file's owner label, and only objects with
//! that label are ever updated or deleted by it: an entry by its identity (SPIFFE ID, parent ID
//! and selectors; the other fields are updated in place), a policy document by its name. An
//! object made by hand (no owner) or by another owner that a declaration matches is a conflict,
//! (a federation relationship is matched by its trust domain; a new one starts from the file's
//! bundle, an existing one keeps the bundle it holds)
//! and the apply is refused, naming each one; with `adopt`, objects made by hand become the
//! file's instead (another owner's never do: one object has one source of truth). Owned
//! objects the file no longer declares are listed as orphans, and deleted with `prune`.
//!
//! Everything is validated before anything is written (each entry as `entry create` does, each
//! document alone and the resulting set merged, errors at the declaration's file:line:column),
//! and the plan is computed and carried out in one datastore transaction
//! ([`crate::store::Datastore::apply_mesh`]), so that what is applied is exactly what was
//! planned against the state it found, with one audit record (`mesh.apply`: who, the owner and
//! every change, never a secret). Applying the same file again finds nothing to change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::policy::{check_policy_name, merge_located, policy_diff, Located};
use super::{check_reason, detached, invalid, Awaited, Ca, CaEvent, ServiceError};
use crate::audit::AuditEvent;
use crate::entry::{EntryId, EntrySpec, RegistrationEntry};
pub use crate::mesh::{DeclaredFederation, FederationBundle, LoadedPolicy};
use crate::store::{
    FederatedBundle, FederationRecord, MeshState, MeshWrite, PolicyRevision, StoreError,
};

/// Most entries one owner may declare.
pub const MAX_MESH_ENTRIES: usize = 10_000;

/// At most this many conflicts are listed in one refusal.
const MAX_CONFLICTS_SHOWN: usize = 20;

/// What a mesh file declares, as sent to the CA.
#[derive(Debug, Clone, Default)]
pub struct MeshRequest {
    /// The owner label (as a policy document name).
    pub owner: String,
    /// The entries.
    pub entries: Vec<EntryDeclaration>,
    /// The policy documents.
    pub policies: Vec<LoadedPolicy>,
    /// The federation relationships (bundles as text).
    pub federations: Vec<DeclaredFederation>,
    /// Delete what the owner holds that is no longer declared.
    pub prune: bool,
    /// Take over objects made by hand that a declaration matches.
    pub adopt: bool,
    /// Compute the plan only.
    pub dry_run: bool,
    /// Why (kept with the policy revision and in the audit record).
    pub reason: String,
}

/// An entry and where it is declared.
#[derive(Debug, Clone, Default)]
pub struct EntryDeclaration {
    /// `file:line:column`, prefixed to its errors.
    pub at: String,
    /// The entry (its id is ignored).
    pub spec: EntrySpec,
}

/// What kind of object a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A registration entry.
    Entry,
    /// A named policy document.
    Policy,
    /// A federation relationship.
    Federation,
}

impl ObjectKind {
    /// `entry`, `policy` or `federation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entry => "entry",
            Self::Policy => "policy",
            Self::Federation => "federation",
        }
    }
}

/// What a change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A new object.
    Create,
    /// An owned object's fields change.
    Update,
    /// An object made by hand becomes the owner's (its fields may change too).
    Adopt,
    /// An owned object is no longer declared.
    Delete,
}

impl Action {
    /// `create`, `update`, `adopt` or `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Adopt => "adopt",
            Self::Delete => "delete",
        }
    }
}

/// One change of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshChange {
    /// Entry or policy document.
    pub kind: ObjectKind,
    /// What happens to it.
    pub action: Action,
    /// The entry's id (empty for an entry a dry run would create), the document's name, or the
    /// federated trust domain.
    pub id: String,
    /// An entry's SPIFFE ID.
    pub spiffe_id: String,
    /// An entry's parent ID.
    pub parent_id: String,
    /// An entry's selectors.
    pub selectors: Vec<String>,
    /// What an update or adoption changes, one field each (`x509_svid_ttl: 300 -> 600`).
    pub fields: Vec<String>,
    /// A document's unified diff.
    pub diff: String,
    /// Where the file declares it (empty for a deletion).
    pub at: String,
}

/// The plan, and whether it was carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPlan {
    /// Entries (in declaration order, deletions last), then documents (by name).
    pub changes: Vec<MeshChange>,
    /// What the owner holds that is no longer declared, kept because `prune` was not set.
    pub orphans: Vec<MeshChange>,
    /// Declarations that already matched.
    pub unchanged: usize,
    /// Whether the changes were made.
    pub applied: bool,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The policy revision in force afterwards (for a dry run, now); 0: none.
    pub policy_revision: u64,
}

/// An entry's identity in a mesh: SPIFFE ID, parent ID, sorted selectors.
type Identity = (String, String, Vec<String>);

fn identity(e: &RegistrationEntry) -> Identity {
    // Selectors are sorted and deduplicated by validation.
    (
        e.spiffe_id.to_string(),
        e.parent_id.to_string(),
        e.selectors.iter().map(ToString::to_string).collect(),
    )
}

/// The validated declarations: what the plan is computed from.
struct Desired {
    owner: String,
    entries: Vec<(String, RegistrationEntry)>,
    documents: BTreeMap<String, LoadedPolicy>,
    /// By trust domain: the declaration, its trust domain, and the bundle a new relationship
    /// starts from.
    federations: BTreeMap<
        String,
        (
            DeclaredFederation,
            spiffe::TrustDomain,
            Option<FederatedBundle>,
        ),
    >,
    prune: bool,
    adopt: bool,
}

impl Ca {
    /// `meshid-ca apply`: plans what makes the CA's entries and policy documents of
    /// `request.owner` match the request and, unless it is a dry run, carries it out in one
    /// transaction. Refused, changing nothing, when anything declared is invalid or a
    /// declaration matches an object the owner does not hold (see the module documentation).
    pub async fn apply_mesh(
        &self,
        request: MeshRequest,
        caller: &str,
    ) -> Result<MeshPlan, ServiceError> {
        let desired = self.validate_mesh(&request)?;
        let MeshRequest {
            dry_run, reason, ..
        } = request;
        let (ca, caller) = (self.clone(), caller.to_owned());
        detached(async move {
            let _order = ca.locks.entries.lock().await;
            let now = crate::unix_now();
            let mut outcome: Option<Result<Planned, ServiceError>> = None;
            let written = ca
                .store
                .apply_mesh(Box::new(|state: MeshState| {
                    let planned = plan(&state, &desired, now);
                    let write = match &planned {
                        Ok(p) if !dry_run && !p.plan.changes.is_empty() => {
                            Some(p.write(&desired, &caller, &reason, ca.authority.server_id(), now))
                        }
                        _ => None,
                    };
                    outcome = Some(planned);
                    write
                }))
                .await?;
            // The store hands the planner the state before it writes anything (and returns its
            // own error when it could not read it).
            let planned = outcome.ok_or_else(|| {
                ServiceError::from(StoreError::Corrupt(
                    "the datastore committed a mesh apply without planning it".to_owned(),
                ))
            })??;
            let mut plan = planned.plan.clone();
            plan.dry_run = dry_run;
            plan.applied = written;
            if !written {
                // Ids are made when entries are: a dry run's would differ every time.
                for c in &mut plan.changes {
                    if c.kind == ObjectKind::Entry && c.action == Action::Create {
                        c.id.clear();
                    }
                }
                return Ok(plan);
            }
            for event in planned.events() {
                ca.publish(event);
            }
            let federations = planned.federations_created.len()
                + planned.federations_updated.len()
                + planned.federations_deleted.len();
            if federations > 0 {
                // The refresher puts the new set in force (and tells the agents) at once.
                ca.federation.wake.notify_one();
            }
            if planned.policy.is_some() {
                let revision = planned.head + 1;
                plan.policy_revision = revision;
                ca.watch_effect(
                    "mesh.apply",
                    &caller,
                    serde_json::json!({ "revision": revision, "owner": desired.owner }),
                    vec![Awaited::Policy(revision)],
                );
                if let Err(e) = ca.refresh_policy().await {
                    // Committed: the agents get it at their next sync or this server's next
                    // change.
                    tracing::warn!(error = %e, "cannot reload the policy just applied");
                }
            }
            tracing::info!(
                owner = %desired.owner,
                changes = plan.changes.len(),
                policy_revision = plan.policy_revision,
                caller = %caller,
                "mesh applied"
            );
            Ok(plan)
        })
        .await
    }

    /// Validates every declaration, before anything is read or written.
    fn validate_mesh(&self, request: &MeshRequest) -> Result<Desired, ServiceError> {
        check_policy_name(&request.owner).map_err(|e| match e {
            ServiceError::InvalidArgument { reason, .. } => invalid("owner", reason),
            other => other,
        })?;
        check_reason(&request.reason)?;
        if request.entries.len() > MAX_MESH_ENTRIES {
            return Err(invalid(
                "entries",
                format!("at most {MAX_MESH_ENTRIES} entries may be declared by one owner"),
            ));
        }
        let td = self.authority.trust_domain();
        let now = crate::unix_now();
        let mut entries = Vec::with_capacity(request.entries.len());
        let mut seen: HashMap<Identity, &str> = HashMap::new();
        for d in &request.entries {
            let at = |e: crate::entry::EntryError| invalid("entry", format!("{}: {e}", d.at));
            let spec = EntrySpec {
                id: None,
                ..d.spec.clone()
            };
            spec.check_writable(td).map_err(at)?;
            let mut entry = spec.validate(td, now).map_err(at)?;
            // The CLI refuses secrets when it reads the file; any other client is held to the
            // same rule here, before a hint reaches the audit log.
            if let Some(what) = crate::mesh::looks_secret(&entry.hint) {
                return Err(invalid(
                    "entry",
                    format!(
                        "{}: the hint looks like {what}: a mesh never holds secrets",
                        d.at
                    ),
                ));
            }
            entry.owner.clone_from(&request.owner);
            if let Some(first) = seen.insert(identity(&entry), &d.at) {
                return Err(invalid(
                    "entry",
                    format!(
                        "{}: entry {} (parent {}) with these selectors is also declared at \
                         {first}: declare it once",
                        d.at, entry.spiffe_id, entry.parent_id
                    ),
                ));
            }
            entries.push((d.at.clone(), entry));
        }
        let mut documents = BTreeMap::new();
        for d in &request.policies {
            check_policy_name(&d.name).map_err(|e| invalid("policy", format!("{}: {e}", d.at)))?;
            if let Some((line, what)) = crate::mesh::secret_line(&d.text) {
                return Err(invalid(
                    "policy",
                    format!(
                        "{}:{}: this looks like {what}: a mesh never holds secrets",
                        d.origin,
                        line + d.line_offset
                    ),
                ));
            }
            // The document alone first, so that its own errors are told in its file.
            let single = BTreeMap::from([(d.name.clone(), d.text.clone())]);
            merge_located(&single, |_| Some(located(d)))?;
            if let Some(first) = documents.insert(d.name.clone(), d.clone()) {
                return Err(invalid(
                    "policy",
                    format!(
                        "{}: policy document `{}` is also declared at {}: declare it once",
                        d.at, d.name, first.at
                    ),
                ));
            }
        }
        let mut federations = BTreeMap::new();
        for f in &request.federations {
            let at = |e: crate::federation::FederationError| {
                invalid("federation", format!("{}: {e}", f.at))
            };
            let r = crate::federation::validate(
                td,
                &f.trust_domain,
                &f.endpoint_url,
                &f.profile,
                &f.endpoint_spiffe_id,
            )
            .map_err(at)?;
            let bundle = match &f.bundle {
                FederationBundle::Text(text) => {
                    let b = crate::federation::parse_bundle(&r.trust_domain, text).map_err(at)?;
                    Some(FederatedBundle {
                        trust_domain: r.trust_domain.clone(),
                        document: text.clone(),
                        sequence: i64::try_from(b.sequence).unwrap_or(i64::MAX),
                        updated_at: now,
                    })
                }
                _ => None,
            };
            if let Some((first, ..)) =
                federations.insert(f.trust_domain.clone(), (f.clone(), r.trust_domain, bundle))
            {
                return Err(invalid(
                    "federation",
                    format!(
                        "{}: the federation with {} is also declared at {}: declare it once",
                        f.at, f.trust_domain, first.at
                    ),
                ));
            }
        }
        Ok(Desired {
            owner: request.owner.clone(),
            entries,
            documents,
            federations,
            prune: request.prune,
            adopt: request.adopt,
        })
    }
}

fn located(d: &LoadedPolicy) -> Located<'_> {
    Located {
        origin: &d.origin,
        line_offset: d.line_offset,
        column_offset: d.column_offset,
    }
}

/// A plan with what carrying it out writes and announces.
struct Planned {
    plan: MeshPlan,
    /// The policy revision the plan was made against (0: none).
    head: u64,
    create: Vec<RegistrationEntry>,
    update: Vec<RegistrationEntry>,
    /// Adopted entries whose owner alone changes (agents are not told: nothing they hold
    /// changes).
    adopt: Vec<RegistrationEntry>,
    delete: Vec<RegistrationEntry>,
    /// The documents and owners afterwards, when they change.
    policy: Option<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    /// The whole diff of the documents.
    diff: String,
    federations_created: Vec<(FederationRecord, Option<FederatedBundle>)>,
    federations_updated: Vec<FederationRecord>,
    federations_deleted: Vec<FederationRecord>,
}

/// Computes the plan from the state read in the transaction (pure).
fn plan(state: &MeshState, desired: &Desired, now: i64) -> Result<Planned, ServiceError> {
    let owner = desired.owner.as_str();
    let mut changes = Vec::new();
    let mut orphans = Vec::new();
    let mut conflicts = Vec::new();
    let mut unchanged = 0;
    let (mut create, mut update, mut delete, mut adopt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());

    // Entries.
    let mut by_identity: HashMap<Identity, Vec<&RegistrationEntry>> = HashMap::new();
    for e in &state.entries {
        by_identity.entry(identity(e)).or_default().push(e);
    }
    let mut matched: HashSet<&EntryId> = HashSet::new();
    for (at, want) in &desired.entries {
        let found = by_identity
            .get(&identity(want))
            .map_or(&[][..], Vec::as_slice);
        let mine = found.iter().find(|e| e.owner == owner);
        let hand_made = found.iter().find(|e| e.owner.is_empty());
        let (current, action) = match (mine, hand_made, found.first()) {
            (Some(cur), _, _) => (Some(*cur), Action::Update),
            (None, Some(cur), _) if desired.adopt => (Some(*cur), Action::Adopt),
            (None, _, Some(other)) => {
                conflicts.push(entry_conflict(at, other));
                continue;
            }
            (None, _, None) => (None, Action::Create),
        };
        let Some(current) = current else {
            changes.push(entry_change(want, Action::Create, Vec::new(), at));
            create.push(want.clone());
            continue;
        };
        matched.insert(&current.id);
        let mut fields = entry_fields(current, want);
        if action == Action::Adopt {
            fields.insert(0, format!("owner: (made by hand) -> {owner}"));
        }
        if fields.is_empty() {
            unchanged += 1;
            continue;
        }
        if action == Action::Adopt && fields.len() == 1 {
            // Only the owner changes: not the revision, so the agents re-issue nothing.
            let next = RegistrationEntry {
                owner: owner.to_owned(),
                ..(*current).clone()
            };
            changes.push(entry_change(&next, action, fields, at));
            adopt.push(next);
            continue;
        }
        let next = RegistrationEntry {
            id: current.id.clone(),
            created_at: current.created_at,
            updated_at: now,
            revision: current.revision + 1,
            ..want.clone()
        };
        changes.push(entry_change(&next, action, fields, at));
        update.push(next);
    }
    for e in &state.entries {
        if e.owner == owner && !matched.contains(&e.id) {
            let change = entry_change(e, Action::Delete, Vec::new(), "");
            if desired.prune {
                changes.push(change);
                delete.push(e.clone());
            } else {
                orphans.push(change);
            }
        }
    }

    // Policy documents.
    let (head, old_docs, old_owners) = state
        .policy
        .as_ref()
        .map_or((0, BTreeMap::new(), BTreeMap::new()), |h| {
            (h.revision, h.documents.clone(), h.owners.clone())
        });
    let (mut docs, mut owners) = (old_docs.clone(), old_owners.clone());
    let mut doc_changes = Vec::new();
    for (name, d) in &desired.documents {
        let action = match (old_docs.get(name), old_owners.get(name)) {
            (None, _) => Action::Create,
            (Some(_), Some(o)) if o == owner => Action::Update,
            (Some(_), None) if desired.adopt => Action::Adopt,
            (Some(_), other) => {
                conflicts.push(document_conflict(d, other.map(String::as_str)));
                continue;
            }
        };
        docs.insert(name.clone(), d.text.clone());
        owners.insert(name.clone(), owner.to_owned());
        let diff = policy_diff(
            &old_docs
                .get(name)
                .map(|t| BTreeMap::from([(name.clone(), t.clone())]))
                .unwrap_or_default(),
            &BTreeMap::from([(name.clone(), d.text.clone())]),
        );
        if action == Action::Update && diff.is_empty() {
            unchanged += 1;
            continue;
        }
        let mut change = document_change(name, action, diff, &d.at);
        if action == Action::Adopt {
            change.fields = vec![format!("owner: (applied by hand) -> {owner}")];
        }
        doc_changes.push(change);
    }
    for (name, o) in &old_owners {
        if o == owner && !desired.documents.contains_key(name) {
            let diff = policy_diff(
                &BTreeMap::from([(
                    name.clone(),
                    old_docs.get(name).cloned().unwrap_or_default(),
                )]),
                &BTreeMap::new(),
            );
            let change = document_change(name, Action::Delete, diff, "");
            if desired.prune {
                docs.remove(name);
                owners.remove(name);
                doc_changes.push(change);
            } else {
                orphans.push(change);
            }
        }
    }
    if !conflicts.is_empty() {
        let more = conflicts.len().saturating_sub(MAX_CONFLICTS_SHOWN);
        let total = conflicts.len();
        conflicts.truncate(MAX_CONFLICTS_SHOWN);
        if more > 0 {
            conflicts.push(format!("and {more} more"));
        }
        return Err(invalid(
            "mesh",
            format!(
                "{} declared object(s) already exist without owner `{owner}`; nothing was \
                 changed:\n  {}",
                total,
                conflicts.join("\n  ")
            ),
        ));
    }
    let policy = if docs != old_docs || owners != old_owners {
        if docs != old_docs {
            // The set in force afterwards must combine (this owner's documents with the
            // others'), told at the declaration of the document at fault.
            merge_located(&docs, |name| desired.documents.get(name).map(located))?;
        }
        Some((docs, owners))
    } else {
        None
    };
    let diff = match &policy {
        Some((docs, _)) => policy_diff(&old_docs, docs),
        None => String::new(),
    };
    changes.extend(doc_changes);
    let federations = plan_federations(
        state,
        desired,
        now,
        &mut changes,
        &mut orphans,
        &mut unchanged,
    )?;
    Ok(Planned {
        plan: MeshPlan {
            changes,
            orphans,
            unchanged,
            applied: false,
            dry_run: false,
            policy_revision: head,
        },
        head,
        create,
        update,
        delete,
        adopt,
        policy,
        diff,
        federations_created: federations.0,
        federations_updated: federations.1,
        federations_deleted: federations.2,
    })
}

type FederationPlan = (
    Vec<(FederationRecord, Option<FederatedBundle>)>,
    Vec<FederationRecord>,
    Vec<FederationRecord>,
);

/// The federation relationships' part of the plan.
fn plan_federations(
    state: &MeshState,
    desired: &Desired,
    now: i64,
    changes: &mut Vec<MeshChange>,
    orphans: &mut Vec<MeshChange>,
    unchanged: &mut usize,
) -> Result<FederationPlan, ServiceError> {
    let owner = desired.owner.as_str();
    let (mut created, mut updated, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
    let mut conflicts = Vec::new();
    for (td, (declared, trust_domain, bundle)) in &desired.federations {
        let current = state
            .federations
            .iter()
            .find(|r| r.trust_domain.as_str() == td);
        let want = |base: Option<&FederationRecord>| FederationRecord {
            trust_domain: trust_domain.clone(),
            endpoint_url: declared.endpoint_url.clone(),
            profile: declared.profile.clone(),
            endpoint_spiffe_id: declared.endpoint_spiffe_id.clone(),
            owner: owner.to_owned(),
            created_at: base.map_or(now, |b| b.created_at),
            updated_at: now,
        };
        match current {
            None => {
                if declared.profile == "https_spiffe" && bundle.is_none() {
                    return Err(invalid(
                        "federation",
                        format!(
                            "{}: a new https_spiffe relationship needs `bundle_file`: {td}'s \
                             bundle, checked out of band, authenticates its endpoint",
                            declared.at
                        ),
                    ));
                }
                let record = want(None);
                changes.push(federation_change(
                    &record,
                    Action::Create,
                    Vec::new(),
                    &declared.at,
                ));
                created.push((record, bundle.clone()));
            }
            Some(cur) if cur.owner == owner || (cur.owner.is_empty() && desired.adopt) => {
                let mut fields = Vec::new();
                for (name, old, new) in [
                    ("endpoint_url", &cur.endpoint_url, &declared.endpoint_url),
                    ("profile", &cur.profile, &declared.profile),
                    (
                        "endpoint_spiffe_id",
                        &cur.endpoint_spiffe_id,
                        &declared.endpoint_spiffe_id,
                    ),
                ] {
                    if old != new {
                        fields.push(format!("{name}: {old:?} -> {new:?}"));
                    }
                }
                let action = if cur.owner == owner {
                    Action::Update
                } else {
                    fields.insert(0, format!("owner: (made by hand) -> {owner}"));
                    Action::Adopt
                };
                if fields.is_empty() {
                    *unchanged += 1;
                    continue;
                }
                let record = want(Some(cur));
                changes.push(federation_change(&record, action, fields, &declared.at));
                updated.push(record);
            }
            Some(cur) => conflicts.push(format!(
                "{}: the federation with {td} exists, {}",
                declared.at,
                if cur.owner.is_empty() {
                    "made by hand: delete it, or apply with --adopt to make it this file's"
                        .to_owned()
                } else {
                    format!("owned by `{}`: declare it in one mesh file", cur.owner)
                }
            )),
        }
    }
    if !conflicts.is_empty() {
        return Err(invalid(
            "mesh",
            format!(
                "{} declared object(s) already exist without owner `{owner}`; nothing was \
                 changed:\n  {}",
                conflicts.len(),
                conflicts.join("\n  ")
            ),
        ));
    }
    for r in &state.federations {
        if r.owner == owner && !desired.federations.contains_key(r.trust_domain.as_str()) {
            let change = federation_change(r, Action::Delete, Vec::new(), "");
            if desired.prune {
                changes.push(change);
                deleted.push(r.clone());
            } else {
                orphans.push(change);
            }
        }
    }
    Ok((created, updated, deleted))
}

fn federation_change(
    r: &FederationRecord,
    action: Action,
    fields: Vec<String>,
    at: &str,
) -> MeshChange {
    MeshChange {
        kind: ObjectKind::Federation,
        action,
        id: r.trust_domain.to_string(),
        spiffe_id: r.endpoint_spiffe_id.clone(),
        parent_id: String::new(),
        selectors: Vec::new(),
        fields,
        diff: String::new(),
        at: at.to_owned(),
    }
}

impl Planned {
    /// What carrying out the plan writes, with its audit record; notes what to announce.
    fn write(
        &self,
        desired: &Desired,
        caller: &str,
        reason: &str,
        server: &str,
        now: i64,
    ) -> MeshWrite {
        let policy = self.policy.as_ref().map(|(docs, owners)| PolicyRevision {
            revision: self.head + 1,
            created_at: now,
            author: caller.to_owned(),
            reason: reason.to_owned(),
            action: "mesh".to_owned(),
            subject: desired.owner.clone(),
            documents: docs.clone(),
            owners: owners.clone(),
        });
        // One record per entry changed, as a change by hand makes (so `audit list --kind
        // entry.` shows them, and the other CA servers replay them to their agents), then the
        // apply's own record: what was asked, and the policy diff.
        let kinds = [
            (&self.create, "entry.created"),
            (&self.update, "entry.updated"),
            (&self.adopt, "entry.adopted"),
            (&self.delete, "entry.deleted"),
        ];
        let mut audit: Vec<AuditEvent> = kinds
            .iter()
            .flat_map(|(entries, kind)| {
                entries.iter().map(move |e| {
                    let mut event = super::entry_event(kind, caller, e, server, None);
                    event.details["owner"] = desired.owner.clone().into();
                    event.details["via"] = "mesh.apply".into();
                    event
                })
            })
            .collect();
        let federation = |kind: &str, r: &FederationRecord| {
            AuditEvent::new(
                kind,
                caller,
                serde_json::json!({
                    "trust_domain": r.trust_domain.to_string(),
                    "endpoint_url": r.endpoint_url,
                    "profile": r.profile,
                    "endpoint_spiffe_id": r.endpoint_spiffe_id,
                    "owner": desired.owner,
                    "via": "mesh.apply",
                    "ca_server": server,
                }),
            )
        };
        audit.extend(
            self.federations_created
                .iter()
                .map(|(r, _)| federation("federation.created", r)),
        );
        audit.extend(
            self.federations_updated
                .iter()
                .map(|r| federation("federation.updated", r)),
        );
        audit.extend(
            self.federations_deleted
                .iter()
                .map(|r| federation("federation.deleted", r)),
        );
        let count = |action: Action| {
            let entries = self
                .plan
                .changes
                .iter()
                .filter(|c| c.kind == ObjectKind::Entry);
            entries.filter(|c| c.action == action).count()
        };
        let documents: Vec<serde_json::Value> = self
            .plan
            .changes
            .iter()
            .filter(|c| c.kind == ObjectKind::Policy)
            .map(|c| serde_json::json!({ "action": c.action.as_str(), "name": c.id }))
            .collect();
        audit.push(AuditEvent::new(
            "mesh.apply",
            caller,
            serde_json::json!({
                "owner": desired.owner,
                "reason": reason,
                "prune": desired.prune,
                "adopt": desired.adopt,
                "created": count(Action::Create),
                "updated": count(Action::Update),
                "adopted": count(Action::Adopt),
                "deleted": count(Action::Delete),
                "documents": documents,
                "policy_revision": policy.as_ref().map(|p| p.revision),
                "diff": self.diff,
                "ca_server": server,
            }),
        ));
        MeshWrite {
            create: self.create.clone(),
            update: self.update.clone(),
            delete: self
                .delete
                .iter()
                .map(|e| (e.id.clone(), e.revision))
                .collect(),
            adopt: self
                .adopt
                .iter()
                .map(|e| (e.id.clone(), e.revision, e.owner.clone()))
                .collect(),
            policy,
            federations_created: self.federations_created.clone(),
            federations_updated: self.federations_updated.clone(),
            federations_deleted: self
                .federations_deleted
                .iter()
                .map(|r| r.trust_domain.clone())
                .collect(),
            audit,
        }
    }
}

impl Planned {
    /// The events that announce the committed plan to the agents, in its order.
    fn events(&self) -> Vec<CaEvent> {
        let created = self.create.iter().map(|e| CaEvent::EntryUpserted {
            entry: Arc::new(e.clone()),
            old_parent: None,
        });
        // The identity, parent included, is what matched: an update keeps the parent.
        let updated = self.update.iter().map(|e| CaEvent::EntryUpserted {
            entry: Arc::new(e.clone()),
            old_parent: Some(e.parent_id.clone()),
        });
        let deleted = self.delete.iter().map(|e| CaEvent::EntryDeleted {
            id: e.id.clone(),
            parent: e.parent_id.clone(),
        });
        created.chain(updated).chain(deleted).collect()
    }
}

fn entry_change(
    e: &RegistrationEntry,
    action: Action,
    fields: Vec<String>,
    at: &str,
) -> MeshChange {
    MeshChange {
        kind: ObjectKind::Entry,
        action,
        id: e.id.to_string(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        fields,
        diff: String::new(),
        at: at.to_owned(),
    }
}

fn document_change(name: &str, action: Action, diff: String, at: &str) -> MeshChange {
    MeshChange {
        kind: ObjectKind::Policy,
        action,
        id: name.to_owned(),
        spiffe_id: String::new(),
        parent_id: String::new(),
        selectors: Vec::new(),
        fields: Vec::new(),
        diff,
        at: at.to_owned(),
    }
}

fn entry_conflict(at: &str, other: &RegistrationEntry) -> String {
    let whose = if other.owner.is_empty() {
        "made by hand: delete it, or apply with --adopt to make it this file's".to_owned()
    } else {
        format!(
            "owned by `{}`: an object has one source of truth; declare it in one mesh file",
            other.owner
        )
    };
    format!(
        "{at}: entry {} (parent {}) exists as entry {}, {whose}",
        other.spiffe_id, other.parent_id, other.id
    )
}

fn document_conflict(d: &LoadedPolicy, owner: Option<&str>) -> String {
    let whose = match owner {
        None => "applied by hand: delete it (`meshid-ca policy delete`), or apply with --adopt \
                 to make it this file's"
            .to_owned(),
        Some(o) => format!(
            "owned by `{o}`: an object has one source of truth; declare it in one mesh file"
        ),
    };
    format!("{}: policy document `{}` exists, {whose}", d.at, d.name)
}

/// The updatable fields that differ, as `field: old -> new`.
fn entry_fields(old: &RegistrationEntry, new: &RegistrationEntry) -> Vec<String> {
    let ttl = |t: Option<std::time::Duration>| {
        t.map_or("default".to_owned(), |d| d.as_secs().to_string())
    };
    let list = |items: Vec<String>| format!("[{}]", items.join(", "));
    let mut out = Vec::new();
    if old.x509_svid_ttl != new.x509_svid_ttl {
        out.push(format!(
            "x509_svid_ttl: {} -> {}",
            ttl(old.x509_svid_ttl),
            ttl(new.x509_svid_ttl)
        ));
    }
    if old.jwt_svid_ttl != new.jwt_svid_ttl {
        out.push(format!(
            "jwt_svid_ttl: {} -> {}",
            ttl(old.jwt_svid_ttl),
            ttl(new.jwt_svid_ttl)
        ));
    }
    if old.dns_names != new.dns_names {
        out.push(format!(
            "dns_names: {} -> {}",
            list(old.dns_names.clone()),
            list(new.dns_names.clone())
        ));
    }
    if old.federates_with != new.federates_with {
        let tds =
            |e: &RegistrationEntry| e.federates_with.iter().map(ToString::to_string).collect();
        out.push(format!(
            "federates_with: {} -> {}",
            list(tds(old)),
            list(tds(new))
        ));
    }
    if old.admin != new.admin {
        out.push(format!("admin: {} -> {}", old.admin, new.admin));
    }
    if old.hint != new.hint {
        out.push(format!("hint: {:?} -> {:?}", old.hint, new.hint));
    }
    out
}
