//! The authority over a real datastore, on SQLite and on PostgreSQL: keys survive a restart,
//! intermediate and JWT key rotation never interrupt issuance and never break verification
//! against the bundle, an operator-supplied root is used as is, and every issuance is audited.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::pg;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshid_ca::authority::Authority;
use meshid_ca::config::{CaSettings, RootRotation, UpstreamAuthority};
use meshid_ca::entry::EntrySpec;
use meshid_ca::metrics::Metrics;
use meshid_ca::service::Ca;
use meshid_ca::store::sql::SqlStore;
use meshid_ca::store::{CaKeyKind, CaKeyState, Datastore};
use meshid_ca::svid::{self, CaKey, KeyType};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::{SpiffeId, TrustDomain};

/// Validates a JWT-SVID of example.org with the validator the agent's ValidateJWTSVID uses (the
/// `spiffe` crate's), against the JWT authorities of a bundle.
fn validate_jwt(
    token: &str,
    authorities: &[serde_json::Value],
    audience: &str,
) -> Result<spiffe::JwtSvid, spiffe::svid::jwt::JwtSvidError> {
    let jwks = serde_json::to_vec(&serde_json::json!({ "keys": authorities })).unwrap();
    let bundle =
        spiffe::JwtBundle::from_jwt_authorities(TrustDomain::new("example.org").unwrap(), &jwks)
            .unwrap();
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(bundle);
    spiffe::JwtSvid::parse_and_validate(token, &set, &[audience])
}

pub(crate) fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

pub(crate) fn settings(intermediate: u64) -> CaSettings {
    CaSettings {
        key_type: KeyType::EcP256,
        root_ttl: Duration::from_secs(3600),
        intermediate_ttl: Duration::from_secs(intermediate),
        jwt_key_ttl: Duration::from_secs(intermediate),
        default_x509_svid_ttl: Duration::from_secs(2),
        default_jwt_svid_ttl: Duration::from_secs(30),
        rotation_interval: Duration::from_millis(100),
        upstream: None,
        bundle_refresh_hint: Duration::from_secs(300),
        jwt_issuer: None,
        jwt_key_type: Default::default(),
        max_jwt_svid_ttl: meshid_ca::entry::MAX_JWT_TTL,
        root_rotation: RootRotation::Manual,
    }
}

/// A database on the chosen backend that lives as long as the guard.
pub(crate) struct Db {
    pub(crate) url: String,
    _pg: Option<pg::PgDatabase>,
    _dir: tempfile::TempDir,
}

pub(crate) async fn db(postgres: bool) -> Option<Db> {
    let dir = tempfile::tempdir().unwrap();
    if postgres {
        let pg = pg::fresh_database().await?;
        Some(Db {
            url: pg.url.clone(),
            _pg: Some(pg),
            _dir: dir,
        })
    } else {
        Some(Db {
            url: format!("sqlite://{}", dir.path().join("ca.db").display()),
            _pg: None,
            _dir: dir,
        })
    }
}

/// A CA service over the datastore at `url`, with the keys in `dir`, as server `server`.
pub(crate) async fn ca_with(url: &str, server: &str, settings: CaSettings, dir: &Path) -> Ca {
    let store = open(url).await;
    let authority = Authority::load_or_init(td(), server.into(), settings, dir, Arc::clone(&store))
        .await
        .unwrap();
    Ca::new(
        Arc::new(authority),
        store,
        Arc::new(Metrics::new()),
        Duration::from_secs(600),
    )
}

/// [`ca_with`] with the test settings (intermediates of 600 s).
pub(crate) async fn ca_on(url: &str, server: &str, dir: &Path) -> Ca {
    ca_with(url, server, settings(600), dir).await
}

pub(crate) async fn open(url: &str) -> Arc<dyn Datastore> {
    Arc::new(SqlStore::open(url).await.unwrap())
}

/// Server `ca-1` of example.org on `store`, keys under `dir`.
async fn load(
    settings: CaSettings,
    dir: &Path,
    store: Arc<dyn Datastore>,
) -> Result<Authority, meshid_ca::authority::AuthorityError> {
    Authority::load_or_init(td(), "ca-1".into(), settings, dir, store).await
}

pub(crate) fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://example.org/admin".try_into().unwrap(),
    ));
    params.serialize_request(&key).unwrap().der().to_vec()
}

pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

pub(crate) fn verify(
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    at: i64,
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(Duration::from_secs(at as u64)),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}

