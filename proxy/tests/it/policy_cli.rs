//! `meshid-proxy policy ...` end to end: the real binary, its output and its exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const POLICY: &str = r#"name: payments
trust_domains: [example.org]
ports: {8080: http, 5432: tcp}
rules:
  - name: web-reads
    from: ["spiffe://example.org/ns/web/*"]
    to: ["spiffe://example.org/ns/api/*"]
    ports: [8080]
    http: {methods: [GET], paths: ["/v1/**"]}
  - name: no-admin
    action: deny
    from: ["spiffe://example.org/**"]
    to: ["spiffe://example.org/ns/api/*"]
    ports: [8080]
    http: {paths: ["/admin/**"]}
  - name: batch
    from: ["spiffe://example.org/ns/batch/*"]
    to: ["spiffe://example.org/ns/api/*"]
"#;

const WEB: &str = "spiffe://example.org/ns/web/a";
const BATCH: &str = "spiffe://example.org/ns/batch/a";
const API: &str = "spiffe://example.org/ns/api/x";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn policy(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_meshid-proxy"))
        .arg("policy")
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_exit_codes_and_positions() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.yaml", POLICY);
    let r = policy(&["check", &good]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("policy `payments` is valid: 3 rule(s), 0 warning(s)"),
        "{}",
        r.stdout
    );

    // A typo in a trust domain: a warning with its position, exit 2.
    let typo = write(
        dir.path(),
        "typo.yaml",
        &POLICY.replace("ns/batch/*\"]", "ns/batch/*\", \"spiffe://exmaple.org/x\"]"),
    );
    let r = policy(&["check", &typo]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!(
            "{typo}:17:47: warning: trust domain `exmaple.org`"
        )),
        "{}",
        r.stdout
    );
    // Made known on the command line: clean again.
    assert_eq!(
        policy(&["check", &typo, "--trust-domain", "exmaple.org"]).code,
        0
    );
    let r = policy(&["check", &typo, "--json"]);
    assert_eq!(r.code, 2);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["findings"][0]["line"], 17);
    assert_eq!(v["findings"][0]["severity"], "warning");

    // Invalid: the error names file:line:column, exit 1.
    let bad = write(
        dir.path(),
        "bad.yaml",
        "rules:\n  - name: a\n    from: [x]\n    to: [\"spiffe://example.org/a\"]\n",
    );
    let r = policy(&["check", &bad]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout
            .starts_with(&format!("{bad}:3:12: error: invalid pattern `x`")),
        "{}",
        r.stdout
    );
    let r = policy(&["check", &bad, "--json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (
            v["valid"].clone(),
            v["error"]["line"].clone(),
            v["error"]["column"].clone()
        ),
        (Value::Bool(false), 3.into(), 12.into())
    );
    let r = policy(&[
        "check",
        &dir.path().join("missing.yaml").display().to_string(),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("missing.yaml: cannot read the file"),
        "{}",
        r.stdout
    );
    assert_eq!(
        policy(&["check", &good, "--trust-domain", "spiffe://x"]).code,
        1
    );
}

