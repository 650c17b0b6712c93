//! The X509-SVID profile: CA keys, root and intermediate certificates, CSRs in, leaf chains out.
//!
//! Everything here is pure: no I/O, no datastore and no clock (callers pass `now`). The
//! [`authority`](crate::authority) module stores the keys and certificates and calls these
//! functions.
//!
//! The identity of a workload SVID never comes from the CSR: [`parse_csr`] keeps only the
//! subject public key (after checking the CSR's self-signature, which proves possession of the
//! private key) and [`sign_x509_svid`] writes the SPIFFE ID and DNS names it is given.
//!
//! One function, `leaf_params`, builds the leaf profile of the X509-SVID specification for
//! both [`sign_x509_svid`] (from a CSR) and [`sign_x509_svid_with_key`] (from a key pair):
//! `CA:FALSE`, a critical keyUsage of digitalSignature (plus keyEncipherment for RSA keys only),
//! EKU serverAuth and clientAuth, exactly one URI SAN (the SPIFFE ID), the given DNS SANs, a
//! random positive 127-bit serial, a notBefore backdated by [`BACKDATE`] and a notAfter capped
//! at the issuer's.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING,
};
use rand::RngCore as _;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm, SigningKey,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};
use spiffe::{SpiffeId, TrustDomain};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;
use zeroize::Zeroizing;

/// How far notBefore is set before `now`, so that peers with a slightly slow clock accept a
/// fresh certificate.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// The organization (O) of every certificate meshid issues.
const ORGANIZATION: &str = "meshid";

/// The longest common name X.509 allows (`ub-common-name`).
const MAX_CN_LEN: usize = 64;

/// Smallest and largest RSA modulus accepted in a CSR, in bits.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// DER prefix of a P-256 SubjectPublicKeyInfo, up to the uncompressed point.
const SPKI_PREFIX_P256: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of a P-384 SubjectPublicKeyInfo, up to the uncompressed point.
const SPKI_PREFIX_P384: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

/// Errors of certificate generation, CSR parsing and SVID signing.
///
/// No variant carries key material or CSR bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// A key type name other than `ec-p256` or `ec-p384`.
    #[error("unknown key type {0:?}: expected \"ec-p256\" or \"ec-p384\"")]
    UnknownKeyType(String),
    /// A CA private key could not be loaded; the reason never includes the key.
    #[error("invalid CA private key: {0}")]
    InvalidKey(&'static str),
    /// The system random generator failed while generating a key.
    #[error("key generation failed")]
    KeyGeneration,
    /// The CSR is not a DER (or PEM) encoded PKCS#10 request.
    #[error("malformed CSR: expected a DER-encoded PKCS#10 certification request")]
    Malformed,
    /// The CSR's self-signature does not verify with its own public key.
    #[error("CSR signature does not verify with the CSR's public key")]
    BadSignature,
    /// The CSR's public key is of a type or size meshid does not certify.
    #[error("unsupported CSR key: {0}; use EC P-256, EC P-384, RSA 2048-8192 bits or Ed25519")]
    UnsupportedKey(String),
    /// The CSR is signed with an algorithm meshid does not accept (for example SHA-1).
    #[error("unsupported CSR signature algorithm {0}")]
    UnsupportedSignatureAlgorithm(String),
    /// The issuing certificate or its chain is unusable; the reason says why.
    #[error("invalid issuer certificate: {0}")]
    InvalidIssuer(&'static str),
    /// The issuing certificate is not a CA (basicConstraints `cA` is not true).
    #[error("issuer certificate is not a CA (basicConstraints cA is not true)")]
    IssuerNotCa,
    /// The CA key does not match the public key of the issuing certificate.
    #[error("CA key does not match the issuer certificate's public key")]
    KeyMismatch,
    /// The issuer has already expired at the signing time.
    #[error("issuer certificate expired at {not_after} (unix seconds)")]
    IssuerExpired {
        /// The issuer's notAfter, in Unix seconds.
        not_after: i64,
    },
    /// A workload SPIFFE ID without a path (a trust domain's own ID, reserved for CAs).
    #[error("spiffe id {0} has no path: workload SVIDs need a path")]
    NoPath(String),
    /// The SPIFFE ID belongs to another trust domain than the issuer's.
    #[error("spiffe id {id} is not in the issuer's trust domain {trust_domain}")]
    WrongTrustDomain {
        /// The SPIFFE ID asked for.
        id: String,
        /// The issuer's trust domain.
        trust_domain: String,
    },
    /// A DNS name that is not a valid SAN host name.
    #[error("invalid dns name {0:?}")]
    InvalidDnsName(String),
    /// A lifetime of zero, under one second, or past year 9999.
    #[error("invalid lifetime {0:?}: expected at least 1 second and an end before year 9999")]
    InvalidTtl(Duration),
    /// `now` is before the Unix epoch.
    #[error("time is before the unix epoch")]
    InvalidTime,
    /// rcgen failed to build or sign the certificate.
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
}

/// The key algorithm of a CA key (root or intermediate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    EcP256,
    /// ECDSA on P-384 with SHA-384.
    EcP384,
}

