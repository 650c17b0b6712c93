//! Reading the TOML configuration files of meshid's binaries, with one error shape: the file,
//! the line and column, and the parser's message. The file's text is never quoted, because it
//! may hold a secret (a datastore password).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A file whose mode lets other users read a secret in it, or change what the process trusts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {} is {problem} (mode {mode:03o}); {fix}", path.display())]
pub struct FileModeError {
    /// The file.
    pub path: PathBuf,
    /// What it is to the process (`join token file`, `policy file`).
    pub what: &'static str,
    /// Its permission bits.
    pub mode: u32,
    problem: &'static str,
    fix: &'static str,
}

fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Refuses a file holding a secret (a join token, a password) that group or others may read or
/// write, as the CA refuses such a key file. A file that cannot be examined passes: reading it
/// reports that.
pub fn check_private(path: &Path, what: &'static str) -> Result<(), FileModeError> {
    match mode_of(path) {
        Some(mode) if mode & 0o077 != 0 => Err(FileModeError {
            path: path.to_owned(),
            what,
            mode,
            problem: "readable or writable by group or others",
            fix: "chmod 600 it",
        }),
        _ => Ok(()),
    }
}

/// Refuses a file the process trusts (a policy) that any user may write.
pub fn check_not_world_writable(path: &Path, what: &'static str) -> Result<(), FileModeError> {
    match mode_of(path) {
        Some(mode) if mode & 0o002 != 0 => Err(FileModeError {
            path: path.to_owned(),
            what,
            mode,
            problem: "writable by every user",
            fix: "chmod o-w it",
        }),
        _ => Ok(()),
    }
}

/// A configuration file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TomlError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Malformed TOML or an unknown key (the message names it).
    #[error("invalid config {path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
}

/// Parses TOML text into `T`; `path` is only used in messages.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, TomlError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let offset = e.span().map_or(0, |s| s.start).min(text.len());
        let before = text.get(..offset).unwrap_or("");
        TomlError::Parse {
            path: path.to_owned(),
            line: before.matches('\n').count() + 1,
            column: before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
            message: hide_string_values(e.message().trim_end()),
        }
    })
}

