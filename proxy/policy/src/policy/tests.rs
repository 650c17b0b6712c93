use std::path::Path;

use super::*;
use crate::{Field, Finding, RuleMatch, Severity};

const WEB: &str = "spiffe://example.org/ns/web/frontend";
const API: &str = "spiffe://example.org/ns/api/orders";
const DB: &str = "spiffe://example.org/ns/db/main";
const BATCH: &str = "spiffe://example.org/ns/batch/job";

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn policy(text: &str) -> Policy {
    Policy::parse(text, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// Decides and cross-checks with `explain`.
fn decide(
    p: &Policy,
    from: &str,
    to: &str,
    port: Option<u16>,
    http: Option<(&str, &str)>,
) -> (Outcome, String) {
    let (from, to) = (id(from), id(to));
    let req = Request {
        from: &from,
        to: &to,
        port,
        http: http.map(|(method, path)| HttpRequest {
            method,
            path,
            upgrade: None,
        }),
    };
    let d = p.decide(&req);
    assert_eq!(p.explain(&req).decision, d);
    (d.outcome, d.rule_name().to_owned())
}

fn err(text: &str) -> (usize, usize, String) {
    let e = Policy::parse(text, "bad.yaml").unwrap_err();
    let (line, column) = e.location().unwrap_or_else(|| panic!("no location: {e}"));
    assert!(
        e.to_string()
            .starts_with(&format!("bad.yaml:{line}:{column}: ")),
        "{e}"
    );
    (line, column, e.message())
}

const BASE: &str = r#"
rules:
  - name: web-to-api
    from: ["spiffe://example.org/ns/web/**"]
    to: ["spiffe://example.org/ns/api/*"]
    ports: [8080]
  - name: no-batch
    action: deny
    from: ["spiffe://example.org/ns/batch/*"]
    to: ["spiffe://example.org/**"]
  - name: batch-to-api
    from: ["spiffe://example.org/ns/batch/*"]
    to: ["spiffe://example.org/ns/api/*"]
"#;

#[test]
fn deny_beats_allow_and_default_denies() {
    let p = policy(BASE);
    assert_eq!(p.name(), "test");
    assert_eq!(
        decide(&p, WEB, API, Some(8080), None),
        (Outcome::Allow, "web-to-api".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(9090), None),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&p, WEB, API, None, None),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&p, WEB, DB, Some(8080), None),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&p, BATCH, API, Some(8080), None),
        (Outcome::Deny, "no-batch".into())
    );
    assert_eq!(
        decide(&p, API, WEB, Some(8080), None),
        (Outcome::Deny, "<default>".into())
    );
}

#[test]
fn default_allow() {
    let p = policy(&format!("default: allow\n{BASE}"));
    assert_eq!(
        decide(&p, API, WEB, Some(1), None),
        (Outcome::Allow, "<default>".into())
    );
    assert_eq!(
        decide(&p, BATCH, WEB, Some(1), None),
        (Outcome::Deny, "no-batch".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(8080), None),
        (Outcome::Allow, "web-to-api".into())
    );
}

#[test]
fn first_rule_of_the_deciding_kind_decides() {
    let p = policy(
        r#"
rules:
  - {name: a1, from: ["spiffe://example.org/**"], to: ["spiffe://example.org/**"]}
  - {name: a2, from: ["spiffe://example.org/ns/web/*"], to: ["spiffe://example.org/**"]}
  - {name: d1, action: deny, mode: audit, from: ["spiffe://example.org/ns/web/*"], to: ["spiffe://example.org/**"]}
  - {name: d2, action: deny, from: ["spiffe://example.org/ns/web/*"], to: ["spiffe://example.org/ns/db/*"]}
  - {name: d3, action: deny, from: ["spiffe://example.org/**"], to: ["spiffe://example.org/ns/db/*"]}
"#,
    );
    assert_eq!(
        decide(&p, WEB, DB, None, None),
        (Outcome::Deny, "d2".into())
    );
    assert_eq!(
        decide(&p, API, DB, None, None),
        (Outcome::Deny, "d3".into())
    );
    assert_eq!(
        decide(&p, WEB, API, None, None),
        (Outcome::AuditDeny, "d1".into())
    );
    assert_eq!(
        decide(&p, API, WEB, None, None),
        (Outcome::Allow, "a1".into())
    );
}