async fn restart_keeps_keys_case(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let data = tempfile::tempdir().unwrap();
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();

    let store = open(&db.url).await;
    let a1 = load(settings(3600), data.path(), Arc::clone(&store))
        .await
        .unwrap();
    let bundle1 = a1.bundle();
    let journal1 = a1.journal();
    let svid = a1
        .sign_x509_svid(&csr(), &id, &[], Some(Duration::from_secs(600)))
        .unwrap();
    let (token, _) = a1
        .mint_jwt_svid(&id, &["billing".to_owned()], None)
        .unwrap();
    let created = meshid_ca::store::verify_audit(store.as_ref())
        .await
        .unwrap();
    drop(a1);
    drop(store);

    // Key files are private.
    for f in std::fs::read_dir(data.path().join("keys")).unwrap() {
        let f = f.unwrap().path();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }

    let store = open(&db.url).await;
    let a2 = load(settings(3600), data.path(), Arc::clone(&store))
        .await
        .unwrap();
    let bundle2 = a2.bundle();
    assert_eq!(
        bundle1.to_spiffe_json(),
        bundle2.to_spiffe_json(),
        "same bundle after restart"
    );
    assert_eq!(
        journal1,
        a2.journal(),
        "no key created or changed by a restart"
    );
    assert_eq!(
        meshid_ca::store::verify_audit(store.as_ref())
            .await
            .unwrap(),
        created,
        "a restart writes no key records"
    );
    // What the first instance issued verifies against the second's bundle.
    verify(
        &bundle2.x509_authorities,
        &svid.chain,
        unix(SystemTime::now()),
    )
    .unwrap();
    validate_jwt(&token, &bundle2.jwt_authorities, "billing").unwrap();
    // And the second issues from the same intermediate.
    let again = a2.sign_x509_svid(&csr(), &id, &[], None).unwrap();
    assert_eq!(again.chain[1], svid.chain[1]);

    // A wider mode on a key file is refused rather than silently used.
    let key = std::fs::read_dir(data.path().join("keys"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(a2);
    let err = load(settings(3600), data.path(), Arc::clone(&store))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[tokio::test]
async fn restart_keeps_keys_sqlite() {
    restart_keeps_keys_case(false).await;
}

#[tokio::test]
async fn restart_keeps_keys_postgres() {
    restart_keeps_keys_case(true).await;
}

/// Intermediates of 6 s, JWT keys of 6 s: over 9 s of continuous issuance, at least one
/// intermediate and one JWT key are activated; no signing call fails; every SVID and JWT
/// verifies against the bundle, whose roots never change.
async fn rotation_under_issuance_case(postgres: bool) {
    let Some(db) = db(postgres).await else { return };
    let data = tempfile::tempdir().unwrap();
    let store = open(&db.url).await;
    let a = load(settings(6), data.path(), Arc::clone(&store))
        .await
        .unwrap();
    let roots = a.bundle().x509_authorities;
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    let csr = csr();
    let mut issued = Vec::new();
    let mut tokens = Vec::new();
    let mut activations = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        let out = a.rotate(SystemTime::now()).await.unwrap();
        activations += out.activated.len();
        let now = unix(SystemTime::now());
        let svid = a
            .sign_x509_svid(&csr, &id, &[], None)
            .expect("issuance never stops");
        verify(&roots, &svid.chain, now).expect("verifies when issued");
        let issuer_not_after = x509_parser::parse_x509_certificate(&svid.chain[1])
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp();
        assert!(
            svid.not_after <= issuer_not_after,
            "SVID outlives its issuer"
        );
        issued.push(svid);
        let (t, _) = a.mint_jwt_svid(&id, &["svc".to_owned()], None).unwrap();
        tokens.push(t);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let distinct: std::collections::HashSet<_> =
        issued.iter().map(|s| s.chain[1].to_vec()).collect();
    assert!(
        distinct.len() >= 2,
        "the intermediate rotated ({} seen)",
        distinct.len()
    );
    assert!(
        activations >= 2,
        "intermediate and JWT key activated: {activations}"
    );
    let bundle = a.bundle();
    assert_eq!(
        bundle.x509_authorities, roots,
        "roots unchanged by intermediate rotation"
    );
    // Every JWT minted during the run, by every JWT key, still verifies with today's bundle.
    let kids: std::collections::HashSet<_> = bundle
        .jwt_authorities
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        kids.len() >= 2,
        "old and new JWT keys are both published: {kids:?}"
    );
    for t in &tokens {
        validate_jwt(t, &bundle.jwt_authorities, "svc").unwrap();
    }
    // The journal agrees: one active intermediate and JWT key, the replaced ones retired.
    let journal = store.list_ca_keys().await.unwrap();
    for kind in [CaKeyKind::X509Intermediate, CaKeyKind::Jwt] {
        let active = journal
            .iter()
            .filter(|k| k.kind == kind && k.state == CaKeyState::Active)
            .count();
        let retired = journal
            .iter()
            .filter(|k| k.kind == kind && k.state == CaKeyState::Retired)
            .count();
        assert_eq!(active, 1, "{kind:?}");
        assert!(retired >= 1, "{kind:?}");
    }
    meshid_ca::store::verify_audit(store.as_ref())
        .await
        .unwrap();

    // A restart in the middle of a rotation picks up the prepared key rather than making another.
    drop(a);
    let a = load(settings(6), data.path(), Arc::clone(&store))
        .await
        .unwrap();
    let after = a.sign_x509_svid(&csr, &id, &[], None).unwrap();
    verify(&roots, &after.chain, unix(SystemTime::now())).unwrap();
}

#[tokio::test]
async fn rotation_under_issuance_sqlite() {
    rotation_under_issuance_case(false).await;
}

#[tokio::test]
async fn rotation_under_issuance_postgres() {
    rotation_under_issuance_case(true).await;
}

pub(crate) fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(contents.as_bytes()).unwrap();
}

#[tokio::test]
async fn upstream_root_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let key = CaKey::generate(KeyType::EcP384).unwrap();
    let root =
        svid::generate_root(&td(), &key, Duration::from_secs(7200), SystemTime::now()).unwrap();
    let cert_path = dir.path().join("root.pem");
    let key_path = dir.path().join("root.key");
    std::fs::write(&cert_path, pem(&root)).unwrap();
    write_private(&key_path, &key.to_pkcs8_pem());
    let mut s = settings(3600);
    s.upstream = Some(UpstreamAuthority {
        cert: cert_path,
        key: key_path.clone(),
    });
    let store = open(&format!("sqlite://{}", dir.path().join("ca.db").display())).await;
    let a = load(s.clone(), &dir.path().join("data"), Arc::clone(&store))
        .await
        .unwrap();
    assert_eq!(a.bundle().x509_authorities, vec![root.clone()]);
    let svid = a
        .sign_x509_svid(
            &csr(),
            &SpiffeId::new("spiffe://example.org/x").unwrap(),
            &[],
            None,
        )
        .unwrap();
    verify(&[root], &svid.chain, unix(SystemTime::now())).unwrap();
    // The upstream key never gets copied into the data directory.
    let copied = std::fs::read_dir(dir.path().join("data/keys"))
        .unwrap()
        .any(|f| std::fs::read_to_string(f.unwrap().path()).unwrap() == *key.to_pkcs8_pem());
    assert!(!copied);
    // A mismatched key is refused.
    let other = CaKey::generate(KeyType::EcP384).unwrap();
    write_private(&key_path, &other.to_pkcs8_pem());
    drop(a);
    let err = load(s, &dir.path().join("data"), store).await.unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
}

