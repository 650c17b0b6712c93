use super::*;
use serde_json::Map;

const MIN5: Duration = Duration::from_secs(300);

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn sub() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/ns/prod/sa/web").unwrap()
}

fn aud(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn parts(token: &str) -> (Map<String, Value>, Map<String, Value>, String) {
    let p: Vec<&str> = token.split('.').collect();
    assert_eq!(p.len(), 3);
    let h = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p[0]).unwrap()).unwrap();
    let c = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p[1]).unwrap()).unwrap();
    (h, c, p[2].to_string())
}

#[test]
fn round_trip() {
    let key = JwtKey::generate().unwrap();
    let token = mint_jwt_svid(&key, &sub(), &aud(&["svc-a"]), MIN5, now()).unwrap();
    let (header, claims, _) = parts(&token);

    // The header is exactly alg, kid, typ, in that order in the encoded JSON.
    let raw_header = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(raw_header).unwrap(),
        format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT"}}"#, key.kid())
    );
    assert_eq!(header.len(), 3);
    assert_eq!(claims["sub"], json!(sub().to_string()));
    assert_eq!(claims["aud"], json!("svc-a"));
    assert!(claims["exp"].is_i64() && claims["iat"].is_i64());
    assert_eq!(claims["exp"].as_i64().unwrap(), 1_750_000_300);
    assert_eq!(claims["iat"].as_i64().unwrap(), 1_750_000_000);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
    // Integers, never floats, in the encoded payload.
    let raw = URL_SAFE_NO_PAD
        .decode(token.split('.').nth(1).unwrap())
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.contains(r#""exp":1750000300"#), "{raw}");

    // The validator the agent's ValidateJWTSVID uses accepts it (minted now, so unexpired).
    let token = mint_jwt_svid(&key, &sub(), &aud(&["svc-a"]), MIN5, SystemTime::now()).unwrap();
    let got = validate(&token, &key, "svc-a").unwrap();
    assert_eq!(got.spiffe_id(), &sub());
    assert_eq!(got.audience(), aud(&["svc-a"]).as_slice());
    assert!(validate(&token, &key, "svc-b").is_err());

    // Several audiences: an array, any of them verifies.
    let token = mint_jwt_svid(&key, &sub(), &aud(&["a", "b"]), MIN5, SystemTime::now()).unwrap();
    assert_eq!(parts(&token).1["aud"], json!(["a", "b"]));
    validate(&token, &key, "b").unwrap();
}

/// The `spiffe` crate's JWT-SVID validation (the agent's) against `key`'s public JWK.
fn validate(
    token: &str,
    key: &JwtKey,
    audience: &str,
) -> Result<spiffe::JwtSvid, spiffe::svid::jwt::JwtSvidError> {
    let jwks = serde_json::to_vec(&json!({ "keys": [key.public_jwk()] })).unwrap();
    let td = sub().trust_domain().clone();
    let mut set = spiffe::JwtBundleSet::new();
    set.add_bundle(spiffe::JwtBundle::from_jwt_authorities(td, &jwks).unwrap());
    spiffe::JwtSvid::parse_and_validate(token, &set, &[audience])
}

#[test]
fn key_round_trip_keeps_kid() {
    let key = JwtKey::generate().unwrap();
    let pem = key.to_pkcs8_pem();
    let back = JwtKey::from_pkcs8_pem(&pem).unwrap();
    assert_eq!(back.kid(), key.kid());
    assert_eq!(back.public_jwk(), key.public_jwk());
    assert_eq!(back.public_key_der(), key.public_key_der());
    assert_eq!(key.kid().len(), 43);
    let jwk = key.public_jwk();
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(jwk["use"], "jwt-svid");
    assert_eq!(jwk["kid"], key.kid());
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(jwk["x"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );

    assert_eq!(jwk_from_spki(key.public_key_der(), key.kid()).unwrap(), jwk);
    assert!(jwk_from_spki(b"junk", "k").is_err());
    assert!(jwk_from_spki(key.public_key_der(), "").is_err());

    let debug = format!("{key:?}");
    assert!(
        debug.contains("redacted") && debug.contains(key.kid()),
        "{debug}"
    );
    let body = pem.lines().nth(1).unwrap();
    assert!(!debug.contains(&body[..20]));

    assert!(matches!(
        JwtKey::from_pkcs8_pem("nope").unwrap_err(),
        JwtError::InvalidKey(_)
    ));
    // A P-384 key is not an ES256 key.
    let p384 = EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        &SystemRandom::new(),
    )
    .unwrap();
    assert!(matches!(
        JwtKey::from_pkcs8_der(p384.as_ref()).unwrap_err(),
        JwtError::InvalidKey(_)
    ));
}

