//! `meshid-ca svid revoke` over a real datastore (SQLite and PostgreSQL): certificates found by
//! serial (as openssl prints it), by SPIFFE ID and by intermediate; the CRL each issuing key
//! signs lists exactly them and verifies with the issuer's key; meshid's verifier refuses what
//! it lists, at any depth; a certificate leaves the CRL once it has expired anyway;
//! refusals say why; a restart serves the same CRLs; on PostgreSQL the server that holds an
//! intermediate's key signs its CRL for a revocation recorded by another.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use meshid_api::tls::revocation::Revocations;
use meshid_api::tls::verify::PeerRole;
use meshid_api::tls::{PeerBundles, SvidVerifier};
use meshid_ca::authority::revoke::RevokeTarget;
use meshid_ca::service::Ca;
use meshid_ca::store::{CaKeyKind, CaKeyState};
use meshid_ca::svid::IssuedSvid;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::authority::{ca_on, csr, db, td};

async fn mint(ca: &Ca, id: &str, ttl: u64) -> IssuedSvid {
    ca.mint_x509(id, &csr(), ttl, &[], "admin:uid=0")
        .await
        .unwrap()
}

const ADMIN: &str = "admin:uid=0";

/// `ab:cd:...` in upper case, as openssl and `meshid-agent api fetch` print serials.
fn openssl_style(serial: &str) -> String {
    serial
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// meshid's verifier with the CA's bundle and CRLs.
fn verifier(ca: &Ca) -> SvidVerifier {
    let bundle = ca.authority.bundle();
    let v = SvidVerifier::with_bundles(
        PeerBundles::from_roots([(td(), bundle.x509_authorities.clone())]).unwrap(),
    );
    let crls: Vec<Vec<u8>> = ca
        .authority
        .crls()
        .records
        .iter()
        .map(|c| c.der.clone())
        .collect();
    v.set_revocations(Revocations::from_der(&crls).unwrap());
    v
}

fn check(v: &SvidVerifier, svid: &IssuedSvid) -> Result<(), &'static str> {
    v.verify_chain(&svid.chain, UnixTime::now(), PeerRole::Client)
        .map(|_| ())
        .map_err(|e| e.reason())
}

/// The serials a CRL lists, and whether its signature verifies with `issuer`'s key.
fn crl_of(der: &[u8], issuer: &CertificateDer<'_>) -> (Vec<String>, bool) {
    let (_, crl) = x509_parser::parse_x509_crl(der).unwrap();
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer).unwrap();
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    let signed = crl.verify_signature(issuer.public_key()).is_ok();
    (serials, signed)
}

