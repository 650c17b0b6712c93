use super::*;

fn key(aud: &[&str]) -> JwtKey {
    JwtKey {
        entry_id: "e1".into(),
        revision: 1,
        audience: aud.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[test]
fn cached_jwt_is_reused_until_half_life() {
    let cache = JwtCache::default();
    cache.put(key(&["a"]), Zeroizing::new("tok".into()), 1000, 1100);
    assert_eq!(
        cache.get(&key(&["a"]), 1000).as_deref().map(String::as_str),
        Some("tok")
    );
    assert!(cache.get(&key(&["a"]), 1049).is_some());
    assert!(cache.get(&key(&["a"]), 1050).is_none(), "half-life reached");
    assert!(cache.get(&key(&["b"]), 1000).is_none(), "other audience");
    let mut newer = key(&["a"]);
    newer.revision = 2;
    assert!(cache.get(&newer, 1000).is_none(), "entry changed");
}

#[test]
fn jwt_cache_is_bounded() {
    let cache = JwtCache::default();
    for i in 0..JWT_CACHE_CAPACITY + 10 {
        cache.put(
            key(&[&i.to_string()]),
            Zeroizing::new(String::new()),
            0,
            100,
        );
    }
    assert!(cache.lock().entries.len() <= JWT_CACHE_CAPACITY);
}

#[test]
fn jwt_cache_is_bounded_by_bytes() {
    let cache = JwtCache::default();
    let token = "t".repeat(64 * 1024);
    for i in 0..200 {
        cache.put(
            key(&[&i.to_string()]),
            Zeroizing::new(token.clone()),
            0,
            100,
        );
        let map = cache.lock();
        assert!(map.bytes <= JWT_CACHE_MAX_BYTES, "{} bytes", map.bytes);
        let actual: usize = map.entries.iter().map(|(k, c)| cost(k, c)).sum();
        assert_eq!(map.bytes, actual);
    }
    // Replacing an entry does not count it twice.
    cache.put(key(&["199"]), Zeroizing::new("short".into()), 0, 100);
    let map = cache.lock();
    let actual: usize = map.entries.iter().map(|(k, c)| cost(k, c)).sum();
    assert_eq!(map.bytes, actual);
}

#[test]
fn jwks_keeps_only_jwt_svid_keys_with_kid() {
    let doc = r#"{"keys":[
        {"kty":"EC","use":"jwt-svid","kid":"k1","crv":"P-256","x":"a","y":"b"},
        {"kty":"EC","use":"x509-svid","x5c":["AA=="]},
        {"kty":"EC","use":"jwt-svid","crv":"P-256"},
        {"kty":"EC","kid":"k4"}
    ],"spiffe_sequence":3}"#;
    let out: serde_json::Value = serde_json::from_slice(&jwt_svid_jwks(doc)).unwrap();
    let keys = out["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], "k1");
    for bad in ["", "not json", r#"{"nokeys":1}"#] {
        assert_eq!(jwt_svid_jwks(bad), br#"{"keys":[]}"#.to_vec());
    }
}

#[test]
fn claims_become_a_struct_with_numbers() {
    use base64::Engine as _;
    use prost_types::value::Kind;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!(
        "{}.{}.sig",
        b64(r#"{"alg":"ES256"}"#),
        b64(
            r#"{"sub":"spiffe://example.org/a","aud":["x","y"],"exp":1700000000,"n":null,"o":{"b":true}}"#
        )
    );
    let claims = claims_struct(&token).unwrap();
    assert_eq!(
        claims.fields["exp"].kind,
        Some(Kind::NumberValue(1_700_000_000.0))
    );
    assert_eq!(
        claims.fields["sub"].kind,
        Some(Kind::StringValue("spiffe://example.org/a".into()))
    );
    assert!(matches!(&claims.fields["aud"].kind, Some(Kind::ListValue(l)) if l.values.len() == 2));
    assert!(matches!(claims.fields["n"].kind, Some(Kind::NullValue(_))));
    assert!(
        matches!(&claims.fields["o"].kind, Some(Kind::StructValue(s)) if s.fields["b"].kind == Some(Kind::BoolValue(true)))
    );
    assert!(claims_struct("x").is_err());
}
