//! X509-SVID peer verification: the one verifier of every meshid mTLS handshake (the CA's node
//! API, the agent's connection to the CA, the proxy's inbound and outbound connections).
//!
//! A peer is authenticated the way the X509-SVID specification (`standards/X509-SVID.md`,
//! sections 4 and 5) says:
//!
//! 1. the leaf carries exactly one URI SAN, a SPIFFE ID in canonical form with a non-root path;
//!    it is not a CA (basicConstraints `CA:FALSE` or absent); its keyUsage extension is present,
//!    sets `digitalSignature`, and sets neither `keyCertSign` nor `cRLSign`;
//! 2. the trust anchors are those of the ID's trust domain only ([`PeerBundles`]: our own trust
//!    domain and the federated ones the configuration accepts); any other trust domain is
//!    refused;
//! 3. the chain validates to one of those anchors (rustls-webpki path building: validity,
//!    signatures, CA constraints of every issuer, and the extended key usage for the peer's role
//!    when the leaf has one).
//!
//! [`SvidVerifier`] does this and is shared by the rustls verifiers: [`ClientVerifier`]
//! (we accept: client authentication is mandatory, or optional for the node API where an agent
//! attests before it has an SVID) and [`ServerVerifier`] (we connect: the server's SPIFFE ID
//! must also be the expected one, and may have to carry a meshid role mark; the TLS server name
//! is ignored). [`spiffe_id_of`] is the one extraction of a SPIFFE ID from a certificate.
//!
//! # What differs from plain webpki, and why
//! webpki validates the path (signatures, validity, CA constraints, EKU); it knows nothing of
//! SPIFFE. Added here: the leaf rules above (webpki accepts a leaf without keyUsage, and checks
//! `CA:TRUE` only through path building), the single canonical URI SAN, and the choice of
//! anchors by the peer's trust domain (webpki would accept a chain to any anchor it is given). Trust bundles are
//! swapped atomically with [`SvidVerifier::set_bundles`]; before the first bundle every
//! handshake fails closed.
//!
//! Every refusal is a [`PeerError`], whose [`PeerError::reason`] is a stable metric label. The
//! error travels through rustls as `CertificateError::Other`, so [`failure_reason`] (and
//! [`io_failure_reason`], for the `io::Error` that `tokio_rustls` returns) recover the label
//! from a failed handshake.
//!
//! # Cost per handshake
//! One x509-parser parse of the leaf and one webpki path validation against trust anchors
//! computed when the bundle changed, never per handshake. No lock: bundles are read through an
//! `arc_swap` guard.
//!
//! # Extended key usage
//! The specification says leaf SVIDs SHOULD carry an EKU extension, and when they do it sets
//! both `serverAuth` and `clientAuth`. A leaf without the extension is therefore accepted; a
//! leaf whose extension lacks the purpose of the peer's role (`clientAuth` for a client,
//! `serverAuth` for a server) is refused (`key_usage`). As webpki does, an EKU extension on an
//! intermediate constrains the leaves below it the same way.
//!
//! # Name constraints
//! webpki does not implement URI name constraints and fails closed on them (X509-SVID 4.2
//! allows either), so a chain through an issuer with URI name constraints is `untrusted`.
//! meshid's CA does not issue such intermediates.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use spiffe::{SpiffeId, TrustDomain, X509BundleSet};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{
    BasicConstraints, GeneralName, KeyUsage, ParsedExtension, SubjectAlternativeName,
};
use x509_parser::oid_registry::{
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
};

use super::revocation::Revocations;
use crate::id::{self, IdError};
use crate::role::Role;

/// The most intermediate certificates a peer may send. Real SPIFFE chains have one to three;
/// the bound caps the path-building work an unauthenticated peer can cause.
pub const MAX_INTERMEDIATES: usize = 8;

/// Every label [`PeerError::reason`], [`failure_reason`] and [`io_failure_reason`] can return,
/// for registering metric series up front.
pub const FAILURE_REASONS: &[&str] = &[
    "no_certificate",
    "malformed",
    "no_uri_san",
    "multiple_uri_sans",
    "not_spiffe_id",
    "leaf_is_ca",
    "key_usage",
    "unknown_trust_domain",
    "no_bundle",
    "expired",
    "not_yet_valid",
    "untrusted",
    "revoked",
    "unexpected_peer",
    "other",
    "protocol",
    "timeout",
    "io",
];

