//! The trust anchor's rotation under traffic, with the real binaries (issue 12, point 2), on
//! SQLite and on PostgreSQL: a whole `ca root prepare`, `activate`, `retire` cycle while clients
//! keep requests flowing through two proxies on two agents, over keep-alive connections and a
//! new connection per request, with 4 s SVIDs; no agent or proxy restarts. A third agent,
//! stopped during prepare, makes activate refuse (naming it); once it is back and has delivered
//! the bundle, activate succeeds. Afterwards `openssl verify` and py-spiffe (with
//! `cryptography` verifying) accept new SVIDs against the new bundle alone, and refuse them
//! against the retired root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use meshid_tests::{ca_cli, wait_for, Ca};
use serde_json::Value;

use crate::proxy::support::{
    create_entry, id, serial, start_node, tail, web_to_api_proxies, HttpBackend,
};
use crate::proxy::{fresh_client, keepalive_client, ClientStats, StopOnDrop, ALLOW_WEB_TO_API};

fn root_json(ca: &Ca, args: &[&str]) -> Value {
    let mut all = vec!["ca", "root"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    serde_json::from_str(&ca.ok(&all)).unwrap()
}

fn root_status(ca: &Ca) -> Value {
    root_json(ca, &["status"])
}

/// The DER roots of `status` in `state`.
fn roots_in(status: &Value, state: &str) -> Vec<String> {
    status["roots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == state)
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// PEM blocks of a file as DER.
fn pem_blocks(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|b| {
            let body: String = b
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap()
        })
        .collect()
}

fn openssl_verify(ca_file: &Path, svid: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca_file)
        .arg("-untrusted")
        .arg(svid)
        .arg(svid)
        .output()
        .expect("openssl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn rotation_under_traffic(datastore: Option<&str>) {
    let _serial = serial();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = dir.join("ca.toml");
    let mut text = "[ca]\nroot_rotation = \"manual\"\nrotation_interval = \"1s\"\n".to_owned();
    if let Some(url) = datastore {
        text = format!("datastore = \"{url}\"\n{text}");
    }
    std::fs::write(&config, text).unwrap();
    let ca = Ca::start(dir, &["--config", &config.display().to_string()]);
    let (t1, t2, t3) = (ca.join_token(), ca.join_token(), ca.join_token());
    create_entry(&ca, "web", &id("web"), &t1.1, "4s");
    create_entry(&ca, "api", &id("api"), &t2.1, "4s");
    create_entry(&ca, "probe", &id("probe"), &t3.1, "4s");
    let node1 = start_node(dir, "node1", &ca, t1);
    let node2 = start_node(dir, "node2", &ca, t2);
    let mut node3 = start_node(dir, "node3", &ca, t3);
    let backend = HttpBackend::start();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, ALLOW_WEB_TO_API).unwrap();
    let (mut api, mut web, web_out, _) =
        web_to_api_proxies(dir, &node1, &node2, &policy, backend.addr());
    let old_root = roots_in(&root_status(&ca), "active");
    assert_eq!(old_root.len(), 1);
    eprintln!("root rotation: mesh ready after {:?}", started.elapsed());

    let stop = AtomicBool::new(false);
    let mut timeline: Vec<(String, Duration)> = Vec::new();
    let (keepalive, fresh) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let ka: Vec<_> = (0..2)
            .map(|i| {
                let (addr, stop) = (&web_out, &stop);
                s.spawn(move || keepalive_client(addr, stop, &format!("ka{i}")))
            })
            .collect();
        let fr: Vec<_> = (0..2)
            .map(|i| {
                let (addr, stop) = (&web_out, &stop);
                s.spawn(move || fresh_client(addr, stop, &format!("fresh{i}")))
            })
            .collect();
        let t0 = Instant::now();
        let mut mark = |what: &str| timeline.push((what.to_owned(), t0.elapsed()));
        std::thread::sleep(Duration::from_secs(1));

        // The third agent is away during prepare.
        node3.agent.proc.stop();
        let prepared = root_json(&ca, &["prepare", "--reason", "e2e rotation"]);
        let next = prepared["prepared_root_id"].as_str().unwrap().to_owned();
        let target = prepared["target_sequence"].as_u64().unwrap();
        let prepared_at = Instant::now();
        mark("prepared");
        // The two agents with proxies deliver the two-root bundle; the third cannot.
        wait_for(Duration::from_secs(20), "two agents acknowledging", || {
            (root_status(&ca)["agents_acknowledged"] == 2).then_some(())
        });
        mark("2 of 3 acknowledged");
        let out = ca_cli(&ca.socket, &["ca", "root", "activate", "--reason", "e2e"]);
        let refusal = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "activate went through with an agent away"
        );
        assert!(
            refusal.contains(&node3.agent_id) && refusal.contains(&target.to_string()),
            "the refusal names the missing agent and the sequence: {refusal}"
        );
        assert!(!refusal.contains(&node1.agent_id), "{refusal}");
        // Back: it catches up, and the watch ends once every live agent has delivered.
        let away = prepared_at.elapsed();
        node3.agent.restart(&dir.join("node3"), &ca);
        let watch = ca_cli(
            &ca.socket,
            &["ca", "root", "status", "--watch", "--timeout", "30s"],
        );
        assert!(
            watch.status.success(),
            "{}",
            String::from_utf8_lossy(&watch.stdout)
        );
        assert!(String::from_utf8_lossy(&watch.stdout).contains("3/3 live agents"));
        mark("3 of 3 acknowledged");
        // The CA measured the prepare's effect: in effect once the third agent, back, had
        // handed the new bundle to its workloads, not before.
        let effect = crate::effect(&ca, "ca.root.prepared", 0, Duration::from_secs(10));
        assert_eq!(effect["key_id"], next.as_str(), "{effect}");
        let after = Duration::from_millis(effect["after_ms"].as_u64().unwrap());
        assert!(
            after >= away,
            "{effect}: the agent was away {away:?} after the prepare"
        );
        let activated = root_json(&ca, &["activate", "--reason", "e2e"]);
        assert_eq!(activated["phase"], "activated");
        assert_eq!(roots_in(&activated, "active"), vec![next.clone()]);
        mark("activated");
        // In effect once every agent renewed its own SVID under the new root.
        let effect = crate::effect(&ca, "ca.root.activated", 0, Duration::from_secs(20));
        assert_eq!(effect["key_id"], next.as_str(), "{effect}");
        // Retirement is refused until what the old root signed has expired; the watch says
        // when it may go.
        let early = ca_cli(&ca.socket, &["ca", "root", "retire"]);
        assert!(!early.status.success(), "retired at once");
        let watch = ca_cli(
            &ca.socket,
            &["ca", "root", "status", "--watch", "--timeout", "60s"],
        );
        assert!(
            watch.status.success(),
            "{}",
            String::from_utf8_lossy(&watch.stdout)
        );
        mark("retirable");
        let retired = root_json(&ca, &["retire", "--reason", "e2e"]);
        assert_eq!(retired["phase"], "stable");
        assert_eq!(roots_in(&retired, "retired"), old_root);
        mark("retired");
        // In effect once every agent handed the bundle without the old root to its workloads.
        let effect = crate::effect(&ca, "ca.root.retired", 0, Duration::from_secs(20));
        assert_eq!(effect["key_ids"], serde_json::json!(old_root), "{effect}");
        eprintln!(
            "root rotation: retire in effect after {} ms",
            effect["after_ms"]
        );
        // Traffic on the new root alone, through more than one SVID lifetime.
        std::thread::sleep(Duration::from_secs(6));
        stop.store(true, Ordering::SeqCst);
        let ka: Vec<ClientStats> = ka.into_iter().map(|h| h.join().unwrap()).collect();
        let fr: Vec<ClientStats> = fr.into_iter().map(|h| h.join().unwrap()).collect();
        (ka, fr)
    });
    eprintln!("root rotation timeline: {timeline:?}");
    let total: u64 = keepalive.iter().chain(fresh.iter()).map(|s| s.ok).sum();
    let fresh_ok: u64 = fresh.iter().map(|s| s.ok).sum();
    let failures: Vec<&String> = keepalive
        .iter()
        .chain(fresh.iter())
        .flat_map(|s| s.failures.iter())
        .collect();
    eprintln!(
        "root rotation: {total} requests ok ({fresh_ok} on new connections), {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests during the root rotation, first: {:?}\nweb log:\n{}\napi log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        tail(&web.proc.log_text(), 15),
        tail(&api.proc.log_text(), 15)
    );
    for (i, s) in keepalive.iter().enumerate() {
        assert_eq!(s.connects, 1, "keep-alive client {i} had to reconnect");
        assert!(s.ok > 50, "keep-alive client {i}: only {} requests", s.ok);
    }
    assert!(fresh_ok > 50, "only {fresh_ok} requests on new connections");
    for p in [&mut api, &mut web] {
        p.proc.check_alive();
    }

    // The bundle now holds the new root alone, and independent verifiers agree.
    let bundle = dir.join("bundle-after.pem");
    std::fs::write(&bundle, ca.ok(&["bundle", "show"])).unwrap();
    assert_eq!(pem_blocks(&bundle).len(), 1);
    let svid_dir = dir.join("probe-svid");
    let fetch = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(&node3.agent.socket)
        .arg("--write")
        .arg(&svid_dir)
        .output()
        .unwrap();
    assert!(fetch.status.success(), "{fetch:?}");
    let svid = svid_dir.join("svid.0.pem");
    // The bundle the agents started with holds the retired root alone.
    let old_pem = dir.join("old-root.pem");
    std::fs::copy(dir.join("node1").join("bundle.pem"), &old_pem).unwrap();
    assert_eq!(pem_blocks(&old_pem).len(), 1);
    if Command::new("openssl").arg("version").output().is_ok() {
        let (ok, text) = openssl_verify(&bundle, &svid);
        assert!(ok, "openssl verify against the new bundle: {text}");
        let (ok, text) = openssl_verify(&old_pem, &svid);
        assert!(
            !ok,
            "openssl verify against the retired root alone passed: {text}"
        );
    } else {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "openssl is needed in CI"
        );
    }
    if let Some(python) = meshid_tests::interop_python("spiffe, cryptography") {
        let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
        let spec = serde_json::json!({
            "id": id("probe"),
            "roots": pem_blocks(&bundle).iter().map(|d| b64(d)).collect::<Vec<_>>(),
            "retired": [b64(&pem_blocks(&old_pem)[0])],
        });
        let out = Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/interop/workload_api.py"
            ))
            .args([
                "roots",
                &node3.agent.socket.display().to_string(),
                &spec.to_string(),
            ])
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("ok py-spiffe after a root rotation"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every step is on the record.
    let audit = ca.ok(&["audit", "verify"]);
    assert!(audit.contains("audit log OK"), "{audit}");
    eprintln!("root rotation: {:?} in all", started.elapsed());
    drop((node1, node2, node3, backend));
}

