//! Least-privilege rules from recorded traffic ([`Policy::suggest`]): the policy that
//! `meshid-proxy policy suggest` prints, allowing the traffic the access logs show was let
//! through, and nothing else the logs know of.
//!
//! # Which records count
//! Inbound records only: the proxy that received the traffic decided it, on the port its
//! listener serves, with the caller's verified ID. Outbound records are skipped: the caller's
//! proxy decides nothing (it writes `allow` for every connection it opens) and records the port
//! it dialed, which need not be the one the callee's policy sees. They are counted, and those
//! whose caller → callee pair has no inbound record are reported: the callee's log is missing.
//! Records of refused traffic (`deny`), of connections closed on revocation (`close`), without
//! a caller (plaintext let in by a permissive listener: no rule can name it), without a callee,
//! without a port (or with port 0), or with an ID that is not a SPIFFE ID are skipped and
//! counted by reason ([`Skip`]). `allow` and `audit_deny` records are used: both went through.
//!
//! # The rules
//! Default deny, enforce mode. For each receiving workload and port, each caller's recorded
//! traffic is split into *clauses*, and one rule per clause lists the callers that have it:
//! - no `http` conditions when the caller made opaque connections (or a request that `http`
//!   conditions cannot allow: a switch to `h2c`, a request record without method or path);
//! - otherwise `http` clauses that partition the recorded requests exactly: the paths are
//!   grouped by the methods and upgrades recorded on them, so that a rule allows
//!   `methods × paths` only where every combination was recorded. A path no pattern can write
//!   (ambiguous, or with a character patterns refuse) drops `paths` for that caller, a method
//!   that is not an upper-case token drops `methods`; comments say so.
//!
//! A caller's clauses do not overlap, so each recorded request is allowed by exactly one rule,
//! and removing any rule refuses some recorded request.
//!
//! # Widening
//! The callers of one rule that differ in one path segment only are replaced by one pattern
//! with `*` in that segment when (1) at least [`SuggestOptions::widen_min`] of them share it
//! and (2) every ID the logs mention that the pattern matches (as caller or callee, in any
//! record, refused traffic included) is a caller of the same rule. On what the logs know, the
//! pattern then allows exactly what the exact IDs would; it also admits IDs the logs never saw
//! (a new replica, a new namespace), so each widened pattern is announced by a `# widened:`
//! comment naming the IDs it stands for, and `widen_min: 0` keeps exact IDs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use spiffe::SpiffeId;

use crate::parse::is_upgrade_token;
use crate::pattern::{is_method_token, literal_path};
use crate::render::quoted;
use crate::{AccessRecord, Outcome, Policy, PolicyError};

/// Callers listed in a rule's comment before "and N more".
const LISTED_CALLERS: usize = 10;
/// Kinds of traffic listed per caller before "and N more".
const LISTED_ITEMS: usize = 8;
/// Characters of a value from the log (a path, a method, a timestamp) shown in a comment.
const COMMENT_CHARS: usize = 120;

/// How [`Policy::suggest`] writes its policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuggestOptions {
    /// The policy's `name` (1 to 128 letters, digits, `.`, `-` and `_`).
    pub name: String,
    /// The fewest callers one `*` pattern may stand for; 0 never widens, 1 counts as 2.
    pub widen_min: usize,
}

impl Default for SuggestOptions {
    fn default() -> Self {
        Self {
            name: "suggested".to_owned(),
            widen_min: 3,
        }
    }
}

/// Why [`Policy::suggest`] left a record out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Skip {
    /// Written by the caller's proxy (`outbound`): the callee's inbound record is the decision.
    Outbound,
    /// The traffic was refused (`deny`).
    Denied,
    /// A connection closed because the peer's certificate was revoked (`close`).
    Closed,
    /// No caller ID: plaintext let in by a permissive listener, which no rule can name.
    NoCaller,
    /// No callee ID.
    NoCallee,
    /// The caller or the callee is not a SPIFFE ID.
    InvalidId,
    /// No port, or port 0 (no rule can name it).
    NoPort,
    /// A `decision` or `direction` the proxy does not write.
    Unknown,
}

