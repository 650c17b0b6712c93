//! SPIFFE ID patterns ([`Pattern`]) and HTTP path patterns ([`PathPattern`]), compiled once into
//! segment lists so that matching walks the candidate's segments without allocating.
//!
//! Both use the same segment rules: a literal segment matches itself, `*` matches exactly one
//! non-empty segment (never across `/`), and `**`, only as the last segment, matches zero or
//! more remaining segments.

use std::fmt;
use std::str::FromStr;

use spiffe::{SpiffeId, TrustDomain};

use crate::PatternError;

/// The longest pattern accepted, the SPIFFE ID limit.
const MAX_PATTERN_BYTES: usize = 2048;
const SCHEME: &str = "spiffe://";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Seg {
    Lit(Box<str>),
    One,
}

/// Segment lists shared by both pattern kinds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Segments {
    segs: Box<[Seg]>,
    /// Ends with `**`.
    rest: bool,
}

impl Segments {
    fn matches<'a>(
        &self,
        mut candidate: impl Iterator<Item = &'a str>,
        eq: impl Fn(&str, &str) -> bool,
    ) -> bool {
        for seg in self.segs.iter() {
            match (seg, candidate.next()) {
                (_, None) => return false,
                (Seg::One, Some(_)) => {}
                (Seg::Lit(lit), Some(s)) => {
                    if !eq(lit, s) {
                        return false;
                    }
                }
            }
        }
        self.rest || candidate.next().is_none()
    }

    /// Every segment list `other` matches, `self` matches too.
    fn covers(&self, other: &Self) -> bool {
        for (i, seg) in self.segs.iter().enumerate() {
            match (seg, other.segs.get(i)) {
                (_, None) => return false,
                (Seg::One, Some(_)) => {}
                (Seg::Lit(a), Some(Seg::Lit(b))) if a == b => {}
                (Seg::Lit(_), Some(_)) => return false,
            }
        }
        self.rest || (!other.rest && other.segs.len() == self.segs.len())
    }

    /// Some segment list matches both.
    fn overlaps(&self, other: &Self) -> bool {
        for (a, b) in self.segs.iter().zip(other.segs.iter()) {
            if let (Seg::Lit(a), Seg::Lit(b)) = (a, b) {
                if a != b {
                    return false;
                }
            }
        }
        match self.segs.len().cmp(&other.segs.len()) {
            std::cmp::Ordering::Equal => true,
            std::cmp::Ordering::Less => self.rest,
            std::cmp::Ordering::Greater => other.rest,
        }
    }

    /// Splits `/a/b/**` (without the leading `/`) into segments; `check` validates literals.
    fn parse(
        body: &str,
        mut check: impl FnMut(&str) -> Result<(), PatternError>,
    ) -> Result<Self, PatternError> {
        let mut segs = Vec::new();
        let mut rest = false;
        if body.is_empty() {
            return Ok(Self {
                segs: segs.into(),
                rest,
            });
        }
        let mut parts = body.split('/').peekable();
        while let Some(part) = parts.next() {
            match part {
                "**" if parts.peek().is_some() => return Err(PatternError::DoubleStarNotLast),
                "**" => rest = true,
                "*" => segs.push(Seg::One),
                p if p.contains('*') => return Err(PatternError::PartialWildcard(p.to_owned())),
                p => {
                    check(p)?;
                    segs.push(Seg::Lit(p.into()));
                }
            }
        }
        Ok(Self {
            segs: segs.into(),
            rest,
        })
    }
}

/// A SPIFFE ID pattern: `spiffe://<trust-domain>/<segments>`.
///
/// The trust domain is exact (compared in its canonical lower-case form). Each path segment is a
/// literal, `*` (exactly one segment) or, as the last segment only, `**` (zero or more
/// segments): `spiffe://example.org/ns/web/*` matches `spiffe://example.org/ns/web/frontend` but
/// neither `spiffe://example.org/ns/web` nor `spiffe://example.org/ns/web/a/b`;
/// `spiffe://example.org/**` matches every ID of `example.org`. Literal segments follow the
/// SPIFFE ID rules.
///
/// Displays as written; two patterns are equal when they match the same IDs by construction
/// (same trust domain and segments).
#[derive(Clone, Debug)]
pub struct Pattern {
    original: Box<str>,
    trust_domain: Box<str>,
    segments: Segments,
}

