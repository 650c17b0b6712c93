//! `meshid-ca ca taint` over a real datastore: a tainted intermediate signs nothing more (a
//! fresh one takes over at once), the progress of the re-issue is measured from the issuance
//! records until nothing it signed is left, and roots, unknown keys and second taints are
//! refused. A tainted JWT key is replaced too, and named to the agents.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshid_ca::entry::EntrySpec;
use meshid_ca::service::Ca;
use meshid_ca::store::{CaKeyKind, CaKeyState};

use crate::authority::{ca_on, csr, db};

fn active(ca: &Ca, kind: CaKeyKind) -> String {
    ca.authority
        .journal()
        .into_iter()
        .find(|k| k.kind == kind && k.state == CaKeyState::Active && k.server_id == "ca-1")
        .unwrap()
        .id
}

async fn taint_case(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let agent = "spiffe://example.org/meshid/agent/join_token/a";
    let mut entries = Vec::new();
    for i in 0..3 {
        entries.push(
            ca.create_entry(
                &EntrySpec {
                    spiffe_id: format!("spiffe://example.org/w{i}"),
                    parent_id: agent.into(),
                    selectors: vec!["unix:uid:1000".into()],
                    x509_svid_ttl: 3600,
                    ..Default::default()
                },
                "admin:uid=0",
            )
            .await
            .unwrap(),
        );
    }
    let mut first = Vec::new();
    for e in &entries {
        first.push(ca.issue_for_entry(e, &csr(), agent).await.unwrap());
    }
    let tainted = active(&ca, CaKeyKind::X509Intermediate);
    assert!(ca.authority.taint_progress().await.unwrap().is_empty());

    let rec = ca
        .taint_key(&tainted, "admin:uid=0", "laptop stolen")
        .await
        .unwrap();
    assert_eq!(rec.id, tainted);
    let fresh = active(&ca, CaKeyKind::X509Intermediate);
    assert_ne!(fresh, tainted, "a fresh intermediate took over at once");
    let (x509, _) = ca.authority.tainted_keys();
    assert_eq!(
        x509.len(),
        1,
        "the agents are told which certificate is tainted"
    );
    let svid = ca
        .issue_for_entry(&entries[0], &csr(), agent)
        .await
        .unwrap();
    assert_eq!(
        svid.issuer, fresh,
        "nothing more is signed by the tainted key"
    );

    // One of three re-issued: two remain, until they expire at the latest.
    let p = &ca.authority.taint_progress().await.unwrap()[0];
    assert_eq!(
        (p.key_id.as_str(), p.remaining, p.replaced),
        (tainted.as_str(), 2, 1)
    );
    assert!(p.cleared_after_s.is_none());
    assert!(p.remaining_until > meshid_ca::unix_now() + 500, "{p:?}");
    // A revoked one is refused everywhere already: it no longer counts as remaining.
    ca.revoke(
        meshid_ca::authority::revoke::RevokeTarget::Serial(first[1].serial.to_uppercase()),
        "admin:uid=0",
        "revoked before its re-issue",
    )
    .await
    .unwrap();
    let p = &ca.authority.taint_progress().await.unwrap()[0];
    assert_eq!((p.remaining, p.replaced), (1, 1), "{p:?}");
    for e in &entries[1..] {
        ca.issue_for_entry(e, &csr(), agent).await.unwrap();
    }
    let p = &ca.authority.taint_progress().await.unwrap()[0];
    assert_eq!((p.remaining, p.replaced), (0, 3));
    assert!(
        p.cleared_after_s.is_some_and(|s| (0..5).contains(&s)),
        "{p:?}"
    );

    // Refusals, with nothing changed.
    for (key, why) in [
        (tainted.as_str(), "already tainted"),
        ("int-nope", "no CA key"),
    ] {
        let err = ca.taint_key(key, "admin:uid=0", "").await.unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    let root = ca
        .authority
        .journal()
        .into_iter()
        .find(|k| k.kind == CaKeyKind::X509Root)
        .unwrap()
        .id;
    let err = ca.taint_key(&root, "admin:uid=0", "").await.unwrap_err();
    assert!(err.to_string().contains("ca root prepare"), "{err}");

    // A JWT key: replaced at once, named to the agents, still published for what it signed.
    let jwt = active(&ca, CaKeyKind::Jwt);
    ca.taint_key(&jwt, "admin:uid=0", "").await.unwrap();
    assert_ne!(active(&ca, CaKeyKind::Jwt), jwt);
    let (_, kids) = ca.authority.tainted_keys();
    assert_eq!(kids, vec![jwt.trim_start_matches("jwt-").to_owned()]);
    let published = ca.authority.bundle().jwt_authorities;
    assert!(published
        .iter()
        .any(|k| k["kid"] == jwt.trim_start_matches("jwt-")));

    // Audited with who and why; a restart keeps the fresh keys.
    let records = ca.store.audit_records(0, 1000).await.unwrap();
    let taint = records.iter().find(|r| r.kind == "ca.key.tainted").unwrap();
    assert_eq!(taint.actor, "admin:uid=0");
    assert!(taint.details.contains("laptop stolen"), "{}", taint.details);
    drop(ca);
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    assert_eq!(active(&ca, CaKeyKind::X509Intermediate), fresh);
}

#[tokio::test]
async fn taint_sqlite() {
    taint_case(false).await;
}

#[tokio::test]
async fn taint_postgres() {
    taint_case(true).await;
}