impl KeyType {
    /// The configuration name: `ec-p256` or `ec-p384`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
        }
    }

    fn signing_alg(self) -> &'static EcdsaSigningAlgorithm {
        match self {
            KeyType::EcP256 => &ECDSA_P256_SHA256_ASN1_SIGNING,
            KeyType::EcP384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
        }
    }

    fn rcgen_alg(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    fn spki_prefix(self) -> &'static [u8] {
        match self {
            KeyType::EcP256 => SPKI_PREFIX_P256,
            KeyType::EcP384 => SPKI_PREFIX_P384,
        }
    }
}

impl FromStr for KeyType {
    type Err = SvidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ec-p256" => Ok(KeyType::EcP256),
            "ec-p384" => Ok(KeyType::EcP384),
            other => Err(SvidError::UnknownKeyType(other.to_owned())),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CA signing key (ECDSA P-256 or P-384), for a root or an intermediate.
///
/// The PKCS#8 copy it holds is zeroized on drop; `Debug` shows only the key type.
pub struct CaKey {
    key_type: KeyType,
    pair: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    spki: Vec<u8>,
}

impl CaKey {
    /// Generates a fresh key of type `key_type`.
    pub fn generate(key_type: KeyType) -> Result<Self, SvidError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(key_type.signing_alg(), &rng)
            .map_err(|_| SvidError::KeyGeneration)?;
        Self::from_pkcs8_der(doc.as_ref())
    }

