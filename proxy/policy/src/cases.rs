//! Policy test cases (`meshid-proxy policy test`): a YAML file of requests and the decision
//! each must get, read with the same strictness and file:line:column errors as policies.
//!
//! ```yaml
//! cases:
//!   - name: web reads the api
//!     from: spiffe://example.org/ns/web/frontend
//!     to: spiffe://example.org/ns/api/orders
//!     port: 8080          # optional
//!     method: GET         # optional, together with path
//!     path: /v1/orders    # optional, together with method
//!     expect: allow       # allow | deny | audit_deny
//!     rule: web-to-api    # optional: the deciding rule, or <default>
//! ```

use std::path::Path;

use spiffe::SpiffeId;

use crate::parse::{parse_root, read_limited};
use crate::yaml::{clip, Ctx};
use crate::{Decision, HttpRequest, Outcome, Policy, PolicyError, Request};

/// One test case.
#[derive(Clone, Debug, PartialEq)]
pub struct TestCase {
    /// The case's name (unique in its file).
    pub name: String,
    /// Line of the case in its file, from 1.
    pub line: usize,
    /// Column of the case in its file, from 1.
    pub column: usize,
    /// The caller.
    pub from: SpiffeId,
    /// The receiving workload.
    pub to: SpiffeId,
    /// The service port, if given.
    pub port: Option<u16>,
    /// The HTTP method, if the case is an HTTP request.
    pub method: Option<String>,
    /// The HTTP path, if the case is an HTTP request.
    pub path: Option<String>,
    /// The protocol the HTTP request asks to switch to (`websocket`, `connect`), if any.
    pub upgrade: Option<String>,
    /// The expected outcome.
    pub expect: Outcome,
    /// The expected deciding rule (`<default>` for the default), if given.
    pub rule: Option<String>,
}

/// The result of running a [`TestCase`].
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The decision the policy gave.
    pub decision: Decision,
    /// The decision has the expected outcome (and rule, if one was expected).
    pub passed: bool,
}

impl TestCase {
    /// The request this case describes.
    pub fn request(&self) -> Request<'_> {
        Request {
            from: &self.from,
            to: &self.to,
            port: self.port,
            http: match (&self.method, &self.path) {
                (Some(method), Some(path)) => Some(HttpRequest {
                    method,
                    path,
                    upgrade: self.upgrade.as_deref(),
                }),
                _ => None,
            },
        }
    }

    /// Decides the case's request under `policy` and compares.
    pub fn run(&self, policy: &Policy) -> CaseResult {
        let decision = policy.decide(&self.request());
        let passed = decision.outcome == self.expect
            && self
                .rule
                .as_deref()
                .is_none_or(|r| r == decision.rule_name());
        CaseResult { decision, passed }
    }
}

const CASE_KEYS: &[&str] = &[
    "name", "from", "to", "port", "method", "path", "upgrade", "expect", "rule",
];

