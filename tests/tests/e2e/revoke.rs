//! Revocation that bites (issue 12, point 4), with the real binaries: `meshid-ca svid revoke`
//! of the SVID a proxy holds closes a keep-alive connection through two proxies within a
//! second, refuses the revoked certificate in a new handshake, and the workload's next SVID
//! works. The CRL reaches workloads in the Workload API's `crl` fields (py-spiffe's stubs and
//! `cryptography` check it), openssl refuses the revoked SVID with `-crl_check`, and the
//! revoked SVID does not come back after the agent and the proxy restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshid_tests::{wait_for, Proxy};

use crate::proxy::support::{
    access_log_path, id, json_lines, read_head, request_once, serial, WebToApi,
};
use crate::proxy::ALLOW_WEB_TO_API;

/// `meshid-agent api fetch x509 --write DIR` on `socket`: the serial (hex, no colons) of the
/// first SVID, with svid.0.pem, svid.0.key and bundle.0.pem written in `dir`.
fn fetch_svid(socket: &Path, dir: &Path) -> String {
    let out = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(socket)
        .arg("--write")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Serial: "))
        .unwrap()
        .replace(':', "")
        .to_ascii_lowercase()
}

/// The TLS client handshake of openssl with `cert`/`key` against `addr`, which must refuse the
/// certificate. Returns openssl's output.
fn s_client(addr: &str, dir: &Path) -> String {
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", addr, "-cert"])
        .arg(dir.join("svid.0.pem"))
        .arg("-cert_chain")
        .arg(dir.join("svid.0.pem"))
        .arg("-key")
        .arg(dir.join("svid.0.key"))
        .args(["-tls1_3", "-ign_eof"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn openssl_verify_crl(dir: &Path, crls: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-crl_check")
        .arg("-CRLfile")
        .arg(crls)
        .arg("-CAfile")
        .arg(dir.join("bundle.0.pem"))
        .arg("-untrusted")
        .arg(dir.join("svid.0.pem"))
        .arg(dir.join("svid.0.pem"))
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

#[test]
fn revocation_closes_live_connections_and_refuses_the_certificate() {
    let _serial = serial();
    let mut mesh = WebToApi::start("1h", ALLOW_WEB_TO_API);
    let dir = mesh.tmp.path().to_owned();
    let api_socket = mesh.nodes.1.agent.socket.clone();
    // The SVID api's proxy holds (the same entry, fetched by the same uid).
    let old = dir.join("api-old");
    let revoked = fetch_svid(&api_socket, &old);

    // A keep-alive connection through web's and api's proxies; a reader thread notes when it
    // is closed.
    let stream = TcpStream::connect(&mesh.web_out).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    write!(
        writer,
        "GET / HTTP/1.1\r\nhost: api.test\r\nconnection: keep-alive\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut reader).unwrap().unwrap();
    assert!(head.start.contains(" 200 "), "{}", head.start);
    head.read_body(&mut reader).unwrap();
    let closed = std::thread::spawn(move || {
        let mut buf = [0u8; 1];
        let r = reader.read(&mut buf);
        (Instant::now(), r.map_err(|e| e.kind()))
    });

    let t0 = Instant::now();
    let out = mesh.ca.ok(&[
        "svid",
        "revoke",
        "--spiffe-id",
        &id("api"),
        "--reason",
        "e2e: key leaked",
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let serials: Vec<&str> = v["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["serial"].as_str().unwrap())
        .collect();
    assert!(serials.contains(&revoked.as_str()), "{out}");
    let (at, read) = closed.join().unwrap();
    let took = at.duration_since(t0);
    eprintln!("revocation: keep-alive connection closed {took:?} after the command");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(took < Duration::from_secs(1), "closed after {took:?}");

    // The CA measured the revocation's effect: both agents handed the CRLs to every stream of
    // their workloads (the proxies' own streams among them), within the second.
    let effect = crate::effect(&mesh.ca, "svid.revoked", 0, Duration::from_secs(5));
    eprintln!(
        "revocation: in effect across the mesh after {} ms",
        effect["after_ms"]
    );
    assert!(effect["after_ms"].as_u64().unwrap() < 1000, "{effect}");
    assert!(
        effect["serials"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == revoked.as_str()),
        "{effect}"
    );
    assert_eq!(effect["reason"], "e2e: key leaked");
    let recorded = crate::audit(&mesh.ca, "svid.revoked");
    assert_eq!(recorded[0]["kind"], "svid.revoked", "{recorded:?}");
    assert_eq!(
        recorded[0]["details"]["reason"], "e2e: key leaked",
        "{recorded:?}"
    );

    // web's proxy says why, in its metrics and its access log.
    assert!(
        mesh.web
            .metric("meshid_proxy_revoked_connections_closed_total", &[])
            >= 1.0
    );
    let record = json_lines(&access_log_path(&dir, "web"))
        .into_iter()
        .find(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("peer_revoked"))
        });
    let record = record.expect("an access-log record of the closed connection");
    assert_eq!(record["callee"], id("api"));
    assert!(record["reason"].as_str().unwrap().contains(&revoked));

    // The workload's next SVID works: api's agent re-issued it at once, and new requests
    // go through.
    wait_for(
        Duration::from_secs(10),
        "a request with api's new SVID",
        || (request_once(&mesh.web_out, "GET", "/").ok()?.status == 200).then_some(()),
    );
    let fresh = dir.join("api-new");
    assert_ne!(fetch_svid(&api_socket, &fresh), revoked);

    // A new handshake with the revoked SVID is refused (api's proxy verifies clients).
    let before = mesh.api.metric(
        "meshid_proxy_handshake_failures_total",
        &[("reason", "revoked")],
    );
    let shown = s_client(&mesh.api_in, &old);
    let deadline = Instant::now() + Duration::from_secs(5);
    while mesh.api.metric(
        "meshid_proxy_handshake_failures_total",
        &[("reason", "revoked")],
    ) <= before
    {
        assert!(
            Instant::now() < deadline,
            "the refusal was not counted as revoked:\n{shown}\n{}",
            mesh.api.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // openssl, with the CRLs the CA serves: the revoked SVID is refused, the new one passes.
    let crls = dir.join("crls.pem");
    std::fs::write(&crls, mesh.ca.ok(&["svid", "crl"])).unwrap();
    let (ok, text) = openssl_verify_crl(&old, &crls);
    assert!(!ok && text.contains("revoked"), "{text}");
    let (ok, text) = openssl_verify_crl(&fresh, &crls);
    assert!(ok, "{text}");

    // py-spiffe's stubs see the CRL in both crl fields; cryptography verifies its signature.
    if let Some(python) = meshid_tests::interop_python("spiffe, cryptography") {
        let out = Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/interop/workload_api.py"
            ))
            .arg("crl")
            .arg(&api_socket)
            .arg(serde_json::json!({ "revoked_serial": revoked }).to_string())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Restarts: api's agent serves a fresh SVID, and api's proxy, restarted, refuses the
    // revoked certificate again (it takes no handshake before it has the CRLs).
    let node_dir = dir.join("node2");
    mesh.nodes.1.agent.proc.stop();
    mesh.nodes.1.agent.restart(&node_dir, &mesh.ca);
    wait_for(Duration::from_secs(20), "the agent back", || {
        (meshid_tests::http_get(&mesh.nodes.1.agent.ops_address, "/readyz")?.0 == 200).then_some(())
    });
    let again = dir.join("api-again");
    assert_ne!(fetch_svid(&api_socket, &again), revoked);
    let config = std::fs::read_to_string(&mesh.api.config).unwrap();
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("ops_address"))
        .map(|l| format!("{l}\n"))
        .collect();
    mesh.api.proc.stop();
    mesh.api = Proxy::start(&dir, "api-restarted", &config);
    mesh.api.wait_ready(Duration::from_secs(30));
    s_client(&mesh.api_in, &old);
    wait_for(
        Duration::from_secs(5),
        "the restarted proxy's refusal",
        || {
            (mesh.api.metric(
                "meshid_proxy_handshake_failures_total",
                &[("reason", "revoked")],
            ) >= 1.0)
                .then_some(())
        },
    );
    wait_for(
        Duration::from_secs(10),
        "requests after the restarts",
        || (request_once(&mesh.web_out, "GET", "/").ok()?.status == 200).then_some(()),
    );
}
