use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A root and an intermediate under it, as a meshid CA has.
struct Pki {
    root: CertificateDer<'static>,
    intermediate: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} root"));
        let root = CertifiedIssuer::self_signed(root_params, KeyPair::generate().unwrap()).unwrap();
        let mut int_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        int_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        int_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} intermediate"));
        let intermediate =
            CertifiedIssuer::signed_by(int_params, KeyPair::generate().unwrap(), &root).unwrap();
        Pki {
            root: root.der().clone(),
            intermediate,
        }
    }

    /// An SVID-like leaf with these URI SANs: chain (leaf, intermediate) and key.
    fn leaf(&self, uris: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.leaf_with(uris, true)
    }

    /// A leaf, with the CA server mark on a server ID only when `mark`.
    fn leaf_with(
        &self,
        uris: &[&str],
        mark: bool,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // As the CA marks its own server SVIDs (the client refuses an unmarked one).
        if mark && uris.iter().any(|u| u.ends_with("/meshid/server")) {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &crate::role::CERTIFICATE_POLICIES,
                    crate::role::Role::Server.policies_extension(),
                ));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.intermediate).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (
            vec![cert.der().clone(), self.intermediate.der().clone()],
            key,
        )
    }

    fn server(&self, uris: &[&str]) -> Arc<RotatingCert> {
        let cert = Arc::new(RotatingCert::new());
        let (chain, key) = self.leaf(uris);
        cert.set(chain, key).unwrap();
        cert
    }
}

const SERVER: &str = "spiffe://example.org/meshid/server";
const AGENT: &str = "spiffe://example.org/meshid/agent/join_token/t1";

/// Runs one handshake over an in-memory pipe and exchanges a byte. Returns the server's view
/// of the client's SPIFFE ID, or the first error (client side first).
async fn handshake(
    client: ClientConfig,
    server: ServerConfig,
) -> Result<Option<SpiffeId>, std::io::Error> {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(verify::peer_spiffe_id);
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        tls.write_all(&b).await?;
        tls.flush().await?;
        Ok::<_, std::io::Error>(peer)
    });
    let name = ServerName::try_from(PLACEHOLDER_SERVER_NAME).unwrap();
    let client_result = async {
        let mut tls = connector.connect(name, c).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    let server_result = server_task.await.unwrap();
    client_result?;
    server_result
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(text: &str) -> SpiffeId {
    SpiffeId::new(text).unwrap()
}

/// The client verifier of a node API server trusting `pki`'s root.
fn clients(pki: &Pki) -> Arc<SvidVerifier> {
    Arc::new(SvidVerifier::with_bundles(
        PeerBundles::from_roots([(td(), vec![pki.root.clone()])]).unwrap(),
    ))
}

fn no_client_auth_server(cert: Arc<RotatingCert>, pki: &Pki) -> ServerConfig {
    server_config(cert, clients(pki), false).unwrap()
}

#[test]
fn spiffe_id_of_needs_exactly_one_canonical_spiffe_uri() {
    let pki = Pki::new("a");
    let of = |uris: &[&str]| verify::spiffe_id_of(&pki.leaf(uris).0[0]);
    assert_eq!(of(&[SERVER]).unwrap(), id(SERVER));
    assert!(matches!(of(&[]), Err(PeerError::NoUriSan)));
    assert!(matches!(
        of(&[SERVER, AGENT]),
        Err(PeerError::MultipleUriSans { count: 2 })
    ));
    assert!(matches!(
        of(&["https://example.org/x"]),
        Err(PeerError::NotSpiffeId { .. })
    ));
    assert!(matches!(
        of(&["spiffe://Example.org/x"]),
        Err(PeerError::NotSpiffeId { .. })
    ));
    assert!(matches!(
        verify::spiffe_id_of(b"not a certificate"),
        Err(PeerError::Malformed { .. })
    ));
}

#[test]
fn expected_ids_are_validated() {
    // An `ExpectedId` holds parsed values, so the invalid ones cannot be built: the text forms
    // are refused where they are parsed.
    for bad in ["spiffe://example.org/", "https://example.org/x"] {
        assert!(crate::id::parse(bad).is_err(), "{bad}");
    }
    for bad in ["Example.org", "spiffe://example.org"] {
        assert!(crate::id::parse_trust_domain(bad).is_err(), "{bad}");
    }
    assert!(matches!(
        client_config(vec![], ExpectedId::Exact(id(SERVER)), None),
        Err(TlsError::InvalidRoots(_))
    ));
    assert_eq!(
        ExpectedId::server_of(&td()).unwrap(),
        ExpectedId::Exact(id(SERVER))
    );
}

struct Case {
    name: &'static str,
    server_uris: &'static [&'static str],
    /// Whether the client trusts the server's PKI (otherwise another root).
    same_root: bool,
    expected: ExpectedId,
    /// Empty when the handshake must succeed; otherwise a part of the client's error.
    refused_for: &'static str,
}

