//! SPIFFE IDs as meshid accepts them from text: the `spiffe` crate's parser, plus one rule of
//! our own, written once here: **one identity has one spelling**.
//!
//! The `spiffe` crate accepts an upper-case scheme or trust domain and normalizes it
//! (`spiffe://Example.org/a` becomes `spiffe://example.org/a`). Wherever an ID is compared as
//! text (a registration entry, a certificate's URI SAN, a policy, a log line), two spellings of
//! one ID would be two identities, so meshid refuses every spelling but the canonical one:
//! configuration, registration entries and peer certificates alike.

use spiffe::{SpiffeId, TrustDomain};

/// The longest SPIFFE ID meshid accepts, in bytes (X509-SVID and JWT-SVID consumers are not
/// required to handle more).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a text is not a SPIFFE ID meshid accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("{len} bytes is longer than {MAX_SPIFFE_ID_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// Not a SPIFFE ID at all.
    #[error("{0}")]
    Invalid(String),
    /// A SPIFFE ID, but not spelled canonically.
    #[error("not in canonical form (scheme and trust domain must be lower case): use {canonical}")]
    NotCanonical {
        /// The canonical spelling.
        canonical: SpiffeId,
    },
}

/// Parses `text` as a SPIFFE ID in canonical form, at most [`MAX_SPIFFE_ID_LEN`] bytes.
pub fn parse(text: &str) -> Result<SpiffeId, IdError> {
    if text.len() > MAX_SPIFFE_ID_LEN {
        return Err(IdError::TooLong { len: text.len() });
    }
    let id = SpiffeId::new(text).map_err(|e| IdError::Invalid(e.to_string()))?;
    if !is_spelled(&id, text) {
        return Err(IdError::NotCanonical { canonical: id });
    }
    Ok(id)
}

/// Parses `text` as a bare trust domain name in canonical form (`example.org`).
pub fn parse_trust_domain(text: &str) -> Result<TrustDomain, IdError> {
    let td = TrustDomain::new(text).map_err(|e| IdError::Invalid(e.to_string()))?;
    if td.as_str() != text {
        return Err(IdError::Invalid(format!("write the bare name: {td}")));
    }
    Ok(td)
}

/// Whether `text` is exactly the canonical spelling of `id`, without building a string.
fn is_spelled(id: &SpiffeId, text: &str) -> bool {
    text.strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(id.trust_domain().as_str()))
        .is_some_and(|path| path == id.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_identity_has_one_spelling() {
        assert_eq!(
            parse("spiffe://example.org/a/b").unwrap().to_string(),
            "spiffe://example.org/a/b"
        );
        for (text, canonical) in [
            ("SPIFFE://example.org/a", "spiffe://example.org/a"),
            ("spiffe://Example.org/a", "spiffe://example.org/a"),
            ("spiffe://EXAMPLE.ORG", "spiffe://example.org"),
        ] {
            match parse(text) {
                Err(IdError::NotCanonical { canonical: c }) => assert_eq!(c.to_string(), canonical),
                other => panic!("{text}: {other:?}"),
            }
        }
        for text in [
            "https://example.org/a",
            "spiffe://example.org/a/",
            "",
            "spiffe://",
        ] {
            assert!(matches!(parse(text), Err(IdError::Invalid(_))), "{text}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(parse(&long), Err(IdError::TooLong { .. })));
        assert!(parse_trust_domain("example.org").is_ok());
        assert!(parse_trust_domain("Example.org").is_err());
        assert!(parse_trust_domain("spiffe://example.org").is_err());
    }
}
