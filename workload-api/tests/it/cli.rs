//! `meshid-agent` command-line parsing, on the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

/// Join tokens are base64url: about one in 64 begins with `-`. Such a token is the option's
/// value, not an unknown option (it reaches the configuration check, which fails on the
/// missing server address instead).
#[test]
fn join_token_may_begin_with_a_hyphen() {
    for token in ["-CpYt0kq3", "--", "-"] {
        let out = Command::new(env!("CARGO_BIN_EXE_meshid-agent"))
            .args([
                "run",
                "--check",
                "--trust-domain",
                "example.org",
                "--join-token",
                token,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("server_address"),
            "{token:?} was not taken as the token: {stderr}"
        );
        assert!(!stderr.contains("unexpected argument"), "{stderr}");
    }
}
