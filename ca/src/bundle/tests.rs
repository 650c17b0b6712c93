use super::*;

use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject as _;

use crate::jwt::JwtKey;
use crate::svid::{generate_root, CaKey, KeyType};

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn root(kt: KeyType) -> CertificateDer<'static> {
    let key = CaKey::generate(kt).unwrap();
    generate_root(&td(), &key, Duration::from_secs(86400), now()).unwrap()
}

fn sample() -> (TrustBundle, JwtKey) {
    let jwt = JwtKey::generate().unwrap();
    let bundle = TrustBundle {
        trust_domain: td(),
        x509_authorities: vec![root(KeyType::EcP256), root(KeyType::EcP384)],
        jwt_authorities: vec![jwt.public_jwk()],
        sequence: 42,
        refresh_hint: Duration::from_secs(300),
    };
    (bundle, jwt)
}

fn parse(json: &Value) -> Result<TrustBundle, BundleError> {
    TrustBundle::from_spiffe_json(&td(), &json.to_string())
}

fn doc(bundle: &TrustBundle) -> Value {
    serde_json::from_str(&bundle.to_spiffe_json()).unwrap()
}

#[test]
fn spiffe_json_round_trip() {
    let (bundle, jwt) = sample();
    let json = bundle.to_spiffe_json();
    assert_eq!(json, bundle.try_to_spiffe_json().unwrap());
    let back = TrustBundle::from_spiffe_json(&td(), &json).unwrap();
    assert_eq!(back, bundle);

    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["spiffe_sequence"], json!(42));
    assert_eq!(v["spiffe_refresh_hint"], json!(300));
    let keys = v["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    for (k, crv) in keys[..2].iter().zip(["P-256", "P-384"]) {
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], crv);
        assert!(k.get("kid").is_none());
        assert_eq!(k["x5c"].as_array().unwrap().len(), 1);
        assert!(k["x"].is_string() && k["y"].is_string());
    }
    assert_eq!(
        STANDARD
            .decode(keys[0]["x5c"][0].as_str().unwrap())
            .unwrap(),
        bundle.x509_authorities[0].to_vec()
    );
    assert_eq!(keys[2]["use"], "jwt-svid");
    assert_eq!(keys[2]["kid"], jwt.kid());

    // Unset refresh hint is omitted and reads back as zero; an empty bundle is valid.
    let empty = TrustBundle {
        trust_domain: td(),
        x509_authorities: Vec::new(),
        jwt_authorities: Vec::new(),
        sequence: 0,
        refresh_hint: Duration::ZERO,
    };
    assert_eq!(empty.to_spiffe_json(), r#"{"keys":[],"spiffe_sequence":0}"#);
    assert_eq!(
        TrustBundle::from_spiffe_json(&td(), &empty.to_spiffe_json()).unwrap(),
        empty
    );
    assert_eq!(parse(&json!({"keys": []})).unwrap(), empty);
}

#[test]
fn jwt_authority_without_use_gets_it() {
    let jwt = JwtKey::generate().unwrap();
    let mut jwk = jwt.public_jwk();
    jwk.as_object_mut().unwrap().remove("use");
    let bundle = TrustBundle {
        trust_domain: td(),
        x509_authorities: Vec::new(),
        jwt_authorities: vec![jwk],
        sequence: 1,
        refresh_hint: Duration::ZERO,
    };
    assert_eq!(doc(&bundle)["keys"][0]["use"], "jwt-svid");
}

#[test]
fn ed25519_authority() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert: CertificateDer<'static> = params.self_signed(&key).unwrap().into();
    let jwk = x509_authority_jwk(&cert).unwrap();
    assert_eq!(jwk["kty"], "OKP");
    assert_eq!(jwk["crv"], "Ed25519");
    let bundle = TrustBundle {
        trust_domain: td(),
        x509_authorities: vec![cert],
        jwt_authorities: Vec::new(),
        sequence: 1,
        refresh_hint: Duration::ZERO,
    };
    assert_eq!(
        TrustBundle::from_spiffe_json(&td(), &bundle.to_spiffe_json()).unwrap(),
        bundle
    );
}

#[test]
fn pem_and_der() {
    let (bundle, _) = sample();
    let pem = bundle.to_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(certs, bundle.x509_authorities);

    let der = bundle.to_der_concat();
    let a = &bundle.x509_authorities;
    assert_eq!(der.len(), a[0].len() + a[1].len());
    assert_eq!(&der[..a[0].len()], a[0].as_ref());
}

