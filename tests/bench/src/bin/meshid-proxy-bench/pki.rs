//! PKI for haproxy, nginx and stunnel: root → intermediate → leaf, P-256, like meshid's CA.

use std::path::{Path, PathBuf};

use crate::cli::*;

/// PEM files of the bench PKI.
pub(crate) struct Pki {
    /// The root (trust anchor).
    pub(crate) ca: PathBuf,
    /// Leaf + intermediate.
    pub(crate) chain: PathBuf,
    /// The leaf's PKCS#8 key.
    pub(crate) key: PathBuf,
    /// Leaf + intermediate + key, as haproxy's `crt` wants.
    pub(crate) combined: PathBuf,
}

pub(crate) fn mint_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    };
    std::fs::create_dir_all(dir).unwrap();
    let p256 = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_params = |cn: &str, constraint| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(constraint);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root = CertifiedIssuer::self_signed(
        ca_params("bench root", BasicConstraints::Unconstrained),
        p256(),
    )
    .unwrap();
    let inter = CertifiedIssuer::signed_by(
        ca_params("bench intermediate", BasicConstraints::Constrained(0)),
        p256(),
        &root,
    )
    .unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    // The DNS name is for nginx, whose upstream verification always checks a host name
    // (`proxy_ssl_name`); the others check the chain only.
    leaf.subject_alt_names = vec![
        SanType::URI(BENCH_ID.try_into().unwrap()),
        SanType::DnsName("bench.invalid".try_into().unwrap()),
    ];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_key = p256();
    let leaf_cert = leaf.signed_by(&leaf_key, &inter).unwrap();
    let chain_pem = format!("{}{}", leaf_cert.pem(), inter.pem());
    let key_pem = leaf_key.serialize_pem();
    let pki = Pki {
        ca: dir.join("root.pem"),
        chain: dir.join("chain.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("combined.pem"),
    };
    std::fs::write(&pki.ca, root.pem()).unwrap();
    std::fs::write(&pki.chain, &chain_pem).unwrap();
    std::fs::write(&pki.key, &key_pem).unwrap();
    std::fs::write(&pki.combined, format!("{chain_pem}{key_pem}")).unwrap();
    pki
}
