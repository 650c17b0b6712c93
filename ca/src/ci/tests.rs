#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;

use super::*;

const NOW: i64 = 1_800_000_000;
const ISSUER: &str = "https://token.actions.githubusercontent.com";

fn issuer() -> CiIssuer {
    CiIssuer {
        name: "github".into(),
        issuer: ISSUER.into(),
        audience: "meshid".into(),
        max_age: Duration::from_secs(600),
        max_ttl: DEFAULT_MAX_TTL,
        rules: vec![
            Rule {
                name: "payments-prod".into(),
                when: vec![
                    ("repository".into(), ClaimMatch::parse("acme/payments")),
                    ("ref".into(), ClaimMatch::parse("refs/heads/main")),
                ],
                spiffe_id: "spiffe://example.org/ci/{repository}/prod".into(),
            },
            Rule {
                name: "payments-release".into(),
                when: vec![
                    ("repository".into(), ClaimMatch::parse("acme/payments")),
                    ("ref".into(), ClaimMatch::parse("refs/heads/release-*")),
                ],
                spiffe_id: "spiffe://example.org/ci/{repository}/{ref}".into(),
            },
        ],
    }
}

/// A signing key of a test issuer, and its JWKS.
struct TestIssuer {
    key: jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    kid: String,
    jwks: String,
}

fn rsa_issuer() -> TestIssuer {
    use base64::Engine as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::traits::PublicKeyParts as _;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
        "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be())});
    TestIssuer {
        key: jsonwebtoken::EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes()),
        alg: jsonwebtoken::Algorithm::RS256,
        kid: "rsa-1".into(),
        jwks: json!({ "keys": [jwk] }).to_string(),
    }
}

fn ec_issuer() -> TestIssuer {
    let key = crate::jwt::JwtKey::generate().unwrap();
    let jwk = key.public_jwk();
    TestIssuer {
        key: jsonwebtoken::EncodingKey::from_ec_der(&key.to_pkcs8_der()),
        alg: jsonwebtoken::Algorithm::ES256,
        kid: key.kid().to_owned(),
        jwks: json!({ "keys": [jwk] }).to_string(),
    }
}

fn claims() -> Value {
    json!({
        "iss": ISSUER, "aud": "meshid", "sub": "repo:acme/payments:ref:refs/heads/main",
        "repository": "acme/payments", "ref": "refs/heads/main",
        "iat": NOW - 60, "nbf": NOW - 60, "exp": NOW + 300, "jti": "2b3c4d5e",
    })
}

fn sign(i: &TestIssuer, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(i.alg);
    header.kid = Some(i.kid.clone());
    jsonwebtoken::encode(&header, claims, &i.key).unwrap()
}

