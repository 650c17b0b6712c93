//! The console from another host: a CA in the switch namespace serves it on the bridge's
//! address (HTTPS with the CA server's SVID), and curl on host `op` calls it. Without an admin
//! SVID or a session the API answers 401 (the page and its script, which hold no data, load);
//! a login token opens one session, once; an admin SVID is admitted; another SVID is not. Each
//! refusal is logged with its reason, and no token or session secret reaches the log.

use std::path::Path;

use meshid_tests::netns::{missing_prerequisite, Net, CA_ADDR, NODE_PORT, WEB_ADDR};
use meshid_tests::{ca_cli, Ca};

const TOOLS: [(&str, &str); 2] = [("ip", "-V"), ("curl", "--version")];
const PORT: u16 = 8480;

/// `curl` on host `op` with `args`: (status, response headers as sent, body).
fn curl(net: &Net, args: &[&str]) -> (u16, String, String) {
    let mut all = vec![
        "-sS",
        "-k",
        "--max-time",
        "10",
        "-D",
        "/dev/stderr",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    all.extend_from_slice(args);
    let out = net.output("op", "curl", &all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        body.to_owned(),
    )
}

fn url(path: &str) -> String {
    format!("https://{CA_ADDR}:{PORT}{path}")
}

/// Mints an X509-SVID for `spiffe_id` into `dir`: (chain file, key file, serial).
fn mint(ca: &Ca, dir: &Path, spiffe_id: &str) -> (String, String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let out = ca.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        spiffe_id,
        "--ttl",
        "10m",
        "--out-dir",
        &dir.display().to_string(),
    ]);
    let serial = out
        .lines()
        .find_map(|l| l.strip_prefix("Serial: "))
        .unwrap()
        .trim()
        .to_owned();
    (
        dir.join("chain.pem").display().to_string(),
        dir.join("key.pem").display().to_string(),
        serial,
    )
}

