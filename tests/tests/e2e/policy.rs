//! The central policy enforced by proxies (`policy_source = "agent"`): before any policy the
//! proxy refuses every caller and says why on /readyz; `meshid-ca policy apply` changes its
//! decisions within a second (allow, then an L7 restriction); an invalid apply is refused and
//! nothing changes; with its agent stopped the proxy keeps enforcing the last revision.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use meshid_tests::{wait_for, Ca, Proxy};

use crate::proxy::support::{
    create_entry, id, inbound, local_addr, outbound, proxy_head, request_once, serial, start_node,
    HttpBackend,
};

const ALLOW: &str = "name: team-api
default: deny
rules:
  - name: web-to-api
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/api\"]
";

/// Only GET /v1/** now.
const L7: &str = "name: team-api
default: deny
rules:
  - name: web-to-api-v1
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/api\"]
    http: {methods: [GET], paths: [\"/v1/**\"]}
";

fn status(addr: &str, path: &str) -> u16 {
    request_once(addr, "GET", path).map_or(0, |r| r.status)
}

/// Applies `text` as document team-api; returns when the command returned.
fn apply(ca: &Ca, dir: &std::path::Path, text: &str) -> std::process::Output {
    let file = dir.join("team-api.yaml");
    std::fs::write(&file, text).unwrap();
    meshid_tests::ca_cli(&ca.socket, &["policy", "apply", file.to_str().unwrap()])
}

/// Waits up to a second for GET `path` through web's proxy to answer `want`; the time taken.
fn within_a_second(web_out: &str, path: &str, want: u16) -> Duration {
    let t0 = Instant::now();
    loop {
        let got = status(web_out, path);
        if got == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "GET {path} answered {got}, not {want}, a second after the apply"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn proxies_enforce_the_central_policy_from_their_agent() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (t1, t2) = (ca.join_token(), ca.join_token());
    create_entry(&ca, "web", &id("web"), &t1.1, "1h");
    create_entry(&ca, "api", &id("api"), &t2.1, "1h");
    let node1 = start_node(dir, "node1", &ca, t1);
    let mut node2 = start_node(dir, "node2", &ca, t2);
    let backend = HttpBackend::start();
    let api_in = local_addr();
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(
            dir,
            "api",
            &node2,
            &id("api"),
            None,
            "policy_source = \"agent\"\n",
        ) + &inbound("api-in", &api_in, backend.addr(), 8080, "http")),
    );
    let web_out = local_addr();
    let mut web = Proxy::start(
        dir,
        "web",
        &(proxy_head(dir, "web", &node1, &id("web"), None, "")
            + &outbound("to-api", &web_out, &api_in, &id("api"))),
    );
    web.wait_ready(Duration::from_secs(30));

    // No central policy yet: api's proxy refuses every caller, and is not ready, saying why.
    let (code, body) = wait_for(
        Duration::from_secs(10),
        "api's proxy answering /readyz",
        || meshid_tests::http_get(&api.ops_address, "/readyz"),
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no central policy"), "{body}");
    assert_eq!(status(&web_out, "/v1/x"), 403);

    // Apply: allowed within a second; the proxy is ready and shows the revision.
    let out = apply(&ca, dir, ALLOW);
    assert!(out.status.success(), "{out:?}");
    let took = within_a_second(&web_out, "/v1/x", 200);
    eprintln!("policy apply -> allowed at api's proxy: {took:?}");
    api.wait_ready(Duration::from_secs(5));
    assert_eq!(api.metric("meshid_proxy_policy_revision", &[]), 1.0);

    // An L7 restriction: /admin is refused within a second, /v1 still allowed.
    let out = apply(&ca, dir, L7);
    assert!(out.status.success(), "{out:?}");
    let took = within_a_second(&web_out, "/admin", 403);
    eprintln!("policy apply (L7) -> refused at api's proxy: {took:?}");
    assert_eq!(status(&web_out, "/v1/x"), 200);

    // An invalid apply is refused with its position; nothing changes anywhere.
    let out = apply(
        &ca,
        dir,
        &L7.replace("methods: [GET]", "methods: [\"G T\"]"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("team-api.yaml:"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(api.metric("meshid_proxy_policy_revision", &[]), 2.0);
    assert_eq!(
        (status(&web_out, "/admin"), status(&web_out, "/v1/x")),
        (403, 200)
    );

    // api's agent stopped: its proxy keeps enforcing revision 2.
    node2.agent.proc.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (status(&web_out, "/admin"), status(&web_out, "/v1/x")),
        (403, 200)
    );
    assert_eq!(api.metric("meshid_proxy_policy_revision", &[]), 2.0);
    drop((api, web, node1, node2, backend, ca));
}
