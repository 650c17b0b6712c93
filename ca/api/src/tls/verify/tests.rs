//! Unit tests of X509-SVID verification over PKI minted here with rcgen (short-lived). The
//! checked-in corpus of malformed SVIDs is exercised by `tests/corpus.rs`.

use std::io;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use spiffe::X509Bundle;
use time::OffsetDateTime;

use super::*;

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn short_lived(mut params: CertificateParams) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::hours(1);
    params
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = short_lived(CertificateParams::default());
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn root(cn: &str) -> Ca {
    let params = ca_params(cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

fn intermediate(cn: &str, parent: &Ca) -> Ca {
    let mut params = ca_params(cn);
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &parent.issuer).unwrap();
    Ca {
        cert: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

/// The parameters of a well-formed workload SVID.
fn leaf_params(uri: &str) -> CertificateParams {
    let mut params = short_lived(CertificateParams::default());
    params.distinguished_name = dn("workload");
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

fn sign(params: &CertificateParams, by: &Ca) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    params.signed_by(&key, &by.issuer).unwrap().der().clone()
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn verifier_for(roots: &[(&str, &Ca)]) -> SvidVerifier {
    let bundles = PeerBundles::from_roots(
        roots
            .iter()
            .map(|(name, ca)| (td(name), vec![ca.cert.clone()])),
    )
    .unwrap();
    SvidVerifier::with_bundles(bundles)
}

fn reason(
    verifier: &SvidVerifier,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    role: PeerRole,
) -> &'static str {
    match verifier.verify(leaf, intermediates, UnixTime::now(), role) {
        Ok(id) => panic!("verified as {id}, expected a refusal"),
        Err(e) => e.reason(),
    }
}

const ID: &str = "spiffe://example.org/ns/default/sa/web";

#[test]
fn no_bundle_before_the_first_set() {
    let root = root("root");
    let leaf = sign(&leaf_params(ID), &root);
    let verifier = SvidVerifier::new();
    assert!(verifier.bundles().is_none());
    assert_eq!(reason(&verifier, &leaf, &[], PeerRole::Client), "no_bundle");
    // Even garbage is refused as no_bundle: nothing is parsed before there are bundles.
    let garbage = CertificateDer::from(vec![1, 2, 3]);
    assert_eq!(
        reason(&verifier, &garbage, &[], PeerRole::Server),
        "no_bundle"
    );
}

#[test]
fn valid_leaf_verifies_for_both_roles() {
    let root = root("root");
    let leaf = sign(&leaf_params(ID), &root);
    let verifier = verifier_for(&[("example.org", &root)]);
    for role in [PeerRole::Client, PeerRole::Server] {
        let id = verifier.verify(&leaf, &[], UnixTime::now(), role).unwrap();
        assert_eq!(id.to_string(), ID);
    }
    assert_eq!(peer_spiffe_id(&[leaf]).unwrap().to_string(), ID);
}

#[test]
fn chain_through_an_intermediate() {
    let root = root("root");
    let inter = intermediate("intermediate", &root);
    let leaf = sign(&leaf_params(ID), &inter);
    let verifier = verifier_for(&[("example.org", &root)]);

    let id = verifier
        .verify(
            &leaf,
            std::slice::from_ref(&inter.cert),
            UnixTime::now(),
            PeerRole::Client,
        )
        .unwrap();
    assert_eq!(id.to_string(), ID);
    let chain = [leaf.clone(), inter.cert.clone()];
    assert!(verifier
        .verify_chain(&chain, UnixTime::now(), PeerRole::Server)
        .is_ok());

    // Without the intermediate there is no path to the root.
    assert_eq!(reason(&verifier, &leaf, &[], PeerRole::Client), "untrusted");
    // Unrelated intermediates are ignored by path building, not confused with the issuer.
    let stray = intermediate("stray", &root);
    assert!(verifier
        .verify(
            &leaf,
            &[stray.cert.clone(), inter.cert.clone()],
            UnixTime::now(),
            PeerRole::Client
        )
        .is_ok());
}

#[test]
fn intermediate_of_a_foreign_root_is_untrusted() {
    let ours = root("ours");
    let theirs = root("theirs");
    let inter = intermediate("intermediate", &theirs);
    let leaf = sign(&leaf_params(ID), &inter);
    let verifier = verifier_for(&[("example.org", &ours), ("other.test", &theirs)]);
    // The leaf claims example.org: only example.org's roots are tried.
    assert_eq!(
        reason(
            &verifier,
            &leaf,
            std::slice::from_ref(&inter.cert),
            PeerRole::Client
        ),
        "untrusted"
    );
}

#[test]
fn leaf_without_eku_is_accepted() {
    // X509-SVID 4.4: leaves SHOULD carry an EKU extension; only when present must it name
    // serverAuth and clientAuth. So its absence is accepted, for both roles.
    let root = root("root");
    let mut params = leaf_params(ID);
    params.extended_key_usages.clear();
    let leaf = sign(&params, &root);
    let verifier = verifier_for(&[("example.org", &root)]);
    for role in [PeerRole::Client, PeerRole::Server] {
        assert!(verifier.verify(&leaf, &[], UnixTime::now(), role).is_ok());
    }
}

#[test]
fn eku_must_allow_the_peer_role() {
    let root = root("root");
    let verifier = verifier_for(&[("example.org", &root)]);

    let mut params = leaf_params(ID);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_only = sign(&params, &root);
    assert!(verifier
        .verify(&server_only, &[], UnixTime::now(), PeerRole::Server)
        .is_ok());
    assert_eq!(
        reason(&verifier, &server_only, &[], PeerRole::Client),
        "key_usage"
    );

    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_only = sign(&params, &root);
    assert!(verifier
        .verify(&client_only, &[], UnixTime::now(), PeerRole::Client)
        .is_ok());
    assert_eq!(
        reason(&verifier, &client_only, &[], PeerRole::Server),
        "key_usage"
    );
}

#[test]
fn leaf_shape_violations() {
    let root = root("root");
    let verifier = verifier_for(&[("example.org", &root)]);
    let cases: Vec<(&str, CertificateParams, &str)> = vec![
        (
            "no key usage",
            {
                let mut p = leaf_params(ID);
                p.key_usages.clear();
                p
            },
            "key_usage",
        ),
        (
            "cRLSign",
            {
                let mut p = leaf_params(ID);
                p.key_usages.push(KeyUsagePurpose::CrlSign);
                p
            },
            "key_usage",
        ),
        (
            "CA:TRUE",
            {
                let mut p = leaf_params(ID);
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p
            },
            "leaf_is_ca",
        ),
        (
            "three URI SANs",
            {
                let mut p = leaf_params(ID);
                for uri in ["spiffe://example.org/b", "spiffe://example.org/c"] {
                    p.subject_alt_names
                        .push(SanType::URI(uri.try_into().unwrap()));
                }
                p
            },
            "multiple_uri_sans",
        ),
        (
            "upper-case scheme",
            leaf_params("SPIFFE://example.org/x"),
            "not_spiffe_id",
        ),
        (
            "trailing slash",
            leaf_params("spiffe://example.org/x/"),
            "not_spiffe_id",
        ),
        (
            "dot segment",
            leaf_params("spiffe://example.org/a/../b"),
            "not_spiffe_id",
        ),
        (
            "query",
            leaf_params("spiffe://example.org/x?y=1"),
            "not_spiffe_id",
        ),
        (
            "DNS SAN only",
            {
                let mut p = leaf_params(ID);
                p.subject_alt_names = vec![SanType::DnsName("web.example.org".try_into().unwrap())];
                p
            },
            "no_uri_san",
        ),
    ];
    for (name, params, expected) in cases {
        let leaf = sign(&params, &root);
        for role in [PeerRole::Client, PeerRole::Server] {
            assert_eq!(reason(&verifier, &leaf, &[], role), expected, "{name}");
        }
    }
    // A DNS SAN beside the one URI SAN is fine (X509-SVID 2).
    let mut params = leaf_params(ID);
    params
        .subject_alt_names
        .push(SanType::DnsName("web.example.org".try_into().unwrap()));
    let leaf = sign(&params, &root);
    assert!(verifier
        .verify(&leaf, &[], UnixTime::now(), PeerRole::Client)
        .is_ok());
}

#[test]
fn multiple_uri_sans_are_counted() {
    let root = root("root");
    let mut params = leaf_params(ID);
    for uri in ["spiffe://example.org/b", "https://example.org/c"] {
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
    }
    let leaf = sign(&params, &root);
    let verifier = verifier_for(&[("example.org", &root)]);
    let err = verifier
        .verify(&leaf, &[], UnixTime::now(), PeerRole::Client)
        .unwrap_err();
    assert!(
        matches!(err, PeerError::MultipleUriSans { count: 3 }),
        "{err}"
    );
    assert!(peer_spiffe_id(&[leaf]).is_none());
}

#[test]
fn validity_is_checked_at_now() {
    let root = root("root");
    let leaf = sign(&leaf_params(ID), &root);
    let verifier = verifier_for(&[("example.org", &root)]);
    let in_two_hours = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        UnixTime::now().as_secs() + 7200,
    ));
    let err = verifier
        .verify(&leaf, &[], in_two_hours, PeerRole::Client)
        .unwrap_err();
    assert_eq!(err.reason(), "expired", "{err}");
    let an_hour_ago = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        UnixTime::now().as_secs() - 3600,
    ));
    let err = verifier
        .verify(&leaf, &[], an_hour_ago, PeerRole::Client)
        .unwrap_err();
    assert_eq!(err.reason(), "not_yet_valid", "{err}");
}