/// The role the peer plays in the handshake, which decides the extended key usage its leaf
/// must allow (when it has an EKU extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is the TLS client (we accept): `clientAuth`.
    Client,
    /// The peer is the TLS server (we connect): `serverAuth`.
    Server,
}

impl PeerRole {
    fn key_usage(self) -> webpki::KeyUsage {
        match self {
            PeerRole::Client => webpki::KeyUsage::client_auth(),
            PeerRole::Server => webpki::KeyUsage::server_auth(),
        }
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerRole::Client => "client authentication",
            PeerRole::Server => "server authentication",
        })
    }
}

/// Why a peer's certificate was refused. [`PeerError::reason`] names the violation as a
/// metric label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer presented no certificate.
    #[error("peer presented no certificate; an X509-SVID is required")]
    NoCertificate,
    /// The leaf does not parse as X.509, or an extension the check reads is malformed or
    /// repeated, or a certificate of the chain is badly encoded.
    #[error("peer certificate is malformed: {detail}")]
    Malformed {
        /// What is wrong with it.
        detail: String,
    },
    /// The peer sent more intermediates than [`MAX_INTERMEDIATES`].
    #[error("peer sent {count} intermediate certificates; at most {max} are accepted")]
    TooManyIntermediates {
        /// How many it sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The leaf has no URI SAN, so no SPIFFE ID.
    #[error(
        "peer certificate has no URI SAN; an X509-SVID carries its SPIFFE ID as its only URI SAN"
    )]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("peer certificate has {count} URI SANs; an X509-SVID has exactly one")]
    MultipleUriSans {
        /// How many.
        count: usize,
    },
    /// The URI SAN is not a SPIFFE ID in canonical form with a non-root path.
    #[error("peer URI SAN {uri:?} is not a leaf SPIFFE ID: {detail}")]
    NotSpiffeId {
        /// The URI as found in the certificate.
        uri: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The leaf is a CA certificate (basicConstraints `CA:TRUE`).
    #[error("peer certificate is a CA certificate (basicConstraints CA:TRUE); a leaf SVID is not")]
    LeafIsCa,
    /// The leaf's keyUsage is missing or is not a leaf SVID's.
    #[error("peer certificate key usage: {detail}")]
    KeyUsage {
        /// What is wrong with it.
        detail: &'static str,
    },
    /// An extended key usage extension in the chain does not allow the peer's role.
    #[error("peer certificate chain does not allow {role}: {source}")]
    ExtendedKeyUsage {
        /// The role the peer plays.
        role: PeerRole,
        /// What webpki found.
        source: webpki::Error,
    },
    /// The SPIFFE ID's trust domain is neither ours nor an accepted federated one (or its
    /// bundle has no usable root).
    #[error("peer trust domain {trust_domain} is not accepted (not ours, not federated)")]
    UnknownTrustDomain {
        /// The peer's trust domain.
        trust_domain: TrustDomain,
    },
    /// No trust bundle has been set yet, so no peer can be verified.
    #[error("no trust bundle yet; peers are refused until the first bundle update")]
    NoBundle,
    /// A certificate of the chain has expired.
    #[error("peer certificate chain expired at {not_after} (unix seconds), now is {now}")]
    Expired {
        /// The notAfter of the expired certificate, in Unix seconds.
        not_after: u64,
        /// The verification time, in Unix seconds.
        now: u64,
    },
    /// A certificate of the chain is not valid yet.
    #[error("peer certificate chain is valid only from {not_before} (unix seconds), now is {now}")]
    NotYetValid {
        /// The notBefore of the certificate, in Unix seconds.
        not_before: u64,
        /// The verification time, in Unix seconds.
        now: u64,
    },
    /// The chain does not validate to a root of the trust domain's bundle: unknown issuer, bad
    /// signature, an issuer that is not a CA, violated path length or name constraints.
    #[error("peer certificate chain does not validate to the {trust_domain} bundle: {source}")]
    Untrusted {
        /// The trust domain whose roots were tried.
        trust_domain: TrustDomain,
        /// What webpki found.
        source: webpki::Error,
    },
    /// A certificate of the chain is listed by a CRL of its issuer (`meshid-ca svid revoke`).
    #[error("peer certificate chain holds a revoked certificate: {source}")]
    Revoked {
        /// What webpki found.
        source: webpki::Error,
    },
    /// The peer is authenticated but is not whom we expected (outbound).
    #[error("peer is {actual}, expected {expected}")]
    UnexpectedPeer {
        /// The peer's SPIFFE ID.
        actual: SpiffeId,
        /// What was expected, as the caller described it.
        expected: String,
    },
    /// The peer's ID names a meshid role (the CA server) but its certificate lacks the role's
    /// mark: a workload SVID that merely names the ID.
    #[error("peer is {id} without the {} mark (a workload SVID?)", role_name(*.role))]
    MissingMark {
        /// The peer's SPIFFE ID.
        id: SpiffeId,
        /// The role it claims.
        role: Role,
    },
    /// Any other chain validation failure.
    #[error("peer certificate chain verification failed: {0}")]
    Other(webpki::Error),
}