#[test]
fn audit_deny_rule_records_without_refusing() {
    let p = policy(
        r#"
rules:
  - name: web-to-api
    from: ["spiffe://example.org/ns/web/*"]
    to: ["spiffe://example.org/ns/api/*"]
  - name: watch-web
    action: deny
    mode: audit
    from: ["spiffe://example.org/ns/web/*"]
    to: ["spiffe://example.org/**"]
"#,
    );
    // Allowed by a rule, would be denied: recorded.
    assert_eq!(
        decide(&p, WEB, API, None, None),
        (Outcome::AuditDeny, "watch-web".into())
    );
    // Not allowed by anything: the default (deny) is enforced and decides.
    assert_eq!(
        decide(&p, WEB, DB, None, None),
        (Outcome::Deny, "<default>".into())
    );
    assert!(Outcome::AuditDeny.allowed() && Outcome::Allow.allowed() && !Outcome::Deny.allowed());
    let p = policy("default: allow\nrules:\n  - {name: w, action: deny, mode: audit, from: [\"spiffe://example.org/**\"], to: [\"spiffe://example.org/**\"]}\n");
    assert_eq!(
        decide(&p, WEB, DB, None, None),
        (Outcome::AuditDeny, "w".into())
    );
}

#[test]
fn audit_file_never_refuses() {
    let p = policy(&format!("mode: audit\n{BASE}"));
    assert_eq!(
        decide(&p, WEB, API, Some(8080), None),
        (Outcome::Allow, "web-to-api".into())
    );
    assert_eq!(
        decide(&p, BATCH, API, Some(8080), None),
        (Outcome::AuditDeny, "no-batch".into())
    );
    assert_eq!(
        decide(&p, WEB, DB, Some(8080), None),
        (Outcome::AuditDeny, "<default>".into())
    );
    let p = policy(&format!("mode: audit\ndefault: allow\n{BASE}"));
    assert_eq!(
        decide(&p, WEB, DB, Some(8080), None),
        (Outcome::Allow, "<default>".into())
    );
}

const HTTP: &str = r#"
ports: {8080: http, 5432: tcp}
rules:
  - name: web-reads
    from: ["spiffe://example.org/ns/web/*"]
    to: ["spiffe://example.org/ns/api/*"]
    ports: [8080]
    http:
      methods: [GET]
      paths: ["/v1/**", "/health"]
  - name: no-admin
    action: deny
    from: ["spiffe://example.org/**"]
    to: ["spiffe://example.org/ns/api/*"]
    http:
      paths: ["/admin/**"]
  - name: batch-all
    from: ["spiffe://example.org/ns/batch/*"]
    to: ["spiffe://example.org/ns/api/*"]
"#;

#[test]
fn http_rules() {
    let p = policy(HTTP);
    let get = |path| Some(("GET", path));
    assert_eq!(
        decide(&p, WEB, API, Some(8080), get("/v1/orders")),
        (Outcome::Allow, "web-reads".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(8080), get("/health")),
        (Outcome::Allow, "web-reads".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(8080), Some(("POST", "/v1/orders"))),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(8080), get("/v2/x")),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(8080), get("/admin/users")),
        (Outcome::Deny, "no-admin".into())
    );
    assert_eq!(
        decide(&p, BATCH, API, Some(8080), get("/admin")),
        (Outcome::Deny, "no-admin".into())
    );
    assert_eq!(
        decide(&p, BATCH, API, Some(8080), get("/other")),
        (Outcome::Allow, "batch-all".into())
    );
}

#[test]
fn opaque_traffic_never_widens_an_allow_and_denies_fail_closed() {
    let p = policy(HTTP);
    // The http allow does not admit opaque traffic...
    let only_allow = policy(&HTTP[..HTTP.find("  - name: no-admin").unwrap()]);
    assert_eq!(
        decide(&only_allow, WEB, API, Some(8080), None),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&only_allow, WEB, API, Some(8080), Some(("GET", "/health"))),
        (Outcome::Allow, "web-reads".into())
    );
    // ...and the http deny refuses opaque traffic it cannot rule out.
    assert_eq!(
        decide(&p, BATCH, API, Some(8080), None),
        (Outcome::Deny, "no-admin".into())
    );
    // Ambiguous paths and methods: same treatment.
    for (method, path) in [
        ("GET", "/v1/../admin/x"),
        ("GET", "/admin;x"),
        ("GET", "//admin"),
        ("GET", "/%2e%2e/admin"),
    ] {
        assert_eq!(
            decide(&p, BATCH, API, Some(8080), Some((method, path))),
            (Outcome::Deny, "no-admin".into()),
            "{path}"
        );
    }
    let q = policy("rules:\n  - {name: r, from: [\"spiffe://example.org/**\"], to: [\"spiffe://example.org/**\"], http: {methods: [GET]}}\n  - {name: d, action: deny, from: [\"spiffe://example.org/ns/batch/*\"], to: [\"spiffe://example.org/**\"], http: {methods: [DELETE]}}\n");
    assert_eq!(
        decide(&q, WEB, API, None, Some(("GET", "/"))),
        (Outcome::Allow, "r".into())
    );
    assert_eq!(
        decide(&q, WEB, API, None, Some(("get", "/"))),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&q, BATCH, API, None, Some(("get", "/"))),
        (Outcome::Deny, "d".into())
    );
    assert_eq!(
        decide(&q, BATCH, API, None, Some(("GET", "/"))),
        (Outcome::Allow, "r".into())
    );
}