#[test]
fn bundle_swap_takes_effect_on_the_next_verification() {
    let old_root = root("old");
    let new_root = root("new");
    let old_leaf = sign(&leaf_params(ID), &old_root);
    let new_leaf = sign(&leaf_params(ID), &new_root);
    let verifier = verifier_for(&[("example.org", &old_root)]);
    assert!(verifier
        .verify(&old_leaf, &[], UnixTime::now(), PeerRole::Client)
        .is_ok());
    assert_eq!(
        reason(&verifier, &new_leaf, &[], PeerRole::Client),
        "untrusted"
    );

    verifier.set_bundles(
        PeerBundles::from_roots([(td("example.org"), vec![new_root.cert.clone()])]).unwrap(),
    );
    assert_eq!(
        reason(&verifier, &old_leaf, &[], PeerRole::Client),
        "untrusted"
    );
    assert!(verifier
        .verify(&new_leaf, &[], UnixTime::now(), PeerRole::Client)
        .is_ok());

    // During root rotation the bundle holds both roots.
    verifier.set_bundles(
        PeerBundles::from_roots([(
            td("example.org"),
            vec![old_root.cert.clone(), new_root.cert.clone()],
        )])
        .unwrap(),
    );
    for leaf in [&old_leaf, &new_leaf] {
        assert!(verifier
            .verify(leaf, &[], UnixTime::now(), PeerRole::Client)
            .is_ok());
    }
}

