//! The trust bundle of a trust domain, as PEM, as concatenated DER, and as a SPIFFE bundle.
//!
//! A SPIFFE bundle is a JWK Set (`{"keys": [...], "spiffe_sequence": n,
//! "spiffe_refresh_hint": secs}`). X.509 authorities are JWKs with `use: "x509-svid"`, the key
//! (`kty`, `crv`/`x`/`y`, `n`/`e`), `x5c` holding exactly one base64 DER certificate, and no
//! `kid`. JWT authorities are JWKs with `use: "jwt-svid"` and a `kid`.
//!
//! [`TrustBundle::from_spiffe_json`] parses strictly: it rejects what the specification forbids
//! (a `kid` on an X.509 authority, an `x5c` of other than one certificate, a JWT authority
//! without `kid`, undecodable certificates) and ignores what it says to ignore (a missing or
//! unknown `use`, an unknown `kty`).

use std::collections::HashSet;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Map, Value};
use spiffe::TrustDomain;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The `use` of X.509 authorities in a SPIFFE bundle.
pub const X509_SVID_USE: &str = "x509-svid";

/// The `use` of JWT authorities in a SPIFFE bundle.
pub const JWT_SVID_USE: &str = "jwt-svid";

/// Errors of bundle encoding and parsing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The document is not JSON.
    #[error("bundle is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// The document is not a JSON object.
    #[error("bundle is not a JSON object")]
    NotAnObject,
    /// The `keys` array is missing (it is required, though it may be empty).
    #[error("bundle has no \"keys\" array")]
    MissingKeys,
    /// A top-level field of the wrong type.
    #[error("bundle field {field:?} must be {expected}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// A JWK in `keys` breaks the rules; `index` is its position in the array.
    #[error("bundle key {index}: {reason}")]
    InvalidKey {
        /// Position in `keys`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two JWT authorities with the same `kid`.
    #[error("bundle has two JWT authorities with key id {0:?}")]
    DuplicateKeyId(String),
    /// An X.509 authority of this bundle that cannot be published (for encoding).
    #[error("x509 authority {index}: {reason}")]
    InvalidAuthority {
        /// Position in `x509_authorities`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A JWT authority of this bundle that cannot be published (for encoding).
    #[error("jwt authority {index}: {reason}")]
    InvalidJwtAuthority {
        /// Position in `jwt_authorities`.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The trust bundle of one trust domain.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustBundle {
    /// The trust domain the bundle belongs to (bundles of different trust domains never mix).
    pub trust_domain: TrustDomain,
    /// The X.509 authorities (root certificates), DER.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// The JWT authorities, as JWKs carrying `kid` (and `use: "jwt-svid"`).
    pub jwt_authorities: Vec<Value>,
    /// `spiffe_sequence`: increases on every change of content.
    pub sequence: u64,
    /// `spiffe_refresh_hint`, whole seconds; zero means not set.
    pub refresh_hint: Duration,
}

impl TrustBundle {
    /// The X.509 authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|cert| meshid_api::files::pem("CERTIFICATE", [cert.as_ref()]))
            .collect()
    }

    /// The X.509 authorities as concatenated DER (the Workload API's `bundle` field).
    pub fn to_der_concat(&self) -> Vec<u8> {
        self.x509_authorities
            .iter()
            .flat_map(|cert| cert.iter().copied())
            .collect()
    }

    /// The SPIFFE bundle (JWK Set) as compact JSON.
    ///
    /// An authority that cannot be published (a certificate that does not parse or has a key
    /// type JWK cannot express, a JWT authority without `kid`) is left out with a warning; use
    /// [`TrustBundle::try_to_spiffe_json`] to get an error instead.
    pub fn to_spiffe_json(&self) -> String {
        self.encode(|err| {
            tracing::warn!(trust_domain = %self.trust_domain, error = %err, "authority left out of the SPIFFE bundle");
            Ok(())
        })
        .unwrap_or_default()
    }

    /// The SPIFFE bundle (JWK Set) as compact JSON, failing on the first authority that cannot
    /// be published.
    pub fn try_to_spiffe_json(&self) -> Result<String, BundleError> {
        self.encode(Err)
    }

    /// Encodes the bundle; `on_bad` decides whether a bad authority is skipped (`Ok`) or fatal.
    fn encode(
        &self,
        mut on_bad: impl FnMut(BundleError) -> Result<(), BundleError>,
    ) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for (index, cert) in self.x509_authorities.iter().enumerate() {
            match x509_authority_jwk(cert) {
                Ok(jwk) => keys.push(jwk),
                Err(reason) => on_bad(BundleError::InvalidAuthority { index, reason })?,
            }
        }
        for (index, jwk) in self.jwt_authorities.iter().enumerate() {
            match jwt_authority_jwk(jwk) {
                Ok(jwk) => keys.push(jwk),
                Err(reason) => on_bad(BundleError::InvalidJwtAuthority { index, reason })?,
            }
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), json!(self.sequence));
        if self.refresh_hint.as_secs() > 0 {
            doc.insert(
                "spiffe_refresh_hint".into(),
                json!(self.refresh_hint.as_secs()),
            );
        }
        Ok(Value::Object(doc).to_string())
    }

    /// Parses a SPIFFE bundle for trust domain `td`, strictly (see the module documentation).
    pub fn from_spiffe_json(td: &TrustDomain, json: &str) -> Result<TrustBundle, BundleError> {
        let doc: Value = serde_json::from_str(json).map_err(BundleError::Json)?;
        let Value::Object(doc) = doc else {
            return Err(BundleError::NotAnObject);
        };
        let Some(Value::Array(keys)) = doc.get("keys") else {
            return Err(BundleError::MissingKeys);
        };
        let sequence = match doc.get("spiffe_sequence") {
            None => 0,
            Some(v) => v.as_u64().ok_or(BundleError::InvalidField {
                field: "spiffe_sequence",
                expected: "a non-negative integer",
            })?,
        };
        let refresh_hint = match doc.get("spiffe_refresh_hint") {
            None => Duration::ZERO,
            Some(v) => Duration::from_secs(v.as_u64().ok_or(BundleError::InvalidField {
                field: "spiffe_refresh_hint",
                expected: "a non-negative integer number of seconds",
            })?),
        };

        let mut bundle = TrustBundle {
            trust_domain: td.clone(),
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence,
            refresh_hint,
        };
        let mut kids = HashSet::new();
        for (index, key) in keys.iter().enumerate() {
            let bad = |reason| BundleError::InvalidKey { index, reason };
            let Value::Object(jwk) = key else {
                return Err(bad("not a JSON object"));
            };
            let Some(kty) = jwk.get("kty").and_then(Value::as_str) else {
                return Err(bad("kty is required"));
            };
            let Some(use_) = jwk.get("use").and_then(Value::as_str) else {
                continue; // no usable `use`: ignored, as the specification says
            };
            if !matches!(use_, X509_SVID_USE | JWT_SVID_USE) {
                continue;
            }
            if !matches!(kty, "EC" | "RSA" | "OKP") {
                continue; // unknown key type: ignored, as the specification says
            }
            if use_ == X509_SVID_USE {
                bundle
                    .x509_authorities
                    .push(parse_x509_authority(jwk).map_err(bad)?);
            } else {
                let kid = match jwk.get("kid") {
                    Some(Value::String(kid)) if !kid.is_empty() => kid,
                    _ => return Err(bad("a jwt-svid key must have a non-empty kid")),
                };
                if !kids.insert(kid.clone()) {
                    return Err(BundleError::DuplicateKeyId(kid.chars().take(64).collect()));
                }
                bundle.jwt_authorities.push(key.clone());
            }
        }
        Ok(bundle)
    }
}