#[test]
fn ports_and_missing_port() {
    let p = policy(
        r#"
rules:
  - {name: a, from: ["spiffe://example.org/**"], to: ["spiffe://example.org/**"], ports: [80, 443]}
  - {name: d, action: deny, from: ["spiffe://example.org/ns/batch/*"], to: ["spiffe://example.org/**"], ports: [443]}
"#,
    );
    assert_eq!(
        decide(&p, WEB, API, Some(80), None),
        (Outcome::Allow, "a".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(443), None),
        (Outcome::Allow, "a".into())
    );
    assert_eq!(
        decide(&p, WEB, API, Some(81), None),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&p, BATCH, API, Some(443), None),
        (Outcome::Deny, "d".into())
    );
    assert_eq!(
        decide(&p, BATCH, API, Some(80), None),
        (Outcome::Allow, "a".into())
    );
    // No port: the allow cannot be proven, the deny fails closed.
    assert_eq!(
        decide(&p, WEB, API, None, None),
        (Outcome::Deny, "<default>".into())
    );
    assert_eq!(
        decide(&p, BATCH, API, None, None),
        (Outcome::Deny, "d".into())
    );
}

#[test]
fn connection_verdicts() {
    let p = policy(HTTP);
    let (web, api, batch, db) = (id(WEB), id(API), id(BATCH), id(DB));
    assert_eq!(
        p.connection(&web, &api, 8080),
        ConnectionVerdict::PerRequest
    );
    assert_eq!(
        p.connection(&batch, &api, 8080),
        ConnectionVerdict::PerRequest
    );
    let ConnectionVerdict::Decided(d) = p.connection(&web, &db, 8080) else {
        panic!()
    };
    assert_eq!((d.outcome, d.rule), (Outcome::Deny, None));
    // An enforced deny without http before every http rule decides the connection.
    let q = policy(&HTTP.replace("rules:\n", "rules:\n  - {name: block-web, action: deny, from: [\"spiffe://example.org/ns/web/*\"], to: [\"spiffe://example.org/**\"]}\n"));
    let ConnectionVerdict::Decided(d) = q.connection(&web, &api, 8080) else {
        panic!()
    };
    assert_eq!((d.outcome, d.rule_name()), (Outcome::Deny, "block-web"));
    // Port 5432 is outside web-reads' ports, but no-admin has no ports: still per request.
    assert_eq!(
        p.connection(&batch, &api, 5432),
        ConnectionVerdict::PerRequest
    );
    let r = policy(BASE);
    let ConnectionVerdict::Decided(d) = r.connection(&web, &api, 8080) else {
        panic!()
    };
    assert_eq!(d.rule_name(), "web-to-api");
}

#[test]
fn validate_ports_against_the_proxy() {
    let p = policy(HTTP);
    p.validate_ports(&[(8080, Protocol::Http)]).unwrap();
    // no-admin has http conditions and no ports: it reaches the tcp port.
    let e = p
        .validate_ports(&[(8080, Protocol::Http), (5432, Protocol::Tcp)])
        .unwrap_err();
    assert_eq!(e.location(), Some((15, 5)), "{e}");
    assert!(e.to_string().contains("no-admin"), "{e}");
    // web-reads lists 8080; if the proxy serves it as tcp, the error points at the port.
    let e = p.validate_ports(&[(8080, Protocol::Tcp)]).unwrap_err();
    assert_eq!(e.location(), Some((7, 13)), "{e}");
}