#[test]
fn trust_domains_are_separate() {
    let ours = root("ours");
    let theirs = root("theirs");
    let foreign = sign(&leaf_params("spiffe://other.test/svc"), &theirs);
    let claims_ours = sign(&leaf_params(ID), &theirs);

    let verifier = verifier_for(&[("example.org", &ours)]);
    assert_eq!(
        reason(&verifier, &foreign, &[], PeerRole::Client),
        "unknown_trust_domain"
    );
    assert_eq!(
        reason(&verifier, &claims_ours, &[], PeerRole::Client),
        "untrusted"
    );

    let federated = verifier_for(&[("example.org", &ours), ("other.test", &theirs)]);
    assert!(federated
        .verify(&foreign, &[], UnixTime::now(), PeerRole::Client)
        .is_ok());
    assert_eq!(
        reason(&federated, &claims_ours, &[], PeerRole::Client),
        "untrusted"
    );
}

#[test]
fn from_bundle_set_keeps_accepted_trust_domains_and_ca_roots() {
    let ours = root("ours");
    let theirs = root("theirs");
    let stranger = root("stranger");
    let not_a_ca = sign(&leaf_params("spiffe://other.test/not-a-root"), &theirs);

    let mut set = X509BundleSet::new();
    set.add_bundle(X509Bundle::from_x509_authorities(td("example.org"), &[&ours.cert]).unwrap());
    set.add_bundle(
        X509Bundle::from_x509_authorities(td("other.test"), &[&not_a_ca, &theirs.cert]).unwrap(),
    );
    set.add_bundle(
        X509Bundle::from_x509_authorities(td("stranger.test"), &[&stranger.cert]).unwrap(),
    );
    set.add_bundle(X509Bundle::from_x509_authorities(td("leaf-only.test"), &[&not_a_ca]).unwrap());

    let bundles = PeerBundles::from_bundle_set(&set, &|td| td.as_str() != "stranger.test");
    let mut names: Vec<&str> = bundles.trust_domains().map(TrustDomain::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["example.org", "other.test"]);

    let verifier = SvidVerifier::with_bundles(bundles);
    let from_stranger = sign(&leaf_params("spiffe://stranger.test/x"), &stranger);
    assert_eq!(
        reason(&verifier, &from_stranger, &[], PeerRole::Client),
        "unknown_trust_domain"
    );
    let from_theirs = sign(&leaf_params("spiffe://other.test/x"), &theirs);
    assert!(verifier
        .verify(&from_theirs, &[], UnixTime::now(), PeerRole::Server)
        .is_ok());
    // The leaf that was (wrongly) in other.test's bundle is no anchor: leaf-only.test, whose
    // bundle held nothing else, is left out (checked above), and so are its peers.
    let from_leaf_only = sign(&leaf_params("spiffe://leaf-only.test/x"), &theirs);
    assert_eq!(
        reason(&verifier, &from_leaf_only, &[], PeerRole::Client),
        "unknown_trust_domain"
    );
}

