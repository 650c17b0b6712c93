//! A policy written back as YAML ([`Policy::to_yaml`]), and the part of it that concerns some
//! receiving workloads ([`Policy::restricted_to`]): how the node agent hands each proxy only the
//! rules that can apply to the workloads behind it.

use std::fmt::Write as _;

use spiffe::SpiffeId;

use crate::policy::{Mode, Policy};
use crate::Action;

/// A YAML double-quoted scalar (JSON's string syntax, which YAML reads the same).
pub(crate) fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    let items: Vec<String> = items.iter().map(f).collect();
    format!("[{}]", items.join(", "))
}

impl Policy {
    /// The policy as a YAML document that [`Policy::parse`] reads back to a policy deciding
    /// every request the same way, by rules of the same names in the same order (positions
    /// differ; comments are not kept).
    pub fn to_yaml(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "name: {}", quoted(&self.name));
        let _ = writeln!(
            s,
            "default: {}",
            match self.default {
                Action::Allow => "allow",
                Action::Deny => "deny",
            }
        );
        let _ = writeln!(s, "mode: {}", self.mode.as_str());
        if !self.trust_domains.is_empty() {
            let _ = writeln!(
                s,
                "trust_domains: {}",
                list(&self.trust_domains, |t| quoted(&t.value))
            );
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self
                .ports
                .iter()
                .map(|(port, proto, _)| format!("{port}: {}", proto.as_str()))
                .collect();
            let _ = writeln!(s, "ports: {{{}}}", ports.join(", "));
        }
        if self.rules.is_empty() {
            s.push_str("rules: []\n");
            return s;
        }
        s.push_str("rules:\n");
        for r in &self.rules {
            let _ = writeln!(s, "  - name: {}", quoted(&r.rref.name));
            let _ = writeln!(
                s,
                "    action: {}",
                match r.action {
                    Action::Allow => "allow",
                    Action::Deny => "deny",
                }
            );
            if r.action == Action::Deny && r.mode == Mode::Audit && self.mode == Mode::Enforce {
                s.push_str("    mode: audit\n");
            }
            let _ = writeln!(
                s,
                "    from: {}",
                list(&r.from, |p| quoted(&p.value.to_string()))
            );
            let _ = writeln!(
                s,
                "    to: {}",
                list(&r.to, |p| quoted(&p.value.to_string()))
            );
            if let Some(ports) = &r.ports {
                let _ = writeln!(s, "    ports: {}", list(ports, |p| p.value.to_string()));
            }
            if let Some(h) = &r.http {
                let mut parts = Vec::new();
                if let Some(m) = &h.methods {
                    parts.push(format!("methods: {}", list(m, |m| quoted(&m.value))));
                }
                if let Some(p) = &h.paths {
                    parts.push(format!(
                        "paths: {}",
                        list(p, |p| quoted(&p.value.to_string()))
                    ));
                }
                if let Some(u) = &h.upgrades {
                    parts.push(format!("upgrades: {}", list(u, |u| quoted(&u.value))));
                }
                let _ = writeln!(s, "    http: {{{}}}", parts.join(", "));
            }
        }
        s
    }

    /// The policy with only the rules whose `to` matches one of `callees`: for traffic to
    /// those workloads it decides exactly as the whole policy (the other rules cannot match
    /// it), and it tells a holder nothing about the rest of the mesh. Rules are renumbered.
    pub fn restricted_to(&self, callees: &[SpiffeId]) -> Policy {
        let mut out = self.clone();
        out.rules.retain(|r| {
            r.to.iter()
                .any(|p| callees.iter().any(|id| p.value.matches(id)))
        });
        for (index, r) in out.rules.iter_mut().enumerate() {
            r.rref.index = index;
        }
        out
    }
}
