//! Agent configuration parsing never panics and its errors never quote the file's lines.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshid_agent::config::{Config, ConfigError, RawConfig};
use meshid_api::config::TomlError;

/// The part of the error that can come from the file's text: the path, line, column and key
/// around it are ours (so a line that copies them is not quoted).
fn from_text(text: &str) -> Option<String> {
    let parsed = RawConfig::from_toml(Path::new("fuzz.toml"), text).and_then(Config::try_from);
    Some(match parsed.err()? {
        ConfigError::File(TomlError::Parse { message, .. }) => message,
        ConfigError::Invalid { reason, .. } => unquoted(&reason),
        e => e.to_string(),
    })
}

/// An `Invalid` reason quotes the key's refused value on purpose, as one Debug-escaped string,
/// so the operator sees what was wrong (a multi-line string's lines are in it by design); the
/// rest of the reason is ours and must never quote the file.
fn unquoted(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut quoted = false;
    let mut chars = reason.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                out.push(c);
            }
            '\\' if quoted => {
                chars.next();
            }
            _ if quoted => {}
            _ => out.push(c),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(msg) = from_text(text) else { return };
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() <= 24 || !msg.contains(line) {
            continue;
        }
        // Quoted only if it is there because of that line: a line that copies the message's own
        // words (the fuzzer learns them from this very comparison, e.g. in a multi-line string)
        // is just as much in the message of the file with that line blanked.
        let mut blanked = lines.clone();
        blanked[i] = "";
        let without = from_text(&blanked.join("\n"));
        assert!(without.is_some_and(|m| m.contains(line)), "{msg}");
    }
});
