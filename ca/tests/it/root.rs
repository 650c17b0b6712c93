//! The trust anchor's rotation in phases, over a real datastore (SQLite and PostgreSQL): prepare
//! adds the next root to the bundle under a new sequence; activate is refused, naming them,
//! while live agents have not delivered it, and `--force` is on the record; SVIDs issued after
//! activation verify against the new root alone *and* against the old root alone (through the
//! cross-signed root); retire is refused while the issuance records show an unexpired SVID
//! under the old root, and then removes it. With two CA servers, the second follows the first's
//! activation, and retirement waits for it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_ca::audit::AuditEvent;
use meshid_ca::authority::Authority;
use meshid_ca::metrics::Metrics;
use meshid_ca::service::Ca;
use meshid_ca::store::{AgentRecord, CaKeyKind, CaKeyState, Datastore, DeliveryRecord};
use meshid_ca::svid::{self, CaKey, KeyType};
use rustls_pki_types::CertificateDer;
use spiffe::SpiffeId;

use crate::authority::{ca_with, csr, db, open, pem, settings, td, unix, verify, write_private};

fn agent(n: u32) -> SpiffeId {
    SpiffeId::new(format!("spiffe://example.org/meshid/agent/join_token/a{n}")).unwrap()
}

async fn add_agent(store: &dyn Datastore, n: u32, banned: bool, expires_in: i64) {
    let now = unix(SystemTime::now());
    let rec = AgentRecord {
        spiffe_id: agent(n),
        attestation_type: "join_token".into(),
        serial: format!("{n:02x}"),
        expires_at: now + expires_in,
        created_at: now,
        banned,
        previous_serial: String::new(),
        previous_until: 0,
    };
    store
        .upsert_agent(
            &rec,
            &AuditEvent::new(
                "agent.attested",
                "test",
                serde_json::json!({"not_after": 0}),
            ),
        )
        .await
        .unwrap();
}

async fn deliver(store: &dyn Datastore, n: u32, server: &str, sequence: u64) {
    store
        .record_delivery(&DeliveryRecord {
            agent: agent(n),
            server_id: server.into(),
            bundle_sequence: sequence,
            x509_streams: 1,
            reported_at: unix(SystemTime::now()),
            crl_digest: String::new(),
            policy_revision: 0,
        })
        .await
        .unwrap();
}

async fn ca_on(url: &str, server: &str, dir: &Path) -> Ca {
    let mut s = settings(600);
    s.default_x509_svid_ttl = Duration::from_secs(2);
    ca_with(url, server, s, dir).await
}

/// The `kid` of a JWT's header.
fn token_kid(token: &str) -> String {
    use base64::Engine as _;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&header).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

/// An X.509-SVID issued (and recorded) by the CA service, for 2 s.
async fn issue(ca: &Ca) -> svid::IssuedSvid {
    ca.mint_x509("spiffe://example.org/web", &csr(), 2, &[], "admin:uid=0")
        .await
        .unwrap()
}

fn roots(ca: &Ca, state: CaKeyState) -> Vec<CertificateDer<'static>> {
    ca.authority
        .journal()
        .into_iter()
        .filter(|k| k.kind == CaKeyKind::X509Root && k.state == state)
        .map(|k| CertificateDer::from(k.public_der))
        .collect()
}

async fn audit_kinds(ca: &Ca) -> Vec<(String, serde_json::Value)> {
    ca.store
        .audit_records(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind.starts_with("ca.root"))
        .map(|r| (r.kind, serde_json::from_str(&r.details).unwrap()))
        .collect()
}

