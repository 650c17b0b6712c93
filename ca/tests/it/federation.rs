//! Federation between real `meshid-ca` processes: bundle endpoints in both profiles, checked
//! by independent TLS clients (curl, openssl), relationships made with the CLI, bundles
//! refreshed at the endpoint's hint, kept when the endpoint is away, and deleted with the
//! relationship; and between two CA servers sharing PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshid_ca::service::CaEvent;

use crate::authority::{ca_on, db};
use crate::cli::{free_port, json, Server};

/// One CA of the test, with its ports.
struct Domain {
    server: Server,
    dir: PathBuf,
    endpoint: u16,
}

/// Starts a CA of `td` serving its bundle endpoint (profile by `federation`, extra TOML lines
/// for `[federation]`) with a refresh hint of 1 s.
fn start(base: &Path, td: &str, federation: &str) -> Domain {
    let dir = base.join(td);
    std::fs::create_dir_all(&dir).unwrap();
    let ops = format!("127.0.0.1:{}", free_port());
    let endpoint = free_port();
    let socket = dir.join("data/admin.sock");
    let config = dir.join("ca.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{td}\"\ndata_dir = \"{}\"\nops_address = \"{ops}\"\n\
             node_address = \"127.0.0.1:{}\"\n\n[ca]\nbundle_refresh_hint = \"1s\"\n\n\
             [federation]\nbundle_endpoint_address = \"127.0.0.1:{endpoint}\"\n{federation}\n",
            dir.join("data").display(),
            free_port()
        ),
    )
    .unwrap();
    let server = Server::with_config(&dir, &config, &ops, &socket);
    Domain {
        server,
        dir,
        endpoint,
    }
}

/// A test Web PKI in `dir` (`web-ca.pem`, and `web.pem`/`web.key` for localhost and
/// 127.0.0.1), made with openssl by `tests/interop/web-pki.sh`.
pub(crate) fn web_pki(dir: &Path) {
    let out = Command::new("sh")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/interop/web-pki.sh"
        ))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "web-pki.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `federation create` of an https_spiffe relationship with partner.org at `endpoint`, whose
/// endpoint must present `id`, bootstrapped with `bundle`.
fn federate_spiffe(ca: &Server, endpoint: &str, id: &str, bundle: &Path) {
    let bundle = bundle.to_str().unwrap();
    ca.ok(&[
        "federation",
        "create",
        "--trust-domain",
        "partner.org",
        "--endpoint-url",
        endpoint,
        "--profile",
        "https_spiffe",
        "--endpoint-spiffe-id",
        id,
        "--bundle-file",
        bundle,
    ]);
}

/// Waits until `td`'s relationship has fetched once; returns it.
fn fetched(ca: &Server, td: &str) -> serde_json::Value {
    json(&wait_for(
        &format!("the first fetch from {td}"),
        Duration::from_secs(10),
        || {
            let s = show(ca, td);
            (s["refresh"]["last_success"].as_i64() > Some(0)).then(|| s.to_string())
        },
    ))
}