#[test]
fn from_roots_refuses_unusable_roots() {
    let root = root("root");
    let leaf = sign(&leaf_params(ID), &root);
    assert!(matches!(
        PeerBundles::from_roots([(td("example.org"), vec![])]),
        Err(VerifyError::NoRoots { .. })
    ));
    assert!(matches!(
        PeerBundles::from_roots([(td("example.org"), vec![root.cert.clone(), leaf])]),
        Err(VerifyError::InvalidRoot { index: 1, .. })
    ));
    assert!(matches!(
        PeerBundles::from_roots([(td("example.org"), vec![CertificateDer::from(vec![0x30, 0])])]),
        Err(VerifyError::InvalidRoot { index: 0, .. })
    ));
}

#[test]
fn chain_limits() {
    let root = root("root");
    let leaf = sign(&leaf_params(ID), &root);
    let verifier = verifier_for(&[("example.org", &root)]);
    let many = vec![root.cert.clone(); MAX_INTERMEDIATES + 1];
    assert_eq!(
        reason(&verifier, &leaf, &many, PeerRole::Client),
        "malformed"
    );
    assert_eq!(
        verifier
            .verify_chain(&[], UnixTime::now(), PeerRole::Client)
            .unwrap_err()
            .reason(),
        "no_certificate"
    );
    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    assert_eq!(
        reason(&verifier, &garbage, &[], PeerRole::Client),
        "malformed"
    );
    assert!(peer_spiffe_id(&[]).is_none());
    assert!(peer_spiffe_id(&[garbage]).is_none());
}

#[test]
fn reasons_are_listed() {
    let errors = [
        PeerError::NoCertificate,
        PeerError::malformed("x"),
        PeerError::NoUriSan,
        PeerError::MultipleUriSans { count: 2 },
        PeerError::NotSpiffeId {
            uri: "x".to_owned(),
            detail: "y".to_owned(),
        },
        PeerError::LeafIsCa,
        PeerError::KeyUsage { detail: "x" },
        PeerError::UnknownTrustDomain {
            trust_domain: td("example.org"),
        },
        PeerError::NoBundle,
        PeerError::Expired {
            not_after: 1,
            now: 2,
        },
        PeerError::NotYetValid {
            not_before: 2,
            now: 1,
        },
        PeerError::Untrusted {
            trust_domain: td("example.org"),
            source: webpki::Error::UnknownIssuer,
        },
        PeerError::UnexpectedPeer {
            actual: SpiffeId::new(ID).unwrap(),
            expected: "x".to_owned(),
        },
        PeerError::Other(webpki::Error::CertRevoked),
    ];
    for e in &errors {
        assert!(FAILURE_REASONS.contains(&e.reason()), "{}", e.reason());
        let msg = e.to_string();
        assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
    }
}

