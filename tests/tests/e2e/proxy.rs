//! `meshid-proxy` end to end: the real `meshid-ca`, `meshid-agent` and `meshid-proxy` binaries,
//! with plain backends written here. Each test runs a CA and one agent per "node" (the proxies
//! all run as this uid, so their identities come from different agents, or from one agent with
//! the `spiffe_id` pick), and talks to the proxies as applications do: plaintext into an
//! outbound listener, mTLS from the peer proxy into an inbound listener, plaintext to the
//! backend.
//!
//! - `proxy_table`: policy decisions (allow, default deny, deny beats allow, audit, L7 method
//!   and path rules, path normalization, opaque TCP, h2c streams on one connection, outbound
//!   peer mismatch), with the proxy log, the access log and the decision metrics of each case.
//! - `proxy_handshake_corpus`: the malformed-SVID corpus presented to an inbound listener by a
//!   raw rustls client: each refused during the handshake with its metric reason.
//! - `proxy_rotation_under_load`: 4 s SVIDs, at least 10 rotations on both proxies under
//!   keep-alive and new-connection traffic, with no failed request and no dropped connection.
//! - `proxy_policy_reload_under_load`: valid and invalid policy writes under traffic: valid ones
//!   apply within a second, invalid ones change nothing and are logged with file:line:column.
//! - `proxy_readiness_and_drain`: not ready (and refusing) until the SVID arrives; SIGTERM
//!   finishes the in-flight request, refuses new connections and exits 0 within the grace time.
//! - `proxy_config_check`: `run --check`, and exit 64 on a bad config or an invalid policy.
//! - `key_exchange::proxy_key_exchange_is_hybrid_post_quantum_with_classical_fallback`:
//!   X25519MLKEM768 between meshid hops (and on the node API), with pyOpenSSL on OpenSSL 3.5+;
//!   X25519 with `openssl s_client` offering only classical groups and with haproxy on either
//!   side; the group in the access log and the handshake metrics.
//! - `limits::proxy_limits_refuse_and_close_with_their_metric`: each resource limit hit
//!   (max_connections, http_header_timeout, http_max_header_bytes, idle_timeout), refused or
//!   closed, counted and logged.
//! - `proxy_upgrades_are_decided_and_h2c_never_passes`: an h2c offer never reaches the
//!   application (the review's smuggling attack, with curl and hypercorn), hop-by-hop headers
//!   are stripped, a WebSocket passes only where a rule names it, and is accounted when it ends.
//!
//! The tests that start a mesh take a process-wide lock and run one at a time (each starts
//! five or more processes, and some measure latencies). Every process is killed and every
//! temporary directory removed on drop, so a failing test leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "proxy/h1.rs"]
mod h1;
#[path = "proxy/h2.rs"]
mod h2;
#[path = "proxy/key_exchange.rs"]
mod key_exchange;
#[path = "proxy/limits.rs"]
mod limits;
#[path = "proxy/support.rs"]
pub(crate) mod support;
#[path = "proxy/tls_client.rs"]
pub(crate) mod tls_client;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshid_tests::{Ca, Proxy};
use support::*;

const DECISIONS: &str = "meshid_proxy_decisions_total";
const HANDSHAKE_FAILURES: &str = "meshid_proxy_handshake_failures_total";
const ROTATIONS: &str = "meshid_proxy_svid_rotations_total";
const RELOADS: &str = "meshid_proxy_policy_reloads_total";
const REFUSED: &str = "refused by policy";
const AUDITED: &str = "audit: would be refused by policy; allowed";

/// Polls `f` every 50 ms for up to `timeout`; its last value.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let v = f();
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets the flag when dropped, so that client threads stop even when the test panics.
pub(crate) struct StopOnDrop<'a>(pub(crate) &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// =============================================================================================
// proxy_table

