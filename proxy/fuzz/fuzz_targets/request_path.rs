//! Request path normalization never panics, is idempotent, and what it returns is a path the
//! policy matcher can decide without ambiguity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_proxy::http::normalize_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if let Some(once) = normalize_path(path) {
        let twice = normalize_path(&once).expect("a normalized path normalizes");
        assert_eq!(once, twice);
        if once != "*" {
            assert!(once.starts_with('/'));
            assert!(!once.contains("//"));
            assert!(!once.split('/').any(|s| s == "." || s == ".."));
        }
    }
});
