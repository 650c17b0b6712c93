//! Several policy documents as one policy ([`Policy::merge`]): how the CA's named documents
//! (one per team or namespace, `meshid-ca policy apply`) are enforced together.

use crate::policy::{Policy, RuleRef};
use crate::PolicyError;

fn invalid(p: &Policy, line: usize, column: usize, message: String) -> PolicyError {
    PolicyError::Invalid {
        origin: p.origin.clone(),
        line,
        column,
        message,
    }
}

impl Policy {
    /// Combines `parts` (in order) into one policy named `name`, with the same precedence rules
    /// as within one document: any matching deny wins, otherwise any matching allow, otherwise
    /// the default. Among rules of the deciding kind the first wins, the parts' rules taken in
    /// order; rules are numbered across the whole (their [`RuleRef::index`]), and keep the line
    /// they have in their own document.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Invalid`], positioned in the later document, when two parts differ in
    /// `default` or `mode`, declare one port with two protocols, or use one rule name.
    pub fn merge(name: &str, parts: &[Policy]) -> Result<Policy, PolicyError> {
        let Some(first) = parts.first() else {
            return Ok(Policy {
                origin: name.to_owned(),
                name: name.to_owned(),
                default: crate::Action::Deny,
                default_pos: None,
                mode: crate::Mode::Enforce,
                trust_domains: Vec::new(),
                ports: Vec::new(),
                rules: Vec::new(),
            });
        };
        let mut out = Policy {
            origin: name.to_owned(),
            name: name.to_owned(),
            default: first.default,
            default_pos: None,
            mode: first.mode,
            trust_domains: Vec::new(),
            ports: Vec::new(),
            rules: Vec::new(),
        };
        let mut owners: Vec<&str> = Vec::new();
        for part in parts {
            if part.default != first.default || part.mode != first.mode {
                let (line, column) = part.default_pos.map_or((1, 1), |p| (p.line, p.column));
                return Err(invalid(
                    part,
                    line,
                    column,
                    format!(
                        "default {} and mode {} differ from {}'s (default {}, mode {}): documents \
                         combined into one policy must agree on both",
                        part.default.as_str(),
                        part.mode.as_str(),
                        first.origin,
                        first.default.as_str(),
                        first.mode.as_str()
                    ),
                ));
            }
            for td in &part.trust_domains {
                if !out.trust_domains.iter().any(|t| t.value == td.value) {
                    out.trust_domains.push(td.clone());
                }
            }
            for &(port, protocol, pos) in &part.ports {
                match out.ports.iter().find(|(p, _, _)| *p == port) {
                    Some((_, other, _)) if *other != protocol => {
                        return Err(invalid(
                            part,
                            pos.line,
                            pos.column,
                            format!(
                                "port {port} is {} here but {} in another document: declare it \
                                 once, the same way",
                                protocol.as_str(),
                                other.as_str()
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => out.ports.push((port, protocol, pos)),
                }
            }
            for rule in &part.rules {
                if let Some(i) = out.rules.iter().position(|r| r.rref.name == rule.rref.name) {
                    return Err(invalid(
                        part,
                        rule.pos.line,
                        rule.pos.column,
                        format!(
                            "rule `{}` is also in {} (line {}): rule names must be unique \
                             across the documents",
                            rule.rref.name, owners[i], out.rules[i].rref.line
                        ),
                    ));
                }
                let mut rule = rule.clone();
                rule.rref = RuleRef {
                    name: rule.rref.name.clone(),
                    index: out.rules.len(),
                    line: rule.rref.line,
                };
                out.rules.push(rule);
                owners.push(&part.origin);
            }
        }
        Ok(out)
    }
}
