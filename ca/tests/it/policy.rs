//! The central policy over a real datastore (SQLite and PostgreSQL): named documents applied,
//! validated before anything changes (file:line:column), versioned as revisions of the whole
//! set with their author, reason and diff on the audit record; an identical apply changes
//! nothing; a dry run writes nothing; documents that could not combine are refused; delete and
//! rollback make new revisions; a write based on an old head is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use meshid_ca::service::{Ca, ServiceError};
use meshid_ca::store::{PolicyRevision, StoreError};

use crate::authority::{ca_on, db};

const ALICE: &str = "admin:uid=1000,pid=1";
const BOB: &str = "admin:uid=1001,pid=2";

const TEAM_A: &str = "\
name: team-a
default: deny
rules:
  - name: web-to-api
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/api\"]
";

const TEAM_A_V2: &str = "\
name: team-a
default: deny
rules:
  - name: web-to-api
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/api\"]
    ports: [8080]
";

const TEAM_B: &str = "\
name: team-b
default: deny
rules:
  - name: batch-to-db
    from: [\"spiffe://example.org/batch\"]
    to: [\"spiffe://example.org/db\"]
";

fn invalid_message(e: ServiceError) -> String {
    match e {
        ServiceError::InvalidArgument { reason, .. } => reason,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

async fn kinds(ca: &Ca) -> Vec<(String, serde_json::Value)> {
    ca.store
        .audit_records(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind.starts_with("policy."))
        .map(|r| (r.kind, serde_json::from_str(&r.details).unwrap()))
        .collect()
}

async fn case(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    assert!(ca.policy_revision(None).await.unwrap().is_none());
    assert!(ca.policy_history().await.unwrap().is_empty());

    // A first document.
    let c = ca
        .apply_policy("team-a", TEAM_A, "teams/a.yaml", "first", ALICE, false)
        .await
        .unwrap();
    assert_eq!((c.revision, c.changed, c.dry_run), (1, true, false));
    assert!(
        c.diff.contains("+++ team-a") && c.diff.contains("+  - name: web-to-api"),
        "{}",
        c.diff
    );
    // The same text again: nothing changes, and the caller is told.
    let again = ca
        .apply_policy("team-a", TEAM_A, "teams/a.yaml", "", BOB, false)
        .await
        .unwrap();
    assert_eq!((again.revision, again.changed), (1, false));
    assert!(again.diff.is_empty());

    // A dry run shows the diff and writes nothing.
    let dry = ca
        .apply_policy("team-a", TEAM_A_V2, "teams/a.yaml", "", BOB, true)
        .await
        .unwrap();
    assert_eq!((dry.revision, dry.changed, dry.dry_run), (1, true, true));
    assert!(dry.diff.contains("+    ports: [8080]"), "{}", dry.diff);
    assert_eq!(ca.policy_revision(None).await.unwrap().unwrap().revision, 1);

    // An invalid file is refused with its position, and nothing changes.
    let bad = TEAM_A_V2.replace("ports: [8080]", "ports: [http]");
    let e = ca
        .apply_policy("team-a", &bad, "teams/a.yaml", "", BOB, false)
        .await
        .unwrap_err();
    let msg = invalid_message(e);
    assert!(msg.starts_with("teams/a.yaml:7:"), "{msg}");
    for broken in ["rules: [", "default: maybe\n", "\u{0}"] {
        let e = ca
            .apply_policy("team-a", broken, "teams/a.yaml", "", BOB, false)
            .await
            .unwrap_err();
        assert!(invalid_message(e).starts_with("teams/a.yaml"), "{broken:?}");
    }
    let e = ca
        .apply_policy("Team A", TEAM_A, "", "", BOB, false)
        .await
        .unwrap_err();
    assert!(invalid_message(e).contains("lowercase"));
    let e = ca
        .apply_policy("team-a", TEAM_A, "", "line\nbreak", BOB, false)
        .await
        .unwrap_err();
    assert!(invalid_message(e).contains("control character"));
    assert_eq!(ca.policy_revision(None).await.unwrap().unwrap().revision, 1);

    // A document that cannot combine with the others (another default) is refused, naming
    // the document it conflicts with.
    let allow_b = TEAM_B.replace("default: deny", "default: allow");
    let e = ca
        .apply_policy("team-b", &allow_b, "", "", BOB, false)
        .await
        .unwrap_err();
    let msg = invalid_message(e);
    assert!(msg.contains("team-a") && msg.contains("default"), "{msg}");
    let same_rule = TEAM_B.replace("batch-to-db", "web-to-api");
    let e = ca
        .apply_policy("team-b", &same_rule, "teams/b.yaml", "", BOB, false)
        .await
        .unwrap_err();
    let msg = invalid_message(e);
    assert!(
        msg.starts_with("teams/b.yaml:4:5: rule `web-to-api` is also in team-a"),
        "{msg}"
    );

    // Two documents, then a change to one: revisions of the whole set.
    let c = ca
        .apply_policy("team-b", TEAM_B, "", "team b joins", BOB, false)
        .await
        .unwrap();
    assert_eq!(c.revision, 2);
    assert!(!c.diff.contains("team-a"), "only what changed: {}", c.diff);
    let c = ca
        .apply_policy("team-a", TEAM_A_V2, "", "port", ALICE, false)
        .await
        .unwrap();
    assert_eq!(c.revision, 3);
    let head = ca.policy_revision(None).await.unwrap().unwrap();
    assert_eq!(
        head.documents,
        BTreeMap::from([
            ("team-a".to_owned(), TEAM_A_V2.to_owned()),
            ("team-b".to_owned(), TEAM_B.to_owned())
        ])
    );
    assert_eq!(
        (head.author.as_str(), head.reason.as_str()),
        (ALICE, "port")
    );
    let r1 = ca.policy_revision(Some(1)).await.unwrap().unwrap();
    assert_eq!(r1.documents.len(), 1);
    assert!(ca.policy_revision(Some(99)).await.unwrap().is_none());

    // Delete, then roll back to revision 3: a new revision with its documents.
    let c = ca
        .delete_policy("team-b", "gone", BOB, false)
        .await
        .unwrap();
    assert_eq!(c.revision, 4);
    assert!(c.diff.contains("+++ /dev/null"), "{}", c.diff);
    assert!(matches!(
        ca.delete_policy("team-b", "", BOB, false)
            .await
            .unwrap_err(),
        ServiceError::Store(StoreError::NotFound(_))
    ));
    let dry = ca.rollback_policy(3, "", ALICE, true).await.unwrap();
    assert_eq!((dry.revision, dry.changed), (4, true));
    let c = ca.rollback_policy(3, "undo", ALICE, false).await.unwrap();
    assert_eq!(c.revision, 5);
    assert_eq!(
        ca.policy_revision(None).await.unwrap().unwrap().documents,
        head.documents
    );
    assert!(matches!(
        ca.rollback_policy(99, "", ALICE, false).await.unwrap_err(),
        ServiceError::Store(StoreError::NotFound(_))
    ));

    // History, oldest first, and the audit records with the diffs.
    let history = ca.policy_history().await.unwrap();
    let summary: Vec<(u64, &str, &str, &str)> = history
        .iter()
        .map(|r| {
            (
                r.revision,
                r.action.as_str(),
                r.subject.as_str(),
                r.author.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "apply", "team-a", ALICE),
            (2, "apply", "team-b", BOB),
            (3, "apply", "team-a", ALICE),
            (4, "delete", "team-b", BOB),
            (5, "rollback", "3", ALICE),
        ]
    );
    assert!(history.iter().all(|r| r.documents.is_empty()));
    let audit = kinds(&ca).await;
    let audit_kinds: Vec<&str> = audit.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        audit_kinds,
        [
            "policy.apply",
            "policy.apply",
            "policy.apply",
            "policy.delete",
            "policy.rollback"
        ]
    );
    assert_eq!(audit[2].1["revision"], 3);
    assert_eq!(audit[2].1["reason"], "port");
    assert!(audit[2].1["diff"]
        .as_str()
        .unwrap()
        .contains("+    ports: [8080]"));

    // The store refuses a revision not based on the head, and writes nothing.
    let stale = PolicyRevision {
        revision: 5,
        created_at: 0,
        author: BOB.into(),
        reason: String::new(),
        action: "apply".into(),
        subject: "team-c".into(),
        documents: BTreeMap::new(),
        owners: BTreeMap::new(),
    };
    let event = meshid_ca::audit::AuditEvent::new("policy.apply", BOB, serde_json::json!({}));
    assert!(matches!(
        ca.store.append_policy_revision(&stale, &event).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(ca.policy_history().await.unwrap().len(), 5);
    assert_eq!(kinds(&ca).await.len(), 5);

    // A restart sees the same policy.
    drop(ca);
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    assert_eq!(
        ca.policy_revision(None).await.unwrap().unwrap().documents,
        head.documents
    );
}

#[tokio::test]
async fn policy_sqlite() {
    case(false).await;
}

#[tokio::test]
async fn policy_postgres() {
    case(true).await;
}

/// Two CA servers sharing PostgreSQL apply at the same moment: both changes land, one after the
/// other (a writer based on an old head is told to retry), and no revision is lost or doubled.
#[tokio::test]
async fn concurrent_applies_on_two_servers_are_serialized() {
    let Some(db) = db(true).await else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca1 = ca_on(&db.url, "ca-1", d1.path()).await;
    let ca2 = ca_on(&db.url, "ca-2", d2.path()).await;
    let apply = |ca: Ca, name: &'static str, text: &'static str| async move {
        for _ in 0..20 {
            match ca.apply_policy(name, text, "", "", ALICE, false).await {
                Ok(c) => return c.revision,
                Err(ServiceError::Store(StoreError::AlreadyExists(_))) => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{name}: never applied");
    };
    let (a, b) = tokio::join!(
        apply(ca1.clone(), "team-a", TEAM_A),
        apply(ca2.clone(), "team-b", TEAM_B)
    );
    let mut got = [a, b];
    got.sort_unstable();
    assert_eq!(got, [1, 2]);
    assert_eq!(
        ca1.policy_revision(None)
            .await
            .unwrap()
            .unwrap()
            .documents
            .len(),
        2
    );
}

/// A change applied through one CA server reaches the agents of another: the second server's
/// change feed (the audit log, read every 250 ms) makes it hold the new revision and announce
/// it to its sync streams.
#[tokio::test]
async fn another_servers_policy_change_reaches_this_servers_agents() {
    let Some(db) = db(true).await else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca1 = ca_on(&db.url, "ca-1", d1.path()).await;
    let ca2 = ca_on(&db.url, "ca-2", d2.path()).await;
    ca2.refresh_policy().await.unwrap();
    assert!(ca2.policy_in_force().is_none());
    let mut events = ca2.events.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let feed = tokio::spawn(meshid_ca::server::change_feed_loop(
        ca2.clone(),
        meshid_ca::server::CHANGE_FEED_INTERVAL,
        stop_rx,
    ));
    // Let the feed read the head before the change.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ca1.apply_policy("team-a", TEAM_A, "", "", ALICE, false)
        .await
        .unwrap();
    let announced = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(meshid_ca::service::CaEvent::PolicyChanged) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(announced.is_ok(), "ca-2 did not announce the new policy");
    assert_eq!(ca2.policy_in_force().unwrap().revision, 1);
    // Its own change is not replayed again by the server that made it: ca-1 held it already.
    assert_eq!(ca1.policy_in_force().unwrap().revision, 1);
    stop_tx.send(true).unwrap();
    feed.await.unwrap();
}