    /// Loads a PKCS#8 DER private key (EC P-256 or P-384; the curve is detected).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, SvidError> {
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            if let Ok(pair) = EcdsaKeyPair::from_pkcs8(key_type.signing_alg(), der) {
                let mut spki = key_type.spki_prefix().to_vec();
                spki.extend_from_slice(pair.public_key().as_ref());
                return Ok(CaKey {
                    key_type,
                    pair,
                    pkcs8: Zeroizing::new(der.to_vec()),
                    spki,
                });
            }
        }
        Err(SvidError::InvalidKey(
            "not a PKCS#8 EC P-256 or P-384 private key",
        ))
    }

    /// Loads a PEM `PRIVATE KEY` (PKCS#8) block.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SvidError> {
        let der = Zeroizing::new(
            PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| SvidError::InvalidKey("no PEM PRIVATE KEY block"))?,
        );
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// The private key as PKCS#8 DER, zeroized when dropped.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        self.pkcs8.clone()
    }

    /// The private key as a PEM `PRIVATE KEY` block, zeroized when dropped.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        meshid_api::files::pem_secret("PRIVATE KEY", &self.pkcs8)
    }

    /// The public key as a DER SubjectPublicKeyInfo.
    pub fn public_key_spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The key's algorithm.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKey")
            .field("key_type", &self.key_type)
            .field("private_key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.key_type.rcgen_alg()
    }

    fn subject_public_key_info(&self) -> Vec<u8> {
        self.spki.clone()
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.pair
            .sign(&SystemRandom::new(), msg)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

/// An issuing CA: its certificate, its key and the certificates above it.
///
/// Built once by [`Issuer::new`], which checks the certificate, and reused for every signature.
pub struct Issuer {
    cert: CertificateDer<'static>,
    not_after: i64,
    chain_to_root: Vec<CertificateDer<'static>>,
    trust_domain: Option<TrustDomain>,
    self_signed: bool,
    signer: rcgen::Issuer<'static, CaKey>,
}

impl Issuer {
    /// Signs a certificate revocation list (RFC 5280 section 5) in this issuer's name: CRL
    /// number `number`, thisUpdate `this_update`, nextUpdate `next_update` (Unix seconds), and
    /// one entry per `(serial, revoked_at)` (serial in hex, as [`IssuedSvid::serial`]) with the
    /// reason keyCompromise left out (the reason is in the CA's records; relying parties act
    /// on the entry alone). The authority key identifier names this issuer's key.
    pub fn sign_crl(
        &self,
        number: u64,
        this_update: i64,
        next_update: i64,
        revoked: &[(String, i64)],
    ) -> Result<Vec<u8>, SvidError> {
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for (serial, at) in revoked {
            let bytes = hex::decode(serial)
                .map_err(|_| SvidError::InvalidIssuer("a revoked serial is not hex"))?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: to_datetime(*at)?,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: to_datetime(this_update)?,
            next_update: to_datetime(next_update)?,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.signer)
            .map_err(SvidError::Generate)?;
        Ok(crl.der().to_vec())
    }

    /// Builds an issuer from its DER certificate, its key and `upper_chain`: the intermediates
    /// between this certificate and the root, nearest first, without the root (empty for an
    /// intermediate signed directly by the root, and for a root).
    ///
    /// Checks that the certificate is a CA (basicConstraints `cA` true, keyCertSign if keyUsage
    /// is present), that `key` is its key, and that leaves will name it exactly as its subject.
    pub fn new(
        cert: CertificateDer<'static>,
        key: CaKey,
        upper_chain: Vec<CertificateDer<'static>>,
    ) -> Result<Self, SvidError> {
        let x509 = parse_cert(&cert)?;
        check_ca(&x509)?;
        if x509.public_key().raw != key.public_key_spki_der() {
            return Err(SvidError::KeyMismatch);
        }
        for upper in &upper_chain {
            check_ca(&parse_cert(upper)?)?;
        }
        let not_after = x509.validity().not_after.timestamp();
        let trust_domain = ca_trust_domain(&x509)?;
        if x509.subject().iter().any(|rdn| rdn.iter().next().is_none()) {
            // rcgen panics on an empty RDN; refuse it here.
            return Err(SvidError::InvalidIssuer("empty RDN in the subject name"));
        }
        let self_signed = x509.subject().as_raw() == x509.issuer().as_raw()
            && x509.verify_signature(None).is_ok();
        let signer = rcgen::Issuer::from_ca_cert_der(&cert, key).map_err(|_| {
            SvidError::InvalidIssuer("subject name or extensions not supported by rcgen")
        })?;

        // rcgen re-encodes the issuer name; prove once that it matches the subject byte for byte,
        // and that the key signs verifiable certificates, before any leaf depends on it.
        let mut probe = CertificateParams::default();
        probe.distinguished_name = DistinguishedName::new();
        probe.serial_number = Some(SerialNumber::from_slice(&[1]));
        let probe = probe
            .signed_by(signer.key(), &signer)
            .map_err(SvidError::Generate)?;
        let probe = parse_cert(probe.der())?;
        if probe.issuer().as_raw() != x509.subject().as_raw() {
            return Err(SvidError::InvalidIssuer(
                "subject name cannot be reproduced exactly in issued certificates",
            ));
        }
        if probe.verify_signature(Some(x509.public_key())).is_err() {
            return Err(SvidError::KeyMismatch);
        }
        drop(x509);

        Ok(Issuer {
            cert,
            not_after,
            chain_to_root: upper_chain,
            trust_domain,
            self_signed,
            signer,
        })
    }

    /// The issuer's certificate (DER).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The issuer's key.
    pub fn key(&self) -> &CaKey {
        self.signer.key()
    }

    /// The issuer's notAfter, in Unix seconds; nothing it signs outlives it.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The intermediates above this issuer, nearest first, without the root.
    pub fn chain_to_root(&self) -> &[CertificateDer<'static>] {
        &self.chain_to_root
    }

    /// The trust domain of the issuer's SPIFFE ID (its URI SAN), if it has one.
    pub fn trust_domain(&self) -> Option<&TrustDomain> {
        self.trust_domain.as_ref()
    }

    /// Whether the issuer is a self-signed root.
    pub fn is_self_signed(&self) -> bool {
        self.self_signed
    }

    /// The `upper_chain` to pass to [`Issuer::new`] for a CA this issuer signs: this certificate
    /// and the chain above it, or nothing when this issuer is the root.
    pub fn chain_for_child(&self) -> Vec<CertificateDer<'static>> {
        let mut chain = Vec::with_capacity(self.chain_to_root.len() + 1);
        if !self.self_signed {
            chain.push(self.cert.clone());
        }
        chain.extend(self.chain_to_root.iter().cloned());
        chain
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field(
                "trust_domain",
                &self.trust_domain.as_ref().map(|td| td.as_str()),
            )
            .field("not_after", &self.not_after)
            .field("self_signed", &self.self_signed)
            .field("chain_to_root", &self.chain_to_root.len())
            .field("key", self.signer.key())
            .finish_non_exhaustive()
    }
}