/// The bundle JWK of an X.509 authority: its key fields, `use: "x509-svid"` and `x5c`, no `kid`.
pub fn x509_authority_jwk(cert: &CertificateDer<'_>) -> Result<Value, &'static str> {
    let x509 = parse_cert(cert)?;
    let mut jwk = spki_jwk(x509.public_key()).ok_or("unsupported public key type")?;
    jwk.insert("use".into(), Value::String(X509_SVID_USE.into()));
    jwk.insert(
        "x5c".into(),
        Value::Array(vec![Value::String(STANDARD.encode(cert))]),
    );
    Ok(Value::Object(jwk))
}

/// A JWT authority as published: an object with `kty` and a non-empty `kid`, `use` set to
/// `jwt-svid`.
fn jwt_authority_jwk(jwk: &Value) -> Result<Value, &'static str> {
    let Value::Object(map) = jwk else {
        return Err("not a JSON object");
    };
    if map
        .get("kid")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("no kid");
    }
    if map.get("kty").and_then(Value::as_str).is_none() {
        return Err("no kty");
    }
    let mut map = map.clone();
    match map.get("use") {
        None => {
            map.insert("use".into(), Value::String(JWT_SVID_USE.into()));
        }
        Some(Value::String(u)) if u == JWT_SVID_USE => {}
        Some(_) => return Err("use is not \"jwt-svid\""),
    }
    Ok(Value::Object(map))
}