async fn full_cycle_case(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let old_root = roots(&ca, CaKeyState::Active);
    assert_eq!(old_root.len(), 1);
    let before = issue(&ca).await;
    assert_eq!(
        before.chain.len(),
        2,
        "leaf and intermediate, nothing above"
    );

    // Two live agents; a banned one and one whose SVID expired do not count.
    add_agent(ca.store.as_ref(), 1, false, 3600).await;
    add_agent(ca.store.as_ref(), 2, false, 3600).await;
    add_agent(ca.store.as_ref(), 3, true, 3600).await;
    add_agent(ca.store.as_ref(), 4, false, -10).await;

    // Prepare: the next root joins the bundle under a new sequence.
    let sequence_before = ca.authority.bundle().sequence;
    let jwt_keys_before = ca.authority.bundle().jwt_authorities.len();
    let active_jwt = |ca: &Ca| {
        ca.authority
            .journal()
            .into_iter()
            .find(|k| k.kind == CaKeyKind::Jwt && k.state == CaKeyState::Active)
            .unwrap()
            .id
    };
    let old_jwt = active_jwt(&ca);
    let next = ca
        .root_prepare(None, "admin:uid=0", "yearly rotation")
        .await
        .unwrap();
    let bundle = ca.authority.bundle();
    assert_eq!(bundle.x509_authorities.len(), 2);
    assert!(bundle
        .x509_authorities
        .contains(&CertificateDer::from(next.public_der.clone())));
    assert!(bundle.sequence > sequence_before);
    assert_eq!(bundle.sequence, next.created_at as u64);
    assert_eq!(
        bundle.jwt_authorities.len(),
        jwt_keys_before + 1,
        "the next JWT key is published with the next root"
    );
    let err = ca
        .root_prepare(None, "admin:uid=0", "twice")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already prepared"), "{err}");
    // Still issuing under the old root until activation.
    let during = issue(&ca).await;
    verify(&old_root, &during.chain, unix(SystemTime::now())).unwrap();

    // Activate: refused while a live agent has not delivered the sequence, naming it.
    let status = ca.root_status().await.unwrap();
    assert_eq!(status.phase.as_str(), "prepared");
    assert_eq!((status.live_agents, status.acknowledged), (2, 0));
    let err = ca
        .root_activate("admin:uid=0", "", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&agent(1).to_string()) && err.contains(&agent(2).to_string()),
        "{err}"
    );
    assert!(
        err.contains("never reported") && err.contains("--force"),
        "{err}"
    );
    assert!(
        !err.contains(&agent(3).to_string()) && !err.contains(&agent(4).to_string()),
        "{err}"
    );
    deliver(ca.store.as_ref(), 1, "ca-1", bundle.sequence).await;
    deliver(ca.store.as_ref(), 2, "ca-1", bundle.sequence - 1).await;
    let err = ca
        .root_activate("admin:uid=0", "", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains(&agent(1).to_string()), "{err}");
    assert!(
        err.contains(&format!("{} (delivered {}", agent(2), bundle.sequence - 1)),
        "{err}"
    );
    assert!(err.contains("1 of 2 live agents"), "{err}");
    assert_eq!(roots(&ca, CaKeyState::Prepared).len(), 1, "nothing changed");
    deliver(ca.store.as_ref(), 2, "ca-2", bundle.sequence).await;
    let activation = ca
        .root_activate("admin:uid=0", "scheduled", false)
        .await
        .unwrap();
    assert!(!activation.forced);
    assert_eq!(activation.root_id, next.id);
    assert_eq!(roots(&ca, CaKeyState::Superseded), old_root);
    // The JWT key moved with it; the old kid stays published for the tokens it signed.
    assert_ne!(active_jwt(&ca), old_jwt);
    let (token, _) = ca
        .authority
        .mint_jwt_svid(
            &SpiffeId::new("spiffe://example.org/web").unwrap(),
            &["x".into()],
            None,
        )
        .unwrap();
    assert!(token_kid(&token) == active_jwt(&ca).trim_start_matches("jwt-"));
    assert!(ca
        .authority
        .bundle()
        .jwt_authorities
        .iter()
        .any(|k| k["kid"] == old_jwt.trim_start_matches("jwt-")));

    // After activation: new SVIDs chain to the new root, and through the cross-signed root to
    // the old one, so a peer holding either root alone verifies them.
    let new_root = vec![CertificateDer::from(next.public_der.clone())];
    let after = issue(&ca).await;
    assert_eq!(
        after.chain.len(),
        3,
        "leaf, intermediate, cross-signed root"
    );
    let now = unix(SystemTime::now());
    verify(&new_root, &after.chain, now).unwrap();
    verify(&old_root, &after.chain, now).unwrap();
    verify(&ca.authority.bundle().x509_authorities, &after.chain, now).unwrap();
    assert!(verify(&new_root, &during.chain, now).is_err());
    assert_eq!(
        ca.authority.bundle().x509_authorities.len(),
        2,
        "both trusted"
    );

    // Retire: refused while an SVID signed under the old root is unexpired.
    let err = ca
        .root_retire("admin:uid=0", "")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unexpired"), "{err}");
    let status = ca.root_status().await.unwrap();
    assert_eq!(status.phase.as_str(), "activated");
    assert!(status.retire.unexpired >= 2, "{:?}", status.retire);
    assert!(status.retire.last_expiry >= during.not_after);
    // Once they expired (2 s lifetimes), it is allowed.
    tokio::time::sleep(Duration::from_secs(
        (during.not_after - unix(SystemTime::now()) + 1).max(0) as u64,
    ))
    .await;
    let sequence_before = ca.authority.bundle().sequence;
    let retired = ca
        .root_retire("admin:uid=0", "old root done")
        .await
        .unwrap();
    assert_eq!(retired.len(), 1);
    let bundle = ca.authority.bundle();
    assert_eq!(bundle.x509_authorities, new_root);
    assert!(bundle.sequence > sequence_before);
    let last = issue(&ca).await;
    assert_eq!(
        last.chain.len(),
        2,
        "the cross-signed root leaves the chain"
    );
    verify(&new_root, &last.chain, unix(SystemTime::now())).unwrap();
    assert_eq!(ca.root_status().await.unwrap().phase.as_str(), "stable");

    // Every step is on the record: who, why, what was measured.
    let records = audit_kinds(&ca).await;
    let kinds: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
    for kind in [
        "ca.root.prepared",
        "ca.root.cross_signed",
        "ca.root.activated",
        "ca.root.superseded",
        "ca.root.retired",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let activated = &records
        .iter()
        .find(|(k, _)| k == "ca.root.activated")
        .unwrap()
        .1;
    assert_eq!(activated["reason"], "scheduled");
    assert_eq!(activated["forced"], false);
    assert_eq!(activated["agents_acknowledged"], 2);
    assert!(activated["acknowledged_within_s"].is_i64(), "{activated}");
    meshid_ca::store::verify_audit(ca.store.as_ref())
        .await
        .unwrap();

    // A restart keeps issuing under the new root.
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let again = issue(&ca).await;
    verify(&new_root, &again.chain, unix(SystemTime::now())).unwrap();
}

