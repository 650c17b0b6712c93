//! The audit trail stored apart, with the real binary: every record shipped to a JSON-lines
//! file and to syslog as it is committed, signed checkpoints, counted summaries of reads,
//! a sink that fails and catches up, and an attacker who rewrites the datastore and recomputes
//! the chain and its head: `audit verify` alone passes, `audit verify --export` does not.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::Server;
use crate::pg;

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn metric(ca: &Server, name: &str) -> Option<f64> {
    let (_, body) = ca.http_get("/metrics");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn head(ca: &Server) -> i64 {
    let out = ca.ok(&["audit", "verify"]);
    out.split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"))
}

/// The file holds every record up to `seq` and a checkpoint of it.
fn wait_shipped(file: &Path, seq: i64) {
    wait_for(
        "records and a checkpoint in the file",
        Duration::from_secs(15),
        || {
            let ls = lines(file);
            let last_record = ls.iter().rev().find(|l| l["type"] == "record")?;
            let checkpointed = ls.iter().rev().find(|l| l["type"] == "checkpoint")?;
            (last_record["seq"].as_i64()? >= seq && checkpointed["seq"] == last_record["seq"])
                .then_some(())
        },
    );
}

fn config(dir: &Path, datastore: &str) -> String {
    format!(
        "trust_domain = \"example.org\"\ndatastore = \"{datastore}\"\n\
         [audit]\nfile = \"{}\"\nsyslog = \"{}\"\ncheckpoint_interval = \"1s\"\nsummary_interval = \"1s\"\n",
        dir.join("trail/audit.jsonl").display(),
        dir.join("log.sock").display(),
    )
}

/// An attacker with write access to the datastore erases `erase` records from `from` on,
/// renumbers and re-hashes every record after them, and sets the head to the new last
/// record: the chain is consistent again, so the CA's own check passes.
async fn rewrite_datastore(url: &str, from: i64, erase: i64) {
    use sqlx::{Connection as _, Row as _};
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(url).await.unwrap();
    let rows = sqlx::query("SELECT seq, time, kind, actor, details FROM audit_log ORDER BY seq")
        .fetch_all(&mut c)
        .await
        .unwrap();
    let kept: Vec<(i64, String, String, String)> = rows
        .iter()
        .filter(|r| {
            let seq: i64 = r.get(0);
            seq < from || seq >= from + erase
        })
        .map(|r| (r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    sqlx::query("DELETE FROM audit_log WHERE seq >= $1")
        .bind(from)
        .execute(&mut c)
        .await
        .unwrap();
    let mut prev = [0u8; 32];
    for (i, (time, kind, actor, details)) in kept.iter().enumerate() {
        let seq = i as i64 + 1;
        let hash = meshid_ca::audit::record_hash(seq, *time, kind, actor, details, &prev);
        if seq >= from {
            sqlx::query("INSERT INTO audit_log (seq, time, kind, actor, details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                .bind(seq)
                .bind(*time)
                .bind(kind.as_str())
                .bind(actor.as_str())
                .bind(details.as_str())
                .bind(prev.to_vec())
                .bind(hash.to_vec())
                .execute(&mut c)
                .await
                .unwrap();
        }
        prev = hash;
    }
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2")
        .bind(kept.len() as i64)
        .bind(prev.to_vec())
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
}

/// The file's last checkpoint verified by OpenSSL (an implementation of Ed25519 other than
/// ours), with the `.pub` file as written: the message rebuilt here from the line's fields, as
/// documented (`meshid-audit-checkpoint-v1`, length-prefixed trust domain and server id, seq,
/// hash, time, big-endian).
fn openssl_verifies_last_checkpoint(dir: &Path, file: &Path, key_pub: &Path) {
    use base64::Engine as _;
    let ls = lines(file);
    let c = ls.iter().rev().find(|l| l["type"] == "checkpoint").unwrap();
    let mut msg = b"meshid-audit-checkpoint-v1".to_vec();
    for field in ["trust_domain", "server_id"] {
        let v = c[field].as_str().unwrap().as_bytes();
        msg.extend_from_slice(&(v.len() as u64).to_be_bytes());
        msg.extend_from_slice(v);
    }
    msg.extend_from_slice(&c["seq"].as_i64().unwrap().to_be_bytes());
    msg.extend_from_slice(&hex::decode(c["hash"].as_str().unwrap()).unwrap());
    msg.extend_from_slice(&c["time"].as_i64().unwrap().to_be_bytes());
    let sig = base64::engine::general_purpose::STANDARD
        .decode(c["signature"].as_str().unwrap())
        .unwrap();
    let (m, g) = (dir.join("checkpoint.msg"), dir.join("checkpoint.sig"));
    std::fs::write(&m, &msg).unwrap();
    std::fs::write(&g, &sig).unwrap();
    let verify = |msg_file: &Path| {
        std::process::Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
            .arg(key_pub)
            .arg("-in")
            .arg(msg_file)
            .arg("-sigfile")
            .arg(&g)
            .output()
            .unwrap()
    };
    let out = verify(&m);
    assert!(
        out.status.success(),
        "openssl: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And refuses the same signature over another head.
    let mut other = msg.clone();
    let at = other.len() - 9;
    other[at] ^= 1;
    std::fs::write(&m, &other).unwrap();
    assert!(
        !verify(&m).status.success(),
        "openssl accepted a changed head"
    );
}

fn trail(datastore: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sqlite = format!("sqlite://{}", dir.join("data/meshid-ca.db").display());
    let url = datastore.unwrap_or(&sqlite).to_owned();
    let cfg = dir.join("ca.toml");
    std::fs::write(&cfg, config(dir, &url)).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let syslog = std::os::unix::net::UnixDatagram::bind(dir.join("log.sock")).unwrap();
    syslog.set_nonblocking(true).unwrap();
    let cfg_s = cfg.display().to_string();
    let mut ca = Server::start(dir, &["--config", &cfg_s]);
    let file = dir.join("trail/audit.jsonl");
    let key_pub = dir.join("data/keys/audit-checkpoint.key.pub");

    // Changes and reads: each change is a record, the reads are counted into a summary.
    for i in 0..4 {
        ca.ok(&[
            "entry",
            "create",
            "--id",
            &format!("w{i}"),
            "--spiffe-id",
            &format!("spiffe://example.org/w{i}"),
            "--parent-id",
            "spiffe://example.org/p",
            "--selector",
            "unix:uid:1",
        ]);
    }
    ca.ok(&["entry", "list"]);
    ca.ok(&["entry", "show", "w1"]);
    wait_for("the summary of the reads", Duration::from_secs(10), || {
        let out = ca.ok(&[
            "audit",
            "list",
            "--kind",
            "audit.summary",
            "--output",
            "json",
        ]);
        out.contains("/meshid.admin.v1.Entries/ListEntries")
            .then_some(())
    });
    let summary = ca.ok(&[
        "audit",
        "list",
        "--kind",
        "audit.summary",
        "--output",
        "json",
    ]);
    assert!(
        summary.contains("admin:uid="),
        "reads are counted by caller: {summary}"
    );
    wait_shipped(&file, head(&ca));
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        metric(&ca, "meshid_ca_audit_sink_lag_records{sink=\"file\"}"),
        Some(0.0)
    );
    let out = ca.ok(&[
        "audit",
        "verify",
        "--export",
        file.to_str().unwrap(),
        "--public-key",
        key_pub.to_str().unwrap(),
    ]);
    assert!(
        out.contains("export OK") && out.contains("signed by the pinned key"),
        "{out}"
    );
    openssl_verifies_last_checkpoint(dir, &file, &key_pub);
    assert!(out.contains("each of the"), "{out}");
    // Offline: no CA needed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshid-ca"))
        .args(["audit", "verify", "--offline", "--export"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("UNAUTHENTICATED (no --public-key)"),
        "an unpinned check says what it does not prove: {text}"
    );
    // An empty file is not a clean trail.
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshid-ca"))
        .args(["audit", "verify", "--offline", "--export"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("export EMPTY"));
    // Syslog got the same records, as RFC 5424 messages.
    let mut buf = vec![0; 1 << 20];
    let mut seqs = Vec::new();
    while let Ok(n) = syslog.recv(&mut buf) {
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            msg.starts_with("<85>1 ") || msg.starts_with("<81>1 "),
            "{msg}"
        );
        let body: serde_json::Value =
            serde_json::from_str(msg.split_once(" audit - ").unwrap().1).unwrap();
        if body["type"] == "record" {
            seqs.push(body["seq"].as_i64().unwrap());
        }
    }
    assert_eq!(seqs.first(), Some(&1));
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // The syslog sink goes away: issuance goes on, the lag and failures show, and when it is
    // back the gap is filled in order.
    drop(syslog);
    std::fs::remove_file(dir.join("log.sock")).unwrap();
    let last_sent = *seqs.last().unwrap();
    for i in 10..13 {
        ca.ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/x{i}"),
            "--parent-id",
            "spiffe://example.org/p",
            "--selector",
            "unix:uid:2",
        ]);
    }
    wait_for("syslog lag and failures", Duration::from_secs(10), || {
        (metric(&ca, "meshid_ca_audit_sink_lag_records{sink=\"syslog\"}")? >= 3.0
            && metric(&ca, "meshid_ca_audit_sink_failures_total{sink=\"syslog\"}")? >= 1.0)
            .then_some(())
    });
    let syslog = std::os::unix::net::UnixDatagram::bind(dir.join("log.sock")).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let n = syslog.recv(&mut buf).unwrap();
    let msg = std::str::from_utf8(&buf[..n]).unwrap();
    let body: serde_json::Value =
        serde_json::from_str(msg.split_once(" audit - ").unwrap().1).unwrap();
    assert_eq!(
        body["seq"].as_i64(),
        Some(last_sent + 1),
        "the gap is filled from where it stopped: {msg}"
    );
    wait_for("syslog caught up", Duration::from_secs(40), || {
        (metric(&ca, "meshid_ca_audit_sink_lag_records{sink=\"syslog\"}")? == 0.0).then_some(())
    });
    drop(syslog);
    wait_shipped(&file, head(&ca));

    // logrotate moves the file aside: a new one continues the chain from the next record, and
    // the two together verify as one trail.
    let rotated = dir.join("trail/audit.jsonl.1");
    std::fs::rename(&file, &rotated).unwrap();
    let before = head(&ca);
    ca.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/after-rotation",
        "--parent-id",
        "spiffe://example.org/p",
        "--selector",
        "unix:uid:3",
    ]);
    let shipped = head(&ca);
    wait_shipped(&file, shipped);
    let fresh = lines(&file);
    assert_eq!(
        fresh.first().unwrap()["seq"].as_i64(),
        Some(before + 1),
        "{fresh:?}"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = ca.ok(&[
        "audit",
        "verify",
        "--export",
        file.to_str().unwrap(),
        "--public-key",
        key_pub.to_str().unwrap(),
    ]);
    assert!(out.contains("export OK"), "{out}");
    let joined = dir.join("joined.jsonl");
    let mut all = std::fs::read(&rotated).unwrap();
    all.extend(std::fs::read(&file).unwrap());
    std::fs::write(&joined, all).unwrap();
    let out = ca.ok(&[
        "audit",
        "verify",
        "--export",
        joined.to_str().unwrap(),
        "--public-key",
        key_pub.to_str().unwrap(),
    ]);
    assert!(out.contains("export OK"), "{out}");
    let log = ca.stop();
    assert!(!log.contains("PRIVATE KEY"), "no key in the log");

    // The attack: 4 records erased from the middle (an entry creation and what followed), the
    // rest renumbered and re-hashed, the head recomputed.
    let export = dir.join("export.jsonl");
    std::fs::copy(&joined, &export).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(rewrite_datastore(&url, shipped - 8, 4));
    let mut ca = Server::start(dir, &["--config", &cfg_s]);
    let out = ca.ok(&["audit", "verify"]);
    assert!(
        out.contains("audit log OK"),
        "the attack fools the CA's own check: {out}"
    );
    // The exported checkpoints do not.
    let out = ca.cli(&[
        "audit",
        "verify",
        "--export",
        export.to_str().unwrap(),
        "--public-key",
        key_pub.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("export OK")
            && text.contains(&format!(
                "REWRITTEN since it was exported: record {}",
                shipped - 8
            )),
        "{text}"
    );
    // And the running shipper noticed on start: a fault line, a metric, an error in the log.
    wait_for("the chain fault", Duration::from_secs(10), || {
        (metric(&ca, "meshid_ca_audit_chain_faults_total")? >= 1.0).then_some(())
    });
    let ls = lines(&file);
    assert_eq!(ls.last().unwrap()["type"], "fault", "{:?}", ls.last());
    let out = ca.cli(&[
        "audit",
        "verify",
        "--export",
        file.to_str().unwrap(),
        "--offline",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("found the datastore's audit chain rewritten"));
    let log = ca.stop();
    assert!(log.contains("AUDIT CHAIN FAULT"), "{log}");
}

#[test]
fn the_audit_trail_is_shipped_apart_and_catches_a_rewritten_datastore_sqlite() {
    trail(None);
}

#[test]
fn the_audit_trail_is_shipped_apart_and_catches_a_rewritten_datastore_postgres() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(db) = rt.block_on(pg::fresh_database()) else {
        return;
    };
    trail(Some(&db.url));
    drop(db);
}