const TABLE_POLICY: &str = r#"name: table
default: deny
ports: {8080: http, 9000: tcp}
rules:
  - name: web-read-public
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {methods: [GET, HEAD], paths: ["/public/**"]}
  - name: web-write-orders
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {methods: [POST, PUT], paths: ["/orders/*"]}
  - name: anyone-reads-status
    from: ["spiffe://example.org/*"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {methods: [GET], paths: ["/status"]}
  - name: web-internal
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {paths: ["/internal/**"]}
  - name: deny-internal-secrets
    action: deny
    from: ["spiffe://example.org/**"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {paths: ["/internal/secrets/**"]}
  - name: deny-intruder
    action: deny
    from: ["spiffe://example.org/intruder"]
    to: ["spiffe://example.org/**"]
  - name: web-legacy
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {paths: ["/legacy/**"]}
  - name: audit-legacy
    action: deny
    mode: audit
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {paths: ["/legacy/**"]}
  - name: web-tcp
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [9000]
"#;

#[derive(Clone, Copy, Debug)]
enum Client {
    Web,
    Intruder,
}

impl Client {
    fn id(self) -> String {
        match self {
            Client::Web => id("web"),
            Client::Intruder => id("intruder"),
        }
    }
}

#[derive(Debug)]
enum Request {
    /// One HTTP/1.1 request on a new connection.
    Http {
        method: &'static str,
        path: &'static str,
    },
    /// Bytes on a new connection to the opaque listener.
    Tcp,
}

#[derive(Debug)]
enum Expected {
    /// Reached the backend (`200` with `path`, the normalized path; or echoed), allowed by
    /// `rule`; `audit`: an audit-mode deny matched (decision `audit_deny`, by `rule`).
    Pass {
        path: &'static str,
        rule: &'static str,
        audit: bool,
    },
    /// Refused by policy (`403` for HTTP, closed for opaque), decided by `rule`.
    Refused { rule: &'static str },
}

struct Case {
    name: &'static str,
    client: Client,
    request: Request,
    expected: Expected,
}

fn table_cases() -> Vec<Case> {
    use Client::*;
    use Expected::*;
    let http = |method, path| Request::Http { method, path };
    let pass = |path, rule| Pass {
        path,
        rule,
        audit: false,
    };
    vec![
        Case {
            name: "allowed GET on an L7 rule",
            client: Web,
            request: http("GET", "/public/index.html"),
            expected: pass("/public/index.html", "web-read-public"),
        },
        Case {
            name: "wrong method for the L7 rule",
            client: Web,
            request: http("DELETE", "/public/index.html"),
            expected: Refused { rule: "<default>" },
        },
        Case {
            name: "wrong path for the L7 rule",
            client: Web,
            request: http("GET", "/private/index.html"),
            expected: Refused { rule: "<default>" },
        },
        Case {
            name: "path normalized before matching",
            client: Web,
            request: http("GET", "/public/../private/index.html"),
            expected: Refused { rule: "<default>" },
        },
        Case {
            name: "allowed write, `*` is one segment",
            client: Web,
            request: http("POST", "/orders/42"),
            expected: pass("/orders/42", "web-write-orders"),
        },
        Case {
            name: "`*` does not match two segments",
            client: Web,
            request: http("POST", "/orders/42/items"),
            expected: Refused { rule: "<default>" },
        },
        Case {
            name: "allow rule without methods",
            client: Web,
            request: http("PUT", "/internal/config"),
            expected: pass("/internal/config", "web-internal"),
        },
        Case {
            name: "deny rule beats allow rule",
            client: Web,
            request: http("GET", "/internal/secrets/key"),
            expected: Refused {
                rule: "deny-internal-secrets",
            },
        },
        Case {
            name: "pattern caller allowed",
            client: Web,
            request: http("GET", "/status"),
            expected: pass("/status", "anyone-reads-status"),
        },
        Case {
            name: "caller outside policy, deny beats the pattern allow",
            client: Intruder,
            request: http("GET", "/status"),
            expected: Refused {
                rule: "deny-intruder",
            },
        },
        Case {
            name: "caller outside policy on a path only web may use",
            client: Intruder,
            request: http("GET", "/public/index.html"),
            expected: Refused {
                rule: "deny-intruder",
            },
        },
        Case {
            name: "audit-mode deny logs and allows",
            client: Web,
            request: http("GET", "/legacy/report"),
            expected: Pass {
                path: "/legacy/report",
                rule: "audit-legacy",
                audit: true,
            },
        },
        Case {
            name: "opaque TCP allowed",
            client: Web,
            request: Request::Tcp,
            expected: pass("", "web-tcp"),
        },
        Case {
            name: "opaque TCP from a caller outside policy closed",
            client: Intruder,
            request: Request::Tcp,
            expected: Refused {
                rule: "deny-intruder",
            },
        },
    ]
}

#[test]
fn proxy_table() {
    let _serial = serial();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (t1, t2) = (ca.join_token(), ca.join_token());
    create_entry(&ca, "web", &id("web"), &t1.1, "1h");
    create_entry(&ca, "intruder", &id("intruder"), &t1.1, "1h");
    create_entry(&ca, "api", &id("api"), &t2.1, "1h");
    let node1 = start_node(dir, "node1", &ca, t1);
    let node2 = start_node(dir, "node2", &ca, t2);
    let backend = HttpBackend::start();
    let echo = EchoBackend::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let h2_backend = rt.block_on(h2::H2Backend::start());
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, TABLE_POLICY).unwrap();

    let (api_http, api_tcp, api_h2) = (local_addr(), local_addr(), local_addr());
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(dir, "api", &node2, &id("api"), Some(&policy), "")
            + &inbound("api-http", &api_http, backend.addr(), 8080, "detect")
            + &inbound("api-tcp", &api_tcp, echo.addr(), 9000, "tcp")
            + &inbound("api-h2", &api_h2, &h2_backend.addr, 8080, "detect")),
    );
    let (web_http, web_tcp, web_wrong, web_h2) =
        (local_addr(), local_addr(), local_addr(), local_addr());
    let mut web = Proxy::start(
        dir,
        "web",
        &(proxy_head(dir, "web", &node1, &id("web"), None, "")
            + &outbound("web-http", &web_http, &api_http, &id("api"))
            + &outbound("web-tcp", &web_tcp, &api_tcp, &id("api"))
            + &outbound("web-wrong", &web_wrong, &api_http, &id("db/*"))
            + &outbound("web-h2", &web_h2, &api_h2, &id("api"))),
    );
    let (intruder_http, intruder_tcp, intruder_h2) = (local_addr(), local_addr(), local_addr());
    let mut intruder = Proxy::start(
        dir,
        "intruder",
        &(proxy_head(dir, "intruder", &node1, &id("intruder"), None, "")
            + &outbound("intruder-http", &intruder_http, &api_http, &id("api"))
            + &outbound("intruder-tcp", &intruder_tcp, &api_tcp, &id("api"))
            + &outbound("intruder-h2", &intruder_h2, &api_h2, &id("api"))),
    );
    wait_ready(&mut [&mut api, &mut web, &mut intruder]);
    eprintln!("proxy_table: mesh ready after {:?}", started.elapsed());
    assert_eq!(
        meshid_tests::http_get(&api.ops_address, "/healthz").map(|r| r.0),
        Some(200)
    );
    let api_access = access_log_path(dir, "api");

    for case in table_cases() {
        let name = case.name;
        let caller = case.client.id();
        let (rule, decision) = match case.expected {
            Expected::Pass { rule, audit, .. } => {
                (rule, if audit { "audit_deny" } else { "allow" })
            }
            Expected::Refused { rule } => (rule, "deny"),
        };
        let listener = match case.request {
            Request::Http { .. } => "api-http",
            Request::Tcp => "api-tcp",
        };
        let metric_labels = [("policy", "table"), ("rule", rule), ("decision", decision)];
        let metric_before = api.metric(DECISIONS, &metric_labels);
        let log_message = match decision {
            "deny" => Some(REFUSED),
            "audit_deny" => Some(AUDITED),
            _ => None,
        };
        let log_fields = [
            ("caller", caller.as_str()),
            ("rule", rule),
            ("policy", "table"),
            ("listener", listener),
        ];
        let events_before = log_message.map_or(0, |m| count_events(&api, m, &log_fields));
        let (requests_before, echo_before) = (backend.requests(), echo.connections());

        let mut want_record: Vec<(&str, Option<&str>)> = vec![
            ("direction", Some("inbound")),
            ("listener", Some(listener)),
            ("caller", Some(&caller)),
            ("policy", Some("table")),
            ("rule", Some(rule)),
            ("decision", Some(decision)),
        ];
        let api_id = id("api");
        want_record.push(("callee", Some(&api_id)));
        let status_text;
        match case.request {
            Request::Http { method, path } => {
                let addr = match case.client {
                    Client::Web => &web_http,
                    Client::Intruder => &intruder_http,
                };
                let r = request_once(addr, method, path)
                    .unwrap_or_else(|e| panic!("{name}: {method} {path}: {e}"));
                match case.expected {
                    Expected::Pass { path: seen, .. } => {
                        assert_eq!(r.status, 200, "{name}: {r:?}");
                        assert!(
                            r.body.starts_with(&format!("{method} {seen} conn=")),
                            "{name}: the backend answered {r:?}"
                        );
                        assert_eq!(backend.requests(), requests_before + 1, "{name}");
                    }
                    Expected::Refused { .. } => {
                        assert_eq!(r.status, 403, "{name}: {r:?}");
                        assert_eq!(r.body, "forbidden\n", "{name}: no internals in the body");
                        assert_eq!(
                            backend.requests(),
                            requests_before,
                            "{name}: the backend saw the refused request"
                        );
                    }
                }
                status_text = r.status.to_string();
                want_record.push(("kind", Some("request")));
                want_record.push(("method", Some(method)));
                want_record.push(("port", Some("8080")));
                want_record.push(("status", Some(&status_text)));
            }
            Request::Tcp => {
                let addr = match case.client {
                    Client::Web => &web_tcp,
                    Client::Intruder => &intruder_tcp,
                };
                let got = opaque_exchange(addr, b"ping over opaque tcp\n");
                match case.expected {
                    Expected::Pass { .. } => {
                        assert_eq!(got, Opaque::Echoed, "{name}");
                        assert_eq!(echo.connections(), echo_before + 1, "{name}");
                    }
                    Expected::Refused { .. } => {
                        assert_eq!(got, Opaque::Closed, "{name}");
                        assert_eq!(
                            echo.connections(),
                            echo_before,
                            "{name}: the backend saw the refused connection"
                        );
                    }
                }
                want_record.push(("kind", Some("connection")));
                want_record.push(("port", Some("9000")));
            }
        }

        // Decisions by rule, in the metrics.
        let after = poll(
            Duration::from_secs(3),
            || api.metric(DECISIONS, &metric_labels),
            |v| *v > metric_before,
        );
        assert_eq!(
            after,
            metric_before + 1.0,
            "{name}: {DECISIONS}{metric_labels:?}"
        );
        // The proxy's log names the caller and the deciding rule.
        if let Some(message) = log_message {
            wait_event(&api, events_before, message, &log_fields);
        }
        // The access log line.
        assert!(
            wait_record(&api_access, &want_record, Duration::from_secs(5)),
            "{name}: no access log record with {want_record:?} in:\n{}",
            tail(
                &std::fs::read_to_string(&api_access).unwrap_or_default(),
                10
            )
        );
        eprintln!("proxy_table: ok: {name}");
    }

    // An audited request appears as such in the access log, with the path the backend saw.
    assert!(json_lines(&api_access).iter().any(|r| record_matches(
        r,
        &[
            ("path", Some("/legacy/report")),
            ("decision", Some("audit_deny")),
            ("status", Some("200")),
        ]
    )));
    // Refused requests carry no bytes from the backend; access records have the documented
    // fields.
    for r in json_lines(&api_access) {
        for key in [
            "timestamp",
            "kind",
            "direction",
            "listener",
            "decision",
            "bytes_in",
            "bytes_out",
            "duration_ms",
        ] {
            assert!(r.get(key).is_some(), "access record without {key}: {r}");
        }
    }

    // h2c (detected): one decision per stream on one multiplexed connection, the backend
    // reached over HTTP/2, and refused streams leave the connection open.
    let h2_before = h2_backend.requests();
    let h2_cases: [(&str, &str, u16); 5] = [
        ("GET", "/public/h2", 200),
        ("DELETE", "/public/h2", 403),
        ("GET", "/internal/secrets/h2", 403),
        ("POST", "/orders/7", 200),
        ("GET", "/legacy/h2", 200),
    ];
    rt.block_on(async {
        let conn = h2::H2Client::connect(&web_h2).await;
        let results = futures::future::join_all(
            h2_cases
                .iter()
                .map(|(method, path, _)| conn.request(method, path)),
        )
        .await;
        for ((method, path, want), got) in h2_cases.iter().zip(results) {
            let (status, body) = got.unwrap_or_else(|e| panic!("h2 {method} {path}: {e}"));
            assert_eq!(status, *want, "h2 {method} {path}: {body}");
            if *want == 200 {
                assert_eq!(body, format!("{method} {path} HTTP/2.0\n"));
            } else {
                assert_eq!(body, "forbidden\n");
            }
        }
        assert!(conn.is_open(), "refused streams closed the h2 connection");
        let again = conn.request("GET", "/public/again").await;
        assert_eq!(
            again.map(|r| r.0),
            Ok(200),
            "the h2 connection works after refusals"
        );
        let intruder_conn = h2::H2Client::connect(&intruder_h2).await;
        let refused = intruder_conn.request("GET", "/status").await;
        assert_eq!(refused, Ok((403, "forbidden\n".to_owned())));
    });
    assert_eq!(
        h2_backend.requests(),
        h2_before + 4,
        "only the allowed h2 requests reached the backend"
    );
    for want in [
        [
            ("listener", Some("api-h2")),
            ("method", Some("DELETE")),
            ("path", Some("/public/h2")),
            ("status", Some("403")),
            ("rule", Some("<default>")),
            ("decision", Some("deny")),
        ],
        [
            ("listener", Some("api-h2")),
            ("method", Some("GET")),
            ("path", Some("/internal/secrets/h2")),
            ("status", Some("403")),
            ("rule", Some("deny-internal-secrets")),
            ("decision", Some("deny")),
        ],
        [
            ("listener", Some("api-h2")),
            ("method", Some("GET")),
            ("path", Some("/legacy/h2")),
            ("status", Some("200")),
            ("rule", Some("audit-legacy")),
            ("decision", Some("audit_deny")),
        ],
        [
            ("listener", Some("api-h2")),
            ("method", Some("GET")),
            ("path", Some("/status")),
            ("status", Some("403")),
            ("rule", Some("deny-intruder")),
            ("caller", Some("spiffe://example.org/intruder")),
        ],
    ] {
        assert!(
            wait_record(&api_access, &want, Duration::from_secs(5)),
            "no h2 access record {want:?}"
        );
    }

    // The outbound side logs its connections too.
    let web_access = access_log_path(dir, "web");
    let want = [
        ("kind", Some("connection")),
        ("direction", Some("outbound")),
        ("listener", Some("web-http")),
        ("caller", Some("spiffe://example.org/web")),
        ("callee", Some("spiffe://example.org/api")),
    ];
    assert!(
        wait_record(&web_access, &want, Duration::from_secs(5)),
        "no outbound access record {want:?} in {}",
        web_access.display()
    );

    // Outbound: a server whose SVID does not match `expect` is refused during the handshake;
    // the application sees its connection closed and nothing reaches the backend.
    let before = web.metric(
        HANDSHAKE_FAILURES,
        &[
            ("direction", "outbound"),
            ("listener", "web-wrong"),
            ("reason", "unexpected_peer"),
        ],
    );
    let requests_before = backend.requests();
    let r = request_once(&web_wrong, "GET", "/public/index.html");
    assert!(r.is_err(), "a request to an unexpected peer got {r:?}");
    assert_eq!(backend.requests(), requests_before);
    let after = poll(
        Duration::from_secs(3),
        || {
            web.metric(
                HANDSHAKE_FAILURES,
                &[
                    ("direction", "outbound"),
                    ("listener", "web-wrong"),
                    ("reason", "unexpected_peer"),
                ],
            )
        },
        |v| *v > before,
    );
    assert_eq!(
        after,
        before + 1.0,
        "outbound unexpected_peer failure counted"
    );

    // Listener metrics.
    let metrics = api.metrics();
    let m =
        |name: &str, labels: &[(&str, &str)]| meshid_tests::metric_value(&metrics, name, labels);
    let http_cases = table_cases()
        .iter()
        .filter(|c| matches!(c.request, Request::Http { .. }))
        .count() as f64;
    assert_eq!(
        m(
            "meshid_proxy_http_requests_total",
            &[("direction", "inbound"), ("listener", "api-http")]
        ),
        http_cases,
        "{metrics}"
    );
    assert!(
        m(
            "meshid_proxy_connections_total",
            &[("direction", "inbound"), ("listener", "api-tcp")]
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        m(
            "meshid_proxy_bytes_total",
            &[
                ("direction", "inbound"),
                ("listener", "api-tcp"),
                ("flow", "rx")
            ]
        ) >= 21.0,
        "{metrics}"
    );
    assert!(
        m(
            "meshid_proxy_bytes_total",
            &[
                ("direction", "inbound"),
                ("listener", "api-tcp"),
                ("flow", "tx")
            ]
        ) >= 21.0,
        "{metrics}"
    );
    assert!(
        m("meshid_proxy_svid_expiry_timestamp_seconds", &[]) > 1.7e9,
        "{metrics}"
    );
    assert_eq!(
        m(
            "meshid_proxy_open_connections",
            &[("direction", "inbound"), ("listener", "api-tcp")]
        ),
        0.0,
        "{metrics}"
    );
    for p in [&mut api, &mut web, &mut intruder] {
        p.proc.check_alive();
    }
    eprintln!("proxy_table: {:?}", started.elapsed());
}

// =============================================================================================
// proxy_handshake_corpus

/// The corpus of malformed SVIDs, checked in by the verifier's author.
fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ca/api/tests/testdata/svid")
}