/// Generates a self-signed root for trust domain `td`, valid from `now` - [`BACKDATE`] for
/// `ttl`: CA:TRUE (critical, no path length limit), keyUsage keyCertSign and cRLSign
/// (critical), URI SAN `spiffe://<td>`, subject `O=meshid, CN=meshid root <tag> <td>`.
pub fn generate_root(
    td: &TrustDomain,
    key: &CaKey,
    ttl: Duration,
    now: SystemTime,
) -> Result<CertificateDer<'static>, SvidError> {
    let (not_before, not_after) = validity(now, ttl, None)?;
    let params = ca_params(
        td,
        "root",
        BasicConstraints::Unconstrained,
        not_before,
        not_after,
    )?;
    let cert = params.self_signed(key).map_err(SvidError::Generate)?;
    Ok(cert.into())
}

/// Generates an intermediate CA for trust domain `td` with key `key`, signed by `parent`:
/// CA:TRUE with path length 0, keyUsage keyCertSign and cRLSign (critical), URI SAN
/// `spiffe://<td>`, authority key identifier; notAfter is capped at the parent's.
pub fn generate_intermediate(
    parent: &Issuer,
    td: &TrustDomain,
    key: &CaKey,
    ttl: Duration,
    now: SystemTime,
) -> Result<CertificateDer<'static>, SvidError> {
    check_trust_domain(parent, td.as_str(), &td.id_string())?;
    let (not_before, not_after) = validity(now, ttl, Some(parent.not_after))?;
    let mut params = ca_params(
        td,
        "intermediate",
        BasicConstraints::Constrained(0),
        not_before,
        not_after,
    )?;
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(key, &parent.signer)
        .map_err(SvidError::Generate)?;
    Ok(cert.into())
}

