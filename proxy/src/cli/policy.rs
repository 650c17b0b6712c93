//! `meshid-proxy policy ...`: the policy author's tools over the `meshid-policy` crate.
//!
//! - `check FILE`: validate and lint; exit 0 when clean (infos allowed), 2 with warnings, 1 when
//!   the policy is invalid. Suitable for CI.
//! - `explain FILE --from ID --to ID [--port N] [--method M --path P [--upgrade U]]`: the decision, the rule
//!   behind it and why every other rule did or did not match. Exit 0 (the decision is the
//!   output).
//! - `who-can FILE --to ID`: the caller patterns that reach a workload, with their conditions
//!   and the deny rules carving exceptions out of them, and whether the default allows.
//! - `test FILE CASES`: run test cases; exit 0 when all pass, 1 otherwise.
//! - `diff OLD NEW --access-log LOG`: replay recorded inbound traffic under both policies and
//!   list what would change decision; exit 0 when nothing changes, 3 when something does.
//! - `suggest --access-log LOG...`: the least-privilege policy for the recorded allowed
//!   traffic (see [`Policy::suggest`]), as YAML on stdout or in `--output`; what was used and
//!   skipped on stderr. Exit 0. A line that is not an access record stops it (exit 1, naming
//!   file:line:column, nothing written) unless `--skip-invalid`, which counts such lines.
//!
//! Invalid input (a policy, a cases file, a log that cannot be read, a bad SPIFFE ID) exits 1
//! with the error on stderr (`check` prints it on stdout, as its result). `--json` prints one
//! JSON document instead of text. Argument errors found by the command-line parser itself exit
//! 2, as for every command of this binary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use meshid_policy::{
    AccessRecord, ConnectionVerdict, Decision, Explanation, Grant, HttpRequest, Policy, Request,
    RuleMatch, Severity, SpiffeId, SuggestOptions, TrustDomain, WhoCan,
};
use serde_json::{json, Value};

/// Exit status of `diff` when some recorded traffic would change decision.
pub const EXIT_DIFF_CHANGES: u8 = 3;
/// Exit status of `check` when the policy is valid but has warnings.
pub const EXIT_CHECK_WARNINGS: u8 = 2;

/// Policy tools.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate and lint a policy: exit 0 clean, 2 with warnings, 1 invalid.
    Check {
        /// The policy file.
        file: PathBuf,
        /// A known trust domain besides the policy's `trust_domains` (repeatable); patterns
        /// naming other trust domains are warnings.
        #[arg(long = "trust-domain", value_name = "TRUST_DOMAIN")]
        trust_domains: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain the decision for one caller, callee, port and HTTP request.
    Explain {
        /// The policy file.
        file: PathBuf,
        /// The caller's SPIFFE ID.
        #[arg(long)]
        from: String,
        /// The receiving workload's SPIFFE ID.
        #[arg(long)]
        to: String,
        /// The service port.
        #[arg(long)]
        port: Option<u16>,
        /// The HTTP method (with --path); without both, the traffic is opaque TCP.
        #[arg(long, requires = "path")]
        method: Option<String>,
        /// The HTTP path, without the query string (with --method).
        #[arg(long, requires = "method")]
        path: Option<String>,
        /// The protocol the request asks to switch to (websocket, connect), with --method.
        #[arg(long, requires = "method")]
        upgrade: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the callers that can reach a workload.
    WhoCan {
        /// The policy file.
        file: PathBuf,
        /// The receiving workload's SPIFFE ID.
        #[arg(long)]
        to: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run test cases against a policy: exit 0 when all pass, 1 otherwise.
    Test {
        /// The policy file.
        file: PathBuf,
        /// The cases file (`cases: [{name, from, to, port?, method?, path?, upgrade?, expect, rule?}]`).
        cases: PathBuf,
    },
    /// Replay an access log under two policies: exit 0 when no decision changes, 3 when some do.
    Diff {
        /// The current policy.
        old: PathBuf,
        /// The proposed policy.
        new: PathBuf,
        /// The proxy's access log (JSON lines).
        #[arg(long)]
        access_log: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Suggest least-privilege rules from recorded allowed traffic: YAML on stdout.
    Suggest {
        /// A proxy's access log (JSON lines); repeat for several proxies.
        #[arg(long = "access-log", value_name = "LOG", required = true)]
        access_logs: Vec<PathBuf>,
        /// Write the policy to this file instead of stdout (only once it is complete).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The policy's name.
        #[arg(long, default_value = "suggested")]
        name: String,
        /// Keep exact caller IDs: never replace callers by a `*` pattern.
        #[arg(long)]
        no_widen: bool,
        /// The fewest callers (differing in one path segment, with the same access) that one `*`
        /// pattern may replace.
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..))]
        widen_min: u16,
        /// Skip lines that are not access records (counted on stderr) instead of failing.
        #[arg(long)]
        skip_invalid: bool,
    },
}