#[test]
fn failure_reasons_of_rustls_and_io_errors() {
    let refused: rustls::Error = PeerError::LeafIsCa.into();
    assert_eq!(failure_reason(&refused), "leaf_is_ca");
    let cases = [
        (rustls::Error::NoCertificatesPresented, "no_certificate"),
        (
            rustls::Error::InvalidCertificate(CertificateError::BadSignature),
            "untrusted",
        ),
        (
            rustls::Error::InvalidCertificate(CertificateError::Expired),
            "expired",
        ),
        (
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                io::Error::other("not ours"),
            )))),
            "other",
        ),
        (
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
            "protocol",
        ),
        (
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic),
            "protocol",
        ),
        (rustls::Error::General("x".to_owned()), "other"),
    ];
    for (err, expected) in cases {
        assert_eq!(failure_reason(&err), expected, "{err}");
        assert!(FAILURE_REASONS.contains(&expected));
        // As tokio-rustls reports it.
        let io = io::Error::new(io::ErrorKind::InvalidData, err);
        assert_eq!(io_failure_reason(&io), expected);
    }
    let expired: rustls::Error = PeerError::Expired {
        not_after: 1,
        now: 2,
    }
    .into();
    let wrapped = io::Error::other(Wrapper(expired));
    assert_eq!(io_failure_reason(&wrapped), "expired");
    assert_eq!(
        io_failure_reason(&io::Error::from(io::ErrorKind::TimedOut)),
        "timeout"
    );
    assert_eq!(
        io_failure_reason(&io::Error::from(io::ErrorKind::UnexpectedEof)),
        "io"
    );
}

/// An error whose source is the rustls error, as a layer between tokio-rustls and the proxy
/// might wrap it.
#[derive(Debug)]
struct Wrapper(rustls::Error);

impl fmt::Display for Wrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("handshake")
    }
}

impl std::error::Error for Wrapper {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[test]
fn server_verifier_checks_the_expected_id() {
    let root = root("root");
    let leaf = sign(&leaf_params(ID), &root);
    let inner = Arc::new(verifier_for(&[("example.org", &root)]));
    let name = ServerName::try_from("ignored.invalid").unwrap();

    let want = SpiffeId::new(ID).unwrap();
    let matching = ServerVerifier::new(
        Arc::clone(&inner),
        Arc::new(move |id: &SpiffeId| *id == want),
        ID.to_owned(),
    );
    assert!(matching
        .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
        .is_ok());

    let other = ServerVerifier::new(
        inner,
        Arc::new(|id: &SpiffeId| id.path() == "/db"),
        "spiffe://example.org/db".to_owned(),
    );
    let err = other
        .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
        .unwrap_err();
    assert_eq!(failure_reason(&err), "unexpected_peer");
    let peer = peer_error(&err).unwrap();
    assert_eq!(
        peer.to_string(),
        format!("peer is {ID}, expected spiffe://example.org/db")
    );
}

#[test]
fn client_verifier_requires_an_svid() {
    let root = root("root");
    let leaf = sign(&leaf_params(ID), &root);
    let verifier = ClientVerifier::new(Arc::new(verifier_for(&[("example.org", &root)])));
    assert!(verifier.client_auth_mandatory());
    assert!(verifier.root_hint_subjects().is_empty());
    assert!(!verifier.supported_verify_schemes().is_empty());
    assert!(verifier
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .is_ok());
    let mut params = leaf_params(ID);
    params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    let bad = sign(&params, &root);
    let err = verifier
        .verify_client_cert(&bad, &[], UnixTime::now())
        .unwrap_err();
    assert_eq!(failure_reason(&err), "key_usage");
}

#[test]
fn verified_chains_are_remembered_only_within_their_validity_and_role() {
    let root = root("root");
    let inter = intermediate("inter", &root);
    let mut params = leaf_params(ID);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = sign(&params, &inter);
    let chain = [inter.cert.clone()];
    let verifier = verifier_for(&[("example.org", &root)]);
    let now = UnixTime::now();
    for _ in 0..3 {
        let id = verifier
            .verify(&leaf, &chain, now, PeerRole::Client)
            .unwrap();
        assert_eq!(id.to_string(), ID);
    }
    // The remembered chain is not an answer for the other role (EKU clientAuth only) ...
    assert_eq!(
        reason(&verifier, &leaf, &chain, PeerRole::Server),
        "key_usage"
    );
    // ... nor past its certificates' validity, nor before it.
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.as_secs() + 7200));
    let err = verifier
        .verify(&leaf, &chain, later, PeerRole::Client)
        .unwrap_err();
    assert_eq!(err.reason(), "expired", "{err}");
    let earlier = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.as_secs() - 3600));
    let err = verifier
        .verify(&leaf, &chain, earlier, PeerRole::Client)
        .unwrap_err();
    assert_eq!(err.reason(), "not_yet_valid", "{err}");
    // The same leaf with different intermediates is a different chain.
    assert_eq!(reason(&verifier, &leaf, &[], PeerRole::Client), "untrusted");
    assert!(verifier
        .verify(&leaf, &chain, now, PeerRole::Client)
        .is_ok());
}

