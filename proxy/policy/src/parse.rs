//! Reading a policy: YAML text (at most [`MAX_POLICY_BYTES`]) into a validated [`Policy`],
//! every error with the file, line and column of the offending node. The rule model and the
//! decisions are in [`crate::policy`].

use std::path::Path;

use crate::pattern::{PathPattern, Pattern};
use spiffe::TrustDomain;

use crate::pattern::is_method_token;
use crate::policy::{
    Action, HttpRule, Located, Mode, Policy, Protocol, Rule, RuleRef, MAX_POLICY_BYTES,
};
use crate::yaml::{self, clip, Ctx, Node, Pos};
use crate::PolicyError;

const TOP_KEYS: &[&str] = &["name", "default", "mode", "trust_domains", "ports", "rules"];
const RULE_KEYS: &[&str] = &["name", "action", "from", "to", "ports", "http", "mode"];
const HTTP_KEYS: &[&str] = &["methods", "paths", "upgrades"];

impl Policy {
    /// Parses and validates a policy. `origin` names the file in error messages and gives the
    /// default policy name (its file stem).
    ///
    /// # Errors
    ///
    /// [`PolicyError::Syntax`] or [`PolicyError::Invalid`] with the line and column of the
    /// offending node, or [`PolicyError::TooLarge`] past [`MAX_POLICY_BYTES`].
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let ctx = Ctx { origin };
        let root = parse_root(text, ctx)?;
        let fields = ctx.fields(&root, "a policy", TOP_KEYS)?;

        let name = match fields.get("name") {
            Some(node) => checked_name(ctx, node, "policy name")?.to_owned(),
            None => Path::new(origin)
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|s| !s.is_empty())
                .unwrap_or("policy")
                .to_owned(),
        };
        let default = match fields.get("default") {
            Some(node) => action(ctx, node, "default")?,
            None => Action::Deny,
        };
        let mode = match fields.get("mode") {
            Some(node) => mode_of(ctx, node)?,
            None => Mode::Enforce,
        };
        let mut trust_domains: Vec<Located<String>> = Vec::new();
        if let Some(node) = fields.get("trust_domains") {
            for item in ctx.seq(node, "`trust_domains`")? {
                let s = ctx.str(item, "a trust domain name such as example.org")?;
                let td = parse_trust_domain(s).map_err(|m| ctx.invalid(item.pos, m))?;
                if trust_domains.iter().any(|t| t.value == td) {
                    return Err(ctx.invalid(
                        item.pos,
                        format!("trust domain `{td}` is listed twice: keep one"),
                    ));
                }
                trust_domains.push(Located {
                    value: td,
                    pos: item.pos,
                });
            }
        }
        let mut ports: Vec<(u16, Protocol, Pos)> = Vec::new();
        if let Some(node) = fields.get("ports") {
            let map = ctx.map(
                node,
                "`ports` as a mapping of port numbers to http or tcp (`8080: http`)",
            )?;
            for (key, value) in map.iter() {
                let port = ctx.port(key)?;
                let proto = match ctx.str(value, "`http` or `tcp`")? {
                    "http" => Protocol::Http,
                    "tcp" => Protocol::Tcp,
                    other => {
                        return Err(ctx.invalid(
                            value.pos,
                            format!("unknown protocol `{}`: write `http` or `tcp`", clip(other)),
                        ))
                    }
                };
                if ports.iter().any(|(p, _, _)| *p == port) {
                    return Err(
                        ctx.invalid(key.pos, format!("port {port} is declared twice: keep one"))
                    );
                }
                ports.push((port, proto, key.pos));
            }
        }
        let Some(rules_node) = fields.get("rules") else {
            return Err(ctx.invalid(
                root.pos,
                "missing `rules`: add `rules:` with a list of rules (`rules: []` for the default only)",
            ));
        };
        let mut rules: Vec<Rule> = Vec::new();
        for (index, node) in ctx.seq(rules_node, "`rules`")?.iter().enumerate() {
            let rule = parse_rule(ctx, node, index, mode, &ports)?;
            if let Some(first) = rules.iter().find(|r| r.rref.name == rule.rref.name) {
                let pos = ctx
                    .fields(node, "a rule", RULE_KEYS)?
                    .get("name")
                    .map_or(rule.pos, |n| n.pos);
                return Err(ctx.invalid(
                    pos,
                    format!(
                        "duplicate rule name `{}` (first used on line {}): give each rule a unique name",
                        rule.rref.name, first.rref.line
                    ),
                ));
            }
            rules.push(rule);
        }
        Ok(Policy {
            origin: origin.to_owned(),
            name,
            default,
            default_pos: fields.get("default").map(|n| n.pos),
            mode,
            trust_domains,
            ports,
            rules,
        })
    }

    /// Reads and parses a policy file; the path names it in messages.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Io`] if the file cannot be read, otherwise as [`Policy::parse`].
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let origin = path.display().to_string();
        let text = read_limited(path)?;
        Policy::parse(&text, &origin)
    }
}