/// An agent that was away for a whole rotation (prepare, a forced activate, retire) comes back
/// with a stored bundle that holds only the retired root: it cannot authenticate the CA, and
/// says so, with the command that fixes it. Doing what it says (installing the current bundle
/// as its `--trust-bundle`) brings it back without touching its data directory: it
/// re-bootstraps, attests with a new join token (its SVID expired meanwhile) and is served.
#[test]
fn an_agent_away_for_a_whole_rotation_says_how_to_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = dir.join("ca.toml");
    std::fs::write(
        &config,
        "[ca]\nroot_rotation = \"manual\"\nrotation_interval = \"1s\"\ndefault_x509_svid_ttl = \"6s\"\n",
    )
    .unwrap();
    let ca = Ca::start(dir, &["--config", &config.display().to_string()]);
    let (t1, t2) = (ca.join_token(), ca.join_token());
    create_entry(&ca, "a", &id("a"), &t1.1, "4s");
    create_entry(&ca, "b", &id("b"), &t2.1, "4s");
    let _node_a = start_node(dir, "a", &ca, t1);
    let mut node_b = start_node(dir, "b", &ca, t2);
    node_b.agent.proc.stop();

    root_json(&ca, &["prepare"]);
    let out = ca_cli(&ca.socket, &["ca", "root", "activate"]);
    assert!(!out.status.success(), "b has not acknowledged");
    root_json(&ca, &["activate", "--force", "--reason", "b is away"]);
    let watch = ca_cli(
        &ca.socket,
        &["ca", "root", "status", "--watch", "--timeout", "60s"],
    );
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stdout)
    );
    root_json(&ca, &["retire"]);

    // b comes back: its SVID has expired (6 s), so it brings a new join token (a new agent
    // identity, with its workload's entry registered under it).
    let b_dir = dir.join("b");
    let agent_config = b_dir.join("agent.toml");
    std::fs::write(&agent_config, "max_backoff = \"1s\"\n").unwrap();
    let (secret, b_again) = ca.join_token();
    create_entry(&ca, "b-again", &id("b-again"), &b_again, "4s");
    let mut args = meshid_tests::agent_run_args(
        &ca,
        &b_dir.join("bundle.pem"),
        &node_b.agent.data_dir,
        &node_b.agent.socket,
        &node_b.agent.ops_address,
    );
    args.extend([
        "--config".into(),
        agent_config.display().to_string(),
        "--join-token".into(),
        secret,
    ]);
    let mut b = meshid_tests::Proc::start(
        "meshid-agent",
        "meshid-agent",
        &args,
        b_dir.join("agent-back.log"),
    );
    let complaint = wait_for(Duration::from_secs(20), "b to say what is wrong", || {
        b.check_alive();
        let log = b.log_text();
        log.lines()
            .find(|l| l.contains("cannot authenticate the CA"))
            .map(str::to_owned)
    });
    assert!(
        complaint.contains("meshid-ca bundle show")
            && complaint.contains(&b_dir.join("bundle.pem").display().to_string()),
        "the message says how to fix it: {complaint}"
    );
    assert_ne!(
        meshid_tests::http_get(&node_b.agent.ops_address, "/readyz").map(|r| r.0),
        Some(200)
    );

    // The fix it names: the current bundle as its --trust-bundle file.
    std::fs::write(b_dir.join("bundle.pem"), ca.ok(&["bundle", "show"])).unwrap();
    wait_for(Duration::from_secs(30), "b to recover", || {
        b.check_alive();
        (meshid_tests::http_get(&node_b.agent.ops_address, "/readyz")?.0 == 200).then_some(())
    });
    assert!(
        b.log_text().contains("re-bootstrapped"),
        "{}",
        tail(&b.log_text(), 10)
    );
    let fetch = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(&node_b.agent.socket)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&fetch.stdout).contains(&id("b-again")),
        "{fetch:?}"
    );
}

#[test]
fn root_rotation_under_traffic_sqlite() {
    rotation_under_traffic(None);
}

#[test]
fn root_rotation_under_traffic_postgres() {
    let Some(pg) = meshid_tests::postgres_cluster() else {
        return;
    };
    rotation_under_traffic(Some(&pg.admin_url));
}