impl Skip {
    /// Why `suggest` leaves `record` out, or `None` when it uses it.
    pub fn of(record: &AccessRecord) -> Option<Skip> {
        classify(record).err()
    }

    /// A short name: `outbound`, `denied`, `closed`, `no_caller`, `no_callee`, `invalid_id`,
    /// `no_port`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Denied => "denied",
            Self::Closed => "closed",
            Self::NoCaller => "no_caller",
            Self::NoCallee => "no_callee",
            Self::InvalidId => "invalid_id",
            Self::NoPort => "no_port",
            Self::Unknown => "unknown",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Outbound => "outbound (the callee's inbound record decides)",
            Self::Denied => "denied",
            Self::Closed => "closed on revocation",
            Self::NoCaller => "without a caller (plaintext, no rule can name it)",
            Self::NoCallee => "without a callee",
            Self::InvalidId => "with a caller or callee that is not a SPIFFE ID",
            Self::NoPort => "without a port (or with port 0)",
            Self::Unknown => "with an unknown decision or direction",
        }
    }
}

/// A suggested policy and what went into it.
#[derive(Clone, Debug)]
pub struct Suggestion {
    /// The policy as YAML, with a comment per rule naming the traffic it covers.
    pub yaml: String,
    /// The same, parsed.
    pub policy: Policy,
    /// Records read.
    pub records: usize,
    /// Records used.
    pub used: usize,
    /// Records left out, by reason.
    pub skipped: BTreeMap<Skip, usize>,
    /// Outbound records (allowed, with a valid caller and callee) whose caller → callee pair
    /// has no inbound record: the callee's access log is missing.
    pub outbound_unmatched: usize,
    /// `*` patterns written in place of exact callers.
    pub widened: usize,
}

impl Suggestion {
    /// What was used and left out, one sentence a line (the YAML's header says the same).
    pub fn summary(&self) -> String {
        summary(self, self.policy.rule_count())
    }
}

/// The counts a summary reports.
struct Counts<'a> {
    records: usize,
    used: usize,
    skipped: &'a BTreeMap<Skip, usize>,
    outbound_unmatched: usize,
    widened: usize,
}

fn summary(s: &Suggestion, rules: usize) -> String {
    summary_of(
        &Counts {
            records: s.records,
            used: s.used,
            skipped: &s.skipped,
            outbound_unmatched: s.outbound_unmatched,
            widened: s.widened,
        },
        rules,
    )
}

fn summary_of(s: &Counts<'_>, rules: usize) -> String {
    let mut out = format!(
        "{} access record(s): {} used (inbound, allowed or audit_deny, with caller, callee and port)",
        s.records, s.used
    );
    if !s.skipped.is_empty() {
        let parts: Vec<String> = s
            .skipped
            .iter()
            .map(|(skip, n)| format!("{n} {}", skip.describe()))
            .collect();
        let _ = write!(out, "; skipped: {}", parts.join(", "));
    }
    out.push_str(".\n");
    if s.outbound_unmatched > 0 {
        let _ = writeln!(
            out,
            "{} outbound record(s) reach callees whose inbound records are not in these logs: \
             add those proxies' access logs to cover that traffic.",
            s.outbound_unmatched
        );
    }
    let _ = writeln!(
        out,
        "{rules} rule(s); {} widened `*` pattern(s){}.",
        s.widened,
        if s.widened > 0 {
            ", each marked `# widened:`"
        } else {
            ""
        }
    );
    out
}

/// A used record's identities.
struct Used {
    caller: SpiffeId,
    callee: SpiffeId,
    port: u16,
}

