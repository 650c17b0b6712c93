use super::*;

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn pat(s: &str) -> Pattern {
    s.parse().unwrap()
}

#[test]
fn good_patterns_parse_and_display_as_written() {
    for s in [
        "spiffe://example.org",
        "spiffe://example.org/**",
        "spiffe://example.org/ns/web/frontend",
        "spiffe://example.org/ns/*/sa/*",
        "spiffe://example.org/ns/web/**",
        "spiffe://example.org/*",
        "SPIFFE://Example.ORG/a_b/c-d/e.f",
    ] {
        let p = pat(s);
        assert_eq!(p.to_string(), s);
        assert_eq!(s.parse::<Pattern>().unwrap(), p);
    }
    assert_eq!(pat("SPIFFE://Example.ORG/a").trust_domain(), "example.org");
    assert_eq!(pat("SPIFFE://Example.ORG/a"), pat("spiffe://example.org/a"));
    assert!(pat("spiffe://example.org/a/b").is_exact());
    assert!(!pat("spiffe://example.org/a/*").is_exact());
    assert!(!pat("spiffe://example.org/**").is_exact());
}

#[test]
fn every_malformed_class_is_refused() {
    use PatternError as E;
    type Expect = fn(&PatternError) -> bool;
    let cases: &[(&str, Expect)] = &[
        ("", |e| matches!(e, E::Empty)),
        ("example.org/a", |e| matches!(e, E::NotSpiffe)),
        ("https://example.org/a", |e| matches!(e, E::NotSpiffe)),
        ("spiffe:/example.org", |e| matches!(e, E::NotSpiffe)),
        ("spiffe://", |e| matches!(e, E::MissingTrustDomain)),
        ("spiffe:///a", |e| matches!(e, E::MissingTrustDomain)),
        ("spiffe://*.example.org/a", |e| {
            matches!(e, E::TrustDomainWildcard(_))
        }),
        ("spiffe://*/a", |e| matches!(e, E::TrustDomainWildcard(_))),
        ("spiffe://exa mple.org/a", |e| {
            matches!(e, E::TrustDomain { .. })
        }),
        ("spiffe://example.org:443/a", |e| {
            matches!(e, E::TrustDomain { .. })
        }),
        ("spiffe://user@example.org/a", |e| {
            matches!(e, E::TrustDomain { .. })
        }),
        (
            "spiffe://example.org/web-*",
            |e| matches!(e, E::PartialWildcard(s) if s == "web-*"),
        ),
        ("spiffe://example.org/a/*b/c", |e| {
            matches!(e, E::PartialWildcard(_))
        }),
        ("spiffe://example.org/***", |e| {
            matches!(e, E::PartialWildcard(_))
        }),
        ("spiffe://example.org/**/a", |e| {
            matches!(e, E::DoubleStarNotLast)
        }),
        ("spiffe://example.org/a/**/**", |e| {
            matches!(e, E::DoubleStarNotLast)
        }),
        ("spiffe://example.org/", |e| matches!(e, E::InvalidId(_))),
        ("spiffe://example.org/a/", |e| matches!(e, E::InvalidId(_))),
        ("spiffe://example.org/a//b", |e| {
            matches!(e, E::InvalidId(_))
        }),
        ("spiffe://example.org/a/../b", |e| {
            matches!(e, E::InvalidId(_))
        }),
        ("spiffe://example.org/./b", |e| matches!(e, E::InvalidId(_))),
        ("spiffe://example.org/a b", |e| matches!(e, E::InvalidId(_))),
        ("spiffe://example.org/a?x=1", |e| {
            matches!(e, E::InvalidId(_))
        }),
        ("spiffe://example.org/a#f", |e| matches!(e, E::InvalidId(_))),
        ("spiffe://example.org/caf\u{e9}", |e| {
            matches!(e, E::InvalidId(_))
        }),
    ];
    for (input, want) in cases {
        let err = input.parse::<Pattern>().unwrap_err();
        assert!(want(&err), "{input:?}: unexpected error {err:?}");
        // Messages are lower-case and say what to do (or what is allowed).
        let msg = err.to_string();
        assert!(msg.starts_with(|c: char| !c.is_uppercase()), "{msg}");
    }
    let long = format!("spiffe://example.org/{}", "a".repeat(2100));
    assert!(matches!(
        long.parse::<Pattern>(),
        Err(PatternError::TooLong { .. })
    ));
}

