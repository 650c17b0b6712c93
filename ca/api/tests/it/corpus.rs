#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The checked-in corpus of malformed X509-SVIDs (`tests/testdata/svid/`, one file per
//! specification violation, see its README.md) against [`SvidVerifier`] and in real rustls
//! handshakes through [`ClientVerifier`] and [`ServerVerifier`].
//!
//! Certificates embed random keys and serials, so the corpus is not regenerated on every run:
//! `MESHID_BLESS=1 cargo test -p meshid-api --test it corpus` rewrites it (reusing
//! `root.*.pem` and `other-root.*.pem` when present; delete them to mint new roots), and
//! otherwise the tests load the files as checked in.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use meshid_api::tls::verify::{
    failure_reason, io_failure_reason, peer_error, peer_spiffe_id, ClientVerifier, PeerBundles,
    PeerRole, ServerVerifier, SvidVerifier,
};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use spiffe::{SpiffeId, TrustDomain};

/// One corpus file: what it violates, what [`SvidVerifier::verify`] says (`None`: verifies) and
/// what the server side of a handshake says when a client presents it (`None`: completes).
struct Case {
    file: &'static str,
    violation: &'static str,
    verify: Option<&'static str>,
    handshake: Option<&'static str>,
}

const fn case(
    file: &'static str,
    violation: &'static str,
    verify: Option<&'static str>,
    handshake: Option<&'static str>,
) -> Case {
    Case {
        file,
        violation,
        verify,
        handshake,
    }
}

const CASES: &[Case] = &[
    case(
        "valid.pem",
        "none (control): spiffe://example.org/corpus/valid, CA:FALSE, digitalSignature, EKU serverAuth+clientAuth",
        None,
        None,
    ),
    case("expired.pem", "validity 2025-01-01..2025-01-02", Some("expired"), Some("expired")),
    case(
        "not-yet-valid.pem",
        "validity 2120-01-01..2121-01-01",
        Some("not_yet_valid"),
        Some("not_yet_valid"),
    ),
    case(
        "two-uri-sans.pem",
        "two URI SANs (X509-SVID 2: exactly one)",
        Some("multiple_uri_sans"),
        Some("multiple_uri_sans"),
    ),
    case(
        "no-uri-san.pem",
        "no URI SAN, only a DNS SAN",
        Some("no_uri_san"),
        Some("no_uri_san"),
    ),
    case(
        "non-spiffe-uri.pem",
        "URI SAN https://example.org/corpus/non-spiffe-uri",
        Some("not_spiffe_id"),
        Some("not_spiffe_id"),
    ),
    case(
        "spiffe-id-without-path.pem",
        "URI SAN spiffe://example.org: no path (X509-SVID 3.1)",
        Some("not_spiffe_id"),
        Some("not_spiffe_id"),
    ),
    case(
        "uppercase-trust-domain.pem",
        "URI SAN spiffe://EXAMPLE.org/...: not a canonical SPIFFE ID",
        Some("not_spiffe_id"),
        Some("not_spiffe_id"),
    ),
    case(
        "signed-by-leaf.pem",
        "issued by valid.pem's leaf (CA:FALSE); chain [leaf, valid.pem's certificate]",
        Some("untrusted"),
        Some("untrusted"),
    ),
    case(
        "leaf-is-ca.pem",
        "leaf with basicConstraints CA:TRUE",
        Some("leaf_is_ca"),
        Some("leaf_is_ca"),
    ),
    case(
        "leaf-key-cert-sign.pem",
        "leaf keyUsage digitalSignature+keyCertSign",
        Some("key_usage"),
        Some("key_usage"),
    ),
    case(
        "leaf-no-digital-signature.pem",
        "leaf keyUsage keyEncipherment only",
        Some("key_usage"),
        Some("key_usage"),
    ),
    case(
        "leaf-no-key-usage.pem",
        "leaf without a keyUsage extension (X509-SVID 4.3: MUST be set)",
        Some("key_usage"),
        Some("key_usage"),
    ),
    case(
        "other-trust-domain.pem",
        "spiffe://other.test/corpus/x issued by other-root.crt.pem, not federated",
        Some("unknown_trust_domain"),
        Some("unknown_trust_domain"),
    ),
    case(
        "foreign-root-claims-local.pem",
        "spiffe://example.org/corpus/x issued by other-root.crt.pem",
        Some("untrusted"),
        Some("untrusted"),
    ),
    case(
        "self-signed.pem",
        "leaf-shaped SVID signed by its own key",
        Some("untrusted"),
        Some("untrusted"),
    ),
    case(
        "wrong-key.pem",
        "well-formed chain, but the private key is not the certificate's: the chain verifies, the handshake signature does not",
        None,
        Some("untrusted"),
    ),
];