#[tokio::test]
async fn server_is_authenticated_by_spiffe_id() {
    let pki = Pki::new("a");
    let other = Pki::new("b");
    let cases = [
        Case {
            name: "exact id accepted",
            server_uris: &[SERVER],
            same_root: true,
            expected: ExpectedId::Exact(id(SERVER)),
            refused_for: "",
        },
        Case {
            name: "trust domain accepted",
            server_uris: &[SERVER],
            same_root: true,
            expected: ExpectedId::TrustDomain(td()),
            refused_for: "",
        },
        Case {
            name: "wrong id refused",
            server_uris: &["spiffe://example.org/impostor"],
            same_root: true,
            expected: ExpectedId::Exact(id(SERVER)),
            refused_for: "UnexpectedPeer { actual: SpiffeId { trust_domain: TrustDomain { name: \"example.org\" }, path: \"/impostor\" }",
        },
        Case {
            name: "other trust domain refused",
            server_uris: &["spiffe://other.org/meshid/server"],
            same_root: true,
            expected: ExpectedId::TrustDomain(td()),
            refused_for: "UnknownTrustDomain { trust_domain: TrustDomain { name: \"other.org\" } }",
        },
        Case {
            name: "other root refused",
            server_uris: &[SERVER],
            same_root: false,
            expected: ExpectedId::Exact(id(SERVER)),
            refused_for: "UnknownIssuer",
        },
        Case {
            name: "two uri sans refused",
            server_uris: &[SERVER, AGENT],
            same_root: true,
            expected: ExpectedId::Exact(id(SERVER)),
            refused_for: "MultipleUriSans { count: 2 }",
        },
        Case {
            name: "no uri san refused",
            server_uris: &[],
            same_root: true,
            expected: ExpectedId::TrustDomain(td()),
            refused_for: "NoUriSan",
        },
    ];
    for case in cases {
        let issuer = if case.same_root { &pki } else { &other };
        let server = no_client_auth_server(issuer.server(case.server_uris), &pki);
        let client = client_config(vec![pki.root.clone()], case.expected, None).unwrap();
        let result = handshake(client, server).await;
        match result {
            Ok(_) => assert!(case.refused_for.is_empty(), "{}: accepted", case.name),
            Err(e) => assert!(
                !case.refused_for.is_empty() && e.to_string().contains(case.refused_for),
                "{}: {e}",
                case.name
            ),
        }
    }
}

#[tokio::test]
async fn client_certificates() {
    let pki = Pki::new("a");
    let other = Pki::new("b");
    let expected = || ExpectedId::Exact(id(SERVER));
    let required = || server_config(pki.server(&[SERVER]), clients(&pki), true).unwrap();

    // Required: refused without, accepted with one of the trusted PKI, refused from another.
    let anonymous = client_config(vec![pki.root.clone()], expected(), None).unwrap();
    assert!(handshake(anonymous, required()).await.is_err());
    let agent =
        client_config(vec![pki.root.clone()], expected(), Some(pki.leaf(&[AGENT]))).unwrap();
    assert_eq!(handshake(agent, required()).await.unwrap(), Some(id(AGENT)));
    let stranger = client_config(
        vec![pki.root.clone()],
        expected(),
        Some(other.leaf(&[AGENT])),
    )
    .unwrap();
    assert!(handshake(stranger, required()).await.is_err());

    // Optional: a client without a certificate gets in, and has no peer identity.
    let anonymous = client_config(vec![pki.root.clone()], expected(), None).unwrap();
    let optional = no_client_auth_server(pki.server(&[SERVER]), &pki);
    assert_eq!(handshake(anonymous, optional).await.unwrap(), None);
}