/// Each corpus file and the handshake failure reason the proxy must report for it (`None`:
/// accepted), read from the corpus README's `- \`file\`: ...; handshake: \`reason\`` lines.
fn corpus_cases(dir: &Path) -> Vec<(String, Option<String>)> {
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let mut cases = Vec::new();
    for line in readme.lines() {
        let Some(rest) = line.strip_prefix("- `") else {
            continue;
        };
        let Some((file, rest)) = rest.split_once('`') else {
            continue;
        };
        let Some(reason) = rest
            .rsplit_once("handshake: `")
            .and_then(|(_, r)| r.split_once('`'))
            .map(|(r, _)| r)
        else {
            continue;
        };
        cases.push((file.to_owned(), (reason != "ok").then(|| reason.to_owned())));
    }
    // Every SVID file of the corpus is described (the roots are not SVIDs).
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".pem") && !f.ends_with(".crt.pem") && !f.ends_with(".key.pem"))
        .collect();
    files.sort();
    let mut described: Vec<String> = cases.iter().map(|(f, _)| f.clone()).collect();
    described.sort();
    assert_eq!(
        files, described,
        "the corpus README describes every SVID file"
    );
    // What this test is for, at least.
    for (file, reason) in [
        ("valid.pem", None),
        ("expired.pem", Some("expired")),
        ("two-uri-sans.pem", Some("multiple_uri_sans")),
        ("signed-by-leaf.pem", Some("untrusted")),
        ("other-trust-domain.pem", Some("unknown_trust_domain")),
    ] {
        assert!(
            cases
                .iter()
                .any(|(f, r)| f == file && r.as_deref() == reason),
            "the corpus README has no {file} with handshake {reason:?}"
        );
    }
    cases
}

/// The SPIFFE ID of the corpus's valid SVID.
const CORPUS_VALID_ID: &str = "spiffe://example.org/corpus/valid";