#[test]
fn explain_shows_the_decision_and_every_rule() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let r = policy(&[
        "explain",
        &file,
        "--from",
        WEB,
        "--to",
        API,
        "--port",
        "8080",
        "--method",
        "GET",
        "--path",
        "/v1/orders",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("decision: allow (rule `web-reads`, line 5)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("web-reads (line 5, allow): matched  <- decides"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("no-admin (line 10, deny): no match: path differs"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("batch (line 16, allow): no match: from differs"),
        "{}",
        r.stdout
    );

    // Opaque traffic: the http deny fails closed.
    let r = policy(&[
        "explain", &file, "--from", BATCH, "--to", API, "--port", "8080",
    ]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout
            .contains("decision: deny (rule `no-admin`, line 10)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("failing closed"), "{}", r.stdout);

    let r = policy(&["explain", &file, "--from", WEB, "--to", API]);
    assert!(
        r.stdout.contains(
            "web-reads (line 5, allow): no match: it lists ports and the request has none"
        ),
        "{}",
        r.stdout
    );
    let r = policy(&[
        "explain", &file, "--from", WEB, "--to", API, "--port", "8080", "--json",
    ]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["rule"]["name"], "no-admin");
    assert_eq!(v["rules"][0]["failed"], "no-http-info");
    assert_eq!(v["rules"][1]["fail_closed"], "no-http-info");
    assert_eq!(v["rules"][2]["failed"], "from");

    // The same allowed request asking to switch to a WebSocket: no rule names it.
    let r = policy(&[
        "explain",
        &file,
        "--from",
        WEB,
        "--to",
        API,
        "--port",
        "8080",
        "--method",
        "GET",
        "--path",
        "/v1/orders",
        "--upgrade",
        "WebSocket",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("GET /v1/orders (upgrade to websocket)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(
            "web-reads (line 5, allow): no match: its `upgrades` does not name the protocol asked for"
        ),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("decision: deny"), "{}", r.stdout);

    let r = policy(&["explain", &file, "--from", "not-an-id", "--to", API]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("--from `not-an-id` is not a SPIFFE ID"),
        "{}",
        r.stderr
    );
    let bad = write(dir.path(), "bad.yaml", "rules:\n  - name: a\n    from: [\"spiffe://example.org/a\"]\n    to: [\"spiffe://example.org/b\"]\n    mode: audit\n");
    let r = policy(&["explain", &bad, "--from", WEB, "--to", API]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!(
            "{bad}:5:11: `mode: audit` applies only to deny rules"
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn who_can_lists_callers_carve_outs_and_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let r = policy(&["who-can", &file, "--to", API]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("allow `web-reads` (line 5):\n  from spiffe://example.org/ns/web/*\n  ports: 8080; HTTP only: GET; /v1/**\n  except as denied by `no-admin` (line 10)"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("default: deny: no other caller can reach it"),
        "{}",
        r.stdout
    );
    let open = write(
        dir.path(),
        "open.yaml",
        &format!("default: allow\n{POLICY}"),
    );
    let r = policy(&[
        "who-can",
        &open,
        "--to",
        "spiffe://example.org/ns/db/x",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["default_allows_everyone"], true);
    assert_eq!(v["allows"].as_array().unwrap().len(), 0);
    let r = policy(&["who-can", &file, "--to", API, "--json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["allows"][1]["rule"], "batch");
    assert_eq!(v["allows"][1]["except"][0], "no-admin");
    assert_eq!(v["denies"][0]["rule"], "no-admin");
}

#[test]
fn test_runs_cases() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let passing = format!(
        "cases:\n  - {{name: reads, from: {WEB}, to: {API}, port: 8080, method: GET, path: /v1/x, expect: allow, rule: web-reads}}\n  - {{name: admin, from: {BATCH}, to: {API}, port: 8080, method: GET, path: /admin/x, expect: deny, rule: no-admin}}\n"
    );
    let cases = write(dir.path(), "cases.yaml", &passing);
    let r = policy(&["test", &file, &cases]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "2 passed, 0 failed\n");

    let failing = format!("{passing}  - {{name: posts, from: {WEB}, to: {API}, port: 8080, method: POST, path: /v1/x, expect: allow}}\n");
    let cases = write(dir.path(), "failing.yaml", &failing);
    let r = policy(&["test", &file, &cases]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains(&format!(
            "{cases}:4:5: case `posts` failed: expected allow, got deny (the default)"
        )),
        "{}",
        r.stdout
    );
    assert!(r.stdout.ends_with("2 passed, 1 failed\n"), "{}", r.stdout);

    let upgrade = format!("cases:\n  - {{name: socket, from: {WEB}, to: {API}, port: 8080, method: GET, path: /v1/x, upgrade: websocket, expect: deny}}\n  - {{name: bad, from: {WEB}, to: {API}, upgrade: websocket, expect: deny}}\n");
    let cases = write(dir.path(), "upgrade.yaml", &upgrade);
    let r = policy(&["test", &file, &cases]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!("{cases}:3:"))
            && r.stderr.contains("`upgrade` needs `method` and `path`"),
        "{}",
        r.stderr
    );
    let cases = write(
        dir.path(),
        "upgrade-ok.yaml",
        upgrade
            .lines()
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    );
    let r = policy(&["test", &file, &cases]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    let wrong_rule = passing.replace("rule: web-reads", "rule: batch");
    let cases = write(dir.path(), "wrong-rule.yaml", &wrong_rule);
    let r = policy(&["test", &file, &cases]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout
            .contains("expected allow (rule `batch`), got allow (rule `web-reads`, line 5)"),
        "{}",
        r.stdout
    );

    let malformed = write(
        dir.path(),
        "malformed.yaml",
        &passing.replace("expect: deny", "expect: refuse"),
    );
    let r = policy(&["test", &file, &malformed]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!("{malformed}:3:"))
            && r.stderr.contains("unknown outcome `refuse`"),
        "{}",
        r.stderr
    );
}

#[test]
fn diff_replays_the_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let old = write(dir.path(), "old.yaml", POLICY);
    let new = write(
        dir.path(),
        "new.yaml",
        &POLICY.replace("methods: [GET]", "methods: [GET, POST]"),
    );
    let record = |kind: &str, direction: &str, method: Option<&str>, path: Option<&str>| {
        let mut v = serde_json::json!({
            "timestamp": "2025-01-01T00:00:00Z", "kind": kind, "direction": direction,
            "listener": "api", "caller": WEB, "callee": API, "port": 8080, "decision": "deny",
        });
        if let (Some(m), Some(p)) = (method, path) {
            v["method"] = m.into();
            v["path"] = p.into();
        }
        v.to_string()
    };
    let log = [
        record("request", "inbound", Some("POST"), Some("/v1/orders")),
        record(
            "request",
            "inbound",
            Some("POST"),
            Some("/v1/orders?page=2"),
        ),
        record("request", "inbound", Some("GET"), Some("/v1/orders")),
        record("connection", "inbound", None, None),
        record("connection", "outbound", None, None),
        "not json".to_owned(),
        "{\"unrelated\": true}".to_owned(),
        String::new(),
    ]
    .join("\n");
    let log = write(dir.path(), "access.log", &log);
    let r = policy(&["diff", &old, &new, "--access-log", &log]);
    assert_eq!(r.code, 3, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("skipped: 2 lines that are not access records, 1 outbound"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(&format!("1 changed:\n  {WEB} -> {API} port 8080 POST /v1/orders x2: deny (<default>) -> allow (web-reads)")), "{}", r.stdout);

    let r = policy(&["diff", &old, &new, "--access-log", &log, "--json"]);
    assert_eq!(r.code, 3);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (
            v["records"].clone(),
            v["skipped_lines"].clone(),
            v["per_request"].clone()
        ),
        (5.into(), 2.into(), 1.into())
    );
    assert_eq!(v["changes"][0]["records"], 2);
    assert_eq!(v["changes"][0]["old"]["decision"], "deny");
    assert_eq!(v["changes"][0]["new"]["rule"], "web-reads");

    // A new policy that decides per request where the old one decided the connection:
    // the connection record is undetermined, not a change.
    let plain = write(dir.path(), "plain.yaml", "rules:\n  - {name: all, from: [\"spiffe://example.org/**\"], to: [\"spiffe://example.org/**\"]}\n");
    let r = policy(&["diff", &plain, &old, "--access-log", &log, "--json"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["undetermined"].as_array().unwrap().len(),
        1,
        "{}",
        r.stdout
    );
    assert_eq!(v["undetermined"][0]["new"]["decision"], "undetermined");
    assert_eq!(v["undetermined"][0]["old"]["decision"], "allow");

    let r = policy(&["diff", &old, &old, "--access-log", &log]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains("no decision changes"), "{}", r.stdout);
    let r = policy(&[
        "diff",
        &old,
        &new,
        "--access-log",
        &dir.path().join("none.log").display().to_string(),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot read the access log"),
        "{}",
        r.stderr
    );
}

#[test]
fn suggest_writes_the_policy_for_the_recorded_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let db = "spiffe://example.org/ns/db/main";
    let line = |caller: &str,
                callee: &str,
                port: u16,
                http: Option<(&str, &str)>,
                decision: &str| {
        let mut v = serde_json::json!({
            "timestamp": "2025-01-01T00:00:00.000Z", "kind": "connection", "direction": "inbound",
            "listener": "l", "caller": caller, "callee": callee, "port": port, "decision": decision,
        });
        if let Some((m, p)) = http {
            v["kind"] = "request".into();
            v["method"] = m.into();
            v["path"] = p.into();
        }
        v.to_string()
    };
    // The API's proxy and the database's proxy, each with its own log.
    let api_log = [
        line(WEB, API, 8080, Some(("GET", "/v1/orders")), "allow"),
        line(
            WEB,
            API,
            8080,
            Some(("GET", "/v1/orders?page=2")),
            "audit_deny",
        ),
        line(BATCH, API, 8080, Some(("DELETE", "/v1/orders")), "deny"),
        String::new(),
    ]
    .join("\n");
    let api_log = write(dir.path(), "api.log", &api_log);
    let db_log = write(dir.path(), "db.log", &line(API, db, 5432, None, "allow"));

    let r = policy(&["suggest", "--access-log", &api_log, "--access-log", &db_log]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "  - name: \"x-8080-1\"\n    from: [\"{WEB}\"]\n    to: [\"{API}\"]\n    ports: [8080]\n    \
             http: {{methods: [\"GET\"], paths: [\"/v1/orders\"]}}\n"
        )),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(&format!(
        "from: [\"{API}\"]\n    to: [\"{db}\"]\n    ports: [5432]\n"
    )));
    assert!(!r.stdout.contains(BATCH), "{}", r.stdout);
    assert!(
        r.stderr.starts_with("4 access record(s): 3 used (inbound, allowed or audit_deny, with caller, callee and port); skipped: 1 denied.\n2 rule(s)"),
        "{}",
        r.stderr
    );
    // What it prints is a clean policy.
    let suggested = write(dir.path(), "suggested.yaml", &r.stdout);
    let check = policy(&["check", &suggested]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    assert!(check
        .stdout
        .contains("policy `suggested` is valid: 2 rule(s), 0 warning(s)"));

    // --output: the file, and the summary on stdout.
    let out = dir.path().join("out.yaml");
    let out_s = out.display().to_string();
    let r2 = policy(&[
        "suggest",
        "--access-log",
        &api_log,
        "--access-log",
        &db_log,
        "-o",
        &out_s,
        "--name",
        "orders",
    ]);
    assert_eq!(r2.code, 0, "{}", r2.stderr);
    assert!(
        r2.stdout.ends_with(&format!("wrote {out_s}\n")),
        "{}",
        r2.stdout
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        r.stdout.replace("name: \"suggested\"", "name: \"orders\"")
    );

    // A line that is not an access record: exit 1 with its place, nothing written...
    let bad = write(
        dir.path(),
        "bad.log",
        &format!(
            "{}\n\n{}\n",
            line(WEB, API, 80, None, "allow"),
            line(WEB, API, 80, None, "maybe")
        ),
    );
    let none = dir.path().join("none.yaml");
    let r = policy(&[
        "suggest",
        "--access-log",
        &db_log,
        "--access-log",
        &bad,
        "-o",
        &none.display().to_string(),
    ]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "");
    assert!(
        r.stderr.contains(&format!(
            "{bad}:3:1: not an access record: unknown decision `maybe`"
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--skip-invalid"), "{}", r.stderr);
    assert!(!none.exists());
    // ...unless skipped on request, and counted.
    let r = policy(&[
        "suggest",
        "--access-log",
        &bad,
        "--skip-invalid",
        "--no-widen",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "{bad}: skipped 1 line(s) that are not access records"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("1 invalid line(s) skipped (--skip-invalid)."),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("ports: [80]"), "{}", r.stdout);
    let r = policy(&[
        "suggest",
        "--access-log",
        &dir.path().join("missing.log").display().to_string(),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot read the access log"),
        "{}",
        r.stderr
    );
}
