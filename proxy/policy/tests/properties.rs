//! Property tests: patterns against a naive reference matcher, decisions against a reference
//! model written from the language's rules, `explain` and `connection` against `decide`, the
//! parser against arbitrary input, and `suggest` against the traffic it was given.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshid_policy::{ConnectionVerdict, HttpRequest, Outcome, Pattern, Policy, Request, SpiffeId};
use proptest::prelude::*;

const TDS: &[&str] = &["e.org", "f.org"];
const SEGS: &[&str] = &["a", "b", "c"];

/// A pattern as parts: trust domain, segments (`*` or a literal), trailing `**`.
#[derive(Clone, Debug)]
struct Pat {
    td: &'static str,
    segs: Vec<&'static str>,
    rest: bool,
}

impl Pat {
    fn render(&self) -> String {
        let mut s = format!("spiffe://{}", self.td);
        for seg in &self.segs {
            s.push('/');
            s.push_str(seg);
        }
        if self.rest {
            s.push_str("/**");
        }
        s
    }

    /// Naive reference: recursive over slices.
    fn matches(&self, id: &Id) -> bool {
        fn go(pat: &[&str], rest: bool, id: &[&str]) -> bool {
            match (pat.split_first(), id.split_first()) {
                (None, _) => rest || id.is_empty(),
                (Some(_), None) => false,
                (Some((p, pt)), Some((i, it))) => (*p == "*" || p == i) && go(pt, rest, it),
            }
        }
        self.td == id.td && go(&self.segs, self.rest, &id.segs)
    }
}

#[derive(Clone, Debug)]
struct Id {
    td: &'static str,
    segs: Vec<&'static str>,
}

impl Id {
    fn spiffe(&self) -> SpiffeId {
        let mut s = format!("spiffe://{}", self.td);
        for seg in &self.segs {
            s.push('/');
            s.push_str(seg);
        }
        SpiffeId::new(s).unwrap()
    }
}

fn td() -> impl Strategy<Value = &'static str> {
    prop::sample::select(TDS)
}

fn pat() -> impl Strategy<Value = Pat> {
    let seg = prop::sample::select(&["a", "b", "c", "*"][..]);
    (td(), prop::collection::vec(seg, 0..4), any::<bool>()).prop_map(|(td, segs, rest)| Pat {
        td,
        segs,
        rest,
    })
}

fn id() -> impl Strategy<Value = Id> {
    (
        td(),
        prop::collection::vec(prop::sample::select(SEGS), 0..5),
    )
        .prop_map(|(td, segs)| Id { td, segs })
}

const PORTS: &[u16] = &[80, 443, 8080];
const METHODS: &[&str] = &["GET", "POST"];
const PATHS: &[&str] = &["/a/*", "/**", "/b", "/a/**", "/"];
const REQ_METHODS: &[&str] = &["GET", "POST", "DELETE", "get"];
const REQ_PATHS: &[&str] = &[
    "/a/b", "/b", "/b/", "/", "/a", "/c/d/e", "/a/../b", "//b", "/%62",
];

#[derive(Clone, Debug)]
struct Http {
    methods: Option<Vec<&'static str>>,
    paths: Option<Vec<&'static str>>,
}

#[derive(Clone, Debug)]
struct RuleSpec {
    deny: bool,
    audit: bool,
    from: Vec<Pat>,
    to: Vec<Pat>,
    ports: Option<Vec<u16>>,
    http: Option<Http>,
}

#[derive(Clone, Debug)]
struct PolicySpec {
    default_allow: bool,
    audit_file: bool,
    rules: Vec<RuleSpec>,
}

fn subset<T: Clone + std::fmt::Debug + 'static>(
    items: &'static [T],
) -> impl Strategy<Value = Vec<T>> {
    prop::sample::subsequence(items, 1..=items.len())
}

fn rule() -> impl Strategy<Value = RuleSpec> {
    let http = (
        prop::option::of(subset(METHODS)),
        prop::option::of(subset(PATHS)),
    )
        .prop_map(|(methods, paths)| Http { methods, paths });
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(pat(), 1..3),
        prop::collection::vec(pat(), 1..3),
        prop::option::of(subset(PORTS)),
        prop::option::of(http),
    )
        .prop_map(|(deny, audit, from, to, ports, http)| RuleSpec {
            deny,
            audit: deny && audit,
            from,
            to,
            ports,
            http,
        })
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    (
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::collection::vec(rule(), 0..7),
    )
        .prop_map(|(default_allow, audit_file, rules)| PolicySpec {
            default_allow,
            audit_file,
            rules,
        })
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

