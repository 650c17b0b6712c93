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
