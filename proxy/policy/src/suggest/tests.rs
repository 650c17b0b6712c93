use super::*;
use crate::{parse_access_log, AccessLogError, HttpRequest, Request};

const API: &str = "spiffe://example.org/ns/api/orders";

fn web(name: &str) -> String {
    format!("spiffe://example.org/ns/web/{name}")
}

fn record(caller: &str, callee: &str, port: u16, http: Option<(&str, &str)>) -> AccessRecord {
    AccessRecord {
        timestamp: "2025-01-01T00:00:00.000Z".to_owned(),
        kind: if http.is_some() {
            "request"
        } else {
            "connection"
        }
        .to_owned(),
        direction: "inbound".to_owned(),
        caller: Some(caller.to_owned()),
        callee: Some(callee.to_owned()),
        port: Some(port),
        method: http.map(|h| h.0.to_owned()),
        path: http.map(|h| h.1.to_owned()),
        decision: "allow".to_owned(),
        ..AccessRecord::default()
    }
}

fn at(mut r: AccessRecord, timestamp: &str) -> AccessRecord {
    r.timestamp = timestamp.to_owned();
    r
}

fn suggest(records: &[AccessRecord]) -> Suggestion {
    Policy::suggest(records, &SuggestOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn allowed(p: &Policy, from: &str, to: &str, port: u16, http: Option<(&str, &str)>) -> bool {
    let (from, to) = (SpiffeId::new(from).unwrap(), SpiffeId::new(to).unwrap());
    p.decide(&Request {
        from: &from,
        to: &to,
        port: Some(port),
        http: http.map(|(method, path)| HttpRequest {
            method,
            path,
            upgrade: None,
        }),
    })
    .outcome
    .allowed()
}

/// The rule lines (`  - name:` and what follows), without comments.
fn rules_of(yaml: &str) -> String {
    yaml.lines()
        .skip_while(|l| *l != "rules:")
        .skip(1)
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn requests_are_split_so_that_each_rule_allows_only_recorded_pairs() {
    let a = web("a");
    let s = suggest(&[
        at(
            record(&a, API, 8080, Some(("GET", "/v1/orders"))),
            "2025-01-01T00:00:01Z",
        ),
        at(
            record(&a, API, 8080, Some(("GET", "/v1/orders?page=2"))),
            "2025-01-01T00:00:03Z",
        ),
        record(&a, API, 8080, Some(("POST", "/v1/orders/"))),
        record(&a, API, 8080, Some(("GET", "/v1/items"))),
    ]);
    assert_eq!(
        s.yaml,
        "\
# Suggested from access logs by `policy suggest`.
# 4 access record(s): 4 used (inbound, allowed or audit_deny, with caller, callee and port).
# 2 rule(s); 0 widened `*` pattern(s).
# Default deny: only the recorded traffic is allowed, and, where a rule says
# `widened`, the callers its pattern matches. Review before applying.
name: \"suggested\"
default: deny
mode: enforce
trust_domains: [\"example.org\"]
rules:
  # covers 1 record(s) from 1 caller(s), 2025-01-01T00:00:00.000Z .. 2025-01-01T00:00:00.000Z:
  #   spiffe://example.org/ns/web/a -> spiffe://example.org/ns/api/orders port 8080: GET /v1/items x1
  - name: \"orders-8080-1\"
    from: [\"spiffe://example.org/ns/web/a\"]
    to: [\"spiffe://example.org/ns/api/orders\"]
    ports: [8080]
    http: {methods: [\"GET\"], paths: [\"/v1/items\"]}
  # covers 3 record(s) from 1 caller(s), 2025-01-01T00:00:00.000Z .. 2025-01-01T00:00:03Z:
  #   spiffe://example.org/ns/web/a -> spiffe://example.org/ns/api/orders port 8080: GET /v1/orders x2, POST /v1/orders/ x1
  - name: \"orders-8080-2\"
    from: [\"spiffe://example.org/ns/web/a\"]
    to: [\"spiffe://example.org/ns/api/orders\"]
    ports: [8080]
    http: {methods: [\"GET\", \"POST\"], paths: [\"/v1/orders\"]}
"
    );
    let p = &s.policy;
    assert!(allowed(p, &a, API, 8080, Some(("POST", "/v1/orders"))));
    assert!(allowed(p, &a, API, 8080, Some(("GET", "/v1/items/"))));
    // Not recorded: another method on a recorded path, another path, another port, opaque.
    assert!(!allowed(p, &a, API, 8080, Some(("POST", "/v1/items"))));
    assert!(!allowed(p, &a, API, 8080, Some(("PUT", "/v1/orders"))));
    assert!(!allowed(p, &a, API, 8080, Some(("GET", "/v1/orders/1"))));
    assert!(!allowed(p, &a, API, 8081, Some(("GET", "/v1/items"))));
    assert!(!allowed(p, &a, API, 8080, None));
    assert!(!allowed(
        p,
        &web("b"),
        API,
        8080,
        Some(("GET", "/v1/items"))
    ));
    assert!(p.check().is_empty(), "{:?}", p.check());
}

#[test]
fn callers_with_the_same_traffic_share_a_rule_and_opaque_traffic_has_no_http() {
    let db = "spiffe://example.org/ns/db/main";
    let s = suggest(&[
        record(&web("b"), API, 8080, Some(("GET", "/health"))),
        record(&web("a"), API, 8080, Some(("GET", "/health"))),
        record(API, db, 5432, None),
        // Opaque and HTTP from one caller to one port: one rule without `http` covers both.
        record(&web("c"), API, 8080, Some(("GET", "/health"))),
        record(&web("c"), API, 8080, None),
    ]);
    assert_eq!(
        rules_of(&s.yaml),
        "  - name: \"orders-8080-1\"
    from: [\"spiffe://example.org/ns/web/c\"]
    to: [\"spiffe://example.org/ns/api/orders\"]
    ports: [8080]
  - name: \"orders-8080-2\"
    from: [\"spiffe://example.org/ns/web/a\", \"spiffe://example.org/ns/web/b\"]
    to: [\"spiffe://example.org/ns/api/orders\"]
    ports: [8080]
    http: {methods: [\"GET\"], paths: [\"/health\"]}
  - name: \"main-5432-1\"
    from: [\"spiffe://example.org/ns/api/orders\"]
    to: [\"spiffe://example.org/ns/db/main\"]
    ports: [5432]
"
    );
    assert!(s.yaml.contains(
        "  # no `http` conditions: opaque connections were recorded\n  - name: \"orders-8080-1\""
    ));
    assert!(s.yaml.contains("# covers 2 record(s) from 2 caller(s)"));
}

#[test]
fn callers_differing_in_one_segment_are_widened_only_when_safe() {
    let health = |c: &str| record(c, API, 8080, Some(("GET", "/health")));
    let three = [health(&web("a")), health(&web("b")), health(&web("c"))];
    let s = suggest(&three);
    assert_eq!(s.widened, 1);
    assert!(
        rules_of(&s.yaml).contains("    from: [\"spiffe://example.org/ns/web/*\"]\n"),
        "{}",
        s.yaml
    );
    assert!(s.yaml.contains(
        "  # widened: spiffe://example.org/ns/web/* stands for the 3 callers \
         spiffe://example.org/ns/web/a, spiffe://example.org/ns/web/b, \
         spiffe://example.org/ns/web/c (recorded with this same access)"
    ));
    assert!(s
        .yaml
        .contains("# 1 rule(s); 1 widened `*` pattern(s), each marked"));
    assert!(allowed(
        &s.policy,
        &web("new"),
        API,
        8080,
        Some(("GET", "/health"))
    ));

    // Off, or too few callers: exact IDs.
    let exact = Policy::suggest(
        &three,
        &SuggestOptions {
            widen_min: 0,
            ..SuggestOptions::default()
        },
    )
    .unwrap();
    assert_eq!(exact.widened, 0);
    assert!(!rules_of(&exact.yaml).contains('*'));
    assert!(!rules_of(&suggest(&three[..2]).yaml).contains('*'));
    let two = Policy::suggest(
        &three[..2],
        &SuggestOptions {
            widen_min: 2,
            ..SuggestOptions::default()
        },
    )
    .unwrap();
    assert_eq!(two.widened, 1);

    // Another ID the pattern would match is in the logs: refused traffic...
    let mut denied = record(&web("evil"), API, 8080, Some(("GET", "/health")));
    denied.decision = "deny".to_owned();
    let mut with_denied = three.to_vec();
    with_denied.push(denied);
    let s = suggest(&with_denied);
    assert_eq!(s.widened, 0, "{}", s.yaml);
    assert!(!allowed(
        &s.policy,
        &web("evil"),
        API,
        8080,
        Some(("GET", "/health"))
    ));
    // ...a caller with other access to the same workload, or a callee elsewhere.
    let mut other = three.to_vec();
    other.push(record(&web("d"), API, 8080, Some(("POST", "/health"))));
    assert_eq!(suggest(&other).widened, 0);
    let mut callee = three.to_vec();
    callee.push(record(API, &web("d"), 80, None));
    assert_eq!(suggest(&callee).widened, 0);
    // The same access to another port does not count against it.
    let mut elsewhere = three.to_vec();
    elsewhere.push(record(&web("a"), API, 9090, None));
    assert_eq!(suggest(&elsewhere).widened, 1);
}

#[test]
fn widening_prefers_the_largest_group_then_the_last_segment() {
    let records = |ids: &[&str]| -> Vec<AccessRecord> {
        ids.iter()
            .map(|c| record(&format!("spiffe://example.org/ns/{c}"), API, 80, None))
            .collect()
    };
    let from = |ids: &[&str]| -> String {
        let s = suggest(&records(ids));
        let rules = rules_of(&s.yaml);
        rules
            .lines()
            .find_map(|l| l.strip_prefix("    from: "))
            .unwrap()
            .replace("spiffe://example.org/ns/", "")
    };
    // {web,x,y,z}/a share `*/a`, web/{a,b,c} would share `web/*`, but web/a is taken and two
    // fresh callers are too few.
    assert_eq!(
        from(&["web/a", "web/b", "web/c", "x/a", "y/a", "z/a"]),
        r#"["*/a", "web/b", "web/c"]"#
    );
    // Three each: the pattern on the last segment (replicas of one workload) wins.
    assert_eq!(
        from(&["web/a", "web/b", "web/c", "x/a", "y/a"]),
        r#"["web/*", "x/a", "y/a"]"#
    );
}

#[test]
fn what_http_conditions_cannot_say_widens_the_rule_and_says_so() {
    let a = web("a");
    let mut ws = record(&a, API, 8080, Some(("GET", "/ws")));
    ws.upgrade = Some("WebSocket".to_owned());
    let s = suggest(&[ws.clone(), record(&a, API, 8080, Some(("GET", "/x")))]);
    assert!(rules_of(&s.yaml)
        .contains("    http: {methods: [\"GET\"], paths: [\"/ws\"], upgrades: [\"websocket\"]}\n"));
    assert!(rules_of(&s.yaml).contains("    http: {methods: [\"GET\"], paths: [\"/x\"]}\n"));

    let mut h2c = ws;
    h2c.upgrade = Some("h2c".to_owned());
    let s = suggest(&[h2c]);
    assert!(!s.yaml.contains("http:"), "{}", s.yaml);
    assert!(s.yaml.contains(
        "# no `http` conditions: a request switched to `h2c`, which `upgrades` cannot name"
    ));

    let s = suggest(&[
        record(&a, API, 8080, Some(("get", "/x"))),
        record(&a, API, 8080, Some(("GET", "/y"))),
    ]);
    assert!(
        rules_of(&s.yaml).contains("    http: {paths: [\"/x\", \"/y\"]}\n"),
        "{}",
        s.yaml
    );
    assert!(s
        .yaml
        .contains("# no `methods`: `get` is not an upper-case method token"));

    for path in ["/a%20b", "/%2A", "/a/../b", "*"] {
        let s = suggest(&[
            record(&a, API, 8080, Some(("GET", path))),
            record(&a, API, 8080, Some(("POST", "/y"))),
        ]);
        assert!(
            rules_of(&s.yaml).contains("    http: {methods: [\"GET\", \"POST\"]}\n"),
            "{path}: {}",
            s.yaml
        );
        assert!(s.yaml.contains("# no `paths`: no path pattern matches"));
        assert!(allowed(&s.policy, &a, API, 8080, Some(("GET", path))));
    }
    let s = suggest(&[record(&a, API, 8080, Some(("get", "/%2A")))]);
    assert!(rules_of(&s.yaml).contains("    http: {}\n"), "{}", s.yaml);
    assert!(allowed(&s.policy, &a, API, 8080, Some(("get", "/%2A"))));
    assert!(!allowed(&s.policy, &a, API, 8080, None));
}

#[test]
fn records_left_out_are_counted_by_reason() {
    let a = web("a");
    let base = record(&a, API, 8080, None);
    let with = |f: &dyn Fn(&mut AccessRecord)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let records = [
        base.clone(),
        with(&|r| r.decision = "audit_deny".to_owned()),
        with(&|r| r.decision = "deny".to_owned()),
        with(&|r| r.decision = "close".to_owned()),
        with(&|r| r.decision = "maybe".to_owned()),
        with(&|r| r.direction = "outbound".to_owned()),
        // Outbound to a callee whose inbound log is missing.
        with(&|r| {
            r.direction = "outbound".to_owned();
            r.callee = Some("spiffe://example.org/ns/db/main".to_owned());
        }),
        with(&|r| r.caller = None),
        with(&|r| r.callee = None),
        with(&|r| r.caller = Some("spiffe://example.org/a//b".to_owned())),
        with(&|r| r.port = None),
        with(&|r| r.port = Some(0)),
    ];
    let s = suggest(&records);
    assert_eq!((s.records, s.used, s.outbound_unmatched), (12, 2, 1));
    let skipped: Vec<(&str, usize)> = s.skipped.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    assert_eq!(
        skipped,
        [
            ("outbound", 2),
            ("denied", 1),
            ("closed", 1),
            ("no_caller", 1),
            ("no_callee", 1),
            ("invalid_id", 1),
            ("no_port", 2),
            ("unknown", 1),
        ]
    );
    assert_eq!(Skip::of(&records[2]), Some(Skip::Denied));
    assert_eq!(Skip::of(&records[1]), None);
    let summary = s.summary();
    assert!(summary.starts_with(
        "12 access record(s): 2 used (inbound, allowed or audit_deny, with caller, callee and \
         port); skipped: 2 outbound (the callee's inbound record decides), 1 denied,"
    ));
    assert!(summary.contains(
        "\n1 outbound record(s) reach callees whose inbound records are not in these logs"
    ));
    assert!(s
        .yaml
        .starts_with("# Suggested from access logs by `policy suggest`.\n# 12 access record(s)"));

    // Nothing usable: a valid policy that allows nothing.
    let s = suggest(&records[2..5]);
    assert_eq!(s.policy.rule_count(), 0);
    assert!(s.yaml.ends_with("mode: enforce\nrules: []\n"), "{}", s.yaml);
}

#[test]
fn values_from_the_log_cannot_break_out_of_a_comment() {
    let a = web("a");
    let s = suggest(&[record(
        &a,
        API,
        8080,
        Some(("GET\nrules: []", "/x\n- name: evil")),
    )]);
    assert_eq!(s.policy.rule_count(), 1);
    assert!(
        s.yaml.contains("GET\\nrules: [] /x\\n- name: evil x1"),
        "{}",
        s.yaml
    );
}

#[test]
fn the_same_records_in_any_order_give_the_same_text() {
    let mut records: Vec<AccessRecord> = (0..12)
        .map(|i| {
            record(
                &web(["a", "b", "c", "d"][i % 4]),
                API,
                8080,
                Some((["GET", "POST", "PUT"][i % 3], ["/x", "/y"][i % 2])),
            )
        })
        .collect();
    let first = suggest(&records).yaml;
    records.reverse();
    assert_eq!(suggest(&records).yaml, first);
    records.rotate_left(5);
    assert_eq!(suggest(&records).yaml, first);
}

#[test]
fn a_bad_name_is_refused() {
    let e = Policy::suggest(
        &[],
        &SuggestOptions {
            name: "no spaces".to_owned(),
            ..SuggestOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        e.message().contains("invalid policy name `no spaces`"),
        "{e}"
    );
}

#[test]
fn the_access_log_reader_says_which_line_is_wrong() {
    let good = serde_json::to_string(&record(&web("a"), API, 80, None)).unwrap();
    let text = format!(
        "{good}\n\n  \nnot json\n{{\"timestamp\": \"t\"}}\n{}\n{}\n{}\n{good}\n",
        good.replace("\"allow\"", "\"allowed\""),
        good.replace("\"inbound\"", "\"sideways\""),
        good.replace("\"port\":80", "\"port\":\"80\""),
    );
    let results: Vec<Result<AccessRecord, AccessLogError>> =
        parse_access_log(&text, "access.log").collect();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert_eq!(results.len(), 7);
    assert!(results[0].is_ok() && results[6].is_ok());
    assert_eq!(
        errors[0],
        "access.log:4:2: not an access record: expected ident at line 1 column 2"
    );
    assert!(
        errors[1].starts_with("access.log:5:18: not an access record: missing field `kind`"),
        "{}",
        errors[1]
    );
    assert_eq!(
        errors[2],
        "access.log:6:1: not an access record: unknown decision `allowed`: the proxy writes \
         allow, deny, audit_deny, close"
    );
    assert!(
        errors[3].contains("access.log:7:1: not an access record: unknown direction `sideways`")
    );
    assert!(errors[4].starts_with("access.log:8:"), "{}", errors[4]);
    assert!(
        errors[4].contains("invalid type: string \"80\", expected u16"),
        "{}",
        errors[4]
    );
}

#[test]
fn the_access_log_reader_takes_the_key_exchange_group_and_refuses_a_wrong_one() {
    let mut r = record(&web("a"), API, 80, None);
    r.tls_group = Some("X25519MLKEM768".to_owned());
    let good = serde_json::to_string(&r).unwrap();
    assert!(good.contains("\"tls_group\":\"X25519MLKEM768\""), "{good}");
    let text = format!("{good}\n{}\n", good.replace("\"X25519MLKEM768\"", "5"));
    let results: Vec<Result<AccessRecord, AccessLogError>> =
        parse_access_log(&text, "access.log").collect();
    assert_eq!(
        results[0].as_ref().unwrap().tls_group.as_deref(),
        Some("X25519MLKEM768")
    );
    let e = results[1].as_ref().unwrap_err().to_string();
    assert!(
        e.starts_with("access.log:2:")
            && e.contains("invalid type: integer `5`, expected a string"),
        "{e}"
    );
    // Records written before the field existed still read.
    let old = serde_json::to_string(&record(&web("a"), API, 80, None)).unwrap();
    assert!(!old.contains("tls_group"));
    assert!(parse_access_log(&old, "old.log").all(|r| r.is_ok()));
}