impl PeerError {
    /// A stable snake_case label for metrics: one of [`FAILURE_REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::NoCertificate => "no_certificate",
            PeerError::Malformed { .. } | PeerError::TooManyIntermediates { .. } => "malformed",
            PeerError::NoUriSan => "no_uri_san",
            PeerError::MultipleUriSans { .. } => "multiple_uri_sans",
            PeerError::NotSpiffeId { .. } => "not_spiffe_id",
            PeerError::LeafIsCa => "leaf_is_ca",
            PeerError::KeyUsage { .. } | PeerError::ExtendedKeyUsage { .. } => "key_usage",
            PeerError::UnknownTrustDomain { .. } => "unknown_trust_domain",
            PeerError::NoBundle => "no_bundle",
            PeerError::Expired { .. } => "expired",
            PeerError::NotYetValid { .. } => "not_yet_valid",
            PeerError::Untrusted { .. } => "untrusted",
            PeerError::Revoked { .. } => "revoked",
            PeerError::UnexpectedPeer { .. } | PeerError::MissingMark { .. } => "unexpected_peer",
            PeerError::Other(_) => "other",
        }
    }

    fn malformed(detail: impl Into<String>) -> Self {
        PeerError::Malformed {
            detail: detail.into(),
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Agent => "agent",
        Role::Server => "CA server",
    }
}

impl From<PeerError> for rustls::Error {
    fn from(e: PeerError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// Errors building [`PeerBundles`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A trust domain was given without any root certificate.
    #[error("no root certificates for trust domain {trust_domain}; pass its bundle")]
    NoRoots {
        /// The trust domain.
        trust_domain: TrustDomain,
    },
    /// A root cannot be used as a trust anchor.
    #[error("root {index} of trust domain {trust_domain} is not a usable trust anchor: {detail}")]
    InvalidRoot {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The root's position in the list given.
        index: usize,
        /// What is wrong with it.
        detail: String,
    },
}

/// Trust anchors per trust domain: our own and the accepted federated ones. Built once per
/// bundle update (parsing every root), then only read.
#[derive(Default)]
pub struct PeerBundles {
    anchors: HashMap<TrustDomain, Vec<TrustAnchor<'static>>>,
    /// Chains already verified against these anchors (see [`SvidVerifier::verify`]). It lives
    /// and dies with this bundle set, so a bundle update starts from an empty cache.
    verified: std::sync::Mutex<HashMap<Vec<u8>, Verified>>,
}

/// A chain that passed every check, and the window in which all its certificates are valid.
#[derive(Clone, Debug)]
struct Verified {
    id: SpiffeId,
    not_before: u64,
    not_after: u64,
    /// The revocation set it was checked against ([`SvidVerifier::set_revocations`]).
    revocations: u64,
}

/// Verified chains remembered per bundle set; past this the cache starts over.
pub const VERIFIED_CACHE_MAX: usize = 4096;

impl PeerBundles {
    /// The anchors of the bundles of `set` whose trust domain `accept` admits (the proxy's own
    /// and the federated ones its configuration names). A root that cannot be a trust anchor
    /// (not DER X.509, not a CA) is skipped with a warning; a trust domain left without roots is
    /// left out, so its peers are refused as `unknown_trust_domain`.
    pub fn from_bundle_set(
        set: &X509BundleSet,
        accept: &dyn Fn(&TrustDomain) -> bool,
    ) -> PeerBundles {
        let mut anchors = HashMap::new();
        for (trust_domain, bundle) in set.iter() {
            if !accept(trust_domain) {
                continue;
            }
            let mut roots = Vec::with_capacity(bundle.authorities().len());
            for (index, authority) in bundle.authorities().iter().enumerate() {
                match trust_anchor(authority.as_bytes()) {
                    Ok(anchor) => roots.push(anchor),
                    Err(detail) => tracing::warn!(
                        trust_domain = %trust_domain,
                        index,
                        error = %detail,
                        "bundle authority skipped: not a usable trust anchor"
                    ),
                }
            }
            if roots.is_empty() {
                tracing::warn!(trust_domain = %trust_domain, "bundle has no usable root; its peers are refused");
                continue;
            }
            anchors.insert(trust_domain.clone(), roots);
        }
        PeerBundles {
            anchors,
            verified: Default::default(),
        }
    }