fn classify(r: &AccessRecord) -> Result<Used, Skip> {
    match r.direction.as_str() {
        "inbound" => {}
        "outbound" => return Err(Skip::Outbound),
        _ => return Err(Skip::Unknown),
    }
    match Outcome::from_name(&r.decision) {
        Some(Outcome::Allow | Outcome::AuditDeny) => {}
        Some(Outcome::Deny) => return Err(Skip::Denied),
        None if r.decision == "close" => return Err(Skip::Closed),
        None => return Err(Skip::Unknown),
    }
    let caller = r.caller.as_deref().ok_or(Skip::NoCaller)?;
    let callee = r.callee.as_deref().ok_or(Skip::NoCallee)?;
    let (Ok(caller), Ok(callee)) = (SpiffeId::new(caller), SpiffeId::new(callee)) else {
        return Err(Skip::InvalidId);
    };
    let port = r.port.filter(|&p| p != 0).ok_or(Skip::NoPort)?;
    Ok(Used {
        caller,
        callee,
        port,
    })
}

/// A receiving workload and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    callee: String,
    port: u16,
}

/// One kind of recorded traffic, as comments list it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    /// Opaque traffic, or a request record without method or path: replayed as a connection.
    Connection,
    Request {
        method: String,
        /// Without the query string.
        path: String,
        upgrade: Option<String>,
    },
}

impl Item {
    fn of(r: &AccessRecord) -> Item {
        match (&r.method, &r.path) {
            (Some(method), Some(path)) => Item::Request {
                method: method.clone(),
                path: path.split('?').next().unwrap_or_default().to_owned(),
                upgrade: r.upgrade.clone(),
            },
            _ => Item::Connection,
        }
    }

    fn text(&self) -> String {
        match self {
            Item::Connection => "connection".to_owned(),
            Item::Request {
                method,
                path,
                upgrade: None,
            } => format!("{} {}", clean(method), clean(path)),
            Item::Request {
                method,
                path,
                upgrade: Some(u),
            } => format!("{} {} (upgrade {})", clean(method), clean(path), clean(u)),
        }
    }
}

/// How often and when some traffic was recorded.
#[derive(Clone, Debug, Default)]
struct Seen {
    count: usize,
    first: String,
    last: String,
}

impl Seen {
    fn add(&mut self, timestamp: &str) {
        self.merge(&Seen {
            count: 1,
            first: timestamp.to_owned(),
            last: timestamp.to_owned(),
        });
    }

    /// Timestamps compare as strings: RFC 3339 in UTC, as the proxy writes them, sorts so.
    fn merge(&mut self, other: &Seen) {
        if self.count == 0 || other.first < self.first {
            self.first.clone_from(&other.first);
        }
        if self.count == 0 || other.last > self.last {
            self.last.clone_from(&other.last);
        }
        self.count += other.count;
    }
}

/// What one rule allows besides its callers, callee and port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Clause {
    /// No `http` conditions: any traffic.
    Opaque,
    /// `http` conditions; `None` leaves the key out.
    Http {
        methods: Option<BTreeSet<String>>,
        paths: Option<BTreeSet<String>>,
        upgrades: BTreeSet<String>,
    },
}

/// One caller's traffic to one target, split into clauses.
struct Access {
    clauses: BTreeMap<Clause, BTreeMap<Item, Seen>>,
    /// Why the clauses are wider than the requests (no `http`, no `methods`, no `paths`).
    notes: Vec<String>,
}

/// A request's path pattern and method as a rule names them; `None` where the rule leaves
/// `paths` or `methods` out.
type Key = (Option<String>, Option<String>);
/// Upgrade protocols, as `upgrades` names them.
type Upgrades = BTreeSet<String>;
/// The methods (`None`: any) and upgrades of one `http` clause.
type Shape = (Option<BTreeSet<String>>, Upgrades);

/// The upgrade as a rule names it, or `None` when no `upgrades` can.
fn nameable(upgrade: &str) -> Option<String> {
    let u = upgrade.to_ascii_lowercase();
    (is_upgrade_token(&u) && u != "h2c" && u != "h2").then_some(u)
}

