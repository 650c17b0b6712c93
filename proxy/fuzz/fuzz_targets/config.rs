//! Proxy configuration parsing never panics and its errors never quote the file's lines.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshid_proxy::config::{Config, RawConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = meshid_api::config::parse_toml::<RawConfig>(Path::new("fuzz.toml"), text)
        .map_err(meshid_proxy::config::ConfigError::from)
        .and_then(Config::try_from);
    if let Err(e) = parsed {
        let msg = e.to_string();
        for line in text.lines().filter(|l| l.len() > 24) {
            assert!(!msg.contains(line), "{msg}");
        }
    }
});