    /// Anchors from DER root certificates per trust domain (tests, static configuration). Every
    /// root must be a CA certificate usable as a trust anchor; a trust domain given twice gets
    /// the roots of both.
    pub fn from_roots(
        roots: impl IntoIterator<Item = (TrustDomain, Vec<CertificateDer<'static>>)>,
    ) -> Result<PeerBundles, VerifyError> {
        let mut anchors: HashMap<TrustDomain, Vec<TrustAnchor<'static>>> = HashMap::new();
        for (trust_domain, certs) in roots {
            if certs.is_empty() {
                return Err(VerifyError::NoRoots { trust_domain });
            }
            let mut parsed = Vec::with_capacity(certs.len());
            for (index, cert) in certs.iter().enumerate() {
                let anchor = trust_anchor(cert).map_err(|detail| VerifyError::InvalidRoot {
                    trust_domain: trust_domain.clone(),
                    index,
                    detail,
                })?;
                parsed.push(anchor);
            }
            anchors.entry(trust_domain).or_default().extend(parsed);
        }
        Ok(PeerBundles {
            anchors,
            verified: Default::default(),
        })
    }

    /// The trust domains whose peers can be verified.
    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.anchors.keys()
    }

    /// Whether peers of `trust_domain` can be verified.
    pub fn contains(&self, trust_domain: &TrustDomain) -> bool {
        self.anchors.contains_key(trust_domain)
    }

    /// Whether no trust domain is accepted at all.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    fn anchors(&self, trust_domain: &TrustDomain) -> Option<&[TrustAnchor<'static>]> {
        self.anchors.get(trust_domain).map(Vec::as_slice)
    }
}

impl Clone for PeerBundles {
    /// The same anchors, with an empty verified-chain cache.
    fn clone(&self) -> Self {
        PeerBundles {
            anchors: self.anchors.clone(),
            verified: Default::default(),
        }
    }
}

impl fmt::Debug for PeerBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (trust_domain, anchors) in &self.anchors {
            map.entry(&trust_domain.as_str(), &anchors.len());
        }
        map.finish()
    }
}

/// A trust anchor from a root certificate, which must be a CA.
fn trust_anchor(der: &[u8]) -> Result<TrustAnchor<'static>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a DER X.509 certificate: {e}"))?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| format!("basicConstraints: {e}"))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err("not a CA certificate (basicConstraints CA:TRUE missing)".to_owned());
    }
    let der = CertificateDer::from(der);
    let anchor = webpki::anchor_from_trusted_cert(&der).map_err(|e| e.to_string())?;
    Ok(anchor.to_owned())
}

