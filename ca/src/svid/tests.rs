use super::*;

use rcgen::{CertificateParams, KeyPair};
use x509_parser::prelude::{FromDer, X509Certificate};

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A root issuer and an intermediate issuer under it, the intermediate valid for `inter_ttl`.
fn pki(inter_ttl: Duration) -> (Issuer, Issuer) {
    let root_key = CaKey::generate(KeyType::EcP256).unwrap();
    let root_cert = generate_root(&td(), &root_key, 24 * HOUR, now()).unwrap();
    let root = Issuer::new(root_cert, root_key, Vec::new()).unwrap();
    let inter_key = CaKey::generate(KeyType::EcP256).unwrap();
    let inter_cert = generate_intermediate(&root, &td(), &inter_key, inter_ttl, now()).unwrap();
    let inter = Issuer::new(inter_cert, inter_key, root.chain_for_child()).unwrap();
    (root, inter)
}

fn csr_der(alg: &'static SignatureAlgorithm) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn dns_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A DER TLV with definite length.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// A hand-made CSR with an RSA key of `bits` bits (a fake modulus) and a junk signature under
/// the signature algorithm `sig_oid` (DER content of the OID).
fn rsa_csr(bits: usize, sig_oid: &[u8]) -> Vec<u8> {
    let mut modulus = vec![0u8];
    modulus.extend(std::iter::repeat_n(0xc5, bits / 8));
    let rsa_key = tlv(
        0x30,
        &[tlv(0x02, &modulus), tlv(0x02, &[0x01, 0x00, 0x01])].concat(),
    );
    let mut bits_content = vec![0u8];
    bits_content.extend(rsa_key);
    let rsa_oid = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let spki = tlv(
        0x30,
        &[
            tlv(0x30, &[tlv(0x06, &rsa_oid), vec![0x05, 0x00]].concat()),
            tlv(0x03, &bits_content),
        ]
        .concat(),
    );
    let cri = tlv(
        0x30,
        &[
            vec![0x02, 0x01, 0x00],
            vec![0x30, 0x00],
            spki,
            vec![0xa0, 0x00],
        ]
        .concat(),
    );
    let mut sig = vec![0u8];
    sig.extend(std::iter::repeat_n(0x42, bits / 8));
    tlv(
        0x30,
        &[
            cri,
            tlv(0x30, &[tlv(0x06, sig_oid), vec![0x05, 0x00]].concat()),
            tlv(0x03, &sig),
        ]
        .concat(),
    )
}

const SHA256_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
const SHA1_WITH_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];

#[test]
fn key_type_names() {
    assert_eq!(KeyType::default(), KeyType::EcP256);
    for kt in [KeyType::EcP256, KeyType::EcP384] {
        assert_eq!(kt.to_string().parse::<KeyType>().unwrap(), kt);
    }
    assert_eq!("ec-p384".parse::<KeyType>().unwrap(), KeyType::EcP384);
    let err = "rsa-2048".parse::<KeyType>().unwrap_err();
    assert!(err.to_string().contains("ec-p256"), "{err}");
}

#[test]
fn ca_key_pem_round_trip_and_redaction() {
    for kt in [KeyType::EcP256, KeyType::EcP384] {
        let key = CaKey::generate(kt).unwrap();
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = CaKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.key_type(), kt);
        assert_eq!(back.public_key_spki_der(), key.public_key_spki_der());
        assert_eq!(*back.to_pkcs8_der(), *key.to_pkcs8_der());

        let debug = format!("{key:?}");
        let body: String = pem.lines().nth(1).unwrap().chars().take(24).collect();
        assert!(!debug.contains(&body), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }
    // The SPKI we build by hand matches rcgen's encoding.
    let key = CaKey::generate(KeyType::EcP384).unwrap();
    let x = yasna_free_spki(&key);
    assert_eq!(x, key.public_key_spki_der());

    let err =
        CaKey::from_pkcs8_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .unwrap_err();
    assert!(matches!(err, SvidError::InvalidKey(_)), "{err}");
    assert!(matches!(
        CaKey::from_pkcs8_pem("not pem").unwrap_err(),
        SvidError::InvalidKey(_)
    ));
}

