//! CSR parsing never panics; a CSR that parses also signs into a certificate whose identity is
//! the one asked for, never the CSR's.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshid_ca::svid::{self, CaKey, Issuer, KeyType};
use spiffe::{SpiffeId, TrustDomain};

fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let td = TrustDomain::new("example.org").unwrap();
        let key = CaKey::generate(KeyType::EcP256).unwrap();
        let cert = svid::generate_root(&td, &key, Duration::from_secs(3600), SystemTime::now()).unwrap();
        Issuer::new(cert, key, Vec::new()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = svid::parse_csr(data) {
        let id = SpiffeId::new("spiffe://example.org/fuzz").unwrap();
        let out = svid::sign_x509_svid(issuer(), &csr, &id, &[], Duration::from_secs(60), SystemTime::now())
            .expect("a parsed CSR always signs");
        assert_eq!(out.chain.len(), 1);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = svid::parse_csr_pem(text);
    }
});
