//! The audit chain: one record per change, concurrency, and tampering with raw SQL.

use std::sync::Arc;

use meshid_ca::audit::{AuditFault, AuditViolation};
use meshid_ca::store::{verify_audit, AuditVerifyError};
use meshid_ca::store::{CaKeyKind, CaKeyState, Datastore, StoreError};
use spiffe::TrustDomain;

use crate::store::fixture::{
    agent, agent_id, ca_key, entry, ev, fixture, token, Backend, Fixture, NOW,
};

/// Asserts that verification fails at `seq` for `reason`.
async fn assert_violation(fx: &Fixture, seq: i64, reason: AuditFault) {
    match verify_audit(&fx.store).await {
        Err(AuditVerifyError::Violation(v)) => assert_eq!(v, AuditViolation { seq, reason }, "{v}"),
        other => panic!("expected a violation at {seq} ({reason}), got {other:?}"),
    }
}

/// A store with `n` audit records, verified intact.
async fn with_log(backend: Backend, n: i64) -> Option<Fixture> {
    let fx = Fixture::new(backend).await?;
    for i in 0..n {
        fx.store
            .append_audit(&ev(&format!("svid.x509.issued.{i}")))
            .await
            .unwrap();
    }
    assert_eq!(verify_audit(&fx.store).await.unwrap(), n as u64);
    Some(fx)
}

pub async fn every_mutation_is_audited_once(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    assert_eq!(verify_audit(s).await.unwrap(), 0);
    assert_eq!(s.audit_head().await.unwrap(), None);

    let e = entry("audited", &agent_id(1), 1);
    s.create_entry(&e, &ev("entry.created")).await.unwrap();
    let mut up = e.clone();
    up.revision = 2;
    s.update_entry(&up, &ev("entry.updated")).await.unwrap();
    s.delete_entry(&e.id, &ev("entry.deleted")).await.unwrap();
    let t = token(1, NOW + 60);
    s.create_join_token(&t, &ev("token.created")).await.unwrap();
    s.consume_join_token(&t.hash, NOW, &ev("token.used"))
        .await
        .unwrap();
    s.upsert_agent(&agent(1), &ev("agent.attested"))
        .await
        .unwrap();
    s.insert_ca_key(
        &ca_key("root", CaKeyKind::X509Root, None, NOW),
        &ev("ca_key.created"),
    )
    .await
    .unwrap();
    s.set_ca_key_state("root", CaKeyState::Active, &ev("ca_key.activated"))
        .await
        .unwrap();
    let issued = s.append_audit(&ev("svid.x509.issued")).await.unwrap();
    let other = TrustDomain::new("other.org").unwrap();
    s.create_federation(
        &meshid_ca::store::FederationRecord {
            trust_domain: other.clone(),
            endpoint_url: "https://other.org".into(),
            profile: "https_web".into(),
            endpoint_spiffe_id: String::new(),
            owner: String::new(),
            created_at: NOW,
            updated_at: NOW,
        },
        None,
        &ev("federation.created"),
    )
    .await
    .unwrap();
    s.put_federated_bundle(
        &meshid_ca::store::FederatedBundle {
            trust_domain: other,
            document: "{}".into(),
            sequence: 1,
            updated_at: NOW,
        },
        &ev("bundle.updated"),
    )
    .await
    .unwrap();

    let expected = [
        "entry.created",
        "entry.updated",
        "entry.deleted",
        "token.created",
        "token.used",
        "agent.attested",
        "ca_key.created",
        "ca_key.activated",
        "svid.x509.issued",
        "federation.created",
        "bundle.updated",
    ];
    let records = s.audit_records(0, 100).await.unwrap();
    assert_eq!(
        records.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>()
    );
    let r = &records[8];
    assert_eq!((r, r.actor.as_str()), (&issued, "admin:uid=0"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.details).unwrap(),
        serde_json::json!({ "test": "svid.x509.issued" })
    );
    assert_eq!(s.audit_head().await.unwrap(), Some((11, records[10].hash)));
    assert_eq!(verify_audit(s).await.unwrap(), 11);
    // Paging: after/limit.
    let page = s.audit_records(3, 2).await.unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
}

pub async fn failed_mutations_are_not_audited(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let e = entry("once", &agent_id(1), 1);
    s.create_entry(&e, &ev("entry.created")).await.unwrap();
    let t = token(1, NOW + 60);
    s.create_join_token(&t, &ev("token.created")).await.unwrap();
    s.consume_join_token(&t.hash, NOW, &ev("token.used"))
        .await
        .unwrap();

    assert!(s.create_entry(&e, &ev("bad")).await.is_err());
    assert!(s.update_entry(&e, &ev("bad")).await.is_err()); // revision 1 is not 1 + 1
    assert!(s
        .delete_entry(&"none".parse().unwrap(), &ev("bad"))
        .await
        .is_err());
    assert!(s.create_join_token(&t, &ev("bad")).await.is_err());
    assert!(matches!(
        s.consume_join_token(&t.hash, NOW, &ev("bad")).await,
        Err(StoreError::TokenRejected)
    ));
    assert!(s
        .set_ca_key_state("none", CaKeyState::Retired, &ev("bad"))
        .await
        .is_err());
    assert_eq!(
        fx.audit_kinds().await,
        ["entry.created", "token.created", "token.used"]
    );
    assert_eq!(verify_audit(s).await.unwrap(), 3);
}

