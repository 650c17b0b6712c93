//! A pattern and a SPIFFE ID from arbitrary bytes (split at the first newline): parsing never
//! panics, a parsed pattern re-parses from its Display form, and `matches` agrees with a naive
//! reference matcher over the ID's segments.
//!
//! Run with `cargo fuzz run pattern` from `proxy/policy/fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_policy::{Pattern, SpiffeId};

/// Segment-by-segment reference: `*` is one segment, a final `**` is any rest.
fn reference(pattern: &[&str], id: &[&str]) -> bool {
    match (pattern.split_first(), id.split_first()) {
        (Some((&"**", [])), _) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some((p, pt)), Some((i, it))) => (*p == "*" || p == i) && reference(pt, it),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern_text, id_text) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(pattern) = pattern_text.parse::<Pattern>() else {
        return;
    };
    let again: Pattern = pattern.to_string().parse().expect("display re-parses");
    assert_eq!(again, pattern);
    let Ok(id) = SpiffeId::new(id_text) else {
        return;
    };
    // The pattern as parts: scheme is case-insensitive, the trust domain too.
    let rest = &pattern_text["spiffe://".len()..];
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let pattern_segs: Vec<&str> = path.split('/').skip(1).collect();
    let id_segs: Vec<&str> = id.path().split('/').skip(1).collect();
    let expected =
        td.eq_ignore_ascii_case(id.trust_domain_name()) && reference(&pattern_segs, &id_segs);
    assert_eq!(pattern.matches(&id), expected, "{pattern_text} vs {id}");
});