const VALID_ID: &str = "spiffe://example.org/corpus/valid";

fn dir() -> &'static Path {
    static BLESSED: OnceLock<PathBuf> = OnceLock::new();
    BLESSED.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/svid");
        if std::env::var_os("MESHID_BLESS").is_some_and(|v| v == "1") {
            bless(&dir);
        }
        dir
    })
}

/// A corpus file: the chain (leaf first) and the leaf's private key.
struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(file: &str) -> Svid {
    let bytes = std::fs::read(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(!chain.is_empty(), "{file}: no certificate");
    let key = PrivateKeyDer::from_pem_slice(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
    Svid { chain, key }
}

fn root_cert(name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(dir().join(format!("{name}.crt.pem"))).unwrap()
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// The bundles of the tests: example.org's root, and other.test's when federated.
fn bundles(federate_other: bool) -> PeerBundles {
    let mut roots = vec![(td("example.org"), vec![root_cert("root")])];
    if federate_other {
        roots.push((td("other.test"), vec![root_cert("other-root")]));
    }
    PeerBundles::from_roots(roots).unwrap()
}

/// 2026-06-01T00:00:00Z: inside every corpus validity window but the two that test it.
fn fixed_now() -> UnixTime {
    let secs = date_time_ymd(2026, 6, 1).unix_timestamp();
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(secs).unwrap()))
}

#[test]
fn corpus_is_complete() {
    let mut files: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".pem"))
        .collect();
    files.sort();
    let mut expected: Vec<String> = CASES.iter().map(|c| c.file.to_owned()).collect();
    expected.extend(
        [
            "root.crt.pem",
            "root.key.pem",
            "other-root.crt.pem",
            "other-root.key.pem",
        ]
        .map(String::from),
    );
    expected.sort();
    assert_eq!(files, expected, "corpus files and CASES disagree");
    for case in CASES {
        load(case.file);
    }
    let readme = std::fs::read_to_string(dir().join("README.md")).unwrap();
    assert_eq!(
        readme,
        readme_text(),
        "README.md is stale: run with MESHID_BLESS=1"
    );
}

#[test]
fn corpus_root_is_a_valid_ca_root() {
    for (name, id) in [
        ("root", "spiffe://example.org"),
        ("other-root", "spiffe://other.test"),
    ] {
        let der = root_cert(name);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw(), "{name}");
        cert.verify_signature(None).unwrap();
        assert!(
            cert.basic_constraints().unwrap().unwrap().value.ca,
            "{name}"
        );
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(
            ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature(),
            "{name}"
        );
        let ski = cert
            .get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            .unwrap();
        assert!(ski.is_some(), "{name}: no subjectKeyIdentifier");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(
            matches!(san.value.general_names.as_slice(),
                [x509_parser::extensions::GeneralName::URI(uri)] if *uri == id),
            "{name}"
        );
        assert_eq!(
            cert.validity().not_before.timestamp(),
            date_time_ymd(2025, 1, 1).unix_timestamp()
        );
        assert_eq!(
            cert.validity().not_after.timestamp(),
            date_time_ymd(2125, 1, 1).unix_timestamp()
        );
        // The key is the certificate's, PKCS#8, as the CA's upstream_key wants it.
        let key_pem = std::fs::read_to_string(dir().join(format!("{name}.key.pem"))).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{name}");
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            key.public_key_raw(),
            cert.public_key().subject_public_key.data.as_ref()
        );
    }
}

#[test]
fn verifier_refuses_each_violation() {
    let verifier = SvidVerifier::with_bundles(bundles(false));
    for case in CASES {
        let svid = load(case.file);
        for role in [PeerRole::Client, PeerRole::Server] {
            let got = verifier.verify(&svid.chain[0], &svid.chain[1..], fixed_now(), role);
            match (case.verify, got) {
                (None, Ok(id)) => {
                    let stem = case.file.trim_end_matches(".pem");
                    assert_eq!(
                        id.to_string(),
                        format!("spiffe://example.org/corpus/{stem}")
                    );
                }
                (None, Err(e)) => panic!("{} ({role:?}): refused ({}): {e}", case.file, e.reason()),
                (Some(expected), Ok(id)) => {
                    panic!(
                        "{} ({role:?}): verified as {id}, expected {expected}",
                        case.file
                    )
                }
                (Some(expected), Err(e)) => {
                    assert_eq!(e.reason(), expected, "{} ({role:?}): {e}", case.file);
                }
            }
        }
    }
}

