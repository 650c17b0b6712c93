//! The validated policy ([`Policy`]): the rule model and the decision functions. How a policy
//! is read from YAML is [`crate::parse`]'s business.

use std::fmt;
use std::sync::Arc;

use spiffe::SpiffeId;

use crate::pattern::{canonical_body, is_method_token, PathPattern, Pattern};
use crate::yaml::{Ctx, Pos};
use crate::PolicyError;

/// The largest policy (or cases) file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;

/// What a rule (or the default) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the traffic through.
    Allow,
    /// Refuse the traffic.
    Deny,
}

impl Action {
    /// `"allow"` or `"deny"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Whether a rule (or the whole file) enforces its denials or only records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Denials refuse traffic.
    Enforce,
    /// Denials are recorded as [`Outcome::AuditDeny`] and the traffic goes through.
    Audit,
}

impl Mode {
    /// `"enforce"` or `"audit"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// The protocol the proxy speaks on a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP: each request is authorized with its method and path.
    Http,
    /// Opaque TCP: only the connection is authorized.
    Tcp,
}

impl Protocol {
    /// `"http"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// One thing to authorize: a connection (`http: None`) or an HTTP request on it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The caller, from its verified SVID.
    pub from: &'a SpiffeId,
    /// The receiving workload (this proxy's own ID for inbound traffic).
    pub to: &'a SpiffeId,
    /// The service port reached; `None` when unknown (rules with `ports` then match only if
    /// they deny).
    pub port: Option<u16>,
    /// The HTTP request, when the traffic is HTTP; `None` for opaque TCP.
    pub http: Option<HttpRequest<'a>>,
}

/// The parts of an HTTP request that rules look at.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    /// The method as received (compared case-sensitively, as HTTP does).
    pub method: &'a str,
    /// The path as received, without the query string (a `?` and what follows is ignored).
    pub path: &'a str,
    /// The protocol the request asks to switch the connection to (an `Upgrade` token such as
    /// `websocket`, lower case; `connect` for a `CONNECT` tunnel), `None` for a plain
    /// request. After the switch the proxy no longer sees requests, so only an allow rule
    /// that names the protocol in `upgrades`, or one without `http` conditions, allows it.
    pub upgrade: Option<&'a str>,
}

/// The result of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Let the traffic through.
    Allow,
    /// Refuse the traffic.
    Deny,
    /// Let the traffic through, but an audit-mode rule (or an audit-mode file) would have
    /// refused it: record that.
    AuditDeny,
}

impl Outcome {
    /// The traffic goes through (`Allow` or `AuditDeny`).
    pub fn allowed(self) -> bool {
        matches!(self, Self::Allow | Self::AuditDeny)
    }

    /// `"allow"`, `"deny"` or `"audit_deny"`, as in access logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::AuditDeny => "audit_deny",
        }
    }

    /// Parses [`Outcome::as_str`]'s forms.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Self::Allow),
            "deny" => Some(Self::Deny),
            "audit_deny" => Some(Self::AuditDeny),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reference to a rule: its name, position in the file's rule list, and line. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    /// The rule's `name`.
    pub name: Arc<str>,
    /// Index in the file's `rules` list, from 0.
    pub index: usize,
    /// The line the rule starts on, from 1.
    pub line: usize,
}

/// The outcome and the rule behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What happens to the traffic.
    pub outcome: Outcome,
    /// The deciding rule; `None` when the policy's default decided. For
    /// [`Outcome::AuditDeny`], the rule (or default) that would have denied.
    pub rule: Option<RuleRef>,
}

impl Decision {
    /// The deciding rule's name, or `<default>`.
    pub fn rule_name(&self) -> &str {
        self.rule.as_ref().map_or("<default>", |r| &r.name)
    }
}

/// What can be decided for a connection before any HTTP request is seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionVerdict {
    /// The decision for every request on the connection (and for the connection as opaque
    /// traffic): [`Policy::decide`] gives this same decision whatever the HTTP request.
    Decided(Decision),
    /// Some rule with `http` conditions could change the decision: decide each request.
    PerRequest,
}

/// A value and where it was written.
#[derive(Clone, Debug)]
pub(crate) struct Located<T> {
    pub value: T,
    pub pos: Pos,
}