#[test]
fn proxy_handshake_corpus() {
    let _serial = serial();
    let started = Instant::now();
    let corpus = corpus_dir();
    assert!(
        corpus.join("root.crt.pem").is_file(),
        "the malformed-SVID corpus is missing: {}",
        corpus.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The corpus root is the CA's upstream authority: corpus SVIDs chain into example.org.
    // git does not keep file modes, and the CA refuses a key readable by others, so the
    // test-only key is copied and the copy made private.
    let root_key = dir.join("corpus-root.key.pem");
    std::fs::copy(corpus.join("root.key.pem"), &root_key).unwrap();
    std::fs::set_permissions(&root_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca_config = dir.join("ca.toml");
    std::fs::write(
        &ca_config,
        format!(
            "[ca]\nupstream_cert = \"{}\"\nupstream_key = \"{}\"\n",
            corpus.join("root.crt.pem").display(),
            root_key.display()
        ),
    )
    .unwrap();
    let ca = Ca::start(dir, &["--config", &ca_config.display().to_string()]);
    let t = ca.join_token();
    create_entry(&ca, "api", &id("api"), &t.1, "1h");
    let node = start_node(dir, "node", &ca, t);
    let backend = HttpBackend::start();
    let policy = dir.join("policy.yaml");
    // Everything in the trust domain may call: what is refused is refused by the handshake.
    std::fs::write(
        &policy,
        format!(
            "name: corpus\ndefault: deny\nrules:\n  - name: valid-corpus-svid\n    from: [\"{CORPUS_VALID_ID}\"]\n    to: [\"spiffe://example.org/api\"]\n  - name: whole-trust-domain\n    from: [\"spiffe://example.org/**\"]\n    to: [\"spiffe://example.org/api\"]\n"
        ),
    )
    .unwrap();
    let listen = local_addr();
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(
            dir,
            "api",
            &node,
            &id("api"),
            Some(&policy),
            "handshake_timeout = \"3s\"\n",
        ) + &inbound("api-http", &listen, backend.addr(), 8080, "detect")),
    );
    api.wait_ready(Duration::from_secs(30));
    let request = b"GET /public/corpus HTTP/1.1\r\nhost: api.test\r\nconnection: close\r\n\r\n";
    let failures = |reason: &str| {
        api.metric(
            HANDSHAKE_FAILURES,
            &[
                ("direction", "inbound"),
                ("listener", "api-http"),
                ("reason", reason),
            ],
        )
    };

    let mut cases: Vec<(String, Option<tls_client::Identity>, Option<&str>)> = vec![(
        "no client certificate".to_owned(),
        None,
        Some("no_certificate"),
    )];
    let described = corpus_cases(&corpus);
    for (file, reason) in &described {
        cases.push((
            file.clone(),
            Some(tls_client::Identity::from_files(&corpus.join(file), None)),
            reason.as_deref(),
        ));
    }
    let mut problems = Vec::new();
    for (name, identity, reason) in &cases {
        let connections_before = backend.connections();
        let before = reason.map(failures);
        let config = tls_client::client_config(identity.as_ref());
        let out = tls_client::exchange(&listen, config, request, b"conn=");
        match reason {
            None => {
                let text = String::from_utf8_lossy(&out.received);
                if !(text.starts_with("HTTP/1.1 200") && text.contains("GET /public/corpus conn="))
                {
                    problems.push(format!(
                        "{name}: the valid SVID did not get through: {out:?}"
                    ));
                }
            }
            Some(reason) => {
                if !out.received.is_empty() {
                    problems.push(format!(
                        "{name}: application bytes arrived: {:?}",
                        String::from_utf8_lossy(&out.received)
                    ));
                }
                if backend.connections() != connections_before {
                    problems.push(format!("{name}: the backend saw a connection"));
                }
                let before = before.unwrap_or_default();
                let after = poll(Duration::from_secs(3), || failures(reason), |v| *v > before);
                if after != before + 1.0 {
                    let by_reason: Vec<String> = api
                        .metrics()
                        .lines()
                        .filter(|l| l.starts_with(HANDSHAKE_FAILURES))
                        .map(str::to_owned)
                        .collect();
                    problems.push(format!(
                        "{name}: reason={reason} went from {before} to {after} (client saw {:?}); failures now: {by_reason:?}",
                        out.error
                    ));
                } else if !log_events(&api)
                    .iter()
                    .any(|e| event_matches(e, "inbound handshake refused", &[("reason", reason)]))
                {
                    problems.push(format!(
                        "{name}: no `inbound handshake refused` log with reason={reason}"
                    ));
                }
            }
        }
        eprintln!("proxy_handshake_corpus: {name}: client saw {:?}", out.error);
    }
    assert_eq!(
        api.metric(
            DECISIONS,
            &[
                ("policy", "corpus"),
                ("rule", "valid-corpus-svid"),
                ("decision", "allow")
            ]
        ),
        1.0,
        "the valid corpus SVID was authorized by its rule"
    );
    assert_eq!(
        api.metric(
            DECISIONS,
            &[("policy", "corpus"), ("rule", "whole-trust-domain")]
        ),
        0.0,
        "no refused SVID reached the policy"
    );
    api.proc.check_alive();
    assert!(
        problems.is_empty(),
        "corpus handshakes:\n{}\nproxy log tail:\n{}",
        problems.join("\n"),
        tail(&api.proc.log_text(), 30)
    );
    eprintln!("proxy_handshake_corpus: {:?}", started.elapsed());
}

// =============================================================================================
// proxy_rotation_under_load

/// What one client thread saw.
#[derive(Default, Debug)]
pub(crate) struct ClientStats {
    pub(crate) ok: u64,
    pub(crate) failures: Vec<String>,
    /// Keep-alive clients: the backend connections their responses came over (one expected).
    pub(crate) backend_conns: Vec<u64>,
    /// Keep-alive clients: TCP connections opened (one expected).
    pub(crate) connects: u64,
    /// Keep-alive clients: the local ports of the connections they opened.
    pub(crate) local_ports: Vec<u16>,
}

