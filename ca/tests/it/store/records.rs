//! Join tokens, agents, the CA journal and federated bundles.

use std::sync::Arc;

use meshid_ca::store::{
    AgentRecord, CaKeyKind, CaKeyState, Datastore, FederatedBundle, FederationRecord, StoreError,
};
use spiffe::TrustDomain;

use crate::store::fixture::{agent, ca_key, ev, fixture, token, Backend, NOW};

pub async fn join_token_single_use(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let t = token(1, NOW + 600);
    s.create_join_token(&t, &ev("token.created")).await.unwrap();
    let used = s
        .consume_join_token(&t.hash, NOW + 1, &ev("token.used"))
        .await
        .unwrap();
    assert_eq!(
        used,
        meshid_ca::store::JoinTokenRecord {
            used_at: Some(NOW + 1),
            ..t.clone()
        }
    );
    assert!(matches!(
        s.consume_join_token(&t.hash, NOW + 2, &ev("token.used"))
            .await,
        Err(StoreError::TokenRejected)
    ));
    assert_eq!(fx.audit_kinds().await, ["token.created", "token.used"]);
}

pub async fn join_token_expired(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let t = token(2, NOW + 600);
    s.create_join_token(&t, &ev("token.created")).await.unwrap();
    // Refused from the expiry second on.
    for now in [NOW + 600, NOW + 601, NOW + 100_000] {
        assert!(matches!(
            s.consume_join_token(&t.hash, now, &ev("token.used")).await,
            Err(StoreError::TokenRejected)
        ));
    }
    s.consume_join_token(&t.hash, NOW + 599, &ev("token.used"))
        .await
        .unwrap();
}

