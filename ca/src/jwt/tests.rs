use super::*;

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

/// Re-signs `header` and `claims` with `key` (to build tokens that break one rule only).
fn forge(key: &JwtKey, header: &Value, claims: &Value) -> String {
    let mut t = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap());
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap()));
    let sig = key.pair.sign(&SystemRandom::new(), t.as_bytes()).unwrap();
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
    t
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

    let got = verify_jwt_svid(&token, &[key.public_jwk()], "svc-a", now()).unwrap();
    assert_eq!(got.spiffe_id, sub());
    assert_eq!(got.audience, aud(&["svc-a"]));
    assert_eq!(got.expiry, 1_750_000_300);
    assert_eq!(got.issued_at, Some(1_750_000_000));
    assert_eq!(got.claims["sub"], json!(sub().to_string()));

    // Several audiences: an array, any of them verifies.
    let token = mint_jwt_svid(&key, &sub(), &aud(&["a", "b"]), MIN5, now()).unwrap();
    assert_eq!(parts(&token).1["aud"], json!(["a", "b"]));
    verify_jwt_svid(&token, &[key.public_jwk()], "b", now()).unwrap();
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
        &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
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

#[test]
fn validation_refusals() {
    let key = JwtKey::generate().unwrap();
    let keys = [key.public_jwk()];
    let token = mint_jwt_svid(&key, &sub(), &aud(&["svc-a"]), MIN5, now()).unwrap();
    let (header, claims, _) = parts(&token);
    let header = Value::Object(header);
    let claims = Value::Object(claims);

    // Wrong audience.
    let err = verify_jwt_svid(&token, &keys, "svc-b", now()).unwrap_err();
    assert!(matches!(err, JwtError::AudienceMismatch), "{err}");
    assert!(matches!(
        verify_jwt_svid(&token, &keys, "", now()).unwrap_err(),
        JwtError::EmptyAudience
    ));

    // Expired (past the leeway), and still accepted inside it.
    let later = now() + MIN5 + LEEWAY;
    let err = verify_jwt_svid(&token, &keys, "svc-a", later).unwrap_err();
    assert!(matches!(err, JwtError::Expired { .. }), "{err}");
    verify_jwt_svid(&token, &keys, "svc-a", later - Duration::from_secs(1)).unwrap();

    // Tampered payload: another sub under the old signature.
    let mut p: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut evil = claims.clone();
    evil["sub"] = json!("spiffe://example.org/admin");
    p[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
    let err = verify_jwt_svid(&p.join("."), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err}");

    // alg none, with an empty signature.
    let none = json!({"alg": "none", "kid": key.kid(), "typ": "JWT"});
    let t = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&none).unwrap()),
        p[1]
    );
    let err = verify_jwt_svid(&t, &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::UnsupportedAlgorithm), "{err}");
    for alg in [json!("HS256"), json!("RS256"), json!(null), json!(256)] {
        let mut h = header.clone();
        h["alg"] = alg;
        let err = verify_jwt_svid(&forge(&key, &h, &claims), &keys, "svc-a", now()).unwrap_err();
        assert!(matches!(err, JwtError::UnsupportedAlgorithm), "{err}");
    }

    // Unknown kid.
    let other = JwtKey::generate().unwrap();
    let err = verify_jwt_svid(&token, &[other.public_jwk()], "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::UnknownKeyId(_)), "{err}");
    // Right kid on a key of another use.
    let mut wrong_use = key.public_jwk();
    wrong_use["use"] = json!("x509-svid");
    let err = verify_jwt_svid(&token, &[wrong_use], "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::UnknownKeyId(_)), "{err}");
    // Signed by another key under our kid.
    let err = verify_jwt_svid(&forge(&other, &header, &claims), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err}");

    // Extra header field, and missing kid, and a bad typ.
    let mut h = header.clone();
    h["jku"] = json!("https://evil.example/keys");
    let err = verify_jwt_svid(&forge(&key, &h, &claims), &keys, "svc-a", now()).unwrap_err();
    assert!(
        matches!(err, JwtError::UnexpectedHeader(ref n) if n == "jku"),
        "{err}"
    );
    let mut h = header.clone();
    h.as_object_mut().unwrap().remove("kid");
    let err = verify_jwt_svid(&forge(&key, &h, &claims), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::MissingKeyId), "{err}");
    let mut h = header.clone();
    h["typ"] = json!("at+jwt");
    let err = verify_jwt_svid(&forge(&key, &h, &claims), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::BadType), "{err}");
    // typ JOSE and no typ are fine.
    let mut h = header.clone();
    h["typ"] = json!("JOSE");
    verify_jwt_svid(&forge(&key, &h, &claims), &keys, "svc-a", now()).unwrap();
    let mut h = header.clone();
    h.as_object_mut().unwrap().remove("typ");
    verify_jwt_svid(&forge(&key, &h, &claims), &keys, "svc-a", now()).unwrap();

    // ES384 claimed over our P-256 key.
    let mut h = header.clone();
    h["alg"] = json!("ES384");
    let err = verify_jwt_svid(&forge(&key, &h, &claims), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::KeyAlgorithmMismatch(_)), "{err}");

    // Claims: bad sub, no exp, float exp accepted, future nbf, aud not strings.
    let mut c = claims.clone();
    c["sub"] = json!("https://example.org/x");
    let err = verify_jwt_svid(&forge(&key, &header, &c), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::InvalidSubject), "{err}");
    let mut c = claims.clone();
    c.as_object_mut().unwrap().remove("exp");
    let err = verify_jwt_svid(&forge(&key, &header, &c), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::MissingExpiry), "{err}");
    let mut c = claims.clone();
    c["exp"] = json!(1_750_000_300.5);
    verify_jwt_svid(&forge(&key, &header, &c), &keys, "svc-a", now()).unwrap();
    let mut c = claims.clone();
    c["nbf"] = json!(1_750_000_100);
    let err = verify_jwt_svid(&forge(&key, &header, &c), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::NotYetValid { .. }), "{err}");
    let mut c = claims.clone();
    c["aud"] = json!(["svc-a", 7]);
    let err = verify_jwt_svid(&forge(&key, &header, &c), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::AudienceMismatch), "{err}");
    let mut c = claims.clone();
    c.as_object_mut().unwrap().remove("aud");
    let err = verify_jwt_svid(&forge(&key, &header, &c), &keys, "svc-a", now()).unwrap_err();
    assert!(matches!(err, JwtError::AudienceMismatch), "{err}");
}

#[test]
fn malformed_tokens() {
    let key = JwtKey::generate().unwrap();
    let keys = [key.public_jwk()];
    let token = mint_jwt_svid(&key, &sub(), &aud(&["a"]), MIN5, now()).unwrap();
    let long = "a".repeat(MAX_TOKEN_LEN + 1);
    for bad in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        &format!("{token}.x"),
        "!!!.e30.AA",
        "e30.e30.AA", // {} header: no alg
        "W10.e30.AA", // [] header
        long.as_str(),
    ] {
        let err = verify_jwt_svid(bad, &keys, "a", now()).unwrap_err();
        assert!(
            matches!(err, JwtError::Malformed(_) | JwtError::UnsupportedAlgorithm),
            "{bad:.40}: {err}"
        );
        // No part of the token is echoed.
        assert!(bad.len() < 8 || !err.to_string().contains(bad), "{err}");
    }
    // A padded or non-url-safe signature is refused.
    let err = verify_jwt_svid(&format!("{token}="), &keys, "a", now()).unwrap_err();
    assert!(matches!(err, JwtError::Malformed(_)), "{err}");
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