async fn case(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_on(&db.url, "ca-1", dir.path()).await;
    let a = mint(&ca, "spiffe://example.org/web", 600).await;
    let b = mint(&ca, "spiffe://example.org/web", 600).await;
    let c = mint(&ca, "spiffe://example.org/api", 600).await;
    assert!(ca.authority.crls().records.is_empty());

    // By serial, spelled as openssl prints it.
    let out = ca
        .revoke(
            RevokeTarget::Serial(openssl_style(&a.serial)),
            ADMIN,
            "key leaked",
        )
        .await
        .unwrap();
    assert_eq!(out.revoked.len(), 1);
    assert_eq!(out.revoked[0].serial, a.serial);
    assert_eq!(out.revoked[0].issuer_id, a.issuer);
    assert_eq!(out.revoked[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(out.revoked[0].reason, "key leaked");
    let crls = ca.authority.crls();
    assert_eq!(crls.records.len(), 1);
    assert_eq!(crls.records[0].issuer_id, a.issuer);
    let (listed, signed) = crl_of(&crls.records[0].der, &a.chain[1]);
    assert_eq!(listed, vec![a.serial.clone()]);
    assert!(signed, "the CRL verifies with the intermediate's key");
    let v = verifier(&ca);
    assert_eq!(check(&v, &a), Err("revoked"));
    assert_eq!(check(&v, &b), Ok(()));
    // Again: nothing new, no new CRL.
    let number = crls.records[0].number;
    let out = ca
        .revoke(RevokeTarget::Serial(a.serial.clone()), ADMIN, "")
        .await
        .unwrap();
    assert_eq!((out.revoked.len(), out.already), (0, 1));
    assert_eq!(ca.authority.crls().records[0].number, number);

    // By SPIFFE ID: every unexpired SVID of it (a already).
    let out = ca
        .revoke(
            RevokeTarget::SpiffeId("spiffe://example.org/web".into()),
            ADMIN,
            "workload compromised",
        )
        .await
        .unwrap();
    assert_eq!((out.revoked.len(), out.already), (1, 1));
    assert_eq!(out.revoked[0].serial, b.serial);
    let crl = &ca.authority.crls().records[0];
    assert!(crl.number > number);
    let (mut listed, _) = crl_of(&crl.der, &a.chain[1]);
    listed.sort();
    let mut want = vec![a.serial.clone(), b.serial.clone()];
    want.sort();
    assert_eq!(listed, want);
    assert_eq!(check(&verifier(&ca), &b), Err("revoked"));
    assert_eq!(check(&verifier(&ca), &c), Ok(()));

    // Refusals, each with its reason.
    for (target, says) in [
        (
            RevokeTarget::Serial("zz".into()),
            "not a certificate serial",
        ),
        (RevokeTarget::Serial("01".into()), "no unexpired X.509-SVID"),
        (
            RevokeTarget::SpiffeId("spiffe://example.org/nobody".into()),
            "no unexpired X.509-SVID",
        ),
        (RevokeTarget::Key("no-such-key".into()), "no CA key"),
        (
            RevokeTarget::Key(
                ca.authority
                    .journal()
                    .iter()
                    .find(|k| k.kind == CaKeyKind::X509Root && k.state == CaKeyState::Active)
                    .unwrap()
                    .id
                    .clone(),
            ),
            "not an intermediate",
        ),
    ] {
        let err = ca.revoke(target.clone(), ADMIN, "").await.unwrap_err();
        assert!(err.to_string().contains(says), "{target:?}: {err}");
    }
    let err = ca
        .revoke(RevokeTarget::Serial(a.serial.clone()), ADMIN, "bad\nreason")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("control character"), "{err}");

    // By intermediate: its certificate on the root's CRL (so everything under it is refused at
    // any depth), and it is tainted: a fresh intermediate signs from now on.
    let out = ca
        .revoke(RevokeTarget::Key(c.issuer.clone()), ADMIN, "HSM lost")
        .await
        .unwrap();
    assert_eq!(out.revoked.len(), 1);
    assert_eq!(out.revoked[0].kind, "x509_intermediate");
    let journal = ca.authority.journal();
    let inter = journal.iter().find(|k| k.id == c.issuer).unwrap();
    assert!(inter.tainted_at > 0);
    assert_eq!(out.revoked[0].issuer_id, inter.parent_id.clone().unwrap());
    assert_eq!(check(&verifier(&ca), &c), Err("revoked"));
    let d = mint(&ca, "spiffe://example.org/api", 600).await;
    assert_ne!(d.issuer, c.issuer);
    assert_eq!(check(&verifier(&ca), &d), Ok(()));
    let root_crl = ca
        .authority
        .crls()
        .records
        .iter()
        .find(|r| Some(&r.issuer_id) == inter.parent_id.as_ref())
        .cloned()
        .unwrap();
    let root_der = journal
        .iter()
        .find(|k| Some(&k.id) == inter.parent_id.as_ref() && k.kind == CaKeyKind::X509Root)
        .unwrap()
        .public_der
        .clone();
    let (listed, signed) = crl_of(&root_crl.der, &CertificateDer::from(root_der));
    assert_eq!(listed.len(), 1);
    assert!(signed, "the root's CRL verifies with the root's key");

    // A certificate leaves its CRL once it would have expired anyway.
    let short = mint(&ca, "spiffe://example.org/batch", 2).await;
    ca.revoke(RevokeTarget::Serial(short.serial.clone()), ADMIN, "")
        .await
        .unwrap();
    let of_short = |ca: &Ca| {
        ca.authority
            .crls()
            .records
            .iter()
            .find(|r| r.issuer_id == short.issuer)
            .map(|r| crl_of(&r.der, &short.chain[1]).0)
            .unwrap_or_default()
    };
    assert!(of_short(&ca).contains(&short.serial));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(ca.authority.sign_crls().await.unwrap(), "re-signed");
    assert!(!of_short(&ca).contains(&short.serial));

    // The audit log has each step, with who, why and what.
    let records = ca.store.audit_records(0, 100_000).await.unwrap();
    let revoked: Vec<serde_json::Value> = records
        .iter()
        .filter(|r| r.kind == "svid.revoked")
        .map(|r| serde_json::from_str(&r.details).unwrap())
        .collect();
    assert_eq!(revoked.len(), 4, "one per revocation that added something");
    assert_eq!(revoked[0]["reason"], "key leaked");
    assert_eq!(revoked[0]["certificates"][0]["serial"], a.serial);
    assert!(records.iter().any(|r| r.kind == "ca.crl.signed"));
    assert!(records
        .iter()
        .filter(|r| r.kind == "svid.revoked")
        .all(|r| r.actor == ADMIN));

    // A restart serves the same CRLs.
    let before: Vec<_> = ca.authority.crls().records.clone();
    drop(ca);
    let again = ca_on(&db.url, "ca-1", dir.path()).await;
    assert_eq!(again.authority.crls().records, before);
    assert_eq!(
        again
            .store
            .list_revocations(meshid_ca::unix_now())
            .await
            .unwrap()
            .len(),
        3,
        "a, b and the intermediate; the expired one is no longer in force"
    );
}

#[tokio::test]
async fn revoke_sqlite() {
    case(false).await;
}

#[tokio::test]
async fn revoke_postgres() {
    case(true).await;
}

/// Two servers on one PostgreSQL: a revocation recorded through one, of an SVID the other
/// signed, is signed into a CRL by the server holding the key (as its change feed makes it do),
/// and then served by both.
#[tokio::test]
async fn the_key_holder_signs_the_crl_of_a_peers_revocation() {
    let Some(db) = db(true).await else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca1 = ca_on(&db.url, "ca-1", d1.path()).await;
    let ca2 = ca_on(&db.url, "ca-2", d2.path()).await;
    let svid = mint(&ca2, "spiffe://example.org/web", 600).await;
    let out = ca1
        .revoke(RevokeTarget::Serial(svid.serial.clone()), ADMIN, "")
        .await
        .unwrap();
    assert_eq!(out.revoked.len(), 1);
    // ca-1 cannot sign for ca-2's intermediate.
    assert!(ca1.authority.crls().records.is_empty());
    // ca-2 sees the revocation (the change feed calls this) and signs; ca-1 picks it up.
    ca2.refresh_crls(true).await.unwrap();
    assert_eq!(ca2.authority.crls().records.len(), 1);
    ca1.refresh_crls(false).await.unwrap();
    ca1.authority.refresh_journal().await.unwrap();
    assert_eq!(ca1.authority.crls().records, ca2.authority.crls().records);
    assert_eq!(check(&verifier(&ca1), &svid), Err("revoked"));
}
