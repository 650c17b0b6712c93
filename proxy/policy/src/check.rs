//! `Policy::check`: lint findings on a valid policy (shadowed and unreachable rules, unknown
//! trust domains, `http` rules that reach tcp ports, ...).

use crate::pattern::Pattern;
use crate::policy::{Action, HttpRule, Located, Mode, Protocol, Rule};
use crate::yaml::Pos;
use crate::Policy;

/// How much a [`Finding`] matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Probably a mistake: the policy does not do what it seems to say. `check` fails on these.
    Warning,
    /// Worth knowing; not a mistake by itself.
    Info,
}

impl Severity {
    /// `"warning"` or `"info"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Info => "info",
        }
    }
}

/// One lint finding, at a position in the policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// How much it matters.
    pub severity: Severity,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
    /// The rule concerned, if any.
    pub rule: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl Policy {
    /// Lints the policy with the trust domains of its `trust_domains`. See
    /// [`Policy::check_with`].
    pub fn check(&self) -> Vec<Finding> {
        self.check_with(&[])
    }

    /// Lints the policy; `extra_trust_domains` are known besides those in `trust_domains`
    /// (when both are empty, trust domains are not checked).
    ///
    /// Warnings: a rule shadowed by an earlier rule of the same kind (it never decides); an
    /// allow rule whose every request an enforced deny refuses; a pattern naming an unknown
    /// trust domain; a rule with `http` conditions and no `ports` when `ports` declares tcp
    /// ports. Infos: allows covered by audit denials, deny rules that only repeat a deny
    /// default, ports missing from `ports`, a default of allow. Sorted by position.
    pub fn check_with(&self, extra_trust_domains: &[&str]) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut add = |severity, pos: Pos, rule: &Rule, message: String| {
            out.push(Finding {
                severity,
                line: pos.line,
                column: pos.column,
                rule: Some(rule.rref.name.to_string()),
                message,
            })
        };
        let known: Vec<String> = self
            .trust_domains
            .iter()
            .map(|t| t.value.clone())
            .chain(extra_trust_domains.iter().map(|t| t.to_ascii_lowercase()))
            .collect();
        let tcp_ports: Vec<u16> = self
            .ports
            .iter()
            .filter(|(_, proto, _)| *proto == Protocol::Tcp)
            .map(|(p, _, _)| *p)
            .collect();
        let rules = self.rules();
        for (j, rule) in rules.iter().enumerate() {
            if !known.is_empty() {
                for p in rule.from.iter().chain(rule.to.iter()) {
                    let td = p.value.trust_domain();
                    if !known.iter().any(|k| k == td) {
                        add(
                            Severity::Warning,
                            p.pos,
                            rule,
                            format!(
                                "trust domain `{td}` is not a known trust domain ({}): fix the \
                                 name, or add it to `trust_domains`",
                                known.join(", ")
                            ),
                        );
                    }
                }
            }
            if let (Some(http), None, Some(p)) = (&rule.http, &rule.ports, tcp_ports.first()) {
                let effect = match rule.action {
                    Action::Allow => "it never allows opaque traffic",
                    Action::Deny => "it denies all matching opaque traffic (fail closed)",
                };
                add(
                    Severity::Warning,
                    http.pos,
                    rule,
                    format!(
                        "rule `{}` has `http` conditions and no `ports`, so it also applies to \
                         tcp port {p}, where {effect}: add `ports:` with the http ports",
                        rule.rref.name
                    ),
                );
            }
            if !self.ports.is_empty() {
                for p in rule.ports.iter().flatten() {
                    if !self.ports.iter().any(|(q, _, _)| *q == p.value) {
                        add(
                            Severity::Info,
                            p.pos,
                            rule,
                            format!(
                                "port {} is not declared in `ports`: declare it as http or tcp",
                                p.value
                            ),
                        );
                    }
                }
            }
            if let Some(earlier) = rules[..j].iter().find(|s| {
                s.action == rule.action && (s.enforced || !rule.enforced) && covers(s, rule)
            }) {
                add(
                    Severity::Warning,
                    rule.pos,
                    rule,
                    format!(
                        "rule `{}` is shadowed by rule `{}` (line {}): every request it matches, \
                         that earlier rule matches too, so it never decides; remove it or narrow \
                         `{}`",
                        rule.rref.name, earlier.rref.name, earlier.rref.line, earlier.rref.name
                    ),
                );
            }
            if rule.action == Action::Allow {
                let denies = || {
                    rules
                        .iter()
                        .filter(|s| s.action == Action::Deny && covers(s, rule))
                };
                if let Some(deny) = denies().find(|s| s.enforced) {
                    add(
                        Severity::Warning,
                        rule.pos,
                        rule,
                        format!(
                            "rule `{}` is unreachable: every request it allows, deny rule `{}` \
                             (line {}) refuses; remove it or narrow the deny",
                            rule.rref.name, deny.rref.name, deny.rref.line
                        ),
                    );
                } else if let Some(deny) = denies().next() {
                    add(
                        Severity::Info,
                        rule.pos,
                        rule,
                        format!(
                            "every request rule `{}` allows is a would-be denial of audit-mode \
                             rule `{}` (line {}): once enforced, this rule allows nothing",
                            rule.rref.name, deny.rref.name, deny.rref.line
                        ),
                    );
                }
            }
            if rule.action == Action::Deny
                && self.default == Action::Deny
                && !rules
                    .iter()
                    .any(|a| a.action == Action::Allow && overlaps(a, rule))
            {
                add(
                    Severity::Info,
                    rule.pos,
                    rule,
                    format!(
                        "deny rule `{}` overlaps no allow rule, so the default (deny) already \
                         refuses what it matches; it only guards against future allows",
                        rule.rref.name
                    ),
                );
            }
        }
        if self.default == Action::Allow && self.mode == Mode::Enforce {
            let pos = self.default_pos.unwrap_or_default();
            out.push(Finding {
                severity: Severity::Info,
                line: pos.line,
                column: pos.column,
                rule: None,
                message: "`default: allow` lets through every caller that no deny rule stops"
                    .to_owned(),
            });
        }
        out.sort_by_key(|f| (f.line, f.column, f.severity));
        out
    }
}