impl PolicySpec {
    fn render(&self) -> String {
        self.render_rules(0..self.rules.len())
    }

    /// The document holding only the rules in `range`, each named after its index in the
    /// whole spec.
    fn render_rules(&self, range: std::ops::Range<usize>) -> String {
        let rules = &self.rules[range.clone()];
        let mut s = format!(
            "default: {}\nmode: {}\nrules:{}\n",
            if self.default_allow { "allow" } else { "deny" },
            if self.audit_file { "audit" } else { "enforce" },
            if rules.is_empty() { " []" } else { "" }
        );
        for (i, r) in range.zip(rules) {
            s.push_str(&format!(
                "  - name: r{i}\n    action: {}\n",
                if r.deny { "deny" } else { "allow" }
            ));
            if r.audit {
                s.push_str("    mode: audit\n");
            }
            let from: Vec<String> = r.from.iter().map(Pat::render).collect();
            let to: Vec<String> = r.to.iter().map(Pat::render).collect();
            s.push_str(&format!(
                "    from: {}\n    to: {}\n",
                list(&from),
                list(&to)
            ));
            if let Some(ports) = &r.ports {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                s.push_str(&format!("    ports: [{}]\n", ports.join(", ")));
            }
            if let Some(h) = &r.http {
                s.push_str("    http: {");
                let mut parts = Vec::new();
                if let Some(m) = &h.methods {
                    parts.push(format!("methods: [{}]", m.join(", ")));
                }
                if let Some(p) = &h.paths {
                    parts.push(format!("paths: {}", list(p)));
                }
                s.push_str(&parts.join(", "));
                s.push_str("}\n");
            }
        }
        s
    }

    /// The decision, straight from the language's rules, with naive matching.
    fn reference(
        &self,
        from: &Id,
        to: &Id,
        port: Option<u16>,
        http: Option<(&str, &str)>,
    ) -> (Outcome, Option<usize>) {
        let ambiguous_path = |p: &str| p.contains("/../") || p.starts_with("//");
        let canonical = |p: &str| -> String {
            let p = if p == "/%62" { "/b" } else { p };
            p.trim_end_matches('/').to_owned()
        };
        let path_matches = |pattern: &str, path: &str| -> bool {
            let pat: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
            let path = canonical(path);
            let segs: Vec<&'static str> = path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    *SEGS
                        .iter()
                        .chain(["d", "e"].iter())
                        .find(|x| **x == s)
                        .unwrap()
                })
                .collect();
            let (rest, pat) = match pat.split_last() {
                Some((&"**", init)) => (true, init.to_vec()),
                _ => (false, pat),
            };
            let pat: Vec<&'static str> = pat
                .iter()
                .map(|s| *["a", "b", "*"].iter().find(|x| *x == s).unwrap())
                .collect();
            Pat {
                td: "e.org",
                segs: pat,
                rest,
            }
            .matches(&Id { td: "e.org", segs })
        };
        let matches = |r: &RuleSpec| -> bool {
            let unknown_ok = r.deny;
            r.from.iter().any(|p| p.matches(from))
                && r.to.iter().any(|p| p.matches(to))
                && match (&r.ports, port) {
                    (None, _) => true,
                    (Some(_), None) => unknown_ok,
                    (Some(ps), Some(p)) => ps.contains(&p),
                }
                && match (&r.http, http) {
                    (None, _) => true,
                    (Some(_), None) => unknown_ok,
                    (Some(h), Some((method, path))) => {
                        (match &h.methods {
                            None => true,
                            Some(_) if method == "get" => unknown_ok,
                            Some(ms) => ms.contains(&method),
                        }) && (match &h.paths {
                            None => true,
                            Some(_) if ambiguous_path(path) => unknown_ok,
                            Some(ps) => ps.iter().any(|p| path_matches(p, path)),
                        })
                    }
                }
        };
        let matched: Vec<usize> = (0..self.rules.len())
            .filter(|&i| matches(&self.rules[i]))
            .collect();
        let first_deny = matched.iter().copied().find(|&i| self.rules[i].deny);
        let first_enforced_deny = matched
            .iter()
            .copied()
            .find(|&i| self.rules[i].deny && !self.rules[i].audit && !self.audit_file);
        let first_allow = matched.iter().copied().find(|&i| !self.rules[i].deny);
        let default = if self.default_allow {
            Outcome::Allow
        } else {
            Outcome::Deny
        };
        let would_be = match (first_deny, first_allow) {
            (Some(d), _) => (Outcome::Deny, Some(d)),
            (None, Some(a)) => (Outcome::Allow, Some(a)),
            (None, None) => (default, None),
        };
        let enforced = if self.audit_file {
            (Outcome::Allow, would_be.1)
        } else {
            match (first_enforced_deny, first_allow) {
                (Some(d), _) => (Outcome::Deny, Some(d)),
                (None, Some(a)) => (Outcome::Allow, Some(a)),
                (None, None) => (default, None),
            }
        };
        match (enforced.0, would_be.0) {
            (Outcome::Deny, _) => enforced,
            (_, Outcome::Deny) => (Outcome::AuditDeny, would_be.1),
            _ => would_be,
        }
    }
}

