//! Bundle parsing never panics, and a parsed bundle round-trips through its own JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_ca::bundle::TrustBundle;
use spiffe::TrustDomain;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let td = TrustDomain::new("example.org").unwrap();
    if let Ok(bundle) = TrustBundle::from_spiffe_json(&td, text) {
        let again = TrustBundle::from_spiffe_json(&td, &bundle.to_spiffe_json().to_string())
            .expect("our own output parses");
        assert_eq!(again.x509_authorities, bundle.x509_authorities);
        assert_eq!(again.sequence, bundle.sequence);
    }
});