/// Parses a cases file; `origin` names it in messages.
///
/// # Errors
///
/// [`PolicyError::Syntax`] or [`PolicyError::Invalid`] with the line and column of the
/// offending node.
pub fn parse_cases(text: &str, origin: &str) -> Result<Vec<TestCase>, PolicyError> {
    let ctx = Ctx { origin };
    let root = parse_root(text, ctx)?;
    let fields = ctx.fields(&root, "a cases file", &["cases"])?;
    let Some(list) = fields.get("cases") else {
        return Err(ctx.invalid(
            root.pos,
            "missing `cases`: add `cases:` with a list of cases",
        ));
    };
    let mut cases: Vec<TestCase> = Vec::new();
    for node in ctx.seq(list, "`cases`")? {
        let f = ctx.fields(node, "a case", CASE_KEYS)?;
        let required = |key: &str| {
            f.get(key)
                .ok_or_else(|| ctx.invalid(node.pos, format!("a case needs `{key}`: add it")))
        };
        let name_node = required("name")?;
        let name = ctx.str(name_node, "the case name")?;
        if let Some(first) = cases.iter().find(|c| c.name == name) {
            return Err(ctx.invalid(
                name_node.pos,
                format!(
                    "duplicate case name `{}` (first on line {}): give each case a unique name",
                    clip(name),
                    first.line
                ),
            ));
        }
        let id = |key: &str| -> Result<SpiffeId, PolicyError> {
            let n = required(key)?;
            let s = ctx.str(n, "a SPIFFE ID")?;
            SpiffeId::new(s).map_err(|e| {
                ctx.invalid(
                    n.pos,
                    format!(
                        "`{}` is not a SPIFFE ID ({e}): cases use exact IDs, not patterns",
                        clip(s)
                    ),
                )
            })
        };
        let from = id("from")?;
        let to = id("to")?;
        let port = f.get("port").map(|n| ctx.port(n)).transpose()?;
        let method = f
            .get("method")
            .map(|n| ctx.str(n, "an HTTP method"))
            .transpose()?;
        let path = f
            .get("path")
            .map(|n| ctx.str(n, "an HTTP path"))
            .transpose()?;
        if method.is_some() != path.is_some() {
            return Err(ctx.invalid(
                node.pos,
                "give both `method` and `path` for an HTTP request, or neither for opaque traffic",
            ));
        }
        let upgrade = f
            .get("upgrade")
            .map(|n| ctx.str(n, "an upgrade protocol such as websocket"))
            .transpose()?;
        if let (Some(_), None, Some(n)) = (upgrade, method, f.get("upgrade")) {
            return Err(ctx.invalid(
                n.pos,
                "`upgrade` needs `method` and `path`: an upgrade is an HTTP request",
            ));
        }
        let expect_node = required("expect")?;
        let expect_s = ctx.str(expect_node, "allow, deny or audit_deny")?;
        let expect = Outcome::from_name(expect_s).ok_or_else(|| {
            ctx.invalid(
                expect_node.pos,
                format!(
                    "unknown outcome `{}`: write allow, deny or audit_deny",
                    clip(expect_s)
                ),
            )
        })?;
        let rule = f
            .get("rule")
            .map(|n| ctx.str(n, "a rule name"))
            .transpose()?;
        cases.push(TestCase {
            name: name.to_owned(),
            line: node.pos.line,
            column: node.pos.column,
            from,
            to,
            port,
            method: method.map(str::to_owned),
            path: path.map(str::to_owned),
            upgrade: upgrade.map(str::to_ascii_lowercase),
            expect,
            rule: rule.map(str::to_owned),
        });
    }
    Ok(cases)
}

/// Reads and parses a cases file.
///
/// # Errors
///
/// [`PolicyError::Io`] if the file cannot be read, otherwise as [`parse_cases`].
pub fn load_cases(path: &Path) -> Result<Vec<TestCase>, PolicyError> {
    let text = read_limited(path)?;
    parse_cases(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "rules:\n  - {name: web, from: [\"spiffe://e.org/web\"], to: [\"spiffe://e.org/api\"], http: {methods: [GET]}}\n";

    #[test]
    fn cases_parse_and_run() {
        let cases = parse_cases(
            "cases:\n  - name: reads\n    from: spiffe://e.org/web\n    to: spiffe://e.org/api\n    method: GET\n    path: /x\n    expect: allow\n    rule: web\n  - {name: opaque, from: spiffe://e.org/web, to: spiffe://e.org/api, port: 80, expect: deny, rule: <default>}\n  - {name: wrong, from: spiffe://e.org/web, to: spiffe://e.org/api, expect: allow}\n",
            "cases.yaml",
        )
        .unwrap();
        let policy = Policy::parse(POLICY, "p.yaml").unwrap();
        let passed: Vec<bool> = cases.iter().map(|c| c.run(&policy).passed).collect();
        assert_eq!(passed, vec![true, true, false]);
        assert_eq!(
            (cases[1].line, cases[1].column, cases[1].port),
            (9, 5, Some(80))
        );
    }

    #[test]
    fn case_errors_have_positions() {
        let at = |text: &str| parse_cases(text, "c.yaml").unwrap_err().location();
        assert_eq!(at("cases:\n  - {name: a, from: \"spiffe://e.org/*\", to: spiffe://e.org/b, expect: allow}\n"), Some((2, 21)));
        assert_eq!(at("cases:\n  - {name: a, from: spiffe://e.org/a, to: spiffe://e.org/b, expect: maybe}\n"), Some((2, 69)));
        assert_eq!(at("cases:\n  - {name: a, from: spiffe://e.org/a, to: spiffe://e.org/b, expect: allow, method: GET}\n"), Some((2, 5)));
        assert_eq!(at("cases:\n  - {name: a, from: spiffe://e.org/a, to: spiffe://e.org/b, expect: allow, extra: 1}\n"), Some((2, 76)));
        assert_eq!(at("cases:\n  - {name: a, from: spiffe://e.org/a, to: spiffe://e.org/b, expect: allow}\n  - {name: a, from: spiffe://e.org/a, to: spiffe://e.org/b, expect: allow}\n"), Some((3, 12)));
        assert_eq!(
            at("cases:\n  - {name: a, to: spiffe://e.org/b, expect: allow}\n"),
            Some((2, 5))
        );
        assert_eq!(at("tests: []\n"), Some((1, 1)));
    }
}