impl Pattern {
    /// Whether `id` matches this pattern. Does not allocate.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        id.trust_domain_name() == &*self.trust_domain
            && self
                .segments
                .matches(id.path().split('/').skip(1), |a, b| a == b)
    }

    /// The trust domain the pattern names (canonical, lower case).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The pattern names exactly one ID (no wildcard).
    pub fn is_exact(&self) -> bool {
        !self.segments.rest && self.segments.segs.iter().all(|s| matches!(s, Seg::Lit(_)))
    }

    /// Every ID that `other` matches, `self` matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        self.trust_domain == other.trust_domain && self.segments.covers(&other.segments)
    }

    /// Some ID matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        self.trust_domain == other.trust_domain && self.segments.overlaps(&other.segments)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.original
    }
}

impl FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.len() > MAX_PATTERN_BYTES {
            return Err(PatternError::TooLong {
                max: MAX_PATTERN_BYTES,
            });
        }
        let rest = match s.get(..SCHEME.len()) {
            Some(scheme) if scheme.eq_ignore_ascii_case(SCHEME) => &s[SCHEME.len()..],
            _ => return Err(PatternError::NotSpiffe),
        };
        let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if td.is_empty() {
            return Err(PatternError::MissingTrustDomain);
        }
        if td.contains('*') {
            return Err(PatternError::TrustDomainWildcard(td.to_owned()));
        }
        if td.contains(':') {
            // Refuse `spiffe://a:1` here: TrustDomain::new would read it as a scheme.
            return Err(PatternError::TrustDomain {
                domain: td.to_owned(),
                source: spiffe::SpiffeIdError::BadTrustDomainChar,
            });
        }
        let trust_domain = TrustDomain::new(td).map_err(|source| PatternError::TrustDomain {
            domain: td.to_owned(),
            source,
        })?;
        let segments = match path.strip_prefix('/') {
            None => Segments {
                segs: Box::new([]),
                rest: false,
            },
            Some(body) => Segments::parse(body, |_| Ok(()))?,
        };
        // Validate the literal form with the SPIFFE ID parser: wildcards become a placeholder.
        let mut literal = String::with_capacity(s.len());
        literal.push_str(SCHEME);
        literal.push_str(trust_domain.as_str());
        if let Some(body) = path.strip_prefix('/') {
            for part in body.split('/') {
                literal.push('/');
                literal.push_str(if part == "*" || part == "**" {
                    "x"
                } else {
                    part
                });
            }
        }
        SpiffeId::new(&literal).map_err(PatternError::InvalidId)?;
        Ok(Self {
            original: s.into(),
            trust_domain: trust_domain.as_str().into(),
            segments,
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain && self.segments == other.segments
    }
}

impl Eq for Pattern {}

/// An HTTP path pattern such as `/v1/users/*` or `/v1/**`, with the segment rules of
/// [`Pattern`]. `/` matches only the root.
///
/// Patterns are written decoded (no `%` escapes). A request path is compared segment by segment
/// after percent-decoding; the query string is not part of the path (callers strip it; a `?` and
/// what follows is ignored here too), and one trailing `/` is ignored. Request paths that servers
/// may interpret in more than one way (see [`is_unambiguous_path`]) match no path pattern
/// through [`PathPattern::matches`]; the policy treats them specially (deny rules match them,
/// allow rules don't).
#[derive(Clone, Debug)]
pub struct PathPattern {
    original: Box<str>,
    segments: Segments,
}

impl PathPattern {
    /// Whether the request path (unambiguous, see [`is_unambiguous_path`]) matches.
    pub fn matches(&self, path: &str) -> bool {
        canonical_body(path).is_some_and(|body| self.matches_body(body))
    }

    /// Matches the body of an unambiguous path (from `canonical_body`).
    pub(crate) fn matches_body(&self, body: &str) -> bool {
        self.segments
            .matches(body.split('/').filter(|s| !s.is_empty()), decoded_eq)
    }

    /// Every path `other` matches, `self` matches too.
    pub fn covers(&self, other: &PathPattern) -> bool {
        self.segments.covers(&other.segments)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.original
    }
}

