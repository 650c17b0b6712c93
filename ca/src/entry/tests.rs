use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn spec() -> EntrySpec {
    EntrySpec {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: "spiffe://example.org/meshid/agent/node-1".into(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    }
}

#[test]
fn valid_entry() {
    let mut s = spec();
    s.selectors = vec![
        "unix:uid:1000".into(),
        "unix:path:/usr/bin/web".into(),
        "unix:uid:1000".into(),
    ];
    s.dns_names = vec!["web.example.org".into(), "*.web.svc".into()];
    s.federates_with = vec!["partner.org".into()];
    s.x509_svid_ttl = 3600;
    s.hint = "internal".into();
    let e = s.validate(&td(), 42).unwrap();
    assert_eq!(e.selectors.len(), 2, "duplicates removed");
    assert_eq!(e.revision, 1);
    assert_eq!(e.created_at, 42);
    assert_eq!(e.x509_svid_ttl, Some(Duration::from_secs(3600)));
    assert_eq!(e.jwt_svid_ttl, None);
    assert_eq!(e.id.as_str().len(), 32);
    // Round trip through the spec keeps everything.
    let again = EntrySpec::from(&e).validate(&td(), 42).unwrap();
    assert_eq!(again, e);
}

/// Every rule of the SPIFFE ID specification, for both ID fields.
#[test]
fn invalid_spiffe_ids_are_refused() {
    let long_path = format!("spiffe://example.org/{}", "a".repeat(2048));
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("example.org/web", "no scheme"),
        ("http://example.org/web", "wrong scheme"),
        (
            "SPIFFE://example.org/web",
            "scheme must be lowercase in our parser",
        ),
        ("spiffe://", "empty trust domain"),
        ("spiffe:///web", "empty trust domain with path"),
        ("spiffe://Example.org/web", "uppercase trust domain"),
        ("spiffe://exa mple.org/web", "space in trust domain"),
        ("spiffe://example.org:8080/web", "port"),
        ("spiffe://user@example.org/web", "user info"),
        ("spiffe://example.org/web?x=1", "query"),
        ("spiffe://example.org/web#frag", "fragment"),
        ("spiffe://example.org/web/", "trailing slash"),
        ("spiffe://example.org//web", "empty segment"),
        ("spiffe://example.org/./web", "dot segment"),
        ("spiffe://example.org/../web", "dot-dot segment"),
        ("spiffe://example.org/w%20b", "percent encoding"),
        ("spiffe://example.org/w*b", "invalid path character"),
        ("spiffe://ex%61mple.org/web", "percent-encoded trust domain"),
        (long_path.as_str(), "longer than 2048 bytes"),
    ];
    for (value, why) in cases {
        for field in ["spiffe_id", "parent_id"] {
            let mut s = spec();
            if field == "spiffe_id" {
                s.spiffe_id = (*value).to_owned();
            } else {
                s.parent_id = (*value).to_owned();
            }
            let err = s
                .validate(&td(), 0)
                .expect_err(&format!("{field} {value:?} ({why}) accepted"));
            assert!(
                matches!(
                    err,
                    EntryError::InvalidSpiffeId { .. } | EntryError::ForeignTrustDomain { .. }
                ),
                "{field} {value:?} ({why}): unexpected {err}"
            );
            assert!(err.to_string().contains(field), "{err}");
        }
    }
}

type Mutation = Box<dyn Fn(&mut EntrySpec)>;

#[test]
fn entry_rules() {
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "foreign td",
            Box::new(|s| s.spiffe_id = "spiffe://other.org/web".into()),
            "not in trust domain",
        ),
        (
            "no path",
            Box::new(|s| s.spiffe_id = "spiffe://example.org".into()),
            "has no path",
        ),
        (
            "no selectors",
            Box::new(|s| s.selectors.clear()),
            "at least one selector",
        ),
        (
            "ttl too long",
            Box::new(|s| s.x509_svid_ttl = 8 * 24 * 3600),
            "x509_svid_ttl",
        ),
        (
            "jwt ttl too long",
            Box::new(|s| s.jwt_svid_ttl = 25 * 3600),
            "jwt_svid_ttl",
        ),
        (
            "hint too long",
            Box::new(|s| s.hint = "h".repeat(1025)),
            "hint is 1025 bytes",
        ),
        (
            "bad dns",
            Box::new(|s| s.dns_names = vec!["-bad.example".into()]),
            "invalid dns name",
        ),
        (
            "dns with space",
            Box::new(|s| s.dns_names = vec!["a b".into()]),
            "invalid dns name",
        ),
        (
            "own td federation",
            Box::new(|s| s.federates_with = vec!["example.org".into()]),
            "own trust domain",
        ),
        (
            "bad federation",
            Box::new(|s| s.federates_with = vec!["Bad.Org".into()]),
            "invalid federates_with",
        ),
        (
            "bad id",
            Box::new(|s| s.id = Some("has space".into())),
            "invalid entry id",
        ),
        (
            "too many selectors",
            Box::new(|s| s.selectors = (0..65).map(|i| format!("unix:uid:{i}")).collect()),
            "too many selectors",
        ),
    ];
    for (name, mutate, expect) in cases {
        let mut s = spec();
        mutate(&mut s);
        let err = s.validate(&td(), 0).expect_err(name).to_string();
        assert!(err.contains(expect), "{name}: {err}");
    }
}

#[test]
fn selectors() {
    for ok in [
        "unix:uid:0",
        "unix:uid:4294967295",
        "unix:gid:1000",
        "unix:user:www-data",
        "unix:group:staff",
        "unix:supplementary_gid:27",
        "unix:path:/usr/bin/python3",
        "unix:sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "unix:user:name:with:colons",
    ] {
        let s = Selector::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(s.to_string(), ok);
    }
    for (bad, why) in [
        ("", "expected type:key:value"),
        ("unix", "expected type:key:value"),
        ("unix:uid", "expected type:key:value"),
        ("unix:uid:", "value is empty"),
        (":uid:1", "type is empty"),
        ("k8s:ns:default", "unknown selector type"),
        ("unix:pid:1", "unknown unix selector key"),
        ("unix:uid:abc", "decimal number"),
        ("unix:uid:-1", "decimal number"),
        ("unix:uid:4294967296", "decimal number"),
        ("unix:uid:01", "decimal number"),
        ("unix:sha256:abc", "64 lowercase hex"),
        (
            "unix:sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "64 lowercase hex",
        ),
        ("unix:path:relative/bin", "absolute path"),
        ("unix:user:a\nb", "control character"),
    ] {
        let err = Selector::parse(bad).expect_err(bad).to_string();
        assert!(err.contains(why), "{bad:?}: {err}");
    }
}

#[test]
fn matching_is_subset() {
    let mut s = spec();
    s.selectors = vec!["unix:uid:1000".into(), "unix:gid:1000".into()];
    let e = s.validate(&td(), 0).unwrap();
    let sel = |v: &[&str]| {
        v.iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect::<Vec<_>>()
    };
    assert!(e.matches(&sel(&["unix:uid:1000", "unix:gid:1000", "unix:user:web"])));
    assert!(!e.matches(&sel(&["unix:uid:1000"])));
    assert!(!e.matches(&sel(&["unix:uid:1001", "unix:gid:1000"])));
}
