//! OIDC discovery for JWT-SVIDs (`ca.jwt_issuer`): relying parties that only speak OpenID
//! Connect (cloud IAM, secret stores, SaaS APIs) find the keys that verify this trust domain's
//! JWT-SVIDs from the issuer URL the tokens carry as `iss`.
//!
//! Pure: the issuer's checks, the discovery document and the JWKS (the bundle's JWT authorities
//! as plain OIDC signing keys: `use: "sig"` and their `alg`). The bundle endpoint serves them at
//! `<issuer path>/.well-known/openid-configuration` and `<issuer path>/keys`.

use serde_json::{json, Value};

use crate::bundle::TrustBundle;

/// Checks an issuer URL: `https://host[:port][/path]`, no query, fragment or user information,
/// no trailing slash (relying parties compare `iss` as a string). Returns it as given.
pub fn check_issuer(issuer: &str) -> Result<String, String> {
    let uri: http::Uri = issuer
        .parse()
        .map_err(|e| format!("{issuer:?}: {e}; write an https:// URL"))?;
    let host = uri.host().unwrap_or("");
    if uri.scheme_str() != Some("https") || host.is_empty() {
        return Err(format!(
            "{issuer:?}: an OIDC issuer is an https:// URL with a host, e.g. https://oidc.example.org"
        ));
    }
    if uri.query().is_some() || issuer.contains('#') || issuer.contains('@') {
        return Err(format!(
            "{issuer:?}: no query, fragment or user information in an issuer"
        ));
    }
    if issuer.ends_with('/') || issuer.len() > 1024 {
        return Err(format!(
            "{issuer:?}: write it without a trailing slash, in at most 1024 bytes"
        ));
    }
    Ok(issuer.to_owned())
}

/// The request paths of the discovery document and of the JWKS for `issuer`.
pub fn paths(issuer: &str) -> (String, String) {
    let base = issuer
        .parse::<http::Uri>()
        .map(|u| u.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    (
        format!("{base}/.well-known/openid-configuration"),
        format!("{base}/keys"),
    )
}

/// The OpenID Provider metadata for `issuer` (the fields relying parties require; only
/// `id_token` and the signing algorithms of the keys published are meaningful here).
pub fn discovery(issuer: &str, bundle: &TrustBundle) -> Value {
    let mut algs: Vec<&str> = bundle.jwt_authorities.iter().filter_map(alg_of).collect();
    algs.sort_unstable();
    algs.dedup();
    if algs.is_empty() {
        algs.push("ES256");
    }
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/keys"),
        "authorization_endpoint": format!("{issuer}/authorize"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
        "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti"],
    })
}

/// The JWKS of the bundle's JWT authorities, as OIDC signing keys.
pub fn jwks(bundle: &TrustBundle) -> Value {
    let keys: Vec<Value> = bundle
        .jwt_authorities
        .iter()
        .filter_map(|k| {
            let alg = alg_of(k)?;
            let mut k = k.clone();
            let map = k.as_object_mut()?;
            map.insert("use".into(), json!("sig"));
            map.insert("alg".into(), json!(alg));
            Some(k)
        })
        .collect();
    json!({ "keys": keys })
}

/// The JWS algorithm of a JWT authority, from its key type and curve.
fn alg_of(jwk: &Value) -> Option<&'static str> {
    match (
        jwk.get("kty")?.as_str()?,
        jwk.get("crv").and_then(Value::as_str),
    ) {
        ("EC", Some("P-256")) => Some("ES256"),
        ("EC", Some("P-384")) => Some("ES384"),
        ("RSA", _) => Some("RS256"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_https_urls_compared_as_written() {
        assert_eq!(
            check_issuer("https://oidc.example.org").unwrap(),
            "https://oidc.example.org"
        );
        assert!(check_issuer("https://example.org:8443/tenant-1").is_ok());
        for bad in [
            "http://oidc.example.org",
            "https://",
            "oidc.example.org",
            "https://oidc.example.org/",
            "https://oidc.example.org?x=1",
            "https://oidc.example.org#x",
            "https://u:p@oidc.example.org",
        ] {
            assert!(check_issuer(bad).is_err(), "{bad}");
        }
        assert_eq!(
            paths("https://example.org:8443/tenant-1"),
            (
                "/tenant-1/.well-known/openid-configuration".to_owned(),
                "/tenant-1/keys".to_owned()
            )
        );
        assert_eq!(paths("https://oidc.example.org").1, "/keys");
    }

    #[test]
    fn the_jwks_holds_the_jwt_authorities_as_signing_keys() {
        let key = crate::jwt::JwtKey::generate().unwrap();
        let bundle = TrustBundle {
            trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
            x509_authorities: Vec::new(),
            jwt_authorities: vec![key.public_jwk()],
            sequence: 1,
            refresh_hint: std::time::Duration::ZERO,
        };
        let jwks = jwks(&bundle);
        let k = &jwks["keys"][0];
        assert_eq!(
            (&k["use"], &k["alg"], &k["kid"]),
            (&json!("sig"), &json!("ES256"), &json!(key.kid()))
        );
        let d = discovery("https://oidc.example.org", &bundle);
        assert_eq!(d["jwks_uri"], "https://oidc.example.org/keys");
        assert_eq!(d["id_token_signing_alg_values_supported"], json!(["ES256"]));
    }
}