/// Certifies the self-signed CA certificate `root` with `issuer` (a *cross-signed* root, as
/// Let's Encrypt's ISRG Root X1 was by DST Root CA X3): the same subject, key, subject key
/// identifier, basic constraints and URI SANs, keyUsage keyCertSign and cRLSign, issued by
/// `issuer` and valid from `now` - [`BACKDATE`] until the earlier of the two notAfters.
///
/// Sent above the intermediates of a new root while the old root is still trusted, it gives a
/// peer that holds only the old root a path (leaf, intermediate, cross-signed root, old root);
/// a peer that holds the new root stops at it and never looks at the extra certificate. The
/// result is checked: same subject bytes and key as `root`, signature by `issuer`.
pub fn cross_sign(
    issuer: &Issuer,
    root: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<CertificateDer<'static>, SvidError> {
    let x509 = parse_cert(root)?;
    check_ca(&x509)?;
    let mut dn = DistinguishedName::new();
    for rdn in x509.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(SvidError::InvalidIssuer(
                "cannot cross-sign a subject with multi-valued or empty RDNs",
            ));
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or(SvidError::InvalidIssuer("subject attribute OID too large"))?
            .collect();
        // What DER can encode (X.690 8.19): at least two arcs, the first 0, 1 or 2, and the
        // second below 40 under 0 and 1. (The encoder panics otherwise; found by fuzzing.)
        let encodable = match oid.as_slice() {
            [first @ 0..=1, second, ..] => *second < 40 && *first <= 1,
            [2, _, ..] => true,
            _ => false,
        };
        if !encodable {
            return Err(SvidError::InvalidIssuer(
                "subject attribute OID cannot be encoded",
            ));
        }
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data)
            .map_err(|_| SvidError::InvalidIssuer("subject attribute is not text"))?
            .to_owned();
        let value = match value.header.tag() {
            x509_parser::der_parser::asn1_rs::Tag::PrintableString => {
                // The characters the DER encoder writes (it panics on others, '?' among them,
                // which rcgen's type accepts; found by fuzzing).
                let encodable = text.bytes().all(|b| {
                    b == b' '
                        || ((b'\''..=b':').contains(&b) && b != b'*')
                        || b == b'='
                        || b.is_ascii_alphabetic()
                });
                if !encodable {
                    return Err(SvidError::InvalidIssuer(
                        "subject PrintableString cannot be encoded",
                    ));
                }
                rcgen::DnValue::PrintableString(
                    text.try_into()
                        .map_err(|_| SvidError::InvalidIssuer("bad PrintableString in subject"))?,
                )
            }
            x509_parser::der_parser::asn1_rs::Tag::Utf8String => rcgen::DnValue::Utf8String(text),
            _ => return Err(SvidError::InvalidIssuer(
                "cannot cross-sign a subject attribute that is not UTF8String or PrintableString",
            )),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    let bc = x509
        .basic_constraints()
        .map_err(|_| SvidError::InvalidIssuer("unparseable basicConstraints"))?;
    params.is_ca = IsCa::Ca(match bc.and_then(|b| b.value.path_len_constraint) {
        Some(n) => BasicConstraints::Constrained(u8::try_from(n).unwrap_or(u8::MAX)),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut sans = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                sans.push(SanType::URI(
                    Ia5String::try_from(*uri).map_err(SvidError::Generate)?,
                ));
            }
        }
    }
    params.subject_alt_names = sans;
    if let Ok(Some(ski)) =
        x509.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
    {
        if let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) =
            ski.parsed_extension()
        {
            params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(id.0.to_vec());
        }
    }
    params.use_authority_key_identifier_extension = true;
    let (not_before, _) = validity(now, Duration::from_secs(1), None)?;
    let not_after = x509.validity().not_after.timestamp().min(issuer.not_after);
    if not_after <= not_before {
        return Err(SvidError::IssuerExpired { not_after });
    }
    params.not_before = to_datetime(not_before)?;
    params.not_after = to_datetime(not_after)?;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let spki = rcgen::SubjectPublicKeyInfo::from_der(x509.public_key().raw)
        .map_err(SvidError::Generate)?;
    let cert = params
        .signed_by(&spki, &issuer.signer)
        .map_err(SvidError::Generate)?;
    let issued = parse_cert(cert.der())?;
    if issued.subject().as_raw() != x509.subject().as_raw()
        || issued.public_key().raw != x509.public_key().raw
    {
        return Err(SvidError::InvalidIssuer(
            "the cross-signed certificate does not reproduce the root's subject and key",
        ));
    }
    let issuer_cert = parse_cert(&issuer.cert)?;
    if issued
        .verify_signature(Some(issuer_cert.public_key()))
        .is_err()
    {
        return Err(SvidError::KeyMismatch);
    }
    drop(issued);
    Ok(cert.into())
}

/// The public key kinds a CSR may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CsrKeyType {
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// RSA, with its modulus size in bits.
    Rsa {
        /// Modulus size in bits.
        bits: usize,
    },
    /// Ed25519.
    Ed25519,
}

/// A parsed, signature-checked CSR. Only its public key is kept: any subject, SAN or extension
/// the CSR asks for is ignored.
pub struct Csr {
    key_type: CsrKeyType,
    spki: Vec<u8>,
    public_key: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl Csr {
    /// The kind of public key the CSR carries.
    pub fn key_type(&self) -> CsrKeyType {
        self.key_type
    }

    /// The CSR's SubjectPublicKeyInfo, DER, as sent.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }
}

impl fmt::Debug for Csr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csr")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl PublicKeyData for Csr {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Parses a DER PKCS#10 CSR, checks its self-signature and keeps its public key.
///
/// Accepts EC P-256 and P-384 (uncompressed points), RSA of 2048 to 8192 bits, and Ed25519
/// keys; signatures ECDSA with SHA-256/384, RSA PKCS#1 v1.5 or PSS with SHA-256/384/512, and
/// Ed25519 (not SHA-1).
pub fn parse_csr(der: &[u8]) -> Result<Csr, SvidError> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| SvidError::Malformed)?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed);
    }
    let spki = &csr.certification_request_info.subject_pki;
    let (key_type, alg) = classify_key(spki)?;
    let sig_oid = &csr.signature_algorithm.algorithm;
    if !ACCEPTED_CSR_SIGNATURES.contains(sig_oid) {
        return Err(SvidError::UnsupportedSignatureAlgorithm(
            sig_oid.to_id_string(),
        ));
    }
    match csr.verify_signature() {
        Ok(()) => {}
        Err(X509Error::SignatureUnsupportedAlgorithm) => {
            return Err(SvidError::UnsupportedSignatureAlgorithm(
                sig_oid.to_id_string(),
            ))
        }
        Err(_) => return Err(SvidError::BadSignature),
    }
    Ok(Csr {
        key_type,
        spki: spki.raw.to_vec(),
        public_key: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

/// Parses a PEM `CERTIFICATE REQUEST` block with [`parse_csr`].
pub fn parse_csr_pem(pem: &str) -> Result<Csr, SvidError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| SvidError::Malformed)?;
    parse_csr(der.as_ref())
}