pub(crate) fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<_> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// Issuance for an entry takes the identity and DNS names from the entry (the CSR asks for
/// others), and lands in the audit log with serial, SPIFFE ID, entry, caller and not_after.
#[tokio::test]
async fn issuance_for_an_entry_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&format!("sqlite://{}", dir.path().join("ca.db").display())).await;
    let authority = load(settings(3600), dir.path(), Arc::clone(&store))
        .await
        .unwrap();
    let ca = Ca::new(
        Arc::new(authority),
        Arc::clone(&store),
        Arc::new(Metrics::new()),
        Duration::from_secs(600),
    );
    let entry = ca
        .create_entry(
            &EntrySpec {
                spiffe_id: "spiffe://example.org/web".into(),
                parent_id: "spiffe://example.org/meshid/agent/a".into(),
                selectors: vec!["unix:uid:1000".into()],
                dns_names: vec!["web.internal".into()],
                x509_svid_ttl: 120,
                ..Default::default()
            },
            "admin:uid=0",
        )
        .await
        .unwrap();
    let svid = ca
        .issue_for_entry(&entry, &csr(), "spiffe://example.org/meshid/agent/a")
        .await
        .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        names,
        vec![
            "URI(spiffe://example.org/web)".to_owned(),
            "DNSName(web.internal)".to_owned()
        ],
        "identity from the entry only"
    );
    assert!(svid.not_after - unix(SystemTime::now()) <= 120);

    let records = store.audit_records(0, 1000).await.unwrap();
    let rec = records
        .iter()
        .find(|r| r.kind == "svid.x509.issued")
        .expect("issuance audited");
    let d: serde_json::Value = serde_json::from_str(&rec.details).unwrap();
    assert_eq!(d["serial"], svid.serial.as_str());
    assert_eq!(d["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(d["entry_id"], entry.id.as_str());
    assert_eq!(d["not_after"], svid.not_after);
    assert_eq!(rec.actor, "spiffe://example.org/meshid/agent/a");

    // A malformed CSR is refused, counted and not audited.
    let before = store.audit_records(0, 1000).await.unwrap().len();
    let err = ca
        .issue_for_entry(&entry, b"not a csr", "x")
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("csr"), "{err}");
    assert_eq!(store.audit_records(0, 1000).await.unwrap().len(), before);
    assert!(ca
        .metrics
        .encode()
        .contains("meshid_ca_svids_signed_total{kind=\"x509\",result=\"error\"} 1"));

    // Join tokens: single use, expiry, audited by id, never by secret.
    let tok = ca.generate_token(0, "admin:uid=0").await.unwrap();
    ca.consume_token(tok.secret(), "node").await.unwrap();
    let err = ca.consume_token(tok.secret(), "node").await.unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
    let all = store.audit_records(0, 1000).await.unwrap();
    assert!(all
        .iter()
        .any(|r| r.kind == "token.used" && r.details.contains(&tok.record.id)));
    assert!(all.iter().all(|r| !r.details.contains(tok.secret())));
}