/// serde's type errors quote the value they refused (`invalid type: string "...", expected a
/// sequence`, the string Debug-escaped): keep the words, drop the value, since it is the file's
/// text (a multi-line string's lines, a password written where a table goes).
fn hide_string_values(message: &str) -> String {
    const QUOTE: &str = ": string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(QUOTE) {
        out.push_str(&rest[..at + QUOTE.len() - 2]);
        let value = &rest[at + QUOTE.len()..];
        let mut chars = value.char_indices();
        let mut end = value.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// For configuration tests and fuzz targets: `reason` with every Debug-quoted value emptied
/// (`"..."` kept as `""`). An invalid-value reason quotes the refused value on purpose, so the
/// operator sees what was wrong; the rest of the reason is ours.
pub fn without_quoted_values(reason: &str) -> String {
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

/// For configuration tests and fuzz targets: a line of `text` (longer than 24 bytes) that the
/// error for `text` quotes, where `error_of` renders the part of a file's error that may come
/// from the file (`None`: the file is valid). A line counts as quoted only if the error loses
/// it when that line is blanked: a line that merely copies the error's own words (a fuzzer
/// learns them) is in the error either way.
pub fn quoted_line(text: &str, error_of: impl Fn(&str) -> Option<String>) -> Option<&str> {
    let msg = error_of(text)?;
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() <= 24 || !msg.contains(line) {
            continue;
        }
        let mut blanked = lines.clone();
        blanked[i] = "";
        if !error_of(&blanked.join("\n")).is_some_and(|m| m.contains(line)) {
            return Some(line);
        }
    }
    None
}

/// Reads and parses a TOML file into `T`.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, TomlError> {
    let text = std::fs::read_to_string(path).map_err(|source| TomlError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: Option<String>,
        list: Option<Vec<String>>,
    }

    #[test]
    fn errors_name_line_and_column_and_never_quote_the_file() {
        let err = parse_toml::<T>(Path::new("x.toml"), "a = \"ok\"\nb = \"pw-secret\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid config x.toml:2:1:"), "{err}");
        assert!(err.contains("unknown field `b`"), "{err}");
        assert!(!err.contains("pw-secret"), "{err}");
        let err = parse_toml::<T>(Path::new("x.toml"), "a = \"unterminated")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml:1:"), "{err}");
        let err = read_toml::<T>(Path::new("/nonexistent/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read config /nonexistent/x.toml"),
            "{err}"
        );
    }

    #[test]
    fn quoted_lines_are_found_and_copied_words_are_not() {
        let secret = "password = hunter2-hunter2-hunter2-hunter2";
        let echo = |t: &str| t.contains("hunter2").then(|| format!("bad line: {t}"));
        assert_eq!(quoted_line(secret, echo), Some(secret));
        // The error's own words, copied into the file, are not a quote of the file.
        let words =
            |t: &str| (!t.is_empty()).then(|| "invalid config: this is our own text".to_owned());
        assert_eq!(
            quoted_line("x\ninvalid config: this is our own text", words),
            None
        );
        assert_eq!(quoted_line("valid", |_| None), None);
        assert_eq!(
            without_quoted_values(r#"trust_domain: "a\"b c": bad; see "x""#),
            r#"trust_domain: "": bad; see """#
        );
    }

    #[test]
    fn type_errors_never_quote_the_refused_string() {
        // Found by the agent's config fuzz target: serde's "invalid type: string \"...\"" quoted
        // the value, here a whole line of the file.
        let text = "list = \"\"\"\nald multline basic string\n\"\"\"";
        let err = parse_toml::<T>(Path::new("x.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("ald multline"), "{err}");
        assert!(
            err.contains("x.toml:1:8: invalid type: string, expected a sequence"),
            "{err}"
        );
        let err = parse_toml::<T>(Path::new("x.toml"), r#"list = "pw-\"secret\\" # a"#)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(
            err.ends_with("invalid type: string, expected a sequence"),
            "{err}"
        );
        assert_eq!(
            hide_string_values(r#"invalid value: string "a\"b", expected x; string "c""#),
            r#"invalid value: string, expected x; string "c""#
        );
    }
}

/// The exit code of a refused configuration or command line (`EX_USAGE`), the same for every
/// meshid binary, so a supervisor can tell "fix the config" from a crash.
pub const EXIT_CONFIG: u8 = 64;

/// Why a configuration was refused: the error of every binary's `Config::load`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read or parsed (names the file, line and column, never quotes it).
    #[error(transparent)]
    File(#[from] TomlError),
    /// A file holds a secret and others may read it, or the process trusts a file anyone may
    /// change.
    #[error(transparent)]
    Mode(#[from] FileModeError),
    /// A value is present but wrong, or a required one is missing.
    #[error("invalid config: {key}: {reason}")]
    Invalid {
        /// The key, dotted (`ca.intermediate_ttl`, `inbound[0].listen`).
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// The `log_format` key every binary has: `text` (the default) or `json`; true for JSON.
pub fn log_json(log_format: Option<&str>) -> Result<bool, ConfigError> {
    match log_format {
        None | Some("text") => Ok(false),
        Some("json") => Ok(true),
        Some(other) => Err(invalid(
            "log_format",
            format!("{other:?}: use text or json"),
        )),
    }
}

/// A [`ConfigError::Invalid`].
pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Reports `error` on stderr as `program: error` and returns [`EXIT_CONFIG`]: how every binary
/// ends on a configuration it refuses (before anything binds).
pub fn exit_refused(program: &str, error: &dyn std::fmt::Display) -> std::process::ExitCode {
    // The one place a binary writes a refused configuration: to its operator, on stderr.
    #[allow(clippy::print_stderr)]
    {
        eprintln!("{program}: {error}");
    }
    std::process::ExitCode::from(EXIT_CONFIG)
}
