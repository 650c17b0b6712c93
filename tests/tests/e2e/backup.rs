//! Disaster recovery, as a drill: the CA host is lost, and a backup taken while it ran is
//! restored on a new one. Agents reconnect with the identities they hold (no new join token),
//! every SVID verifies with openssl, issuance goes on under the same root, the audit chain
//! verifies; a restore with the wrong key fails and writes nothing. On SQLite and PostgreSQL.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use meshid_tests::{bin_dir, wait_for, Agent, Ca};

fn ca_bin(args: &[&str]) -> Output {
    Command::new(bin_dir().join("meshid-ca"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `meshid-agent api fetch x509 --write DIR`: the serial of the SVID for `spiffe_id`, once the
/// agent serves it.
fn fetch(agent: &Agent, dir: &Path, spiffe_id: &str) -> String {
    wait_for(Duration::from_secs(20), "the SVID at the workload", || {
        let out = Command::new(bin_dir().join("meshid-agent"))
            .args(["api", "fetch", "x509", "--socket"])
            .arg(&agent.socket)
            .arg("--write")
            .arg(dir)
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || !t.contains(&format!("SPIFFE ID: {spiffe_id}")) {
            return None;
        }
        t.lines()
            .find_map(|l| l.strip_prefix("Serial: "))
            .map(str::to_owned)
    })
}

/// openssl verifies every SVID written by [`fetch`] against the bundle.
fn openssl_verifies(dir: &Path) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("bundle.0.pem"))
        .arg("-untrusted")
        .arg(dir.join("svid.0.pem"))
        .arg(dir.join("svid.0.pem"))
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl verify: {}", text(&out));
}

fn drill(datastore: Option<(&str, &str)>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pass = dir.join("passphrase");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "correct horse battery stapler\n").unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut extra = vec!["--server-id", "ca-east"];
    if let Some((url, _)) = datastore {
        extra.extend(["--datastore", url]);
    }
    let mut ca = Ca::start(dir, &extra);
    let (token, agent_id) = ca.join_token();
    let agent = Agent::start(dir, &ca, &token);
    ca.entry_for_this_uid(
        "web",
        "spiffe://example.org/web",
        &agent_id,
        &["--x509-ttl", "1h"],
    );
    let before = dir.join("before");
    let serial = fetch(&agent, &before, "spiffe://example.org/web");
    openssl_verifies(&before);
    let bundle = ca.ok(&["bundle", "show"]);

    // The backup, while the CA serves.
    let backup = dir.join("offsite/ca.backup");
    std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
    let data = dir.join("ca").display().to_string();
    let mut args = vec![
        "backup",
        "--trust-domain",
        "example.org",
        "--data-dir",
        &data,
        "--server-id",
        "ca-east",
        "--out",
        backup.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ];
    if let Some((url, _)) = datastore {
        args.extend(["--datastore", url]);
    }
    let out = ca_bin(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("PRIVATE KEY"));
    assert_eq!(
        std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let raw = std::fs::read(&backup).unwrap();
    assert!(raw.starts_with(b"age-encryption.org/v1\n"), "an age file");
    assert!(
        !raw.windows(11).any(|w| w == b"PRIVATE KEY") && !raw.windows(8).any(|w| w == b"web\",\"s"),
        "nothing readable inside"
    );
    let out = ca_bin(&[
        "restore",
        backup.to_str().unwrap(),
        "--check",
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert!(
        out.status.success() && text(&out).contains("backup OK"),
        "{}",
        text(&out)
    );
    // A change after the backup: lost with the host (the backup is the recovery point).
    ca.ok(&[
        "entry",
        "create",
        "--id",
        "late",
        "--spiffe-id",
        "spiffe://example.org/late",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:65000",
    ]);

    // The host is lost: the process, its data directory and its database.
    ca.proc.signal("KILL");
    ca.proc.wait_exit(Duration::from_secs(10)).expect("killed");
    std::fs::remove_dir_all(dir.join("ca")).unwrap();
    let restore_url = datastore.map(|(_, fresh)| fresh);

    // The wrong passphrase: refused, nothing written.
    let mut args = vec![
        "restore",
        backup.to_str().unwrap(),
        "--trust-domain",
        "example.org",
        "--data-dir",
        &data,
        "--server-id",
        "ca-east",
        "--passphrase-file",
        wrong.to_str().unwrap(),
    ];
    if let Some(url) = restore_url {
        args.extend(["--datastore", url]);
    }
    let out = ca_bin(&args);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot decrypt the backup")
            && text(&out).contains("nothing was written"),
        "{}",
        text(&out)
    );
    assert!(!dir.join("ca").exists(), "nothing written");
    // Another trust domain's configuration: refused too.
    let mut other = args.clone();
    other[3] = "example.com";
    other[9] = pass.to_str().unwrap();
    let out = ca_bin(&other);
    assert!(text(&out).contains("trust domain"), "{}", text(&out));
    assert!(!dir.join("ca").exists(), "nothing written");

    // The restore, on the new host.
    args[9] = pass.to_str().unwrap();
    let out = ca_bin(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("restored example.org (server ca-east)"),
        "{}",
        text(&out)
    );
    // It runs where the old one ran (same address, the name agents know).
    if let Some(url) = restore_url {
        ca.set_extra(&["--server-id", "ca-east", "--datastore", url]);
    }
    ca.restart();
    assert_eq!(ca.ok(&["bundle", "show"]), bundle, "the same trust anchors");
    assert!(ca.ok(&["audit", "verify"]).contains("audit log OK"));
    assert!(!ca
        .ok(&["entry", "list"])
        .contains("spiffe://example.org/late"));

    // The agent reconnects on its own identity: no new join token, and issuance goes on.
    ca.entry_for_this_uid("api", "spiffe://example.org/api", &agent_id, &[]);
    let after = dir.join("after");
    fetch(&agent, &after, "spiffe://example.org/api");
    ca.ok(&["entry", "rotate", "web", "--reason", "drill"]);
    let rotated = wait_for(Duration::from_secs(20), "the rotated SVID", || {
        let s = fetch(&agent, &after, "spiffe://example.org/web");
        (s != serial).then_some(s)
    });
    assert_ne!(rotated, serial);
    openssl_verifies(&after);
    openssl_verifies(&before);
    let agents = ca.ok(&["agent", "list"]);
    assert_eq!(
        agents.matches("spiffe://example.org/meshid/agent/").count(),
        1,
        "{agents}"
    );
    let log = agent.proc.log_text();
    assert_eq!(
        log.matches("attested to the CA").count(),
        1,
        "one attestation only: {log}"
    );
    assert!(ca.ok(&["audit", "verify"]).contains("audit log OK"));
    assert!(!ca.proc.log_text().contains("correct horse"));
}

#[test]
fn a_lost_ca_host_is_restored_from_an_encrypted_backup_sqlite() {
    drill(None);
}

#[test]
fn a_lost_ca_host_is_restored_from_an_encrypted_backup_postgres() {
    let Some(pg) = meshid_tests::postgres_cluster() else {
        return;
    };
    let out = Command::new("psql")
        .arg(&pg.admin_url)
        .args([
            "-q",
            "-c",
            "CREATE DATABASE lost",
            "-c",
            "CREATE DATABASE restored",
        ])
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", text(&out));
    let lost = pg.admin_url.replace("/postgres", "/lost");
    let restored = pg.admin_url.replace("/postgres", "/restored");
    drill(Some((&lost, &restored)));
}