pub async fn join_token_unknown_and_duplicate(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    assert!(matches!(
        s.consume_join_token(&[9; 32], NOW, &ev("token.used")).await,
        Err(StoreError::TokenRejected)
    ));
    let t = token(3, NOW + 600);
    s.create_join_token(&t, &ev("token.created")).await.unwrap();
    // Same hash, or same id: both refused.
    let same_hash = meshid_ca::store::JoinTokenRecord {
        id: "other".to_owned(),
        ..t.clone()
    };
    assert!(matches!(
        s.create_join_token(&same_hash, &ev("token.created")).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let same_id = token(4, NOW + 600);
    let same_id = meshid_ca::store::JoinTokenRecord {
        id: t.id.clone(),
        ..same_id
    };
    assert!(matches!(
        s.create_join_token(&same_id, &ev("token.created")).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(fx.audit_kinds().await, ["token.created"]);
}

pub async fn join_token_concurrent_use_one_wins(backend: Backend) {
    let fx = fixture!(backend);
    let t = token(5, NOW + 600);
    fx.store
        .create_join_token(&t, &ev("token.created"))
        .await
        .unwrap();
    // Two CA servers, ten agents racing with the same token.
    let stores = [
        Arc::new(fx.open_again().await),
        Arc::new(fx.open_again().await),
    ];
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let store = stores[i % 2].clone();
            let hash = t.hash;
            tokio::spawn(async move {
                store
                    .consume_join_token(&hash, NOW + 1, &ev("token.used"))
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StoreError::TokenRejected) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(fx.audit_kinds().await, ["token.created", "token.used"]);
}

pub async fn agents_upsert_and_list(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    assert_eq!(s.get_agent(&agent(1).spiffe_id).await.unwrap(), None);
    for n in [3, 1, 2] {
        s.upsert_agent(&agent(n), &ev("agent.attested"))
            .await
            .unwrap();
    }
    let mut renewed = agent(2);
    renewed.serial = "beef".to_owned();
    renewed.expires_at += 3600;
    renewed.banned = true;
    s.upsert_agent(&renewed, &ev("agent.banned")).await.unwrap();
    assert_eq!(
        s.get_agent(&renewed.spiffe_id).await.unwrap(),
        Some(renewed.clone())
    );
    assert_eq!(
        s.list_agents().await.unwrap(),
        vec![agent(1), renewed, agent(3)]
    );
}

pub async fn agent_delete(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    for n in [1, 2] {
        s.upsert_agent(&agent(n), &ev("agent.attested"))
            .await
            .unwrap();
    }
    assert_eq!(
        s.delete_agent(&agent(1).spiffe_id, &ev("agent.evicted"))
            .await
            .unwrap(),
        agent(1)
    );
    assert_eq!(s.get_agent(&agent(1).spiffe_id).await.unwrap(), None);
    assert_eq!(s.list_agents().await.unwrap(), vec![agent(2)]);
    // Deleting what is not there changes nothing and writes no audit record.
    assert!(matches!(
        s.delete_agent(&agent(1).spiffe_id, &ev("agent.evicted")).await,
        Err(StoreError::NotFound(ref what)) if what.contains(&agent(1).spiffe_id.to_string())
    ));
    assert_eq!(
        fx.audit_kinds().await,
        ["agent.attested", "agent.attested", "agent.evicted"]
    );
    // The agent may attest again under the same ID (a fresh record).
    s.upsert_agent(&agent(1), &ev("agent.attested"))
        .await
        .unwrap();
    assert_eq!(s.list_agents().await.unwrap(), vec![agent(1), agent(2)]);
}

pub async fn agent_renew_is_conditional(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    s.upsert_agent(&agent(1), &ev("agent.attested"))
        .await
        .unwrap();
    let renewed = s
        .renew_agent(
            &agent(1).spiffe_id,
            "beef",
            NOW + 999,
            NOW + 120,
            &ev("agent.renewed"),
        )
        .await
        .unwrap();
    assert_eq!(
        (renewed.serial.as_str(), renewed.expires_at),
        ("beef", NOW + 999)
    );
    // The replaced serial is kept, honoured until the overlap ends.
    assert_eq!(
        (renewed.previous_serial.as_str(), renewed.previous_until),
        (agent(1).serial.as_str(), NOW + 120)
    );
    assert_eq!(
        renewed.created_at,
        agent(1).created_at,
        "only serial and expiry change"
    );
    assert_eq!(
        s.get_agent(&agent(1).spiffe_id).await.unwrap(),
        Some(renewed.clone())
    );
    // Banned: refused, nothing written.
    let banned = AgentRecord {
        banned: true,
        ..renewed
    };
    s.upsert_agent(&banned, &ev("agent.banned")).await.unwrap();
    assert!(matches!(
        s.renew_agent(
            &agent(1).spiffe_id,
            "cafe",
            NOW + 9999,
            NOW + 120,
            &ev("agent.renewed")
        )
        .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        s.get_agent(&agent(1).spiffe_id).await.unwrap(),
        Some(banned)
    );
    // Evicted (gone): refused, and not recreated.
    s.delete_agent(&agent(1).spiffe_id, &ev("agent.evicted"))
        .await
        .unwrap();
    assert!(matches!(
        s.renew_agent(
            &agent(1).spiffe_id,
            "cafe",
            NOW + 9999,
            NOW + 120,
            &ev("agent.renewed")
        )
        .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.get_agent(&agent(1).spiffe_id).await.unwrap(), None);
    assert_eq!(
        fx.audit_kinds().await,
        [
            "agent.attested",
            "agent.renewed",
            "agent.banned",
            "agent.evicted"
        ]
    );
}

pub async fn ca_journal(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let root = ca_key("root-1", CaKeyKind::X509Root, None, NOW);
    let int_b = ca_key(
        "int-b",
        CaKeyKind::X509Intermediate,
        Some("root-1"),
        NOW + 5,
    );
    let int_a = ca_key(
        "int-a",
        CaKeyKind::X509Intermediate,
        Some("root-1"),
        NOW + 5,
    );
    let jwt = ca_key("jwt-1", CaKeyKind::Jwt, None, NOW + 1);
    for k in [&int_b, &root, &jwt, &int_a] {
        s.insert_ca_key(k, &ev("ca_key.created")).await.unwrap();
    }
    assert!(matches!(
        s.insert_ca_key(&root, &ev("ca_key.created")).await,
        Err(StoreError::AlreadyExists(_))
    ));
    // Ordered by creation time, then id.
    assert_eq!(
        s.list_ca_keys().await.unwrap(),
        vec![root.clone(), jwt.clone(), int_a.clone(), int_b.clone()]
    );

    s.set_ca_key_state("int-a", CaKeyState::Active, &ev("ca_key.activated"))
        .await
        .unwrap();
    s.set_ca_key_state("int-a", CaKeyState::Retired, &ev("ca_key.retired"))
        .await
        .unwrap();
    s.set_ca_key_state("jwt-1", CaKeyState::Active, &ev("ca_key.activated"))
        .await
        .unwrap();
    assert!(matches!(
        s.set_ca_key_state("nope", CaKeyState::Active, &ev("ca_key.activated"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    let states: Vec<_> = s
        .list_ca_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.id, k.state))
        .collect();
    assert_eq!(
        states,
        [
            ("root-1".to_owned(), CaKeyState::Prepared),
            ("jwt-1".to_owned(), CaKeyState::Active),
            ("int-a".to_owned(), CaKeyState::Retired),
            ("int-b".to_owned(), CaKeyState::Prepared),
        ]
    );
    // A corrupt kind is reported, naming the row.
    fx.raw("UPDATE ca_keys SET kind = 'x509_leaf' WHERE id = 'int-b'")
        .await;
    assert!(matches!(
        s.list_ca_keys().await,
        Err(StoreError::Corrupt(ref why)) if why.contains("int-b") && why.contains("x509_leaf")
    ));
}

pub async fn federations_and_their_bundles(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let other = TrustDomain::new("other.org").unwrap();
    let relationship = FederationRecord {
        trust_domain: other.clone(),
        endpoint_url: "https://other.org:8443".into(),
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: "spiffe://other.org/meshid/server".into(),
        owner: String::new(),
        created_at: NOW,
        updated_at: NOW,
    };
    let bundle = |document: &str, sequence| FederatedBundle {
        trust_domain: other.clone(),
        document: document.into(),
        sequence,
        updated_at: NOW,
    };
    assert!(s.list_federations().await.unwrap().is_empty());
    // No relationship: a fetched bundle has nowhere to go.
    assert!(matches!(
        s.put_federated_bundle(&bundle("{}", 1), &ev("federation.bundle.updated"))
            .await,
        Err(StoreError::NotFound(_))
    ));
    s.create_federation(
        &relationship,
        Some(&bundle(r#"{"keys":[]}"#, 1)),
        &ev("federation.created"),
    )
    .await
    .unwrap();
    assert!(matches!(
        s.create_federation(&relationship, None, &ev("federation.created"))
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        s.list_federations().await.unwrap(),
        std::slice::from_ref(&relationship)
    );
    s.put_federated_bundle(
        &bundle(r#"{"keys":[1]}"#, 2),
        &ev("federation.bundle.updated"),
    )
    .await
    .unwrap();
    assert_eq!(
        s.list_federated_bundles().await.unwrap(),
        [bundle(r#"{"keys":[1]}"#, 2)]
    );
    // Deleting the relationship deletes its bundle; a new one starts from its own.
    assert_eq!(
        s.delete_federation(&other, &ev("federation.deleted"))
            .await
            .unwrap(),
        relationship
    );
    assert!(s.list_federated_bundles().await.unwrap().is_empty());
    assert!(matches!(
        s.delete_federation(&other, &ev("federation.deleted")).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        fx.audit_kinds().await,
        [
            "federation.created",
            "federation.bundle.updated",
            "federation.deleted"
        ]
    );
}

pub async fn deliveries_kept_per_agent_and_server(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    assert!(s.list_deliveries().await.unwrap().is_empty());
    let d = |agent: u32, server: &str, seq: u64, at: i64| meshid_ca::store::DeliveryRecord {
        agent: crate::store::fixture::agent_spiffe_id(agent),
        server_id: server.to_owned(),
        bundle_sequence: seq,
        x509_streams: seq * 10,
        reported_at: at,
        crl_digest: format!("{seq:032x}"),
        policy_revision: seq + 100,
    };
    s.record_delivery(&d(2, "ca-1", 5, NOW)).await.unwrap();
    s.record_delivery(&d(1, "ca-2", 3, NOW)).await.unwrap();
    s.record_delivery(&d(1, "ca-1", 4, NOW)).await.unwrap();
    // A later report to the same server replaces the earlier one.
    s.record_delivery(&d(1, "ca-1", 6, NOW + 1)).await.unwrap();
    assert_eq!(
        s.list_deliveries().await.unwrap(),
        vec![
            d(1, "ca-1", 6, NOW + 1),
            d(1, "ca-2", 3, NOW),
            d(2, "ca-1", 5, NOW)
        ]
    );
    // Not audited: operational state.
    assert!(s.audit_records(0, 100).await.unwrap().is_empty());
}
