//! `Policy::explain` (why a request got its decision) and `Policy::who_can` (who reaches a
//! workload).

use spiffe::SpiffeId;

use crate::check::ports_overlap;
use crate::pattern::{PathPattern, Pattern};
use crate::policy::{Action, Check, Mode, Prepared, Rule};
use crate::{Decision, Policy, Request, RuleRef};

/// A rule condition, named in explanations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// The caller patterns.
    From,
    /// The receiving workload patterns.
    To,
    /// The rule's `ports` (or the request has no port).
    Port,
    /// The rule's HTTP methods (or the request's method is not an upper-case token).
    Method,
    /// The rule's HTTP paths (or the request's path is ambiguous).
    Path,
    /// The rule has `http` conditions and the traffic is opaque.
    NoHttpInfo,
    /// The request asks to switch protocols and the rule's `upgrades` does not name it.
    Upgrade,
}

impl Field {
    /// `"from"`, `"to"`, `"port"`, `"method"`, `"path"`, `"no-http-info"` or `"upgrade"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::From => "from",
            Self::To => "to",
            Self::Port => "port",
            Self::Method => "method",
            Self::Path => "path",
            Self::NoHttpInfo => "no-http-info",
            Self::Upgrade => "upgrade",
        }
    }
}

/// How one rule related to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMatch {
    /// Every condition held.
    Matched,
    /// A deny rule matched because the request lacked what this condition looks at (no HTTP
    /// info, no port, an ambiguous path or method): deny rules fail closed.
    MatchedFailClosed(Field),
    /// This condition (the first in from, to, port, http order) did not hold.
    NotMatched(Field),
}

impl RuleMatch {
    /// The rule matched (also when failing closed).
    pub fn matched(self) -> bool {
        !matches!(self, Self::NotMatched(_))
    }
}

/// One rule's part in an [`Explanation`].
#[derive(Clone, Debug)]
pub struct RuleTrace {
    /// The rule.
    pub rule: RuleRef,
    /// What it does.
    pub action: Action,
    /// Its effective mode: `Audit` for an audit deny rule or any rule of an audit-mode file.
    pub mode: Mode,
    /// Its denials refuse traffic (false for allows and for audit-mode denials).
    pub enforced: bool,
    /// Whether it matched, and if not, why.
    pub result: RuleMatch,
}

/// A decision with the reason for every rule.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The decision, as [`Policy::decide`] gives it.
    pub decision: Decision,
    /// Every rule in file order.
    pub rules: Vec<RuleTrace>,
    /// The policy's default.
    pub default: Action,
    /// The policy's mode.
    pub mode: Mode,
}

/// One rule in a [`WhoCan`] answer.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The rule.
    pub rule: RuleRef,
    /// Allow, or deny (a carve-out).
    pub action: Action,
    /// Its effective mode: `Audit` for an audit deny rule or any rule of an audit-mode file
    /// (an audit deny records would-be denials and refuses nothing).
    pub mode: Mode,
    /// The caller patterns.
    pub from: Vec<Pattern>,
    /// The ports, `None` for every port.
    pub ports: Option<Vec<u16>>,
    /// The HTTP methods, `None` for every method (or no `http` conditions).
    pub methods: Option<Vec<String>>,
    /// The HTTP path patterns, `None` for every path (or no `http` conditions).
    pub paths: Option<Vec<PathPattern>>,
    /// The upgrade protocols an allow with `http` conditions lets requests switch to, `None`
    /// for none (or no `http` conditions: then any).
    pub upgrades: Option<Vec<String>>,
    /// The rule has `http` conditions (an allow then never admits opaque traffic).
    pub http: bool,
    /// For an allow: the deny rules that may carve exceptions out of it (their callers and
    /// ports overlap).
    pub carve_outs: Vec<RuleRef>,
}