#[test]
fn matching_table() {
    let table: &[(&str, &str, bool)] = &[
        ("spiffe://example.org/a/b", "spiffe://example.org/a/b", true),
        (
            "spiffe://example.org/a/b",
            "spiffe://example.org/a/b/c",
            false,
        ),
        ("spiffe://example.org/a/b", "spiffe://example.org/a", false),
        (
            "spiffe://example.org/a/b",
            "spiffe://example.org/a/B",
            false,
        ),
        ("spiffe://example.org/a/b", "spiffe://other.org/a/b", false),
        ("spiffe://EXAMPLE.org/a/b", "spiffe://example.org/a/b", true),
        ("spiffe://example.org/a/*", "spiffe://example.org/a/x", true),
        (
            "spiffe://example.org/a/*",
            "spiffe://example.org/a/b/c",
            false,
        ),
        ("spiffe://example.org/a/*", "spiffe://example.org/a", false),
        ("spiffe://example.org/*/b", "spiffe://example.org/x/b", true),
        (
            "spiffe://example.org/*/b",
            "spiffe://example.org/x/y/b",
            false,
        ),
        ("spiffe://example.org/*", "spiffe://example.org", false),
        ("spiffe://example.org/a/**", "spiffe://example.org/a", true),
        (
            "spiffe://example.org/a/**",
            "spiffe://example.org/a/b",
            true,
        ),
        (
            "spiffe://example.org/a/**",
            "spiffe://example.org/a/b/c/d",
            true,
        ),
        (
            "spiffe://example.org/a/**",
            "spiffe://example.org/ab",
            false,
        ),
        (
            "spiffe://example.org/a/**",
            "spiffe://example.org/b/a",
            false,
        ),
        ("spiffe://example.org/**", "spiffe://example.org", true),
        ("spiffe://example.org/**", "spiffe://example.org/x/y", true),
        ("spiffe://example.org/**", "spiffe://example.com/x", false),
        ("spiffe://example.org", "spiffe://example.org", true),
        ("spiffe://example.org", "spiffe://example.org/a", false),
        ("spiffe://example.org/*/**", "spiffe://example.org", false),
        ("spiffe://example.org/*/**", "spiffe://example.org/a", true),
    ];
    for (p, i, want) in table {
        assert_eq!(pat(p).matches(&id(i)), *want, "{p} vs {i}");
    }
}

#[test]
fn covers_and_overlaps() {
    let t: &[(&str, &str, bool, bool)] = &[
        // (outer, inner, outer covers inner, overlap)
        ("spiffe://e.org/**", "spiffe://e.org/a/*", true, true),
        ("spiffe://e.org/a/*", "spiffe://e.org/a/b", true, true),
        ("spiffe://e.org/a/b", "spiffe://e.org/a/*", false, true),
        ("spiffe://e.org/a/*", "spiffe://e.org/a/**", false, true),
        ("spiffe://e.org/a/**", "spiffe://e.org/a", true, true),
        ("spiffe://e.org/a/*", "spiffe://e.org/b/*", false, false),
        ("spiffe://e.org/a/*", "spiffe://e.org/a/b/c", false, false),
        ("spiffe://e.org/a/*/**", "spiffe://e.org/a/b/c", true, true),
        ("spiffe://e.org/**", "spiffe://f.org/a", false, false),
        ("spiffe://e.org/a", "spiffe://e.org/a", true, true),
        ("spiffe://e.org", "spiffe://e.org/**", false, true),
    ];
    for (outer, inner, covers, overlaps) in t {
        assert_eq!(
            pat(outer).covers(&pat(inner)),
            *covers,
            "{outer} covers {inner}"
        );
        assert_eq!(
            pat(outer).overlaps(&pat(inner)),
            *overlaps,
            "{outer} overlaps {inner}"
        );
        assert_eq!(
            pat(inner).overlaps(&pat(outer)),
            *overlaps,
            "{inner} overlaps {outer}"
        );
    }
}