/// rcgen's own SubjectPublicKeyInfo encoding of the key's raw public point.
fn yasna_free_spki(key: &CaKey) -> Vec<u8> {
    struct Raw<'a>(&'a CaKey);
    impl PublicKeyData for Raw<'_> {
        fn der_bytes(&self) -> &[u8] {
            self.0.der_bytes()
        }
        fn algorithm(&self) -> &'static SignatureAlgorithm {
            self.0.algorithm()
        }
    }
    Raw(key).subject_public_key_info()
}

#[test]
fn root_and_intermediate_profiles() {
    let (root, inter) = pki(HOUR);
    let r = parse(root.cert());
    assert!(root.is_self_signed());
    assert!(r.is_ca());
    assert!(r.basic_constraints().unwrap().unwrap().critical);
    let ku = r.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert_eq!(uri_sans(&r), vec!["spiffe://example.org".to_string()]);
    assert_eq!(r.validity().not_before.timestamp(), unix(now()) - 10);
    assert!(r.verify_signature(None).is_ok());
    assert!(r.tbs_certificate.serial.bits() >= 120);

    let i = parse(inter.cert());
    assert!(!inter.is_self_signed());
    let bc = i.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    assert_eq!(uri_sans(&i), vec!["spiffe://example.org".to_string()]);
    assert_eq!(i.issuer().as_raw(), r.subject().as_raw());
    assert!(i.verify_signature(Some(r.public_key())).is_ok());
    assert!(i.authority_key_identifier_present());
    assert_eq!(inter.trust_domain().unwrap().as_str(), "example.org");
    assert_eq!(inter.chain_to_root().len(), 0);
    assert_ne!(r.subject().as_raw(), i.subject().as_raw());
}

trait AkiPresent {
    fn authority_key_identifier_present(&self) -> bool;
}

impl AkiPresent for X509Certificate<'_> {
    fn authority_key_identifier_present(&self) -> bool {
        self.iter_extensions().any(|e| {
            matches!(
                e.parsed_extension(),
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(_)
            )
        })
    }
}

#[test]
fn intermediate_capped_at_parent() {
    let root_key = CaKey::generate(KeyType::EcP256).unwrap();
    let root_cert = generate_root(&td(), &root_key, HOUR, now()).unwrap();
    let root = Issuer::new(root_cert, root_key, Vec::new()).unwrap();
    let key = CaKey::generate(KeyType::EcP384).unwrap();
    let cert = generate_intermediate(&root, &td(), &key, 48 * HOUR, now()).unwrap();
    assert_eq!(
        parse(&cert).validity().not_after.timestamp(),
        root.not_after()
    );
    let other = TrustDomain::new("other.org").unwrap();
    let err = generate_intermediate(&root, &other, &key, HOUR, now()).unwrap_err();
    assert!(matches!(err, SvidError::WrongTrustDomain { .. }), "{err}");
}

#[test]
fn malformed_csrs() {
    let good = csr_der(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut trailing = good.clone();
    trailing.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("garbage", b"this is not a certificate request".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("one byte short", good[..good.len() - 1].to_vec()),
        ("trailing data", trailing),
        ("a certificate", {
            let (_, inter) = pki(HOUR);
            inter.cert().to_vec()
        }),
    ];
    for (name, der) in cases {
        let err = parse_csr(&der).unwrap_err();
        assert!(matches!(err, SvidError::Malformed), "{name}: {err}");
        // The message names no bytes of the request.
        assert_eq!(
            err.to_string(),
            "malformed CSR: expected a DER-encoded PKCS#10 certification request"
        );
    }
    assert!(matches!(
        parse_csr_pem("-----BEGIN NOTHING-----").unwrap_err(),
        SvidError::Malformed
    ));
}

#[test]
fn csr_pem_accepted() {
    let key = KeyPair::generate().unwrap();
    let pem = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let csr = parse_csr_pem(&pem).unwrap();
    assert_eq!(csr.key_type(), CsrKeyType::EcP256);
    assert_eq!(csr.spki_der(), key.subject_public_key_info());
}

#[test]
fn corrupted_signature_is_refused() {
    let good = csr_der(&rcgen::PKCS_ECDSA_P256_SHA256);
    parse_csr(&good).unwrap();
    // The signature is the last element: corrupt one byte of it (keeping the DER valid).
    let mut bad = good.clone();
    let at = bad.len() - 3;
    bad[at] ^= 0x01;
    assert!(matches!(
        parse_csr(&bad).unwrap_err(),
        SvidError::BadSignature
    ));

    // Corrupt the signed content instead: the public key no longer matches the signature.
    let mut bad = good;
    let at = bad.len() / 2;
    bad[at] ^= 0x01;
    let err = parse_csr(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            SvidError::BadSignature | SvidError::Malformed | SvidError::UnsupportedKey(_)
        ),
        "{err}"
    );
}