/// The kid is the RFC 7638 thumbprint: SHA-256 of the JWK's required members in
/// lexicographic order without whitespace (built here by serde_json, which sorts keys).
#[test]
fn kid_is_rfc7638_thumbprint() {
    let key = JwtKey::generate().unwrap();
    let jwk = key.public_jwk();
    let required = json!({"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "y": jwk["y"]});
    let canonical = serde_json::to_string(&required).unwrap();
    assert!(canonical.starts_with(r#"{"crv":"P-256","kty":"EC","x":""#));
    assert_eq!(
        key.kid(),
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    );
}

#[test]
fn mint_refusals() {
    let key = JwtKey::generate().unwrap();
    for a in [aud(&[]), aud(&[""]), aud(&["ok", ""])] {
        let err = mint_jwt_svid(&key, &sub(), &a, MIN5, now()).unwrap_err();
        assert!(matches!(err, JwtError::EmptyAudience), "{err}");
    }
    for ttl in [Duration::ZERO, Duration::from_millis(999)] {
        let err = mint_jwt_svid(&key, &sub(), &aud(&["a"]), ttl, now()).unwrap_err();
        assert!(matches!(err, JwtError::InvalidTtl(_)), "{err}");
    }
}

/// An independent verifier: the `jsonwebtoken` crate accepts our tokens with the bundle's x/y.
#[test]
fn jsonwebtoken_accepts_minted_tokens() {
    let key = JwtKey::generate().unwrap();
    let token = mint_jwt_svid(&key, &sub(), &aud(&["svc-a"]), MIN5, SystemTime::now()).unwrap();
    let jwk = key.public_jwk();
    let decoding = jsonwebtoken::DecodingKey::from_ec_components(
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["svc-a"]);
    validation.set_required_spec_claims(&["exp", "sub", "aud"]);
    let data = jsonwebtoken::decode::<Value>(&token, &decoding, &validation).unwrap();
    assert_eq!(data.header.kid.as_deref(), Some(key.kid()));
    assert_eq!(data.header.typ.as_deref(), Some("JWT"));
    assert_eq!(data.claims["sub"], json!(sub().to_string()));

    // And it refuses a wrong audience, so the check above means something.
    let mut wrong = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    wrong.set_audience(&["svc-b"]);
    assert!(jsonwebtoken::decode::<Value>(&token, &decoding, &wrong).is_err());

    // Its JWK parser reads our bundle JWK too.
    let parsed: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).unwrap();
    let from_jwk = jsonwebtoken::DecodingKey::from_jwk(&parsed).unwrap();
    jsonwebtoken::decode::<Value>(&token, &from_jwk, &validation).unwrap();
}

#[test]
fn an_issuer_is_the_iss_claim_and_none_means_no_iss() {
    let key = JwtKey::generate().unwrap();
    let issued = mint_jwt_svid_from(
        &key,
        Some("https://oidc.example.org"),
        &sub(),
        &aud(&["sts"]),
        MIN5,
        now(),
    )
    .unwrap();
    let (_, claims, _) = parts(&issued);
    assert_eq!(claims["iss"], json!("https://oidc.example.org"));
    let (_, claims, _) = parts(&mint_jwt_svid(&key, &sub(), &aud(&["sts"]), MIN5, now()).unwrap());
    assert!(claims.get("iss").is_none(), "{claims:?}");
}

/// RS256: an RSA key signs tokens that `jsonwebtoken` (an independent verifier) accepts with
/// the bundle's `n`/`e`, whose kid is the RFC 7638 thumbprint, stable across a reload, and
/// whose SPKI gives back the same JWK.
#[test]
fn rs256_keys_sign_tokens_independent_verifiers_accept() {
    let key = JwtKey::generate_for(JwtKeyType::Rs256).unwrap();
    assert_eq!(key.alg(), "RS256");
    let token = mint_jwt_svid(&key, &sub(), &aud(&["svc-a"]), MIN5, SystemTime::now()).unwrap();
    let (header, _, _) = parts(&token);
    assert_eq!(header["alg"], json!("RS256"));
    assert_eq!(header["kid"], json!(key.kid()));
    let jwk = key.public_jwk();
    assert_eq!(
        (&jwk["kty"], &jwk["use"]),
        (&json!("RSA"), &json!("jwt-svid"))
    );
    let parsed: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let decoding = jsonwebtoken::DecodingKey::from_jwk(&parsed).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["svc-a"]);
    jsonwebtoken::decode::<Value>(&token, &decoding, &validation).unwrap();
    // The same kid and JWK when loaded again, and from its public key alone.
    let again = JwtKey::from_pkcs8_der(&key.to_pkcs8_der()).unwrap();
    assert_eq!((again.kid(), again.alg()), (key.kid(), "RS256"));
    assert_eq!(jwk_from_spki(key.public_key_der(), key.kid()).unwrap(), jwk);
    // An ES256 key still loads as one.
    let ec = JwtKey::generate_for(JwtKeyType::Es256).unwrap();
    assert_eq!(
        JwtKey::from_pkcs8_der(&ec.to_pkcs8_der()).unwrap().alg(),
        "ES256"
    );
}

#[test]
fn a_short_rsa_key_is_refused() {
    use rsa::pkcs8::EncodePrivateKey as _;
    let small = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    let der = small.to_pkcs8_der().unwrap();
    let e = JwtKey::from_pkcs8_der(der.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("2048"), "{e}");
}