/// Who can reach a workload: see [`Policy::who_can`].
#[derive(Clone, Debug)]
pub struct WhoCan {
    /// The workload asked about.
    pub to: SpiffeId,
    /// The policy's default: `Allow` means every caller that no deny stops.
    pub default: Action,
    /// The policy's mode: in audit mode nothing is refused.
    pub mode: Mode,
    /// The allow rules whose `to` matches, in file order.
    pub allows: Vec<Grant>,
    /// The deny rules whose `to` matches, in file order.
    pub denies: Vec<Grant>,
}

impl WhoCan {
    /// The default lets every caller through that no deny rule stops.
    pub fn default_allows(&self) -> bool {
        self.default == Action::Allow
    }
}

fn trace(rule: &Rule, p: &Prepared<'_>) -> RuleMatch {
    if !rule.caller_matches(p.req.from) {
        return RuleMatch::NotMatched(Field::From);
    }
    if !rule.callee_matches(p.req.to) {
        return RuleMatch::NotMatched(Field::To);
    }
    let mut fail_closed = None;
    let mut condition = |check: Check, field: Field| match check {
        Check::Yes => true,
        Check::No => false,
        Check::Unknown if rule.action == Action::Deny => {
            fail_closed.get_or_insert(field);
            true
        }
        Check::Unknown => false,
    };
    if !condition(rule.port_check(p.req.port), Field::Port) {
        return RuleMatch::NotMatched(Field::Port);
    }
    if rule.http.is_some() {
        if p.req.http.is_none() {
            if !condition(Check::Unknown, Field::NoHttpInfo) {
                return RuleMatch::NotMatched(Field::NoHttpInfo);
            }
        } else {
            if !condition(rule.method_check(p), Field::Method) {
                return RuleMatch::NotMatched(Field::Method);
            }
            if !condition(rule.path_check(p), Field::Path) {
                return RuleMatch::NotMatched(Field::Path);
            }
            if !condition(rule.upgrade_check(p), Field::Upgrade) {
                return RuleMatch::NotMatched(Field::Upgrade);
            }
        }
    }
    fail_closed.map_or(RuleMatch::Matched, RuleMatch::MatchedFailClosed)
}

impl Policy {
    /// The decision for `req` with, for every rule, whether it matched and which condition
    /// failed. Computed separately from [`Policy::decide`] (condition by condition); the two
    /// always agree.
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        let prepared = Prepared::new(req);
        let rules: Vec<RuleTrace> = self
            .rules()
            .iter()
            .map(|rule| RuleTrace {
                rule: rule.rref.clone(),
                action: rule.action,
                mode: rule.mode,
                enforced: rule.enforced,
                result: trace(rule, &prepared),
            })
            .collect();
        let first = |pred: &dyn Fn(&RuleTrace) -> bool| {
            rules.iter().position(|t| t.result.matched() && pred(t))
        };
        let enforced = first(&|t| t.action == Action::Deny && t.enforced);
        let any_deny = first(&|t| t.action == Action::Deny);
        let allow = first(&|t| t.action == Action::Allow);
        Explanation {
            decision: self.combine(enforced, any_deny, allow),
            rules,
            default: self.default,
            mode: self.mode,
        }
    }

    /// The callers that can reach `to`: every allow rule whose `to` matches it, with its
    /// caller patterns, ports, HTTP conditions and the deny rules that may carve exceptions out
    /// of it; every deny rule whose `to` matches; and the default.
    pub fn who_can(&self, to: &SpiffeId) -> WhoCan {
        let grant = |rule: &Rule, carve_outs: Vec<RuleRef>| Grant {
            rule: rule.rref.clone(),
            action: rule.action,
            mode: rule.mode,
            from: rule.from.iter().map(|p| p.value.clone()).collect(),
            ports: rule
                .ports
                .as_ref()
                .map(|ps| ps.iter().map(|p| p.value).collect()),
            methods: rule
                .http
                .as_ref()
                .and_then(|h| h.methods.as_ref())
                .map(|ms| ms.iter().map(|m| m.value.to_string()).collect()),
            paths: rule
                .http
                .as_ref()
                .and_then(|h| h.paths.as_ref())
                .map(|ps| ps.iter().map(|p| p.value.clone()).collect()),
            upgrades: rule
                .http
                .as_ref()
                .and_then(|h| h.upgrades.as_ref())
                .map(|us| us.iter().map(|u| u.value.to_string()).collect()),
            http: rule.http.is_some(),
            carve_outs,
        };
        let reaching: Vec<&Rule> = self
            .rules()
            .iter()
            .filter(|r| r.callee_matches(to))
            .collect();
        let denies: Vec<&Rule> = reaching
            .iter()
            .copied()
            .filter(|r| r.action == Action::Deny)
            .collect();
        let allows = reaching
            .iter()
            .filter(|r| r.action == Action::Allow)
            .map(|allow| {
                let carve_outs = denies
                    .iter()
                    .filter(|d| {
                        allow
                            .from
                            .iter()
                            .any(|a| d.from.iter().any(|b| a.value.overlaps(&b.value)))
                            && ports_overlap(allow.ports.as_deref(), d.ports.as_deref())
                    })
                    .map(|d| d.rref.clone())
                    .collect();
                grant(allow, carve_outs)
            })
            .collect();
        WhoCan {
            to: to.clone(),
            default: self.default,
            mode: self.mode,
            allows,
            denies: denies.iter().map(|d| grant(d, Vec::new())).collect(),
        }
    }
}