/// An issued X509-SVID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedSvid {
    /// The chain: the leaf first, then the issuer, then the intermediates above it (not the
    /// root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's serial number, lowercase hex.
    pub serial: String,
    /// The leaf's notBefore, Unix seconds.
    pub not_before: i64,
    /// The leaf's notAfter, Unix seconds.
    pub not_after: i64,
    /// The CA journal id of the key that signed it (set by the
    /// [`Authority`](crate::authority::Authority); empty from this module's functions). Issuance
    /// records carry it, so that the CA can prove when nothing a root vouches for is unexpired.
    pub issuer: String,
}

/// Signs a workload X509-SVID for `spiffe_id` and `dns_names` over the CSR's public key.
///
/// The leaf is valid from `now` - [`BACKDATE`] to `now` + `ttl`, capped at the issuer's notAfter.
/// Refuses a SPIFFE ID without a path, one outside the issuer's trust domain, and invalid DNS
/// names.
pub fn sign_x509_svid(
    issuer: &Issuer,
    csr: &Csr,
    spiffe_id: &SpiffeId,
    dns_names: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<IssuedSvid, SvidError> {
    let key_encipherment = matches!(csr.key_type, CsrKeyType::Rsa { .. });
    let subject = Subject {
        spiffe_id,
        dns_names,
        role: None,
    };
    sign_leaf(issuer, csr, key_encipherment, &subject, ttl, now)
}

/// Signs the SVID of one of meshid's own components (an agent, a CA server): the workload
/// profile plus the `role` mark ([`meshid_api::role`]), which workload SVIDs never carry.
pub fn sign_role_svid(
    issuer: &Issuer,
    csr: &Csr,
    spiffe_id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
    role: meshid_api::role::Role,
) -> Result<IssuedSvid, SvidError> {
    let key_encipherment = matches!(csr.key_type, CsrKeyType::Rsa { .. });
    let subject = Subject {
        spiffe_id,
        dns_names: &[],
        role: Some(role),
    };
    sign_leaf(issuer, csr, key_encipherment, &subject, ttl, now)
}

/// Signs a workload X509-SVID over the public key of `key`, with the same profile as
/// [`sign_x509_svid`] (no CSR: for tools that hold the key, and the signing benchmark).
pub fn sign_x509_svid_with_key(
    issuer: &Issuer,
    key: &CaKey,
    spiffe_id: &SpiffeId,
    dns_names: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<IssuedSvid, SvidError> {
    let subject = Subject {
        spiffe_id,
        dns_names,
        role: None,
    };
    sign_leaf(issuer, key, false, &subject, ttl, now)
}

/// Whom a leaf names: its SPIFFE ID, DNS names, and the mark of meshid's own components.
struct Subject<'a> {
    spiffe_id: &'a SpiffeId,
    dns_names: &'a [String],
    role: Option<meshid_api::role::Role>,
}

fn sign_leaf(
    issuer: &Issuer,
    public_key: &impl PublicKeyData,
    key_encipherment: bool,
    subject: &Subject<'_>,
    ttl: Duration,
    now: SystemTime,
) -> Result<IssuedSvid, SvidError> {
    let Subject {
        spiffe_id,
        dns_names,
        role,
    } = *subject;
    let id = spiffe_id.to_string();
    if spiffe_id.path().is_empty() {
        return Err(SvidError::NoPath(id));
    }
    check_trust_domain(issuer, spiffe_id.trust_domain_name(), &id)?;
    let (not_before, not_after) = validity(now, ttl, Some(issuer.not_after))?;
    let serial = random_serial();
    let mut params = leaf_params(
        id,
        dns_names,
        key_encipherment,
        &serial,
        not_before,
        not_after,
    )?;
    if let Some(role) = role {
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &meshid_api::role::CERTIFICATE_POLICIES,
                role.policies_extension(),
            ));
    }
    let leaf = params
        .signed_by(public_key, &issuer.signer)
        .map_err(SvidError::Generate)?;

    let mut chain = Vec::with_capacity(issuer.chain_to_root.len() + 2);
    chain.push(leaf.into());
    if !issuer.self_signed {
        chain.push(issuer.cert.clone());
    }
    chain.extend(issuer.chain_to_root.iter().cloned());
    Ok(IssuedSvid {
        chain,
        serial: hex::encode(serial),
        not_before,
        not_after,
        issuer: String::new(),
    })
}