pub(crate) fn keepalive_client(addr: &str, stop: &AtomicBool, label: &str) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut conn: Option<HttpConn> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match HttpConn::connect(addr) {
                Ok(c) => {
                    stats.connects += 1;
                    stats.local_ports.push(c.local_port);
                    conn = Some(c);
                }
                Err(e) => {
                    stats.failures.push(format!("{label}: connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        n += 1;
        let path = format!("/ka/{label}/{n}");
        let c = conn.as_mut().unwrap();
        match c.request("GET", &path, false) {
            Ok(r) if r.status == 200 && r.body.starts_with(&format!("GET {path} conn=")) => {
                stats.ok += 1;
                if r.close {
                    stats.failures.push(format!(
                        "{label} {path}: the keep-alive connection is being closed"
                    ));
                    conn = None;
                }
                if let Some(b) = r.backend_conn {
                    if stats.backend_conns.last() != Some(&b) {
                        stats.backend_conns.push(b);
                    }
                }
            }
            Ok(r) => {
                stats.failures.push(format!("{label} {path}: {r:?}"));
                conn = None;
            }
            Err(e) => {
                stats.failures.push(format!("{label} {path}: {e}"));
                conn = None;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    stats
}

pub(crate) fn fresh_client(addr: &str, stop: &AtomicBool, label: &str) -> ClientStats {
    let mut stats = ClientStats::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let path = format!("/fresh/{label}/{n}");
        match request_once(addr, "GET", &path) {
            Ok(r) if r.status == 200 && r.body.starts_with(&format!("GET {path} conn=")) => {
                stats.ok += 1;
                stats.connects += 1;
            }
            Ok(r) => stats.failures.push(format!("{label} {path}: {r:?}")),
            Err(e) => stats.failures.push(format!("{label} {path}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stats
}

pub(crate) const ALLOW_WEB_TO_API: &str = r#"name: allow
default: deny
rules:
  - name: web-to-api
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
"#;

/// The SVID lifetime of the rotation test, and how long its load runs at least.
const ROTATION_TTL: &str = "4s";
const MIN_LOAD: Duration = Duration::from_secs(6);

#[test]
fn proxy_rotation_under_load() {
    let _serial = serial();
    let started = Instant::now();
    // The rest of the mesh (agents, CA, backend) lives in `mesh` until the end.
    let mesh = WebToApi::start(ROTATION_TTL, ALLOW_WEB_TO_API);
    let WebToApi {
        mut api,
        mut web,
        web_out,
        api_in,
        ..
    } = mesh;
    eprintln!(
        "proxy_rotation_under_load: mesh ready after {:?}",
        started.elapsed()
    );
    let rotations = |p: &Proxy| p.metric(ROTATIONS, &[]);
    let (web_start, api_start) = (rotations(&web), rotations(&api));
    let expiry_start = api.metric("meshid_proxy_svid_expiry_timestamp_seconds", &[]);

    let stop = AtomicBool::new(false);
    let load_started = Instant::now();
    let mut served: Vec<String> = Vec::new();
    let mut probes = 0u32;
    let (keepalive, fresh, reached) = std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let ka: Vec<_> = (0..3)
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
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut reached = (0.0, 0.0);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            // What the api proxy presents to new connections: a current certificate.
            let leaf = tls_client::server_leaf(&api_in).expect("a server certificate");
            probes += 1;
            let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
            assert!(
                cert.validity().is_valid(),
                "the api proxy presented a certificate outside its validity: {:?}",
                cert.validity()
            );
            if served.last() != Some(&cert.raw_serial_as_string()) {
                served.push(cert.raw_serial_as_string());
            }
            reached = (rotations(&web) - web_start, rotations(&api) - api_start);
            // At least 10 rotations each, and longer than an SVID lives, so that the kept
            // connections outlive the certificates they were opened with.
            if reached.0 >= 10.0 && reached.1 >= 10.0 && load_started.elapsed() > MIN_LOAD {
                break;
            }
            if ka.iter().chain(fr.iter()).any(|h| h.is_finished()) {
                break;
            }
        }
        // A little more traffic on the rotated credentials.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        let ka: Vec<ClientStats> = ka.into_iter().map(|h| h.join().unwrap()).collect();
        let fr: Vec<ClientStats> = fr.into_iter().map(|h| h.join().unwrap()).collect();
        (ka, fr, reached)
    });
    let load_time = load_started.elapsed();
    assert!(load_time > MIN_LOAD);
    let total_ok: u64 = keepalive.iter().chain(fresh.iter()).map(|s| s.ok).sum();
    let fresh_ok: u64 = fresh.iter().map(|s| s.ok).sum();
    eprintln!(
        "proxy_rotation_under_load: {load_time:?} of load, rotations web {} api {}, {} api certificates served, {total_ok} requests ok ({fresh_ok} on new connections), keep-alive backend conns {:?}",
        reached.0,
        reached.1,
        served.len(),
        keepalive.iter().map(|s| &s.backend_conns).collect::<Vec<_>>()
    );
    let failures: Vec<&String> = keepalive
        .iter()
        .chain(fresh.iter())
        .flat_map(|s| s.failures.iter())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed requests during rotation, first: {:?}\nweb log:\n{}\napi log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        tail(&web.proc.log_text(), 15),
        tail(&api.proc.log_text(), 15)
    );
    assert!(
        reached.0 >= 10.0 && reached.1 >= 10.0,
        "at least 10 rotations on each proxy within the time: web {}, api {}",
        reached.0,
        reached.1
    );
    for (i, s) in keepalive.iter().enumerate() {
        assert_eq!(
            s.connects, 1,
            "keep-alive client {i} had to reconnect (local ports {:?})",
            s.local_ports
        );
        assert!(s.ok > 50, "keep-alive client {i}: only {} requests", s.ok);
    }
    // api's proxy reuses its application connections across callers and requests (its pool)
    // rather than opening one per request: thousands of requests over a handful.
    let used: std::collections::HashSet<u64> = keepalive
        .iter()
        .flat_map(|s| s.backend_conns.iter().copied())
        .collect();
    let requests: u64 = keepalive.iter().map(|s| s.ok).sum();
    assert!(
        used.len() <= 8,
        "{requests} keep-alive requests reached the backend over {} connections",
        used.len()
    );
    assert!(fresh_ok > 50, "only {fresh_ok} requests on new connections");
    // New connections were made all along: each one a new handshake at the api proxy.
    let handshakes = api.metric(
        "meshid_proxy_connections_total",
        &[("direction", "inbound"), ("listener", "api-in")],
    );
    assert!(
        handshakes >= (fresh_ok + 3) as f64,
        "{handshakes} inbound connections"
    );
    // The only refused handshakes are the certificate probes, which send none.
    let probe_failures = api.metric(HANDSHAKE_FAILURES, &[("reason", "no_certificate")]);
    assert_eq!(probe_failures, f64::from(probes), "{}", api.metrics());
    assert_eq!(
        api.metric(HANDSHAKE_FAILURES, &[]),
        probe_failures,
        "handshake failures at the api proxy: {}",
        api.metrics()
    );
    // Probed every 250 ms, so a certificate replaced quickly can be missed: most, not all.
    assert!(
        served.len() >= 8,
        "new connections saw only {} distinct api certificates: {served:?}",
        served.len()
    );
    assert_eq!(
        web.metric(HANDSHAKE_FAILURES, &[]),
        0.0,
        "{}",
        web.metrics()
    );
    let expiry_end = api.metric("meshid_proxy_svid_expiry_timestamp_seconds", &[]);
    assert!(
        expiry_end > expiry_start,
        "the expiry moved: {expiry_start} -> {expiry_end}"
    );
    assert!(count_events(&api, "svid rotated", &[("spiffe_id", &id("api"))]) >= 10);
    assert!(count_events(&web, "svid rotated", &[("spiffe_id", &id("web"))]) >= 10);
    for p in [&mut api, &mut web] {
        p.proc.check_alive();
    }
    eprintln!("proxy_rotation_under_load: {:?}", started.elapsed());
}

// =============================================================================================
// proxy_policy_reload_under_load

const RELOAD_ALLOW: &str = r#"name: reload-allow
default: deny
rules:
  - name: web-to-api
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
"#;

const RELOAD_DENY: &str = r#"name: reload-deny
default: allow
rules:
  - name: deny-web
    action: deny
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
"#;

/// A syntax error: an unclosed flow sequence.
const INVALID_SYNTAX: &str = r#"name: broken-syntax
default: deny
rules:
  - name: web-to-api
    from: ["spiffe://example.org/web"
    to: ["spiffe://example.org/api"]
"#;

/// An unknown key (`form`) at line 5, column 5.
const INVALID_KEY: &str = r#"name: broken-key
default: allow
rules:
  - name: web-to-api
    form: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
"#;

/// A bad pattern (a partial wildcard) at line 5, column 12.
const INVALID_PATTERN: &str = r#"name: broken-pattern
default: allow
rules:
  - name: web-to-api
    from: ["spiffe://example.org/we*"]
    to: ["spiffe://example.org/api"]
"#;

/// A bad value (`default: maybe`) at line 2, column 10.
const INVALID_VALUE: &str = r#"name: broken-value
default: maybe
rules: []
"#;

/// One request's outcome.
struct Sample {
    sent: Instant,
    done: Instant,
    /// The status, or the error.
    outcome: Result<u16, String>,
}

fn sampling_client(addr: &str, stop: &AtomicBool, keepalive: bool, samples: &Mutex<Vec<Sample>>) {
    let mut conn: Option<HttpConn> = None;
    while !stop.load(Ordering::SeqCst) {
        let sent = Instant::now();
        let outcome = if keepalive {
            if conn.is_none() {
                conn = HttpConn::connect(addr).ok();
            }
            match conn.as_mut() {
                Some(c) => c.request("GET", "/reload", false),
                None => Err(std::io::Error::other("connect failed")),
            }
        } else {
            request_once(addr, "GET", "/reload")
        };
        let outcome = match outcome {
            Ok(r) if r.status == 200 && !r.body.starts_with("GET /reload conn=") => {
                Err(format!("bad body {r:?}"))
            }
            Ok(r) => Ok(r.status),
            Err(e) => {
                conn = None;
                Err(e.to_string())
            }
        };
        samples.lock().unwrap().push(Sample {
            sent,
            done: Instant::now(),
            outcome,
        });
        std::thread::sleep(Duration::from_millis(if keepalive { 10 } else { 30 }));
    }
}

enum Write {
    Atomic,
    InPlace,
}

struct Step {
    text: &'static str,
    write: Write,
    /// For a valid policy, the status it gives; for an invalid one, the position of the
    /// error (`None` when only the presence of one is checked).
    effect: Effect,
}

enum Effect {
    Switch(u16),
    Refused(Option<(usize, usize)>),
}

#[test]
fn proxy_policy_reload_under_load() {
    let _serial = serial();
    let started = Instant::now();
    // The rest of the mesh (agents, CA, backend) lives in `mesh` until the end.
    let mesh = WebToApi::start("1h", RELOAD_ALLOW);
    let WebToApi {
        mut api,
        mut web,
        web_out,
        policy,
        ..
    } = mesh;
    eprintln!(
        "proxy_policy_reload_under_load: mesh ready after {:?}",
        started.elapsed()
    );
    assert_eq!(
        request_once(&web_out, "GET", "/reload").unwrap().status,
        200
    );

    use Effect::*;
    let steps = [
        Step {
            text: INVALID_SYNTAX,
            write: Write::Atomic,
            effect: Refused(None),
        },
        Step {
            text: RELOAD_DENY,
            write: Write::InPlace,
            effect: Switch(403),
        },
        Step {
            text: INVALID_KEY,
            write: Write::Atomic,
            effect: Refused(Some((5, 5))),
        },
        Step {
            text: RELOAD_ALLOW,
            write: Write::Atomic,
            effect: Switch(200),
        },
        Step {
            text: INVALID_PATTERN,
            write: Write::InPlace,
            effect: Refused(Some((5, 12))),
        },
        Step {
            text: RELOAD_DENY,
            write: Write::Atomic,
            effect: Switch(403),
        },
        Step {
            text: INVALID_VALUE,
            write: Write::Atomic,
            effect: Refused(Some((2, 10))),
        },
        Step {
            text: RELOAD_ALLOW,
            write: Write::InPlace,
            effect: Switch(200),
        },
    ];
    let samples = Mutex::new(Vec::<Sample>::new());
    let stop = AtomicBool::new(false);
    let reload_metric = |result: &str| api.metric(RELOADS, &[("result", result)]);
    let path_text = policy.display().to_string();
    let mut latencies = Vec::new();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for keepalive in [true, true, false] {
            let (addr, stop, samples) = (&web_out, &stop, &samples);
            s.spawn(move || sampling_client(addr, stop, keepalive, samples));
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut current = 200u16;
        for (i, step) in steps.iter().enumerate() {
            let (ok_before, err_before) = (reload_metric("ok"), reload_metric("error"));
            let refused_before = count_events(
                &api,
                "policy refused; the previous policy stays in force",
                &[],
            );
            match step.write {
                Write::Atomic => write_atomic(&policy, step.text),
                Write::InPlace => std::fs::write(&policy, step.text).unwrap(),
            }
            let written = Instant::now();
            match step.effect {
                Switch(status) => {
                    // The first request sent after the write that gets the new decision.
                    let switched = poll(
                        Duration::from_secs(3),
                        || {
                            samples
                                .lock()
                                .unwrap()
                                .iter()
                                .filter(|s| s.sent >= written && s.outcome == Ok(status))
                                .map(|s| s.done)
                                .min()
                        },
                        Option::is_some,
                    );
                    let Some(done) = switched else {
                        panic!("step {i}: the new policy never applied (status {status})");
                    };
                    let latency = done - written;
                    latencies.push(latency);
                    assert!(
                        latency < Duration::from_secs(1),
                        "step {i}: applied after {latency:?}"
                    );
                    // Once a response with the new decision is in, every request sent
                    // afterwards gets it. (Not "sent after the first request that got it": a
                    // request on a new connection is decided only after its handshake, so it
                    // can see the new policy before one sent a little later on a kept
                    // connection.)
                    std::thread::sleep(Duration::from_millis(700));
                    let samples = samples.lock().unwrap();
                    let after: Vec<&Sample> = samples.iter().filter(|s| s.sent > done).collect();
                    assert!(
                        after.len() >= 10,
                        "step {i}: too few requests ({})",
                        after.len()
                    );
                    let flapped: Vec<String> = after
                        .iter()
                        .filter(|s| s.outcome != Ok(status))
                        .map(|s| {
                            format!(
                                "{:?} sent +{:?} done +{:?}",
                                s.outcome,
                                s.sent - written,
                                s.done - written
                            )
                        })
                        .collect();
                    assert!(
                        flapped.is_empty(),
                        "step {i}: decision flapped after the switch to {status} (first seen +{latency:?}): {flapped:?}\n{}",
                        tail(&api.proc.log_text(), 30)
                    );
                    drop(samples);
                    let ok = poll(
                        Duration::from_secs(1),
                        || reload_metric("ok"),
                        |v| *v > ok_before,
                    );
                    assert!(
                        ok > ok_before,
                        "step {i}: reloads{{result=\"ok\"}} did not increase"
                    );
                    current = status;
                }
                Refused(position) => {
                    std::thread::sleep(Duration::from_millis(1500));
                    let samples = samples.lock().unwrap();
                    let during: Vec<&Sample> =
                        samples.iter().filter(|s| s.sent >= written).collect();
                    assert!(
                        during.len() >= 20,
                        "step {i}: too few requests ({})",
                        during.len()
                    );
                    for s in during {
                        assert_eq!(
                            s.outcome,
                            Ok(current),
                            "step {i}: an invalid policy changed a decision"
                        );
                    }
                    drop(samples);
                    let errors = reload_metric("error");
                    assert!(
                        errors > err_before,
                        "step {i}: reloads{{result=\"error\"}} did not increase"
                    );
                    assert_eq!(
                        reload_metric("ok"),
                        ok_before,
                        "step {i}: an invalid policy was loaded"
                    );
                    let event = wait_event(
                        &api,
                        refused_before,
                        "policy refused; the previous policy stays in force",
                        &[],
                    );
                    let error = field_str(&event, "error").unwrap_or_default();
                    let position_ok = match position {
                        Some((line, column)) => {
                            error.starts_with(&format!("{path_text}:{line}:{column}: "))
                        }
                        None => error
                            .strip_prefix(&format!("{path_text}:"))
                            .and_then(|rest| {
                                let mut parts = rest.splitn(3, ':');
                                let line = parts.next()?.parse::<usize>().ok()?;
                                let column = parts.next()?.parse::<usize>().ok()?;
                                Some(line >= 1 && column >= 1)
                            })
                            .unwrap_or(false),
                    };
                    assert!(
                        position_ok,
                        "step {i}: the error does not name file:line:col ({position:?}): {error}"
                    );
                    eprintln!("proxy_policy_reload_under_load: step {i} refused: {error}");
                }
            }
        }
        // SIGHUP re-reads the file even when it did not change.
        let ok_before = reload_metric("ok");
        api.proc.signal("HUP");
        let ok = poll(
            Duration::from_secs(1),
            || reload_metric("ok"),
            |v| *v > ok_before,
        );
        assert_eq!(ok, ok_before + 1.0, "SIGHUP reloads the policy");
        stop.store(true, Ordering::SeqCst);
    });
    let samples = samples.into_inner().unwrap();
    let errors: Vec<&String> = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().err())
        .collect();
    assert!(
        errors.is_empty(),
        "{} failed requests: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let statuses: std::collections::BTreeSet<u16> = samples
        .iter()
        .filter_map(|s| s.outcome.clone().ok())
        .collect();
    assert_eq!(statuses, [200, 403].into_iter().collect());
    assert!(
        api.metric(
            DECISIONS,
            &[
                ("policy", "reload-deny"),
                ("rule", "deny-web"),
                ("decision", "deny")
            ]
        ) > 0.0
    );
    assert!(
        api.metric(
            DECISIONS,
            &[
                ("policy", "reload-allow"),
                ("rule", "web-to-api"),
                ("decision", "allow")
            ]
        ) > 0.0
    );
    eprintln!(
        "proxy_policy_reload_under_load: {} requests, switch latencies {latencies:?}, {:?}",
        samples.len(),
        started.elapsed()
    );
    for p in [&mut api, &mut web] {
        p.proc.check_alive();
    }
}

// =============================================================================================
// proxy_readiness_and_drain

const BOTH_WAYS: &str = r#"name: both-ways
default: deny
rules:
  - name: web-to-api
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
  - name: api-to-web
    from: ["spiffe://example.org/api"]
    to: ["spiffe://example.org/web"]
"#;

#[test]
fn proxy_readiness_and_drain() {
    let _serial = serial();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (t1, t2) = (ca.join_token(), ca.join_token());
    create_entry(&ca, "web", &id("web"), &t1.1, "1h");
    // No entry for the api proxy yet.
    let node1 = start_node(dir, "node1", &ca, t1);
    let node2 = start_node(dir, "node2", &ca, t2);
    let (web_backend, api_backend) = (HttpBackend::start(), HttpBackend::start());
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, BOTH_WAYS).unwrap();
    let (web_in, web_out, api_in, api_out) =
        (local_addr(), local_addr(), local_addr(), local_addr());
    let mut web = Proxy::start(
        dir,
        "web",
        &(proxy_head(dir, "web", &node1, &id("web"), Some(&policy), "")
            + &inbound("web-in", &web_in, web_backend.addr(), 8080, "detect")
            + &outbound("to-api", &web_out, &api_in, &id("api"))),
    );
    let drain_timeout = Duration::from_secs(5);
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(
            dir,
            "api",
            &node2,
            &id("api"),
            Some(&policy),
            "drain_timeout = \"5s\"\n",
        ) + &inbound("api-in", &api_in, api_backend.addr(), 8080, "detect")
            + &outbound("to-web", &api_out, &web_in, &id("web"))),
    );
    web.wait_ready(Duration::from_secs(30));

    // Without an SVID: not ready, handshakes refused both ways, nothing reaches a backend.
    let code = poll(Duration::from_secs(10), || api.readyz(), Option::is_some);
    assert_eq!(code, Some(503), "readyz before the SVID");
    let inbound_failures = |p: &Proxy, l: &str| {
        p.metric(
            HANDSHAKE_FAILURES,
            &[("direction", "inbound"), ("listener", l)],
        )
    };
    let outbound_failures = |p: &Proxy, l: &str| {
        p.metric(
            HANDSHAKE_FAILURES,
            &[("direction", "outbound"), ("listener", l)],
        )
    };
    let before = (
        inbound_failures(&api, "api-in"),
        outbound_failures(&api, "to-web"),
    );
    let r = request_once(&web_out, "GET", "/before-svid");
    assert!(r.is_err(), "a request into a proxy without SVID got {r:?}");
    let r = request_once(&api_out, "GET", "/before-svid");
    assert!(
        r.is_err(),
        "a request out of a proxy without SVID got {r:?}"
    );
    assert_eq!(
        (web_backend.connections(), api_backend.connections()),
        (0, 0)
    );
    let after = poll(
        Duration::from_secs(3),
        || {
            (
                inbound_failures(&api, "api-in"),
                outbound_failures(&api, "to-web"),
            )
        },
        |a| a.0 > before.0 && a.1 > before.1,
    );
    assert!(
        after.0 > before.0,
        "inbound handshake refusal counted: {}",
        api.metrics()
    );
    assert!(
        after.1 > before.1,
        "outbound refusal counted: {}",
        api.metrics()
    );
    assert_eq!(api.readyz(), Some(503), "still not ready");

    // The entry arrives: ready, and traffic flows both ways.
    create_entry(&ca, "api", &id("api"), &node2.agent_id, "1h");
    let entry_created = Instant::now();
    api.wait_ready(Duration::from_secs(20));
    eprintln!(
        "proxy_readiness_and_drain: ready {:?} after the entry",
        entry_created.elapsed()
    );
    let r = request_once(&web_out, "GET", "/after-svid").unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("GET /after-svid conn="), "{r:?}");
    let r = request_once(&api_out, "GET", "/after-svid").unwrap();
    assert_eq!(r.status, 200, "{r:?}");

    // Drain: an in-flight slow request finishes, new connections are refused, exit 0 in time.
    let slow_ms = 2000;
    // An idle keep-alive connection (one request done, nothing in flight).
    let mut idle = HttpConn::connect(&web_out).unwrap();
    assert_eq!(idle.request("GET", "/idle", false).unwrap().status, 200);
    std::thread::scope(|s| {
        let requests_before = api_backend.requests();
        let slow = s.spawn(|| request_once(&web_out, "GET", &format!("/slow/{slow_ms}")));
        let reached = poll(
            Duration::from_secs(5),
            || api_backend.requests(),
            |n| *n > requests_before,
        );
        assert!(
            reached > requests_before,
            "the slow request never reached the backend"
        );
        let term = Instant::now();
        api.proc.signal("TERM");
        // Not ready while draining (the ops listener serves until the end).
        let code = poll(
            Duration::from_millis(500),
            || api.readyz(),
            |c| *c != Some(200),
        );
        assert_eq!(code, Some(503), "readyz while draining");
        // New connections are refused: the listener is closed.
        let refused = poll(
            Duration::from_secs(1),
            || std::net::TcpStream::connect(&api_in).is_err(),
            |r| *r,
        );
        assert!(
            refused,
            "the inbound listener still accepts connections while draining"
        );
        let r = request_once(&web_out, "GET", "/during-drain");
        assert!(
            !matches!(&r, Ok(resp) if resp.status == 200),
            "a new request during the drain got through: {r:?}"
        );
        let slow = slow.join().unwrap();
        let slow = slow.unwrap_or_else(|e| {
            panic!(
                "the in-flight request failed during the drain: {e}\n{}",
                tail(&api.proc.log_text(), 20)
            )
        });
        assert_eq!(slow.status, 200, "{slow:?}");
        eprintln!(
            "proxy_readiness_and_drain: in-flight response, connection: close = {}",
            slow.close
        );
        assert!(
            slow.body.starts_with(&format!("GET /slow/{slow_ms} conn=")),
            "{slow:?}"
        );
        let status = api.proc.wait_exit(drain_timeout + Duration::from_secs(2));
        let took = term.elapsed();
        let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM"));
        assert!(
            status.success(),
            "exit status {status} after SIGTERM:\n{}",
            tail(&api.proc.log_text(), 20)
        );
        // The idle connection did not hold the drain until the grace period ended.
        assert!(
            took < drain_timeout - Duration::from_millis(500),
            "exited {took:?} after SIGTERM (grace {drain_timeout:?}) with only a {slow_ms} ms request in flight"
        );
        let r = idle.request("GET", "/idle-after-drain", false);
        assert!(
            r.is_err(),
            "the idle connection still works after the drain: {r:?}"
        );
        eprintln!("proxy_readiness_and_drain: exited 0 {took:?} after SIGTERM");
    });
    web.proc.check_alive();
    eprintln!("proxy_readiness_and_drain: {:?}", started.elapsed());
}

