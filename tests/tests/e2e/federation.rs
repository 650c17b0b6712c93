//! Federation end to end with the real binaries: two CAs of two trust domains, the home CA
//! fetching the partner's bundle from its https_spiffe bundle endpoint, and an agent handing
//! it to a workload whose entry federates with the partner, as py-spiffe (an independent
//! client) sees it in FetchX509SVID, FetchX509Bundles and FetchJWTBundles. A root prepared in
//! the partner reaches the workload; a workload whose entry does not federate never gets it;
//! deleting the relationship withdraws it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_tests::{free_port, wait_for, Agent, Ca, Proxy};

use crate::proxy::support::{
    inbound, local_addr, outbound, proxy_head, request_once, serial, start_node, wait_ready,
    HttpBackend,
};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/federation.py");

/// What py-spiffe sees of `tds` through the agent at `socket`.
fn seen(python: &Path, socket: &Path, tds: &[&str]) -> serde_json::Value {
    let out = Command::new(python)
        .arg(SCRIPT)
        .arg(socket)
        .args(tds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "federation.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// ValidateJWTSVID through py-spiffe: `ok SPIFFE_ID` or `refused REASON`.
fn validate(python: &Path, socket: &Path, token: &str) -> String {
    let out = Command::new(python)
        .arg(SCRIPT)
        .arg("validate")
        .arg(socket)
        .args([token, "web"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "federation.py validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// SHA-256 fingerprints of the roots `ca` publishes, sorted.
fn roots(ca: &Ca) -> serde_json::Value {
    use sha2::Digest as _;
    let pem = ca.ok(&["bundle", "show", "--format", "pem"]);
    let mut prints: Vec<String> = pem
        .split("-----END CERTIFICATE-----")
        .filter_map(|block| {
            let b64: String = block
                .lines()
                .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
                .collect();
            (!b64.is_empty()).then(|| {
                use base64::Engine as _;
                let der = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                hex::encode(sha2::Sha256::digest(der))
            })
        })
        .collect();
    prints.sort();
    serde_json::json!(prints)
}

#[test]
fn a_workload_gets_the_bundle_of_a_federated_trust_domain_and_loses_it_with_the_relationship() {
    let Some(python) = meshid_tests::interop_python("spiffe, cryptography") else {
        return;
    };
    let base = tempfile::tempdir().unwrap();
    let (home_dir, partner_dir): (PathBuf, PathBuf) =
        (base.path().join("home"), base.path().join("partner"));
    std::fs::create_dir_all(&home_dir).unwrap();
    std::fs::create_dir_all(&partner_dir).unwrap();
    let endpoint = free_port();
    let config = partner_dir.join("federation.toml");
    std::fs::write(
        &config,
        format!(
            "[ca]\nbundle_refresh_hint = \"1s\"\n\n[federation]\n\
             bundle_endpoint_address = \"127.0.0.1:{endpoint}\"\n"
        ),
    )
    .unwrap();
    let partner = Ca::start_domain(
        &partner_dir,
        "partner.org",
        &["--config", config.to_str().unwrap()],
    );
    let home = Ca::start(&home_dir, &[]);

    let bundle_file = base.path().join("partner.json");
    std::fs::write(
        &bundle_file,
        partner.ok(&["bundle", "show", "--format", "spiffe"]),
    )
    .unwrap();
    home.ok(&[
        "federation",
        "create",
        "--trust-domain",
        "partner.org",
        "--endpoint-url",
        &format!("https://127.0.0.1:{endpoint}"),
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://partner.org/meshid/server",
        "--bundle-file",
        bundle_file.to_str().unwrap(),
    ]);

    let (token, agent_id) = home.join_token();
    let agent = Agent::start(&home_dir, &home, &token);
    // An entry that does not federate: the workload gets no partner bundle.
    home.entry_for_this_uid("web", "spiffe://example.org/web", &agent_id, &[]);
    let both = ["example.org", "partner.org"];
    let s = wait_for(Duration::from_secs(15), "the workload's SVID", || {
        let out = Command::new(&python)
            .arg(SCRIPT)
            .arg(&agent.socket)
            .args(both)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    });
    assert_eq!(s["example.org"]["context"], roots(&home), "{s}");
    assert_eq!(s["partner.org"]["context"], serde_json::Value::Null, "{s}");
    assert_eq!(s["partner.org"]["bundles"], serde_json::Value::Null, "{s}");
    assert_eq!(s["partner.org"]["jwt"], serde_json::Value::Null, "{s}");

    // Federating with partner.org: its bundle, as the partner publishes it, in all three.
    home.ok(&["entry", "update", "web", "--federates-with", "partner.org"]);
    let want = roots(&partner);
    let s = wait_for(
        Duration::from_secs(10),
        "the partner bundle at the workload",
        || {
            let s = seen(&python, &agent.socket, &both);
            (s["partner.org"]["context"] == want).then_some(s)
        },
    );
    assert_eq!(s["partner.org"]["bundles"], want, "{s}");
    assert!(
        !s["partner.org"]["jwt"].as_array().unwrap().is_empty(),
        "the partner's JWT authorities: {s}"
    );
    assert_eq!(s["example.org"]["context"], roots(&home), "{s}");

    // A next root prepared in the partner reaches the workload within seconds (refresh hint
    // 1 s at the home CA, then pushed to the agent and the open streams).
    partner.ok(&["ca", "root", "prepare", "--reason", "rotation"]);
    let want = roots(&partner);
    assert_eq!(want.as_array().unwrap().len(), 2);
    wait_for(
        Duration::from_secs(10),
        "the partner's next root at the workload",
        || {
            let s = seen(&python, &agent.socket, &both);
            (s["partner.org"]["bundles"] == want && s["partner.org"]["context"] == want)
                .then_some(())
        },
    );

    // A JWT-SVID of the partner validates at our agent (ValidateJWTSVID with the federated
    // JWT authorities).
    let token = partner
        .ok(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://partner.org/batch",
            "--audience",
            "web",
        ])
        .trim()
        .to_owned();
    assert_eq!(
        validate(&python, &agent.socket, &token),
        "ok spiffe://partner.org/batch"
    );

    // The relationship deleted: the bundle is withdrawn, and the partner's tokens refused.
    home.ok(&[
        "federation",
        "delete",
        "partner.org",
        "--reason",
        "offboarding",
    ]);
    wait_for(
        Duration::from_secs(5),
        "the partner bundle withdrawn",
        || {
            let s = seen(&python, &agent.socket, &both);
            (s["partner.org"]["context"].is_null() && s["partner.org"]["bundles"].is_null())
                .then_some(())
        },
    );
    let refused = validate(&python, &agent.socket, &token);
    assert!(refused.starts_with("refused"), "{refused}");
}

/// A test Web PKI in `dir` (`web-ca.pem`, and `web.pem`/`web.key` for localhost and
/// 127.0.0.1), made with openssl by `tests/interop/web-pki.sh`.
fn web_pki(dir: &Path) {
    let out = Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/interop/web-pki.sh"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "web-pki.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Requests through `addr` until `stop`, counting successes and keeping what failed.
fn traffic(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            match request_once(&addr, "GET", "/v1/orders") {
                Ok(r) if r.status == 200 => ok += 1,
                Ok(r) => failed.push(format!("status {}: {}", r.status, r.body)),
                Err(e) => failed.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok, failed)
    })
}

/// Two trust domains, each with its CA, agent and proxy: example.org's web calls
/// partner.org's api through the proxies, each side verifying the other with the bundle its
/// CA fetched from the other's endpoint (partner's over https_web, ours over https_spiffe).
/// Before the relationships the call fails; a root rotation in partner.org reaches example.org's
/// workload within seconds and no request fails across it; deleting the relationship makes the
/// next connection fail.
#[test]
fn proxies_of_two_trust_domains_call_each_other_across_a_root_rotation() {
    let Some(python) = meshid_tests::interop_python("spiffe, cryptography") else {
        return;
    };
    let _serial = serial();
    let base = tempfile::tempdir().unwrap();
    let (home_dir, partner_dir) = (base.path().join("home"), base.path().join("partner"));
    std::fs::create_dir_all(&home_dir).unwrap();
    std::fs::create_dir_all(&partner_dir).unwrap();
    web_pki(base.path());
    let (home_endpoint, partner_endpoint) = (free_port(), free_port());
    let home_config = home_dir.join("federation.toml");
    std::fs::write(
        &home_config,
        format!(
            "[ca]\nbundle_refresh_hint = \"1s\"\n\n[federation]\n\
             bundle_endpoint_address = \"127.0.0.1:{home_endpoint}\"\nweb_roots_file = \"{}\"\n",
            base.path().join("web-ca.pem").display()
        ),
    )
    .unwrap();
    let partner_config = partner_dir.join("federation.toml");
    std::fs::write(
        &partner_config,
        format!(
            "[ca]\nbundle_refresh_hint = \"4s\"\n\n[federation]\n\
             bundle_endpoint_address = \"127.0.0.1:{partner_endpoint}\"\n\
             bundle_endpoint_profile = \"https_web\"\nbundle_endpoint_cert_file = \"{}\"\n\
             bundle_endpoint_key_file = \"{}\"\n",
            base.path().join("web.pem").display(),
            base.path().join("web.key").display()
        ),
    )
    .unwrap();
    let home = Ca::start(&home_dir, &["--config", home_config.to_str().unwrap()]);
    let partner = Ca::start_domain(
        &partner_dir,
        "partner.org",
        &["--config", partner_config.to_str().unwrap()],
    );

    let (ht, pt) = (home.join_token(), partner.join_token());
    home.entry_for_this_uid(
        "web",
        "spiffe://example.org/web",
        &ht.1,
        &["--federates-with", "partner.org"],
    );
    partner.entry_for_this_uid(
        "api",
        "spiffe://partner.org/api",
        &pt.1,
        &["--federates-with", "example.org"],
    );
    let home_node = start_node(&home_dir, "node", &home, ht);
    let partner_node = start_node(&partner_dir, "node", &partner, pt);
    let backend = HttpBackend::start();
    let policy = partner_dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "name: partner\ndefault: deny\nrules:\n  - name: home-web\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://partner.org/api\"]\n",
    )
    .unwrap();
    let (api_in, web_out) = (local_addr(), local_addr());
    let mut api = Proxy::start(
        &partner_dir,
        "api",
        &(proxy_head(
            &partner_dir,
            "api",
            &partner_node,
            "spiffe://partner.org/api",
            Some(&policy),
            "federated_trust_domains = [\"example.org\"]\n",
        ) + &inbound("api-in", &api_in, backend.addr(), 8080, "http")),
    );
    let mut web = Proxy::start(
        &home_dir,
        "web",
        &(proxy_head(
            &home_dir,
            "web",
            &home_node,
            "spiffe://example.org/web",
            None,
            "federated_trust_domains = [\"partner.org\"]\n",
        ) + &outbound("to-api", &web_out, &api_in, "spiffe://partner.org/api")),
    );
    wait_ready(&mut [&mut api, &mut web]);

    // No federation yet: neither side can verify the other.
    assert!(
        !request_once(&web_out, "GET", "/v1/orders").is_ok_and(|r| r.status == 200),
        "a call across trust domains succeeded without federation"
    );

    // Federated both ways: partner's bundle over https_web, ours over https_spiffe.
    home.ok(&[
        "federation",
        "create",
        "--trust-domain",
        "partner.org",
        "--endpoint-url",
        &format!("https://localhost:{partner_endpoint}"),
        "--profile",
        "https_web",
    ]);
    let home_bundle = base.path().join("home.json");
    std::fs::write(
        &home_bundle,
        home.ok(&["bundle", "show", "--format", "spiffe"]),
    )
    .unwrap();
    partner.ok(&[
        "federation",
        "create",
        "--trust-domain",
        "example.org",
        "--endpoint-url",
        &format!("https://127.0.0.1:{home_endpoint}"),
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        "spiffe://example.org/meshid/server",
        "--bundle-file",
        home_bundle.to_str().unwrap(),
    ]);
    wait_for(
        Duration::from_secs(15),
        "a call across the trust domains",
        || {
            request_once(&web_out, "GET", "/v1/orders")
                .ok()
                .filter(|r| r.status == 200)
        },
    );

    // A root rotation in partner.org under traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(web_out.clone(), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(500));
    let prepared = Instant::now();
    partner.ok(&["ca", "root", "prepare", "--reason", "yearly"]);
    let want = roots(&partner);
    assert_eq!(want.as_array().unwrap().len(), 2);
    wait_for(
        Duration::from_secs(10),
        "partner's next root at our workload",
        || {
            let s = seen(&python, &home_node.agent.socket, &["partner.org"]);
            (s["partner.org"]["context"] == want).then_some(())
        },
    );
    let reached = prepared.elapsed();
    eprintln!(
        "partner's next root reached example.org's workload in {reached:?} (refresh hint 4 s)"
    );
    assert!(
        reached < Duration::from_secs(4),
        "not within partner's refresh hint: {reached:?}"
    );
    wait_for(Duration::from_secs(20), "partner's root activation", || {
        meshid_tests::ca_cli(
            &partner.socket,
            &["ca", "root", "activate", "--reason", "yearly"],
        )
        .status
        .success()
        .then_some(())
    });
    // api's SVID re-issued under the new root; web keeps calling it.
    let before = api.metric("meshid_proxy_svid_rotations_total", &[]);
    partner.ok(&["entry", "rotate", "api", "--reason", "new root"]);
    wait_for(Duration::from_secs(15), "api's new SVID", || {
        (api.metric("meshid_proxy_svid_rotations_total", &[]) > before).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert!(ok > 20, "only {ok} requests");

    // The relationship deleted: the next connection fails.
    home.ok(&[
        "federation",
        "delete",
        "partner.org",
        "--reason",
        "offboarding",
    ]);
    wait_for(
        Duration::from_secs(5),
        "calls to fail without the relationship",
        || {
            (!request_once(&web_out, "GET", "/v1/orders").is_ok_and(|r| r.status == 200))
                .then_some(())
        },
    );
    drop((web, api));
}

/// An independent OIDC relying party (PyJWT's PyJWKClient, from the issuer URL alone: the
/// discovery document over HTTPS, then its JWKS) verifies a JWT-SVID the CA minted (with
/// `iss`, `iat` and `kid`), and refuses one signed by another CA's key, which its JWKS does
/// not hold.
#[test]
fn an_oidc_relying_party_verifies_jwt_svids_by_discovery() {
    let Some(python) = meshid_tests::interop_python("jwt, cryptography") else {
        return;
    };
    let base = tempfile::tempdir().unwrap();
    let (home_dir, other_dir) = (base.path().join("home"), base.path().join("other"));
    std::fs::create_dir_all(&home_dir).unwrap();
    std::fs::create_dir_all(&other_dir).unwrap();
    web_pki(base.path());
    let port = free_port();
    let issuer = format!("https://localhost:{port}");
    let config = home_dir.join("oidc.toml");
    let configure = |key_type: &str, max_ttl: &str| {
        std::fs::write(
            &config,
            format!(
                "[ca]\njwt_issuer = \"{issuer}\"\njwt_key_type = \"{key_type}\"\n\
                 default_jwt_svid_ttl = \"{max_ttl}\"\nmax_jwt_svid_ttl = \"{max_ttl}\"\n\n[federation]\n\
                 bundle_endpoint_address = \"127.0.0.1:{port}\"\nbundle_endpoint_profile = \"https_web\"\n\
                 bundle_endpoint_cert_file = \"{}\"\nbundle_endpoint_key_file = \"{}\"\n",
                base.path().join("web.pem").display(),
                base.path().join("web.key").display()
            ),
        )
        .unwrap();
    };
    configure("ec-p256", "5m");
    let mut home = Ca::start(&home_dir, &["--config", config.to_str().unwrap()]);
    let other = Ca::start(&other_dir, &[]);
    let mint = |ca: &Ca| {
        ca.ok(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/ci/deploy",
            "--audience",
            "sts.amazonaws.com",
        ])
        .trim()
        .to_owned()
    };
    // (Whether the relying party's run passed, and what it printed.)
    let try_relying_party = |tokens: &[&str]| {
        let out = Command::new(&python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/interop/oidc.py"))
            .args([
                &issuer,
                base.path().join("web-ca.pem").to_str().unwrap(),
                "sts.amazonaws.com",
            ])
            .args(tokens)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.success(),
            said,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let relying_party = |tokens: &[&str]| {
        let (passed, said, errors) = try_relying_party(tokens);
        assert!(passed, "{said}{errors}");
        said
    };
    let alg = |token: &str| {
        use base64::Engine as _;
        let header = token.split('.').next().unwrap();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap();
        let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
        (
            header["alg"].as_str().unwrap().to_owned(),
            header["kid"].as_str().unwrap().to_owned(),
        )
    };
    let (token, foreign) = (mint(&home), mint(&other));
    let said = relying_party(&[&token, &foreign]);
    let claims: serde_json::Value =
        serde_json::from_str(said.lines().next().unwrap().strip_prefix("ok ").unwrap()).unwrap();
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["sub"], "spiffe://example.org/ci/deploy");
    assert!(claims["iat"].is_i64(), "{claims}");
    assert!(
        said.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("refused ")),
        "{said}"
    );

    // RS256 for relying parties that accept only RS256: the next JWT key is RSA (here at once,
    // by tainting the active one); both keys are published while ES256 tokens may live, and
    // the relying party verifies tokens of either.
    let (es, es_kid) = alg(&token);
    assert_eq!(es, "ES256");
    home.proc.stop();
    configure("rsa-2048", "5m");
    home.restart();
    home.ok(&[
        "ca",
        "taint",
        &format!("jwt-{es_kid}"),
        "--reason",
        "move to RS256",
    ]);
    let rs_token = mint(&home);
    assert_eq!(alg(&rs_token).0, "RS256");
    for t in [&rs_token, &token] {
        let said = relying_party(&[t]);
        assert!(said.starts_with("ok "), "{said}");
    }

    // The operator caps JWT-SVIDs at 3 s: the retired ES256 key leaves the JWKS (no token it
    // may still vouch for under the new cap), and the relying party, fetching the JWKS again,
    // refuses the ES256 token for its key, while the RS256 one still verifies.
    home.proc.stop();
    configure("rsa-2048", "3s");
    home.restart();
    let said = wait_for(
        Duration::from_secs(15),
        "the ES256 key gone from the JWKS",
        || {
            let (passed, said, _) = try_relying_party(&[&rs_token, &token]);
            let refused = said
                .lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("refused PyJWKClientError"));
            (passed && refused).then_some(said)
        },
    );
    assert!(said.starts_with("ok "), "{said}");
}