/// The X509-SVID leaf profile; the one place it is written down.
fn leaf_params(
    spiffe_id: String,
    dns_names: &[String],
    key_encipherment: bool,
    serial: &[u8],
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, SvidError> {
    let mut params = CertificateParams::default();
    params.not_before = to_datetime(not_before)?;
    params.not_after = to_datetime(not_after)?;
    params.serial_number = Some(SerialNumber::from_slice(serial));

    // A non-empty subject, so that the SAN extension need not be critical.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    if let Some(first) = dns_names.first().filter(|n| n.len() <= MAX_CN_LEN) {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;

    let mut sans = Vec::with_capacity(dns_names.len() + 1);
    sans.push(SanType::URI(
        Ia5String::try_from(spiffe_id).map_err(SvidError::Generate)?,
    ));
    for name in dns_names {
        crate::entry::validate_dns_name(name)
            .map_err(|_| SvidError::InvalidDnsName(name.clone()))?;
        let ia5 = Ia5String::try_from(name.as_str())
            .map_err(|_| SvidError::InvalidDnsName(name.clone()))?;
        sans.push(SanType::DnsName(ia5));
    }
    params.subject_alt_names = sans;

    params.is_ca = IsCa::ExplicitNoCa; // basicConstraints CA:FALSE, and a subject key identifier
    params.key_usages = if key_encipherment {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    };
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// The CA profile shared by roots and intermediates.
fn ca_params(
    td: &TrustDomain,
    role: &str,
    constraints: BasicConstraints,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, SvidError> {
    let mut params = CertificateParams::default();
    params.not_before = to_datetime(not_before)?;
    params.not_after = to_datetime(not_after)?;
    let serial = random_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial));

    // A short random tag keeps successive CAs of one trust domain apart by name.
    let mut cn = format!(
        "meshid {role} {} {}",
        hex::encode(&serial[..4]),
        td.as_str()
    );
    cn.truncate(MAX_CN_LEN); // trust domain names are ASCII
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;

    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(td.id_string()).map_err(SvidError::Generate)?,
    )];
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// 16 random bytes with the top bit cleared (a positive INTEGER) and a non-zero first byte (a
/// fixed 16-byte encoding): 127 bits of randomness, minus a sliver.
fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    if serial[0] == 0 {
        serial[0] = 1;
    }
    serial
}

/// notBefore and notAfter in Unix seconds for a certificate issued at `now` for `ttl`, capped at
/// `cap` (the issuer's notAfter).
fn validity(now: SystemTime, ttl: Duration, cap: Option<i64>) -> Result<(i64, i64), SvidError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| SvidError::InvalidTime)?
        .as_secs();
    let now = i64::try_from(now).map_err(|_| SvidError::InvalidTime)?;
    let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| SvidError::InvalidTtl(ttl))?;
    if ttl_secs == 0 {
        return Err(SvidError::InvalidTtl(ttl));
    }
    let not_before = now.saturating_sub(BACKDATE.as_secs() as i64);
    let mut not_after = now
        .checked_add(ttl_secs)
        .ok_or(SvidError::InvalidTtl(ttl))?;
    if let Some(cap) = cap {
        if cap <= now {
            return Err(SvidError::IssuerExpired { not_after: cap });
        }
        not_after = not_after.min(cap);
    }
    // Reject ends that X.509 time cannot express.
    to_datetime(not_after).map_err(|_| SvidError::InvalidTtl(ttl))?;
    Ok((not_before, not_after))
}

fn to_datetime(unix: i64) -> Result<time::OffsetDateTime, SvidError> {
    let dt = time::OffsetDateTime::from_unix_timestamp(unix).map_err(|_| SvidError::InvalidTime)?;
    if dt.year() > 9999 || dt.year() < 1950 {
        return Err(SvidError::InvalidTime);
    }
    Ok(dt)
}

