//! The CI token exchange end to end with independent peers: a local OIDC issuer (RS256 tokens
//! signed here with `jsonwebtoken`, its JWKS served over HTTPS by `openssl s_server`), the real
//! `meshid-ca` serving `POST /v1/ci/exchange` on its https_web bundle endpoint, curl as the CI
//! job, openssl checking the SVID. Every refusal the issue lists is shown, and no token reaches
//! the log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::cli::{free_port, json as parse, Server};

const ISSUER: &str = "https://token.actions.githubusercontent.com";

/// The test issuer's signing key and its JWK.
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    jwk: Value,
}

fn issuer(kid: &str) -> Issuer {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::traits::PublicKeyParts as _;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    Issuer {
        key: jsonwebtoken::EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes()),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be())}),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token shaped like GitHub Actions', with `change` applied to its claims.
fn token(
    i: &Issuer,
    kid: &str,
    change: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> String {
    let mut claims = json!({
        "iss": ISSUER, "aud": "meshid", "sub": "repo:acme/payments:ref:refs/heads/main",
        "repository": "acme/payments", "ref": "refs/heads/main", "workflow": "deploy",
        "iat": now() - 5, "nbf": now() - 5, "exp": now() + 300,
        "jti": format!("{:x}", rand::random::<u128>()),
    });
    change(claims.as_object_mut().unwrap());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &i.key).unwrap()
}

/// `openssl s_server -WWW` serving `dir` over HTTPS on `port`; killed on drop.
struct Files(Child);

impl Drop for Files {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_files(dir: &Path, base: &Path, port: u16) -> Files {
    let child = Command::new("openssl")
        .args(["s_server", "-WWW", "-quiet", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(base.join("web.pem"))
        .arg("-key")
        .arg(base.join("web.key"))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let files = Files(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return files;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("openssl s_server did not listen");
}

/// POSTs `body` to the exchange with curl: (status, answer).
fn post(base: &Path, endpoint: u16, body: &Value) -> (u16, Value) {
    let file = base.join("request.json");
    std::fs::write(&file, body.to_string()).unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--cacert",
        ])
        .arg(base.join("web-ca.pem"))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://localhost:{endpoint}/v1/ci/exchange"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (answer, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), parse(answer))
}

#[test]
fn a_ci_job_exchanges_its_oidc_token_once_for_a_short_lived_svid() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    crate::federation::web_pki(base);
    let github = issuer("gh-1");
    let www = base.join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(
        www.join("jwks.json"),
        json!({ "keys": [github.jwk] }).to_string(),
    )
    .unwrap();
    let jwks_port = free_port();
    let _files = serve_files(&www, base, jwks_port);

    let (ops, endpoint) = (format!("127.0.0.1:{}", free_port()), free_port());
    let config = base.join("ca.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{data}\"\nops_address = \"{ops}\"\n\
             node_address = \"127.0.0.1:{node}\"\n\n[federation]\n\
             bundle_endpoint_address = \"127.0.0.1:{endpoint}\"\nbundle_endpoint_profile = \"https_web\"\n\
             bundle_endpoint_cert_file = \"{cert}\"\nbundle_endpoint_key_file = \"{key}\"\n\n\
             [[ci.issuers]]\nname = \"github\"\nissuer = \"{ISSUER}\"\n\
             jwks_url = \"https://localhost:{jwks_port}/jwks.json\"\naudience = \"meshid\"\n\
             max_ttl = \"10m\"\nroots_file = \"{roots}\"\n\n[[ci.issuers.rules]]\nname = \"payments-prod\"\n\
             spiffe_id = \"spiffe://example.org/ci/{{repository}}/prod\"\n\
             when = {{ repository = \"acme/payments\", ref = \"refs/heads/main\" }}\n",
            data = base.join("data").display(),
            node = free_port(),
            cert = base.join("web.pem").display(),
            key = base.join("web.key").display(),
            roots = base.join("web-ca.pem").display(),
        ),
    )
    .unwrap();
    let ca = Server::with_config(base, &config, &ops, &base.join("data/admin.sock"));