/// Verifies peers' X509-SVIDs against the current trust bundles. Shared (`Arc`) by the rustls
/// verifiers of every listener and connector; [`SvidVerifier::set_bundles`] swaps the bundles
/// for all of them at once, open connections untouched.
pub struct SvidVerifier {
    bundles: ArcSwapOption<PeerBundles>,
    revocations: arc_swap::ArcSwap<Revocations>,
    generations: std::sync::atomic::AtomicU64,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SvidVerifier {
    /// A verifier without bundles: every verification fails (`no_bundle`) until
    /// [`SvidVerifier::set_bundles`].
    pub fn new() -> Self {
        Self {
            bundles: ArcSwapOption::empty(),
            revocations: arc_swap::ArcSwap::from_pointee(Revocations::default()),
            generations: std::sync::atomic::AtomicU64::new(0),
            algorithms: crate::tls::provider::provider().signature_verification_algorithms,
        }
    }

    /// A verifier with `bundles` already set.
    pub fn with_bundles(bundles: PeerBundles) -> Self {
        let verifier = Self::new();
        verifier.set_bundles(bundles);
        verifier
    }

    /// Replaces the trust bundles; the next verification uses them.
    pub fn set_bundles(&self, bundles: PeerBundles) {
        self.bundles.store(Some(Arc::new(bundles)));
    }

    /// Replaces the certificate revocation lists: the next handshake is checked against them
    /// (chains verified before are checked again).
    pub fn set_revocations(&self, mut revocations: Revocations) {
        revocations.generation = 1 + self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.revocations.store(Arc::new(revocations));
    }

    /// The revocation lists in use.
    pub fn revocations(&self) -> Arc<Revocations> {
        self.revocations.load_full()
    }

    /// The bundles in use, if any were set.
    pub fn bundles(&self) -> Option<Arc<PeerBundles>> {
        self.bundles.load_full()
    }

    /// Verifies a peer's X509-SVID, `end_entity` with the `intermediates` it sent, at `now`,
    /// for `role`, and returns its SPIFFE ID. See the module documentation for the checks.
    ///
    /// A chain that passed is remembered with the window in which all its certificates are
    /// valid, for the current bundle set only: presenting the same chain again within that
    /// window returns the same answer without redoing the signature checks (a peer opens
    /// many connections with one SVID; chain verification is most of a handshake's cost).
    /// The handshake still checks the peer's signature over the transcript with the leaf's
    /// key, so a cached chain proves nothing without its private key.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, PeerError> {
        let guard = self.bundles.load();
        let Some(bundles) = guard.as_deref() else {
            return Err(PeerError::NoBundle);
        };
        if intermediates.len() > MAX_INTERMEDIATES {
            return Err(PeerError::TooManyIntermediates {
                count: intermediates.len(),
                max: MAX_INTERMEDIATES,
            });
        }
        let mut key = Vec::with_capacity(
            1 + end_entity.len() + intermediates.iter().map(|c| c.len() + 4).sum::<usize>(),
        );
        key.push(role as u8);
        key.extend_from_slice(end_entity);
        for c in intermediates {
            key.extend_from_slice(&(c.len() as u32).to_be_bytes());
            key.extend_from_slice(c);
        }
        let t = now.as_secs();
        let revocations = self.revocations.load();
        let generation = revocations.generation;
        if let Ok(cache) = bundles.verified.lock() {
            if let Some(v) = cache.get(&key) {
                if v.not_before <= t && t <= v.not_after && v.revocations == generation {
                    return Ok(v.id.clone());
                }
            }
        }
        let id =
            self.verify_uncached(bundles, &revocations, end_entity, intermediates, now, role)?;
        let mut not_before = 0u64;
        let mut not_after = u64::MAX;
        for c in std::iter::once(end_entity).chain(intermediates) {
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(c) else {
                return Ok(id);
            };
            let v = cert.validity();
            not_before = not_before.max(u64::try_from(v.not_before.timestamp()).unwrap_or(0));
            not_after = not_after.min(u64::try_from(v.not_after.timestamp()).unwrap_or(0));
        }
        if let Ok(mut cache) = bundles.verified.lock() {
            if cache.len() >= VERIFIED_CACHE_MAX {
                cache.clear();
            }
            cache.insert(
                key,
                Verified {
                    id: id.clone(),
                    not_before,
                    not_after,
                    revocations: generation,
                },
            );
        }
        Ok(id)
    }

    fn verify_uncached(
        &self,
        bundles: &PeerBundles,
        revocations: &Revocations,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, PeerError> {
        let id = check_leaf(end_entity)?;
        let Some(anchors) = bundles.anchors(id.trust_domain()) else {
            return Err(PeerError::UnknownTrustDomain {
                trust_domain: id.trust_domain().clone(),
            });
        };
        let leaf = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| chain_error(e, id.trust_domain(), role))?;
        let crls: Vec<&webpki::CertRevocationList<'static>> = revocations.crls().iter().collect();
        // Every certificate of the path is checked against its issuer's CRL, when there is
        // one; an issuer without a CRL has revoked nothing. CRLs are kept past their
        // nextUpdate: the CA re-signs them, and an agent cut off from it keeps the last.
        let options = webpki::RevocationOptionsBuilder::new(&crls).ok().map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                .build()
        });
        leaf.verify_for_usage(
            self.algorithms.all,
            anchors,
            intermediates,
            now,
            role.key_usage(),
            options,
            None,
        )
        .map_err(|e| chain_error(e, id.trust_domain(), role))?;
        Ok(id)
    }

    /// [`SvidVerifier::verify`] for a whole chain as presented, leaf first.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, PeerError> {
        let (end_entity, intermediates) = chain.split_first().ok_or(PeerError::NoCertificate)?;
        self.verify(end_entity, intermediates, now, role)
    }
}

