//! Refusals reach the console as counts: api's proxy counts the requests its policy denies
//! (per caller, callee and rule) and the handshakes it refuses (per reason), reports them to
//! its agent, which forwards them to the CA (`denials.reported` in the audit log), where the
//! console's Activity page lists them. An agent keeps only counts for its caller's own SPIFFE
//! IDs: a workload cannot report refusals in another's name.

use std::io::Write;
use std::time::Duration;

use meshid_api::policy::policy_delivery_client::PolicyDeliveryClient;
use meshid_api::policy::{DenialCount, DenialReport};
use meshid_tests::wait_for;
use serde_json::Value;

use crate::proxy::support::{id, local_addr, request_once, serial, WebToApi};

const POLICY: &str = "name: api
default: deny
rules:
  - name: web-reads
    from: [\"spiffe://example.org/web\"]
    to: [\"spiffe://example.org/api\"]
    http: {methods: [GET], paths: [\"/v1/**\"]}
  - name: no-admin
    action: deny
    from: [\"spiffe://example.org/**\"]
    to: [\"spiffe://example.org/api\"]
    http: {paths: [\"/admin/**\"]}
";

fn denials(console: &str) -> Vec<Value> {
    let Some((200, body)) = meshid_tests::http_get(console, "/api/activity") else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap();
    v["denials"].as_array().cloned().unwrap_or_default()
}

fn find<'a>(list: &'a [Value], caller: &str, rule: &str) -> Option<&'a Value> {
    list.iter().find(|d| {
        d["caller"] == caller
            && d["callee"] == id("api").as_str()
            && d["rule"].as_str().is_some_and(|r| r.starts_with(rule))
    })
}

/// Reports one count to the agent at `socket` as this process (a workload of both nodes).
async fn report(socket: &std::path::Path, callee: &str) -> u32 {
    let channel = meshid_api::client::connect_unix(socket).await.unwrap();
    let mut req = tonic::Request::new(DenialReport {
        denials: vec![DenialCount {
            caller: "spiffe://example.org/mallory".into(),
            callee: callee.into(),
            rule: "forged".into(),
            count: 1,
            last_at: meshid_api::unix_now(),
        }],
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    PolicyDeliveryClient::new(channel)
        .report_denials(req)
        .await
        .unwrap()
        .into_inner()
        .kept
}

#[test]
fn proxies_report_denials_through_their_agents_to_the_console() {
    let _serial = serial();
    let mut m = WebToApi::start("1h", POLICY);
    let console = local_addr();
    m.ca.proc.stop();
    m.ca.set_extra(&["--console-address", &console]);
    m.ca.restart();

    for _ in 0..3 {
        assert_eq!(
            request_once(&m.web_out, "GET", "/admin/users")
                .unwrap()
                .status,
            403
        );
    }
    assert_eq!(
        request_once(&m.web_out, "POST", "/v1/items")
            .unwrap()
            .status,
        403
    );
    assert_eq!(
        request_once(&m.web_out, "GET", "/v1/items").unwrap().status,
        200
    );
    // A plaintext request to the mTLS listener: a refused handshake.
    let mut plain = std::net::TcpStream::connect(&m.api_in).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = plain.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n");
    let _ = std::io::Read::read(&mut plain, &mut [0u8; 64]);

    let web = id("web");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let list = loop {
        let list = denials(&console);
        let counted =
            |caller: &str, rule: &str| find(&list, caller, rule).map(|d| d["count"].clone());
        if counted(&web, "no-admin") == Some(3.into())
            && counted(&web, "<default>") == Some(1.into())
            && counted("", "handshake:").is_some()
        {
            break list;
        }
        if std::time::Instant::now() > deadline {
            let audit = m.ca.ok(&["audit", "list", "--kind", "denials.reported"]);
            panic!(
                "the console shows {list:#?} 20 s after the refusals ({:?})\naudit: {audit}",
                meshid_tests::http_get(&console, "/api/activity?limit=3")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        find(&list, &web, "web-reads").is_none(),
        "allowed requests are not counted: {list:?}"
    );
    let audit = m.ca.ok(&["audit", "list", "--kind", "denials.reported"]);
    assert!(audit.contains("denials.reported"), "{audit}");

    // A workload speaks only for itself: api's agent keeps a count for api (this process is
    // api there) and drops one for web, which it is not there.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api_socket = &m.nodes.1.agent.socket;
    assert_eq!(rt.block_on(report(api_socket, &id("web"))), 0);
    assert_eq!(rt.block_on(report(api_socket, "")), 1);
    wait_for(
        Duration::from_secs(10),
        "the forged count, under api's name",
        || {
            let list = denials(&console);
            let forged: Vec<&Value> = list.iter().filter(|d| d["rule"] == "forged").collect();
            (forged.len() == 1 && forged[0]["callee"] == id("api").as_str()).then_some(())
        },
    );
}
