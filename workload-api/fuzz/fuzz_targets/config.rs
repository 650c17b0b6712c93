//! Agent configuration parsing never panics and its errors never quote the file's lines.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshid_agent::config::{Config, ConfigError, RawConfig};
use meshid_api::config::{without_quoted_values, TomlError};

/// The part of the error that can come from the file's text: the path, line, column and key
/// around it are ours (so a line that copies them is not quoted).
fn from_text(text: &str) -> Option<String> {
    let parsed = RawConfig::from_toml(Path::new("fuzz.toml"), text).and_then(Config::try_from);
    Some(match parsed.err()? {
        ConfigError::File(TomlError::Parse { message, .. }) => message,
        ConfigError::Invalid { reason, .. } => without_quoted_values(&reason),
        e => e.to_string(),
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(line) = meshid_api::config::quoted_line(text, from_text) {
        panic!(
            "the error quotes the file's line {line:?}: {:?}",
            from_text(text)
        );
    }
});
