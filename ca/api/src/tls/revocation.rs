//! Certificate revocation lists as every meshid peer check uses them.
//!
//! The CA signs one CRL per issuing key that has revoked certificates (`meshid-ca svid
//! revoke`): an intermediate's CRL lists the SVIDs it signed, a root's the intermediates. They
//! reach agents on the node API's sync stream, workloads in the Workload API's `crl` fields,
//! and the proxy from its agent. [`Revocations`] holds one such set, parsed once:
//!
//! - for a new handshake, [`SvidVerifier`](super::verify::SvidVerifier) hands the CRLs to
//!   webpki's path validation, which checks each CRL's signature with the key of the issuer in
//!   the path being built (a CRL that does not verify fails the handshake: closed, not open);
//! - for a connection already established, [`Revocations::revoked_in`] looks each certificate
//!   of the peer's chain up by issuer name and serial, which is what a CRL entry names. The
//!   list came from the agent over its authenticated socket, and a CRL only removes trust,
//!   so a forged one can close connections but never admit a peer.

use std::collections::HashSet;

use rustls_pki_types::CertificateDer;
use webpki::{CertRevocationList, OwnedCertRevocationList};

/// A parsed set of CRLs.
#[derive(Default)]
pub struct Revocations {
    crls: Vec<CertRevocationList<'static>>,
    /// (issuer name as DER, serial as its INTEGER content bytes) of every listed certificate.
    revoked: HashSet<(Vec<u8>, Vec<u8>)>,
    /// The DER of every CRL, as received.
    der: Vec<Vec<u8>>,
    /// Which set this is, as the verifier holding it numbered it (0: not set yet).
    pub(crate) generation: u64,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations")
            .field("crls", &self.crls.len())
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

/// A CRL that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("CRL {index} is not a usable DER certificate revocation list: {detail}")]
pub struct CrlError {
    /// Its position in the list given.
    pub index: usize,
    /// What is wrong with it.
    pub detail: String,
}

/// A digest naming a set of CRLs (DER), whatever their order: how an agent tells the CA which
/// set its workloads have been handed, and how the CA compares it with its own (hex of the
/// first 16 bytes of a SHA-256 over the sorted, length-prefixed DERs).
pub fn set_digest(crls: &[Vec<u8>]) -> String {
    use sha2::Digest as _;
    let mut sorted: Vec<&Vec<u8>> = crls.iter().collect();
    sorted.sort();
    let mut h = sha2::Sha256::new();
    for der in sorted {
        h.update((der.len() as u64).to_be_bytes());
        h.update(der);
    }
    hex::encode(&h.finalize()[..16])
}

impl Revocations {
    /// Parses `crls` (DER). A CRL that does not parse is refused with the reason; the caller
    /// decides whether to keep the previous set (the proxy and the agent do).
    pub fn from_der(crls: &[Vec<u8>]) -> Result<Revocations, CrlError> {
        let mut out = Revocations::default();
        for (index, der) in crls.iter().enumerate() {
            let err = |detail: String| CrlError { index, detail };
            let owned =
                OwnedCertRevocationList::from_der(der).map_err(|e| err(format!("{e:?}")))?;
            let (rest, parsed) =
                x509_parser::parse_x509_crl(der).map_err(|e| err(e.to_string()))?;
            if !rest.is_empty() {
                return Err(err("trailing data".into()));
            }
            let issuer = parsed.tbs_cert_list.issuer.as_raw().to_vec();
            for entry in parsed.iter_revoked_certificates() {
                out.revoked
                    .insert((issuer.clone(), entry.raw_serial().to_vec()));
            }
            out.crls.push(CertRevocationList::from(owned));
            out.der.push(der.clone());
        }
        Ok(out)
    }

    /// Whether no CRL is held.
    pub fn is_empty(&self) -> bool {
        self.crls.is_empty()
    }

    /// How many certificates are listed.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// The CRLs as webpki takes them.
    pub(crate) fn crls(&self) -> &[CertRevocationList<'static>] {
        &self.crls
    }

    /// The CRLs as received (DER).
    pub fn der(&self) -> &[Vec<u8>] {
        &self.der
    }

    /// Whether the certificate (issuer name DER, serial content bytes) is listed.
    pub fn contains(&self, issuer: &[u8], serial: &[u8]) -> bool {
        self.revoked.contains(&(issuer.to_vec(), serial.to_vec()))
    }

    /// The first certificate of `chain` (leaf first) that a CRL lists, as its serial in lowercase
    /// hex; `None` when none is (or a certificate does not parse: the handshake checked it).
    pub fn revoked_in(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        if self.revoked.is_empty() {
            return None;
        }
        chain.iter().find_map(|c| {
            let (_, cert) = x509_parser::parse_x509_certificate(c).ok()?;
            self.contains(cert.issuer().as_raw(), cert.raw_serial())
                .then(|| hex::encode(cert.raw_serial()))
        })
    }
}