#[test]
fn supported_csr_keys() {
    for (alg, kind) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, CsrKeyType::EcP256),
        (&rcgen::PKCS_ECDSA_P384_SHA384, CsrKeyType::EcP384),
        (&rcgen::PKCS_ED25519, CsrKeyType::Ed25519),
    ] {
        let csr = parse_csr(&csr_der(alg)).unwrap();
        assert_eq!(csr.key_type(), kind);
        let (_, inter) = pki(HOUR);
        let svid = sign_x509_svid(
            &inter,
            &csr,
            &id("spiffe://example.org/w"),
            &[],
            HOUR,
            now(),
        )
        .unwrap();
        let leaf = parse(&svid.chain[0]);
        assert_eq!(leaf.public_key().raw, csr.spki_der());
        assert!(leaf
            .verify_signature(Some(parse(inter.cert()).public_key()))
            .is_ok());
    }
}

#[test]
fn unsupported_csr_keys() {
    // P-256 (1.2.840.10045.3.1.7) turned into prime239v1 (1.2.840.10045.3.1.4).
    let mut other_curve = csr_der(&rcgen::PKCS_ECDSA_P256_SHA256);
    let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let at = other_curve
        .windows(p256.len())
        .position(|w| w == p256)
        .unwrap();
    other_curve[at + p256.len() - 1] = 0x04;
    let err = parse_csr(&other_curve).unwrap_err();
    assert!(matches!(err, SvidError::UnsupportedKey(_)), "{err}");
    assert!(err.to_string().contains("1.2.840.10045.3.1.4"), "{err}");

    let err = parse_csr(&rsa_csr(1024, SHA256_WITH_RSA)).unwrap_err();
    assert!(matches!(err, SvidError::UnsupportedKey(_)), "{err}");
    assert!(err.to_string().contains("RSA key of 1024 bits"), "{err}");

    // A 2048-bit key passes the key check; its junk signature does not verify.
    let err = parse_csr(&rsa_csr(2048, SHA256_WITH_RSA)).unwrap_err();
    assert!(matches!(err, SvidError::BadSignature), "{err}");

    // SHA-1 signatures are refused before any verification.
    let err = parse_csr(&rsa_csr(2048, SHA1_WITH_RSA)).unwrap_err();
    assert!(
        matches!(err, SvidError::UnsupportedSignatureAlgorithm(_)),
        "{err}"
    );
}

#[test]
fn csr_requests_are_ignored() {
    let (_, inter) = pki(HOUR);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI(
        Ia5String::try_from("spiffe://evil.example/admin").unwrap(),
    ));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, "evil");
    let der = params.serialize_request(&key).unwrap().der().to_vec();

    let csr = parse_csr(&der).unwrap();
    let want = id("spiffe://example.org/ns/prod/sa/web");
    let svid = sign_x509_svid(
        &inter,
        &csr,
        &want,
        &["web.example.org".to_string()],
        HOUR,
        now(),
    )
    .unwrap();
    let leaf = parse(&svid.chain[0]);
    assert_eq!(uri_sans(&leaf), vec![want.to_string()]);
    assert_eq!(dns_sans(&leaf), vec!["web.example.org".to_string()]);
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign() && !ku.value.key_encipherment());
    let cns: Vec<_> = leaf
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().unwrap().to_string())
        .collect();
    assert_eq!(cns, vec!["web.example.org".to_string()]);
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
}