/// One rule as a whole-policy view shows it (the console's graph and rule table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSummary {
    /// The rule.
    pub rule: RuleRef,
    /// What it does.
    pub action: Action,
    /// Its effective mode.
    pub mode: Mode,
    /// The caller patterns, as written.
    pub from: Vec<String>,
    /// The receiving workload patterns, as written.
    pub to: Vec<String>,
    /// The ports, `None` for every port.
    pub ports: Option<Vec<u16>>,
    /// The rule has `http` conditions.
    pub http: bool,
}

impl Policy {
    /// Every rule in file order, with its patterns as written.
    pub fn summaries(&self) -> Vec<RuleSummary> {
        self.rules()
            .iter()
            .map(|r| RuleSummary {
                rule: r.rref.clone(),
                action: r.action,
                mode: r.mode,
                from: r.from.iter().map(|p| p.value.as_str().to_owned()).collect(),
                to: r.to.iter().map(|p| p.value.as_str().to_owned()).collect(),
                ports: r
                    .ports
                    .as_ref()
                    .map(|ps| ps.iter().map(|p| p.value).collect()),
                http: r.http.is_some(),
            })
            .collect()
    }
}

impl Explanation {
    /// The explanation as JSON, the one shape `meshid-proxy policy explain --json` prints and
    /// the CA's console answers: the policy's name, mode and default, the decision with its
    /// rule (`null`: the default), and every rule with whether it matched and which condition
    /// failed or failed closed.
    pub fn to_json(&self, policy: &Policy) -> serde_json::Value {
        use serde_json::{json, Value};
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|t| {
                let (matched, fail_closed, failed) = match t.result {
                    RuleMatch::Matched => (true, None, None),
                    RuleMatch::MatchedFailClosed(f) => (true, Some(f.as_str()), None),
                    RuleMatch::NotMatched(f) => (false, None, Some(f.as_str())),
                };
                json!({
                    "name": &*t.rule.name,
                    "line": t.rule.line,
                    "action": t.action.as_str(),
                    "mode": t.mode.as_str(),
                    "matched": matched,
                    "fail_closed": fail_closed,
                    "failed": failed,
                })
            })
            .collect();
        let rule = match &self.decision.rule {
            Some(r) => json!({ "name": &*r.name, "index": r.index, "line": r.line }),
            None => Value::Null,
        };
        json!({
            "policy": policy.name(),
            "mode": self.mode.as_str(),
            "default": self.default.as_str(),
            "decision": self.decision.outcome.as_str(),
            "allowed": self.decision.outcome.allowed(),
            "rule": rule,
            "rules": rules,
        })
    }
}
