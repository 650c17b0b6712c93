//! Agent configuration parsing never panics and its errors never quote the file's lines.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshid_agent::config::{Config, RawConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = RawConfig::from_toml(Path::new("fuzz.toml"), text).and_then(Config::try_from) {
        let msg = e.to_string();
        for line in text.lines().filter(|l| l.len() > 24) {
            assert!(!msg.contains(line), "{msg}");
        }
    }
});