impl Default for SvidVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SvidVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidVerifier")
            .field("bundles", &self.bundles.load().as_deref())
            .finish_non_exhaustive()
    }
}

/// The extensions of a leaf that the SVID checks read, each at most once.
#[derive(Default)]
struct LeafExtensions<'c, 'a> {
    san: Option<&'c SubjectAlternativeName<'a>>,
    basic_constraints: Option<&'c BasicConstraints>,
    key_usage: Option<&'c KeyUsage>,
}

impl<'c, 'a> LeafExtensions<'c, 'a> {
    /// One pass over the extensions; a repeated or unparseable SAN, basicConstraints or
    /// keyUsage is malformed (x509-parser's per-extension getters would hide the latter).
    fn of(cert: &'c X509Certificate<'a>) -> Result<Self, PeerError> {
        fn once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), PeerError> {
            match slot.replace(value) {
                None => Ok(()),
                Some(_) => Err(PeerError::malformed(format!("repeated {name} extension"))),
            }
        }
        let mut out = Self::default();
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    once(&mut out.san, san, "subjectAltName")?;
                }
                ParsedExtension::BasicConstraints(bc) => {
                    once(&mut out.basic_constraints, bc, "basicConstraints")?;
                }
                ParsedExtension::KeyUsage(ku) => once(&mut out.key_usage, ku, "keyUsage")?,
                ParsedExtension::ParseError { error } => {
                    let name = if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME {
                        "subjectAltName"
                    } else if ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS {
                        "basicConstraints"
                    } else if ext.oid == OID_X509_EXT_KEY_USAGE {
                        "keyUsage"
                    } else {
                        // Left to webpki, which refuses what it needs and cannot read.
                        continue;
                    };
                    return Err(PeerError::malformed(format!(
                        "unparseable {name} extension: {error}"
                    )));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The leaf checks of X509-SVID section 5.2 (and 4.3 for keyUsage), before path validation.
fn check_leaf(der: &[u8]) -> Result<SpiffeId, PeerError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PeerError::malformed(format!("not a DER X.509 certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(PeerError::malformed("trailing data after the certificate"));
    }
    let ext = LeafExtensions::of(&cert)?;
    let id = id_from_san(ext.san)?;
    if ext.basic_constraints.is_some_and(|bc| bc.ca) {
        return Err(PeerError::LeafIsCa);
    }
    let Some(ku) = ext.key_usage else {
        return Err(PeerError::KeyUsage {
            detail: "no keyUsage extension; a leaf SVID has one with digitalSignature",
        });
    };
    if ku.key_cert_sign() {
        return Err(PeerError::KeyUsage {
            detail: "keyCertSign is set; only signing certificates set it",
        });
    }
    if ku.crl_sign() {
        return Err(PeerError::KeyUsage {
            detail: "cRLSign is set; only signing certificates set it",
        });
    }
    if !ku.digital_signature() {
        return Err(PeerError::KeyUsage {
            detail: "digitalSignature is not set; a leaf SVID sets it",
        });
    }
    Ok(id)
}

/// The SPIFFE ID of a leaf: its only URI SAN, canonical, with a non-root path.
fn id_from_san(san: Option<&SubjectAlternativeName<'_>>) -> Result<SpiffeId, PeerError> {
    let mut uris = san
        .into_iter()
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = match (uris.next(), uris.next()) {
        (None, _) => return Err(PeerError::NoUriSan),
        (Some(uri), None) => uri,
        (Some(_), Some(_)) => {
            return Err(PeerError::MultipleUriSans {
                count: 2 + uris.count(),
            })
        }
    };
    let not_spiffe = |detail: String| PeerError::NotSpiffeId {
        uri: uri.to_owned(),
        detail,
    };
    let id = id::parse(uri).map_err(|e| match e {
        IdError::NotCanonical { canonical } => {
            not_spiffe(format!("not in canonical form ({canonical})"))
        }
        other => not_spiffe(other.to_string()),
    })?;
    if id.path().is_empty() {
        return Err(not_spiffe(
            "no path; a leaf SVID names a workload, not a trust domain".to_owned(),
        ));
    }
    Ok(id)
}

/// The SPIFFE ID of a certificate: its only URI SAN, a SPIFFE ID in canonical form with a
/// non-root path. This reads the ID only; [`SvidVerifier::verify`] is what authenticates it.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, PeerError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PeerError::malformed(format!("not a DER X.509 certificate: {e}")))?;
    spiffe_id_of_parsed(&cert)
}