#[test]
fn errors_carry_exact_positions() {
    // Bad pattern: the pattern string inside rule 2.
    let (l, c, m) = err("rules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n  - name: b\n    from:\n      - spiffe://e.org/a\n      - spiffe://e.org/web-*\n    to: [\"spiffe://e.org/b\"]\n");
    assert_eq!((l, c), (8, 9));
    assert!(
        m.contains("web-*") && m.contains("use `*` for exactly one whole segment"),
        "{m}"
    );
    // Unknown key.
    let (l, c, m) = err("rules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n    prots: [80]\n");
    assert_eq!((l, c), (5, 5));
    assert!(
        m.contains("unknown key `prots`") && m.contains("ports"),
        "{m}"
    );
    let (l, c, _) = err("rulez: []\n");
    assert_eq!((l, c), (1, 1));
    // Duplicate rule name: at the second name's value.
    let (l, c, m) = err("rules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n  - to: [\"spiffe://e.org/b\"]\n    name: a\n    from: [\"spiffe://e.org/a\"]\n");
    assert_eq!((l, c), (6, 11));
    assert!(
        m.contains("duplicate rule name `a` (first used on line 2)"),
        "{m}"
    );
    // http on a tcp port: at the port in the rule.
    let (l, c, m) = err("ports:\n  5432: tcp\nrules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n    ports: [80, 5432]\n    http: {methods: [GET]}\n");
    assert_eq!((l, c), (7, 17));
    assert!(m.contains("port 5432 is declared tcp (line 2)"), "{m}");
    // Audit allow: at the mode value.
    let (l, c, m) = err("rules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n    mode: audit\n");
    assert_eq!((l, c), (5, 11));
    assert!(m.contains("only to deny rules"), "{m}");
    // Syntax error.
    let e = Policy::parse("rules:\n  - name: a\n   from: [x\n", "bad.yaml").unwrap_err();
    assert!(matches!(e, PolicyError::Syntax { .. }), "{e}");
    assert_eq!(e.location().map(|(l, _)| l), Some(3), "{e}");
    let e = Policy::parse("rules: [\n", "bad.yaml").unwrap_err();
    assert!(matches!(e, PolicyError::Syntax { .. }), "{e}");
    // Wrong types.
    let (l, c, m) =
        err("rules:\n  - name: a\n    from: spiffe://e.org/a\n    to: [\"spiffe://e.org/b\"]\n");
    assert_eq!((l, c), (3, 11));
    assert!(m.contains("expected `from` as a list"), "{m}");
    let (l, c, m) = err("rules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n    ports: [\"80\"]\n");
    assert_eq!((l, c), (5, 13));
    assert!(m.contains("port number"), "{m}");
    let (l, c, _) = err("rules: {}\n");
    assert_eq!((l, c), (1, 8));
    let (l, c, _) = err("- a\n- b\n");
    assert_eq!((l, c), (1, 1));
    // Empty lists, missing fields, bad method, bad action, bad default.
    let (l, c, m) = err("rules:\n  - name: a\n    from: []\n    to: [\"spiffe://e.org/b\"]\n");
    assert_eq!((l, c, m.contains("`from` is empty")), (3, 11, true));
    let (l, c, m) = err("rules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n");
    assert_eq!((l, c, m.contains("needs `to`")), (2, 5, true));
    let (l, c, m) = err("rules:\n  - name: a\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n    http:\n      methods: [GET, post]\n");
    assert_eq!((l, c, m.contains("upper case")), (6, 22, true));
    let (l, c, _) = err("rules:\n  - name: a\n    action: permit\n    from: [\"spiffe://e.org/a\"]\n    to: [\"spiffe://e.org/b\"]\n");
    assert_eq!((l, c), (3, 13));
    let (l, c, _) = err("default: maybe\nrules: []\n");
    assert_eq!((l, c), (1, 10));
    // Duplicate keys, anchors, aliases, tags, several documents, empty file.
    assert_eq!(err("rules: []\nrules: []\n").0, 2);
    assert_eq!(err("rules: &r []\n").0, 1);
    assert_eq!(err("a: &x 1\nrules: *x\n").0, 1);
    assert_eq!(err("rules: !!seq []\n").0, 1);
    assert_eq!(err("rules: []\n---\nrules: []\n").0, 2);
    assert_eq!(err("").0, 1);
    assert_eq!(err("# nothing\n").0, 1);
    // Trust domains and ports declarations.
    let (l, c, _) = err("trust_domains: [\"spiffe://e.org\"]\nrules: []\n");
    assert_eq!((l, c), (1, 17));
    let (l, c, _) = err("ports: {8080: udp}\nrules: []\n");
    assert_eq!((l, c), (1, 15));
    let (l, c, _) = err("ports: {0: tcp}\nrules: []\n");
    assert_eq!((l, c), (1, 9));
}

#[test]
fn limits() {
    let deep = format!("rules: {}{}\n", "[".repeat(100), "]".repeat(100));
    let e = Policy::parse(&deep, "deep.yaml").unwrap_err();
    assert!(
        matches!(e, PolicyError::Syntax { .. }) && e.to_string().contains("nesting"),
        "{e}"
    );
    let big = "#".repeat(MAX_POLICY_BYTES + 1);
    assert!(matches!(
        Policy::parse(&big, "big.yaml"),
        Err(PolicyError::TooLarge { .. })
    ));
    let e = Policy::load(Path::new("/nonexistent/policy.yaml")).unwrap_err();
    assert!(
        matches!(e, PolicyError::Io { .. })
            && e.to_string().starts_with("/nonexistent/policy.yaml: "),
        "{e}"
    );
}