#[test]
fn leaf_profile_and_chain() {
    let (root, inter) = pki(HOUR);
    let key = CaKey::generate(KeyType::EcP256).unwrap();
    let svid = sign_x509_svid_with_key(
        &inter,
        &key,
        &id("spiffe://example.org/w"),
        &[],
        Duration::from_secs(600),
        now(),
    )
    .unwrap();
    assert_eq!(svid.chain.len(), 2);
    assert_eq!(&svid.chain[1], inter.cert());
    assert_eq!(svid.not_before, unix(now()) - 10);
    assert_eq!(svid.not_after, unix(now()) + 600);
    assert_eq!(svid.serial.len(), 32);
    assert!(svid
        .serial
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

    let leaf = parse(&svid.chain[0]);
    assert_eq!(hex::encode(leaf.raw_serial()), svid.serial);
    assert_eq!(leaf.validity().not_before.timestamp(), svid.not_before);
    assert_eq!(leaf.validity().not_after.timestamp(), svid.not_after);
    assert_eq!(leaf.public_key().raw, key.public_key_spki_der());
    // No DNS name: the subject is O=meshid alone and no DNS SAN is written.
    assert_eq!(leaf.subject().iter_common_name().count(), 0);
    assert_eq!(leaf.subject().iter_organization().count(), 1);
    assert!(dns_sans(&leaf).is_empty());

    // Signed by the root itself: the root is left out of the chain.
    let svid =
        sign_x509_svid_with_key(&root, &key, &id("spiffe://example.org/w"), &[], HOUR, now())
            .unwrap();
    assert_eq!(svid.chain.len(), 1);

    // Serials differ between signatures.
    let again = sign_x509_svid_with_key(
        &inter,
        &key,
        &id("spiffe://example.org/w"),
        &[],
        HOUR,
        now(),
    )
    .unwrap();
    assert_ne!(again.serial, svid.serial);
}

#[test]
fn no_path_id_refused() {
    let (_, inter) = pki(HOUR);
    let csr = parse_csr(&csr_der(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap();
    let err =
        sign_x509_svid(&inter, &csr, &id("spiffe://example.org"), &[], HOUR, now()).unwrap_err();
    assert!(matches!(err, SvidError::NoPath(_)), "{err}");
}

#[test]
fn other_trust_domain_refused() {
    let (_, inter) = pki(HOUR);
    let csr = parse_csr(&csr_der(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap();
    let err =
        sign_x509_svid(&inter, &csr, &id("spiffe://other.org/w"), &[], HOUR, now()).unwrap_err();
    assert!(matches!(err, SvidError::WrongTrustDomain { .. }), "{err}");
}

#[test]
fn not_after_capped_at_issuer() {
    let (_, inter) = pki(HOUR);
    let csr = parse_csr(&csr_der(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap();
    let svid = sign_x509_svid(
        &inter,
        &csr,
        &id("spiffe://example.org/w"),
        &[],
        24 * HOUR,
        now(),
    )
    .unwrap();
    assert_eq!(svid.not_after, inter.not_after());
    assert_eq!(
        parse(&svid.chain[0]).validity().not_after.timestamp(),
        inter.not_after()
    );

    // At or after the issuer's notAfter, nothing is issued.
    let late = UNIX_EPOCH + Duration::from_secs(inter.not_after() as u64);
    let err =
        sign_x509_svid(&inter, &csr, &id("spiffe://example.org/w"), &[], HOUR, late).unwrap_err();
    assert!(matches!(err, SvidError::IssuerExpired { .. }), "{err}");
}

#[test]
fn bad_lifetimes_and_names_refused() {
    let (_, inter) = pki(HOUR);
    let csr = parse_csr(&csr_der(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap();
    let w = id("spiffe://example.org/w");
    for ttl in [Duration::ZERO, Duration::from_millis(500)] {
        let err = sign_x509_svid(&inter, &csr, &w, &[], ttl, now()).unwrap_err();
        assert!(matches!(err, SvidError::InvalidTtl(_)), "{err}");
    }
    let err = sign_x509_svid(&inter, &csr, &w, &[], HOUR, UNIX_EPOCH - HOUR).unwrap_err();
    assert!(matches!(err, SvidError::InvalidTime), "{err}");
    for bad in [
        "",
        "-bad.example",
        "a..b",
        "spaces in.name",
        "ünicode.example",
    ] {
        let err = sign_x509_svid(&inter, &csr, &w, &[bad.to_string()], HOUR, now()).unwrap_err();
        assert!(matches!(err, SvidError::InvalidDnsName(_)), "{bad}: {err}");
    }
    let root_key = CaKey::generate(KeyType::EcP256).unwrap();
    let err = generate_root(&td(), &root_key, Duration::from_secs(u64::MAX), now()).unwrap_err();
    assert!(matches!(err, SvidError::InvalidTtl(_)), "{err}");
}

#[test]
fn long_dns_name_not_used_as_cn() {
    let (_, inter) = pki(HOUR);
    let csr = parse_csr(&csr_der(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap();
    let long = format!("{}.example.org", "a".repeat(60));
    let svid = sign_x509_svid(
        &inter,
        &csr,
        &id("spiffe://example.org/w"),
        std::slice::from_ref(&long),
        HOUR,
        now(),
    )
    .unwrap();
    let leaf = parse(&svid.chain[0]);
    assert_eq!(leaf.subject().iter_common_name().count(), 0);
    assert_eq!(dns_sans(&leaf), vec![long]);
}

#[test]
fn issuer_checks() {
    let (root, inter) = pki(HOUR);

    // A leaf is not a CA.
    let key = CaKey::generate(KeyType::EcP256).unwrap();
    let svid = sign_x509_svid_with_key(
        &inter,
        &key,
        &id("spiffe://example.org/w"),
        &[],
        HOUR,
        now(),
    )
    .unwrap();
    let err = Issuer::new(svid.chain[0].clone(), key, Vec::new()).unwrap_err();
    assert!(matches!(err, SvidError::IssuerNotCa), "{err}");

    // The wrong key for the certificate.
    let other = CaKey::generate(KeyType::EcP256).unwrap();
    let err = Issuer::new(root.cert().clone(), other, Vec::new()).unwrap_err();
    assert!(matches!(err, SvidError::KeyMismatch), "{err}");

    // Not a certificate at all.
    let other = CaKey::generate(KeyType::EcP256).unwrap();
    let err = Issuer::new(CertificateDer::from(vec![1, 2, 3]), other, Vec::new()).unwrap_err();
    assert!(matches!(err, SvidError::InvalidIssuer(_)), "{err}");

    // An upper chain must hold CA certificates.
    let err = Issuer::new(
        inter.cert().clone(),
        CaKey::from_pkcs8_der(&inter.key().to_pkcs8_der()).unwrap(),
        vec![svid.chain[0].clone()],
    )
    .unwrap_err();
    assert!(matches!(err, SvidError::IssuerNotCa), "{err}");

    // Debug output names no key.
    let debug = format!("{inter:?}");
    assert!(debug.contains("redacted"), "{debug}");
}

#[test]
fn modulus_sizes() {
    assert_eq!(modulus_bits(&[]), 0);
    assert_eq!(modulus_bits(&[0, 0]), 0);
    assert_eq!(modulus_bits(&[0x80]), 8);
    assert_eq!(modulus_bits(&[0, 0x01, 0xff]), 9);
    let mut m = vec![0u8];
    m.extend([0xff; 256]);
    assert_eq!(modulus_bits(&m), 2048);
}

#[test]
fn shareable_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Issuer>();
    send_sync::<CaKey>();
    send_sync::<Csr>();
    send_sync::<crate::jwt::JwtKey>();
}

#[test]
fn cross_signing_reproduces_the_root_and_refuses_what_it_cannot_encode() {
    let (root, _) = pki(Duration::from_secs(600));
    let key = CaKey::generate(KeyType::EcP256).unwrap();
    let next = generate_root(&td(), &key, Duration::from_secs(7200), now()).unwrap();
    let cross = cross_sign(&root, &next, now()).unwrap();
    let (c, n) = (parse(&cross), parse(&next));
    assert_eq!(c.subject().as_raw(), n.subject().as_raw());
    assert_eq!(c.public_key().raw, n.public_key().raw);
    assert_eq!(c.issuer().as_raw(), parse(root.cert()).subject().as_raw());
    assert!(c.validity().not_after.timestamp() <= root.not_after());
    assert!(c
        .verify_signature(Some(parse(root.cert()).public_key()))
        .is_ok());
    // Found by the cross_sign fuzz target: a subject attribute whose OID DER cannot encode
    // (first arc 5) made the encoder panic; it is an error now.
    let bad =
        CertificateDer::from(include_bytes!("testdata/cross-sign-unencodable-oid.der").to_vec());
    assert!(cross_sign(&root, &bad, now()).is_err());
    // Also found by it: a PrintableString with '?' (which the encoder refuses to write).
    let bad = CertificateDer::from(
        include_bytes!("testdata/cross-sign-printable-question-mark.der").to_vec(),
    );
    assert!(cross_sign(&root, &bad, now()).is_err());
    // Also found by it: a PrintableString with '?' (which the encoder refuses to write).
    let bad = CertificateDer::from(
        include_bytes!("testdata/cross-sign-printable-question-mark.der").to_vec(),
    );
    assert!(cross_sign(&root, &bad, now()).is_err());
    // Not a certificate at all.
    assert!(cross_sign(&root, &CertificateDer::from(vec![0x30, 0x00]), now()).is_err());
}