    // The job's key stays with it: it sends a CSR.
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/CN=job", "-outform", "DER", "-keyout"])
        .arg(base.join("job.key"))
        .arg("-out")
        .arg(base.join("job.csr"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(base.join("job.csr")).unwrap());

    let good = token(&github, "gh-1", |_| {});
    let (status, answer) = post(
        base,
        endpoint,
        &json!({"token": good, "csr": csr, "jwt_audiences": ["sts.amazonaws.com"]}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["spiffe_id"],
        "spiffe://example.org/ci/acme/payments/prod"
    );
    let left = answer["x509_svid_expires_at"].as_i64().unwrap() - now();
    assert!(
        (0..=600).contains(&left),
        "lifetime capped at 10m: {left}s left"
    );
    assert_eq!(answer["jwt_svid"].as_str().unwrap().split('.').count(), 3);
    // openssl verifies the chain to the bundle and sees the SPIFFE ID.
    let chain = answer["x509_svid"].as_str().unwrap();
    let leaf_end = chain.find("-----END CERTIFICATE-----").unwrap() + 25;
    std::fs::write(base.join("leaf.pem"), &chain[..leaf_end]).unwrap();
    std::fs::write(base.join("chain.pem"), chain).unwrap();
    std::fs::write(
        base.join("bundle.pem"),
        answer["x509_bundle"].as_str().unwrap(),
    )
    .unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(base.join("bundle.pem"))
        .arg("-untrusted")
        .arg(base.join("chain.pem"))
        .arg(base.join("leaf.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(base.join("leaf.pem"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("URI:spiffe://example.org/ci/acme/payments/prod"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Refusals, each for its reason; a refused token changes nothing.
    let other = issuer("gh-1");
    let set = |name: &'static str, value: Value| {
        move |c: &mut serde_json::Map<String, Value>| {
            c.insert(name.into(), value);
        }
    };
    for (t, reason) in [
        (good.clone(), "replayed"),
        (
            token(&github, "gh-1", set("aud", json!("someone-else"))),
            "wrong_audience",
        ),
        (
            token(&github, "gh-1", set("exp", json!(now() - 120))),
            "expired",
        ),
        (
            token(&github, "gh-1", set("nbf", json!(now() + 300))),
            "not_yet_valid",
        ),
        (
            token(&github, "gh-1", set("iss", json!("https://gitlab.com"))),
            "wrong_issuer",
        ),
        (token(&github, "gh-2", |_| {}), "unknown_key"),
        (token(&other, "gh-1", |_| {}), "bad_signature"),
        (
            token(&github, "gh-1", set("ref", json!("refs/heads/feature-x"))),
            "no_rule",
        ),
    ] {
        let (status, answer) = post(base, endpoint, &json!({"token": t, "csr": csr}));
        assert_eq!(
            (status, answer["error"].as_str()),
            (403, Some(reason)),
            "{answer}"
        );
    }
    let (status, answer) = post(base, endpoint, &json!({"token": good}));
    assert_eq!(status, 400, "nothing asked: {answer}");

    // The job's one command: the key made and kept here (0600), the token read from a file,
    // nothing secret printed but the mask line.
    let fresh = token(&github, "gh-1", |_| {});
    let token_file = base.join("oidc-token");
    std::fs::write(&token_file, &fresh).unwrap();
    let exchange = |out_dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_meshid-ca"))
            .args(["ci", "exchange", "--token-file"])
            .arg(&token_file)
            .args([
                "--url",
                &format!("https://localhost:{endpoint}"),
                "--ca-file",
            ])
            .arg(base.join("web-ca.pem"))
            .arg("--out")
            .arg(out_dir)
            .args(["--jwt-audience", "sts.amazonaws.com", "--mask"])
            .output()
            .unwrap()
    };
    let out_dir = base.join("svid");
    let out = exchange(&out_dir);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("SPIFFE ID  : spiffe://example.org/ci/acme/payments/prod"),
        "{said}"
    );
    assert!(!said.contains(&fresh), "the OIDC token printed");
    let jwt = std::fs::read_to_string(out_dir.join("jwt.token")).unwrap();
    assert!(said.contains(&format!("::add-mask::{jwt}")), "{said}");
    use std::os::unix::fs::PermissionsExt as _;
    for secret in ["key.pem", "jwt.token"] {
        let mode = std::fs::metadata(out_dir.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    let public_key = |args: &[&str], file: &str| {
        let out = Command::new("openssl")
            .args(args)
            .arg(out_dir.join(file))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        public_key(&["x509", "-noout", "-pubkey", "-in"], "svid.pem"),
        public_key(&["pkey", "-pubout", "-in"], "key.pem"),
        "the SVID is for the key made here"
    );
    // py-spiffe (PyPI) reads it as an X509-SVID by the SPIFFE rules (SPIFFE ID, leaf and
    // intermediate key usages) and the bundle as example.org's.
    let python = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/interop-venv/bin/python3"
    );
    if Path::new(python).exists() {
        let check = "import sys\nfrom spiffe import X509Svid, X509Bundle, TrustDomain\n\
            svid = X509Svid.parse(open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read())\n\
            bundle = X509Bundle.parse(TrustDomain('example.org'), open(sys.argv[3], 'rb').read())\n\
            assert len(bundle.x509_authorities) >= 1\nprint(svid.spiffe_id)\n";
        let out = Command::new(python)
            .args(["-c", check])
            .arg(out_dir.join("svid.pem"))
            .arg(out_dir.join("key.pem"))
            .arg(out_dir.join("bundle.pem"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "spiffe://example.org/ci/acme/payments/prod",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "no {python} (run .ci/run)"
        );
        eprintln!("SKIPPED the py-spiffe check: no {python}");
    }
    // The same token again: refused, and the command says why.
    let again = exchange(&base.join("again"));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("replayed"));

    let audit = ca.ok(&[
        "audit",
        "list",
        "--kind",
        "ci.exchanged",
        "--output",
        "json",
    ]);
    let record = parse(audit.lines().next().unwrap());
    assert_eq!(record["details"]["rule"], "payments-prod", "{record}");
    assert_eq!(
        record["details"]["claims"]["ref"], "refs/heads/main",
        "{record}"
    );
    let (_, metrics) = ca.http_get("/metrics");
    assert!(
        metrics.contains("meshid_ca_ci_exchanges_total{reason=\"replayed\"} 2"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(&ca.log).unwrap();
    assert!(!log.contains(&good), "a token in the log");
    assert!(
        !log.contains(answer_token(&good)),
        "a token's signature in the log"
    );
}

/// The signature part of a token (what must never be logged, even alone).
fn answer_token(token: &str) -> &str {
    token.rsplit('.').next().unwrap()
}