/// Two CA servers sharing one PostgreSQL database and one upstream root (the HA setup): each
/// issues from its own intermediate, and what either issues verifies against the other's
/// bundle, JWT-SVIDs included.
#[tokio::test]
async fn two_servers_share_a_postgres_trust_domain() {
    let Some(db) = db(true).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = CaKey::generate(KeyType::EcP256).unwrap();
    let root =
        svid::generate_root(&td(), &key, Duration::from_secs(7200), SystemTime::now()).unwrap();
    std::fs::write(dir.path().join("root.pem"), pem(&root)).unwrap();
    write_private(&dir.path().join("root.key"), &key.to_pkcs8_pem());
    let mut s = settings(3600);
    s.upstream = Some(UpstreamAuthority {
        cert: dir.path().join("root.pem"),
        key: dir.path().join("root.key"),
    });
    let store1 = open(&db.url).await;
    let store2 = open(&db.url).await;
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let (a1, a2) = tokio::join!(
        Authority::load_or_init(td(), "ca-1".into(), s.clone(), &one, Arc::clone(&store1)),
        Authority::load_or_init(td(), "ca-2".into(), s.clone(), &two, Arc::clone(&store2)),
    );
    let (a1, a2) = (a1.unwrap(), a2.unwrap());
    a1.refresh_journal().await.unwrap();
    a2.refresh_journal().await.unwrap();
    let id = SpiffeId::new("spiffe://example.org/web").unwrap();
    let s1 = a1.sign_x509_svid(&csr(), &id, &[], None).unwrap();
    let s2 = a2.sign_x509_svid(&csr(), &id, &[], None).unwrap();
    assert_ne!(
        s1.chain[1], s2.chain[1],
        "each server has its own intermediate"
    );
    let now = unix(SystemTime::now());
    for bundle in [a1.bundle(), a2.bundle()] {
        assert_eq!(bundle.x509_authorities, vec![root.clone()]);
        verify(&bundle.x509_authorities, &s1.chain, now).unwrap();
        verify(&bundle.x509_authorities, &s2.chain, now).unwrap();
    }
    assert_eq!(
        a1.bundle().to_spiffe_json(),
        a2.bundle().to_spiffe_json(),
        "both servers publish the same bundle"
    );
    let (t1, _) = a1.mint_jwt_svid(&id, &["x".to_owned()], None).unwrap();
    validate_jwt(&t1, &a2.bundle().jwt_authorities, "x").unwrap();
    // One audit chain for both servers, intact.
    meshid_ca::store::verify_audit(store1.as_ref())
        .await
        .unwrap();
}
