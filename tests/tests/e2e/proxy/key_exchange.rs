//! Hybrid post-quantum key exchange (X25519MLKEM768) on every meshid hop, and X25519 with peers
//! that lack it, checked with independent TLS stacks:
//!
//! - meshid to meshid (proxy hops and the agents' node API connections): X25519MLKEM768, in the
//!   access log (`tls_group`) and the handshake metrics of both proxies and of the CA.
//! - pyOpenSSL on the OpenSSL that `cryptography` bundles (3.5 or later, which offers
//!   X25519MLKEM768 by default) into an inbound listener: X25519MLKEM768, as OpenSSL itself
//!   reports it.
//! - `openssl s_client` offering only classical groups: X25519.
//! - haproxy as the calling hop (into an inbound listener) and as the called one (from an
//!   outbound listener): X25519 both ways, so a meshid client falls back as well as a server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use meshid_tests::{Ca, Proc, Proxy};

use super::support::*;
use super::ALLOW_WEB_TO_API;

const HANDSHAKES: &str = "meshid_proxy_handshakes_total";
const HAPROXY: &str = "/usr/sbin/haproxy";

/// `meshid-agent api fetch x509 --write DIR` on `socket`: svid.0.pem (leaf first), svid.0.key
/// and bundle.0.pem in `dir`.
fn fetch_svid(socket: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(socket)
        .arg("--write")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn handshakes(p: &Proxy, direction: &str, listener: &str, group: &str) -> f64 {
    p.metric(
        HANDSHAKES,
        &[
            ("direction", direction),
            ("listener", listener),
            ("group", group),
        ],
    )
}

/// The access log record with `want` appears within 5 s, else the log is shown.
fn assert_record(path: &Path, want: &[(&str, Option<&str>)]) {
    assert!(
        wait_record(path, want, Duration::from_secs(5)),
        "no access record with {want:?} in {}:\n{}",
        path.display(),
        tail(&std::fs::read_to_string(path).unwrap_or_default(), 20)
    );
}

/// pyOpenSSL's client: mTLS into `addr` with the SVID in `svid`, one HTTP request. Returns
/// (the OpenSSL version, the group OpenSSL negotiated, the response's status line).
const PY_CLIENT: &str = r#"
import socket, sys
from OpenSSL import SSL
from cryptography.hazmat.bindings.openssl.binding import Binding
addr, svid = sys.argv[1], sys.argv[2]
host, port = addr.rsplit(":", 1)
ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
ctx.use_certificate_chain_file(svid + "/svid.0.pem")
ctx.use_privatekey_file(svid + "/svid.0.key")
ctx.load_verify_locations(svid + "/bundle.0.pem")
# The chain is verified against the bundle; a SPIFFE server has no host name to check.
ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, err, depth, ok: bool(ok))
sock = socket.create_connection((host, int(port)))
conn = SSL.Connection(ctx, sock)
conn.set_connect_state()
conn.do_handshake()
b = Binding()
print("version", b.ffi.string(b.lib.OpenSSL_version(0)).decode())
print("group", conn.get_group_name())
conn.sendall(b"GET /pq HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
data = b""
while True:
    try:
        chunk = conn.recv(65536)
    except (SSL.ZeroReturnError, SSL.SysCallError):
        break
    if not chunk:
        break
    data += chunk
print("status", data.split(b"\r\n")[0].decode())
"#;

/// `openssl s_client` offering only X25519 and P-256, with the SVID in `svid`, one HTTP
/// request; its whole output.
fn s_client_classical(addr: &str, svid: &Path) -> String {
    let mut child = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect", addr, "-cert"])
        .arg(svid.join("svid.0.pem"))
        .arg("-cert_chain")
        .arg(svid.join("svid.0.pem"))
        .arg("-key")
        .arg(svid.join("svid.0.key"))
        .arg("-CAfile")
        .arg(svid.join("bundle.0.pem"))
        .args(["-tls1_3", "-groups", "X25519:P-256", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"GET /classical HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A PEM file with the SVID's chain and key, as haproxy's `crt` takes it.
fn haproxy_crt(svid: &Path) -> PathBuf {
    let mut pem = std::fs::read_to_string(svid.join("svid.0.pem")).unwrap();
    pem.push_str(&std::fs::read_to_string(svid.join("svid.0.key")).unwrap());
    let path = svid.join("haproxy.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

/// haproxy with `config` (checked first), until it listens on `port`.
fn start_haproxy(dir: &Path, name: &str, config: &str, port: &str) -> Proc {
    let file = dir.join(format!("{name}.cfg"));
    std::fs::write(&file, config).unwrap();
    let check = Command::new(HAPROXY)
        .args(["-c", "-q", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(check.status.success(), "haproxy -c: {check:?}");
    let proc = Proc::start(
        name,
        HAPROXY,
        &[
            "-db".to_owned(),
            "-f".to_owned(),
            file.display().to_string(),
        ],
        dir.join(format!("{name}.log")),
    );
    meshid_tests::wait_for(Duration::from_secs(10), "haproxy to listen", || {
        std::net::TcpStream::connect(port).ok()
    });
    proc
}

const HAPROXY_GLOBAL: &str = "global
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
";

#[test]
fn proxy_key_exchange_is_hybrid_post_quantum_with_classical_fallback() {
    let _serial = serial();
    let python = meshid_tests::interop_python("OpenSSL");
    let have_haproxy = Path::new(HAPROXY).exists();
    if !have_haproxy {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "{HAPROXY} is missing (.ci/run installs it)"
        );
        eprintln!("SKIPPED (haproxy part): {HAPROXY} is missing");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (node1, node2) = web_and_api_nodes(dir, &ca, "1h");
    let http = HttpBackend::start();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, ALLOW_WEB_TO_API).unwrap();
    let (api_in, web_out, web_to_haproxy, haproxy_in) =
        (local_addr(), local_addr(), local_addr(), local_addr());
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(dir, "api", &node2, &id("api"), Some(&policy), "")
            + &inbound("api-in", &api_in, http.addr(), 8080, "detect")),
    );
    let mut web = Proxy::start(
        dir,
        "web",
        &(proxy_head(dir, "web", &node1, &id("web"), None, "")
            + &outbound("to-api", &web_out, &api_in, &id("api"))
            + &outbound("to-haproxy", &web_to_haproxy, &haproxy_in, &id("api"))),
    );
    wait_ready(&mut [&mut api, &mut web]);
    let (api_log, web_log) = (access_log_path(dir, "api"), access_log_path(dir, "web"));

    // meshid to meshid: the hybrid group, on both sides' logs and metrics.
    assert_eq!(request_once(&web_out, "GET", "/hop").unwrap().status, 200);
    let hybrid = Some("X25519MLKEM768");
    assert_record(
        &api_log,
        &[
            ("path", Some("/hop")),
            ("status", Some("200")),
            ("tls_group", hybrid),
        ],
    );
    assert_record(
        &web_log,
        &[("listener", Some("to-api")), ("tls_group", hybrid)],
    );
    assert!(handshakes(&api, "inbound", "api-in", "X25519MLKEM768") >= 1.0);
    assert!(handshakes(&web, "outbound", "to-api", "X25519MLKEM768") >= 1.0);
    // The agents' node API connections too: every handshake the CA completed was hybrid.
    let (_, ca_metrics) = meshid_tests::http_get(&ca.ops_address, "/metrics").unwrap();
    let node = |group: &str| {
        meshid_tests::metric_value(
            &ca_metrics,
            "meshid_ca_node_tls_handshakes_total",
            &[("group", group)],
        )
    };
    assert!(node("X25519MLKEM768") >= 2.0, "{ca_metrics}");
    assert_eq!(node("X25519"), 0.0);

    // Independent clients with web's SVID, straight into api's inbound listener.
    let web_svid = dir.join("web-svid");
    fetch_svid(&node1.agent.socket, &web_svid);

    // OpenSSL 3.5+ (pyOpenSSL): the hybrid group, as OpenSSL reports it.
    if let Some(python) = python {
        let out = Command::new("timeout")
            .arg("20")
            .arg(&python)
            .args(["-c", PY_CLIENT, &api_in])
            .arg(&web_svid)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(
            text.contains("group X25519MLKEM768"),
            "pyOpenSSL did not negotiate the hybrid group:\n{text}"
        );
        assert!(text.contains("status HTTP/1.1 200"), "{text}");
        assert_record(
            &api_log,
            &[
                ("path", Some("/pq")),
                ("caller", Some(&id("web"))),
                ("tls_group", hybrid),
            ],
        );
    }

    // openssl s_client offering only classical groups: X25519, and the request passes.
    let out = s_client_classical(&api_in, &web_svid);
    assert!(
        out.contains("Server Temp Key: X25519"),
        "s_client did not negotiate X25519:\n{out}"
    );
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert_record(
        &api_log,
        &[("path", Some("/classical")), ("tls_group", Some("X25519"))],
    );
    assert!(handshakes(&api, "inbound", "api-in", "X25519") >= 1.0);

    if have_haproxy {
        // haproxy calling api's inbound listener with web's SVID: X25519.
        let haproxy_out = local_addr();
        let _client = start_haproxy(
            dir,
            "haproxy-client",
            &format!(
                "{HAPROXY_GLOBAL}
frontend out
    bind {haproxy_out}
    default_backend api
backend api
    server api {api_in} ssl verify required ca-file {ca} crt {crt}
",
                ca = web_svid.join("bundle.0.pem").display(),
                crt = haproxy_crt(&web_svid).display(),
            ),
            &haproxy_out,
        );
        let r = request_once(&haproxy_out, "GET", "/from-haproxy").unwrap();
        assert_eq!(r.status, 200);
        assert_record(
            &api_log,
            &[
                ("path", Some("/from-haproxy")),
                ("caller", Some(&id("web"))),
                ("tls_group", Some("X25519")),
            ],
        );

        // web's outbound listener calling haproxy, which presents api's SVID: X25519.
        let api_svid = dir.join("api-svid");
        fetch_svid(&node2.agent.socket, &api_svid);
        let _server = start_haproxy(
            dir,
            "haproxy-server",
            &format!(
                "{HAPROXY_GLOBAL}
frontend in
    bind {haproxy_in} ssl crt {crt} ca-file {ca} verify required
    default_backend app
backend app
    server app {app}
",
                ca = api_svid.join("bundle.0.pem").display(),
                crt = haproxy_crt(&api_svid).display(),
                app = http.addr(),
            ),
            &haproxy_in,
        );
        let r = request_once(&web_to_haproxy, "GET", "/to-haproxy").unwrap();
        assert_eq!(r.status, 200);
        assert_record(
            &web_log,
            &[
                ("listener", Some("to-haproxy")),
                ("callee", Some(&id("api"))),
                ("tls_group", Some("X25519")),
            ],
        );
        assert!(handshakes(&web, "outbound", "to-haproxy", "X25519") >= 1.0);
    }
}
