//! The Prometheus alerting rules in `deploy/prometheus` and the Grafana dashboard in
//! `deploy/grafana`.
//!
//! - `promtool check rules` and `promtool test rules` pass, and every dashboard query parses
//!   (checked by promtool as a recording rule, Grafana's `$__rate_interval` made `5m`).
//! - Every alert has a severity and the three annotations, a promtool test that makes it fire
//!   and one where it stays quiet; every `meshid-ca`, `meshid-agent` and `meshid-proxy` command a
//!   runbook cites exists (`<command> --help` exits 0).
//! - The dashboard is self-contained: a Prometheus data source variable, no links, the panels
//!   operators look for.
//! - Every metric the rules and the dashboard's queries select, and every `meshid_*` name their
//!   prose mentions, is exported by the real binaries of a running mesh. The exposition's
//!   `# TYPE` lines say which sample names a family has (a counter `F` is sampled as `F_total`,
//!   a histogram as `F_bucket`, `F_sum` and `F_count`); prometheus_client writes them for
//!   every registered family, before any sample, so no traffic is needed for labeled series.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use meshid_policy::yaml::{self, Node, Value as Yaml};
use serde_json::Value;

use super::*;
use crate::proxy::support::{serial, WebToApi};
use crate::proxy::ALLOW_WEB_TO_API;

const RULES: &str = "prometheus/alerts.yaml";
const RULE_TESTS: &str = "prometheus/alerts.test.yaml";
const DASHBOARD: &str = "grafana/meshid.json";

/// Panels the dashboard must keep.
const PANELS: &[&str] = &[
    "Issuance rate",
    "SVIDs by expiry: proxies",
    "Rotation compliance",
    "Denials by rule",
    "Handshake failures by reason",
    "Bundle delivery lag (CA)",
    "Policy propagation lag",
    "Audit sink lag",
];

/// A YAML file of deploy/, parsed by meshid's own YAML reader (no anchors, aliases or tags).
fn load_yaml(rel: &str) -> Node {
    let text = read(&deploy(rel));
    let limits = yaml::Limits {
        depth: 32,
        nodes: 100_000,
        what: "a Prometheus file",
    };
    yaml::parse_limited(&text, yaml::Ctx { origin: rel }, limits)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("deploy/{rel} is empty"))
}

/// The value under `key` of a mapping.
fn get<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    match &node.value {
        Yaml::Map(entries) => entries
            .iter()
            .find(|(k, _)| yaml::scalar_text(k) == key)
            .map(|(_, v)| v),
        _ => None,
    }
}

/// The items of a sequence (none for anything else).
fn items(node: Option<&Node>) -> &[Node] {
    match node.map(|n| &n.value) {
        Some(Yaml::Seq(seq)) => seq.as_slice(),
        _ => &[],
    }
}

/// The text of a scalar.
fn scalar(node: Option<&Node>) -> Option<&str> {
    match node.map(|n| &n.value) {
        Some(Yaml::Scalar(s, _)) => Some(s.as_str()),
        _ => None,
    }
}

/// One alerting rule.
struct Alert {
    name: String,
    expr: String,
    severity: String,
    /// summary, description and runbook, in that order ("" when missing).
    annotations: [String; 3],
}

fn alerts() -> Vec<Alert> {
    let doc = load_yaml(RULES);
    let mut out = Vec::new();
    for group in items(get(&doc, "groups")) {
        for rule in items(get(group, "rules")) {
            let name = scalar(get(rule, "alert"))
                .or_else(|| scalar(get(rule, "record")))
                .unwrap_or_default()
                .to_owned();
            let text = |node: Option<&Node>, key: &str| {
                node.and_then(|n| scalar(get(n, key)))
                    .unwrap_or_default()
                    .to_owned()
            };
            let annotations = get(rule, "annotations");
            out.push(Alert {
                expr: text(Some(rule), "expr"),
                severity: text(get(rule, "labels"), "severity"),
                annotations: [
                    text(annotations, "summary"),
                    text(annotations, "description"),
                    text(annotations, "runbook"),
                ],
                name,
            });
        }
    }
    out
}

