//! Federation input never panics, and what is accepted keeps its promises:
//! - a relationship as written (trust domain, endpoint URL, profile, endpoint SPIFFE ID, one per
//!   line) is accepted only for another trust domain and an https URL with a host and no user
//!   information, and an https_spiffe endpoint ID in that trust domain;
//! - a bundle fetched from an endpoint (the rest of the input) is accepted only with at least
//!   one X.509 authority, and round-trips through its own JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_ca::federation::{parse_bundle, validate, Profile};
use spiffe::TrustDomain;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let own = TrustDomain::new("example.org").unwrap();
    let mut parts = text.splitn(5, '\n');
    let mut next = || parts.next().unwrap_or("");
    let (td, url, profile, id, document) = (next(), next(), next(), next(), next());
    if let Ok(r) = validate(&own, td, url, profile, id) {
        assert_ne!(r.trust_domain, own);
        assert_eq!(r.endpoint_url.scheme_str(), Some("https"));
        assert!(r.endpoint_url.host().is_some_and(|h| !h.is_empty()));
        assert!(!r.endpoint_url.authority().unwrap().as_str().contains('@'));
        if let Profile::HttpsSpiffe(id) = &r.profile {
            assert_eq!(id.trust_domain(), &r.trust_domain);
        }
    }
    let partner = TrustDomain::new("partner.org").unwrap();
    if let Ok(bundle) = parse_bundle(&partner, document) {
        assert!(!bundle.x509_authorities.is_empty());
        let again = parse_bundle(&partner, &bundle.to_spiffe_json()).expect("our own output parses");
        assert_eq!(again.x509_authorities, bundle.x509_authorities);
    }
});