fn crl(by: &Ca, revoked: &[&CertificateDer<'_>]) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::hours(1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|c| {
                let (_, cert) = x509_parser::parse_x509_certificate(c).unwrap();
                rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(&by.issuer).unwrap().der().to_vec()
}

#[test]
fn revoked_certificates_are_refused_at_any_depth() {
    use crate::tls::revocation::Revocations;
    let root = root("root");
    let inter = intermediate("intermediate", &root);
    let leaf = sign(&leaf_params(ID), &inter);
    let other = sign(&leaf_params(ID), &inter);
    let verifier = verifier_for(&[("example.org", &root)]);
    let inters = std::slice::from_ref(&inter.cert);
    // Verified (and cached) before the revocation: the next check sees the new list anyway.
    assert!(verifier
        .verify(&leaf, inters, UnixTime::now(), PeerRole::Client)
        .is_ok());
    let set = Revocations::from_der(&[crl(&inter, &[&leaf])]).unwrap();
    assert_eq!(set.len(), 1);
    assert!(set
        .revoked_in(&[leaf.clone(), inter.cert.clone()])
        .is_some());
    assert!(set
        .revoked_in(&[other.clone(), inter.cert.clone()])
        .is_none());
    verifier.set_revocations(set);
    for role in [PeerRole::Client, PeerRole::Server] {
        assert_eq!(reason(&verifier, &leaf, inters, role), "revoked");
        assert!(verifier
            .verify(&other, inters, UnixTime::now(), role)
            .is_ok());
    }
    // The intermediate revoked by the root: everything under it.
    verifier.set_revocations(Revocations::from_der(&[crl(&root, &[&inter.cert])]).unwrap());
    assert_eq!(
        reason(&verifier, &other, inters, PeerRole::Client),
        "revoked"
    );
    // An empty list revokes nothing.
    verifier.set_revocations(Revocations::from_der(&[crl(&inter, &[])]).unwrap());
    assert!(verifier
        .verify(&leaf, inters, UnixTime::now(), PeerRole::Client)
        .is_ok());
    // A CRL in the intermediate's name signed by another key is no CRL of it: refused, closed.
    let impostor = Ca {
        cert: inter.cert.clone(),
        issuer: Issuer::new(ca_params("intermediate"), KeyPair::generate().unwrap()),
    };
    verifier.set_revocations(Revocations::from_der(&[crl(&impostor, &[&other])]).unwrap());
    assert_ne!(
        verifier
            .verify(&leaf, inters, UnixTime::now(), PeerRole::Client)
            .map_err(|e| e.reason())
            .err(),
        None
    );
}

#[test]
fn malformed_crls_are_refused_with_the_position() {
    use crate::tls::revocation::Revocations;
    let root = root("root");
    let good = crl(&root, &[]);
    for bad in [
        Vec::new(),
        vec![0x30, 0x03, 0x02, 0x01],
        good[..good.len() - 1].to_vec(),
        [good.clone(), vec![0]].concat(),
        root.cert.to_vec(),
    ] {
        let err = Revocations::from_der(&[good.clone(), bad]).unwrap_err();
        assert_eq!(err.index, 1, "{err}");
    }
}

#[test]
fn a_crl_set_digest_names_the_set_whatever_its_order() {
    use crate::tls::revocation::set_digest;
    let (a, b) = (crl(&root("a"), &[]), crl(&root("b"), &[]));
    let ab = set_digest(&[a.clone(), b.clone()]);
    assert_eq!(ab, set_digest(&[b.clone(), a.clone()]));
    assert_eq!(ab.len(), 32);
    assert!(ab
        .bytes()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_ne!(ab, set_digest(std::slice::from_ref(&a)));
    assert_ne!(set_digest(&[]), set_digest(&[Vec::new()]));
    // Length-prefixed: splitting the same bytes differently is another set.
    let joined = [a.clone(), b.clone()].concat();
    assert_ne!(ab, set_digest(&[joined]));
}
