//! Declarative apply (`meshid-ca apply`) over a real datastore (SQLite and PostgreSQL): plan,
//! apply, and plan again finds nothing; updates in place; prune deletes exactly what the owner
//! holds and no longer declares, never what was made by hand or by another owner; a
//! declaration that matches someone else's object is refused (adopt takes over only what was
//! made by hand); one invalid entry or policy changes nothing; one audit record per apply; the
//! agents are told; two servers applying at once are serialized, and the other server's agents
//! hear of it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use meshid_ca::audit::AuditEvent;
use meshid_ca::entry::{EntrySpec, RegistrationEntry};
use meshid_ca::service::mesh::{
    Action, DeclaredFederation, EntryDeclaration, FederationBundle, LoadedPolicy, MeshPlan,
    MeshRequest, ObjectKind,
};
use meshid_ca::service::{Ca, CaEvent, ServiceError};
use meshid_ca::store::{MeshWrite, StoreError};

use crate::authority::{ca_on, db, td};
use crate::federation::partner_bundle;

const ALICE: &str = "admin:uid=1000,pid=1";
const AGENT: &str = "spiffe://example.org/meshid/agent/join_token/node-1";

fn entry(name: &str, uid: u32, ttl: u64, line: usize) -> EntryDeclaration {
    EntryDeclaration {
        at: format!("mesh.yaml:{line}:5"),
        spec: EntrySpec {
            spiffe_id: format!("spiffe://example.org/{name}"),
            parent_id: AGENT.into(),
            selectors: vec![format!("unix:uid:{uid}"), "unix:user:app".into()],
            x509_svid_ttl: ttl,
            ..Default::default()
        },
    }
}

fn document(name: &str, rule: &str, port: u16) -> LoadedPolicy {
    LoadedPolicy {
        name: name.into(),
        text: format!(
            "default: deny\nrules:\n  - name: {rule}\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://example.org/api\"]\n    ports: [{port}]\n"
        ),
        origin: format!("policies/{name}.yaml"),
        line_offset: 0,
        column_offset: 0,
        at: "mesh.yaml:20:5".into(),
    }
}

fn request(
    owner: &str,
    entries: Vec<EntryDeclaration>,
    policies: Vec<LoadedPolicy>,
) -> MeshRequest {
    MeshRequest {
        owner: owner.into(),
        entries,
        policies,
        ..Default::default()
    }
}

fn dry(mut r: MeshRequest) -> MeshRequest {
    r.dry_run = true;
    r
}

fn pruning(mut r: MeshRequest) -> MeshRequest {
    r.prune = true;
    r
}

/// (kind, action, spiffe ID or document name) of each change.
fn summary(plan: &MeshPlan) -> Vec<(&'static str, &'static str, String)> {
    plan.changes
        .iter()
        .map(|c| {
            let name = match c.kind {
                ObjectKind::Entry => c.spiffe_id.clone(),
                ObjectKind::Policy | ObjectKind::Federation => c.id.clone(),
            };
            (c.kind.as_str(), c.action.as_str(), name)
        })
        .collect()
}

fn invalid_message(e: ServiceError) -> String {
    match e {
        ServiceError::InvalidArgument { reason, .. } => reason,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Everything an apply may change: the entries, the policy revision, the audit log's length.
async fn snapshot(ca: &Ca) -> (Vec<RegistrationEntry>, Option<u64>, usize) {
    (
        ca.store.list_entries().await.unwrap(),
        ca.policy_revision(None).await.unwrap().map(|r| r.revision),
        ca.store.audit_records(0, 100_000).await.unwrap().len(),
    )
}

async fn mesh_records(ca: &Ca) -> Vec<(String, serde_json::Value)> {
    ca.store
        .audit_records(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "mesh.apply")
        .map(|r| (r.actor, serde_json::from_str(&r.details).unwrap()))
        .collect()
}

fn owned<'a>(entries: &'a [RegistrationEntry], owner: &str) -> Vec<&'a str> {
    let mut ids: Vec<&str> = entries
        .iter()
        .filter(|e| e.owner == owner)
        .map(|e| e.spiffe_id.path())
        .collect();
    ids.sort_unstable();
    ids
}

