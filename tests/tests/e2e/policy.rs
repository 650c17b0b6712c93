//! The central policy enforced by proxies (`policy_source = "agent"`), end to end with two
//! agents and four proxies: before any policy a proxy refuses every caller and says why on
//! /readyz; `meshid-ca policy apply` changes the decisions of every proxy within a second (L4
//! and L7 rules), and the CA records when every agent had handed it to every proxy; an invalid
//! apply is refused and nothing changes; with the CA stopped the proxies keep enforcing the
//! last revision; with an agent stopped its proxies keep enforcing, a proxy restarted meanwhile
//! comes back with the last revision (its `policy_cache`), and once the agent is back they
//! follow the next change (a rollback) like the others. (That a workload's stream holds only
//! the rules that concern it: `agent::the_central_policy_reaches_the_agent_...`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use meshid_tests::{wait_for, Ca, Proxy};

use crate::proxy::support::{
    create_entry, id, inbound, local_addr, opaque_exchange, outbound, proxy_head, request_once,
    serial, start_node, wait_ready, EchoBackend, HttpBackend, Node, Opaque,
};

/// Revision 1: web may GET /v1/** on api and reach db; api may reach cache and web.
const OPEN: &str = "name: mesh
default: deny
rules:
  - name: web-to-api
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/api\"]
    http: {methods: [GET], paths: [\"/v1/**\"]}
  - name: web-to-db
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/db\"]
  - name: api-to-cache
    from: [\"spiffe://example.org/api\"]
    to: [\"spiffe://example.org/cache\"]
  - name: api-to-web
    from: [\"spiffe://example.org/api\"]
    to: [\"spiffe://example.org/web\"]
";

/// Revision 2: a change at every proxy: api only /v2/** (L7), db and cache closed (L4), web
/// only /health (L7).
const CLOSED: &str = "name: mesh
default: deny
rules:
  - name: web-to-api
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/api\"]
    http: {methods: [GET], paths: [\"/v2/**\"]}
  - name: api-to-web
    from: [\"spiffe://example.org/api\"]
    to: [\"spiffe://example.org/web\"]
    http: {paths: [\"/health\"]}
";

fn status(addr: &str, path: &str) -> u16 {
    request_once(addr, "GET", path).map_or(0, |r| r.status)
}

/// Applies `text` as document mesh; returns when the command returned.
fn apply(ca: &Ca, dir: &std::path::Path, text: &str) -> std::process::Output {
    let file = dir.join("mesh-policy.yaml");
    std::fs::write(&file, text).unwrap();
    meshid_tests::ca_cli(
        &ca.socket,
        &["policy", "apply", file.to_str().unwrap(), "--name", "mesh"],
    )
}

/// The listeners the decisions are observed through.
struct Mesh {
    /// web's outbound listeners to api and db.
    web_to_api: String,
    web_to_db: String,
    /// api's outbound listeners to cache and web.
    api_to_cache: String,
    api_to_web: String,
}

/// What each proxy decides, as seen by the callers: api's proxy (GET /v1/x, GET /admin), db's
/// and cache's (echo or closed), web's (GET /).
type Decisions = (u16, u16, bool, bool, u16);

impl Mesh {
    fn decisions(&self) -> Decisions {
        let echoed = |addr: &str| opaque_exchange(addr, b"ping") == Opaque::Echoed;
        (
            status(&self.web_to_api, "/v1/x"),
            status(&self.web_to_api, "/admin"),
            echoed(&self.web_to_db),
            echoed(&self.api_to_cache),
            status(&self.api_to_web, "/"),
        )
    }

    /// Waits up to a second for the decisions to be `want`; the time taken.
    fn within_a_second(&self, want: Decisions) -> Duration {
        let t0 = Instant::now();
        loop {
            let got = self.decisions();
            if got == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "the proxies decide {got:?}, not {want:?}, a second after the change"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const DECIDE_OPEN: Decisions = (200, 403, true, true, 200);
const DECIDE_CLOSED: Decisions = (403, 403, false, false, 403);

fn revisions(proxies: &[&Proxy]) -> Vec<f64> {
    proxies
        .iter()
        .map(|p| p.metric("meshid_proxy_policy_revision", &[]))
        .collect()
}

/// The policy revision each agent reported handed to every proxy following it.
fn delivered(ca: &Ca) -> Vec<u64> {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&ca.ok(&["agent", "list", "--output", "json"])).unwrap();
    let mut v: Vec<u64> = list
        .iter()
        .map(|a| a["policy_revision"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn two_agents_four_proxies_follow_the_central_policy() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut ca = Ca::start(dir, &[]);
    let (t1, t2) = (ca.join_token(), ca.join_token());
    create_entry(&ca, "web", &id("web"), &t1.1, "1h");
    create_entry(&ca, "cache", &id("cache"), &t1.1, "1h");
    create_entry(&ca, "api", &id("api"), &t2.1, "1h");
    create_entry(&ca, "db", &id("db"), &t2.1, "1h");
    let node1 = start_node(dir, "node1", &ca, t1);
    let mut node2 = start_node(dir, "node2", &ca, t2);
    let (http, echo) = (HttpBackend::start(), EchoBackend::start());
    let (web_in, api_in, db_in, cache_in) =
        (local_addr(), local_addr(), local_addr(), local_addr());
    let mesh = Mesh {
        web_to_api: local_addr(),
        web_to_db: local_addr(),
        api_to_cache: local_addr(),
        api_to_web: local_addr(),
    };
    let central = |name: &str| {
        format!(
            "policy_source = \"agent\"\npolicy_cache = \"{}\"\n",
            dir.join(format!("{name}-policy.json")).display()
        )
    };
    let head =
        |name: &str, node: &Node| proxy_head(dir, name, node, &id(name), None, &central(name));
    let mut web = Proxy::start(
        dir,
        "web",
        &(head("web", &node1)
            + &inbound("web-in", &web_in, http.addr(), 8080, "http")
            + &outbound("to-api", &mesh.web_to_api, &api_in, &id("api"))
            + &outbound("to-db", &mesh.web_to_db, &db_in, &id("db"))),
    );
    let mut api = Proxy::start(
        dir,
        "api",
        &(head("api", &node2)
            + &inbound("api-in", &api_in, http.addr(), 8080, "http")
            + &outbound("to-cache", &mesh.api_to_cache, &cache_in, &id("cache"))
            + &outbound("to-web", &mesh.api_to_web, &web_in, &id("web"))),
    );
    let db_config = head("db", &node2) + &inbound("db-in", &db_in, echo.addr(), 5432, "tcp");
    let mut db = Proxy::start(dir, "db", &db_config);
    let mut cache = Proxy::start(
        dir,
        "cache",
        &(head("cache", &node1) + &inbound("cache-in", &cache_in, echo.addr(), 6379, "tcp")),
    );

    // No central policy yet: every proxy refuses every caller, and is not ready, saying why.
    for p in [&web, &api, &db, &cache] {
        let (code, body) = wait_for(Duration::from_secs(20), "a proxy answering /readyz", || {
            meshid_tests::http_get(&p.ops_address, "/readyz")
                .filter(|(_, body)| body.contains("no central policy"))
        });
        assert_eq!(code, 503, "{body}");
    }
    // (Once the proxies hold their SVIDs: until then a call fails instead of being refused.)
    wait_for(Duration::from_secs(20), "every proxy refusing", || {
        (mesh.decisions() == (403, 403, false, false, 403)).then_some(())
    });

    // Revision 1, then 2: each changes the decisions of all four proxies within a second.
    for (n, text, want) in [(1, OPEN, DECIDE_OPEN), (2, CLOSED, DECIDE_CLOSED)] {
        let out = apply(&ca, dir, text);
        assert!(out.status.success(), "{out:?}");
        if n == 1 {
            wait_ready(&mut [&mut web, &mut api, &mut db, &mut cache]);
        }
        let took = mesh.within_a_second(want);
        eprintln!("policy apply (revision {n}) -> every proxy decides anew: {took:?}");
        // The CA measured it: every agent reported the revision handed to every proxy.
        let effect = crate::effect(&ca, "policy.apply", n - 1, Duration::from_secs(5));
        assert_eq!(effect["revision"], n as u64, "{effect}");
        eprintln!("in effect as the CA measured it: {} ms", effect["after_ms"]);
        assert!(effect["after_ms"].as_u64().unwrap() < 1000, "{effect}");
        assert_eq!(delivered(&ca), vec![n as u64; 2]);
    }
    assert_eq!(revisions(&[&web, &api, &db, &cache]), vec![2.0; 4]);

    // An invalid apply is refused with its position; nothing changes anywhere.
    let out = apply(
        &ca,
        dir,
        &OPEN.replace("methods: [GET]", "methods: [\"G T\"]"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mesh-policy.yaml:"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(revisions(&[&web, &api, &db, &cache]), vec![2.0; 4]);
    assert_eq!(mesh.decisions(), DECIDE_CLOSED);

    // The CA stopped: every proxy keeps enforcing revision 2.
    ca.proc.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mesh.decisions(), DECIDE_CLOSED);
    assert_eq!(revisions(&[&web, &api, &db, &cache]), vec![2.0; 4]);
    ca.restart();

    // node2's agent stopped: api and db keep enforcing; db restarted meanwhile comes back with
    // revision 2 from its cache (not ready for want of its SVID, not of a policy).
    node2.agent.proc.stop();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mesh.decisions(), DECIDE_CLOSED);
    drop(db);
    let mut db = Proxy::start(dir, "db-restarted", &db_config);
    let (code, body) = wait_for(
        Duration::from_secs(20),
        "db's proxy answering /readyz",
        || meshid_tests::http_get(&db.ops_address, "/readyz"),
    );
    assert_eq!(code, 503, "{body}");
    assert!(!body.contains("no central policy"), "{body}");
    assert_eq!(db.metric("meshid_proxy_policy_revision", &[]), 2.0);
    let cached = dir.join("db-policy.json");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cached).unwrap().permissions())
            & 0o777,
        0o600
    );

    // node2's agent back: its proxies resync and follow the next change (a rollback to
    // revision 1, as revision 3) like the others.
    node2.agent.restart(&dir.join("node2"), &ca);
    wait_ready(&mut [&mut db]);
    assert_eq!(mesh.decisions(), DECIDE_CLOSED);
    let out = meshid_tests::ca_cli(&ca.socket, &["policy", "rollback", "1"]);
    assert!(out.status.success(), "{out:?}");
    let took = mesh.within_a_second(DECIDE_OPEN);
    eprintln!("policy rollback (revision 3) -> every proxy decides anew: {took:?}");
    let effect = crate::effect(&ca, "policy.rollback", 0, Duration::from_secs(5));
    assert_eq!(effect["revision"], 3, "{effect}");
    assert_eq!(revisions(&[&web, &api, &db, &cache]), vec![3.0; 4]);
    drop((web, api, db, cache, node1, node2, http, echo, ca));
}