/// Waits until `td`'s relationship shows a refresh error; returns it.
fn refresh_error(ca: &Server, td: &str) -> String {
    wait_for(
        &format!("a failed refresh from {td}"),
        Duration::from_secs(10),
        || {
            let e = show(ca, td)["refresh"]["last_error"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            (!e.is_empty()).then_some(e)
        },
    )
}

fn show(ca: &Server, td: &str) -> serde_json::Value {
    json(&ca.ok(&["federation", "show", td, "--output", "json"]))
}

fn sequence(ca: &Server) -> u64 {
    let bundle = json(&ca.ok(&["bundle", "show", "--format", "spiffe"]));
    bundle["spiffe_sequence"].as_u64().unwrap()
}

#[test]
fn federated_bundles_are_fetched_refreshed_kept_and_deleted() {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    web_pki(base);
    let mut partner = start(base, "partner.org", "");
    let web = start(
        base,
        "web.org",
        &format!(
            "bundle_endpoint_profile = \"https_web\"\nbundle_endpoint_cert_file = \"{}\"\n\
             bundle_endpoint_key_file = \"{}\"",
            base.join("web.pem").display(),
            base.join("web.key").display()
        ),
    );
    let home = start(
        base,
        "example.org",
        &format!("web_roots_file = \"{}\"", base.join("web-ca.pem").display()),
    );
    let ca = &home.server;

    // Independent clients read both endpoints: curl over Web PKI, openssl against partner's
    // own root (the endpoint presents the CA server's SVID, which names no host).
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(base.join("web-ca.pem"))
        .arg(format!("https://localhost:{}/", web.endpoint))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(doc["spiffe_refresh_hint"], 1);
    assert!(doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["use"] == "x509-svid"));
    let partner_pem = partner.dir.join("root.pem");
    std::fs::write(
        &partner_pem,
        partner.server.ok(&["bundle", "show", "--format", "pem"]),
    )
    .unwrap();
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", partner.endpoint),
        ])
        .args([
            "-CAfile",
            partner_pem.to_str().unwrap(),
            "-verify_return_error",
            "-brief",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Verification: OK"), "{said}");
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-k"])
        .arg(format!("https://127.0.0.1:{}/nothing", partner.endpoint))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // Refused relationships say why and change nothing.
    let bundle_file = base.join("partner-bundle.json");
    std::fs::write(
        &bundle_file,
        partner.server.ok(&["bundle", "show", "--format", "spiffe"]),
    )
    .unwrap();
    let endpoint = format!("https://127.0.0.1:{}", partner.endpoint);
    for (args, says) in [
        (
            vec![
                "--trust-domain",
                "example.org",
                "--endpoint-url",
                &endpoint,
                "--profile",
                "https_web",
            ],
            "own trust domain",
        ),
        (
            vec![
                "--trust-domain",
                "partner.org",
                "--endpoint-url",
                "http://127.0.0.1:1",
                "--profile",
                "https_web",
            ],
            "https://",
        ),
        (
            vec![
                "--trust-domain",
                "partner.org",
                "--endpoint-url",
                &endpoint,
                "--profile",
                "https_spiffe",
                "--endpoint-spiffe-id",
                "spiffe://partner.org/meshid/server",
            ],
            "bootstrap_bundle",
        ),
    ] {
        let mut all = vec!["federation", "create"];
        all.extend(args);
        let err = ca.fails(&all);
        assert!(err.contains(says), "{all:?}: {err}");
    }
    assert_eq!(
        json(&ca.ok(&["federation", "list", "--output", "json"])),
        serde_json::json!([])
    );

    // https_spiffe, bootstrapped with partner's bundle: fetched at once.
    federate_spiffe(
        ca,
        &endpoint,
        "spiffe://partner.org/meshid/server",
        &bundle_file,
    );
    fetched(ca, "partner.org");
    // https_web, verified against the configured roots.
    ca.ok(&[
        "federation",
        "create",
        "--trust-domain",
        "web.org",
        "--endpoint-url",
        &format!("https://localhost:{}", web.endpoint),
        "--profile",
        "https_web",
    ]);
    let s = fetched(ca, "web.org");
    assert_eq!(
        s["bundle"]["sequence"].as_u64(),
        Some(sequence(&web.server))
    );
    assert!(s["bundle"]["x509_authorities"].as_u64() >= Some(1), "{s}");
    assert_eq!(s["refresh"]["last_error"], "");

    // A change of partner's bundle (a next root prepared) reaches this CA within its hint.
    partner
        .server
        .ok(&["ca", "root", "prepare", "--reason", "yearly"]);
    let want = sequence(&partner.server);
    wait_for("partner's new bundle", Duration::from_secs(5), || {
        let s = show(ca, "partner.org");
        (s["bundle"]["sequence"].as_u64() == Some(want)).then(String::new)
    });
    let audit = ca.ok(&["audit", "list", "--kind", "federation.", "--output", "json"]);
    for kind in ["federation.created", "federation.bundle.updated"] {
        assert!(audit.contains(kind), "{audit}");
    }

    // partner's endpoint goes away: the last good bundle stays, the error is shown and counted.
    let kept = show(ca, "partner.org")["bundle"].clone();
    partner.server.stop();
    let s = refresh_error(ca, "partner.org");
    assert!(s.contains("cannot connect"), "{s}");
    assert_eq!(show(ca, "partner.org")["bundle"], kept);
    let (_, metrics) = ca.http_get("/metrics");
    assert!(
        metrics.contains("meshid_ca_federation_bundle_refreshes_total{trust_domain=\"partner.org\",result=\"error\"}"),
        "{metrics}"
    );

    // An endpoint that presents another SPIFFE ID than the relationship names is refused,
    // and the bootstrap bundle stays the one held.
    partner = start(base, "partner.org", "");
    ca.ok(&[
        "federation",
        "delete",
        "partner.org",
        "--reason",
        "re-create",
    ]);
    let endpoint = format!("https://127.0.0.1:{}", partner.endpoint);
    federate_spiffe(
        ca,
        &endpoint,
        "spiffe://partner.org/not-the-server",
        &bundle_file,
    );
    let e = refresh_error(ca, "partner.org");
    assert!(e.contains("TLS handshake"), "{e}");
    assert_eq!(show(ca, "partner.org")["refresh"]["last_success"], 0);

    // Deleted: gone from the list and from the bundles held.
    ca.ok(&[
        "federation",
        "delete",
        "partner.org",
        "--reason",
        "offboarding",
    ]);
    ca.fails(&["federation", "show", "partner.org"]);
    let list = json(&ca.ok(&["federation", "list", "--output", "json"]));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["trust_domain"], "web.org");
    // Declared in a mesh file instead: planned, applied, owned.
    let mesh = base.join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "owner: ops\nfederations:\n  - trust_domain: partner.org\n    endpoint_url: {endpoint}\n\
             \x20   profile: https_spiffe\n    endpoint_spiffe_id: spiffe://partner.org/meshid/server\n\
             \x20   bundle_file: partner-bundle.json\n"
        ),
    )
    .unwrap();
    let plan = json(&ca.ok(&["plan", "-f", mesh.to_str().unwrap(), "--output", "json"]));
    assert_eq!(plan["changes"][0]["kind"], "federation", "{plan}");
    assert_eq!(plan["changes"][0]["action"], "create", "{plan}");
    assert_eq!(
        plan["changes"][0]["declared_at"],
        format!("{}:3:5", mesh.display())
    );
    ca.ok(&["apply", "-f", mesh.to_str().unwrap()]);
    assert_eq!(fetched(ca, "partner.org")["owner"], "ops");
    let again = json(&ca.ok(&["plan", "-f", mesh.to_str().unwrap(), "--output", "json"]));
    assert_eq!(again["changed"], false, "{again}");
    let log = std::fs::read_to_string(&home.server.log).unwrap();
    assert!(!log.contains("PRIVATE KEY"), "a key in the log");
}