// =============================================================================================
// proxy_config_check

#[test]
fn proxy_config_check() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good_policy = dir.join("good.yaml");
    std::fs::write(&good_policy, RELOAD_ALLOW).unwrap();
    let bad_policy = dir.join("bad.yaml");
    std::fs::write(&bad_policy, INVALID_KEY).unwrap();
    let listen = local_addr();
    let config = |name: &str, policy: &Path, extra: &str| {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "workload_api_socket = \"unix://{}/none.sock\"\nops_address = \"{}\"\npolicy_file = \"{}\"\n{extra}{}",
                dir.display(),
                local_addr(),
                policy.display(),
                inbound("in", &listen, "127.0.0.1:8080", 8080, "detect"),
            ),
        )
        .unwrap();
        path
    };
    let proxy = |args: &[&str], config: &Path| {
        let out = std::process::Command::new(meshid_tests::bin_dir().join("meshid-proxy"))
            .args(args)
            .arg("--config")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let good = config("good", &good_policy, "");
    let (code, err) = proxy(&["run", "--check"], &good);
    assert_eq!(code, Some(0), "{err}");

    let unknown_key = config("unknown-key", &good_policy, "drain_timeuot = \"1s\"\n");
    let (code, err) = proxy(&["run", "--check"], &unknown_key);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("drain_timeuot"),
        "the error names the key: {err}"
    );

    let bad_value = config("bad-value", &good_policy, "drain_timeout = \"soon\"\n");
    let (code, err) = proxy(&["run", "--check"], &bad_value);
    assert_eq!(code, Some(64), "{err}");

    let bad = config("bad-policy", &bad_policy, "");
    let (code, err) = proxy(&["run", "--check"], &bad);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("{}:5:5:", bad_policy.display())),
        "the error names file:line:col: {err}"
    );
    // Without --check too, before anything is bound.
    let (code, err) = proxy(&["run"], &bad);
    assert_eq!(code, Some(64), "{err}");
    assert!(std::net::TcpListener::bind(&listen).is_ok());
}

