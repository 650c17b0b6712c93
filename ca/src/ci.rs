//! Just-in-time SVIDs for CI jobs: the OIDC token a CI system hands each job (GitHub Actions,
//! GitLab `id_tokens`, CircleCI's `CIRCLE_OIDC_TOKEN`) exchanged for a short-lived SVID, so
//! that pipelines hold no long-lived secret.
//!
//! Pure: a token is verified against one configured issuer ([`CiIssuer`]) and its JWKS
//! ([`verify`]): the signature (RS256, ES256 or ES384, by the `kid` the JWKS holds; no `none`,
//! no HMAC), `iss`, `aud`, `exp`, `nbf`, an `iat` within the issuer's `max_age`, and a `jti`
//! (the caller refuses a second use of it). The first rule whose claim conditions all hold
//! decides ([`grant`]): its SPIFFE ID template is filled from the claims (each value checked as
//! SPIFFE ID path segments, never cleaned up silently), and the lifetime is the issuer's cap,
//! never past the token's own expiry. A token no rule matches gets nothing: development
//! pipelines cannot obtain production identities. Every refusal says why ([`Refusal`]), never
//! with the token. The `state` module holds the configured issuers and their JWKS for the CA.

pub mod state;

use std::time::Duration;

use serde_json::{Map, Value};
use spiffe::{SpiffeId, TrustDomain};

/// The longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The default cap on an exchanged SVID's lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(15 * 60);
/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: i64 = 30;

/// A CI system whose tokens are accepted, and what they may become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiIssuer {
    /// A name for logs and audit records (`github`).
    pub name: String,
    /// The `iss` its tokens carry, exactly.
    pub issuer: String,
    /// The `aud` a token must carry (set in the pipeline, e.g. `meshid`).
    pub audience: String,
    /// How old a token may be (`iat`), whatever its `exp`.
    pub max_age: Duration,
    /// The longest SVID lifetime granted.
    pub max_ttl: Duration,
    /// In order: the first whose conditions hold decides.
    pub rules: Vec<Rule>,
}

/// Which tokens get which identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// A name for audit records (`payments-deploy`).
    pub name: String,
    /// Claim conditions, all of which must hold.
    pub when: Vec<(String, ClaimMatch)>,
    /// The SPIFFE ID, with `{claim}` placeholders (`spiffe://example.org/ci/{repository}`).
    pub spiffe_id: String,
}

/// A condition on one claim (a string claim; a missing or non-string claim never matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimMatch {
    /// Exactly this value.
    Exact(String),
    /// A value starting with this (written `refs/heads/release-*`).
    Prefix(String),
}

impl ClaimMatch {
    /// Parses a condition as written: a trailing `*` makes it a prefix.
    pub fn parse(text: &str) -> ClaimMatch {
        match text.strip_suffix('*') {
            Some(prefix) => ClaimMatch::Prefix(prefix.to_owned()),
            None => ClaimMatch::Exact(text.to_owned()),
        }
    }

    fn holds(&self, value: &str) -> bool {
        match self {
            ClaimMatch::Exact(v) => value == v,
            ClaimMatch::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

/// Why a token was refused: what to tell the caller and record, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a JWT, or a part does not decode.
    #[error("not a well-formed JWT: {0}")]
    Malformed(String),
    /// An algorithm other than RS256, ES256 or ES384.
    #[error("algorithm {0} is not accepted (RS256, ES256 or ES384)")]
    Algorithm(String),
    /// The JWKS holds no key with the token's `kid`.
    #[error("no key {0:?} in the issuer's JWKS")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// Another issuer.
    #[error("issuer is not {0}")]
    WrongIssuer(String),
    /// Not for us.
    #[error("audience is not {0}")]
    WrongAudience(String),
    /// Past `exp`.
    #[error("expired")]
    Expired,
    /// Before `nbf` (or `iat` in the future).
    #[error("not yet valid")]
    NotYetValid,
    /// Issued longer ago than the issuer's `max_age`.
    #[error("issued more than {0:?} ago")]
    TooOld(Duration),
    /// A required claim is missing or of the wrong type.
    #[error("claim {0} is missing or not of the expected type")]
    MissingClaim(&'static str),
    /// No rule's conditions hold.
    #[error("no rule of issuer {0} matches the token's claims")]
    NoRule(String),
    /// The matching rule's SPIFFE ID cannot be made from the claims.
    #[error("rule {rule}: {reason}")]
    Template {
        /// The rule.
        rule: String,
        /// What is wrong.
        reason: String,
    },
    /// The `jti` was exchanged before.
    #[error("this token was already exchanged (jti seen before)")]
    Replayed,
}

impl Refusal {
    /// A short stable reason for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::Algorithm(_) => "algorithm",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::WrongIssuer(_) => "wrong_issuer",
            Refusal::WrongAudience(_) => "wrong_audience",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::TooOld(_) => "too_old",
            Refusal::MissingClaim(_) => "missing_claim",
            Refusal::NoRule(_) => "no_rule",
            Refusal::Template { .. } => "template",
            Refusal::Replayed => "replayed",
        }
    }
}

/// A token whose signature and times verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Every claim.
    pub claims: Map<String, Value>,
    /// `jti`, to refuse a second use.
    pub jti: String,
    /// `exp`, unix seconds.
    pub exp: i64,
}

