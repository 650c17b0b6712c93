//! End-to-end tests of the real `meshid-ca` binary: the server and the operator CLI, as an
//! operator uses them, over the admin socket and the ops HTTP port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::pg;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_meshid-ca");

/// A running CA; killed on drop so a failing test leaves nothing behind.
pub(crate) struct Server {
    child: Option<Child>,
    pub(crate) log: PathBuf,
    socket: PathBuf,
    pub(crate) ops: String,
}

pub(crate) use meshid_tests::free_port;

impl Server {
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> Server {
        let ops = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = ["run", "--trust-domain", "example.org", "--data-dir"]
            .map(String::from)
            .into();
        args.push(dir.join("data").display().to_string());
        args.extend(["--ops-address".into(), ops.clone()]);
        args.extend([
            "--node-address".into(),
            format!("127.0.0.1:{}", free_port()),
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::spawn(dir, &args, ops, dir.join("data/admin.sock"))
    }

    /// `meshid-ca run --config CONFIG`, whose ops listener is `ops` and admin socket `socket`.
    pub(crate) fn with_config(dir: &Path, config: &Path, ops: &str, socket: &Path) -> Server {
        let args = [
            "run".to_owned(),
            "--config".into(),
            config.display().to_string(),
        ];
        Self::spawn(dir, &args, ops.to_owned(), socket.to_owned())
    }

    fn spawn(dir: &Path, args: &[String], ops: String, socket: PathBuf) -> Server {
        let log = dir.join(format!(
            "ca-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(BIN)
            .args(args)
            .env("MESHID_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Server {
            child: Some(child),
            log,
            socket,
            ops,
        };
        s.wait_healthy();
        s
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(BIN)
                .args(["healthcheck", "--ops-address", &self.ops])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "meshid-ca exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "CA not healthy in time: {}",
                std::fs::read_to_string(&self.log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "meshid-ca {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub(crate) fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "meshid-ca {args:?} unexpectedly succeeded"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub(crate) fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.ops).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    /// SIGTERM, then wait for a clean exit; returns the log.
    pub(crate) fn stop(&mut self) -> String {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "meshid-ca exited with {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "meshid-ca did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

pub(crate) fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn operator_workflow_restart_and_no_secrets_in_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut ca = Server::start(dir, &[]);
    let data = dir.join("data");

    // Files and socket are private.
    assert_eq!(mode(&ca.socket), 0o600, "admin socket mode");
    assert_eq!(mode(&data), 0o700, "data dir mode");
    assert_eq!(mode(&data.join("keys")), 0o700, "key dir mode");
    let key_files: Vec<_> = std::fs::read_dir(data.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        key_files.len() >= 3,
        "root, intermediate and JWT keys: {key_files:?}"
    );
    for k in &key_files {
        assert_eq!(mode(k), 0o600, "{}", k.display());
    }
    assert_eq!(mode(&data.join("meshid-ca.db")), 0o600);

    // Entries.
    let uid = "unix:uid:1000";
    let created = json(&ca.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/meshid/agent/n1",
        "--selector",
        uid,
        "--selector",
        "unix:gid:1000",
        "--x509-ttl",
        "10m",
        "--dns-name",
        "web.example.org",
        "--output",
        "json",
    ]));
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["revision"], 1);
    assert_eq!(created["x509_svid_ttl"], 600);
    let listed = json(&ca.ok(&["entry", "list", "--output", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let text = ca.ok(&["entry", "show", &id]);
    assert!(
        text.contains("spiffe://example.org/web") && text.contains("unix:gid:1000"),
        "{text}"
    );
    let updated = json(&ca.ok(&[
        "entry", "update", &id, "--hint", "primary", "--output", "json",
    ]));
    assert_eq!(updated["revision"], 2);
    assert_eq!(updated["hint"], "primary");
    assert_eq!(
        updated["dns_names"][0], "web.example.org",
        "unchanged fields kept"
    );

    // Bad input: clear errors, nothing changes.
    for (args, expect) in [
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a/",
                "--parent-id",
                "spiffe://example.org/p",
                "--selector",
                uid,
            ],
            "invalid spiffe_id",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://other.org/a",
                "--parent-id",
                "spiffe://example.org/p",
                "--selector",
                uid,
            ],
            "not in trust domain",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                "spiffe://example.org/p",
                "--selector",
                "unix:uid",
            ],
            "invalid selector",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                "spiffe://example.org/p",
                "--selector",
                uid,
                "--x509-ttl",
                "30d",
            ],
            "out of range",
        ),
        (vec!["entry", "show", "doesnotexist"], "not found"),
        (vec!["entry", "delete", "doesnotexist"], "not found"),
        (
            vec!["x509", "mint", "--spiffe-id", "spiffe://other.org/x"],
            "not in trust domain",
        ),
        (
            vec![
                "jwt",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--audience",
                "",
            ],
            "audience",
        ),
    ] {
        let err = ca.fails(&args);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert_eq!(
        json(&ca.ok(&["entry", "list", "--output", "json"]))
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Token, bundle, mints.
    let tok = ca.ok(&["token", "generate", "--ttl", "5m"]);
    let secret = tok
        .lines()
        .find_map(|l| l.strip_prefix("Token: "))
        .unwrap()
        .to_owned();
    assert!(secret.len() >= 40);
    let pem = ca.ok(&["bundle", "show"]);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let spiffe = json(&ca.ok(&["bundle", "show", "--format", "spiffe"]));
    let uses: Vec<_> = spiffe["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["use"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        uses.contains(&"x509-svid".to_owned()) && uses.contains(&"jwt-svid".to_owned()),
        "{spiffe}"
    );
    let out = dir.join("svid");
    ca.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/debug",
        "--ttl",
        "5m",
        "--dns-name",
        "debug.local",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out.join("bundle.pem"))
        .arg("-untrusted")
        .arg(out.join("chain.pem"))
        .arg(out.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let jwt = ca
        .ok(&[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--audience",
            "billing",
        ])
        .trim()
        .to_owned();
    assert_eq!(jwt.split('.').count(), 3);

    // Status, health, metrics.
    let status = json(&ca.ok(&["ca", "status", "--output", "json"]));
    let active: Vec<_> = status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["state"] == "active")
        .map(|k| k["kind"].as_str().unwrap().to_owned())
        .collect();
    for kind in ["x509_root", "x509_intermediate", "jwt"] {
        assert!(active.contains(&kind.to_owned()), "{status}");
    }
    assert_eq!(ca.http_get("/healthz").0, 200);
    assert_eq!(ca.http_get("/readyz").0, 200);
    let (code, metrics) = ca.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("meshid_ca_svids_signed_total{kind=\"x509\",result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshid_ca_intermediate_expiry_timestamp_seconds"),
        "{metrics}"
    );
    assert_eq!(ca.http_get("/nope").0, 404);

    // Audit log: entry create, update, token, mints, key creation.
    let verified = ca.ok(&["audit", "verify"]);
    assert!(verified.contains("audit log OK"), "{verified}");
    let records_before: u64 = verified
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap();
    let bundle_before = pem.clone();
    // The records themselves: oldest first, by kind prefix, paged, as text or JSON lines.
    let lines = |out: String| -> Vec<serde_json::Value> {
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let all = lines(ca.ok(&["audit", "list", "--limit", "1000", "--output", "json"]));
    assert!(all.len() as u64 >= records_before, "{all:?}");
    assert!(all
        .windows(2)
        .all(|w| w[0]["seq"].as_i64() < w[1]["seq"].as_i64()));
    let entries = lines(ca.ok(&["audit", "list", "--kind", "entry.", "--output", "json"]));
    assert!(!entries.is_empty());
    assert!(entries
        .iter()
        .all(|r| r["kind"].as_str().unwrap().starts_with("entry.")));
    assert!(
        entries
            .iter()
            .any(|r| r["details"]["entry_id"] == id.as_str()),
        "{entries:?}"
    );
    let page = lines(ca.ok(&[
        "audit", "list", "--after", "1", "--limit", "2", "--output", "json",
    ]));
    assert_eq!(
        page.iter()
            .map(|r| r["seq"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [2, 3]
    );
    let text = ca.ok(&["audit", "list", "--kind", "entry.created"]);
    assert!(text.contains(" entry.created by "), "{text}");
    assert!(ca
        .ok(&["audit", "list", "--kind", "no.such."])
        .contains("no matching records"));
    let refused = ca.fails(&["audit", "list", "--after=-1"]);
    assert!(
        refused.contains("after_seq must not be negative"),
        "{refused}"
    );

    // Restart: everything survives, the same root stays, the chain keeps growing.
    let log1 = ca.stop();
    assert!(!ca.socket.exists() || std::os::unix::net::UnixStream::connect(&ca.socket).is_err());
    let mut ca = Server::start(dir, &[]);
    assert_eq!(
        ca.ok(&["bundle", "show"]),
        bundle_before,
        "same trust anchor after restart"
    );
    let again = json(&ca.ok(&["entry", "show", &id, "--output", "json"]));
    assert_eq!(again["revision"], 2);
    ca.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/after",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    let verified = ca.ok(&["audit", "verify"]);
    let records_after: u64 = verified
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap();
    assert!(records_after > records_before, "{verified}");
    ca.ok(&["entry", "delete", &id]);
    assert_eq!(
        json(&ca.ok(&["entry", "list", "--output", "json"]))
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let log2 = ca.stop();

    // No private key, token or JWT in any log line.
    let logs = format!("{log1}\n{log2}");
    assert!(
        logs.contains("issued X509-SVID"),
        "logs are captured: {logs}"
    );
    let mut secrets = vec![
        secret.clone(),
        jwt.clone(),
        jwt.split('.').nth(2).unwrap().to_owned(),
    ];
    for k in key_files.iter().chain([&out.join("key.pem")]) {
        let pem = std::fs::read_to_string(k).unwrap();
        secrets.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned),
        );
    }
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "secret material in logs: {s}");
    }
}

#[test]
fn tampered_audit_log_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = Server::start(tmp.path(), &[]);
    for i in 0..3 {
        ca.ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/w{i}"),
            "--parent-id",
            "spiffe://example.org/p",
            "--selector",
            "unix:uid:1",
        ]);
    }
    ca.stop();
    // Edit record 2 behind the CA's back.
    let db = tmp.path().join("data/meshid-ca.db");
    let status = Command::new("python3")
        .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"update audit_log set actor='mallory' where seq=2\"); c.commit()"])
        .arg(&db)
        .status()
        .unwrap();
    assert!(status.success());
    let ca = Server::start(tmp.path(), &[]);
    let out = ca.cli(&["audit", "verify"]);
    assert!(!out.status.success(), "tampering not detected");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("first bad record 2"), "{text}");
}