#[test]
fn console_refuses_remote_callers_without_an_admin_svid_or_a_token() {
    if let Some(why) = missing_prerequisite(&TOOLS) {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "MESHID_CI is set but the console's remote test cannot run: {why}"
        );
        eprintln!("SKIPPED console_refuses_remote_callers_without_an_admin_svid_or_a_token: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let net = Net::create(&[CA_ADDR], &[("op", WEB_ADDR)], None);
    let config = dir.join("ca.toml");
    std::fs::write(
        &config,
        format!(
            "[console]\naddress = \"{CA_ADDR}:{PORT}\"\nadmins = [\"spiffe://example.org/ops/alice\"]\ntoken_ttl = \"2m\"\n"
        ),
    )
    .unwrap();
    let node = format!("{CA_ADDR}:{NODE_PORT}");
    let ca = net.start_ca(
        dir,
        "s",
        "example.org",
        &node,
        &["--config", &config.display().to_string()],
    );

    // No certificate, no session: the API refuses with the reason; the page loads (it holds no
    // data), with the CSP and HSTS.
    let (code, headers, body) = curl(&net, &[&url("/api/overview")]);
    assert_eq!(code, 401, "{body}");
    assert!(
        body.contains("no client certificate and no session"),
        "{body}"
    );
    let headers = headers.to_lowercase();
    assert!(
        headers.contains("content-security-policy: default-src 'none'"),
        "{headers}"
    );
    for path in [
        "/api/identities",
        "/api/policy",
        "/api/activity",
        "/api/events",
        "/api/agents",
    ] {
        assert_eq!(curl(&net, &[&url(path)]).0, 401, "{path}");
    }
    let (code, headers, body) = curl(&net, &[&url("/")]);
    let headers = headers.to_lowercase();
    assert_eq!(code, 200);
    assert!(
        body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"),
        "{body}"
    );
    assert!(headers.contains("strict-transport-security"), "{headers}");
    assert!(headers.contains("content-security-policy"), "{headers}");

    // A login token opens a session once; the cookie is HttpOnly, Secure and SameSite=Strict.
    let out = ca.ok(&["console", "token"]);
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("Login token: "))
        .unwrap()
        .to_owned();
    assert!(
        out.contains(&format!("Console: https://{CA_ADDR}:{PORT}")),
        "{out}"
    );
    let login = |token: &str| {
        curl(
            &net,
            &[
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
                &format!("{{\"token\":\"{token}\"}}"),
                &url("/api/login"),
            ],
        )
    };
    let (code, headers, body) = login(&token);
    assert_eq!(code, 204, "{body}");
    let cookie_line = headers
        .lines()
        .find(|l| {
            l.to_lowercase()
                .starts_with("set-cookie: __host-meshid_console=")
        })
        .unwrap_or_else(|| panic!("no session cookie: {headers}"));
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie_line.contains(attr), "{cookie_line}");
    }
    let session = cookie_line
        .split_once("__Host-meshid_console=")
        .and_then(|(_, v)| v.split(';').next())
        .unwrap()
        .trim()
        .to_owned();
    assert!(session.starts_with("mcs_"), "{cookie_line}");
    // Over HTTPS the cookie has the __Host- prefix: only this host, over HTTPS, may set it.
    let cookie = format!("__Host-meshid_console={session}");
    let (code, _, body) = curl(
        &net,
        &["-H", &format!("cookie: {cookie}"), &url("/api/overview")],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"trust_domain\":\"example.org\""), "{body}");
    let (code, _, body) = login(&token);
    assert_eq!(code, 401, "a token opens one session: {body}");
    assert!(body.contains("unknown or already used"), "{body}");
    let (code, _, _) = curl(
        &net,
        &[
            "-H",
            "cookie: __Host-meshid_console=mcs_forged",
            &url("/api/overview"),
        ],
    );
    assert_eq!(code, 401);
    // The page learns how it was admitted (and who made the token); logging out ends the
    // session; both are audited.
    let (code, _, body) = curl(
        &net,
        &["-H", &format!("cookie: {cookie}"), &url("/api/session")],
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"via\":\"session\"") && body.contains("admin:uid="),
        "{body}"
    );
    let (code, headers, body) = curl(
        &net,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-H",
            &format!("cookie: {cookie}"),
            "--data",
            "{}",
            &url("/api/logout"),
        ],
    );
    assert_eq!(code, 204, "{body}");
    assert!(headers.contains("Max-Age=0"), "{headers}");
    let (code, _, body) = curl(
        &net,
        &["-H", &format!("cookie: {cookie}"), &url("/api/overview")],
    );
    assert_eq!(code, 401, "a session ends at logout: {body}");
    let audit = ca.ok(&["audit", "list", "--kind", "console.session"]);
    assert!(
        audit.contains("console.session.opened") && audit.contains("console.session.closed"),
        "{audit}"
    );
    assert!(
        !audit.contains(&session),
        "the audit log holds no session secret"
    );
    // A login from another site's page is refused before the token is looked at.
    let (code, _, _) = curl(
        &net,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/x-www-form-urlencoded",
            "--data",
            "token=x",
            &url("/api/login"),
        ],
    );
    assert_eq!(code, 415);

    // An admin's SVID is admitted; another SVID of the trust domain is not.
    let (alice_cert, alice_key, alice_serial) =
        mint(&ca, &dir.join("alice"), "spiffe://example.org/ops/alice");
    let (code, _, body) = curl(
        &net,
        &[
            "--cert",
            &alice_cert,
            "--key",
            &alice_key,
            &url("/api/identities"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    let (_, _, body) = curl(
        &net,
        &[
            "--cert",
            &alice_cert,
            "--key",
            &alice_key,
            &url("/api/session"),
        ],
    );
    assert!(
        body.contains("\"via\":\"admin\"") && body.contains("ops/alice"),
        "{body}"
    );
    // Revoked, the same certificate opens nothing.
    ca.ok(&[
        "svid",
        "revoke",
        "--serial",
        &alice_serial,
        "--reason",
        "laptop lost",
    ]);
    let alice = ["--cert", alice_cert.as_str(), "--key", alice_key.as_str()];
    let (code, _, body) = curl(
        &net,
        &[
            alice[0],
            alice[1],
            alice[2],
            alice[3],
            &url("/api/identities"),
        ],
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("client certificate revoked"), "{body}");
    let (web_cert, web_key, _) = mint(&ca, &dir.join("web"), "spiffe://example.org/web");
    let (code, _, body) = curl(
        &net,
        &[
            "--cert",
            &web_cert,
            "--key",
            &web_key,
            &url("/api/identities"),
        ],
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("not among console.admins"), "{body}");

    // Refusals are logged with their reason; no secret is.
    let log = std::fs::read_to_string(dir.join("s-meshid-ca.log")).unwrap();
    assert!(log.contains("console: request refused"), "{log}");
    assert!(
        log.contains("reason=\"no client certificate and no session\"")
            || log.contains("no client certificate and no session")
    );
    assert!(log.contains("console: login refused"), "{log}");
    for secret in [token.as_str(), session.as_str()] {
        assert!(
            !log.contains(secret),
            "a console secret reached the CA's log"
        );
    }
    let socket = dir.join("ca/admin.sock");
    let audit = ca_cli(
        &socket,
        &["audit", "list", "--kind", "console.token.created"],
    );
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("console.token.created"), "{audit}");
    assert!(!audit.contains(&token), "the audit log holds no token");
}