/// Verifies `token` from `issuer` with the keys of `jwks` (the issuer's JWKS document) at
/// `now` (unix seconds).
pub fn verify(token: &str, issuer: &CiIssuer, jwks: &str, now: i64) -> Result<Verified, Refusal> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::Malformed(format!(
            "longer than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let alg = match header.alg {
        Algorithm::RS256 | Algorithm::ES256 | Algorithm::ES384 => header.alg,
        other => return Err(Refusal::Algorithm(format!("{other:?}"))),
    };
    let kid = header.kid.unwrap_or_default();
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks)
        .map_err(|e| Refusal::Malformed(format!("the issuer's JWKS: {e}")))?;
    let jwk = set
        .keys
        .iter()
        .find(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
        .ok_or_else(|| Refusal::UnknownKey(kid.clone()))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| Refusal::UnknownKey(kid.clone()))?;
    let mut validation = Validation::new(alg);
    // Times are checked below, against `now`.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.set_issuer(&[issuer.issuer.as_str()]);
    validation.set_audience(&[issuer.audience.as_str()]);
    let data =
        jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => Refusal::BadSignature,
                ErrorKind::InvalidIssuer => Refusal::WrongIssuer(issuer.issuer.clone()),
                ErrorKind::InvalidAudience => Refusal::WrongAudience(issuer.audience.clone()),
                ErrorKind::MissingRequiredClaim(c) if c == "exp" => Refusal::MissingClaim("exp"),
                ErrorKind::MissingRequiredClaim(c) if c == "iss" => Refusal::MissingClaim("iss"),
                ErrorKind::MissingRequiredClaim(_) => Refusal::MissingClaim("aud"),
                ErrorKind::InvalidAlgorithm => Refusal::Algorithm(format!("{alg:?} with this key")),
                _ => Refusal::Malformed(e.to_string()),
            }
        })?;
    let claims = data.claims;
    let int = |name: &'static str| claims.get(name).and_then(Value::as_i64);
    let exp = int("exp").ok_or(Refusal::MissingClaim("exp"))?;
    let iat = int("iat").ok_or(Refusal::MissingClaim("iat"))?;
    if now > exp + LEEWAY_SECS {
        return Err(Refusal::Expired);
    }
    if int("nbf").is_some_and(|nbf| nbf > now + LEEWAY_SECS) || iat > now + LEEWAY_SECS {
        return Err(Refusal::NotYetValid);
    }
    let max_age = i64::try_from(issuer.max_age.as_secs()).unwrap_or(i64::MAX);
    if now - iat > max_age + LEEWAY_SECS {
        return Err(Refusal::TooOld(issuer.max_age));
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or(Refusal::MissingClaim("jti"))?
        .to_owned();
    Ok(Verified { claims, jti, exp })
}

/// What a verified token becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The rule that decided.
    pub rule: String,
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// The SVID's lifetime: the issuer's cap, never past the token's expiry.
    pub ttl: Duration,
}

/// Decides what `verified` (from `issuer`) becomes in trust domain `td`, at `now`.
pub fn grant(
    verified: &Verified,
    issuer: &CiIssuer,
    td: &TrustDomain,
    now: i64,
) -> Result<Grant, Refusal> {
    let claim = |name: &str| verified.claims.get(name).and_then(Value::as_str);
    let rule = issuer
        .rules
        .iter()
        .find(|r| {
            r.when
                .iter()
                .all(|(name, m)| claim(name).is_some_and(|v| m.holds(v)))
        })
        .ok_or_else(|| Refusal::NoRule(issuer.name.clone()))?;
    let template = |reason: String| Refusal::Template {
        rule: rule.name.clone(),
        reason,
    };
    let id = fill(&rule.spiffe_id, |name| claim(name)).map_err(template)?;
    let spiffe_id = SpiffeId::new(&id).map_err(|e| template(format!("{id:?}: {e}")))?;
    if spiffe_id.trust_domain() != td {
        return Err(template(format!("{spiffe_id} is not in {td}")));
    }
    let left = u64::try_from(verified.exp - now).unwrap_or(0);
    let ttl = issuer.max_ttl.min(Duration::from_secs(left));
    if ttl.is_zero() {
        return Err(Refusal::Expired);
    }
    Ok(Grant {
        rule: rule.name.clone(),
        spiffe_id,
        ttl,
    })
}

/// Fills `{claim}` placeholders; each value must be one or more SPIFFE ID path segments
/// (letters, digits, `.`, `-`, `_`, separated by `/`; no empty, `.` or `..` segment).
pub fn fill<'a>(template: &str, claim: impl Fn(&str) -> Option<&'a str>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if rest[..open].contains('}') {
            return Err(format!("unopened placeholder in {template:?}"));
        }
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed placeholder in {template:?}"))?;
        let name = &after[..close];
        let value = claim(name).ok_or_else(|| format!("the token has no string claim {name:?}"))?;
        let segments_ok = !value.is_empty()
            && value.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            });
        if !segments_ok {
            let shown = meshid_policy::yaml::clip(value);
            return Err(format!(
                "claim {name:?} ({shown:?}) is not usable in a SPIFFE ID path: letters, digits, \
                 '.', '-', '_' and '/' between non-empty segments"
            ));
        }
        out.push_str(value);
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("unopened placeholder in {template:?}"));
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