/// Security review, item 12: a policy file every user may write was hot-reloaded, so any local
/// user could let any caller in. Now it is refused, at start and on reload, and the policy in
/// force stays until the mode is fixed.
#[test]
fn proxy_refuses_a_world_writable_policy() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    // The mesh (agents, CA, web's proxy, backend) lives until the end.
    let mesh = WebToApi::start("1h", RELOAD_DENY);
    let WebToApi {
        api,
        web_out,
        policy,
        ..
    } = &mesh;
    let status = || request_once(web_out, "GET", "/x").unwrap().status;
    assert_eq!(status(), 403);
    let errors_before = api.metric(RELOADS, &[("result", "error")]);

    // Another user, able to write the file, lets web in.
    std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::write(policy, RELOAD_ALLOW).unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(status(), 403, "a world-writable policy was applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        api.metric(RELOADS, &[("result", "error")]),
        errors_before + 1.0
    );
    assert!(api.proc.log_text().contains("writable by every user"));

    // The same file does not start a proxy either.
    let out = std::process::Command::new(meshid_tests::bin_dir().join("meshid-proxy"))
        .args(["run", "--check", "--config"])
        .arg(&api.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod o-w"), "{stderr}");

    // Once its mode is fixed, the file is read again.
    std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let applied = poll(
        Duration::from_secs(2),
        || Some(status()),
        |s| *s == Some(200),
    );
    assert_eq!(applied, Some(200));
}