#[test]
fn path_patterns() {
    let p = |s: &str| s.parse::<PathPattern>().unwrap();
    let table: &[(&str, &str, bool)] = &[
        ("/v1/**", "/v1", true),
        ("/v1/**", "/v1/", true),
        ("/v1/**", "/v1/a/b", true),
        ("/v1/**", "/v2/a", false),
        ("/v1/*", "/v1/a", true),
        ("/v1/*", "/v1/a/", true),
        ("/v1/*", "/v1/a/b", false),
        ("/v1/*", "/v1", false),
        ("/health", "/health", true),
        ("/health", "/health?verbose=1", true),
        ("/health", "/healthz", false),
        ("/health", "/Health", false),
        ("/", "/", true),
        ("/", "/a", false),
        ("/**", "/", true),
        ("/**", "/anything/at/all", true),
        ("/caf\u{e9}", "/caf%C3%A9", true),
        ("/caf\u{e9}", "/caf%C3%A8", false),
        ("/a", "/%61%", false),
        ("/admin", "/%61dmin", true),
        ("/admin/*", "/admin/x", true),
    ];
    for (pattern, path, want) in table {
        assert_eq!(p(pattern).matches(path), *want, "{pattern} vs {path}");
    }
    // Ambiguous paths match no pattern through `matches`.
    for path in [
        "",
        "admin",
        "//admin",
        "/admin//x",
        "/admin/./x",
        "/admin/../x",
        "/a/%2e%2E/x",
        "/a/%2F/x",
        "/admin;jsessionid=1",
        "/a\\b",
        "/a/%zz",
        "/a/%4",
        "/a#frag",
        "/a/.",
    ] {
        assert!(!is_unambiguous_path(path), "{path:?}");
        assert!(!p("/**").matches(path), "{path:?}");
    }
    for path in [
        "/",
        "/a",
        "/a/",
        "/a%20b",
        "/a/.well-known",
        "/a/...",
        "/v1?x=/../",
    ] {
        assert!(is_unambiguous_path(path), "{path:?}");
    }
    for (bad, want) in [
        ("v1/**", PatternError::PathNotAbsolute),
        ("/v1/", PatternError::PathEmptySegment),
        ("//v1", PatternError::PathEmptySegment),
        ("/v1/../x", PatternError::PathDotSegment),
        ("/v1/x%20y", PatternError::PathChar('%')),
        ("/v1?x=1", PatternError::PathChar('?')),
        ("/v1;a", PatternError::PathChar(';')),
        ("/v1/a b", PatternError::PathChar(' ')),
        ("/v1/**/x", PatternError::DoubleStarNotLast),
        ("/v1/x*", PatternError::PartialWildcard("x*".to_owned())),
    ] {
        assert_eq!(bad.parse::<PathPattern>().unwrap_err(), want, "{bad}");
    }
    assert!(p("/v1/**").covers(&p("/v1/users/*")));
    assert!(!p("/v1/users/*").covers(&p("/v1/**")));
}

#[test]
fn method_tokens() {
    for m in ["GET", "POST", "M-SEARCH", "PURGE_ALL", "X2"] {
        assert!(is_method_token(m), "{m}");
    }
    for m in ["", "get", "Get", "2X", "GE T", "-X", "G\u{c9}T"] {
        assert!(!is_method_token(m), "{m:?}");
    }
}

#[test]
fn messages_clip_long_user_text() {
    let long = "x".repeat(10_000);
    assert_eq!(crate::yaml::clip(&long).chars().count(), 64);
    assert_eq!(crate::yaml::clip("short"), "short");
    let exactly = "y".repeat(64);
    assert_eq!(crate::yaml::clip(&exactly), exactly.as_str());
    let e = crate::Policy::parse(&format!("name: {long}\nrules: []\n"), "p.yaml").unwrap_err();
    assert!(e.to_string().len() < 300, "{e}");
}
