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
            rustls::crypto::aws_lc_rs::default_provider(),
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

/// Runs a handshake over memory, synchronously, counting the client's flights (2 for a
/// TLS 1.3 handshake; 3 when the server asked for another key share with a
/// HelloRetryRequest). Returns the flights and both ends, established.
fn flights(
    client: ClientConfig,
    server: ServerConfig,
) -> (usize, rustls::ClientConnection, rustls::ServerConnection) {
    let mut c = rustls::ClientConnection::new(
        Arc::new(client),
        ServerName::try_from(PLACEHOLDER_SERVER_NAME).unwrap(),
    )
    .unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    assert_eq!(kx_group_name(&c), "none");
    let mut client_flights = 0;
    let mut buf = Vec::new();
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            client_flights += 1;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets().unwrap();
            }
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking(), "no handshake");
    (client_flights, c, s)
}

/// The client's flights and the group each end reports, as its metric label.
fn negotiated(client: ClientConfig, server: ServerConfig) -> (usize, &'static str, &'static str) {
    let (n, c, s) = flights(client, server);
    (n, kx_group_name(&c), kx_group_name(&s))
}

/// meshid's provider with only X25519: a peer without the hybrid group (OpenSSL before 3.5,
/// haproxy, stunnel).
fn classical() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = provider().as_ref().clone();
    p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    Arc::new(p)
}

/// Both meshid ends negotiate the hybrid post-quantum group X25519MLKEM768; with a classical
/// peer on either side they fall back to X25519, in the same two flights (the client sends an
/// X25519 key share beside the hybrid one, so no HelloRetryRequest is needed). The labels are
/// what metrics and the access log show.
#[test]
fn key_exchange_is_hybrid_post_quantum_and_falls_back_in_one_round_trip() {
    let pki = Pki::new("a");
    let ours_client =
        || client_config(vec![pki.root.clone()], ExpectedId::Exact(id(SERVER)), None).unwrap();
    let ours_server = || no_client_auth_server(pki.server(&[SERVER]), &pki);
    assert_eq!(
        negotiated(ours_client(), ours_server()),
        (2, "X25519MLKEM768", "X25519MLKEM768")
    );

    let bundles = PeerBundles::from_roots([(td(), vec![pki.root.clone()])]).unwrap();
    let classical_client = ClientConfig::builder_with_provider(classical())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(server_verifier(
            Arc::new(SvidVerifier::with_bundles(bundles)),
            ExpectedId::Exact(id(SERVER)),
        )))
        .with_no_client_auth();
    assert_eq!(
        negotiated(classical_client, ours_server()),
        (2, "X25519", "X25519")
    );

    let classical_server = ServerConfig::builder_with_provider(classical())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .unwrap()
        .with_client_cert_verifier(Arc::new(ClientVerifier::new(clients(&pki)).optional()))
        .with_cert_resolver(pki.server(&[SERVER]));
    assert_eq!(
        negotiated(ours_client(), classical_server),
        (2, "X25519", "X25519")
    );
}