#[test]
fn load_reports_non_utf8_position() {
    let dir = std::env::temp_dir().join(format!("meshid-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("latin1.yaml");
    std::fs::write(&path, b"rules: []\nname: caf\xe9\n").unwrap();
    let e = Policy::load(&path).unwrap_err();
    assert_eq!(e.location(), Some((2, 10)), "{e}");
    std::fs::write(&path, "name: named\nrules: []\n").unwrap();
    assert_eq!(Policy::load(&path).unwrap().name(), "named");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_findings() {
    let p = policy(
        r#"trust_domains: [example.org]
ports: {8080: http, 5432: tcp}
rules:
  - name: broad
    from: ["spiffe://example.org/ns/web/**"]
    to: ["spiffe://example.org/ns/api/*"]
  - name: narrow
    from: ["spiffe://example.org/ns/web/frontend"]
    to: ["spiffe://example.org/ns/api/orders"]
    ports: [8080]
  - name: partner
    from: ["spiffe://partner.org/**", "spiffe://exmaple.org/x"]
    to: ["spiffe://example.org/ns/api/*"]
  - name: block-web
    action: deny
    from: ["spiffe://example.org/ns/web/*"]
    to: ["spiffe://example.org/ns/api/*"]
  - name: web-admin
    from: ["spiffe://example.org/ns/web/admin"]
    to: ["spiffe://example.org/ns/api/*"]
    ports: [9000]
  - name: reads
    from: ["spiffe://example.org/ns/db/*"]
    to: ["spiffe://example.org/ns/api/*"]
    http: {methods: [GET]}
"#,
    );
    let findings = p.check();
    let got: Vec<(Severity, usize, usize, Option<&str>)> = findings
        .iter()
        .map(|f| (f.severity, f.line, f.column, f.rule.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (Severity::Warning, 7, 5, Some("narrow")),
            (Severity::Warning, 7, 5, Some("narrow")),
            (Severity::Warning, 12, 12, Some("partner")),
            (Severity::Warning, 12, 39, Some("partner")),
            (Severity::Warning, 18, 5, Some("web-admin")),
            (Severity::Warning, 18, 5, Some("web-admin")),
            (Severity::Info, 21, 13, Some("web-admin")),
            (Severity::Warning, 25, 5, Some("reads")),
        ],
        "{findings:#?}"
    );
    let messages: Vec<&str> = findings.iter().map(|f| f.message.as_str()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("shadowed by rule `broad` (line 4)")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("`narrow` is unreachable") && m.contains("`block-web`")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("`exmaple.org` is not a known trust domain")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("port 9000 is not declared")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("tcp port 5432")),
        "{messages:?}"
    );
    // Extra trust domains from the command line count as known.
    let with = p.check_with(&["partner.org"]);
    assert_eq!(with.len(), findings.len() - 1);
    // Audit denials: an info, not a warning.
    let q = policy("default: allow\nrules:\n  - {name: a, from: [\"spiffe://e.org/a\"], to: [\"spiffe://e.org/b\"]}\n  - {name: d, action: deny, mode: audit, from: [\"spiffe://e.org/**\"], to: [\"spiffe://e.org/**\"]}\n");
    let f = q.check();
    assert_eq!(
        f.iter().map(|f| (f.severity, f.line)).collect::<Vec<_>>(),
        vec![(Severity::Info, 1), (Severity::Info, 3)],
        "{f:#?}"
    );
    // A deny that overlaps no allow under a deny default.
    let r = policy("rules:\n  - {name: a, from: [\"spiffe://e.org/a\"], to: [\"spiffe://e.org/b\"]}\n  - {name: d, action: deny, from: [\"spiffe://e.org/c\"], to: [\"spiffe://e.org/**\"]}\n");
    let f = r.check();
    assert_eq!(f.len(), 1, "{f:#?}");
    assert_eq!((f[0].severity, f[0].line), (Severity::Info, 3));
    let warnings: Vec<Finding> = policy(BASE)
        .check()
        .into_iter()
        .filter(|f| f.severity == Severity::Warning)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(
        (warnings[0].rule.as_deref(), warnings[0].line),
        (Some("batch-to-api"), 11)
    );
}

#[test]
fn a_shadowing_audit_deny_does_not_shadow_an_enforced_one() {
    let p = policy("rules:\n  - {name: a, from: [\"spiffe://e.org/**\"], to: [\"spiffe://e.org/**\"]}\n  - {name: d1, action: deny, mode: audit, from: [\"spiffe://e.org/**\"], to: [\"spiffe://e.org/**\"]}\n  - {name: d2, action: deny, from: [\"spiffe://e.org/x\"], to: [\"spiffe://e.org/**\"]}\n  - {name: d3, action: deny, mode: audit, from: [\"spiffe://e.org/y\"], to: [\"spiffe://e.org/**\"]}\n");
    let findings = p.check();
    let shadowed: Vec<&str> = findings
        .iter()
        .filter(|f| f.message.contains("shadowed"))
        .filter_map(|f| f.rule.as_deref())
        .collect();
    assert_eq!(shadowed, vec!["d3"]);
}

#[test]
fn explain_names_the_failing_field() {
    let p = policy(HTTP);
    let (web, api, batch) = (id(WEB), id(API), id(BATCH));
    let req = Request {
        from: &web,
        to: &api,
        port: Some(8080),
        http: Some(HttpRequest {
            method: "POST",
            path: "/v1/x",
            upgrade: None,
        }),
    };
    let e = p.explain(&req);
    let results: Vec<RuleMatch> = e.rules.iter().map(|t| t.result).collect();
    assert_eq!(
        results,
        vec![
            RuleMatch::NotMatched(Field::Method),
            RuleMatch::NotMatched(Field::Path),
            RuleMatch::NotMatched(Field::From)
        ]
    );
    assert_eq!(e.decision.rule, None);
    let req = Request {
        from: &batch,
        to: &api,
        port: Some(8080),
        http: None,
    };
    let e = p.explain(&req);
    let results: Vec<RuleMatch> = e.rules.iter().map(|t| t.result).collect();
    assert_eq!(
        results,
        vec![
            RuleMatch::NotMatched(Field::From),
            RuleMatch::MatchedFailClosed(Field::NoHttpInfo),
            RuleMatch::Matched
        ]
    );
    assert_eq!(e.decision.rule_name(), "no-admin");
    assert_eq!(
        e.decision.rule.as_ref().map(|r| (r.index, r.line)),
        Some((1, 11))
    );
    let req = Request {
        from: &web,
        to: &api,
        port: Some(9),
        http: None,
    };
    let e = p.explain(&req);
    assert_eq!(e.rules[0].result, RuleMatch::NotMatched(Field::Port));
    assert_eq!(
        e.rules[1].result,
        RuleMatch::MatchedFailClosed(Field::NoHttpInfo)
    );
    let req = Request {
        from: &web,
        to: &web,
        port: None,
        http: Some(HttpRequest {
            method: "GET",
            path: "/a/../admin",
            upgrade: None,
        }),
    };
    let e = p.explain(&req);
    assert_eq!(e.rules[0].result, RuleMatch::NotMatched(Field::To));
    let req = Request {
        from: &web,
        to: &api,
        port: None,
        http: Some(HttpRequest {
            method: "GET",
            path: "/a/../admin",
            upgrade: None,
        }),
    };
    let e = p.explain(&req);
    assert_eq!(e.rules[0].result, RuleMatch::NotMatched(Field::Port));
    assert_eq!(e.rules[1].result, RuleMatch::MatchedFailClosed(Field::Path));
}

#[test]
fn who_can_lists_allows_carve_outs_and_default() {
    let p = policy(HTTP);
    let w = p.who_can(&id(API));
    assert!(!w.default_allows());
    let allows: Vec<(&str, Vec<&str>)> = w
        .allows
        .iter()
        .map(|g| {
            (
                &*g.rule.name,
                g.carve_outs.iter().map(|r| &*r.name).collect(),
            )
        })
        .collect();
    assert_eq!(
        allows,
        vec![
            ("web-reads", vec!["no-admin"]),
            ("batch-all", vec!["no-admin"])
        ]
    );
    let reads = &w.allows[0];
    assert_eq!(reads.ports, Some(vec![8080]));
    assert_eq!(reads.methods, Some(vec!["GET".to_owned()]));
    assert_eq!(
        reads
            .paths
            .as_ref()
            .map(|p| p.iter().map(|p| p.to_string()).collect::<Vec<_>>()),
        Some(vec!["/v1/**".to_owned(), "/health".to_owned()])
    );
    assert_eq!(reads.from[0].to_string(), "spiffe://example.org/ns/web/*");
    assert_eq!(w.denies.len(), 1);
    let w = p.who_can(&id(DB));
    assert!(w.allows.is_empty() && w.denies.is_empty());
    let q = policy(&format!("default: allow\n{BASE}"));
    let w = q.who_can(&id(DB));
    assert!(w.default_allows());
    assert_eq!(
        w.denies.iter().map(|g| &*g.rule.name).collect::<Vec<_>>(),
        vec!["no-batch"]
    );
    // The carve-out needs overlapping callers.
    let w = q.who_can(&id(API));
    assert_eq!(w.allows[0].carve_outs, vec![]);
    assert_eq!(w.allows[1].carve_outs.len(), 1);
}

#[test]
fn policy_is_send_sync_and_names_default_to_the_file_stem() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Policy>();
    let p = Policy::parse("rules: []\n", "/etc/meshid/payments.yaml").unwrap();
    assert_eq!(p.name(), "payments");
    let p = Policy::parse("name: pay.v2\nrules: []\n", "x.yaml").unwrap();
    assert_eq!(p.name(), "pay.v2");
    assert_eq!(err("name: \"pay ments\"\nrules: []\n").1, 7);
}

const UPGRADES: &str = r#"
ports: {8080: http}
rules:
  - name: web-reads
    from: ["spiffe://example.org/ns/web/**"]
    to: ["spiffe://example.org/ns/api/*"]
    http: {methods: [GET], paths: ["/public/**", "/ws/**"]}
  - name: web-sockets
    from: ["spiffe://example.org/ns/web/**"]
    to: ["spiffe://example.org/ns/api/*"]
    http: {paths: ["/ws/**"], upgrades: [websocket]}
  - name: no-admin
    action: deny
    from: ["spiffe://example.org/**"]
    to: ["spiffe://example.org/ns/api/*"]
    http: {paths: ["/ws/admin/**"]}
  - name: batch-anything
    from: ["spiffe://example.org/ns/batch/*"]
    to: ["spiffe://example.org/ns/api/*"]
"#;

fn decide_upgrade(p: &Policy, from: &str, path: &str, upgrade: Option<&str>) -> (Outcome, String) {
    let (from, to) = (id(from), id(API));
    let req = Request {
        from: &from,
        to: &to,
        port: Some(8080),
        http: Some(HttpRequest {
            method: "GET",
            path,
            upgrade,
        }),
    };
    let d = p.decide(&req);
    assert_eq!(p.explain(&req).decision, d);
    (d.outcome, d.rule_name().to_owned())
}

#[test]
fn an_upgrade_needs_an_allow_rule_that_names_it() {
    let p = policy(UPGRADES);
    let allow = |r: &str| (Outcome::Allow, r.to_owned());
    let deny = |r: &str| (Outcome::Deny, r.to_owned());
    // The plain request is allowed; the same request asking to switch protocols is not, by a
    // rule whose `upgrades` does not name the protocol.
    assert_eq!(
        decide_upgrade(&p, WEB, "/public/x", None),
        allow("web-reads")
    );
    assert_eq!(
        decide_upgrade(&p, WEB, "/public/x", Some("websocket")),
        deny("<default>")
    );
    assert_eq!(
        decide_upgrade(&p, WEB, "/ws/chat", Some("websocket")),
        allow("web-sockets")
    );
    assert_eq!(
        decide_upgrade(&p, WEB, "/ws/chat", Some("WebSocket")),
        allow("web-sockets")
    );
    assert_eq!(
        decide_upgrade(&p, WEB, "/ws/chat", Some("connect")),
        deny("<default>")
    );
    // A deny rule refuses the upgrade as it refuses the plain request.
    assert_eq!(
        decide_upgrade(&p, WEB, "/ws/admin/x", Some("websocket")),
        deny("no-admin")
    );
    // A rule without `http` conditions covers opaque traffic, so any upgrade.
    assert_eq!(
        decide_upgrade(&p, BATCH, "/anything", Some("connect")),
        allow("batch-anything")
    );
    let (from, to) = (id(WEB), id(API));
    let e = p.explain(&Request {
        from: &from,
        to: &to,
        port: Some(8080),
        http: Some(HttpRequest {
            method: "GET",
            path: "/public/x",
            upgrade: Some("websocket"),
        }),
    });
    assert_eq!(e.rules[0].result, RuleMatch::NotMatched(Field::Upgrade));
    assert_eq!(Field::Upgrade.as_str(), "upgrade");
    let w = p.who_can(&to);
    assert_eq!(w.allows[0].upgrades, None);
    assert_eq!(w.allows[1].upgrades, Some(vec!["websocket".to_owned()]));
}

#[test]
fn upgrades_are_validated() {
    let rule = |action: &str, upgrades: &str| {
        format!(
            "rules:\n  - name: r\n    action: {action}\n    from: [\"{WEB}\"]\n    to: [\"{API}\"]\n    http: {{paths: [\"/ws\"], upgrades: {upgrades}}}\n"
        )
    };
    let (line, column, m) = err(&rule("deny", "[websocket]"));
    assert_eq!((line, column), (6, 38), "{m}");
    assert!(m.contains("for allow rules"), "{m}");
    for (bad, what) in [
        ("[h2c]", "cannot be allowed"),
        ("[h2]", "cannot be allowed"),
        ("[WebSocket]", "lower-case"),
        ("[\"web socket\"]", "lower-case"),
        ("[\"\"]", "lower-case"),
        ("[websocket, websocket]", "listed twice"),
        ("[]", "is empty"),
        ("websocket", "list"),
    ] {
        let (_, _, m) = err(&rule("allow", bad));
        assert!(m.contains(what), "{bad}: {m}");
    }
    let p = policy(&rule("allow", "[websocket, tls.1-2+x]"));
    assert!(p.check().is_empty(), "{:?}", p.check());
}

#[test]
fn an_allow_without_the_upgrade_does_not_shadow_one_with_it() {
    let p = policy(
        r#"
rules:
  - name: reads
    from: ["spiffe://example.org/ns/web/**"]
    to: ["spiffe://example.org/ns/api/*"]
    http: {paths: ["/**"]}
  - name: sockets
    from: ["spiffe://example.org/ns/web/**"]
    to: ["spiffe://example.org/ns/api/*"]
    http: {paths: ["/ws/**"], upgrades: [websocket]}
  - name: sockets-again
    from: ["spiffe://example.org/ns/web/**"]
    to: ["spiffe://example.org/ns/api/*"]
    http: {paths: ["/ws/chat"], upgrades: [websocket]}
"#,
    );
    let shadowed: Vec<String> = p
        .check()
        .into_iter()
        .filter(|f| f.message.contains("shadowed"))
        .filter_map(|f| f.rule)
        .collect();
    assert_eq!(shadowed, vec!["sockets-again".to_owned()]);
}

#[test]
fn merged_documents_must_agree_and_not_repeat_rule_names() {
    let a = Policy::parse(
        "default: deny\nrules:\n  - name: web\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://example.org/api\"]\n",
        "a.yaml",
    )
    .unwrap();
    let allow = Policy::parse("default: allow\nrules: []\n", "b.yaml").unwrap();
    let e = Policy::merge("mesh", &[a.clone(), allow])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("b.yaml:1:10: default allow") && e.contains("a.yaml"),
        "{e}"
    );
    let audit = Policy::parse("mode: audit\nrules: []\n", "c.yaml").unwrap();
    assert!(Policy::merge("mesh", &[a.clone(), audit]).is_err());
    let again = Policy::parse(
        "rules:\n  - name: batch\n    from: [\"spiffe://example.org/b\"]\n    to: [\"spiffe://example.org/db\"]\n  - name: web\n    from: [\"spiffe://example.org/x\"]\n    to: [\"spiffe://example.org/y\"]\n",
        "d.yaml",
    )
    .unwrap();
    let e = Policy::merge("mesh", &[a.clone(), again])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("d.yaml:5:5: rule `web` is also in a.yaml (line 3)"),
        "{e}"
    );
    let http = Policy::parse("ports: {8080: http}\nrules: []\n", "e.yaml").unwrap();
    let tcp = Policy::parse("ports: {8080: tcp}\nrules: []\n", "f.yaml").unwrap();
    let e = Policy::merge("mesh", &[http, tcp]).unwrap_err().to_string();
    assert!(
        e.starts_with("f.yaml:1:9: port 8080 is tcp here but http"),
        "{e}"
    );
    let empty = Policy::merge("mesh", &[]).unwrap();
    assert_eq!(
        (empty.rule_count(), empty.default_action()),
        (0, Action::Deny)
    );
    let one = Policy::merge("mesh", &[a]).unwrap();
    assert_eq!((one.name(), one.rule_count()), ("mesh", 1));
}