#[tokio::test]
async fn rotating_cert_fails_closed_then_serves_the_newest() {
    let pki = Pki::new("a");
    let cert = Arc::new(RotatingCert::new());
    assert!(cert.current().is_none());
    let client = || client_config(vec![pki.root.clone()], ExpectedId::Exact(id(SERVER)), None);
    let server = no_client_auth_server(Arc::clone(&cert), &pki);
    assert!(handshake(client().unwrap(), server.clone()).await.is_err());

    let (chain, key) = pki.leaf(&[SERVER]);
    cert.set(chain.clone(), key).unwrap();
    assert!(handshake(client().unwrap(), server.clone()).await.is_ok());
    assert_eq!(cert.current().unwrap().cert[0], chain[0]);

    // A new certificate is taken by the next handshake through the same server config.
    let (chain2, key2) = pki.leaf(&[SERVER]);
    cert.set(chain2.clone(), key2).unwrap();
    assert_eq!(cert.current().unwrap().cert[0], chain2[0]);
    assert!(handshake(client().unwrap(), server).await.is_ok());

    // A key that does not match the leaf is refused and the current one kept.
    let (_, wrong_key) = pki.leaf(&[SERVER]);
    assert!(matches!(
        cert.set(chain.clone(), wrong_key),
        Err(TlsError::InvalidKey(_))
    ));
    assert_eq!(cert.current().unwrap().cert[0], chain2[0]);
}

#[tokio::test]
async fn verifier_roots_can_be_swapped() {
    let old = Pki::new("old");
    let new = Pki::new("new");
    let bundles = |roots: Vec<CertificateDer<'static>>| PeerBundles::from_roots([(td(), roots)]);
    let roots = Arc::new(SvidVerifier::with_bundles(
        bundles(vec![old.root.clone()]).unwrap(),
    ));
    let verifier = Arc::new(server_verifier(
        Arc::clone(&roots),
        ExpectedId::Exact(id(SERVER)),
    ));
    let client = || client_config_with_verifier(Arc::clone(&verifier), None).unwrap();
    let server = no_client_auth_server(new.server(&[SERVER]), &new);
    assert!(handshake(client(), server.clone()).await.is_err());
    roots.set_bundles(bundles(vec![old.root.clone(), new.root.clone()]).unwrap());
    assert!(handshake(client(), server).await.is_ok());
    assert!(bundles(vec![]).is_err());
}

/// TLS 1.3 only, on both sides: a TLS 1.2-only peer gets no handshake.
#[tokio::test]
async fn tls12_peers_are_refused() {
    let pki = Pki::new("a");
    let tls12 = || {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki.root.clone()).unwrap();
            roots
        })
        .with_no_client_auth()
    };
    let server = no_client_auth_server(pki.server(&[SERVER]), &pki);
    assert!(handshake(tls12(), server).await.is_err());
    // And the control: the same server with our own client completes.
    let server = no_client_auth_server(pki.server(&[SERVER]), &pki);
    let ours = client_config(vec![pki.root.clone()], ExpectedId::Exact(id(SERVER)), None).unwrap();
    assert!(handshake(ours, server).await.is_ok());
    // Our provider has no TLS 1.2 suite at all, so a client built on it cannot offer 1.2.
    assert!(provider()
        .cipher_suites
        .iter()
        .all(|s| s.version() == &rustls::version::TLS13));
}

/// A server whose SVID names the CA server's ID must carry the server mark, whatever the
/// client expects (an exact ID or any ID of the trust domain).
#[tokio::test]
async fn an_unmarked_server_id_is_refused_under_any_expectation() {
    let pki = Pki::new("a");
    for expected in [ExpectedId::Exact(id(SERVER)), ExpectedId::TrustDomain(td())] {
        let cert = Arc::new(RotatingCert::new());
        let (chain, key) = pki.leaf_with(&[SERVER], false);
        cert.set(chain, key).unwrap();
        let server = no_client_auth_server(cert, &pki);
        let client = client_config(vec![pki.root.clone()], expected.clone(), None).unwrap();
        let err = handshake(client, server).await.unwrap_err();
        assert!(
            err.to_string().contains("MissingMark"),
            "{expected:?}: {err}"
        );
        // Marked, it is accepted.
        let server = no_client_auth_server(pki.server(&[SERVER]), &pki);
        let client = client_config(vec![pki.root.clone()], expected, None).unwrap();
        handshake(client, server).await.unwrap();
    }
    // Another ID of the trust domain needs no mark.
    let server = no_client_auth_server(pki.server(&["spiffe://example.org/other"]), &pki);
    let client =
        client_config(vec![pki.root.clone()], ExpectedId::TrustDomain(td()), None).unwrap();
    handshake(client, server).await.unwrap();
}
