//! Extracting the SPIFFE ID of a peer certificate never panics, and what it returns is a
//! canonical `spiffe://` URI.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = meshid_api::tls::spiffe_id_of(data) {
        assert!(id.starts_with("spiffe://"), "{id}");
    }
});