/// A bundle of partner.org with one self-signed root (made with rcgen).
pub(crate) fn partner_bundle() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).unwrap();
    meshid_ca::bundle::TrustBundle {
        trust_domain: spiffe::TrustDomain::new("partner.org").unwrap(),
        x509_authorities: vec![cert.der().clone()],
        jwt_authorities: Vec::new(),
        sequence: 7,
        refresh_hint: Duration::from_secs(60),
    }
    .to_spiffe_json()
}

/// A relationship made on one CA server of a PostgreSQL trust domain is in force on the other
/// within a second or two (its refresher reads the relationships and bundles every second) and
/// announced to its agents; deleted, it is withdrawn there too.
#[tokio::test]
async fn a_federation_made_on_one_server_reaches_the_other() {
    let Some(db) = db(true).await else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca1 = ca_on(&db.url, "ca-1", d1.path()).await;
    let ca2 = ca_on(&db.url, "ca-2", d2.path()).await;
    let mut events = ca2.events.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let refresher = tokio::spawn(meshid_ca::federation::refresh::refresh_loop(
        ca2.clone(),
        meshid_ca::federation::fetch::WebRoots::none(),
        stop_rx,
    ));
    ca1.create_federation(
        meshid_ca::service::federation::FederationSpec {
            trust_domain: "partner.org".into(),
            // Nothing listens there: the bootstrap bundle stays the one in force.
            endpoint_url: "https://127.0.0.1:9".into(),
            profile: "https_spiffe".into(),
            endpoint_spiffe_id: "spiffe://partner.org/meshid/server".into(),
            bootstrap_bundle: partner_bundle(),
            reason: "onboarding".into(),
        },
        "admin:uid=1000,pid=1",
    )
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let announced = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Ok(CaEvent::FederationChanged) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(
        announced.is_ok(),
        "ca-2 did not announce the new federated bundle"
    );
    assert!(ca2.federation.bundles().contains_key("partner.org"));
    eprintln!("in force on ca-2 after {:?}", started.elapsed());
    // The first fetch fails (nothing listens): ca-2 says so and keeps the bundle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ca2.federation.status("partner.org").last_error.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh error on ca-2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ca2.federation.bundles().contains_key("partner.org"));

    ca1.delete_federation("partner.org", "offboarding", "admin:uid=1000,pid=1")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while ca2.federation.bundles().contains_key("partner.org") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ca-2 still holds the bundle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(true).unwrap();
    refresher.await.unwrap();
}