fn access_of(items: BTreeMap<Item, Seen>) -> Access {
    let opaque = items.keys().find_map(|item| match item {
        Item::Connection => Some("opaque connections were recorded".to_owned()),
        Item::Request {
            upgrade: Some(u), ..
        } if nameable(u).is_none() => Some(format!(
            "a request switched to `{}`, which `upgrades` cannot name",
            clean(u)
        )),
        Item::Request { .. } => None,
    });
    if let Some(why) = opaque {
        return Access {
            clauses: BTreeMap::from([(Clause::Opaque, items)]),
            notes: vec![format!("no `http` conditions: {why}")],
        };
    }
    let requests = || {
        items.keys().filter_map(|item| match item {
            Item::Request {
                method,
                path,
                upgrade,
            } => Some((method, path, upgrade)),
            Item::Connection => None,
        })
    };
    let bad_method = requests()
        .find(|(m, _, _)| !is_method_token(m))
        .map(|r| r.0.clone());
    let bad_path = requests()
        .find(|(_, p, _)| literal_path(p).is_none())
        .map(|r| r.1.clone());
    let mut notes = Vec::new();
    if let Some(m) = &bad_method {
        notes.push(format!(
            "no `methods`: `{}` is not an upper-case method token, which `methods` cannot name",
            clean(m)
        ));
    }
    if let Some(p) = &bad_path {
        notes.push(format!(
            "no `paths`: no path pattern matches `{}` (ambiguous, or a character patterns refuse)",
            clean(p)
        ));
    }
    // Each request's (path pattern, method), `None` where the key is dropped, and the upgrades
    // recorded with each.
    let key = |method: &String, path: &String| -> Key {
        (
            bad_path
                .is_none()
                .then(|| literal_path(path).map(|p| p.as_str().to_owned()))
                .flatten(),
            bad_method.is_none().then(|| method.clone()),
        )
    };
    let mut upgrades: BTreeMap<Key, Upgrades> = BTreeMap::new();
    for (method, path, upgrade) in requests() {
        let set = upgrades.entry(key(method, path)).or_default();
        set.extend(upgrade.as_deref().and_then(nameable));
    }
    // On one path, the methods recorded with the same upgrades share a clause; clauses with
    // the same methods and upgrades take all their paths.
    let mut methods_on: BTreeMap<(&Option<String>, &Upgrades), BTreeSet<&Option<String>>> =
        BTreeMap::new();
    for ((path, method), ups) in &upgrades {
        methods_on.entry((path, ups)).or_default().insert(method);
    }
    let mut paths_of: BTreeMap<Shape, BTreeSet<String>> = BTreeMap::new();
    let mut shape_of: BTreeMap<Key, Shape> = BTreeMap::new();
    for ((path, ups), methods) in &methods_on {
        let shape: Shape = (
            methods.iter().map(|m| (*m).clone()).collect(),
            (*ups).clone(),
        );
        paths_of
            .entry(shape.clone())
            .or_default()
            .extend((*path).clone());
        for method in methods {
            shape_of.insert(((*path).clone(), (*method).clone()), shape.clone());
        }
    }
    let mut clauses: BTreeMap<Clause, BTreeMap<Item, Seen>> = BTreeMap::new();
    for (item, seen) in items {
        let Item::Request { method, path, .. } = &item else {
            continue;
        };
        let Some((methods, ups)) = shape_of.get(&key(method, path)) else {
            continue;
        };
        let clause = Clause::Http {
            methods: methods.clone(),
            paths: bad_path
                .is_none()
                .then(|| paths_of.get(&(methods.clone(), ups.clone())).cloned())
                .flatten(),
            upgrades: ups.clone(),
        };
        clauses.entry(clause).or_default().insert(item, seen);
    }
    Access { clauses, notes }
}