/// What a command prints on stdout, and its exit status.
struct Report {
    out: String,
    code: u8,
}

/// Runs a policy command and returns the process exit code.
#[allow(clippy::print_stdout)]
pub fn run(cmd: PolicyCommand) -> ExitCode {
    let result = match cmd {
        PolicyCommand::Check {
            file,
            trust_domains,
            json,
        } => check(&file, &trust_domains, json),
        PolicyCommand::Explain {
            file,
            from,
            to,
            port,
            method,
            path,
            upgrade,
            json,
        } => explain(
            &file,
            &from,
            &to,
            port,
            method.zip(path),
            upgrade.map(|u| u.to_ascii_lowercase()),
            json,
        ),
        PolicyCommand::WhoCan { file, to, json } => who_can(&file, &to, json),
        PolicyCommand::Test { file, cases } => test(&file, &cases),
        PolicyCommand::Diff {
            old,
            new,
            access_log,
            json,
        } => diff(&old, &new, &access_log, json),
        PolicyCommand::Suggest {
            access_logs,
            output,
            name,
            no_widen,
            widen_min,
            skip_invalid,
        } => suggest(
            &access_logs,
            output.as_deref(),
            SuggestOptions {
                name,
                widen_min: if no_widen { 0 } else { widen_min.into() },
            },
            skip_invalid,
        ),
    };
    match result {
        Ok(report) => {
            print!("{}", report.out);
            ExitCode::from(report.code)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn spiffe_id(s: &str, what: &str) -> anyhow::Result<SpiffeId> {
    SpiffeId::new(s).with_context(|| format!("{what} `{s}` is not a SPIFFE ID"))
}

fn pretty(value: &Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_default();
    s.push('\n');
    s
}

fn check(file: &Path, trust_domains: &[String], json: bool) -> anyhow::Result<Report> {
    let mut known = Vec::with_capacity(trust_domains.len());
    for td in trust_domains {
        if td.contains([':', '/']) {
            bail!("--trust-domain `{td}`: write the trust domain name only, such as example.org");
        }
        let td = TrustDomain::new(td).with_context(|| format!("--trust-domain `{td}`"))?;
        known.push(td.as_str().to_owned());
    }
    let origin = file.display().to_string();
    let policy = match Policy::load(file) {
        Ok(p) => p,
        Err(e) => {
            let out = if json {
                let (line, column) = e.location().unzip();
                pretty(&json!({
                    "file": origin,
                    "valid": false,
                    "error": { "line": line, "column": column, "message": e.message() },
                }))
            } else {
                match e.location() {
                    Some((line, column)) => {
                        format!("{origin}:{line}:{column}: error: {}\n", e.message())
                    }
                    None => format!("error: {e}\n"),
                }
            };
            return Ok(Report { out, code: 1 });
        }
    };
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    let findings = policy.check_with(&known);
    let warnings = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .count();
    let code = if warnings > 0 { EXIT_CHECK_WARNINGS } else { 0 };
    let out = if json {
        let findings: Vec<Value> = findings
            .iter()
            .map(|f| {
                json!({
                    "severity": f.severity.as_str(),
                    "line": f.line,
                    "column": f.column,
                    "rule": f.rule,
                    "message": f.message,
                })
            })
            .collect();
        pretty(&json!({
            "file": origin,
            "valid": true,
            "policy": policy.name(),
            "rules": policy.rule_count(),
            "warnings": warnings,
            "findings": findings,
        }))
    } else {
        let mut out = String::new();
        for f in &findings {
            let _ = writeln!(
                out,
                "{origin}:{}:{}: {}: {}",
                f.line,
                f.column,
                f.severity.as_str(),
                f.message
            );
        }
        let _ = writeln!(
            out,
            "{origin}: policy `{}` is valid: {} rule(s), {} warning(s), {} info(s)",
            policy.name(),
            policy.rule_count(),
            warnings,
            findings.len() - warnings
        );
        out
    };
    Ok(Report { out, code })
}

fn describe(decision: &Decision) -> String {
    match &decision.rule {
        Some(r) => format!("{} (rule `{}`, line {})", decision.outcome, r.name, r.line),
        None => format!("{} (the default)", decision.outcome),
    }
}

fn explain(
    file: &Path,
    from: &str,
    to: &str,
    port: Option<u16>,
    http: Option<(String, String)>,
    upgrade: Option<String>,
    json: bool,
) -> anyhow::Result<Report> {
    let from = spiffe_id(from, "--from")?;
    let to = spiffe_id(to, "--to")?;
    let policy = Policy::load(file)?;
    let req = Request {
        from: &from,
        to: &to,
        port,
        http: http.as_ref().map(|(method, path)| HttpRequest {
            method,
            path,
            upgrade: upgrade.as_deref(),
        }),
    };
    let e = policy.explain(&req);
    let out = if json {
        explain_json(&policy, &e)
    } else {
        explain_text(&policy, &req, &e)
    };
    Ok(Report { out, code: 0 })
}

fn explain_json(policy: &Policy, e: &Explanation) -> String {
    pretty(&e.to_json(policy))
}

fn explain_text(policy: &Policy, req: &Request<'_>, e: &Explanation) -> String {
    let mut out = String::new();
    let traffic = match &req.http {
        Some(h) => match h.upgrade {
            Some(u) => format!("{} {} (upgrade to {u})", h.method, h.path),
            None => format!("{} {}", h.method, h.path),
        },
        None => "opaque traffic (no HTTP request)".to_owned(),
    };
    let port = req
        .port
        .map_or("no port".to_owned(), |p| format!("port {p}"));
    let _ = writeln!(out, "{} -> {}, {port}, {traffic}", req.from, req.to);
    let _ = writeln!(out, "decision: {}", describe(&e.decision));
    if e.decision.outcome == meshid_policy::Outcome::AuditDeny {
        let _ = writeln!(
            out,
            "  allowed, and recorded as a would-be denial (audit mode)"
        );
    }
    let _ = writeln!(
        out,
        "policy `{}`: mode {}, default {}",
        policy.name(),
        e.mode.as_str(),
        e.default.as_str()
    );
    if e.rules.is_empty() {
        let _ = writeln!(out, "no rules: the default decides");
    }
    let decider = e.decision.rule.as_ref().map(|r| r.index);
    for t in &e.rules {
        let audit = match t.mode {
            meshid_policy::Mode::Enforce => "",
            meshid_policy::Mode::Audit => ", audit",
        };
        let why = match t.result {
            RuleMatch::Matched => "matched".to_owned(),
            RuleMatch::MatchedFailClosed(f) => format!(
                "matched, failing closed: {}",
                match f {
                    meshid_policy::Field::NoHttpInfo =>
                        "it has http conditions and the traffic is opaque",
                    meshid_policy::Field::Port => "the request has no port",
                    meshid_policy::Field::Path => "the path is ambiguous",
                    meshid_policy::Field::Method => "the method is not an upper-case token",
                    _ => "the request lacks what it looks at",
                }
            ),
            RuleMatch::NotMatched(meshid_policy::Field::NoHttpInfo) => {
                "no match: it has http conditions and the traffic is opaque".to_owned()
            }
            RuleMatch::NotMatched(meshid_policy::Field::Upgrade) => {
                "no match: its `upgrades` does not name the protocol asked for".to_owned()
            }
            RuleMatch::NotMatched(meshid_policy::Field::Port) if req.port.is_none() => {
                "no match: it lists ports and the request has none".to_owned()
            }
            RuleMatch::NotMatched(f) => format!("no match: {} differs", f.as_str()),
        };
        let mark = if decider == Some(t.rule.index) {
            "  <- decides"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {} (line {}, {}{audit}): {why}{mark}",
            t.rule.name,
            t.rule.line,
            t.action.as_str()
        );
    }
    out
}

fn grant_conditions(g: &Grant) -> (String, String) {
    let ports = g.ports.as_ref().map_or("any".to_owned(), |ps| {
        ps.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
    });
    let http = if g.http {
        let methods = g
            .methods
            .as_ref()
            .map_or("any method".to_owned(), |m| m.join(", "));
        let paths = g.paths.as_ref().map_or("any path".to_owned(), |p| {
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        });
        let upgrades = g
            .upgrades
            .as_ref()
            .map_or(String::new(), |u| format!("; upgrades to {}", u.join(", ")));
        format!("HTTP only: {methods}; {paths}{upgrades}")
    } else {
        "any traffic".to_owned()
    };
    (ports, http)
}

fn grant_json(g: &Grant) -> Value {
    json!({
        "rule": &*g.rule.name,
        "line": g.rule.line,
        "action": g.action.as_str(),
        "mode": g.mode.as_str(),
        "from": g.from.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "ports": g.ports,
        "http": g.http,
        "upgrades": g.upgrades,
        "methods": g.methods,
        "paths": g.paths.as_ref().map(|ps| ps.iter().map(|p| p.to_string()).collect::<Vec<_>>()),
        "except": g.carve_outs.iter().map(|r| &*r.name).collect::<Vec<_>>(),
    })
}

fn who_can(file: &Path, to: &str, json: bool) -> anyhow::Result<Report> {
    let to = spiffe_id(to, "--to")?;
    let policy = Policy::load(file)?;
    let w = policy.who_can(&to);
    let out = if json {
        pretty(&json!({
            "policy": policy.name(),
            "to": w.to.to_string(),
            "mode": w.mode.as_str(),
            "default": w.default.as_str(),
            "default_allows_everyone": w.default_allows(),
            "allows": w.allows.iter().map(grant_json).collect::<Vec<_>>(),
            "denies": w.denies.iter().map(grant_json).collect::<Vec<_>>(),
        }))
    } else {
        who_can_text(&policy, &w)
    };
    Ok(Report { out, code: 0 })
}

fn who_can_text(policy: &Policy, w: &WhoCan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "who can reach {} (policy `{}`, mode {}):",
        w.to,
        policy.name(),
        w.mode.as_str()
    );
    if w.allows.is_empty() {
        let _ = writeln!(out, "no allow rule names this workload");
    }
    for g in &w.allows {
        let (ports, http) = grant_conditions(g);
        let _ = writeln!(out, "allow `{}` (line {}):", g.rule.name, g.rule.line);
        for p in &g.from {
            let _ = writeln!(out, "  from {p}");
        }
        let _ = writeln!(out, "  ports: {ports}; {http}");
        for c in &g.carve_outs {
            let _ = writeln!(out, "  except as denied by `{}` (line {})", c.name, c.line);
        }
    }
    for g in &w.denies {
        let (ports, http) = grant_conditions(g);
        let from: Vec<String> = g.from.iter().map(|p| p.to_string()).collect();
        let audit = match g.mode {
            meshid_policy::Mode::Enforce => "",
            meshid_policy::Mode::Audit => " (audit: recorded, not refused)",
        };
        let _ = writeln!(
            out,
            "deny `{}` (line {}){audit}: from {}; ports: {ports}; {http}",
            g.rule.name,
            g.rule.line,
            from.join(", ")
        );
    }
    if w.default_allows() {
        let _ = writeln!(
            out,
            "default: allow: every other caller can reach it too, unless a deny rule above stops it"
        );
    } else {
        let _ = writeln!(out, "default: deny: no other caller can reach it");
    }
    out
}

fn test(file: &Path, cases: &Path) -> anyhow::Result<Report> {
    let policy = Policy::load(file)?;
    let cases_list = meshid_policy::load_cases(cases)?;
    let origin = cases.display();
    let mut out = String::new();
    let mut failed = 0usize;
    for case in &cases_list {
        let result = case.run(&policy);
        if result.passed {
            continue;
        }
        failed += 1;
        let expected = match &case.rule {
            Some(rule) => format!("{} (rule `{rule}`)", case.expect),
            None => case.expect.to_string(),
        };
        let _ = writeln!(
            out,
            "{origin}:{}:{}: case `{}` failed: expected {expected}, got {}",
            case.line,
            case.column,
            case.name,
            describe(&result.decision)
        );
    }
    let _ = writeln!(out, "{} passed, {failed} failed", cases_list.len() - failed);
    Ok(Report {
        out,
        code: u8::from(failed > 0),
    })
}

/// One group of identical recorded requests.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    caller: String,
    callee: String,
    port: Option<u16>,
    method: Option<String>,
    path: Option<String>,
    upgrade: Option<String>,
}

/// A policy's answer for a group: a decision, or "needs per-request information".
enum Verdict {
    Decided(Decision),
    PerRequest,
}

fn evaluate(policy: &Policy, from: &SpiffeId, to: &SpiffeId, key: &Key) -> Verdict {
    match (&key.method, &key.path, key.port) {
        (Some(method), Some(path), port) => Verdict::Decided(policy.decide(&Request {
            from,
            to,
            port,
            http: Some(HttpRequest {
                method,
                path,
                upgrade: key.upgrade.as_deref(),
            }),
        })),
        (_, _, Some(port)) => match policy.connection(from, to, port) {
            ConnectionVerdict::Decided(d) => Verdict::Decided(d),
            ConnectionVerdict::PerRequest => Verdict::PerRequest,
        },
        (_, _, None) => Verdict::Decided(policy.decide(&Request {
            from,
            to,
            port: None,
            http: None,
        })),
    }
}

fn key_text(key: &Key) -> String {
    let mut s = format!("{} -> {}", key.caller, key.callee);
    if let Some(p) = key.port {
        let _ = write!(s, " port {p}");
    }
    match (&key.method, &key.path) {
        (Some(m), Some(p)) => {
            let _ = write!(s, " {m} {p}");
            if let Some(u) = &key.upgrade {
                let _ = write!(s, " (upgrade to {u})");
            }
        }
        _ => s.push_str(" (connection)"),
    }
    s
}

fn key_json(key: &Key, count: usize) -> Value {
    json!({
        "caller": key.caller,
        "callee": key.callee,
        "port": key.port,
        "method": key.method,
        "path": key.path,
        "upgrade": key.upgrade,
        "records": count,
    })
}

fn decision_json(d: &Decision) -> Value {
    json!({ "decision": d.outcome.as_str(), "rule": d.rule_name() })
}

/// The records of an access log, and how many lines were not records: with `skip_invalid`
/// they are counted, otherwise the first one is the error (file:line:column).
fn read_access_log(log: &Path, skip_invalid: bool) -> anyhow::Result<(Vec<AccessRecord>, usize)> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("cannot read the access log {}", log.display()))?;
    let origin = log.display().to_string();
    let mut records = Vec::new();
    let mut invalid = 0usize;
    for result in meshid_policy::parse_access_log(&text, &origin) {
        match result {
            Ok(record) => records.push(record),
            Err(_) if skip_invalid => invalid += 1,
            Err(e) => {
                bail!("{e} (fix or remove the line, or pass --skip-invalid to skip such lines)")
            }
        }
    }
    Ok((records, invalid))
}

