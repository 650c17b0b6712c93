//! A CI system's OIDC token (`meshid_ca::ci`), as it arrives from a pipeline, never panics the
//! verifier, and is refused unless signed by the issuer's key; a SPIFFE ID template filled from
//! arbitrary claims never panics and never lets a brace or an unsafe character through.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshid_ca::ci::{fill, verify, CiIssuer};

fn jwks() -> &'static str {
    static JWKS: OnceLock<String> = OnceLock::new();
    JWKS.get_or_init(|| {
        let key = meshid_ca::jwt::JwtKey::generate().unwrap();
        serde_json::json!({ "keys": [key.public_jwk()] }).to_string()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let issuer = CiIssuer {
        name: "fuzz".into(),
        issuer: "https://ci.example".into(),
        audience: "meshid".into(),
        max_age: Duration::from_secs(600),
        max_ttl: Duration::from_secs(900),
        rules: Vec::new(),
    };
    // Nobody but the key's holder can sign: anything the fuzzer makes is refused.
    assert!(verify(text, &issuer, jwks(), 1_800_000_000).is_err());
    let (template, value) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(filled) = fill(template, |_| Some(value)) {
        if template.contains('{') {
            assert!(value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)));
        }
        assert_eq!(filled.matches('{').count(), 0);
        assert_eq!(filled.matches('}').count(), 0);
    }
});