/// Parses one YAML document within the size limit.
pub(crate) fn parse_root(text: &str, ctx: Ctx<'_>) -> Result<Node, PolicyError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge {
            origin: ctx.origin.to_owned(),
            limit: MAX_POLICY_BYTES,
        });
    }
    yaml::parse_document(text, ctx)
}

/// Reads a UTF-8 file of at most [`MAX_POLICY_BYTES`].
pub(crate) fn read_limited(path: &Path) -> Result<String, PolicyError> {
    use std::io::Read;
    let origin = path.display().to_string();
    let io = |source| PolicyError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge {
            origin,
            limit: MAX_POLICY_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        PolicyError::Syntax {
            origin,
            line,
            column,
            message: "the file is not UTF-8: save it as UTF-8".to_owned(),
        }
    })
}

fn checked_name<'n>(ctx: Ctx<'_>, node: &'n Node, what: &str) -> Result<&'n str, PolicyError> {
    let s = ctx.str(node, &format!("{what} (a string)"))?;
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(ctx.invalid(
            node.pos,
            format!("invalid {what} `{}`: use 1 to 128 letters, digits, `.`, `-` and `_` (it appears in metrics and logs)", clip(s)),
        ));
    }
    Ok(s)
}

fn action(ctx: Ctx<'_>, node: &Node, key: &str) -> Result<Action, PolicyError> {
    match ctx.str(node, "`allow` or `deny`")? {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(ctx.invalid(
            node.pos,
            format!("unknown {key} `{}`: write `allow` or `deny`", clip(other)),
        )),
    }
}

fn mode_of(ctx: Ctx<'_>, node: &Node) -> Result<Mode, PolicyError> {
    match ctx.str(node, "`enforce` or `audit`")? {
        "enforce" => Ok(Mode::Enforce),
        "audit" => Ok(Mode::Audit),
        other => Err(ctx.invalid(
            node.pos,
            format!("unknown mode `{}`: write `enforce` or `audit`", clip(other)),
        )),
    }
}

/// A trust domain name as written in `trust_domains` or on the command line, canonicalized.
pub(crate) fn parse_trust_domain(s: &str) -> Result<String, String> {
    if s.contains([':', '/']) {
        return Err(format!(
            "`{}` is not a trust domain name: write the name only, such as example.org",
            clip(s)
        ));
    }
    TrustDomain::new(s)
        .map(|td| td.as_str().to_owned())
        .map_err(|e| format!("invalid trust domain `{}`: {e}", clip(s)))
}

fn patterns(
    ctx: Ctx<'_>,
    node: &Node,
    key: &str,
    role: &str,
) -> Result<Vec<Located<Pattern>>, PolicyError> {
    let items = ctx.seq(node, &format!("`{key}`"))?;
    if items.is_empty() {
        return Err(ctx.invalid(
            node.pos,
            format!("`{key}` is empty: list at least one {role} pattern (spiffe://<trust-domain>/** matches every ID of a trust domain)"),
        ));
    }
    items
        .iter()
        .map(|item| {
            let s = ctx.str(item, "a SPIFFE ID pattern (a string)")?;
            s.parse::<Pattern>()
                .map(|value| Located {
                    value,
                    pos: item.pos,
                })
                .map_err(|e| ctx.invalid(item.pos, format!("invalid pattern `{}`: {e}", clip(s))))
        })
        .collect()
}