/// A canonical SPIFFE ID's trust domain and path segments.
fn parts(id: &str) -> (&str, Vec<&str>) {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    let mut it = rest.split('/');
    (it.next().unwrap_or_default(), it.collect())
}

/// The patterns with one `*` that match `id`: `*` in place of each path segment in turn.
fn star_patterns(id: &str) -> Vec<String> {
    let (td, segs) = parts(id);
    (0..segs.len())
        .map(|k| {
            let mut s = format!("spiffe://{td}");
            for (i, seg) in segs.iter().enumerate() {
                s.push('/');
                s.push_str(if i == k { "*" } else { seg });
            }
            s
        })
        .collect()
}

/// A rule's `from`: widened patterns with the callers each stands for, then exact callers.
struct Callers {
    widened: Vec<(String, Vec<String>)>,
    exact: Vec<String>,
}

/// Replaces callers by `*` patterns where safe (see the module documentation): largest groups
/// first, each taking at least `min` callers not taken yet. `known` counts the IDs the logs
/// mention under each of their [`star_patterns`].
fn widen(callers: &[&str], known: &HashMap<String, usize>, min: usize) -> Callers {
    let mut classes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    if min > 0 {
        for (i, caller) in callers.iter().enumerate() {
            for p in star_patterns(caller) {
                classes.entry(p).or_default().push(i);
            }
        }
    }
    let min = min.max(2);
    let mut candidates: Vec<(String, Vec<usize>)> = classes
        .into_iter()
        .filter(|(p, members)| members.len() >= min && known.get(p) == Some(&members.len()))
        .collect();
    // Most callers first; among equals, `*` further right (the replicas of one workload
    // usually differ in the last segment), then by text.
    let star_at = |p: &str| p.find('*').unwrap_or_default();
    candidates.sort_by(|a, b| {
        (b.1.len(), star_at(&b.0))
            .cmp(&(a.1.len(), star_at(&a.0)))
            .then_with(|| a.0.cmp(&b.0))
    });
    let mut covered = vec![false; callers.len()];
    let mut widened = Vec::new();
    for (pattern, members) in candidates {
        let fresh = members
            .iter()
            .filter(|&&i| !covered.get(i).copied().unwrap_or(true))
            .count();
        if fresh < min {
            continue;
        }
        let mut ids = Vec::with_capacity(members.len());
        for i in members {
            if let (Some(c), Some(id)) = (covered.get_mut(i), callers.get(i)) {
                *c = true;
                ids.push((*id).to_owned());
            }
        }
        widened.push((pattern, ids));
    }
    widened.sort();
    let exact = callers
        .iter()
        .zip(&covered)
        .filter(|(_, c)| !**c)
        .map(|(id, _)| (*id).to_owned())
        .collect();
    Callers { widened, exact }
}

/// A value from the log as a comment shows it: control characters escaped, clipped.
fn clean(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == COMMENT_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let items: Vec<String> = items.into_iter().map(|s| quoted(s)).collect();
    format!("[{}]", items.join(", "))
}

/// One caller's share of a rule.
struct Member<'a> {
    caller: &'a str,
    items: &'a BTreeMap<Item, Seen>,
    notes: &'a [String],
}