fn with(change: impl FnOnce(&mut Map<String, Value>)) -> Value {
    let mut c = claims();
    change(c.as_object_mut().unwrap());
    c
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

#[test]
fn a_matching_token_of_either_algorithm_becomes_the_rules_identity() {
    for i in [rsa_issuer(), ec_issuer()] {
        let v = verify(&sign(&i, &claims()), &issuer(), &i.jwks, NOW).unwrap();
        assert_eq!(v.jti, "2b3c4d5e");
        let g = grant(&v, &issuer(), &td(), NOW).unwrap();
        assert_eq!(g.rule, "payments-prod");
        assert_eq!(
            g.spiffe_id.to_string(),
            "spiffe://example.org/ci/acme/payments/prod"
        );
        assert_eq!(
            g.ttl,
            Duration::from_secs(300),
            "capped by the token's expiry"
        );
    }
    // A release branch: the second rule, the ref in the ID; the issuer's cap wins when shorter.
    let i = ec_issuer();
    let t = sign(
        &i,
        &with(|c| {
            c.insert("ref".into(), json!("refs/heads/release-2"));
            c.insert("exp".into(), json!(NOW + 3600));
        }),
    );
    let v = verify(&t, &issuer(), &i.jwks, NOW).unwrap();
    let g = grant(&v, &issuer(), &td(), NOW).unwrap();
    assert_eq!(g.rule, "payments-release");
    assert_eq!(
        g.spiffe_id.to_string(),
        "spiffe://example.org/ci/acme/payments/refs/heads/release-2"
    );
    assert_eq!(g.ttl, DEFAULT_MAX_TTL);
}

#[test]
fn every_kind_of_bad_token_is_refused_for_its_reason() {
    let i = rsa_issuer();
    let other = rsa_issuer();
    let refuse = |token: String| {
        verify(&token, &issuer(), &i.jwks, NOW)
            .unwrap_err()
            .reason()
    };
    let changed = |name: &str, value: Value| {
        sign(
            &i,
            &with(|c| {
                c.insert(name.into(), value);
            }),
        )
    };
    let without = |name: &str| {
        sign(
            &i,
            &with(|c| {
                c.remove(name);
            }),
        )
    };
    assert_eq!(refuse(changed("aud", json!("other"))), "wrong_audience");
    assert_eq!(
        refuse(changed("iss", json!("https://gitlab.com"))),
        "wrong_issuer"
    );
    assert_eq!(refuse(changed("exp", json!(NOW - 120))), "expired");
    assert_eq!(refuse(changed("nbf", json!(NOW + 120))), "not_yet_valid");
    assert_eq!(refuse(changed("iat", json!(NOW - 3600))), "too_old");
    assert_eq!(refuse(without("jti")), "missing_claim");
    assert_eq!(refuse(without("exp")), "missing_claim");
    assert_eq!(refuse(without("iat")), "missing_claim");
    // Signed by another key under the same kid: the signature does not verify.
    assert_eq!(refuse(sign(&other, &claims())), "bad_signature");
    // A kid the JWKS does not hold.
    let mut unknown = rsa_issuer();
    unknown.kid = "rotated-away".into();
    assert_eq!(refuse(sign(&unknown, &claims())), "unknown_key");
    // HMAC (a "key" anyone with the JWKS could use) and unsigned tokens.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    assert_eq!(refuse(hs), "algorithm");
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims()));
    assert!(matches!(refuse(none), "malformed" | "algorithm"));
    let long = "x".repeat(MAX_TOKEN_BYTES + 1);
    for junk in ["", "a.b", "a.b.c", "....", long.as_str()] {
        assert_eq!(refuse(junk.to_owned()), "malformed", "{junk:.20}");
    }
}

#[test]
fn claims_no_rule_matches_get_nothing_and_bad_values_are_not_cleaned_up() {
    let i = ec_issuer();
    let verified = |c: &Value| verify(&sign(&i, c), &issuer(), &i.jwks, NOW).unwrap();
    let with_ref = |r: &str| {
        with(|c| {
            c.insert("ref".into(), json!(r));
        })
    };
    // A feature branch of the same repository: development pipelines get no identity.
    let dev = verified(&with_ref("refs/heads/feature-x"));
    let e = grant(&dev, &issuer(), &td(), NOW).unwrap_err();
    assert_eq!(e.reason(), "no_rule");
    // A value that is not SPIFFE ID path segments is refused, not rewritten.
    for bad in [
        "refs/heads/release-1/../x",
        "refs/heads/release-a b",
        "refs/heads/release-a//b",
    ] {
        let e = grant(&verified(&with_ref(bad)), &issuer(), &td(), NOW).unwrap_err();
        assert_eq!(e.reason(), "template", "{bad}: {e}");
    }
    // A rule whose ID is in another trust domain grants nothing.
    let mut foreign = issuer();
    foreign.rules[0].spiffe_id = "spiffe://other.org/ci".into();
    let e = grant(&verified(&claims()), &foreign, &td(), NOW).unwrap_err();
    assert_eq!(e.reason(), "template");
}

#[test]
fn templates_fill_placeholders_from_claims() {
    let claims = json!({"repository": "acme/payments", "job": "deploy", "n": 3});
    let get = |name: &str| claims.get(name).and_then(Value::as_str);
    assert_eq!(
        fill("spiffe://e.org/ci/{repository}/{job}", get).unwrap(),
        "spiffe://e.org/ci/acme/payments/deploy"
    );
    assert!(fill("spiffe://e.org/{missing}", get)
        .unwrap_err()
        .contains("no string claim"));
    assert!(fill("spiffe://e.org/{n}", get)
        .unwrap_err()
        .contains("no string claim"));
    assert!(fill("spiffe://e.org/{job", get)
        .unwrap_err()
        .contains("unclosed"));
    assert!(fill("spiffe://e.org/job}", get)
        .unwrap_err()
        .contains("unopened"));
    // Found by fuzzing: a closing brace before the first placeholder.
    assert!(fill("spiffe://e.org/}/{job}", get)
        .unwrap_err()
        .contains("unopened"));
}