/// [`spiffe_id_of`] for a certificate the caller has already parsed (and reads more from).
pub fn spiffe_id_of_parsed(cert: &X509Certificate<'_>) -> Result<SpiffeId, PeerError> {
    id_from_san(LeafExtensions::of(cert)?.san)
}

fn chain_error(e: webpki::Error, trust_domain: &TrustDomain, role: PeerRole) -> PeerError {
    use webpki::Error as E;
    match e {
        E::CertExpired { time, not_after } => PeerError::Expired {
            not_after: not_after.as_secs(),
            now: time.as_secs(),
        },
        E::CertNotValidYet { time, not_before } => PeerError::NotYetValid {
            not_before: not_before.as_secs(),
            now: time.as_secs(),
        },
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            PeerError::ExtendedKeyUsage { role, source: e }
        }
        E::CaUsedAsEndEntity => PeerError::LeafIsCa,
        E::CertRevoked => PeerError::Revoked { source: e },
        E::UnknownIssuer
        | E::InvalidSignatureForPublicKey
        | E::SignatureAlgorithmMismatch
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::EndEntityUsedAsCa
        | E::PathLenConstraintViolated
        | E::NameConstraintViolation
        | E::UnsupportedNameType
        | E::CertDistrusted
        | E::MaximumPathDepthExceeded
        | E::MaximumSignatureChecksExceeded
        | E::MaximumPathBuildCallsExceeded
        | E::MaximumNameConstraintComparisonsExceeded => PeerError::Untrusted {
            trust_domain: trust_domain.clone(),
            source: e,
        },
        E::BadDer
        | E::BadDerTime
        | E::TrailingData(_)
        | E::MalformedExtensions
        | E::ExtensionValueInvalid
        | E::InvalidCertValidity
        | E::InvalidSerialNumber
        | E::MalformedNameConstraint
        | E::UnsupportedCertVersion
        | E::UnsupportedCriticalExtension => PeerError::malformed(e.to_string()),
        other => PeerError::Other(other),
    }
}

/// The SPIFFE ID of a peer that the handshake already verified, from the certificates rustls
/// reports (`peer_certificates()`, leaf first): one parse of the leaf, no chain validation.
/// `None` when there is no certificate or it carries no single SPIFFE ID.
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    spiffe_id_of(certs.first()?).ok()
}

/// The rustls client-certificate verifier of servers (the proxy's inbound listeners, the node
/// API): a client certificate must be an X509-SVID of an accepted trust domain (role
/// [`PeerRole::Client`]). Whom to admit is the caller's business, after the handshake.
#[derive(Debug)]
pub struct ClientVerifier {
    inner: Arc<SvidVerifier>,
    mandatory: bool,
}

impl ClientVerifier {
    /// A verifier over the shared `inner`; a client certificate is mandatory.
    pub fn new(inner: Arc<SvidVerifier>) -> Self {
        Self {
            inner,
            mandatory: true,
        }
    }

