//! JWT-SVIDs: minting with the CA's ES256 key (or, with `ca.jwt_key_type = "rsa-2048"`, an
//! RS256 key, for relying parties that accept only RS256).
//!
//! Pure: no I/O and no clock (callers pass `now`). A token is a JWS in compact serialization
//! whose header is exactly `{"alg":"ES256" or "RS256","kid":…,"typ":"JWT"}` and whose claims are `sub` (the
//! SPIFFE ID), `aud`, `exp` and `iat` (integers, never floats), a random `jti`, and `iss` when
//! the CA has an OIDC issuer (`ca.jwt_issuer`).
//!
//! The CA does not validate JWT-SVIDs: the agent does (ValidateJWTSVID), with the `spiffe`
//! crate's validator, and so do workloads with theirs. The tests check every minted token with
//! that same validator and with `jsonwebtoken`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair as _, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use spiffe::SpiffeId;
use zeroize::Zeroizing;

use crate::bundle::JWT_SVID_USE;

/// DER prefix of a P-256 SubjectPublicKeyInfo, up to the uncompressed point.
const SPKI_PREFIX_P256: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Errors of JWT-SVID minting and of loading JWT keys. No variant carries a token or key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The system random generator failed while generating a key.
    #[error("key generation failed")]
    KeyGeneration,
    /// A JWT private key could not be loaded; the reason never includes the key.
    #[error("invalid JWT private key: {0}")]
    InvalidKey(&'static str),
    /// A public key (SPKI or JWK) that is not a usable EC P-256 or P-384 key.
    #[error("invalid JWT public key: {0}")]
    InvalidPublicKey(&'static str),
    /// Signing failed.
    #[error("signing failed")]
    Signing,
    /// No audience, or an empty audience string.
    #[error("audience is required and must not be empty")]
    EmptyAudience,
    /// A lifetime under one second, or one that overflows.
    #[error("invalid lifetime {0:?}: expected at least 1 second")]
    InvalidTtl(Duration),
    /// `now` is before the Unix epoch.
    #[error("time is before the unix epoch")]
    InvalidTime,
    /// JSON encoding failed.
    #[error("json encoding failed")]
    Encode(#[source] serde_json::Error),
}

/// The kind of key JWT-SVIDs are signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JwtKeyType {
    /// ECDSA P-256 with SHA-256 (ES256), the default.
    #[default]
    Es256,
    /// RSA 2048 PKCS#1 v1.5 with SHA-256 (RS256).
    Rs256,
}

/// The RSA modulus size of RS256 keys, in bits.
pub const RSA_BITS: usize = 2048;

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// The key JWT-SVIDs are signed with: ES256 (ECDSA P-256, SHA-256) or RS256.
///
/// Its `kid` is the RFC 7638 JWK thumbprint of the public key, so it is the same every time the
/// key is loaded. The PKCS#8 copy it holds is zeroized on drop; `Debug` shows only the `kid`.
pub struct JwtKey {
    signer: Signer,
    pkcs8: Zeroizing<Vec<u8>>,
    spki: Vec<u8>,
    kid: String,
    jwk: Value,
}

impl JwtKey {
    /// Generates a fresh P-256 key.
    pub fn generate() -> Result<Self, JwtError> {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| JwtError::KeyGeneration)?;
        Self::from_pkcs8_der(doc.as_ref())
    }

    /// Generates a fresh key of `kind` (RSA keys with the `rsa` crate, from the system's
    /// random generator; signing is aws-lc-rs's either way).
    pub fn generate_for(kind: JwtKeyType) -> Result<Self, JwtError> {
        match kind {
            JwtKeyType::Es256 => Self::generate(),
            JwtKeyType::Rs256 => {
                use rsa::pkcs8::EncodePrivateKey as _;
                let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, RSA_BITS)
                    .map_err(|_| JwtError::KeyGeneration)?;
                let der = key.to_pkcs8_der().map_err(|_| JwtError::KeyGeneration)?;
                Self::from_pkcs8_der(der.as_bytes())
            }
        }
    }

    /// `ES256` or `RS256`.
    pub fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Ec(_) => "ES256",
            Signer::Rsa(_) => "RS256",
        }
    }

    /// Loads a PKCS#8 DER private key: EC P-256, or RSA of at least [`RSA_BITS`] bits.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, JwtError> {
        let pair = match EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der) {
            Ok(pair) => pair,
            Err(_) => return Self::from_rsa_pkcs8_der(der),
        };
        let point = pair.public_key().as_ref();
        let (x, y) = split_point(point, 32)?;
        let kid = thumbprint("P-256", x, y);
        let jwk = ec_jwk("P-256", x, y, &kid);
        let mut spki = SPKI_PREFIX_P256.to_vec();
        spki.extend_from_slice(point);
        Ok(JwtKey {
            signer: Signer::Ec(pair),
            pkcs8: Zeroizing::new(der.to_vec()),
            spki,
            kid,
            jwk,
        })
    }

    fn from_rsa_pkcs8_der(der: &[u8]) -> Result<Self, JwtError> {
        use rsa::pkcs8::{DecodePrivateKey as _, EncodePublicKey as _};
        use rsa::traits::PublicKeyParts as _;
        let invalid = JwtError::InvalidKey("not a PKCS#8 EC P-256 or RSA private key");
        let pair = RsaKeyPair::from_pkcs8(der).map_err(|e| match e.to_string().as_str() {
            "TooSmall" => JwtError::InvalidKey("an RSA JWT key has at least 2048 bits"),
            _ => invalid,
        })?;
        if pair.public_modulus_len() * 8 < RSA_BITS {
            return Err(JwtError::InvalidKey(
                "an RSA JWT key has at least 2048 bits",
            ));
        }
        let key = rsa::RsaPrivateKey::from_pkcs8_der(der)
            .map_err(|_| JwtError::InvalidKey("not a PKCS#8 RSA private key"))?;
        let public = key.to_public_key();
        let spki = public
            .to_public_key_der()
            .map_err(|_| JwtError::InvalidKey("cannot encode the RSA public key"))?
            .into_vec();
        let (n, e) = (public.n().to_bytes_be(), public.e().to_bytes_be());
        let (n, e) = (URL_SAFE_NO_PAD.encode(n), URL_SAFE_NO_PAD.encode(e));
        let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        let jwk = json!({ "kty": "RSA", "n": n, "e": e, "kid": kid, "use": JWT_SVID_USE });
        Ok(JwtKey {
            signer: Signer::Rsa(pair),
            pkcs8: Zeroizing::new(der.to_vec()),
            spki,
            kid,
            jwk,
        })
    }

    /// Loads a PEM `PRIVATE KEY` (PKCS#8) block.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, JwtError> {
        let der = Zeroizing::new(
            PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| JwtError::InvalidKey("no PEM PRIVATE KEY block"))?,
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

    /// The key id: the base64url RFC 7638 thumbprint of the public key (43 characters).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a DER SubjectPublicKeyInfo.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    /// The public key as a JWK for a SPIFFE bundle: `kty`, `crv`, `x`, `y`, `kid` and
    /// `use: "jwt-svid"`.
    pub fn public_jwk(&self) -> Value {
        self.jwk.clone()
    }
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("private_key", &"[redacted]")
            .finish()
    }
}

