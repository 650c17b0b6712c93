//! Extracting the SPIFFE ID of a peer certificate never panics, and what it returns is spelled
//! canonically (it parses back to itself through `meshid_api::id::parse`) with a path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = meshid_api::tls::verify::spiffe_id_of(data) {
        let text = id.to_string();
        assert_eq!(meshid_api::id::parse(&text).ok(), Some(id), "{text}");
        assert!(text.starts_with("spiffe://"), "{text}");
    }
});