fn request_http() -> impl Strategy<Value = Option<(&'static str, &'static str)>> {
    prop::option::of((
        prop::sample::select(REQ_METHODS),
        prop::sample::select(REQ_PATHS),
    ))
}

fn port() -> impl Strategy<Value = Option<u16>> {
    prop::option::of(prop::sample::select(&[80u16, 443, 8080, 9][..]))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn patterns_agree_with_the_reference(p in pat(), i in id()) {
        let pattern: Pattern = p.render().parse().unwrap();
        prop_assert_eq!(pattern.matches(&i.spiffe()), p.matches(&i), "{} vs {}", p.render(), i.spiffe());
    }

    #[test]
    fn star_never_matches_across_segments(i in id(), at in any::<prop::sample::Index>(), extra in prop::sample::select(SEGS)) {
        prop_assume!(!i.segs.is_empty());
        let k = at.index(i.segs.len());
        let mut segs = i.segs.clone();
        segs[k] = "*";
        let pattern: Pattern = Pat { td: i.td, segs, rest: false }.render().parse().unwrap();
        prop_assert!(pattern.matches(&i.spiffe()));
        // The same ID with one more segment where `*` stood: `*` must not take two.
        let mut longer = i.segs.clone();
        longer.insert(k, extra);
        let longer = Id { td: i.td, segs: longer }.spiffe();
        prop_assert!(!pattern.matches(&longer));
    }

    #[test]
    fn exact_segments_match_and_double_star_matches_descendants(i in id(), tail in prop::collection::vec(prop::sample::select(SEGS), 0..4)) {
        let exact: Pattern = Pat { td: i.td, segs: i.segs.clone(), rest: false }.render().parse().unwrap();
        prop_assert!(exact.matches(&i.spiffe()));
        prop_assert!(exact.is_exact());
        let all: Pattern = Pat { td: i.td, segs: i.segs.clone(), rest: true }.render().parse().unwrap();
        let mut segs = i.segs.clone();
        segs.extend(tail.iter().copied());
        let descendant = Id { td: i.td, segs };
        prop_assert!(all.matches(&descendant.spiffe()));
        prop_assert_eq!(exact.matches(&descendant.spiffe()), tail.is_empty());
    }

    #[test]
    fn display_reparses_to_an_equal_pattern(p in pat()) {
        let pattern: Pattern = p.render().parse().unwrap();
        let again: Pattern = pattern.to_string().parse().unwrap();
        prop_assert_eq!(&again, &pattern);
        prop_assert_eq!(again.to_string(), p.render());
    }

    #[test]
    fn covers_and_overlaps_are_sound(a in pat(), b in pat(), ids in prop::collection::vec(id(), 1..20)) {
        let (pa, pb): (Pattern, Pattern) = (a.render().parse().unwrap(), b.render().parse().unwrap());
        for i in &ids {
            if pa.covers(&pb) && b.matches(i) {
                prop_assert!(a.matches(i), "{} covers {} but not {:?}", a.render(), b.render(), i);
            }
            if a.matches(i) && b.matches(i) {
                prop_assert!(pa.overlaps(&pb));
            }
        }
    }

    #[test]
    fn decide_follows_the_rules_and_explain_agrees(
        spec in policy_spec(),
        reqs in prop::collection::vec((id(), id(), port(), request_http()), 1..12),
    ) {
        let text = spec.render();
        let policy = Policy::parse(&text, "prop.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        for (from, to, port, http) in &reqs {
            let (f, t) = (from.spiffe(), to.spiffe());
            let req = Request { from: &f, to: &t, port: *port, http: http.map(|(method, path)| HttpRequest { method, path, upgrade: None }) };
            let decision = policy.decide(&req);
            let explanation = policy.explain(&req);
            prop_assert_eq!(&explanation.decision, &decision, "{}", text);
            let expected = spec.reference(from, to, *port, *http);
            prop_assert_eq!((decision.outcome, decision.rule.as_ref().map(|r| r.index)), expected, "{}\n{:?}", text, req);
        }
    }

    #[test]
    fn documents_merged_decide_as_one_document(
        spec in policy_spec(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..3),
        reqs in prop::collection::vec((id(), id(), port(), request_http()), 1..12),
    ) {
        // The spec's rules split into consecutive documents (some maybe empty), merged: the
        // same decisions, by the same rules, as the whole spec in one document.
        let n = spec.rules.len();
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(n + 1)).collect();
        at.sort_unstable();
        let mut bounds = vec![0];
        bounds.extend(at);
        bounds.push(n);
        let parts: Vec<Policy> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let text = spec.render_rules(w[0]..w[1]);
                Policy::parse(&text, &format!("part{i}.yaml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
            })
            .collect();
        let merged = Policy::merge("mesh", &parts).unwrap();
        prop_assert_eq!(merged.rule_count(), n);
        for (from, to, port, http) in &reqs {
            let (f, t) = (from.spiffe(), to.spiffe());
            let req = Request { from: &f, to: &t, port: *port, http: http.map(|(method, path)| HttpRequest { method, path, upgrade: None }) };
            let decision = merged.decide(&req);
            let expected = spec.reference(from, to, *port, *http);
            prop_assert_eq!((decision.outcome, decision.rule.as_ref().map(|r| r.index)), expected, "{:?}", req);
            if let Some(r) = &decision.rule {
                prop_assert_eq!(&*r.name, format!("r{}", r.index));
            }
        }
    }

    #[test]
    fn a_policy_written_back_decides_the_same(
        spec in policy_spec(),
        reqs in prop::collection::vec((id(), id(), port(), request_http()), 1..12),
    ) {
        let text = spec.render();
        let policy = Policy::parse(&text, "prop.yaml").unwrap();
        let yaml = policy.to_yaml();
        let again = Policy::parse(&yaml, "again.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        prop_assert_eq!(again.to_yaml(), yaml.clone());
        for (from, to, port, http) in &reqs {
            let (f, t) = (from.spiffe(), to.spiffe());
            let req = Request { from: &f, to: &t, port: *port, http: http.map(|(method, path)| HttpRequest { method, path, upgrade: None }) };
            let (a, b) = (policy.decide(&req), again.decide(&req));
            prop_assert_eq!(a.outcome, b.outcome, "{}\n{:?}", yaml, req);
            prop_assert_eq!(a.rule.map(|r| (r.name, r.index)), b.rule.map(|r| (r.name, r.index)));
        }
    }

    #[test]
    fn a_policy_restricted_to_callees_decides_their_traffic_the_same(
        spec in policy_spec(),
        callees in prop::collection::vec(id(), 1..3),
        reqs in prop::collection::vec((id(), any::<prop::sample::Index>(), port(), request_http()), 1..12),
    ) {
        let policy = Policy::parse(&spec.render(), "prop.yaml").unwrap();
        let ids: Vec<_> = callees.iter().map(Id::spiffe).collect();
        let part = policy.restricted_to(&ids);
        // Only rules that can concern the callees are left...
        prop_assert!(part.rule_count() <= policy.rule_count());
        for (from, which, port, http) in &reqs {
            let (f, t) = (from.spiffe(), ids[which.index(ids.len())].clone());
            let req = Request { from: &f, to: &t, port: *port, http: http.map(|(method, path)| HttpRequest { method, path, upgrade: None }) };
            // ...and traffic to them is decided as by the whole policy, by the same rule.
            let (a, b) = (policy.decide(&req), part.decide(&req));
            prop_assert_eq!(a.outcome, b.outcome);
            prop_assert_eq!(a.rule.map(|r| r.name), b.rule.map(|r| r.name));
        }
        // A rule is kept exactly when one of its `to` patterns matches a callee.
        let kept = part.to_yaml();
        for (i, r) in spec.rules.iter().enumerate() {
            let concerns = r.to.iter().any(|p| callees.iter().any(|c| p.matches(c)));
            prop_assert_eq!(kept.contains(&format!("name: \"r{i}\"")), concerns, "{}", kept);
        }
    }

    #[test]
    fn a_decided_connection_decides_every_request(
        spec in policy_spec(),
        conns in prop::collection::vec((id(), id(), prop::sample::select(&[80u16, 443, 8080, 9][..])), 1..8),
    ) {
        let text = spec.render();
        let policy = Policy::parse(&text, "prop.yaml").unwrap();
        for (from, to, port) in &conns {
            let (f, t) = (from.spiffe(), to.spiffe());
            if let ConnectionVerdict::Decided(d) = policy.connection(&f, &t, *port) {
                let mut https: Vec<Option<HttpRequest<'_>>> = vec![None];
                for method in REQ_METHODS {
                    for path in REQ_PATHS {
                        https.push(Some(HttpRequest { method, path, upgrade: None }));
                    }
                }
                for http in https {
                    let req = Request { from: &f, to: &t, port: Some(*port), http };
                    prop_assert_eq!(&policy.decide(&req), &d, "{}\n{:?}", text, req);
                }
            }
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_strings(s in any::<String>()) {
        let _ = Policy::parse(&s, "fuzz.yaml");
        let _ = meshid_policy::parse_cases(&s, "fuzz.yaml");
        let _ = s.parse::<Pattern>();
    }

    #[test]
    fn parse_never_panics_on_yaml_like_input(s in "[\\[\\]{}:,\\- \n#&*!|>'\"a-z0-9/.]{0,300}") {
        let _ = Policy::parse(&s, "fuzz.yaml");
    }

    #[test]
    fn parse_never_panics_on_mutated_policies(spec in policy_spec(), cut in any::<prop::sample::Index>(), junk in "[\\[\\]{}:,\\- \n#*'\"a-z]{0,8}") {
        let text = spec.render();
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) { at -= 1; }
        let mutated = format!("{}{}{}", &text[..at], junk, &text[at..]);
        if let Ok(p) = Policy::parse(&mutated, "m.yaml") {
            let _ = p.check();
        }
    }
}

// `Policy::suggest`: generated traffic, recorded as the proxy records it, then replayed.

const UPGRADES: &[Option<&str>] = &[
    None,
    None,
    Some("websocket"),
    Some("WebSocket"),
    Some("h2c"),
];

/// Callers that differ in one segment (so that widening has something to do), or one.
fn callers() -> impl Strategy<Value = Vec<Id>> {
    (id(), any::<prop::sample::Index>(), subset(SEGS)).prop_map(|(base, at, segs)| {
        if base.segs.is_empty() {
            return vec![base];
        }
        let k = at.index(base.segs.len());
        segs.iter()
            .map(|s| {
                let mut id = base.clone();
                id.segs[k] = s;
                id
            })
            .collect()
    })
}

/// What one record says besides who called whom.
#[derive(Clone, Debug)]
struct Shape {
    http: Option<(&'static str, &'static str, Option<&'static str>)>,
    decision: &'static str,
    outbound: bool,
    /// 0: as generated; 1: no caller; 2: a caller that is not a SPIFFE ID; 3: no port.
    damage: u8,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop::option::weighted(
            0.8,
            (
                prop::sample::select(REQ_METHODS),
                prop::sample::select(REQ_PATHS),
                prop::sample::select(UPGRADES),
            ),
        ),
        prop::sample::select(&["allow", "allow", "allow", "audit_deny", "deny", "close"][..]),
        prop::bool::weighted(0.1),
        prop::sample::select(&[0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3][..]),
    )
        .prop_map(|(http, decision, outbound, damage)| Shape {
            http,
            decision,
            outbound,
            damage,
        })
}

/// Traffic as flows (callers, callee, port, the shapes each caller sent), recorded.
fn traffic() -> impl Strategy<Value = Vec<meshid_policy::AccessRecord>> {
    let flow = (
        callers(),
        id(),
        prop::sample::select(PORTS),
        prop::collection::vec(shape(), 1..4),
    );
    prop::collection::vec(flow, 1..6).prop_map(|flows| {
        let mut records = Vec::new();
        for (callers, callee, port, shapes) in flows {
            for caller in &callers {
                for s in &shapes {
                    let n = records.len();
                    records.push(meshid_policy::AccessRecord {
                        timestamp: format!("2025-01-01T00:00:{:02}Z", n % 60),
                        kind: if s.http.is_some() {
                            "request"
                        } else {
                            "connection"
                        }
                        .to_owned(),
                        direction: if s.outbound { "outbound" } else { "inbound" }.to_owned(),
                        caller: match s.damage {
                            1 => None,
                            2 => Some("spiffe://e.org/a//b".to_owned()),
                            _ => Some(caller.spiffe().to_string()),
                        },
                        callee: Some(callee.spiffe().to_string()),
                        port: (s.damage != 3).then_some(port),
                        method: s.http.map(|h| h.0.to_owned()),
                        path: s.http.map(|h| h.1.to_owned()),
                        upgrade: s.http.and_then(|h| h.2).map(str::to_owned),
                        decision: s.decision.to_owned(),
                        ..meshid_policy::AccessRecord::default()
                    });
                }
            }
        }
        records
    })
}

fn widen_options() -> impl Strategy<Value = meshid_policy::SuggestOptions> {
    prop::sample::select(&[0usize, 2, 3][..]).prop_map(|widen_min| meshid_policy::SuggestOptions {
        widen_min,
        ..meshid_policy::SuggestOptions::default()
    })
}

/// The decision for a recorded request replayed under `policy`.
fn replay(policy: &Policy, r: &meshid_policy::AccessRecord) -> Outcome {
    r.replay(policy).unwrap().outcome
}

/// The suggestion's text without its `index`th rule (comments left in place).
fn without_rule(yaml: &str, index: usize) -> String {
    let mut out = Vec::new();
    let mut seen = 0usize;
    let mut skipping = false;
    for line in yaml.lines() {
        if line.starts_with("  - name: ") {
            skipping = seen == index;
            seen += 1;
        } else if !line.starts_with("    ") {
            skipping = false;
        }
        if !skipping {
            out.push(line);
        }
    }
    let mut text = out.join("\n");
    if !text.contains("\n  - name: ") {
        text = text.replace("\nrules:\n", "\nrules: []\n");
    }
    text.push('\n');
    text
}

/// Recorded traffic that went through, as the test reads a record: inbound, `allow` or
/// `audit_deny`, with a caller and callee that are SPIFFE IDs and a port.
fn went_through(r: &meshid_policy::AccessRecord) -> bool {
    let id = |s: &Option<String>| s.as_deref().is_some_and(|s| SpiffeId::new(s).is_ok());
    r.direction == "inbound"
        && (r.decision == "allow" || r.decision == "audit_deny")
        && id(&r.caller)
        && id(&r.callee)
        && r.port.is_some()
}

/// A recorded request's method and path, `None` for a connection.
fn request(r: &meshid_policy::AccessRecord) -> Option<(&str, &str)> {
    r.method.as_deref().zip(r.path.as_deref())
}

/// A request path's key as path patterns see it (`None`: ambiguous, no pattern matches it).
fn path_key(path: &str) -> Option<&'static str> {
    match path {
        "/b" | "/b/" | "/%62" => Some("b"),
        "/a/b" => Some("a/b"),
        "/" => Some(""),
        "/a" => Some("a"),
        "/c/d/e" => Some("c/d/e"),
        "/zzz" => Some("zzz"),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// The acceptance test of `policy suggest`: replaying the recorded allowed traffic under
    /// the suggestion gives zero denials, and without any one of its rules at least one
    /// recorded request is denied. The text parses back, and `check` finds nothing wrong.
    #[test]
    fn a_suggestion_allows_the_recorded_traffic_and_needs_every_rule(records in traffic(), options in widen_options()) {
        let s = Policy::suggest(&records, &options).unwrap();
        let again = Policy::parse(&s.yaml, "again.yaml").unwrap();
        prop_assert_eq!(again.rule_count(), s.policy.rule_count());
        let warnings: Vec<_> = s.policy.check().into_iter().filter(|f| f.severity == meshid_policy::Severity::Warning).collect();
        prop_assert!(warnings.is_empty(), "{:?}\n{}", warnings, s.yaml);
        let used: Vec<&meshid_policy::AccessRecord> = records.iter().filter(|r| went_through(r)).collect();
        for r in &records {
            prop_assert_eq!(meshid_policy::Skip::of(r).is_none(), went_through(r), "{:?}", r);
        }
        prop_assert_eq!(used.len(), s.used);
        prop_assert_eq!(s.used + s.skipped.values().sum::<usize>(), records.len());
        for r in &used {
            prop_assert!(replay(&again, r).allowed(), "{:?} denied under\n{}", r, s.yaml);
        }
        for i in 0..s.policy.rule_count() {
            let text = without_rule(&s.yaml, i);
            let less = Policy::parse(&text, "less.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"));
            prop_assert_eq!(less.rule_count() + 1, s.policy.rule_count());
            prop_assert!(
                used.iter().any(|r| !replay(&less, r).allowed()),
                "rule {} is not needed:\n{}", i, s.yaml
            );
        }
    }

    /// Least privilege on what the logs know: for every caller and callee the logs mention,
    /// on every port, a request is allowed exactly when the same caller was recorded sending
    /// that callee and port a request with the same method, path (as patterns read it) and
    /// upgrade, or opaque traffic; a path, method or upgrade the `http` conditions cannot
    /// name drops that condition for the pair. `*` patterns therefore never reach another
    /// known ID.
    #[test]
    fn a_suggestion_allows_nothing_else_the_logs_know_of(records in traffic(), options in widen_options()) {
        let s = Policy::suggest(&records, &options).unwrap();
        let mut known: Vec<String> = records
            .iter()
            .flat_map(|r| [r.caller.clone(), r.callee.clone()])
            .flatten()
            .filter(|id| SpiffeId::new(id).is_ok())
            .collect();
        known.sort();
        known.dedup();
        let mut pairs: std::collections::HashMap<(&str, &str, u16), Vec<&meshid_policy::AccessRecord>> = std::collections::HashMap::new();
        for r in records.iter().filter(|r| went_through(r)) {
            pairs.entry((r.caller.as_deref().unwrap(), r.callee.as_deref().unwrap(), r.port.unwrap())).or_default().push(r);
        }
        let mut probes: Vec<Option<(&str, &str, Option<&str>)>> = vec![None, Some(("PATCH", "/b", None)), Some(("GET", "/zzz", None))];
        for method in ["GET", "POST", "get"] {
            for path in ["/b", "/a/b", "//b"] {
                for upgrade in [None, Some("websocket")] {
                    probes.push(Some((method, path, upgrade)));
                }
            }
        }
        for from in &known {
            for to in &known {
                for port in PORTS {
                    let recorded = pairs.get(&(from.as_str(), to.as_str(), *port)).map_or(&[][..], Vec::as_slice);
                    let opaque = recorded.iter().any(|r| request(r).is_none() || r.upgrade.as_deref().is_some_and(|u| u.eq_ignore_ascii_case("h2c")));
                    let any_method = recorded.iter().any(|r| r.method.as_deref() == Some("get"));
                    let any_path = recorded.iter().any(|r| r.path.as_deref().is_some_and(|p| path_key(p).is_none()));
                    let (f, t) = (SpiffeId::new(from).unwrap(), SpiffeId::new(to).unwrap());
                    for probe in &probes {
                        let expected = !recorded.is_empty() && (opaque || probe.is_some_and(|(m, p, u)| recorded.iter().any(|r| {
                            let Some((rm, rp)) = request(r) else { return false };
                            (any_method || rm == m)
                                && (any_path || path_key(rp) == path_key(p))
                                && (u.is_none() || r.upgrade.as_deref().is_some_and(|ru| ru.eq_ignore_ascii_case(u.unwrap_or_default())))
                        })));
                        let req = Request { from: &f, to: &t, port: Some(*port), http: probe.map(|(method, path, upgrade)| HttpRequest { method, path, upgrade }) };
                        let got = s.policy.decide(&req).outcome.allowed();
                        prop_assert_eq!(got, expected, "{:?}\nrecorded: {:?}\n{}", req, recorded, s.yaml);
                    }
                }
            }
        }
    }
}