#[test]
fn other_trust_domain_verifies_only_when_federated() {
    let svid = load("other-trust-domain.pem");
    let federated = SvidVerifier::with_bundles(bundles(true));
    let id = federated
        .verify(
            &svid.chain[0],
            &svid.chain[1..],
            fixed_now(),
            PeerRole::Client,
        )
        .unwrap();
    assert_eq!(id.to_string(), "spiffe://other.test/corpus/x");

    // Federation does not let other.test's root speak for example.org.
    let claims_local = load("foreign-root-claims-local.pem");
    let err = federated
        .verify(&claims_local.chain[0], &[], fixed_now(), PeerRole::Client)
        .unwrap_err();
    assert_eq!(err.reason(), "untrusted");

    // Accepting other.test without its root in the bundle set is not enough.
    let set = {
        let mut set = spiffe::X509BundleSet::new();
        set.add_bundle(
            spiffe::X509Bundle::from_x509_authorities(td("example.org"), &[&root_cert("root")])
                .unwrap(),
        );
        set
    };
    let accept_all = SvidVerifier::with_bundles(PeerBundles::from_bundle_set(&set, &|_| true));
    let err = accept_all
        .verify(&svid.chain[0], &[], fixed_now(), PeerRole::Client)
        .unwrap_err();
    assert_eq!(err.reason(), "unknown_trust_domain");
}

// ---- handshakes ----

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    meshid_api::tls::provider()
}

/// Presents a chain and key as they are, without checking that they match (rustls' own
/// constructors would refuse wrong-key.pem).
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl Present {
    fn new(svid: Svid) -> Arc<Self> {
        let key = provider().key_provider.load_private_key(svid.key).unwrap();
        Arc::new(Self(Arc::new(CertifiedKey::new(svid.chain, key))))
    }
}