#[test]
fn unpublishable_authorities() {
    let (mut bundle, _) = sample();
    bundle
        .x509_authorities
        .push(CertificateDer::from(vec![1, 2, 3]));
    bundle.jwt_authorities.push(json!({"kty": "EC"}));
    let err = bundle.try_to_spiffe_json().unwrap_err();
    assert!(
        matches!(err, BundleError::InvalidAuthority { index: 2, .. }),
        "{err}"
    );
    // The lenient encoder leaves them out.
    let v = doc(&bundle);
    assert_eq!(v["keys"].as_array().unwrap().len(), 3);

    bundle.x509_authorities.pop();
    let err = bundle.try_to_spiffe_json().unwrap_err();
    assert!(
        matches!(err, BundleError::InvalidJwtAuthority { index: 1, .. }),
        "{err}"
    );
}

#[test]
fn malformed_documents() {
    let cases: Vec<(&str, &str)> = vec![
        ("not json", "keys: []"),
        ("truncated", r#"{"keys": ["#),
        ("an array", "[]"),
        ("a string", r#""keys""#),
        ("no keys", r#"{"spiffe_sequence": 1}"#),
        ("keys not an array", r#"{"keys": {}}"#),
        ("keys null", r#"{"keys": null}"#),
        (
            "sequence a string",
            r#"{"keys": [], "spiffe_sequence": "1"}"#,
        ),
        (
            "sequence negative",
            r#"{"keys": [], "spiffe_sequence": -1}"#,
        ),
        (
            "sequence a float",
            r#"{"keys": [], "spiffe_sequence": 1.5}"#,
        ),
        (
            "refresh hint a float",
            r#"{"keys": [], "spiffe_refresh_hint": 1.5}"#,
        ),
        (
            "refresh hint a string",
            r#"{"keys": [], "spiffe_refresh_hint": "5m"}"#,
        ),
    ];
    for (name, json) in cases {
        let err = TrustBundle::from_spiffe_json(&td(), json).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                BundleError::Json(_)
                    | BundleError::NotAnObject
                    | BundleError::MissingKeys
                    | BundleError::InvalidField { .. }
            ),
            "{name}: {msg}"
        );
        assert!(msg.starts_with("bundle"), "{name}: {msg}");
    }
}

#[test]
fn malformed_keys() {
    let (bundle, jwt) = sample();
    let good = doc(&bundle)["keys"][0].clone();
    let other_root = doc(&TrustBundle {
        x509_authorities: vec![root(KeyType::EcP256)],
        ..bundle.clone()
    })["keys"][0]
        .clone();
    let with = |f: &dyn Fn(&mut Map<String, Value>)| {
        let mut k = good.clone();
        f(k.as_object_mut().unwrap());
        k
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("not an object", json!("x509-svid"), "not a JSON object"),
        (
            "no kty",
            with(&|k| {
                k.remove("kty");
            }),
            "kty is required",
        ),
        (
            "kty not a string",
            with(&|k| {
                k.insert("kty".into(), json!(1));
            }),
            "kty is required",
        ),
        (
            "x509 with kid",
            with(&|k| {
                k.insert("kid".into(), json!("k1"));
            }),
            "must not have a kid",
        ),
        (
            "x509 with empty kid",
            with(&|k| {
                k.insert("kid".into(), json!(""));
            }),
            "must not have a kid",
        ),
        (
            "no x5c",
            with(&|k| {
                k.remove("x5c");
            }),
            "must have an x5c array",
        ),
        (
            "x5c a string",
            with(&|k| {
                k.insert("x5c".into(), good["x5c"][0].clone());
            }),
            "must have an x5c array",
        ),
        (
            "x5c empty",
            with(&|k| {
                k.insert("x5c".into(), json!([]));
            }),
            "exactly one certificate",
        ),
        (
            "x5c two certs",
            with(&|k| {
                k.insert("x5c".into(), json!([good["x5c"][0], good["x5c"][0]]));
            }),
            "exactly one certificate",
        ),
        (
            "x5c not a string",
            with(&|k| {
                k.insert("x5c".into(), json!([1]));
            }),
            "not a string",
        ),
        (
            "x5c bad base64",
            with(&|k| {
                k.insert("x5c".into(), json!(["%%%"]));
            }),
            "not standard base64",
        ),
        (
            "x5c url-safe base64",
            with(&|k| {
                let url = good["x5c"][0]
                    .as_str()
                    .unwrap()
                    .replace('+', "-")
                    .replace('/', "_");
                let url = if url == good["x5c"][0].as_str().unwrap() {
                    format!("{url}_")
                } else {
                    url
                };
                k.insert("x5c".into(), json!([url]));
            }),
            "not standard base64",
        ),
        (
            "x5c not a certificate",
            with(&|k| {
                k.insert("x5c".into(), json!(["AAAA"]));
            }),
            "not a DER X.509 certificate",
        ),
        (
            "x5c with trailing data",
            with(&|k| {
                let mut der = STANDARD.decode(good["x5c"][0].as_str().unwrap()).unwrap();
                der.push(0);
                k.insert("x5c".into(), json!([STANDARD.encode(der)]));
            }),
            "trailing data",
        ),
        (
            "key of another certificate",
            with(&|k| {
                k.insert("x".into(), other_root["x"].clone());
            }),
            "do not match",
        ),
        (
            "crv of another curve",
            with(&|k| {
                k.insert("crv".into(), json!("P-384"));
            }),
            "do not match",
        ),
        (
            "jwt without kid",
            {
                let mut j = jwt.public_jwk();
                j.as_object_mut().unwrap().remove("kid");
                j
            },
            "non-empty kid",
        ),
        (
            "jwt with empty kid",
            {
                let mut j = jwt.public_jwk();
                j["kid"] = json!("");
                j
            },
            "non-empty kid",
        ),
        (
            "jwt with numeric kid",
            {
                let mut j = jwt.public_jwk();
                j["kid"] = json!(7);
                j
            },
            "non-empty kid",
        ),
    ];
    for (name, key, want) in cases {
        // The bad key sits after a good one: the index in the message points at it.
        let err = parse(&json!({"keys": [good, key]})).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, BundleError::InvalidKey { index: 1, .. }),
            "{name}: {msg}"
        );
        assert!(msg.starts_with("bundle key 1: "), "{name}: {msg}");
        assert!(msg.contains(want), "{name}: {msg}");
    }

    let dup = parse(&json!({"keys": [jwt.public_jwk(), jwt.public_jwk()]})).unwrap_err();
    assert!(matches!(dup, BundleError::DuplicateKeyId(_)), "{dup}");
}

#[test]
fn ignored_keys() {
    let (bundle, _) = sample();
    let good = doc(&bundle)["keys"][0].clone();
    let with = |f: &dyn Fn(&mut Map<String, Value>)| {
        let mut k = good.clone();
        f(k.as_object_mut().unwrap());
        k
    };
    let ignored = vec![
        with(&|k| {
            k.remove("use");
        }),
        with(&|k| {
            k.insert("use".into(), json!("X509-SVID"));
        }),
        with(&|k| {
            k.insert("use".into(), json!("wit-svid"));
        }),
        with(&|k| {
            k.insert("use".into(), json!(1));
        }),
        // Unknown kty: ignored even though its x5c is garbage.
        json!({"kty": "ML-DSA", "use": "x509-svid", "x5c": ["%%%"], "kid": "x"}),
        json!({"kty": "oct", "use": "jwt-svid", "k": "c2VjcmV0"}),
    ];
    let n = ignored.len();
    let mut keys = ignored;
    keys.push(good.clone());
    let b = parse(&json!({"keys": keys, "spiffe_sequence": 7})).unwrap();
    assert_eq!(
        b.x509_authorities.len(),
        1,
        "only the last key of {}",
        n + 1
    );
    assert_eq!(b.x509_authorities[0], bundle.x509_authorities[0]);
    assert!(b.jwt_authorities.is_empty());
    assert_eq!(b.sequence, 7);
    // Unknown top-level members are fine too.
    parse(&json!({"keys": [], "spiffe_extra": true})).unwrap();
}

#[test]
fn unsigned_integers() {
    assert_eq!(unsigned(&[0, 0x80, 1]), &[0x80, 1]);
    assert_eq!(unsigned(&[1, 0, 1]), &[1, 0, 1]);
    assert_eq!(unsigned(&[0]), &[0]);
    assert_eq!(unsigned(&[]), &[] as &[u8]);
}
