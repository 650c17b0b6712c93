//! Reading the TOML configuration files of meshid's binaries, with one error shape: the file,
//! the line and column, and the parser's message. The file's text is never quoted, because it
//! may hold a secret (a datastore password).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

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
            message: e.message().trim_end().to_owned(),
        }
    })
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
}