/// The JWK (`kty`, `crv`, `x`, `y` or `n`, `e`; `kid`, `use: "jwt-svid"`) of an EC P-256 or
/// P-384 or an RSA public key given as a DER SubjectPublicKeyInfo.
pub fn jwk_from_spki(spki_der: &[u8], kid: &str) -> Result<Value, JwtError> {
    use x509_parser::prelude::FromDer as _;
    let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|_| JwtError::InvalidPublicKey("not a DER SubjectPublicKeyInfo"))?;
    if !rest.is_empty() {
        return Err(JwtError::InvalidPublicKey("trailing data after the key"));
    }
    let mut jwk = crate::bundle::spki_jwk(&spki)
        .filter(|jwk| matches!(jwk.get("kty").and_then(Value::as_str), Some("EC" | "RSA")))
        .ok_or(JwtError::InvalidPublicKey(
            "not an EC P-256, P-384 or RSA key",
        ))?;
    if kid.is_empty() {
        return Err(JwtError::InvalidPublicKey("empty kid"));
    }
    jwk.insert("kid".into(), Value::String(kid.to_owned()));
    jwk.insert("use".into(), Value::String(JWT_SVID_USE.to_owned()));
    Ok(Value::Object(jwk))
}

/// Mints a JWT-SVID for `spiffe_id`, valid from `now` for `ttl`, for every audience in
/// `audience` (`aud` is a string for one audience, an array for several).
pub fn mint_jwt_svid(
    key: &JwtKey,
    spiffe_id: &SpiffeId,
    audience: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<String, JwtError> {
    mint_jwt_svid_from(key, None, spiffe_id, audience, ttl, now)
}

/// [`mint_jwt_svid`], with `iss` set to `issuer` when given (the OIDC issuer URL, see
/// [`crate::oidc`]).
pub fn mint_jwt_svid_from(
    key: &JwtKey,
    issuer: Option<&str>,
    spiffe_id: &SpiffeId,
    audience: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<String, JwtError> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err(JwtError::EmptyAudience);
    }
    let iat = unix_secs(now)?;
    let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| JwtError::InvalidTtl(ttl))?;
    if ttl_secs == 0 {
        return Err(JwtError::InvalidTtl(ttl));
    }
    let exp = iat.checked_add(ttl_secs).ok_or(JwtError::InvalidTtl(ttl))?;
    let aud = match audience {
        [one] => json!(one),
        many => json!(many),
    };
    let mut jti = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut jti);

    // serde_json maps are sorted by key: the header is exactly {"alg","kid","typ"}.
    let header = json!({ "alg": key.alg(), "kid": key.kid, "typ": "JWT" });
    let mut claims = json!({
        "aud": aud,
        "exp": exp,
        "iat": iat,
        "jti": hex::encode(jti),
        "sub": spiffe_id.to_string(),
    });
    if let Some(issuer) = issuer {
        claims["iss"] = json!(issuer);
    }
    let header = serde_json::to_vec(&header).map_err(JwtError::Encode)?;
    let claims = serde_json::to_vec(&claims).map_err(JwtError::Encode)?;

    let mut token = String::with_capacity((header.len() + claims.len()) * 4 / 3 + 100);
    URL_SAFE_NO_PAD.encode_string(&header, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
    let sig = match &key.signer {
        Signer::Ec(pair) => pair
            .sign(&SystemRandom::new(), token.as_bytes())
            .map_err(|_| JwtError::Signing)?
            .as_ref()
            .to_vec(),
        Signer::Rsa(pair) => {
            let mut sig = vec![0; pair.public_modulus_len()];
            pair.sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                token.as_bytes(),
                &mut sig,
            )
            .map_err(|_| JwtError::Signing)?;
            sig
        }
    };
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&sig, &mut token);
    Ok(token)
}

fn unix_secs(t: SystemTime) -> Result<i64, JwtError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| JwtError::InvalidTime)?
        .as_secs();
    i64::try_from(secs).map_err(|_| JwtError::InvalidTime)
}

fn split_point(point: &[u8], coord_len: usize) -> Result<(&[u8], &[u8]), JwtError> {
    match point.split_first() {
        Some((0x04, xy)) if xy.len() == 2 * coord_len => Ok(xy.split_at(coord_len)),
        _ => Err(JwtError::InvalidPublicKey("not an uncompressed EC point")),
    }
}

fn ec_jwk(crv: &str, x: &[u8], y: &[u8], kid: &str) -> Value {
    json!({
        "kty": "EC",
        "crv": crv,
        "x": URL_SAFE_NO_PAD.encode(x),
        "y": URL_SAFE_NO_PAD.encode(y),
        "kid": kid,
        "use": JWT_SVID_USE,
    })
}

/// The RFC 7638 thumbprint of an EC public key, base64url.
fn thumbprint(crv: &str, x: &[u8], y: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(x),
        URL_SAFE_NO_PAD.encode(y)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests;