async fn case(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;

    // Made by hand, and another owner's: never touched by `payments`.
    let hand = ca
        .create_entry(&entry("hand", 7, 0, 0).spec, ALICE)
        .await
        .unwrap();
    let batch = request(
        "batch",
        vec![entry("batch", 8, 0, 3)],
        vec![document("batch", "batch-rule", 9000)],
    );
    let p = ca.apply_mesh(batch.clone(), ALICE).await.unwrap();
    assert_eq!(
        (p.applied, p.policy_revision, p.changes.len()),
        (true, 1, 2)
    );

    // Plan: three creations, nothing written.
    let file = request(
        "payments",
        vec![entry("web", 1000, 0, 3), entry("api", 1001, 300, 7)],
        vec![document("payments", "web-to-api", 8080)],
    );
    let before = snapshot(&ca).await;
    let plan = ca.apply_mesh(dry(file.clone()), ALICE).await.unwrap();
    assert_eq!(
        summary(&plan),
        [
            ("entry", "create", "spiffe://example.org/web".into()),
            ("entry", "create", "spiffe://example.org/api".into()),
            ("policy", "create", "payments".into()),
        ]
    );
    assert!((plan.dry_run, plan.applied) == (true, false));
    assert_eq!(plan.policy_revision, 1);
    assert!(plan.changes[0].id.is_empty(), "a dry run makes no ids");
    assert_eq!(plan.changes[1].at, "mesh.yaml:7:5");
    assert!(plan.changes[2].diff.contains("+  - name: web-to-api"));
    assert_eq!(snapshot(&ca).await, before, "a dry run writes nothing");

    // Apply: the agents are told.
    let mut events = ca.events.subscribe();
    let applied = ca.apply_mesh(file.clone(), ALICE).await.unwrap();
    assert_eq!(summary(&applied), summary(&plan));
    assert_eq!((applied.applied, applied.policy_revision), (true, 2));
    let mut upserted = Vec::new();
    let mut policy_changed = false;
    while let Ok(event) = events.try_recv() {
        match event {
            CaEvent::EntryUpserted { entry, old_parent } => {
                assert!(old_parent.is_none());
                upserted.push(entry.spiffe_id.path().to_owned());
            }
            CaEvent::PolicyChanged => policy_changed = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(upserted, ["/web", "/api"]);
    assert!(policy_changed);
    let entries = ca.store.list_entries().await.unwrap();
    assert_eq!(owned(&entries, "payments"), ["/api", "/web"]);
    let api = entries
        .iter()
        .find(|e| e.spiffe_id.path() == "/api")
        .unwrap();
    assert_eq!(api.x509_svid_ttl, Some(Duration::from_secs(300)));
    assert_eq!(
        applied.changes[1].id,
        api.id.to_string(),
        "an applied plan names the ids made"
    );
    let head = ca.policy_revision(None).await.unwrap().unwrap();
    assert_eq!(
        head.owners,
        BTreeMap::from([
            ("batch".to_owned(), "batch".to_owned()),
            ("payments".to_owned(), "payments".to_owned())
        ])
    );
    assert_eq!(
        (head.action.as_str(), head.subject.as_str()),
        ("mesh", "payments")
    );
    assert_eq!(ca.policy_in_force().unwrap().revision, 2);

    // Plan and apply again: nothing to do, and nothing recorded; nor when the selectors are
    // written in another order (an entry is its selectors as a set).
    let before = snapshot(&ca).await;
    let mut reordered = file.clone();
    for e in &mut reordered.entries {
        e.spec.selectors.reverse();
    }
    assert_ne!(
        reordered.entries[0].spec.selectors,
        file.entries[0].spec.selectors
    );
    for r in [dry(file.clone()), file.clone(), reordered] {
        let again = ca.apply_mesh(r, ALICE).await.unwrap();
        assert!(again.changes.is_empty(), "{again:?}");
        assert!(!again.applied);
        assert_eq!((again.unchanged, again.policy_revision), (3, 2));
    }
    assert_eq!(snapshot(&ca).await, before);

    // One record per apply (who, the owner, what changed, the policy diff), and one per entry
    // it changed, as a change by hand makes, saying how it was made.
    let records = mesh_records(&ca).await;
    assert_eq!(records.len(), 2);
    let (actor, details) = &records[1];
    assert_eq!(actor, ALICE);
    assert_eq!(details["owner"], "payments");
    assert_eq!(details["policy_revision"], 2);
    assert_eq!(details["ca_server"], "ca-1");
    assert_eq!(
        (&details["created"], &details["deleted"]),
        (&2.into(), &0.into())
    );
    assert_eq!(details["documents"][0]["name"], "payments");
    assert!(
        details["diff"].as_str().unwrap().contains("web-to-api"),
        "{details}"
    );
    let created: Vec<serde_json::Value> = ca
        .store
        .audit_records(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "entry.created")
        .map(|r| serde_json::from_str(&r.details).unwrap())
        .filter(|d: &serde_json::Value| d["owner"] == "payments")
        .collect();
    assert_eq!(created.len(), 2, "{created:?}");
    assert!(created.iter().any(|d| d["entry_id"] == api.id.to_string()));
    assert!(created
        .iter()
        .all(|d| d["via"] == "mesh.apply" && d["ca_server"] == "ca-1"));

    // An update: a TTL and a port; ids, creation time and parents stay.
    let mut v2 = file.clone();
    v2.entries[1].spec.x509_svid_ttl = 600;
    v2.entries[1].spec.dns_names = vec!["api.internal".into()];
    v2.policies[0] = document("payments", "web-to-api", 8443);
    let plan = ca.apply_mesh(v2.clone(), ALICE).await.unwrap();
    assert_eq!(
        summary(&plan),
        [
            ("entry", "update", "spiffe://example.org/api".into()),
            ("policy", "update", "payments".into()),
        ]
    );
    assert_eq!(
        plan.changes[0].fields,
        [
            "x509_svid_ttl: 300 -> 600",
            "dns_names: [] -> [api.internal]"
        ]
    );
    assert!(plan.changes[1]
        .diff
        .contains("-    ports: [8080]\n+    ports: [8443]"));
    let updated = ca.store.get_entry(&api.id).await.unwrap().unwrap();
    assert_eq!(
        (updated.revision, updated.created_at, updated.x509_svid_ttl),
        (
            api.revision + 1,
            api.created_at,
            Some(Duration::from_secs(600))
        )
    );
    assert_eq!(updated.owner, "payments");
    assert_eq!(plan.policy_revision, 3);

    // An update by hand keeps the owner; the file's next apply shows it as drift and undoes it.
    let mut drift = EntrySpec::from(&updated);
    drift.hint = "by hand".into();
    let by_hand = ca
        .update_entry(&drift, updated.revision, ALICE)
        .await
        .unwrap();
    assert_eq!(by_hand.owner, "payments");
    assert_eq!(
        ca.store.get_entry(&api.id).await.unwrap().unwrap().owner,
        "payments"
    );
    let plan = ca.apply_mesh(v2.clone(), ALICE).await.unwrap();
    assert_eq!(plan.changes[0].fields, ["hint: \"by hand\" -> \"\""]);

    // No longer declared: kept without prune (an orphan), deleted with it; nothing else is.
    let mut v3 = v2.clone();
    v3.entries.remove(0);
    v3.policies.clear();
    let kept = ca.apply_mesh(v3.clone(), ALICE).await.unwrap();
    assert!(kept.changes.is_empty());
    let orphans: Vec<(&str, &str)> = kept
        .orphans
        .iter()
        .map(|c| (c.kind.as_str(), c.action.as_str()))
        .collect();
    assert_eq!(orphans, [("entry", "delete"), ("policy", "delete")]);
    let before = snapshot(&ca).await;
    let pruned = ca.apply_mesh(pruning(v3.clone()), ALICE).await.unwrap();
    assert_eq!(
        summary(&pruned),
        [
            ("entry", "delete", "spiffe://example.org/web".into()),
            ("policy", "delete", "payments".into()),
        ]
    );
    assert!(pruned.orphans.is_empty());
    let entries = ca.store.list_entries().await.unwrap();
    assert_eq!(entries.len(), before.0.len() - 1);
    assert_eq!(owned(&entries, "payments"), ["/api"]);
    assert_eq!(owned(&entries, "batch"), ["/batch"]);
    assert_eq!(owned(&entries, ""), ["/hand"]);
    assert_eq!(ca.store.get_entry(&hand.id).await.unwrap().unwrap(), hand);
    let head = ca.policy_revision(None).await.unwrap().unwrap();
    assert_eq!(head.documents.keys().collect::<Vec<_>>(), ["batch"]);
    // Pruning again finds nothing.
    assert!(ca
        .apply_mesh(pruning(v3.clone()), ALICE)
        .await
        .unwrap()
        .changes
        .is_empty());

    // Declaring someone else's object is refused, naming it, and nothing changes.
    let before = snapshot(&ca).await;
    let mut grab = v3.clone();
    grab.entries.push(entry("hand", 7, 0, 30));
    grab.entries.push(entry("batch", 8, 0, 33));
    grab.entries.push(entry("new", 9, 0, 36));
    grab.policies.push(document("batch", "batch-rule", 9000));
    let msg = invalid_message(ca.apply_mesh(grab.clone(), ALICE).await.unwrap_err());
    assert!(
        msg.contains("3 declared object(s) already exist without owner `payments`"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "mesh.yaml:30:5: entry spiffe://example.org/hand (parent {AGENT}) exists as entry {}, made by hand",
            hand.id
        )),
        "{msg}"
    );
    assert!(
        msg.contains("mesh.yaml:33:5: entry spiffe://example.org/batch"),
        "{msg}"
    );
    assert!(msg.contains("owned by `batch`"), "{msg}");
    assert!(
        msg.contains("policy document `batch` exists, owned by `batch`"),
        "{msg}"
    );
    assert_eq!(snapshot(&ca).await, before);
    // Adopt takes over what was made by hand, never another owner's.
    let mut adopt = grab.clone();
    adopt.adopt = true;
    let msg = invalid_message(ca.apply_mesh(adopt.clone(), ALICE).await.unwrap_err());
    assert!(
        msg.contains("2 declared object(s)") && !msg.contains("/hand"),
        "{msg}"
    );
    assert_eq!(snapshot(&ca).await, before);
    adopt
        .entries
        .retain(|e| !e.spec.spiffe_id.ends_with("/batch"));
    adopt.policies.clear();
    let mut events = ca.events.subscribe();
    let plan = ca.apply_mesh(adopt, ALICE).await.unwrap();
    assert_eq!(
        summary(&plan),
        [
            ("entry", "adopt", "spiffe://example.org/hand".into()),
            ("entry", "create", "spiffe://example.org/new".into()),
        ]
    );
    assert_eq!(
        plan.changes[0].fields,
        ["owner: (made by hand) -> payments"]
    );
    // Only the owner label changes: not the revision, so its holders re-issue nothing.
    let adopted = ca.store.get_entry(&hand.id).await.unwrap().unwrap();
    assert_eq!(
        adopted,
        RegistrationEntry {
            owner: "payments".into(),
            ..hand.clone()
        }
    );
    let mut told = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let CaEvent::EntryUpserted { entry, .. } = event {
            told.push(entry.spiffe_id.path().to_owned());
        }
    }
    assert_eq!(told, ["/new"]);

    // One invalid entry or policy among valid changes: refused at its declaration, nothing
    // changes.
    let before = snapshot(&ca).await;
    let mut good = v3.clone();
    good.entries[0].spec.x509_svid_ttl = 900;
    good.entries.push(entry("more", 11, 0, 40));
    good.policies.push(document("payments", "web-to-api", 8080));
    let bad_cases: Vec<(MeshRequest, &str)> = vec![
        (
            {
                let mut r = good.clone();
                let mut e = entry("bad", 12, 0, 44);
                e.spec.selectors.push("unix:pid:1".into());
                r.entries.push(e);
                r
            },
            "mesh.yaml:44:5: invalid selector \"unix:pid:1\"",
        ),
        (
            {
                let mut r = good.clone();
                let mut e = entry("bad", 12, 0, 44);
                e.spec.spiffe_id = "spiffe://other.org/bad".into();
                r.entries.push(e);
                r
            },
            "mesh.yaml:44:5: spiffe_id \"spiffe://other.org/bad\" is not in trust domain",
        ),
        (
            {
                let mut r = good.clone();
                r.entries.push(entry("more", 11, 5, 48));
                r
            },
            "mesh.yaml:48:5: entry spiffe://example.org/more",
        ),
        (
            {
                let mut r = good.clone();
                r.policies[0].text = r.policies[0].text.replace("[8080]", "[http]");
                r
            },
            "policies/payments.yaml:6:",
        ),
        (
            {
                // An inline document: positions in the mesh file.
                let mut r = good.clone();
                r.policies[0].text = r.policies[0].text.replace("[8080]", "[http]");
                r.policies[0].origin = "mesh.yaml".into();
                r.policies[0].line_offset = 21;
                r.policies[0].column_offset = 6;
                r
            },
            "mesh.yaml:27:",
        ),
        (
            {
                // Valid alone, but the set in force would not combine (batch's rule name).
                let mut r = good.clone();
                r.policies[0] = document("payments", "batch-rule", 8080);
                r
            },
            "policies/payments.yaml:3:5: rule `batch-rule` is also in batch",
        ),
        (
            {
                let mut r = good.clone();
                r.owner = "Payments".into();
                r
            },
            "\"Payments\": use lowercase",
        ),
    ];
    for (r, want) in bad_cases {
        for r in [dry(r.clone()), r] {
            let msg = invalid_message(ca.apply_mesh(r, ALICE).await.unwrap_err());
            assert!(msg.contains(want), "{msg}\nwanted: {want}");
        }
        assert_eq!(snapshot(&ca).await, before);
    }
    let plan = ca.apply_mesh(good, ALICE).await.unwrap();
    assert_eq!(plan.changes.len(), 3, "{plan:?}");

    // Every record still chains.
    meshid_ca::store::verify_audit(ca.store.as_ref())
        .await
        .unwrap();

    // A restart sees the same owners.
    drop(ca);
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let entries = ca.store.list_entries().await.unwrap();
    assert_eq!(
        owned(&entries, "payments"),
        ["/api", "/hand", "/more", "/new"]
    );
    assert_eq!(
        ca.policy_revision(None).await.unwrap().unwrap().owners["payments"],
        "payments"
    );
}