/// `suggest`: the least-privilege policy for the records of every log.
fn suggest(
    logs: &[PathBuf],
    output: Option<&Path>,
    options: SuggestOptions,
    skip_invalid: bool,
) -> anyhow::Result<Report> {
    let mut records = Vec::new();
    let mut invalid = 0usize;
    for log in logs {
        let (mut r, n) = read_access_log(log, skip_invalid)?;
        if n > 0 {
            eprintln!(
                "{}: skipped {n} line(s) that are not access records",
                log.display()
            );
        }
        invalid += n;
        records.append(&mut r);
    }
    let s =
        Policy::suggest(&records, &options).context("cannot write a policy for this traffic")?;
    let mut summary = s.summary();
    if invalid > 0 {
        let _ = writeln!(
            summary,
            "{invalid} invalid line(s) skipped (--skip-invalid)."
        );
    }
    match output {
        Some(path) => {
            std::fs::write(path, &s.yaml)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let _ = writeln!(summary, "wrote {}", path.display());
            Ok(Report {
                out: summary,
                code: 0,
            })
        }
        None => {
            eprint!("{summary}");
            Ok(Report {
                out: s.yaml,
                code: 0,
            })
        }
    }
}

/// `diff`: replays inbound access records under both policies.
///
/// Records with a method and path are evaluated as those HTTP requests; records without are
/// evaluated as connections: when a policy would decide such a connection per request (see
/// [`Policy::connection`]), the group is "undetermined" under that policy (both: counted as
/// `per_request`, since the request records of those connections carry the answer). Lines
/// that are not access records, outbound records and records without a valid caller and callee
/// are skipped and counted. Only a changed outcome counts as a change (exit 3).
fn diff(old_file: &Path, new_file: &Path, log: &Path, json: bool) -> anyhow::Result<Report> {
    let old = Policy::load(old_file)?;
    let new = Policy::load(new_file)?;
    let (log_records, not_records) = read_access_log(log, true)?;
    let records = log_records.len();
    let (mut outbound, mut unidentified) = (0usize, 0);
    let mut groups: BTreeMap<Key, usize> = BTreeMap::new();
    for record in log_records {
        if record.direction != "inbound" {
            outbound += 1;
            continue;
        }
        let (Some(caller), Some(callee)) = (record.caller, record.callee) else {
            unidentified += 1;
            continue;
        };
        let path = record
            .path
            .map(|p| p.split('?').next().unwrap_or_default().to_owned());
        let key = Key {
            caller,
            callee,
            port: record.port,
            method: record.method,
            path,
            upgrade: record.upgrade,
        };
        *groups.entry(key).or_default() += 1;
    }
    let mut changes = Vec::new();
    let mut undetermined = Vec::new();
    let mut per_request = 0usize;
    let mut replayed = 0usize;
    for (key, count) in &groups {
        let (Ok(from), Ok(to)) = (SpiffeId::new(&key.caller), SpiffeId::new(&key.callee)) else {
            unidentified += count;
            continue;
        };
        replayed += count;
        match (
            evaluate(&old, &from, &to, key),
            evaluate(&new, &from, &to, key),
        ) {
            (Verdict::Decided(a), Verdict::Decided(b)) => {
                if a.outcome != b.outcome {
                    changes.push((key, *count, a, b));
                }
            }
            (Verdict::PerRequest, Verdict::PerRequest) => per_request += count,
            (a, b) => undetermined.push((key, *count, a, b)),
        }
    }
    let verdict_text = |v: &Verdict| match v {
        Verdict::Decided(d) => format!("{} ({})", d.outcome, d.rule_name()),
        Verdict::PerRequest => "undetermined (decided per request)".to_owned(),
    };
    let verdict_json = |v: &Verdict| match v {
        Verdict::Decided(d) => decision_json(d),
        Verdict::PerRequest => json!({ "decision": "undetermined", "rule": null }),
    };
    let code = if changes.is_empty() {
        0
    } else {
        EXIT_DIFF_CHANGES
    };
    let out = if json {
        pretty(&json!({
            "old": old.name(),
            "new": new.name(),
            "records": records,
            "replayed": replayed,
            "skipped_lines": not_records,
            "outbound": outbound,
            "unidentified": unidentified,
            "per_request": per_request,
            "changes": changes.iter().map(|(k, n, a, b)| {
                let mut v = key_json(k, *n);
                v["old"] = decision_json(a);
                v["new"] = decision_json(b);
                v
            }).collect::<Vec<_>>(),
            "undetermined": undetermined.iter().map(|(k, n, a, b)| {
                let mut v = key_json(k, *n);
                v["old"] = verdict_json(a);
                v["new"] = verdict_json(b);
                v
            }).collect::<Vec<_>>(),
        }))
    } else {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{records} records, {replayed} inbound replayed; skipped: {not_records} lines that are \
             not access records, {outbound} outbound, {unidentified} without a valid caller and callee"
        );
        if per_request > 0 {
            let _ = writeln!(
                out,
                "{per_request} connection records need per-request information under both \
                 policies (their request records are replayed instead)"
            );
        }
        if changes.is_empty() {
            let _ = writeln!(out, "no decision changes");
        } else {
            let _ = writeln!(out, "{} changed:", changes.len());
        }
        for (key, n, a, b) in &changes {
            let _ = writeln!(
                out,
                "  {} x{n}: {} -> {}",
                key_text(key),
                verdict_text(&Verdict::Decided(a.clone())),
                verdict_text(&Verdict::Decided(b.clone()))
            );
        }
        if !undetermined.is_empty() {
            let _ = writeln!(
                out,
                "{} undetermined (a connection record, and a policy that decides per request):",
                undetermined.len()
            );
        }
        for (key, n, a, b) in &undetermined {
            let _ = writeln!(
                out,
                "  {} x{n}: {} -> {}",
                key_text(key),
                verdict_text(a),
                verdict_text(b)
            );
        }
        out
    };
    Ok(Report { out, code })
}