/// Writes one rule with its comments.
fn write_rule(
    out: &mut String,
    name: &str,
    target: &Target,
    clause: &Clause,
    members: &[Member<'_>],
    from: &Callers,
) {
    let mut total = Seen::default();
    for m in members {
        for seen in m.items.values() {
            total.merge(seen);
        }
    }
    let _ = writeln!(
        out,
        "  # covers {} record(s) from {} caller(s), {} .. {}:",
        total.count,
        members.len(),
        clean(&total.first),
        clean(&total.last)
    );
    for m in members.iter().take(LISTED_CALLERS) {
        let mut items: Vec<String> = m
            .items
            .iter()
            .take(LISTED_ITEMS)
            .map(|(item, seen)| format!("{} x{}", item.text(), seen.count))
            .collect();
        if m.items.len() > LISTED_ITEMS {
            items.push(format!("and {} more", m.items.len() - LISTED_ITEMS));
        }
        let _ = writeln!(
            out,
            "  #   {} -> {} port {}: {}",
            m.caller,
            target.callee,
            target.port,
            items.join(", ")
        );
    }
    if members.len() > LISTED_CALLERS {
        let _ = writeln!(
            out,
            "  #   and {} more caller(s)",
            members.len() - LISTED_CALLERS
        );
    }
    let notes: BTreeSet<&String> = members.iter().flat_map(|m| m.notes).collect();
    for note in notes {
        let _ = writeln!(out, "  # {note}");
    }
    for (pattern, ids) in &from.widened {
        let mut shown: Vec<&str> = ids
            .iter()
            .take(LISTED_CALLERS)
            .map(String::as_str)
            .collect();
        let more = format!("and {} more", ids.len().saturating_sub(LISTED_CALLERS));
        if ids.len() > LISTED_CALLERS {
            shown.push(&more);
        }
        let _ = writeln!(
            out,
            "  # widened: {pattern} stands for the {} callers {} (recorded with this same \
             access); no other ID in the logs matches it, but IDs the logs never saw will",
            ids.len(),
            shown.join(", ")
        );
    }
    let _ = writeln!(out, "  - name: {}", quoted(name));
    let from_list: Vec<&String> = from
        .widened
        .iter()
        .map(|(p, _)| p)
        .chain(&from.exact)
        .collect();
    let _ = writeln!(out, "    from: {}", list(from_list));
    let _ = writeln!(out, "    to: {}", list([&target.callee]));
    let _ = writeln!(out, "    ports: [{}]", target.port);
    if let Clause::Http {
        methods,
        paths,
        upgrades,
    } = clause
    {
        let mut parts = Vec::new();
        if let Some(m) = methods {
            parts.push(format!("methods: {}", list(m)));
        }
        if let Some(p) = paths {
            parts.push(format!("paths: {}", list(p)));
        }
        if !upgrades.is_empty() {
            parts.push(format!("upgrades: {}", list(upgrades)));
        }
        let _ = writeln!(out, "    http: {{{}}}", parts.join(", "));
    }
}

impl Policy {
    /// The least-privilege policy for the traffic `records` show was let through (see the
    /// module documentation of `suggest` for which records count, how rules are cut and when a
    /// caller is widened to a `*` pattern): default deny, a rule per receiving workload, port
    /// and clause of traffic, each preceded by comments naming the traffic it covers. Sorted,
    /// so the same records give the same text.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Invalid`] when `options.name` is not a valid policy name, and
    /// [`PolicyError::TooLarge`] when the suggestion is larger than [`crate::MAX_POLICY_BYTES`]
    /// (suggest from fewer access logs at a time).
    pub fn suggest(
        records: &[AccessRecord],
        options: &SuggestOptions,
    ) -> Result<Suggestion, PolicyError> {
        let mut known: BTreeSet<String> = BTreeSet::new();
        let mut traffic: BTreeMap<Target, BTreeMap<String, BTreeMap<Item, Seen>>> = BTreeMap::new();
        let mut skipped: BTreeMap<Skip, usize> = BTreeMap::new();
        let mut outbound: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut used = 0usize;
        for r in records {
            let ids: Vec<Option<SpiffeId>> = [&r.caller, &r.callee]
                .iter()
                .map(|s| s.as_deref().and_then(|s| SpiffeId::new(s).ok()))
                .collect();
            known.extend(ids.iter().flatten().map(ToString::to_string));
            match classify(r) {
                Ok(u) => {
                    used += 1;
                    traffic
                        .entry(Target {
                            callee: u.callee.to_string(),
                            port: u.port,
                        })
                        .or_default()
                        .entry(u.caller.to_string())
                        .or_default()
                        .entry(Item::of(r))
                        .or_default()
                        .add(&r.timestamp);
                }
                Err(skip) => {
                    *skipped.entry(skip).or_default() += 1;
                    if let (Skip::Outbound, "allow", [Some(caller), Some(callee)]) =
                        (skip, r.decision.as_str(), ids.as_slice())
                    {
                        *outbound
                            .entry((caller.to_string(), callee.to_string()))
                            .or_default() += 1;
                    }
                }
            }
        }
        let inbound: BTreeSet<(&str, &str)> = traffic
            .iter()
            .flat_map(|(t, callers)| callers.keys().map(|c| (c.as_str(), t.callee.as_str())))
            .collect();
        let outbound_unmatched = outbound
            .iter()
            .filter(|((caller, callee), _)| !inbound.contains(&(caller.as_str(), callee.as_str())))
            .map(|(_, n)| n)
            .sum();
        let mut star_counts: HashMap<String, usize> = HashMap::new();
        for id in &known {
            for p in star_patterns(id) {
                *star_counts.entry(p).or_default() += 1;
            }
        }

        // Per target and clause, the callers that have it.
        let mut accesses: BTreeMap<Target, Vec<(String, Access)>> = BTreeMap::new();
        for (target, callers) in traffic {
            let list = callers
                .into_iter()
                .map(|(caller, items)| (caller, access_of(items)))
                .collect();
            accesses.insert(target, list);
        }
        let mut rules_text = String::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut trust_domains: BTreeSet<&str> = BTreeSet::new();
        let mut widened = 0usize;
        for (target, callers) in &accesses {
            let mut by_clause: BTreeMap<&Clause, Vec<Member<'_>>> = BTreeMap::new();
            for (caller, access) in callers {
                trust_domains.insert(parts(caller).0);
                for (clause, items) in &access.clauses {
                    by_clause.entry(clause).or_default().push(Member {
                        caller,
                        items,
                        notes: &access.notes,
                    });
                }
            }
            trust_domains.insert(parts(&target.callee).0);
            let last = target.callee.rsplit('/').next().unwrap_or_default();
            let prefix = format!("{}-{}", last.get(..100).unwrap_or(last), target.port);
            for (clause, members) in by_clause {
                let ids: Vec<&str> = members.iter().map(|m| m.caller).collect();
                let from = widen(&ids, &star_counts, options.widen_min);
                widened += from.widened.len();
                let n = names.entry(prefix.clone()).or_default();
                *n += 1;
                let name = format!("{prefix}-{n}");
                write_rule(&mut rules_text, &name, target, clause, &members, &from);
            }
        }

        let counts = Counts {
            records: records.len(),
            used,
            skipped: &skipped,
            outbound_unmatched,
            widened,
        };
        let mut yaml = String::from("# Suggested from access logs by `policy suggest`.\n");
        for line in summary_of(&counts, names.values().sum()).lines() {
            let _ = writeln!(yaml, "# {line}");
        }
        yaml.push_str(
            "# Default deny: only the recorded traffic is allowed, and, where a rule says\n\
             # `widened`, the callers its pattern matches. Review before applying.\n",
        );
        let _ = writeln!(yaml, "name: {}", quoted(&options.name));
        yaml.push_str("default: deny\nmode: enforce\n");
        if !trust_domains.is_empty() {
            let tds: Vec<String> = trust_domains.iter().map(|t| quoted(t)).collect();
            let _ = writeln!(yaml, "trust_domains: [{}]", tds.join(", "));
        }
        if rules_text.is_empty() {
            yaml.push_str("rules: []\n");
        } else {
            yaml.push_str("rules:\n");
            yaml.push_str(&rules_text);
        }
        let policy = Policy::parse(&yaml, "suggestion")?;
        Ok(Suggestion {
            yaml,
            policy,
            records: records.len(),
            used,
            skipped,
            outbound_unmatched,
            widened,
        })
    }
}

#[cfg(test)]
mod tests;