pub async fn batch_appends_chain_in_order(backend: Backend) {
    let fx = fixture!(backend);
    let store = Arc::new(fx.open_again().await);
    fx.store.append_audit(&ev("before")).await.unwrap();
    assert!(fx.store.append_audit_batch(&[]).await.unwrap().is_empty());
    // Batches from several tasks interleave only as whole batches, never fork the chain.
    let tasks: Vec<_> = (0..10)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let events: Vec<_> = (0..20).map(|i| ev(&format!("batch{t}.{i}"))).collect();
                store.append_audit_batch(&events).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        let records = task.await.unwrap();
        assert_eq!(records.len(), 20);
        let seqs: Vec<i64> = records.iter().map(|r| r.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "a batch is contiguous: {seqs:?}"
        );
    }
    assert_eq!(
        meshid_ca::store::verify_audit(&fx.store).await.unwrap(),
        201
    );
}

pub async fn concurrent_appends_keep_one_chain(backend: Backend) {
    let fx = fixture!(backend);
    let store = Arc::new(fx.open_again().await);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                if i % 5 == 0 {
                    // Mix in audited changes, which take the same path.
                    let e = entry(&format!("c{i}"), &agent_id(1), i);
                    store
                        .create_entry(&e, &ev("entry.created"))
                        .await
                        .map(|_| ())
                } else {
                    store
                        .append_audit(&ev("svid.x509.issued"))
                        .await
                        .map(|_| ())
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let records = fx.store.audit_records(0, 1000).await.unwrap();
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    assert_eq!(verify_audit(&fx.store).await.unwrap(), 50);
    assert_eq!(fx.store.list_entries().await.unwrap().len(), 10);
}

pub async fn concurrent_appends_from_two_servers(backend: Backend) {
    let fx = fixture!(backend);
    // Two CA servers (two pools) on one database.
    let stores = [
        Arc::new(fx.open_again().await),
        Arc::new(fx.open_again().await),
    ];
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = stores[i % 2].clone();
            tokio::spawn(async move { store.append_audit(&ev(&format!("server{}", i % 2))).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(task.await.unwrap().unwrap().seq);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    assert_eq!(verify_audit(&fx.store).await.unwrap(), 50);
}

pub async fn verify_pages_through_a_large_log(backend: Backend) {
    // More than two pages of 1000.
    let Some(fx) = with_log(backend, 2_050).await else {
        return;
    };
    fx.raw("UPDATE audit_log SET actor = 'someone else' WHERE seq = 2001")
        .await;
    assert_violation(&fx, 2001, AuditFault::HashMismatch).await;
}

pub async fn tamper_edited_record(backend: Backend) {
    let Some(fx) = with_log(backend, 6).await else {
        return;
    };
    fx.raw(r#"UPDATE audit_log SET details = '{"test":"nothing to see"}' WHERE seq = 4"#)
        .await;
    assert_violation(&fx, 4, AuditFault::HashMismatch).await;
}

pub async fn tamper_deleted_middle_record(backend: Backend) {
    let Some(fx) = with_log(backend, 6).await else {
        return;
    };
    fx.raw("DELETE FROM audit_log WHERE seq = 3").await;
    assert_violation(
        &fx,
        3,
        AuditFault::SeqGap {
            expected: 3,
            found: 4,
        },
    )
    .await;

    // Hiding the gap by renumbering breaks the hash links instead.
    fx.raw("UPDATE audit_log SET seq = seq - 1 WHERE seq = 4")
        .await;
    assert_violation(&fx, 3, AuditFault::BrokenLink).await;
}

pub async fn tamper_truncated_log(backend: Backend) {
    let Some(fx) = with_log(backend, 6).await else {
        return;
    };
    fx.raw("DELETE FROM audit_log WHERE seq = 6").await;
    assert_violation(&fx, 6, AuditFault::HeadMismatch).await;
    fx.raw("DELETE FROM audit_log WHERE seq >= 4").await;
    assert_violation(&fx, 4, AuditFault::HeadMismatch).await;
    fx.raw("DELETE FROM audit_log").await;
    assert_violation(&fx, 1, AuditFault::MissingHead).await;
}

pub async fn tamper_reordered_records(backend: Backend) {
    let Some(fx) = with_log(backend, 6).await else {
        return;
    };
    // Swap records 2 and 5 (through a temporary seq: the column is a primary key).
    fx.raw("UPDATE audit_log SET seq = -2 WHERE seq = 2").await;
    fx.raw("UPDATE audit_log SET seq = 2 WHERE seq = 5").await;
    fx.raw("UPDATE audit_log SET seq = 5 WHERE seq = -2").await;
    assert_violation(&fx, 2, AuditFault::BrokenLink).await;
}

pub async fn tamper_edited_head(backend: Backend) {
    let Some(fx) = with_log(backend, 6).await else {
        return;
    };
    // Head moved back to an earlier record (as if hiding the last one).
    fx.raw("UPDATE audit_head SET seq = 5, hash = (SELECT hash FROM audit_log WHERE seq = 5)")
        .await;
    assert_violation(&fx, 6, AuditFault::HeadMismatch).await;
    // Right seq, wrong hash.
    fx.raw("UPDATE audit_head SET seq = 6, hash = (SELECT hash FROM audit_log WHERE seq = 1)")
        .await;
    assert_violation(&fx, 6, AuditFault::HeadMismatch).await;
    // A head pointing past the end.
    fx.raw("UPDATE audit_head SET seq = 7").await;
    assert_violation(&fx, 7, AuditFault::HeadMismatch).await;
}

pub async fn tamper_deleted_head(backend: Backend) {
    let Some(fx) = with_log(backend, 3).await else {
        return;
    };
    fx.raw("DELETE FROM audit_head").await;
    assert_violation(&fx, 3, AuditFault::MissingHead).await;
}