fn parse_rule(
    ctx: Ctx<'_>,
    node: &Node,
    index: usize,
    file_mode: Mode,
    declared: &[(u16, Protocol, Pos)],
) -> Result<Rule, PolicyError> {
    let fields = ctx.fields(node, "a rule", RULE_KEYS)?;
    let Some(name_node) = fields.get("name") else {
        return Err(ctx.invalid(node.pos, "a rule needs a `name`: add `name: <unique name>`"));
    };
    let name = checked_name(ctx, name_node, "rule name")?;
    let action = match fields.get("action") {
        Some(n) => action(ctx, n, "action")?,
        None => Action::Allow,
    };
    let mode = match fields.get("mode") {
        Some(n) => {
            let mode = mode_of(ctx, n)?;
            if mode == Mode::Audit && action == Action::Allow {
                return Err(ctx.invalid(
                    n.pos,
                    "`mode: audit` applies only to deny rules (an allow has nothing to audit): \
                     remove it, or set `mode: audit` at the top of the file to audit the whole policy",
                ));
            }
            mode
        }
        None => Mode::Enforce,
    };
    let Some(from) = fields.get("from") else {
        return Err(ctx.invalid(
            node.pos,
            format!("rule `{name}` needs `from`: list the caller patterns, such as [\"spiffe://example.org/ns/web/*\"]"),
        ));
    };
    let from = patterns(ctx, from, "from", "caller")?;
    let Some(to) = fields.get("to") else {
        return Err(ctx.invalid(
            node.pos,
            format!("rule `{name}` needs `to`: list the receiving workload patterns, such as [\"spiffe://example.org/ns/api/*\"]"),
        ));
    };
    let to = patterns(ctx, to, "to", "receiving workload")?;
    let http = match fields.entry("http") {
        None => None,
        Some((key, h)) => Some(parse_http(ctx, key.pos, h, action)?),
    };
    let ports = match fields.get("ports") {
        None => None,
        Some(n) => {
            let items = ctx.seq(n, "`ports`")?;
            if items.is_empty() {
                return Err(ctx.invalid(
                    n.pos,
                    "`ports` is empty: list at least one port, or remove `ports` to match every port",
                ));
            }
            let mut ports: Vec<Located<u16>> = Vec::with_capacity(items.len());
            for item in items {
                let port = ctx.port(item)?;
                if ports.iter().any(|p| p.value == port) {
                    return Err(
                        ctx.invalid(item.pos, format!("port {port} is listed twice: keep one"))
                    );
                }
                if http.is_some() {
                    if let Some((_, _, decl)) = declared
                        .iter()
                        .find(|(p, proto, _)| *p == port && *proto == Protocol::Tcp)
                    {
                        return Err(ctx.invalid(
                            item.pos,
                            format!(
                                "port {port} is declared tcp (line {}) but this rule has `http` \
                                 conditions, which opaque traffic never satisfies: remove the port \
                                 or the `http` conditions, or declare the port http",
                                decl.line
                            ),
                        ));
                    }
                }
                ports.push(Located {
                    value: port,
                    pos: item.pos,
                });
            }
            Some(ports)
        }
    };
    let pos = node.pos;
    Ok(Rule {
        rref: RuleRef {
            name: name.into(),
            index,
            line: pos.line,
        },
        pos,
        action,
        mode: if file_mode == Mode::Audit {
            Mode::Audit
        } else {
            mode
        },
        enforced: action == Action::Deny && mode == Mode::Enforce && file_mode == Mode::Enforce,
        from,
        to,
        ports,
        http,
    })
}

