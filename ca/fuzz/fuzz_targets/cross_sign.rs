//! Cross-signing an operator's root (`meshid-ca ca root prepare --upstream-cert`) never panics
//! on any certificate; what it issues always has the input's subject and key, and verifies
//! under the issuer.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use meshid_ca::svid::{self, CaKey, Issuer, KeyType};
use rustls_pki_types::CertificateDer;
use spiffe::TrustDomain;
use x509_parser::prelude::FromDer as _;

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
    let input = CertificateDer::from(data.to_vec());
    if let Ok(cross) = svid::cross_sign(issuer(), &input, SystemTime::now()) {
        let (_, original) = x509_parser::certificate::X509Certificate::from_der(data).unwrap();
        let (_, issued) = x509_parser::certificate::X509Certificate::from_der(&cross).unwrap();
        assert_eq!(issued.subject().as_raw(), original.subject().as_raw());
        assert_eq!(issued.public_key().raw, original.public_key().raw);
    }
});