/// A rule's `http` conditions.
#[derive(Clone, Debug)]
pub(crate) struct HttpRule {
    pub pos: Pos,
    pub methods: Option<Vec<Located<Box<str>>>>,
    pub paths: Option<Vec<Located<PathPattern>>>,
    /// Upgrade protocols an allow rule lets a matching request switch to (lower case).
    pub upgrades: Option<Vec<Located<Box<str>>>>,
}

/// A validated rule.
#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub rref: RuleRef,
    pub pos: Pos,
    pub action: Action,
    /// The effective mode: `Audit` for an audit deny rule or any rule of an audit-mode file.
    pub mode: Mode,
    /// Its denials refuse traffic: a deny rule in enforce mode in an enforce-mode file.
    pub enforced: bool,
    pub from: Vec<Located<Pattern>>,
    pub to: Vec<Located<Pattern>>,
    pub ports: Option<Vec<Located<u16>>>,
    pub http: Option<HttpRule>,
}

/// How a request relates to a rule's conditions; shared by `decide` and `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// The condition holds.
    Yes,
    /// The condition does not hold.
    No,
    /// The request lacks what the condition looks at (no port, no HTTP info, an ambiguous path
    /// or method): deny rules treat it as holding, allow rules as not holding.
    Unknown,
}

/// A request with its HTTP parts checked once.
pub(crate) struct Prepared<'r> {
    pub req: &'r Request<'r>,
    /// The canonical path body, `None` when the path is ambiguous.
    pub body: Option<&'r str>,
    pub method_ok: bool,
}

impl<'r> Prepared<'r> {
    pub fn new(req: &'r Request<'r>) -> Self {
        let (body, method_ok) = match &req.http {
            Some(h) => (canonical_body(h.path), is_method_token(h.method)),
            None => (None, false),
        };
        Self {
            req,
            body,
            method_ok,
        }
    }
}

impl Rule {
    pub fn caller_matches(&self, id: &SpiffeId) -> bool {
        self.from.iter().any(|p| p.value.matches(id))
    }

    pub fn callee_matches(&self, id: &SpiffeId) -> bool {
        self.to.iter().any(|p| p.value.matches(id))
    }

    pub fn port_check(&self, port: Option<u16>) -> Check {
        match (&self.ports, port) {
            (None, _) => Check::Yes,
            (Some(_), None) => Check::Unknown,
            (Some(ports), Some(p)) if ports.iter().any(|q| q.value == p) => Check::Yes,
            (Some(_), Some(_)) => Check::No,
        }
    }

    pub fn method_check(&self, p: &Prepared<'_>) -> Check {
        let (Some(h), Some(r)) = (&self.http, &p.req.http) else {
            return Check::Yes;
        };
        match &h.methods {
            None => Check::Yes,
            Some(_) if !p.method_ok => Check::Unknown,
            Some(ms) if ms.iter().any(|m| &*m.value == r.method) => Check::Yes,
            Some(_) => Check::No,
        }
    }

    pub fn path_check(&self, p: &Prepared<'_>) -> Check {
        let Some(h) = &self.http else {
            return Check::Yes;
        };
        match (&h.paths, p.body) {
            (None, _) => Check::Yes,
            (Some(_), None) => Check::Unknown,
            (Some(ps), Some(body)) if ps.iter().any(|pp| pp.value.matches_body(body)) => Check::Yes,
            (Some(_), Some(_)) => Check::No,
        }
    }

    /// `Unknown` counts as a match for deny rules only (fail closed, never widen an allow).
    pub fn accepts(&self, c: Check) -> bool {
        match c {
            Check::Yes => true,
            Check::No => false,
            Check::Unknown => self.action == Action::Deny,
        }
    }

    /// Whether the rule lets the request switch protocols. A rule without `http` conditions
    /// covers opaque traffic, so any upgrade; an allow rule with `http` conditions covers only
    /// the protocols its `upgrades` names; a deny rule's conditions cover an upgrade request
    /// as they cover the same request without it (fail closed).
    pub fn upgrade_check(&self, p: &Prepared<'_>) -> Check {
        let (Some(h), Some(r)) = (&self.http, &p.req.http) else {
            return Check::Yes;
        };
        match (r.upgrade, self.action) {
            (None, _) | (Some(_), Action::Deny) => Check::Yes,
            (Some(proto), Action::Allow) => {
                let named = h
                    .upgrades
                    .iter()
                    .flatten()
                    .any(|u| u.value.eq_ignore_ascii_case(proto));
                if named {
                    Check::Yes
                } else {
                    Check::No
                }
            }
        }
    }