#[tokio::test]
async fn full_cycle_sqlite() {
    full_cycle_case(false).await;
}

#[tokio::test]
async fn full_cycle_postgres() {
    full_cycle_case(true).await;
}

/// `--force` activates past lagging agents, and the audit record names them.
#[tokio::test]
async fn forced_activation_is_on_the_record() {
    let Some(db) = db(false).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    add_agent(ca.store.as_ref(), 1, false, 3600).await;
    ca.root_prepare(None, "admin:uid=0", "").await.unwrap();
    let a = ca
        .root_activate("admin:uid=0", "incident 42", true)
        .await
        .unwrap();
    assert!(a.forced);
    assert_eq!(a.lagging, vec![agent(1).to_string()]);
    let records = audit_kinds(&ca).await;
    let activated = &records
        .iter()
        .find(|(k, _)| k == "ca.root.activated")
        .unwrap()
        .1;
    assert_eq!(activated["forced"], true);
    assert_eq!(activated["lagging"][0], agent(1).to_string());
    assert_eq!(activated["reason"], "incident 42");
    // Nothing to activate or retire out of turn.
    let err = ca
        .root_activate("admin:uid=0", "", false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no root is prepared"), "{err}");
    let err = ca
        .root_prepare(None, "admin:uid=0", "bad\nreason")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("control character"), "{err}");
}