impl ResolvesClientCert for Present {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Present {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

fn server_config(verifier: &Arc<SvidVerifier>, identity: Svid) -> Arc<ServerConfig> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(meshid_api::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_client_cert_verifier(Arc::new(ClientVerifier::new(Arc::clone(verifier))))
        .with_cert_resolver(Present::new(identity));
    Arc::new(config)
}

fn client_config(
    verifier: &Arc<SvidVerifier>,
    expect: &str,
    identity: Option<Svid>,
) -> Arc<ClientConfig> {
    let want = expect.to_owned();
    let server_verifier = ServerVerifier::new(
        Arc::clone(verifier),
        Arc::new(move |id: &SpiffeId| id.to_string() == want),
        expect.to_owned(),
    );
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(meshid_api::tls::PROTOCOL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(server_verifier));
    let config = match identity {
        Some(svid) => builder.with_client_cert_resolver(Present::new(svid)),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

#[derive(Debug)]
enum Failed {
    Server(rustls::Error),
    Client(rustls::Error),
}

/// Moves everything `from` wants to send into `to`, which processes it.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = buf.as_slice();
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

/// A complete in-memory handshake; on success, the SPIFFE IDs each side sees of the other.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> Result<(SpiffeId, SpiffeId), Failed> {
    // Any name: the SPIFFE verifiers ignore it.
    let name = ServerName::try_from("peer.invalid").unwrap();
    let mut client = Connection::Client(ClientConnection::new(client, name).unwrap());
    let mut server = Connection::Server(ServerConnection::new(server).unwrap());
    for _ in 0..16 {
        transfer(&mut client, &mut server).map_err(Failed::Server)?;
        transfer(&mut server, &mut client).map_err(Failed::Client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let server_id = peer_spiffe_id(client.peer_certificates().unwrap()).unwrap();
            let client_id = peer_spiffe_id(server.peer_certificates().unwrap()).unwrap();
            return Ok((server_id, client_id));
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn client_presents_each_corpus_file() {
    let verifier = Arc::new(SvidVerifier::with_bundles(bundles(false)));
    let server = server_config(&verifier, load("valid.pem"));
    for case in CASES {
        let client = client_config(&verifier, VALID_ID, Some(load(case.file)));
        match (case.handshake, handshake(client, Arc::clone(&server))) {
            (None, Ok((server_id, client_id))) => {
                assert_eq!(server_id.to_string(), VALID_ID);
                let stem = case.file.trim_end_matches(".pem");
                assert_eq!(
                    client_id.to_string(),
                    format!("spiffe://example.org/corpus/{stem}")
                );
            }
            (None, Err(e)) => panic!("{}: handshake failed: {e:?}", case.file),
            (Some(expected), Ok(_)) => {
                panic!("{}: handshake completed, expected {expected}", case.file)
            }
            (Some(expected), Err(Failed::Server(e))) => {
                assert_eq!(failure_reason(&e), expected, "{}: {e}", case.file);
            }
            (Some(expected), Err(Failed::Client(e))) => {
                panic!(
                    "{}: the client failed ({e}), expected the server to refuse with {expected}",
                    case.file
                )
            }
        }
    }
}

#[test]
fn server_presents_each_corpus_file() {
    let verifier = Arc::new(SvidVerifier::with_bundles(bundles(false)));
    for case in CASES {
        let svid = load(case.file);
        // Expect exactly the ID the file carries (the valid-shaped ones), or anything else.
        let stem = case.file.trim_end_matches(".pem");
        let expect = format!("spiffe://example.org/corpus/{stem}");
        let server = server_config(&verifier, svid);
        let client = client_config(&verifier, &expect, Some(load("valid.pem")));
        match (case.handshake, handshake(client, server)) {
            (None, Ok((server_id, _))) => assert_eq!(server_id.to_string(), expect),
            (None, Err(e)) => panic!("{}: handshake failed: {e:?}", case.file),
            (Some(expected), Ok(_)) => {
                panic!("{}: handshake completed, expected {expected}", case.file)
            }
            (Some(expected), Err(Failed::Client(e))) => {
                assert_eq!(failure_reason(&e), expected, "{}: {e}", case.file);
            }
            (Some(expected), Err(Failed::Server(e))) => {
                panic!(
                    "{}: the server failed ({e}), expected the client to refuse with {expected}",
                    case.file
                )
            }
        }
    }
}

#[test]
fn client_without_certificate_is_refused() {
    let verifier = Arc::new(SvidVerifier::with_bundles(bundles(false)));
    let server = server_config(&verifier, load("valid.pem"));
    let client = client_config(&verifier, VALID_ID, None);
    match handshake(client, server) {
        Err(Failed::Server(e)) => assert_eq!(failure_reason(&e), "no_certificate", "{e}"),
        other => panic!("expected the server to refuse: {other:?}"),
    }
}

#[test]
fn server_with_unexpected_id_is_refused() {
    let verifier = Arc::new(SvidVerifier::with_bundles(bundles(false)));
    let server = server_config(&verifier, load("valid.pem"));
    let client = client_config(
        &verifier,
        "spiffe://example.org/corpus/db",
        Some(load("valid.pem")),
    );
    match handshake(client, server) {
        Err(Failed::Client(e)) => {
            assert_eq!(failure_reason(&e), "unexpected_peer", "{e}");
            assert_eq!(
                peer_error(&e).unwrap().to_string(),
                format!("peer is {VALID_ID}, expected spiffe://example.org/corpus/db")
            );
        }
        other => panic!("expected the client to refuse: {other:?}"),
    }
}

#[test]
fn no_bundle_fails_closed_in_the_handshake() {
    let empty = Arc::new(SvidVerifier::new());
    let server = server_config(&empty, load("valid.pem"));
    let ready = Arc::new(SvidVerifier::with_bundles(bundles(false)));
    let client = client_config(&ready, VALID_ID, Some(load("valid.pem")));
    match handshake(client, server) {
        Err(Failed::Server(e)) => assert_eq!(failure_reason(&e), "no_bundle", "{e}"),
        other => panic!("expected the server to refuse: {other:?}"),
    }
}

/// Over tokio-rustls, as the proxy runs it: the accept error is an `io::Error` carrying the
/// rustls error, and `io_failure_reason` finds the label in it.
#[tokio::test]
async fn tokio_rustls_accept_errors_carry_the_reason() {
    let verifier = Arc::new(SvidVerifier::with_bundles(bundles(false)));
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&verifier, load("valid.pem")));
    for (identity, expected) in [
        (Some("valid.pem"), None),
        (Some("expired.pem"), Some("expired")),
        (Some("two-uri-sans.pem"), Some("multiple_uri_sans")),
        (None, Some("no_certificate")),
    ] {
        let connector = tokio_rustls::TlsConnector::from(client_config(
            &verifier,
            VALID_ID,
            identity.map(load),
        ));
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("peer.invalid").unwrap();
        let client = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            // TLS 1.3: the client finishes before the server judges its certificate; the
            // refusal arrives as an alert on the first read.
            let mut tls = connector.connect(name, client_io).await?;
            let mut buf = [0u8; 1];
            tls.read(&mut buf).await
        });
        let accepted = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(server_io))
            .await
            .unwrap();
        match (expected, accepted) {
            (None, Ok(tls)) => {
                let id = peer_spiffe_id(tls.get_ref().1.peer_certificates().unwrap()).unwrap();
                assert_eq!(id.to_string(), VALID_ID);
                drop(tls);
            }
            (None, Err(e)) => panic!("{identity:?}: accept failed: {e}"),
            (Some(expected), Ok(_)) => panic!("{identity:?}: accepted, expected {expected}"),
            (Some(expected), Err(e)) => {
                assert_eq!(io_failure_reason(&e), expected, "{identity:?}: {e}");
            }
        }
        let client_result = client.await.unwrap();
        if let (Some(_), Err(e)) = (expected, client_result) {
            // What the client's proxy would count: the server's alert.
            assert_eq!(io_failure_reason(&e), "protocol", "{identity:?}: {e}");
        }
    }
}

// ---- generation (MESHID_BLESS=1) ----

fn readme_text() -> String {
    let mut text = String::from(
        "# Malformed X509-SVID corpus\n\
         \n\
         Test-only material for `ca/api/tests/it/corpus.rs` (the verifier) and `ca/tests/it/node.rs` (the\n\
         node API); never use these keys anywhere else.\n\
         Trust domain `example.org`, whose bundle is `root.crt.pem` (P-256, CA:TRUE, URI SAN\n\
         `spiffe://example.org`, valid 2025-01-01..2125-01-01; `root.key.pem` is its PKCS#8 key,\n\
         usable as the CA's `upstream_cert`/`upstream_key` after `chmod 600`). `other-root.*.pem`\n\
         is a second root, of `other.test`, that is not in the example.org bundle.\n\
         \n\
         Each other file holds a certificate chain (leaf first) and then the leaf's PKCS#8 key.\n\
         Unless stated, a leaf is issued by `root.crt.pem`, valid 2025-01-01..2125-01-01, and\n\
         well-formed but for its one violation. Regenerate with\n\
         `MESHID_BLESS=1 cargo test -p meshid-api --test it corpus` (keeps existing roots).\n\
         \n\
         Per file: the violation; the `PeerError::reason()` of `SvidVerifier::verify`; the\n\
         `failure_reason` of a handshake in which it is presented (`ok`: accepted).\n\
         \n",
    );
    for case in CASES {
        text.push_str(&format!(
            "- `{}`: {}; verify: `{}`; handshake: `{}`\n",
            case.file,
            case.violation,
            case.verify.unwrap_or("ok"),
            case.handshake.unwrap_or("ok"),
        ));
    }
    text
}

fn bless(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let root = load_or_create_root(dir, "root", "meshid corpus root", "spiffe://example.org");
    let other = load_or_create_root(
        dir,
        "other-root",
        "meshid corpus other root",
        "spiffe://other.test",
    );

    let valid_params = leaf("valid", "spiffe://example.org/corpus/valid");
    let valid_key = KeyPair::generate().unwrap();
    let valid_cert = valid_params.signed_by(&valid_key, &root).unwrap();
    write_svid(dir, "valid.pem", &[&valid_cert], &valid_key);

    let mut p = leaf("expired", "spiffe://example.org/corpus/expired");
    p.not_before = date_time_ymd(2025, 1, 1);
    p.not_after = date_time_ymd(2025, 1, 2);
    issue(dir, "expired.pem", &p, &root);

    let mut p = leaf("not-yet-valid", "spiffe://example.org/corpus/not-yet-valid");
    p.not_before = date_time_ymd(2120, 1, 1);
    p.not_after = date_time_ymd(2121, 1, 1);
    issue(dir, "not-yet-valid.pem", &p, &root);

    let mut p = leaf("two-uri-sans", "spiffe://example.org/corpus/two-uri-sans");
    p.subject_alt_names
        .push(uri("spiffe://example.org/corpus/second"));
    issue(dir, "two-uri-sans.pem", &p, &root);

    let mut p = leaf("no-uri-san", "spiffe://example.org/corpus/no-uri-san");
    p.subject_alt_names = vec![SanType::DnsName("corpus.example.org".try_into().unwrap())];
    issue(dir, "no-uri-san.pem", &p, &root);

    let p = leaf(
        "non-spiffe-uri",
        "https://example.org/corpus/non-spiffe-uri",
    );
    issue(dir, "non-spiffe-uri.pem", &p, &root);

    let p = leaf("spiffe-id-without-path", "spiffe://example.org");
    issue(dir, "spiffe-id-without-path.pem", &p, &root);

    let p = leaf(
        "uppercase-trust-domain",
        "spiffe://EXAMPLE.org/corpus/uppercase-trust-domain",
    );
    issue(dir, "uppercase-trust-domain.pem", &p, &root);

    {
        let by_leaf = Issuer::from_params(&valid_params, &valid_key);
        let p = leaf(
            "signed-by-leaf",
            "spiffe://example.org/corpus/signed-by-leaf",
        );
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &by_leaf).unwrap();
        write_svid(dir, "signed-by-leaf.pem", &[&cert, &valid_cert], &key);
    }

