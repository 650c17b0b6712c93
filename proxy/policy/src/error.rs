//! The error types of this crate: [`PatternError`] for one pattern, [`PolicyError`] for a file,
//! [`AccessLogError`] for a line of an access log.

use std::path::PathBuf;

use spiffe::SpiffeIdError;

/// Why a SPIFFE ID pattern or an HTTP path pattern was refused.
///
/// The messages say what to write instead; [`PolicyError`] prefixes them with the position of
/// the pattern in the policy file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern is an empty string.
    #[error("a pattern cannot be empty: write a SPIFFE ID pattern such as spiffe://example.org/ns/web/*")]
    Empty,
    /// The pattern does not start with `spiffe://`.
    #[error("a pattern must start with `spiffe://` and a trust domain, such as spiffe://example.org/ns/web/*")]
    NotSpiffe,
    /// Nothing between `spiffe://` and the path.
    #[error("the trust domain is missing: write spiffe://<trust-domain>/...")]
    MissingTrustDomain,
    /// The trust domain contains `*`.
    #[error(
        "wildcards are not allowed in the trust domain `{0}`: write one pattern per trust domain"
    )]
    TrustDomainWildcard(String),
    /// The trust domain is not a valid SPIFFE trust domain name.
    #[error("invalid trust domain `{domain}`: {source}")]
    TrustDomain {
        /// The trust domain as written.
        domain: String,
        /// What the SPIFFE ID rules say about it.
        source: SpiffeIdError,
    },
    /// A segment mixes `*` with other characters, such as `web-*`.
    #[error(
        "segment `{0}` mixes a wildcard with other characters: use `*` for exactly one whole \
         segment or `**` as the last segment for all remaining segments"
    )]
    PartialWildcard(String),
    /// `**` appears before the last segment.
    #[error("`**` must be the last segment (it matches all remaining segments): use `*` for one segment in the middle")]
    DoubleStarNotLast,
    /// The path, with wildcards replaced by a literal, is not a valid SPIFFE ID path.
    #[error(
        "invalid SPIFFE ID path: {0}: segments may use letters, digits, `.`, `-` and `_`, with \
         no empty, `.` or `..` segment and no trailing slash"
    )]
    InvalidId(#[source] SpiffeIdError),
    /// The pattern is longer than a SPIFFE ID may be.
    #[error("a pattern is at most {max} bytes long, as a SPIFFE ID is")]
    TooLong {
        /// The limit in bytes.
        max: usize,
    },
    /// An HTTP path pattern does not start with `/`.
    #[error("a path pattern must start with `/`, such as /v1/**")]
    PathNotAbsolute,
    /// An HTTP path pattern has an empty segment.
    #[error("empty path segment (`//` or a trailing `/`): remove it (`/v1` also matches a request for `/v1/`)")]
    PathEmptySegment,
    /// An HTTP path pattern has a `.` or `..` segment.
    #[error(
        "`.` and `..` segments are not allowed in a path pattern: write the path without them"
    )]
    PathDotSegment,
    /// An HTTP path pattern contains a character that requests are never matched on.
    #[error(
        "character {0:?} is not allowed in a path pattern: write paths decoded, without `%` escapes, \
         query string (`?`), fragment (`#`), `;` parameters, backslashes, spaces or control characters"
    )]
    PathChar(char),
}

/// Why a policy (or a test cases file) could not be loaded.
///
/// Displays as `<file>:<line>:<column>: <message>` for syntax and validation errors (line and
/// column count from 1, columns in characters), and names the file for the others.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: cannot read the file: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The input is larger than [`crate::MAX_POLICY_BYTES`].
    #[error("{origin}: the file is larger than the limit of {limit} bytes: split it or remove unused rules")]
    TooLarge {
        /// The file name used in messages.
        origin: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The input is not well-formed YAML (or not UTF-8, or nested too deeply).
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        /// The file name used in messages.
        origin: String,
        /// Line, from 1.
        line: usize,
        /// Column in characters, from 1.
        column: usize,
        /// What is wrong and what to do.
        message: String,
    },
    /// The YAML is well-formed but breaks a rule of the policy language.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        /// The file name used in messages.
        origin: String,
        /// Line, from 1.
        line: usize,
        /// Column in characters, from 1.
        column: usize,
        /// What is wrong and what to do.
        message: String,
    },
}

impl PolicyError {
    /// The line and column (both from 1) of the offending node, for syntax and validation errors.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            Self::Syntax { line, column, .. } | Self::Invalid { line, column, .. } => {
                Some((*line, *column))
            }
            Self::Io { .. } | Self::TooLarge { .. } => None,
        }
    }

    /// The message without the file and position prefix.
    pub fn message(&self) -> String {
        match self {
            Self::Syntax { message, .. } | Self::Invalid { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// Why a line of an access log was refused ([`crate::parse_access_log`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessLogError {
    /// The line is not an access record as the proxy writes them: not JSON, a field missing or
    /// of the wrong type, or an unknown `decision`, `kind` or `direction`.
    #[error("{origin}:{line}:{column}: not an access record: {message}")]
    Invalid {
        /// The file name used in messages.
        origin: String,
        /// Line, from 1.
        line: usize,
        /// Column, from 1 (1 when the JSON is well-formed but a value is not).
        column: usize,
        /// What is wrong.
        message: String,
    },
}