// =============================================================================================
// proxy_upgrades_are_decided_and_h2c_never_passes

const UPGRADE_POLICY: &str = r#"name: upgrades
default: deny
ports: {8080: http}
rules:
  - name: web-reads
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {methods: [GET], paths: ["/public/**", "/ws/**"]}
  - name: web-chat
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {methods: [GET], paths: ["/ws/chat"], upgrades: [websocket]}
"#;

/// hypercorn (which switches to HTTP/2 on an `Upgrade: h2c` offer, as the review's app did)
/// serving `tests/interop/asgi_app.py` on a free port.
fn start_asgi_app(python: &Path, dir: &Path) -> (meshid_tests::Proc, String) {
    let addr = local_addr();
    let mut cmd = std::process::Command::new(python);
    cmd.args([
        "-m",
        "hypercorn",
        "--workers",
        "1",
        "--bind",
        &addr,
        "asgi_app:app",
    ])
    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/interop"));
    let mut app = meshid_tests::Proc::spawn("hypercorn", cmd, dir.join("app.log"));
    meshid_tests::wait_for(Duration::from_secs(20), "hypercorn to listen", || {
        app.check_alive();
        std::net::TcpStream::connect(&addr).ok()
    });
    (app, addr)
}

/// Sends `request` (a complete HTTP/1.1 head) on a new connection; the response head, its
/// body and the connection.
fn raw_request(
    addr: &str,
    request: &str,
) -> (Head, Vec<u8>, std::io::BufReader<std::net::TcpStream>) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut r = std::io::BufReader::new(s);
    let head = read_head(&mut r).unwrap().expect("a response");
    let body = if status_of(&head) == 101 {
        Vec::new()
    } else {
        head.read_body(&mut r).unwrap()
    };
    (head, body, r)
}

/// The status code of a response head.
fn status_of(head: &Head) -> u16 {
    head.start
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn websocket_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nhost: api.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// One masked client frame (RFC 6455 5.2) with a payload under 126 bytes.
fn websocket_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn proxy_upgrades_are_decided_and_h2c_never_passes() {
    use std::io::{Read, Write};
    let Some(python) = meshid_tests::interop_python("hypercorn") else {
        return;
    };
    let _serial = serial();
    let app_dir = tempfile::tempdir().unwrap();
    let (app, app_addr) = start_asgi_app(&python, app_dir.path());
    let mesh = WebToApi::start_to("1h", UPGRADE_POLICY, Some(&app_addr));
    let web_out = &mesh.web_out;
    let access = mesh.api.config.parent().unwrap().join("api-access.log");
    let app_log = || app.log_text();

    // The review's attack, with curl as the caller: an allowed GET /public/x offering h2c,
    // then GET /admin/secrets on the same connection. Through a proxy that passes the offer,
    // the application switches to HTTP/2 and serves the second request unseen by the policy.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "10"])
        .args(["-w", "\n=> %{http_code} %{http_version}\n"])
        .arg(format!("http://{web_out}/public/x"))
        .arg(format!("http://{web_out}/admin/secrets"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("admin secrets"), "smuggled:\n{text}");
    let results: Vec<&str> = text.lines().filter(|l| l.starts_with("=> ")).collect();
    assert_eq!(results, ["=> 200 1.1", "=> 403 1.1"], "{text}");
    assert!(
        app_log().contains("served 1.1 GET /public/x"),
        "{}",
        app_log()
    );
    assert!(!app_log().contains("/admin"), "{}", app_log());
    assert!(wait_record(
        &access,
        &[("path", Some("/admin/secrets")), ("status", Some("403"))],
        Duration::from_secs(5)
    ));

    // By hand: hop-by-hop headers never reach the application, and bytes sent after the
    // response are still HTTP/1.1 to the proxy (an HTTP/2 preface is refused, not spliced).
    let (head, body, mut conn) = raw_request(
        web_out,
        "GET /public/h HTTP/1.1\r\nhost: api.test\r\n\
         connection: keep-alive, X-Hop, Upgrade, HTTP2-Settings\r\nx-hop: 1\r\n\
         keep-alive: timeout=5\r\nte: gzip\r\nupgrade: h2c\r\n\
         http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\nproxy-authorization: Basic eDp5\r\n\
         x-end-to-end: kept\r\n\r\n",
    );
    assert_eq!(status_of(&head), 200, "{}", head.start);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["http_version"], "1.1");
    let names: Vec<String> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_owned())
        .collect();
    for hop in [
        "connection",
        "x-hop",
        "keep-alive",
        "te",
        "upgrade",
        "http2-settings",
        "proxy-authorization",
    ] {
        assert!(
            !names.iter().any(|n| n == hop),
            "{hop} reached the app: {names:?}"
        );
    }
    assert!(names.iter().any(|n| n == "x-end-to-end"), "{names:?}");
    conn.get_mut()
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(!rest.starts_with(b"\x00\x00"), "an HTTP/2 frame came back");
    assert_eq!(app_log().matches("served").count(), 2, "{}", app_log());

    // A WebSocket where the policy names it: switched, echoed, accounted when it ends.
    let (head, _, mut ws) = raw_request(web_out, &websocket_request("/ws/chat"));
    assert_eq!(status_of(&head), 101, "{}", head.start);
    assert!(
        head.header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "{:?}",
        head.headers
    );
    ws.get_mut()
        .write_all(&websocket_frame(1, b"hello through the mesh"))
        .unwrap();
    let mut echo = [0u8; 24];
    ws.read_exact(&mut echo).unwrap();
    assert_eq!(&echo[..2], &[0x81, 22]);
    assert_eq!(&echo[2..], b"hello through the mesh");
    // Close handshake, then the client closes the connection (RFC 6455 7.1.1).
    ws.get_mut().write_all(&websocket_frame(8, b"")).unwrap();
    let mut close = [0u8; 2];
    ws.read_exact(&mut close).unwrap();
    assert_eq!(close[0], 0x88, "a close frame");
    drop(ws);
    assert!(
        wait_record(
            &access,
            &[
                ("path", Some("/ws/chat")),
                ("upgrade", Some("websocket")),
                ("status", Some("101")),
                ("rule", Some("web-chat")),
            ],
            Duration::from_secs(5)
        ),
        "{:#?}",
        json_lines(&access)
    );
    let record = json_lines(&access)
        .into_iter()
        .find(|r| r["path"] == "/ws/chat")
        .unwrap();
    assert!(record["bytes_in"].as_u64().unwrap() >= 28, "{record}");
    assert!(record["bytes_out"].as_u64().unwrap() >= 24, "{record}");

    // The same upgrade where the policy allows only the plain request: refused, unseen.
    let (head, _, _) = raw_request(web_out, &websocket_request("/ws/other"));
    assert_eq!(status_of(&head), 403, "{}", head.start);
    assert!(!app_log().contains("/ws/other"), "{}", app_log());
    assert!(wait_record(
        &access,
        &[
            ("path", Some("/ws/other")),
            ("upgrade", Some("websocket")),
            ("reason", Some("upgrade_not_allowed")),
        ],
        Duration::from_secs(5)
    ));
    let (head, body, _) = raw_request(
        web_out,
        "GET /ws/other HTTP/1.1\r\nhost: api.test\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&head), 200, "{}", head.start);
    assert!(String::from_utf8_lossy(&body).contains("/ws/other"));
}