/// The dashboard's queries: (panel title, expr), rows' panels included.
fn dashboard_queries(panels: &Value, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.to_owned(), expr.to_owned()));
            }
        }
        dashboard_queries(&panel["panels"], out);
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read(&deploy(DASHBOARD)))
        .unwrap_or_else(|e| panic!("deploy/{DASHBOARD} is not JSON: {e}"))
}

/// Where the closing `close` is, from `i` on, outside strings.
fn skip_to(chars: &[char], mut i: usize, close: char) -> usize {
    while i < chars.len() && chars[i] != close {
        if matches!(chars[i], '"' | '\'' | '`') {
            i = end_of_string(chars, i);
        } else {
            i += 1;
        }
    }
    i + 1
}

/// The index after the string literal that starts at `i`.
fn end_of_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' && quote != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names a PromQL expression selects: the identifiers that are not keywords,
/// function calls or numbers, outside strings, label matchers `{...}`, ranges `[...]` (where
/// Grafana's `$__rate_interval` is), Grafana variables, and the label lists of `by`,
/// `without`, `on`, `ignoring`, `group_left` and `group_right`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
        "limit_ratio",
        "atan2",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = end_of_string(&chars, i);
        } else if c == '{' {
            i = skip_to(&chars, i + 1, '}');
        } else if c == '[' {
            i = skip_to(&chars, i + 1, ']');
        } else if c == '#' {
            i = skip_to(&chars, i + 1, '\n');
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (is_word_char(chars[i]) || chars[i] == '{') {
                i = if chars[i] == '{' {
                    skip_to(&chars, i + 1, '}')
                } else {
                    i + 1
                };
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number or a duration (0.1, 1e3, 0x1f, 5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_word_char(c) {
            let start = i;
            while i < chars.len() && is_word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let paren = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if paren {
                    i = skip_to(&chars, next + 1, ')');
                }
            } else if !paren
                && !KEYWORDS.contains(&word.as_str())
                && !word.eq_ignore_ascii_case("inf")
                && !word.eq_ignore_ascii_case("nan")
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The `meshid_*` names prose mentions (annotations, panel descriptions).
fn mentioned_names(text: &str) -> BTreeSet<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        if is_word_char(chars[i]) {
            let start = i;
            while i < chars.len() && is_word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("meshid_") {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// What a `/metrics` text exports, from its `# TYPE <family> <type>` lines.
#[derive(Default)]
struct Exported {
    /// Family names.
    families: BTreeSet<String>,
    /// The sample names those families have: a counter `F` is sampled as `F_total`
    /// (OpenMetrics names the family without the suffix), a histogram as `F_bucket`, `F_sum`
    /// and `F_count`, a summary as `F`, `F_sum` and `F_count`, an info as `F_info`, anything
    /// else (gauge, unknown) as `F`.
    samples: BTreeSet<String>,
}

impl Exported {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let mut parts = rest.split_whitespace();
            let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" if family.ends_with("_total") => &[""],
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            self.families.insert(family.to_owned());
            for suffix in suffixes {
                self.samples.insert(format!("{family}{suffix}"));
            }
        }
    }
}

/// Selected names not exported, each with where it is used.
fn missing(used: &BTreeMap<String, BTreeSet<String>>, exported: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .filter(|(name, _)| !exported.contains(*name))
        .map(|(name, places)| {
            format!(
                "{name} (in {})",
                places.iter().cloned().collect::<Vec<_>>().join("; ")
            )
        })
        .collect()
}

/// `GET /metrics` of `what` at `addr`.
fn scrape(what: &str, addr: &str) -> String {
    match meshid_tests::http_get(addr, "/metrics") {
        Some((200, body)) if body.contains("# TYPE ") => body,
        other => panic!("GET /metrics of {what} at {addr}: {other:?}"),
    }
}

/// The leading subcommands of a cited command line: the words after the binary up to the
/// first option, placeholder or argument.
fn subcommands(words: &[&str]) -> Vec<String> {
    words
        .iter()
        .take_while(|w| {
            w.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
        .map(|w| (*w).to_owned())
        .collect()
}

#[test]
fn prometheus_rules_and_dashboard_are_well_formed() {
    let alerts = alerts();
    let mut errors = Vec::new();
    let mut names = BTreeSet::new();
    for a in &alerts {
        if !names.insert(a.name.clone()) {
            errors.push(format!("{}: two alerts of this name", a.name));
        }
        if a.expr.trim().is_empty() {
            errors.push(format!("{}: no expr", a.name));
        }
        if !matches!(a.severity.as_str(), "warning" | "critical") {
            errors.push(format!(
                "{}: labels.severity must be warning or critical, found {:?}",
                a.name, a.severity
            ));
        }
        for (key, value) in ["summary", "description", "runbook"]
            .iter()
            .zip(&a.annotations)
        {
            if value.trim().is_empty() {
                errors.push(format!("{}: no annotations.{key}", a.name));
            }
        }
        let runbook = &a.annotations[2];
        for part in ["What it means", "Check:", "Do:"] {
            if !runbook.contains(part) {
                errors.push(format!("{}: the runbook has no {part:?}", a.name));
            }
        }
    }
    assert!(names.len() >= 15, "only {} alerts", names.len());

    // Every alert is made to fire, and kept quiet, by alerts.test.yaml.
    let tests = load_yaml(RULE_TESTS);
    let rule_files: Vec<&str> = items(get(&tests, "rule_files"))
        .iter()
        .filter_map(|n| scalar(Some(n)))
        .collect();
    assert_eq!(rule_files, ["alerts.yaml"], "{RULE_TESTS}: rule_files");
    let (mut fired, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for test in items(get(&tests, "tests")) {
        for case in items(get(test, "alert_rule_test")) {
            let name = scalar(get(case, "alertname"))
                .unwrap_or_default()
                .to_owned();
            if !names.contains(&name) {
                errors.push(format!(
                    "{RULE_TESTS}: a test of {name:?}, which is no alert"
                ));
            }
            if items(get(case, "exp_alerts")).is_empty() {
                quiet.insert(name);
            } else {
                fired.insert(name);
            }
        }
    }
    for name in &names {
        if !fired.contains(name) {
            errors.push(format!("{RULE_TESTS}: no test makes {name} fire"));
        }
        if !quiet.contains(name) {
            errors.push(format!(
                "{RULE_TESTS}: no test keeps {name} quiet (exp_alerts: [])"
            ));
        }
    }

    // The dashboard: one Prometheus data source variable that every panel and query uses,
    // no links out, and the panels operators look for.
    let text = read(&deploy(DASHBOARD));
    let dash = dashboard();
    if text.contains("http://") || text.contains("https://") {
        errors.push(format!("{DASHBOARD}: links to somewhere outside"));
    }
    if dash["links"].as_array().is_some_and(|l| !l.is_empty()) {
        errors.push(format!("{DASHBOARD}: dashboard links"));
    }
    if dash["schemaVersion"].as_u64().unwrap_or(0) < 36 {
        errors.push(format!("{DASHBOARD}: schemaVersion below 36"));
    }
    let variables = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !variables.iter().any(|v| {
        v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"
    }) {
        errors.push(format!(
            "{DASHBOARD}: no data source variable DS_PROMETHEUS (type datasource, prometheus)"
        ));
    }
    let mut titles = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().into_iter().flatten().collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        let title = panel["title"].as_str().unwrap_or_default();
        if !ids.insert(panel["id"].as_u64()) {
            errors.push(format!("{DASHBOARD}: panel {title:?} repeats an id"));
        }
        titles.insert(title.to_owned());
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        let exprs = targets
            .iter()
            .filter(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()))
            .count();
        if exprs == 0 || exprs != targets.len() {
            errors.push(format!(
                "{DASHBOARD}: panel {title:?} has a query without expr"
            ));
        }
        if panel["description"].as_str().unwrap_or_default().is_empty() {
            errors.push(format!("{DASHBOARD}: panel {title:?} has no description"));
        }
        let sources =
            std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"]));
        for source in sources {
            if source["uid"] != "${DS_PROMETHEUS}" {
                errors.push(format!(
                    "{DASHBOARD}: panel {title:?} uses data source {source}, not ${{DS_PROMETHEUS}}"
                ));
            }
        }
    }
    for want in PANELS {
        if !titles.contains(*want) {
            errors.push(format!("{DASHBOARD}: no panel {want:?}"));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    println!(
        "{} alerts, each with a firing and a quiet promtool test; dashboard: {} panels",
        names.len(),
        titles.len()
    );
}

#[test]
fn prometheus_runbooks_cite_real_commands() {
    let mut commands: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for a in alerts() {
        for (n, span) in a.annotations[2].split('`').enumerate() {
            // Odd pieces are inside backquotes.
            let words: Vec<&str> = span.split_whitespace().collect();
            let cited = n % 2 == 1
                && words
                    .first()
                    .is_some_and(|w| ["meshid-ca", "meshid-agent", "meshid-proxy"].contains(w));
            if cited {
                let mut argv = vec![words[0].to_owned()];
                argv.extend(subcommands(&words[1..]));
                commands.entry(argv).or_default().insert(a.name.clone());
            }
        }
    }
    assert!(
        commands.len() >= 10,
        "only {} commands cited",
        commands.len()
    );
    let mut errors = Vec::new();
    for (argv, citing) in &commands {
        let out = Command::new(bin(&argv[0]))
            .args(&argv[1..])
            .arg("--help")
            .output()
            .unwrap();
        if !out.status.success() {
            errors.push(format!(
                "`{}` (runbook of {}) is no command:\n{}",
                argv.join(" "),
                citing.iter().cloned().collect::<Vec<_>>().join(", "),
                text(&out)
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    println!("{} commands cited by the runbooks exist", commands.len());
}

#[test]
fn prometheus_rules_pass_promtool() {
    if !tool_works("promtool", &["--version"]) {
        let msg = "SKIPPED promtool check rules and test rules: promtool is not installed (apt-get install prometheus)";
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "{msg}; CI must run them"
        );
        println!("{msg}");
        return;
    }
    let promtool = |args: &[&str], file: &Path| {
        let out = Command::new("promtool")
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {} {}:\n{}",
            args.join(" "),
            file.display(),
            text(&out)
        );
        text(&out)
    };
    let checked = promtool(&["check", "rules"], &deploy(RULES));
    let tested = promtool(&["test", "rules"], &deploy(RULE_TESTS));

    // The dashboard's queries, as recording rules: promtool parses each one.
    let mut queries = Vec::new();
    dashboard_queries(&dashboard()["panels"], &mut queries);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (_, expr)) in queries.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        rules.push_str(&format!(
            "      - record: dashboard:query{n}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("dashboard-queries.yaml");
    std::fs::write(&file, rules).unwrap();
    promtool(&["check", "rules"], &file);

    // promtool notices a broken rule file.
    let broken = scratch.path().join("broken.yaml");
    std::fs::write(
        &broken,
        read(&deploy(RULES)).replacen(
            "meshid_agent_ca_connected == 0",
            "meshid_agent_ca_connected == ",
            1,
        ),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "promtool accepted a rule without its right operand:\n{}",
        text(&out)
    );
    let version = Command::new("promtool")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    println!(
        "{version}: check rules: {}; test rules: {}; {} dashboard queries parse",
        checked.trim().replace('\n', " "),
        tested.trim().replace('\n', " "),
        queries.len()
    );
}

#[test]
fn prometheus_metric_names_exist_in_the_binaries() {
    // What the rules and the dashboard use: selected in expressions (exact sample names), and
    // mentioned in their prose (sample or family names).
    let mut selected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut mentioned: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for a in alerts() {
        for name in metric_names(&a.expr) {
            selected
                .entry(name)
                .or_default()
                .insert(format!("alert {}", a.name));
        }
        for name in a
            .annotations
            .iter()
            .flat_map(|t| mentioned_names(t.as_str()))
        {
            mentioned
                .entry(name)
                .or_default()
                .insert(format!("alert {} annotations", a.name));
        }
    }
    let dash = dashboard();
    let mut queries = Vec::new();
    dashboard_queries(&dash["panels"], &mut queries);
    assert!(
        queries.len() >= 10,
        "only {} dashboard queries",
        queries.len()
    );
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
        for name in names {
            selected
                .entry(name)
                .or_default()
                .insert(format!("panel {title:?}"));
        }
    }
    let mut stack: Vec<&Value> = dash["panels"].as_array().into_iter().flatten().collect();
    while let Some(panel) = stack.pop() {
        stack.extend(panel["panels"].as_array().into_iter().flatten());
        let title = panel["title"].as_str().unwrap_or_default();
        for name in mentioned_names(panel["description"].as_str().unwrap_or_default()) {
            mentioned
                .entry(name)
                .or_default()
                .insert(format!("panel {title:?} description"));
        }
    }

    // The extraction itself, on the forms the files use.
    let cases: &[(&str, &[&str])] = &[
        (
            r#"sum by (job, instance) (rate(a_total{x="b c", y=~"d|e"}[5m] offset 5m)) / on (job) group_left sum(rate(b_total[$__rate_interval])) > 0.1"#,
            &["a_total", "b_total"],
        ),
        (
            r#"histogram_quantile(0.99, sum by (le, kind) (rate(h_bucket[5m]))) and c unless d offset 1h or vector(0)"#,
            &["c", "d", "h_bucket"],
        ),
        ("scalar(max(g)) - (f > 0) == bool Inf", &["f", "g"]),
    ];
    for (expr, want) in cases {
        let got = metric_names(expr);
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(got, want, "metric names of {expr}");
    }

    // The binaries of a running mesh: a CA, two agents, two proxies.
    let _serial = serial();
    let mesh = WebToApi::start("1h", ALLOW_WEB_TO_API);
    let mut exported = Exported::default();
    for (what, addr) in [
        ("meshid-ca", mesh.ca.ops_address.as_str()),
        ("meshid-agent", mesh.nodes.0.agent.ops_address.as_str()),
        ("meshid-agent", mesh.nodes.1.agent.ops_address.as_str()),
        ("meshid-proxy", mesh.web.ops_address.as_str()),
        ("meshid-proxy", mesh.api.ops_address.as_str()),
    ] {
        exported.add(&scrape(what, addr));
    }
    for prefix in ["meshid_ca_", "meshid_agent_", "meshid_proxy_"] {
        assert!(
            exported.families.iter().any(|f| f.starts_with(prefix)),
            "no {prefix}* family scraped"
        );
    }

    let mut errors = missing(&selected, &exported.samples);
    let known: BTreeSet<String> = exported
        .samples
        .union(&exported.families)
        .cloned()
        .collect();
    errors.extend(missing(&mentioned, &known));
    assert!(
        errors.is_empty(),
        "metric names the binaries do not export:\n{}",
        errors.join("\n")
    );

    // The check is not vacuous: names with a wrong suffix are noticed.
    for (wrong, why) in [
        ("meshid_proxy_decisions", "a counter without _total"),
        ("meshid_ca_svids_signed_bucket", "a counter as a histogram"),
        (
            "meshid_ca_sign_duration_seconds",
            "a histogram without a suffix",
        ),
        ("meshid_agent_svids_total", "a gauge as a counter"),
    ] {
        assert!(!exported.samples.contains(wrong), "{wrong} ({why}) passed");
    }
    for right in [
        "meshid_proxy_decisions_total",
        "meshid_ca_sign_duration_seconds_bucket",
        "meshid_ca_sign_duration_seconds_count",
        "meshid_agent_svids",
    ] {
        assert!(exported.samples.contains(right), "{right} not found");
    }
    println!(
        "{} metric names selected and {} mentioned by the rules and the dashboard: all exported",
        selected.len(),
        mentioned.len()
    );
}
