use std::time::Duration;

use super::*;

fn own() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

#[test]
fn relationships_are_validated_field_by_field() {
    let ok = validate(
        &own(),
        "partner.org",
        "https://partner.org:8443",
        "https_spiffe",
        "spiffe://partner.org/meshid/server",
    )
    .unwrap();
    assert_eq!(ok.trust_domain.as_str(), "partner.org");
    assert_eq!(ok.endpoint_url.port_u16(), Some(8443));
    assert_eq!(ok.profile.as_str(), "https_spiffe");
    let web = validate(
        &own(),
        "partner.org",
        "https://b.partner.org/bundle",
        "https_web",
        "",
    )
    .unwrap();
    assert_eq!(web.profile, Profile::HttpsWeb);

    for (td, url, profile, id, field, says) in [
        (
            "example.org",
            "https://x",
            "https_web",
            "",
            "trust_domain",
            "own trust domain",
        ),
        (
            "Partner.org",
            "https://x",
            "https_web",
            "",
            "trust_domain",
            "lower case",
        ),
        (
            "spiffe://partner.org",
            "https://x",
            "https_web",
            "",
            "trust_domain",
            "",
        ),
        (
            "partner.org",
            "http://partner.org",
            "https_web",
            "",
            "endpoint_url",
            "https://",
        ),
        (
            "partner.org",
            "https://",
            "https_web",
            "",
            "endpoint_url",
            "",
        ),
        (
            "partner.org",
            "partner.org:443",
            "https_web",
            "",
            "endpoint_url",
            "https://",
        ),
        (
            "partner.org",
            "https://u:p@partner.org",
            "https_web",
            "",
            "endpoint_url",
            "credentials",
        ),
        (
            "partner.org",
            "https://partner.org/#x",
            "https_web",
            "",
            "endpoint_url",
            "fragment",
        ),
        (
            "partner.org",
            "https://partner.org",
            "https_web",
            "spiffe://partner.org/x",
            "endpoint_spiffe_id",
            "only for",
        ),
        (
            "partner.org",
            "https://partner.org",
            "https_spiffe",
            "",
            "endpoint_spiffe_id",
            "meshid/server",
        ),
        (
            "partner.org",
            "https://partner.org",
            "https_spiffe",
            "spiffe://other.org/x",
            "endpoint_spiffe_id",
            "not in partner.org",
        ),
        (
            "partner.org",
            "https://partner.org",
            "https_spiffe",
            "nope",
            "endpoint_spiffe_id",
            "",
        ),
        (
            "partner.org",
            "https://partner.org",
            "http",
            "",
            "profile",
            "https_web or https_spiffe",
        ),
    ] {
        let e = validate(&own(), td, url, profile, id).unwrap_err();
        assert_eq!(e.field, field, "{td} {url} {profile} {id}: {e}");
        assert!(e.reason.contains(says), "{td} {url} {profile} {id}: {e}");
    }
}

#[test]
fn refresh_follows_the_hint_within_bounds_and_retries_sooner() {
    assert_eq!(next_refresh(Duration::ZERO, false), DEFAULT_REFRESH);
    assert_eq!(
        next_refresh(Duration::from_secs(6), false),
        Duration::from_secs(3),
        "half the hint: a change is in force within the hint"
    );
    assert_eq!(
        next_refresh(Duration::from_secs(2), false),
        REFRESH_BOUNDS.0
    );
    assert_eq!(
        next_refresh(Duration::from_millis(10), false),
        REFRESH_BOUNDS.0
    );
    assert_eq!(
        next_refresh(Duration::from_secs(86_400), false),
        REFRESH_BOUNDS.1
    );
    assert_eq!(next_refresh(Duration::from_secs(600), true), MAX_RETRY);
    assert_eq!(
        next_refresh(Duration::from_secs(4), true),
        Duration::from_secs(2)
    );
}

#[test]
fn a_bundle_must_be_of_its_trust_domain_and_hold_an_x509_authority() {
    let td = TrustDomain::new("partner.org").unwrap();
    for (doc, says) in [
        ("", "not a SPIFFE bundle"),
        ("[]", "not a SPIFFE bundle"),
        (r#"{"keys": []}"#, "no X.509 authority"),
        (
            r#"{"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["AAAA"]}]}"#,
            "not a SPIFFE bundle",
        ),
    ] {
        let e = parse_bundle(&td, doc).unwrap_err();
        assert_eq!(e.field, "bundle");
        assert!(e.reason.contains(says), "{doc}: {e}");
    }
    let huge = format!(r#"{{"keys": [], "x": "{}"}}"#, "a".repeat(MAX_BUNDLE_BYTES));
    assert!(parse_bundle(&td, &huge)
        .unwrap_err()
        .reason
        .contains("larger than"));
}

#[test]
fn the_bundles_in_force_change_only_when_they_differ() {
    let f = Federation::default();
    assert!(f.bundles().is_empty());
    assert!(!f.set_bundles(BTreeMap::new()));
    f.update_status("partner.org", |s| s.last_error = "down".into());
    assert_eq!(f.status("partner.org").last_error, "down");
    f.retain_status(|td| td != "partner.org");
    assert_eq!(f.status("partner.org"), RefreshStatus::default());
}