    let mut p = leaf("leaf-is-ca", "spiffe://example.org/corpus/leaf-is-ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    issue(dir, "leaf-is-ca.pem", &p, &root);

    let mut p = leaf(
        "leaf-key-cert-sign",
        "spiffe://example.org/corpus/leaf-key-cert-sign",
    );
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    issue(dir, "leaf-key-cert-sign.pem", &p, &root);

    let mut p = leaf(
        "leaf-no-digital-signature",
        "spiffe://example.org/corpus/leaf-no-digital-signature",
    );
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    issue(dir, "leaf-no-digital-signature.pem", &p, &root);

    let mut p = leaf(
        "leaf-no-key-usage",
        "spiffe://example.org/corpus/leaf-no-key-usage",
    );
    p.key_usages.clear();
    issue(dir, "leaf-no-key-usage.pem", &p, &root);

    let p = leaf("other-trust-domain", "spiffe://other.test/corpus/x");
    issue(dir, "other-trust-domain.pem", &p, &other);

    let p = leaf("foreign-root-claims-local", "spiffe://example.org/corpus/x");
    issue(dir, "foreign-root-claims-local.pem", &p, &other);

    {
        let p = leaf("self-signed", "spiffe://example.org/corpus/self-signed");
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        write_svid(dir, "self-signed.pem", &[&cert], &key);
    }

    {
        let p = leaf("wrong-key", "spiffe://example.org/corpus/wrong-key");
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &root).unwrap();
        let not_its_key = KeyPair::generate().unwrap();
        write_svid(dir, "wrong-key.pem", &[&cert], &not_its_key);
    }

