use super::*;

#[test]
fn security_header_must_be_exactly_true_once() {
    let with = |values: &[&str]| {
        let mut r = Request::new(());
        for v in values {
            r.metadata_mut().append(SECURITY_HEADER, v.parse().unwrap());
        }
        check_header(&r).is_ok()
    };
    assert!(with(&["true"]));
    assert!(!with(&[]));
    assert!(!with(&["True"]));
    assert!(!with(&["1"]));
    assert!(!with(&["true", "true"]));
}

#[test]
fn errors_map_to_the_specified_codes() {
    use tonic::Code;
    let cases = [
        (ServiceError::MissingSecurityHeader, Code::InvalidArgument),
        (
            ServiceError::MissingField("audience"),
            Code::InvalidArgument,
        ),
        (ServiceError::NoIdentityIssued, Code::PermissionDenied),
        (ServiceError::NoPeerCredentials, Code::PermissionDenied),
        (ServiceError::NotReady("x"), Code::Unavailable),
        (ServiceError::ShuttingDown, Code::Unavailable),
        (
            ServiceError::Mint {
                spiffe_id: SpiffeId::new("spiffe://example.org/a").unwrap(),
                source: MintError::Unavailable("down".into()),
            },
            Code::Unavailable,
        ),
    ];
    for (err, code) in cases {
        let status = Status::from(err);
        assert_eq!(status.code(), code, "{}", status.message());
    }
    assert_eq!(
        Status::from(ServiceError::MissingSecurityHeader).message(),
        "security header missing from request"
    );
    assert_eq!(
        Status::from(ServiceError::NoIdentityIssued).message(),
        "no identity issued"
    );
}

#[test]
fn the_kid_of_a_token_header_or_none() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = |header: &str| format!("{}.e30.sig", b64(header));
    assert_eq!(
        jwt_kid(&token(r#"{"alg":"ES256","kid":"abc","typ":"JWT"}"#)).as_deref(),
        Some("abc")
    );
    // Malformed: no kid, a kid that is not a string, not JSON, not base64url, empty.
    for bad in [
        token(r#"{"alg":"ES256"}"#),
        token(r#"{"kid":7}"#),
        token("not json"),
        "!!!.e30.sig".to_owned(),
        String::new(),
        token("[1,2]"),
    ] {
        assert_eq!(jwt_kid(&bad), None, "{bad}");
    }
}
