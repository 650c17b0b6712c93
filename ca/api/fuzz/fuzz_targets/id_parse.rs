//! `meshid_api::id::parse` never panics, and what it accepts is exactly the canonical spelling
//! of the ID it returns (one identity, one spelling).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(id) = meshid_api::id::parse(text) {
        assert_eq!(id.to_string(), text);
    }
});