#[test]
fn bad_config_exits_64_and_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ca.toml");
    std::fs::write(&cfg, "trust_domain = \"example.org\"\ndata_dir = \"/nonexistent/never\"\nintermediate_ttl = \"1h\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("intermediate_ttl"), "{err}");
    assert!(
        !Path::new("/nonexistent/never").exists(),
        "nothing created before validation"
    );
    let out = Command::new(BIN).args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust_domain"));
    // The example config in deploy/ is accepted by the binary itself.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ca.toml");
    let out = Command::new(BIN)
        .args(["run", "--check", "--config"])
        .arg(example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binary on PostgreSQL: configured by file, state survives a restart, the audit log
/// verifies.
#[test]
fn postgres_datastore_end_to_end() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(db) = rt.block_on(pg::fresh_database()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ca.toml");
    std::fs::write(
        &cfg,
        format!("datastore = \"{}\"\nserver_id = \"ca-pg\"\n", db.url),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let mut ca = Server::start(tmp.path(), &["--config", &cfg]);
    let status = json(&ca.ok(&["ca", "status", "--output", "json"]));
    assert_eq!(status["datastore"], "postgres");
    assert!(
        !tmp.path().join("data/meshid-ca.db").exists(),
        "no SQLite file when PostgreSQL is configured"
    );
    ca.ok(&[
        "entry",
        "create",
        "--id",
        "web",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/p",
        "--selector",
        "unix:uid:1",
    ]);
    let bundle = ca.ok(&["bundle", "show"]);
    ca.stop();
    let ca = Server::start(tmp.path(), &["--config", &cfg]);
    assert_eq!(
        json(&ca.ok(&["entry", "show", "web", "--output", "json"]))["spiffe_id"],
        "spiffe://example.org/web"
    );
    assert_eq!(ca.ok(&["bundle", "show"]), bundle);
    assert!(ca.ok(&["audit", "verify"]).contains("audit log OK"));
    drop(ca);
    drop(db);
}

/// `meshid-ca healthcheck` asks the server's ops `/readyz`: at the address given, or at the
/// `ops_address` of the configuration file given; a wrong address fails.
#[test]
fn healthcheck_finds_the_ops_address_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let config = dir.path().join("ca.toml");
    std::fs::write(&config, format!("ops_address = \"{}\"\n", server.ops)).unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("healthcheck")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert!(run(&["--ops-address", &server.ops]).status.success());
    assert!(run(&["--config", config.to_str().unwrap()])
        .status
        .success());
    let closed = format!("127.0.0.1:{}", free_port());
    let out = run(&["--ops-address", &closed]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach"),
        "{out:?}"
    );
}

/// `meshid-ca policy`, as a policy author uses it: dry run, apply, the same apply again, an
/// invalid file refused with its position (exit 1, nothing changed), show, history, rollback.
#[test]
fn policy_apply_show_history_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Server::start(dir, &[]);
    let file = dir.join("team-a.yaml");
    let v1 = "name: team-a\ndefault: deny\nrules:\n  - name: web-to-api\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://example.org/api\"]\n";
    std::fs::write(&file, v1).unwrap();
    let path = file.to_str().unwrap();
    assert!(ca
        .ok(&["policy", "history"])
        .contains("No policy has been applied yet"));
    assert!(ca
        .fails(&["policy", "show"])
        .contains("no policy has been applied yet"));

    let dry = ca.ok(&["policy", "apply", path, "--dry-run"]);
    assert!(
        dry.contains("+++ team-a") && dry.contains("Dry run: nothing changed"),
        "{dry}"
    );
    let out = ca.ok(&["policy", "apply", path, "--reason", "first"]);
    assert!(out.contains("Policy revision 1 is in force."), "{out}");
    let out = ca.ok(&["policy", "apply", path]);
    assert!(
        out.contains("No change: revision 1 stays in force."),
        "{out}"
    );

    // A mistake on line 6: refused with file:line:column, and revision 1 stays.
    std::fs::write(
        &file,
        v1.replace(
            "to: [\"spiffe://example.org/api\"]",
            "to: [\"example.org/api\"]",
        ),
    )
    .unwrap();
    let err = ca.fails(&["policy", "apply", path]);
    assert!(err.contains(&format!("{path}:6:")), "{err}");
    let v2 = v1.replace("web-to-api\n", "web-to-api\n    ports: [8080]\n");
    std::fs::write(&file, &v2).unwrap();
    let out = ca.ok(&["policy", "apply", path, "--output", "json"]);
    let change = json(&out);
    assert_eq!(
        (change["revision"].as_u64(), change["changed"].as_bool()),
        (Some(2), Some(true))
    );
    assert!(change["diff"]
        .as_str()
        .unwrap()
        .contains("+    ports: [8080]"));

    assert_eq!(ca.ok(&["policy", "show", "--name", "team-a"]), v2);
    assert_eq!(
        ca.ok(&["policy", "show", "--revision", "1", "--name", "team-a"]),
        v1
    );
    let shown = ca.ok(&["policy", "show"]);
    assert!(
        shown.starts_with("Policy revision 2 (apply team-a by admin:uid="),
        "{shown}"
    );
    let out = ca.ok(&["policy", "rollback", "1", "--reason", "port was wrong"]);
    assert!(
        out.contains("-    ports: [8080]") && out.contains("Policy revision 3"),
        "{out}"
    );
    let history = json(&ca.ok(&["policy", "history", "--output", "json"]));
    let actions: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["apply", "apply", "rollback"]);
    assert_eq!(history[2]["reason"], "port was wrong");
    assert!(ca
        .fails(&["policy", "show", "--revision", "9"])
        .contains("policy revision 9 not found"));
    // Each change, and (with no agent to wait for) its effect across the mesh, recorded at the
    // next check.
    let t0 = std::time::Instant::now();
    loop {
        let audit = ca.ok(&["audit", "list", "--kind", "policy.", "--output", "json"]);
        let kinds: Vec<String> = audit
            .lines()
            .map(|l| json(l)["kind"].as_str().unwrap().to_owned())
            .collect();
        let changes = kinds.iter().filter(|k| !k.ends_with(".effective")).count();
        assert_eq!(changes, 3, "{audit}");
        let effective = kinds.iter().filter(|k| k.ends_with(".effective")).count();
        if effective == 3 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 5, "{audit}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn mesh_apply_plan_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Server::start(dir, &[]);
    let mesh_dir = dir.join("mesh");
    std::fs::create_dir_all(mesh_dir.join("policies")).unwrap();
    std::fs::write(
        mesh_dir.join("policies/payments.yaml"),
        "default: deny\nrules:\n  - name: web-to-api\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://example.org/api\"]\n",
    )
    .unwrap();
    let agent = "spiffe://example.org/meshid/agent/join_token/node-1";
    let v1 = format!(
        "owner: payments
entries:
  - spiffe_id: spiffe://example.org/web
    parent_id: {agent}
    selectors: [unix:uid:1000]
  - spiffe_id: spiffe://example.org/api
    parent_id: {agent}
    selectors: [unix:uid:1001]
    x509_svid_ttl: 5m
policies:
  - name: payments
    file: policies/payments.yaml
  - name: payments-batch
    inline: |
      default: deny
      rules:
        - name: batch-to-api
          from: [\"spiffe://example.org/batch\"]
          to: [\"spiffe://example.org/api\"]
"
    );
    let file = mesh_dir.join("mesh.yaml");
    let path = file.to_str().unwrap();
    std::fs::write(&file, &v1).unwrap();

    // Plan (JSON, for CI): four creations; --detailed-exitcode says changes are pending.
    let plan = json(&ca.ok(&["plan", "-f", path, "--output", "json"]));
    assert_eq!(plan["owner"], "payments");
    assert_eq!(
        (&plan["dry_run"], &plan["applied"], &plan["changed"]),
        (&true.into(), &false.into(), &true.into())
    );
    assert_eq!(plan["summary"]["create"], 4);
    assert_eq!(plan["changes"][0]["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(plan["changes"][0]["declared_at"], format!("{path}:3:5"));
    assert_eq!(plan["changes"][3]["kind"], "policy");
    let out = ca.cli(&["plan", "-f", path, "--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "+ entry spiffe://example.org/web (parent {agent}) [unix:uid:1000]"
        )) && text.contains("Plan: 4 to create, 0 to update, 0 to adopt, 0 to delete. Dry run"),
        "{text}"
    );
    assert!(ca.ok(&["entry", "list"]).contains("Found 0 entries"));

    // Apply, then apply and plan again: nothing changes, and it says so.
    let out = ca.ok(&["apply", "-f", path, "--reason", "first"]);
    assert!(
        out.contains("Applied 4 changes (policy revision 1)."),
        "{out}"
    );
    let out = ca.ok(&["apply", "-f", path]);
    assert!(
        out.contains("No changes. The mesh matches the file (4 unchanged"),
        "{out}"
    );
    let out = ca.cli(&["apply", "-f", path, "--dry-run", "--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0));
    let plan = json(&ca.ok(&["plan", "-f", mesh_dir.to_str().unwrap(), "--output", "json"]));
    assert_eq!(
        (&plan["changed"], &plan["summary"]["unchanged"]),
        (&false.into(), &4.into())
    );
    let entries = json(&ca.ok(&["entry", "list", "--output", "json"]));
    let owners: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["owner"].as_str().unwrap())
        .collect();
    assert_eq!(owners, ["payments", "payments"]);
    let shown = ca.ok(&["entry", "show", entries[0]["id"].as_str().unwrap()]);
    assert!(shown.contains("Owner          : payments"), "{shown}");
    let shown = json(&ca.ok(&["policy", "show", "--output", "json"]));
    assert_eq!(shown["documents"][0]["owner"], "payments");

    // An entry made by hand is never pruned.
    let hand = json(&ca.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/hand",
        "--parent-id",
        agent,
        "--selector",
        "unix:uid:7",
        "--output",
        "json",
    ]));
    assert_eq!(hand["owner"], "");

    // A mistake in the file, in an inline policy, or an entry the CA refuses: refused with
    // file:line:column, and nothing changes.
    let before = ca.ok(&["entry", "list", "--output", "json"]);
    for (broken, want) in [
        (
            v1.replace("    x509_svid_ttl: 5m", "    x509_ttl: 5m"),
            format!("{path}:9:5: unknown key `x509_ttl` in an entry"),
        ),
        (
            v1.replace("[unix:uid:1001]", "[unix:uid:1001, unix:uid:x]"),
            format!("{path}:8:32: invalid selector"),
        ),
        (
            v1.replace(
                "from: [\"spiffe://example.org/batch\"]",
                "from: [\"spiffe://example.org/batch/**/x\"]",
            ),
            format!("{path}:18:18: "),
        ),
        (
            v1.replace(
                "spiffe://example.org/api\n    parent",
                "spiffe://other.org/api\n    parent",
            ),
            format!("{path}:6:5: spiffe_id \"spiffe://other.org/api\" is not in trust domain"),
        ),
        (
            v1.replace(
                "    x509_svid_ttl: 5m",
                "    x509_svid_ttl: 5m\n    token: abc",
            ),
            format!("{path}:10:5: `token` looks like a secret"),
        ),
    ] {
        std::fs::write(&file, &broken).unwrap();
        let err = ca.fails(&["apply", "-f", path]);
        assert!(err.contains(&want), "{err}\nwanted: {want}");
    }
    assert_eq!(ca.ok(&["entry", "list", "--output", "json"]), before);

    // A changed TTL is an update; an entry no longer declared is kept without --prune and
    // deleted with it; the entry made by hand stays.
    let v2 = v1
        .replace("x509_svid_ttl: 5m", "x509_svid_ttl: 600")
        .replace(
            &format!("  - spiffe_id: spiffe://example.org/web\n    parent_id: {agent}\n    selectors: [unix:uid:1000]\n"),
            "",
        );
    std::fs::write(&file, &v2).unwrap();
    let out = ca.ok(&["apply", "-f", path]);
    assert!(
        out.contains("    x509_svid_ttl: 300 -> 600\n")
            && out.contains("1 object(s) owned by `payments` are no longer declared; kept (--prune deletes them):")
            && out.contains("Applied 1 changes (policy revision 1)."),
        "{out}"
    );
    let pruned = json(&ca.ok(&["apply", "-f", path, "--prune", "--output", "json"]));
    assert_eq!(pruned["summary"]["delete"], 1);
    assert_eq!(
        pruned["changes"][0]["spiffe_id"],
        "spiffe://example.org/web"
    );
    assert_eq!(pruned["applied"], true);
    let left: Vec<String> = json(&ca.ok(&["entry", "list", "--output", "json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["spiffe_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left.len(), 2);
    assert!(
        left.contains(&"spiffe://example.org/hand".to_owned()),
        "{left:?}"
    );
    assert!(
        left.contains(&"spiffe://example.org/api".to_owned()),
        "{left:?}"
    );

    // One audit record per apply that changed something.
    let audit = ca.ok(&["audit", "list", "--kind", "mesh.apply", "--output", "json"]);
    let kinds: Vec<String> = audit
        .lines()
        .map(|l| json(l)["kind"].as_str().unwrap().to_owned())
        .filter(|k| k == "mesh.apply")
        .collect();
    assert_eq!(kinds.len(), 3, "{audit}");
}