#[tokio::test]
async fn mesh_apply_sqlite() {
    case(false).await;
}

#[tokio::test]
async fn mesh_apply_postgres() {
    case(true).await;
}

/// A write of a mesh apply that fails part-way (an id already taken) leaves nothing behind:
/// not the entries created before it, not the policy revision, not the audit record.
async fn failed_write_rolls_back(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let taken = ca
        .create_entry(&entry("taken", 1, 0, 0).spec, ALICE)
        .await
        .unwrap();
    let before = snapshot(&ca).await;
    let td = td();
    let fresh = |name: &str, id: &str| {
        let mut spec = entry(name, 2, 0, 0).spec;
        spec.id = Some(id.into());
        spec.validate(&td, 0).unwrap()
    };
    let write = MeshWrite {
        create: vec![fresh("one", "one"), fresh("two", taken.id.as_str())],
        update: Vec::new(),
        delete: Vec::new(),
        adopt: Vec::new(),
        policy: Some(meshid_ca::store::PolicyRevision {
            revision: 1,
            created_at: 0,
            author: ALICE.into(),
            reason: String::new(),
            action: "mesh".into(),
            subject: "x".into(),
            documents: BTreeMap::from([("x".into(), "rules: []\n".into())]),
            owners: BTreeMap::new(),
        }),
        federations_created: Vec::new(),
        federations_updated: Vec::new(),
        federations_deleted: Vec::new(),
        audit: vec![AuditEvent::new("mesh.apply", ALICE, serde_json::json!({}))],
    };
    let mut planned_against = None;
    let result = ca
        .store
        .apply_mesh(Box::new(|state| {
            planned_against = Some(state.entries.len());
            Some(write)
        }))
        .await;
    assert!(
        matches!(result, Err(StoreError::AlreadyExists(_))),
        "{result:?}"
    );
    assert_eq!(planned_against, Some(1));
    assert_eq!(snapshot(&ca).await, before);
    assert!(ca
        .store
        .get_entry(&"one".parse().unwrap())
        .await
        .unwrap()
        .is_none());
    // A deletion planned against an older revision is refused the same way.
    let write = MeshWrite {
        create: vec![fresh("one", "one")],
        update: Vec::new(),
        delete: vec![(taken.id.clone(), taken.revision + 1)],
        adopt: Vec::new(),
        policy: None,
        federations_created: Vec::new(),
        federations_updated: Vec::new(),
        federations_deleted: Vec::new(),
        audit: vec![AuditEvent::new("mesh.apply", ALICE, serde_json::json!({}))],
    };
    let result = ca.store.apply_mesh(Box::new(|_| Some(write))).await;
    assert!(
        matches!(result, Err(StoreError::RevisionConflict { .. })),
        "{result:?}"
    );
    assert_eq!(snapshot(&ca).await, before);
    // A relationship created, then an update of one that does not exist: neither stays.
    let relationship = |td: &str| meshid_ca::store::FederationRecord {
        trust_domain: spiffe::TrustDomain::new(td).unwrap(),
        endpoint_url: format!("https://{td}"),
        profile: "https_web".into(),
        endpoint_spiffe_id: String::new(),
        owner: "x".into(),
        created_at: 0,
        updated_at: 0,
    };
    let write = MeshWrite {
        create: Vec::new(),
        update: Vec::new(),
        delete: Vec::new(),
        adopt: Vec::new(),
        policy: None,
        federations_created: vec![(relationship("partner.org"), None)],
        federations_updated: vec![relationship("nowhere.org")],
        federations_deleted: Vec::new(),
        audit: vec![AuditEvent::new("mesh.apply", ALICE, serde_json::json!({}))],
    };
    let result = ca.store.apply_mesh(Box::new(|_| Some(write))).await;
    assert!(matches!(result, Err(StoreError::NotFound(_))), "{result:?}");
    assert!(ca.store.list_federations().await.unwrap().is_empty());
    assert_eq!(snapshot(&ca).await, before);
    // And a plan that writes nothing writes nothing.
    assert!(!ca.store.apply_mesh(Box::new(|_| None)).await.unwrap());
    assert_eq!(snapshot(&ca).await, before);
}