    /// The fast matcher used by `decide`.
    pub fn matches(&self, p: &Prepared<'_>) -> bool {
        self.caller_matches(p.req.from)
            && self.callee_matches(p.req.to)
            && self.accepts(self.port_check(p.req.port))
            && match (&self.http, &p.req.http) {
                (None, _) => true,
                (Some(_), None) => self.action == Action::Deny,
                (Some(_), Some(_)) => {
                    self.accepts(self.method_check(p))
                        && self.accepts(self.path_check(p))
                        && self.accepts(self.upgrade_check(p))
                }
            }
    }
}

/// A validated policy: rules, default, mode, declared ports and trust domains.
///
/// Build one with [`Policy::parse`] or [`Policy::load`]; a value in hand is valid. Immutable and
/// `Send + Sync`: share it in an `Arc` and swap the `Arc` on reload.
#[derive(Clone, Debug)]
pub struct Policy {
    pub(crate) origin: String,
    pub(crate) name: String,
    pub(crate) default: Action,
    pub(crate) default_pos: Option<Pos>,
    pub(crate) mode: Mode,
    pub(crate) trust_domains: Vec<Located<String>>,
    pub(crate) ports: Vec<(u16, Protocol, Pos)>,
    pub(crate) rules: Vec<Rule>,
}