#[test]
fn every_field_survives_being_written_back() {
    let text = r#"
name: "edge.payments"
default: deny
mode: enforce
trust_domains: [example.org, partner.org]
ports: {8080: http, 5432: tcp}
rules:
  - name: "frontend-to-api"
    from: ["spiffe://example.org/frontend/**"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http: {methods: [GET, POST], paths: ["/v1/**", "/live"], upgrades: [websocket]}
  - name: no-batch-to-db
    action: deny
    mode: audit
    from: ["spiffe://example.org/batch/*"]
    to: ["spiffe://example.org/db"]
"#;
    let p = Policy::parse(text, "p.yaml").unwrap();
    let yaml = p.to_yaml();
    let q = Policy::parse(&yaml, "q.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(q.to_yaml(), yaml);
    assert_eq!(q.name(), "edge.payments");
    assert_eq!(
        q.trust_domains().collect::<Vec<_>>(),
        ["example.org", "partner.org"]
    );
    assert!(
        yaml.contains("upgrades: [\"websocket\"]") && yaml.contains("mode: audit"),
        "{yaml}"
    );
    assert!(q
        .validate_ports(&[(8080, Protocol::Http), (5432, Protocol::Tcp)])
        .is_ok());
    let (batch, db) = (
        id("spiffe://example.org/batch/x"),
        id("spiffe://example.org/db"),
    );
    let req = Request {
        from: &batch,
        to: &db,
        port: Some(5432),
        http: None,
    };
    assert_eq!(q.decide(&req), p.decide(&req));
    // Restricted to the database: only the rule about it, and the rest of the mesh unseen.
    let part = p.restricted_to(std::slice::from_ref(&db));
    assert_eq!(part.rule_count(), 1);
    assert!(!part.to_yaml().contains("frontend"));
    assert_eq!(part.decide(&req), p.decide(&req));
}