fn parse_x509_authority(jwk: &Map<String, Value>) -> Result<CertificateDer<'static>, &'static str> {
    if jwk.contains_key("kid") {
        return Err("an x509-svid key must not have a kid");
    }
    let der = match jwk.get("x5c") {
        Some(Value::Array(certs)) => match certs.as_slice() {
            [Value::String(b64)] => STANDARD
                .decode(b64)
                .map_err(|_| "x5c[0] is not standard base64")?,
            [_] => return Err("x5c[0] is not a string"),
            _ => return Err("x5c must hold exactly one certificate"),
        },
        _ => return Err("an x509-svid key must have an x5c array"),
    };
    let x509 = parse_cert(&der)?;
    let expected = spki_jwk(x509.public_key()).ok_or("x5c certificate has an unsupported key")?;
    if expected.iter().any(|(k, v)| jwk.get(k) != Some(v)) {
        return Err("key fields do not match the x5c certificate");
    }
    drop(x509);
    Ok(CertificateDer::from(der))
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, &'static str> {
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        Ok(_) => Err("trailing data after the certificate"),
        Err(_) => Err("not a DER X.509 certificate"),
    }
}

/// The JWK key fields of a public key: `kty` EC with `crv` P-256/P-384 and `x`/`y`, `kty` RSA
/// with `n`/`e`, or `kty` OKP with `crv` Ed25519 and `x`. None for other keys.
pub(crate) fn spki_jwk(spki: &SubjectPublicKeyInfo<'_>) -> Option<Map<String, Value>> {
    let alg = &spki.algorithm.algorithm;
    let key = spki.subject_public_key.data.as_ref();
    let mut jwk = Map::new();
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
        let (crv, len) = if curve == OID_EC_P256 {
            ("P-256", 32)
        } else if curve == OID_NIST_EC_P384 {
            ("P-384", 48)
        } else {
            return None;
        };
        let (x, y) = match key.split_first() {
            Some((0x04, xy)) if xy.len() == 2 * len => xy.split_at(len),
            _ => return None,
        };
        jwk.insert("kty".into(), json!("EC"));
        jwk.insert("crv".into(), json!(crv));
        jwk.insert("x".into(), json!(URL_SAFE_NO_PAD.encode(x)));
        jwk.insert("y".into(), json!(URL_SAFE_NO_PAD.encode(y)));
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return None;
        };
        jwk.insert("kty".into(), json!("RSA"));
        jwk.insert(
            "n".into(),
            json!(URL_SAFE_NO_PAD.encode(unsigned(rsa.modulus))),
        );
        jwk.insert(
            "e".into(),
            json!(URL_SAFE_NO_PAD.encode(unsigned(rsa.exponent))),
        );
    } else if *alg == OID_SIG_ED25519 && key.len() == 32 {
        jwk.insert("kty".into(), json!("OKP"));
        jwk.insert("crv".into(), json!("Ed25519"));
        jwk.insert("x".into(), json!(URL_SAFE_NO_PAD.encode(key)));
    } else {
        return None;
    }
    Some(jwk)
}

/// A DER INTEGER's content without its leading zero bytes (JWK integers are unsigned).
fn unsigned(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes.get(start..).unwrap_or(bytes)
}

#[cfg(test)]
mod tests;