impl Policy {
    /// The policy's name: its `name`, or the file stem.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file name given to [`Policy::parse`] (or the path given to [`Policy::load`]).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The outcome when no rule matches.
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// The file's mode: in audit mode nothing is refused.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The trust domains listed in `trust_domains`.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.trust_domains.iter().map(|t| t.value.as_str())
    }

    /// Decides a connection or HTTP request. Does not allocate or lock.
    ///
    /// Any matching deny wins, otherwise any matching allow, otherwise the default; among
    /// rules of the deciding kind, the first in the file. Audit-mode denials (a deny rule with
    /// `mode: audit`, or any denial in an audit-mode file) give [`Outcome::AuditDeny`] instead of
    /// refusing. A rule with `http` conditions never matches opaque traffic if it allows, and
    /// always matches it if it denies (fail closed); the same holds for a request whose path or
    /// method is ambiguous (see [`crate::is_unambiguous_path`]) and, for `ports`, a request
    /// without a port.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let prepared = Prepared::new(req);
        let (mut enforced, mut any_deny, mut allow) = (None, None, None);
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.action {
                Action::Deny => {
                    if any_deny.is_some() && !rule.enforced {
                        continue;
                    }
                    if rule.matches(&prepared) {
                        any_deny.get_or_insert(i);
                        if rule.enforced {
                            enforced = Some(i);
                            break;
                        }
                    }
                }
                Action::Allow => {
                    if allow.is_none() && rule.matches(&prepared) {
                        allow = Some(i);
                    }
                }
            }
        }
        self.combine(enforced, any_deny, allow)
    }

    /// The decision from the first matching enforced deny, deny of any mode, and allow.
    pub(crate) fn combine(
        &self,
        enforced: Option<usize>,
        any_deny: Option<usize>,
        allow: Option<usize>,
    ) -> Decision {
        let rref = |i: usize| self.rules.get(i).map(|r| r.rref.clone());
        let decision = |outcome, rule| Decision { outcome, rule };
        if self.mode == Mode::Audit {
            return match (any_deny, allow) {
                (Some(d), _) => decision(Outcome::AuditDeny, rref(d)),
                (None, Some(a)) => decision(Outcome::Allow, rref(a)),
                (None, None) if self.default == Action::Allow => decision(Outcome::Allow, None),
                (None, None) => decision(Outcome::AuditDeny, None),
            };
        }
        if let Some(e) = enforced {
            return decision(Outcome::Deny, rref(e));
        }
        // What is enforced: the first allow, or the default.
        let enforced_allow = match allow {
            Some(a) => Some(rref(a)),
            None if self.default == Action::Allow => Some(None),
            None => None,
        };
        match (any_deny, enforced_allow) {
            (Some(d), Some(_)) => decision(Outcome::AuditDeny, rref(d)),
            (None, Some(rule)) => decision(Outcome::Allow, rule),
            (_, None) => decision(Outcome::Deny, None),
        }
    }

    /// Decides a connection before its HTTP requests are seen. Does not allocate or lock.
    ///
    /// [`ConnectionVerdict::Decided`] when no rule with `http` conditions can change the
    /// decision for this caller, callee and port: then [`Policy::decide`] gives that decision
    /// for opaque traffic and for every HTTP request. Otherwise
    /// [`ConnectionVerdict::PerRequest`].
    pub fn connection(&self, from: &SpiffeId, to: &SpiffeId, port: u16) -> ConnectionVerdict {
        // First matching rule per category among rules without `http`, and the first matching
        // rule per category among rules with `http` (whose match depends on the request).
        let (mut e0, mut d0, mut a0) = (usize::MAX, usize::MAX, usize::MAX);
        let (mut he, mut hd, mut ha) = (usize::MAX, usize::MAX, usize::MAX);
        for (i, rule) in self.rules.iter().enumerate() {
            if !(rule.caller_matches(from)
                && rule.callee_matches(to)
                && rule.accepts(rule.port_check(Some(port))))
            {
                continue;
            }
            let scoped = rule.http.is_some();
            match rule.action {
                Action::Deny => {
                    let (d, e) = if scoped {
                        (&mut hd, &mut he)
                    } else {
                        (&mut d0, &mut e0)
                    };
                    *d = (*d).min(i);
                    if rule.enforced {
                        *e = (*e).min(i);
                    }
                }
                Action::Allow => {
                    let a = if scoped { &mut ha } else { &mut a0 };
                    *a = (*a).min(i);
                }
            }
        }
        let varies_e = he < e0;
        let varies_d = hd < d0;
        let varies_a = ha < a0;
        let opt = |i: usize| (i != usize::MAX).then_some(i);
        let constant = if varies_d {
            // The would-be denial itself varies; an enforced denial fixed before it decides.
            self.mode == Mode::Enforce && e0 != usize::MAX && !varies_e
        } else if self.mode == Mode::Audit {
            d0 != usize::MAX || !varies_a
        } else if e0 != usize::MAX {
            !varies_e
        } else if varies_e {
            false
        } else if d0 != usize::MAX {
            // An audit denial is fixed: allow or default decides between AuditDeny and Deny.
            self.default == Action::Allow || a0 != usize::MAX || !varies_a
        } else {
            !varies_a
        };
        if constant {
            ConnectionVerdict::Decided(self.combine(opt(e0), opt(d0), opt(a0)))
        } else {
            ConnectionVerdict::PerRequest
        }
    }

    /// Checks the policy against the protocols the proxy serves on its ports.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Invalid`] at the first rule with `http` conditions that applies to a port
    /// served as [`Protocol::Tcp`]: at the port in the rule's `ports`, or at its `http` key when
    /// the rule has no `ports` (it then applies to every port).
    pub fn validate_ports(&self, ports: &[(u16, Protocol)]) -> Result<(), PolicyError> {
        let ctx = Ctx {
            origin: &self.origin,
        };
        let tcp = |p: u16| {
            ports
                .iter()
                .any(|&(q, proto)| q == p && proto == Protocol::Tcp)
        };
        for rule in &self.rules {
            let Some(http) = &rule.http else { continue };
            match &rule.ports {
                Some(rule_ports) => {
                    if let Some(p) = rule_ports.iter().find(|p| tcp(p.value)) {
                        return Err(ctx.invalid(
                            p.pos,
                            format!(
                                "rule `{}` has `http` conditions but the proxy serves port {} as tcp: \
                                 remove the port from the rule, or serve the port as http",
                                rule.rref.name, p.value
                            ),
                        ));
                    }
                }
                None => {
                    if let Some((p, _)) = ports.iter().find(|(_, proto)| *proto == Protocol::Tcp) {
                        return Err(ctx.invalid(
                            http.pos,
                            format!(
                                "rule `{}` has `http` conditions and no `ports`, so it applies to \
                                 port {p}, which the proxy serves as tcp: add `ports:` with the \
                                 http ports only",
                                rule.rref.name
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The rules in file order (crate-internal view).
    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

#[cfg(test)]
mod tests;
