//! JWT-SVID validation never panics on arbitrary tokens and never accepts a token that was not
//! signed by the key in the bundle.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use meshid_ca::jwt::{self, JwtKey};

fn jwks() -> &'static Vec<serde_json::Value> {
    static KEYS: OnceLock<Vec<serde_json::Value>> = OnceLock::new();
    KEYS.get_or_init(|| vec![JwtKey::generate().unwrap().public_jwk()])
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    assert!(jwt::verify_jwt_svid(token, jwks(), "aud", SystemTime::now()).is_err());
});