fn parse_http(
    ctx: Ctx<'_>,
    key_pos: Pos,
    node: &Node,
    action: Action,
) -> Result<HttpRule, PolicyError> {
    let fields = ctx.fields(node, "`http`", HTTP_KEYS)?;
    let methods = match fields.get("methods") {
        None => None,
        Some(n) => {
            let items = ctx.seq(n, "`methods`")?;
            if items.is_empty() {
                return Err(ctx.invalid(
                    n.pos,
                    "`methods` is empty: list at least one method, or remove `methods` to match every method",
                ));
            }
            let mut methods: Vec<Located<Box<str>>> = Vec::new();
            for item in items {
                let m = ctx.str(item, "an HTTP method such as GET")?;
                if !is_method_token(m) {
                    return Err(ctx.invalid(
                        item.pos,
                        format!("`{}` is not an HTTP method: write it in upper case, such as GET or POST", clip(m)),
                    ));
                }
                if methods.iter().any(|x| &*x.value == m) {
                    return Err(
                        ctx.invalid(item.pos, format!("method {m} is listed twice: keep one"))
                    );
                }
                methods.push(Located {
                    value: m.into(),
                    pos: item.pos,
                });
            }
            Some(methods)
        }
    };
    let paths = match fields.get("paths") {
        None => None,
        Some(n) => {
            let items = ctx.seq(n, "`paths`")?;
            if items.is_empty() {
                return Err(ctx.invalid(
                    n.pos,
                    "`paths` is empty: list at least one path pattern, or remove `paths` to match every path",
                ));
            }
            let paths = items
                .iter()
                .map(|item| {
                    let s = ctx.str(item, "a path pattern such as /v1/**")?;
                    s.parse::<PathPattern>()
                        .map(|value| Located {
                            value,
                            pos: item.pos,
                        })
                        .map_err(|e| {
                            ctx.invalid(
                                item.pos,
                                format!("invalid path pattern `{}`: {e}", clip(s)),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(paths)
        }
    };
    let upgrades = match fields.get("upgrades") {
        None => None,
        Some(n) if action == Action::Deny => {
            return Err(ctx.invalid(
                n.pos,
                "`upgrades` is for allow rules: a deny rule's methods and paths already refuse \
                 the matching upgrade requests; remove `upgrades`",
            ))
        }
        Some(n) => {
            let items = ctx.seq(n, "`upgrades`")?;
            if items.is_empty() {
                return Err(ctx.invalid(
                    n.pos,
                    "`upgrades` is empty: list the protocols (such as websocket), or remove `upgrades` to allow none",
                ));
            }
            let mut upgrades: Vec<Located<Box<str>>> = Vec::new();
            for item in items {
                let u = ctx.str(item, "an upgrade protocol such as websocket")?;
                if !is_upgrade_token(u) {
                    return Err(ctx.invalid(
                        item.pos,
                        format!(
                            "`{}` is not an upgrade protocol: write its lower-case name, such as websocket",
                            clip(u)
                        ),
                    ));
                }
                if u == "h2c" || u == "h2" {
                    return Err(ctx.invalid(
                        item.pos,
                        format!(
                            "`{u}` cannot be allowed: after an upgrade to HTTP/2 the proxy would see \
                             no more requests, so it never passes one (callers that offer h2c get \
                             HTTP/1.1); remove it"
                        ),
                    ));
                }
                if upgrades.iter().any(|x| &*x.value == u) {
                    return Err(
                        ctx.invalid(item.pos, format!("upgrade {u} is listed twice: keep one"))
                    );
                }
                upgrades.push(Located {
                    value: u.into(),
                    pos: item.pos,
                });
            }
            Some(upgrades)
        }
    };
    Ok(HttpRule {
        pos: key_pos,
        methods,
        paths,
        upgrades,
    })
}

/// An upgrade protocol name as policies write it: a lower-case token (RFC 9110 section 7.8
/// without the version), at most 32 bytes.
pub(crate) fn is_upgrade_token(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b'+')
        })
}