/// Refuses to issue `id` from an issuer that carries a SPIFFE ID of another trust domain.
fn check_trust_domain(issuer: &Issuer, td: &str, id: &str) -> Result<(), SvidError> {
    match &issuer.trust_domain {
        Some(own) if own.as_str() != td => Err(SvidError::WrongTrustDomain {
            id: id.to_owned(),
            trust_domain: own.as_str().to_owned(),
        }),
        _ => Ok(()),
    }
}

fn parse_cert<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, SvidError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|_| SvidError::InvalidIssuer("not a DER X.509 certificate"))?;
    if !rest.is_empty() {
        return Err(SvidError::InvalidIssuer(
            "trailing data after the certificate",
        ));
    }
    Ok(cert)
}

fn check_ca(cert: &X509Certificate<'_>) -> Result<(), SvidError> {
    let bc = cert
        .basic_constraints()
        .map_err(|_| SvidError::InvalidIssuer("unparseable basicConstraints"))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::IssuerNotCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|_| SvidError::InvalidIssuer("unparseable keyUsage"))?;
    if ku.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(SvidError::InvalidIssuer("keyUsage lacks keyCertSign"));
    }
    Ok(())
}

/// The trust domain of a CA certificate's SPIFFE ID, if it carries one.
fn ca_trust_domain(cert: &X509Certificate<'_>) -> Result<Option<TrustDomain>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::InvalidIssuer("unparseable subjectAltName"))?;
    let Some(san) = san else { return Ok(None) };
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Ok(None);
    };
    let id = SpiffeId::new(uri).map_err(|_| SvidError::InvalidIssuer("invalid SPIFFE ID"))?;
    if !id.path().is_empty() {
        return Err(SvidError::InvalidIssuer(
            "a CA's SPIFFE ID must not have a path",
        ));
    }
    Ok(Some(id.trust_domain().clone()))
}

const ACCEPTED_CSR_SIGNATURES: &[Oid<'static>] = &[
    OID_SIG_ECDSA_WITH_SHA256,
    OID_SIG_ECDSA_WITH_SHA384,
    OID_PKCS1_SHA256WITHRSA,
    OID_PKCS1_SHA384WITHRSA,
    OID_PKCS1_SHA512WITHRSA,
    OID_PKCS1_RSASSAPSS,
    OID_SIG_ED25519,
];

/// The key type of a CSR's SubjectPublicKeyInfo and the rcgen algorithm that re-encodes it.
fn classify_key(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<(CsrKeyType, &'static SignatureAlgorithm), SvidError> {
    let alg = &spki.algorithm.algorithm;
    let key = &spki.subject_public_key.data;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| SvidError::UnsupportedKey("EC key without a named curve".into()))?;
        let (kind, alg, len) = if curve == OID_EC_P256 {
            (CsrKeyType::EcP256, &rcgen::PKCS_ECDSA_P256_SHA256, 65)
        } else if curve == OID_NIST_EC_P384 {
            (CsrKeyType::EcP384, &rcgen::PKCS_ECDSA_P384_SHA384, 97)
        } else {
            return Err(SvidError::UnsupportedKey(format!(
                "EC curve {}",
                curve.to_id_string()
            )));
        };
        if key.len() != len || key.first() != Some(&0x04) {
            return Err(SvidError::UnsupportedKey(
                "EC point is not in uncompressed form".into(),
            ));
        }
        Ok((kind, alg))
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(SvidError::Malformed);
        };
        let bits = modulus_bits(rsa.modulus);
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(SvidError::UnsupportedKey(format!("RSA key of {bits} bits")));
        }
        Ok((CsrKeyType::Rsa { bits }, &rcgen::PKCS_RSA_SHA256))
    } else if *alg == OID_SIG_ED25519 {
        if key.len() != 32 || spki.algorithm.parameters.is_some() {
            return Err(SvidError::Malformed);
        }
        Ok((CsrKeyType::Ed25519, &rcgen::PKCS_ED25519))
    } else {
        Err(SvidError::UnsupportedKey(format!(
            "key algorithm {}",
            alg.to_id_string()
        )))
    }
}

/// The size in bits of a big-endian unsigned modulus.
fn modulus_bits(modulus: &[u8]) -> usize {
    let start = modulus
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(modulus.len());
    match modulus.get(start) {
        Some(first) => (modulus.len() - start - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    }
}

#[cfg(test)]
mod tests;