/// An activation that stopped half-way (the new root made active, then the datastore failed
/// before the old one was superseded) is finished by the next `activate`, which needs no
/// `--force` for a gate the first one passed.
#[tokio::test]
async fn a_half_done_activation_is_finished_by_the_next() {
    let Some(db) = db(false).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let next = ca.root_prepare(None, "admin:uid=0", "").await.unwrap();
    add_agent(ca.store.as_ref(), 1, false, 3600).await;
    ca.store
        .transition_ca_key(
            &next.id,
            Some(CaKeyState::Prepared),
            CaKeyState::Active,
            unix(SystemTime::now()),
            &AuditEvent::new("ca.root.activated", "test", serde_json::json!({})),
        )
        .await
        .unwrap();
    ca.authority.rotate(SystemTime::now()).await.unwrap();
    let a = ca.root_activate("admin:uid=0", "", false).await.unwrap();
    assert_eq!(a.root_id, next.id);
    assert_eq!(a.superseded.len(), 1);
    assert_eq!(roots(&ca, CaKeyState::Active).len(), 1);
    assert_eq!(roots(&ca, CaKeyState::Superseded).len(), 1);
    let err = ca
        .root_activate("admin:uid=0", "", false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no root is prepared"), "{err}");
}

/// Two CA servers on one PostgreSQL, with the operator's roots on paths both read: an
/// activation through one is followed by the other (a new intermediate under the new root),
/// and retirement waits until both issue under it.
#[tokio::test]
async fn two_servers_follow_an_operator_root() {
    let Some(db) = db(true).await else { return };
    let keys = tempfile::tempdir().unwrap();
    let make_root = |name: &str| {
        let key = CaKey::generate(KeyType::EcP256).unwrap();
        let der =
            svid::generate_root(&td(), &key, Duration::from_secs(7200), SystemTime::now()).unwrap();
        std::fs::write(keys.path().join(format!("{name}.pem")), pem(&der)).unwrap();
        write_private(
            &keys.path().join(format!("{name}.key")),
            &key.to_pkcs8_pem(),
        );
        der
    };
    let first = make_root("first");
    let second = make_root("second");
    let upstream = |name: &str| meshid_ca::config::UpstreamAuthority {
        cert: keys.path().join(format!("{name}.pem")),
        key: keys.path().join(format!("{name}.key")),
    };
    let open_server = |server: &'static str, dir: std::path::PathBuf| {
        let url = db.url.clone();
        let up = upstream("first");
        async move {
            let store = open(&url).await;
            let mut s = settings(600);
            s.upstream = Some(up);
            s.default_x509_svid_ttl = Duration::from_secs(2);
            let a = Authority::load_or_init(td(), server.into(), s, &dir, Arc::clone(&store))
                .await
                .unwrap();
            Ca::new(
                Arc::new(a),
                store,
                Arc::new(Metrics::new()),
                Duration::from_secs(600),
            )
        }
    };
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let one = open_server("ca-1", d1.path().to_owned()).await;
    let two = open_server("ca-2", d2.path().to_owned()).await;
    let before = issue(&two).await;

    one.root_prepare(
        Some((
            keys.path().join("second.pem"),
            keys.path().join("second.key"),
        )),
        "admin:uid=0",
        "operator root",
    )
    .await
    .unwrap();
    two.authority.rotate(SystemTime::now()).await.unwrap();
    assert_eq!(
        two.authority.bundle().x509_authorities.len(),
        2,
        "ca-2 publishes both"
    );
    assert_eq!(
        one.authority.bundle().to_spiffe_json(),
        two.authority.bundle().to_spiffe_json()
    );
    one.root_activate("admin:uid=0", "", false).await.unwrap();
    // ca-2 has not followed yet: retirement waits for it (and for its SVIDs).
    let status = one.root_status().await.unwrap();
    assert!(
        status.retire.blockers.iter().any(|b| b.contains("ca-2")),
        "{:?}",
        status.retire
    );
    two.authority.rotate(SystemTime::now()).await.unwrap();
    let from_two = issue(&two).await;
    let now = unix(SystemTime::now());
    verify(std::slice::from_ref(&second), &from_two.chain, now).unwrap();
    verify(std::slice::from_ref(&first), &from_two.chain, now).unwrap();
    assert!(verify(std::slice::from_ref(&second), &before.chain, now).is_err());
    // The operator's key was read where it is, never copied.
    for d in [d1.path(), d2.path()] {
        let copied = std::fs::read_dir(d.join("keys"))
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("upstream-"));
        assert!(!copied);
    }
    tokio::time::sleep(Duration::from_secs(
        (before.not_after.max(from_two.not_after) - now + 1).max(0) as u64,
    ))
    .await;
    // ca-2's own SVIDs under the new root do not block; the old ones expired.
    let status = one.root_status().await.unwrap();
    assert!(status.retire.blockers.is_empty(), "{:?}", status.retire);
    one.root_retire("admin:uid=0", "").await.unwrap();
    two.authority.rotate(SystemTime::now()).await.unwrap();
    assert_eq!(
        two.authority.bundle().x509_authorities,
        vec![second.clone()]
    );
    // A restart of ca-2 with its configuration still naming the first root: it keeps the
    // active (second) root, found through the path recorded with it.
    drop(two);
    let two = open_server("ca-2", d2.path().to_owned()).await;
    let svid = issue(&two).await;
    verify(&[second], &svid.chain, unix(SystemTime::now())).unwrap();
}