impl FromStr for PathPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_PATTERN_BYTES {
            return Err(PatternError::TooLong {
                max: MAX_PATTERN_BYTES,
            });
        }
        let Some(body) = s.strip_prefix('/') else {
            return Err(PatternError::PathNotAbsolute);
        };
        let segments = Segments::parse(body, |seg| {
            if seg.is_empty() {
                return Err(PatternError::PathEmptySegment);
            }
            if seg == "." || seg == ".." {
                return Err(PatternError::PathDotSegment);
            }
            match seg.chars().find(|&c| !path_pattern_char(c)) {
                Some(c) => Err(PatternError::PathChar(c)),
                None => Ok(()),
            }
        })?;
        Ok(Self {
            original: s.into(),
            segments,
        })
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl PartialEq for PathPattern {
    fn eq(&self, other: &Self) -> bool {
        self.segments == other.segments
    }
}

impl Eq for PathPattern {}

fn path_pattern_char(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || "-._~!$&'()+,=:@".contains(c)
    } else {
        !c.is_control() && !c.is_whitespace()
    }
}

/// Whether a request path has one reading only, so that path patterns can be trusted on it.
///
/// A path is ambiguous when it does not start with `/`, or has an empty segment (`//`, other
/// than one trailing `/`), a `.` or `..` segment (also when percent-encoded), a `;` (path
/// parameters), a `\`, a `#`, an invalid `%` escape, or an escape that decodes to `/` or `\`.
/// Servers normalize such paths in different ways, so a pattern could see one path and the
/// application another. The query string (from `?`) is ignored.
pub fn is_unambiguous_path(path: &str) -> bool {
    canonical_body(path).is_some()
}

/// The segments part of an unambiguous path (no leading or trailing `/`, no query), or `None`.
pub(crate) fn canonical_body(path: &str) -> Option<&str> {
    let path = path.split('?').next().unwrap_or(path);
    let body = path.strip_prefix('/')?;
    if body.starts_with('/') {
        return None;
    }
    let body = body.strip_suffix('/').unwrap_or(body);
    if body.is_empty() {
        return Some(body);
    }
    for seg in body.split('/') {
        if seg.is_empty() || seg.contains([';', '\\', '#']) {
            return None;
        }
        let mut len = 0usize;
        let mut dots = 0usize;
        for b in decode(seg) {
            let b = b?;
            if b == b'/' || b == b'\\' {
                return None;
            }
            len += 1;
            if b == b'.' {
                dots += 1;
            }
        }
        if len <= 2 && dots == len {
            return None;
        }
    }
    Some(body)
}

/// The path pattern that matches exactly the request paths reading like `path` (its decoded
/// segments as literals, so `/b`, `/b/` and `/%62` give `/b`), or `None` when no pattern can:
/// an ambiguous path, or a decoded segment with a `*` or a character patterns do not allow.
pub(crate) fn literal_path(path: &str) -> Option<PathPattern> {
    let body = canonical_body(path)?;
    let mut s = String::with_capacity(body.len() + 1);
    if body.is_empty() {
        s.push('/');
    } else {
        for seg in body.split('/') {
            let bytes: Option<Vec<u8>> = decode(seg).collect();
            let seg = String::from_utf8(bytes?).ok()?;
            if seg.contains('*') {
                return None;
            }
            s.push('/');
            s.push_str(&seg);
        }
    }
    let pattern: PathPattern = s.parse().ok()?;
    pattern.matches(path).then_some(pattern)
}

/// Percent-decodes a segment byte by byte; `None` items for invalid escapes.
fn decode(seg: &str) -> impl Iterator<Item = Option<u8>> + '_ {
    let bytes = seg.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *bytes.get(i)?;
        if b != b'%' {
            i += 1;
            return Some(Some(b));
        }
        let hex = |x: Option<&u8>| x.and_then(|c| (*c as char).to_digit(16));
        let decoded = match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (Some(h), Some(l)) => u8::try_from(h * 16 + l).ok(),
            _ => None,
        };
        i += 3;
        Some(decoded)
    })
}

/// `literal` (from a pattern) equals the percent-decoded request segment.
fn decoded_eq(literal: &str, segment: &str) -> bool {
    let mut lit = literal.bytes();
    for b in decode(segment) {
        if b != lit.next() {
            return false;
        }
    }
    lit.next().is_none()
}

/// A valid HTTP method token as policies write them: upper-case letters, digits, `-`, `_`.
pub(crate) fn is_method_token(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 32
        && m.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && m.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests;
