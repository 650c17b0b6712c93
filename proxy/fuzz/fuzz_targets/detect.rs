//! Protocol detection never panics, and a verdict never changes once more bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_proxy::io::classify;

fuzz_target!(|data: &[u8]| {
    let mut decided = None;
    for n in 0..=data.len() {
        match (decided, classify(&data[..n])) {
            (None, v) => decided = v,
            (Some(d), v) => assert_eq!(Some(d), v, "verdict changed at {n} bytes"),
        }
    }
});