#[tokio::test]
async fn failed_mesh_write_rolls_back_sqlite() {
    failed_write_rolls_back(false).await;
}

#[tokio::test]
async fn failed_mesh_write_rolls_back_postgres() {
    failed_write_rolls_back(true).await;
}

/// Two CA servers sharing PostgreSQL apply two owners' files at the same moment: each plan is
/// made inside its own transaction, so both land, one after the other, without a retry; and
/// the second server's change feed tells its agents about the first one's apply.
#[tokio::test]
async fn two_servers_apply_at_once_and_hear_of_each_other() {
    let Some(db) = db(true).await else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca1 = ca_on(&db.url, "ca-1", d1.path()).await;
    let ca2 = ca_on(&db.url, "ca-2", d2.path()).await;
    ca2.refresh_policy().await.unwrap();
    let mut events = ca2.events.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(meshid_ca::server::change_feed_loop(
        ca2.clone(),
        meshid_ca::server::CHANGE_FEED_INTERVAL,
        stop_rx,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = request(
        "team-a",
        vec![entry("a", 1, 0, 3)],
        vec![document("team-a", "rule-a", 8080)],
    );
    let b = request(
        "team-b",
        vec![entry("b", 2, 0, 3)],
        vec![document("team-b", "rule-b", 8080)],
    );
    let (ra, rb) = tokio::join!(ca1.apply_mesh(a, ALICE), ca2.apply_mesh(b, ALICE));
    let mut revisions = [ra.unwrap().policy_revision, rb.unwrap().policy_revision];
    revisions.sort_unstable();
    assert_eq!(revisions, [1, 2]);
    let head = ca1.policy_revision(None).await.unwrap().unwrap();
    assert_eq!(head.documents.len(), 2);

    // ca-2's agents hear of ca-1's entry (from the change feed) and hold the newest policy.
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(CaEvent::EntryUpserted { entry, .. }) = events.recv().await {
                if entry.spiffe_id.path() == "/a" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "ca-2 did not announce ca-1's entry");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ca2.policy_in_force().map(|p| p.revision) != Some(2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ca-2 holds an old policy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A pruning apply on ca-1: ca-2's agents drop the entry.
    let plan = ca1
        .apply_mesh(
            pruning(request(
                "team-a",
                Vec::new(),
                vec![document("team-a", "rule-a", 8080)],
            )),
            ALICE,
        )
        .await
        .unwrap();
    assert_eq!(plan.changes.len(), 1);
    assert_eq!(plan.changes[0].action, Action::Delete);
    let dropped = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(CaEvent::EntryDeleted { parent, .. }) = events.recv().await {
                return parent.to_string();
            }
        }
    })
    .await;
    assert_eq!(dropped.unwrap(), AGENT);

    // The same file applied on both servers at once (a CI job retried, two pipelines): one
    // apply makes the entries, the other plans against them and finds nothing to do.
    let same = request(
        "team-c",
        (0..20)
            .map(|i| entry(&format!("c{i}"), 100 + i, 0, 3))
            .collect(),
        Vec::new(),
    );
    let (r1, r2) = tokio::join!(
        ca1.apply_mesh(same.clone(), ALICE),
        ca2.apply_mesh(same, ALICE)
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(
        [r1.applied, r2.applied].iter().filter(|a| **a).count(),
        1,
        "{r1:?} {r2:?}"
    );
    assert_eq!(r1.unchanged + r2.unchanged, 20);
    let entries = ca2.store.list_entries().await.unwrap();
    assert_eq!(owned(&entries, "team-c").len(), 20);
    stop_tx.send(true).unwrap();
    feed.await.unwrap();
}

/// A commit on one server wakes the other's change feed at once (PostgreSQL `NOTIFY`): with
/// its poll an hour apart, ca-2 still hears of ca-1's entry, twice in a row.
#[tokio::test]
async fn a_commit_wakes_the_other_servers_change_feed() {
    let Some(db) = db(true).await else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca1 = ca_on(&db.url, "ca-1", d1.path()).await;
    let ca2 = ca_on(&db.url, "ca-2", d2.path()).await;
    let mut events = ca2.events.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(meshid_ca::server::change_feed_loop(
        ca2.clone(),
        Duration::from_secs(3600),
        stop_rx,
    ));
    // The first poll (at once) and the listener's first wake-up pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (n, name) in ["woken-1", "woken-2"].into_iter().enumerate() {
        ca1.apply_mesh(
            request(name, vec![entry(name, 500 + n as u32, 0, 3)], Vec::new()),
            ALICE,
        )
        .await
        .unwrap();
        let heard = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(CaEvent::EntryUpserted { entry, .. }) = events.recv().await {
                    if entry.spiffe_id.path() == format!("/{name}") {
                        return;
                    }
                }
            }
        })
        .await;
        assert!(heard.is_ok(), "ca-2 was not woken for {name}");
    }
    stop_tx.send(true).unwrap();
    feed.await.unwrap();
}