fn patterns_cover(outer: &[Located<Pattern>], inner: &[Located<Pattern>]) -> bool {
    inner
        .iter()
        .all(|i| outer.iter().any(|o| o.value.covers(&i.value)))
}

fn patterns_overlap(a: &[Located<Pattern>], b: &[Located<Pattern>]) -> bool {
    a.iter()
        .any(|x| b.iter().any(|y| x.value.overlaps(&y.value)))
}

fn ports_cover(outer: Option<&[Located<u16>]>, inner: Option<&[Located<u16>]>) -> bool {
    match (outer, inner) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(o), Some(i)) => i.iter().all(|p| o.iter().any(|q| q.value == p.value)),
    }
}

pub(crate) fn ports_overlap(a: Option<&[Located<u16>]>, b: Option<&[Located<u16>]>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.iter().any(|p| b.iter().any(|q| q.value == p.value)),
        _ => true,
    }
}

fn http_cover(outer: Option<&HttpRule>, inner: Option<&HttpRule>) -> bool {
    match (outer, inner) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(o), Some(i)) => {
            let methods = match (&o.methods, &i.methods) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(o), Some(i)) => i.iter().all(|m| o.iter().any(|n| n.value == m.value)),
            };
            let paths = match (&o.paths, &i.paths) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(o), Some(i)) => i.iter().all(|p| o.iter().any(|q| q.value.covers(&p.value))),
            };
            // An allow rule lets requests switch to the protocols of its `upgrades` only.
            let upgrades = i
                .upgrades
                .iter()
                .flatten()
                .all(|u| o.upgrades.iter().flatten().any(|v| v.value == u.value));
            methods && paths && upgrades
        }
    }
}

/// Every request `inner` matches, `outer` matches too. Sound (never claims coverage that does
/// not hold) when both rules have the same action, or `inner` allows and `outer` denies: deny
/// rules match at least what allow rules with the same conditions match.
pub(crate) fn covers(outer: &Rule, inner: &Rule) -> bool {
    patterns_cover(&outer.from, &inner.from)
        && patterns_cover(&outer.to, &inner.to)
        && ports_cover(outer.ports.as_deref(), inner.ports.as_deref())
        && http_cover(outer.http.as_ref(), inner.http.as_ref())
}

/// Some caller, callee and port match both rules (HTTP conditions are not compared, so this may
/// say yes when they exclude each other).
pub(crate) fn overlaps(a: &Rule, b: &Rule) -> bool {
    patterns_overlap(&a.from, &b.from)
        && patterns_overlap(&a.to, &b.to)
        && ports_overlap(a.ports.as_deref(), b.ports.as_deref())
}