    /// The same, admitting a client without a certificate (who then has no identity); one
    /// that presents a certificate is verified all the same.
    pub fn optional(self) -> Self {
        Self {
            mandatory: false,
            ..self
        }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify(end_entity, intermediates, now, PeerRole::Client)
        {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                tracing::debug!(reason = e.reason(), error = %e, "client certificate refused");
                Err(e.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.inner.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.inner.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.algorithms.supported_schemes()
    }
}

/// A predicate over the server's SPIFFE ID, for [`ServerVerifier`].
pub type ExpectPeer = Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>;

/// The rustls server-certificate verifier of outbound connections: the server's X509-SVID is
/// verified (role [`PeerRole::Server`]) and its SPIFFE ID must satisfy the expectation. The TLS
/// server name is ignored: SPIFFE authenticates by ID.
pub struct ServerVerifier {
    inner: Arc<SvidVerifier>,
    expect: ExpectPeer,
    expect_display: String,
    mark: Option<Role>,
}

impl ServerVerifier {
    /// A verifier over the shared `inner`, admitting servers whose ID satisfies `expect`;
    /// `expect_display` describes the expectation in errors (`peer is X, expected ...`).
    pub fn new(inner: Arc<SvidVerifier>, expect: ExpectPeer, expect_display: String) -> Self {
        Self {
            inner,
            expect,
            expect_display,
            mark: None,
        }
    }

    /// The same, also requiring a server whose ID names `role` (see [`Role::claimed_by`]) to
    /// carry `role`'s mark (see [`crate::role`]): a workload SVID that merely names the CA
    /// server's ID is not the CA, whatever the expectation admits.
    pub fn requiring(self, role: Role) -> Self {
        Self {
            mark: Some(role),
            ..self
        }
    }

    /// The description of whom this verifier admits.
    pub fn expected(&self) -> &str {
        &self.expect_display
    }
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("inner", &self.inner)
            .field("expected", &self.expect_display)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = self
            .inner
            .verify(end_entity, intermediates, now, PeerRole::Server)
            .and_then(|id| {
                if !(self.expect)(&id) {
                    return Err(PeerError::UnexpectedPeer {
                        actual: id,
                        expected: self.expect_display.clone(),
                    });
                }
                match self.mark {
                    Some(role) if role.claimed_by(&id) && !role.marks(end_entity) => {
                        Err(PeerError::MissingMark { id, role })
                    }
                    _ => Ok(()),
                }
            });
        match checked {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                tracing::debug!(reason = e.reason(), error = %e, "server certificate refused");
                Err(e.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.inner.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.inner.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.algorithms.supported_schemes()
    }
}

/// The metric label of a failed handshake's rustls error: the [`PeerError::reason`] when one
/// of our verifiers refused the peer; `no_certificate` when the client sent none; a label of
/// the closest kind for rustls' own certificate errors (e.g. `untrusted` for a
/// CertificateVerify signature that does not match the certificate); `protocol` for every other
/// TLS failure (alerts received, unexpected messages, no common version or cipher suite);
/// `other` for local failures.
pub fn failure_reason(err: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match err {
        E::NoCertificatesPresented => "no_certificate",
        E::InvalidCertificate(cert) => certificate_reason(cert),
        E::General(_)
        | E::FailedToGetCurrentTime
        | E::FailedToGetRandomBytes
        | E::EncryptError
        | E::Other(_) => "other",
        _ => "protocol",
    }
}

/// The [`PeerError`] inside a rustls error, when one of our verifiers refused the peer: for
/// log lines, since rustls displays it with its `Debug` form.
pub fn peer_error(err: &rustls::Error) -> Option<&PeerError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PeerError>()
        }
        _ => None,
    }
}

fn certificate_reason(err: &CertificateError) -> &'static str {
    use CertificateError as C;
    match err {
        C::Other(OtherError(inner)) => inner
            .downcast_ref::<PeerError>()
            .map_or("other", PeerError::reason),
        C::Expired | C::ExpiredContext { .. } => "expired",
        C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
        C::BadEncoding | C::UnhandledCriticalExtension => "malformed",
        C::UnknownIssuer
        | C::BadSignature
        | C::Revoked
        | C::UnsupportedSignatureAlgorithmContext { .. }
        | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => "untrusted",
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => "key_usage",
        _ => "other",
    }
}

/// The metric label of a failed `tokio_rustls` accept or connect: [`failure_reason`] of the
/// rustls error it carries (found anywhere in its source chain), else `timeout` for
/// `ErrorKind::TimedOut` (also what `tokio::time::error::Elapsed` converts to), else `io`.
pub fn io_failure_reason(err: &std::io::Error) -> &'static str {
    let mut source = err
        .get_ref()
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return failure_reason(tls);
        }
        source = e.source();
    }
    match err.kind() {
        std::io::ErrorKind::TimedOut => "timeout",
        _ => "io",
    }
}

#[cfg(test)]
mod tests;