fn federation(url: &str, bundle: Option<&str>) -> DeclaredFederation {
    DeclaredFederation {
        at: "mesh.yaml:30:5".into(),
        trust_domain: "partner.org".into(),
        endpoint_url: url.into(),
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: "spiffe://partner.org/meshid/server".into(),
        bundle: bundle.map_or(FederationBundle::None, |b| FederationBundle::Text(b.into())),
    }
}

/// Federation relationships in mesh files: created with the file's bundle (required for
/// https_spiffe), idempotent, updated in place keeping the bundle held, refused when someone
/// else's (adopted when made by hand and asked), pruned when no longer declared, each change
/// an audit record.
async fn mesh_federations(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let bundle = partner_bundle();
    let with = |owner: &str, federations: Vec<DeclaredFederation>| MeshRequest {
        federations,
        ..request(owner, Vec::new(), Vec::new())
    };
    let url = "https://ca.partner.org:8443";

    let e = ca
        .apply_mesh(with("payments", vec![federation(url, None)]), ALICE)
        .await
        .unwrap_err();
    assert!(invalid_message(e)
        .contains("mesh.yaml:30:5: a new https_spiffe relationship needs `bundle_file`"));
    let e = ca
        .apply_mesh(
            with("payments", vec![federation("http://x", Some(&bundle))]),
            ALICE,
        )
        .await
        .unwrap_err();
    assert!(invalid_message(e).contains("mesh.yaml:30:5: endpoint_url"));
    assert!(ca.store.list_federations().await.unwrap().is_empty());

    let file = with("payments", vec![federation(url, Some(&bundle))]);
    let plan = ca.apply_mesh(file.clone(), ALICE).await.unwrap();
    assert_eq!(
        summary(&plan),
        [("federation", "create", "partner.org".into())]
    );
    let stored = ca.store.list_federations().await.unwrap();
    assert_eq!(
        (stored[0].owner.as_str(), stored[0].endpoint_url.as_str()),
        ("payments", url)
    );
    let held = ca.store.list_federated_bundles().await.unwrap();
    assert_eq!((held.len(), held[0].sequence), (1, 7));
    let again = ca.apply_mesh(file.clone(), ALICE).await.unwrap();
    assert!(
        again.changes.is_empty() && again.unchanged == 1,
        "{again:?}"
    );

    // An update in place: the endpoint moves, the bundle held stays.
    let moved = with(
        "payments",
        vec![federation("https://bundles.partner.org", None)],
    );
    let plan = ca.apply_mesh(moved.clone(), ALICE).await.unwrap();
    assert_eq!(
        summary(&plan),
        [("federation", "update", "partner.org".into())]
    );
    assert_eq!(
        plan.changes[0].fields,
        [format!(
            "endpoint_url: {url:?} -> \"https://bundles.partner.org\""
        )]
    );
    assert_eq!(ca.store.list_federated_bundles().await.unwrap(), held);

    // Another owner may not declare it; one made by hand is adopted only when asked.
    let e = ca
        .apply_mesh(with("batch", vec![federation(url, None)]), ALICE)
        .await
        .unwrap_err();
    assert!(invalid_message(e).contains("owned by `payments`"));
    ca.create_federation(
        meshid_ca::service::federation::FederationSpec {
            trust_domain: "web.org".into(),
            endpoint_url: "https://web.org".into(),
            profile: "https_web".into(),
            ..Default::default()
        },
        ALICE,
    )
    .await
    .unwrap();
    let web = DeclaredFederation {
        trust_domain: "web.org".into(),
        endpoint_url: "https://web.org".into(),
        profile: "https_web".into(),
        endpoint_spiffe_id: String::new(),
        ..federation(url, None)
    };
    let both = with(
        "payments",
        vec![federation("https://bundles.partner.org", None), web],
    );
    let e = ca.apply_mesh(both.clone(), ALICE).await.unwrap_err();
    assert!(invalid_message(e).contains("made by hand"));
    let plan = ca
        .apply_mesh(
            MeshRequest {
                adopt: true,
                ..both
            },
            ALICE,
        )
        .await
        .unwrap();
    assert_eq!(summary(&plan), [("federation", "adopt", "web.org".into())]);

    // No longer declared: an orphan, deleted with prune (its bundle too).
    let none = with("payments", Vec::new());
    let plan = ca.apply_mesh(none.clone(), ALICE).await.unwrap();
    assert!(
        plan.changes.is_empty() && plan.orphans.len() == 2,
        "{plan:?}"
    );
    let plan = ca.apply_mesh(pruning(none), ALICE).await.unwrap();
    assert_eq!(plan.changes.len(), 2);
    assert!(ca.store.list_federations().await.unwrap().is_empty());
    assert!(ca.store.list_federated_bundles().await.unwrap().is_empty());

    let kinds: Vec<(String, serde_json::Value)> = ca
        .store
        .audit_records(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind.starts_with("federation."))
        .map(|r| (r.kind, serde_json::from_str(&r.details).unwrap()))
        .collect();
    let via: Vec<&str> = kinds
        .iter()
        .filter(|(_, d)| d["via"] == "mesh.apply")
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        via,
        [
            "federation.created",
            "federation.updated",
            "federation.updated",
            "federation.deleted",
            "federation.deleted"
        ]
    );
}

#[tokio::test]
async fn mesh_federations_sqlite() {
    mesh_federations(false).await;
}

#[tokio::test]
async fn mesh_federations_postgres() {
    mesh_federations(true).await;
}