    std::fs::write(dir.join("README.md"), readme_text()).unwrap();
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshid test corpus");
    dn.push(DnType::CommonName, cn);
    dn
}

fn uri(value: &str) -> SanType {
    SanType::URI(value.try_into().unwrap())
}

/// The parameters of a well-formed workload SVID named `name`, with URI SAN `id`.
fn leaf(name: &str, id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&format!("corpus {name}"));
    p.subject_alt_names = vec![uri(id)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = date_time_ymd(2025, 1, 1);
    p.not_after = date_time_ymd(2125, 1, 1);
    p
}

fn issue(dir: &Path, file: &str, params: &CertificateParams, by: &Issuer<'_, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, by).unwrap();
    write_svid(dir, file, &[&cert], &key);
}

fn write_svid(dir: &Path, file: &str, chain: &[&rcgen::Certificate], key: &KeyPair) {
    let mut pem: String = chain.iter().map(|cert| cert.pem()).collect();
    pem.push_str(&key.serialize_pem());
    std::fs::write(dir.join(file), pem).unwrap();
}

/// The root `name` from `dir`, or a new one (self-signed P-256 CA, 2025..2125) written there.
fn load_or_create_root(dir: &Path, name: &str, cn: &str, id: &str) -> Issuer<'static, KeyPair> {
    let cert_path = dir.join(format!("{name}.crt.pem"));
    let key_path = dir.join(format!("{name}.key.pem"));
    if cert_path.exists() && key_path.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
        return Issuer::from_ca_cert_pem(&std::fs::read_to_string(&cert_path).unwrap(), key)
            .unwrap();
    }
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.subject_alt_names = vec![uri(id)];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    p.not_before = date_time_ymd(2025, 1, 1);
    p.not_after = date_time_ymd(2125, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    Issuer::new(p, key)
}
