//! What the console shows that no single query answers: each entry's latest X509-SVID, the
//! renewals and fetches of the last day, and the recent audit records, kept in memory and fed
//! from the audit log (every issuance is recorded there, [`crate::service`]).
//!
//! [`View::apply`] takes records in seq order; the follower in [`super`] reads them from the
//! datastore. Pure: no I/O, no clock (times come from the records and the caller).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

/// Hours of history kept for the compliance page.
pub const WINDOW_HOURS: i64 = 24;
/// The share of an SVID's life by which a renewal counts as on time.
pub const ON_TIME_SHARE: f64 = 0.75;
/// Recent audit records kept for the activity page.
pub const RECENT: usize = 500;
/// Distinct (caller, callee, rule) denials kept; past it the one seen longest ago goes.
pub const MAX_DENIALS: usize = 10_000;

/// The latest X509-SVID of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Latest {
    /// Its serial (hex).
    pub serial: String,
    /// When it was issued (the audit record's time).
    pub issued_at: i64,
    /// When it expires.
    pub not_after: i64,
    /// The CA journal id of the key that signed it.
    pub issuer: String,
    /// The agent it was issued to.
    #[serde(skip)]
    pub agent: Arc<str>,
}

/// One audit record as the activity page shows it: never the record's details as stored, only
/// the fields [`summary`] picks (no key, token or CSR is ever in them; see its doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Activity {
    /// The record's sequence number.
    pub seq: i64,
    /// Unix seconds.
    pub time: i64,
    /// e.g. `svid.revoked`.
    pub kind: String,
    /// Who.
    pub actor: String,
    /// What, in a line.
    pub summary: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct Hour {
    /// The absolute hour (unix seconds / 3600).
    hour: i64,
    issued: u64,
    renewals: u64,
    on_time: u64,
}

/// The SVID an (entry, agent) last got.
#[derive(Debug, Clone)]
struct Holding {
    issued_at: i64,
    not_after: i64,
    service: Arc<str>,
}

/// Per SPIFFE ID: hourly buckets, a ring indexed by hour modulo the window.
#[derive(Debug, Default)]
struct Service {
    hours: [Hour; WINDOW_HOURS as usize],
}

impl Service {
    fn bucket(&mut self, time: i64) -> &mut Hour {
        let hour = time.div_euclid(3600);
        let slot = &mut self.hours[hour.rem_euclid(WINDOW_HOURS) as usize];
        if slot.hour != hour {
            *slot = Hour {
                hour,
                ..Hour::default()
            };
        }
        slot
    }

    /// Sums over the window ending at `now`: (issued, renewals, on time, issued per hour,
    /// oldest first).
    fn totals(&self, now: i64) -> (u64, u64, u64, Vec<u64>) {
        let current = now.div_euclid(3600);
        let mut per_hour = vec![0; WINDOW_HOURS as usize];
        let (mut issued, mut renewals, mut on_time) = (0, 0, 0);
        for h in &self.hours {
            let age = current - h.hour;
            if (0..WINDOW_HOURS).contains(&age) {
                issued += h.issued;
                renewals += h.renewals;
                on_time += h.on_time;
                per_hour[(WINDOW_HOURS - 1 - age) as usize] += h.issued;
            }
        }
        (issued, renewals, on_time, per_hour)
    }
}

/// Refusals of one (caller, callee, rule), as the proxies reported them through their agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denial {
    /// The caller's SPIFFE ID (empty: a handshake that failed before one was verified).
    pub caller: String,
    /// The workload that refused.
    pub callee: String,
    /// The rule, `<default>`, or `handshake:<reason>`.
    pub rule: String,
    /// How many over the window.
    pub count: u64,
    /// Unix seconds of the last.
    pub last_at: i64,
}

/// A service's rotation compliance over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Compliance {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Renewals seen (an entry's SVID re-issued to the same agent).
    pub renewals: u64,
    /// Those made before [`ON_TIME_SHARE`] of the previous SVID's life.
    pub on_time: u64,
    /// SVIDs that expired within the window with no successor: the holder went without one
    /// (its agent away, or the CA unreachable for longer than the SVID's life).
    pub lapsed: u64,
    /// `on_time / (renewals + lapsed)`: the share of the SVIDs due for renewal that were
    /// renewed in time.
    pub share: f64,
}

/// A service's issuances over the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fetcher {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// X509-SVIDs issued.
    pub issued: u64,
    /// Issued per hour, oldest first.
    pub hours: Vec<u64>,
}

/// The console's in-memory view of the audit log.
#[derive(Debug, Default)]
pub struct View {
    /// The last record applied.
    pub seq: i64,
    latest: HashMap<String, Latest>,
    rotated: HashMap<String, i64>,
    /// The SVID each (entry, agent) last got: (issued at, not after).
    holders: HashMap<(String, Arc<str>), Holding>,
    services: HashMap<Arc<str>, Service>,
    agents: HashMap<Arc<str>, Arc<str>>,
    recent: VecDeque<Activity>,
    denials: HashMap<(String, String, String), (u64, i64)>,
}

fn field<'a>(details: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    details.get(name).and_then(serde_json::Value::as_str)
}

impl View {
    /// Applies one audit record (`details` is its parsed JSON); records must come in seq order.
    pub fn apply(
        &mut self,
        seq: i64,
        time: i64,
        kind: &str,
        actor: &str,
        details: &serde_json::Value,
    ) {
        self.seq = self.seq.max(seq);
        self.index(time, kind, actor, details);
        self.remember(seq, time, kind, actor, details);
    }

    /// Takes what an issuance, rotation or deletion record tells about entries and services.
    pub fn index(&mut self, time: i64, kind: &str, actor: &str, details: &serde_json::Value) {
        match kind {
            "svid.x509.issued" => self.issued(time, actor, details),
            "entry.rotated" => {
                if let Some(entry) = field(details, "entry_id") {
                    self.rotated.insert(entry.to_owned(), time);
                }
            }
            "entry.deleted" => {
                if let Some(entry) = field(details, "entry_id") {
                    self.latest.remove(entry);
                    self.rotated.remove(entry);
                    self.holders.retain(|(e, _), _| e != entry);
                }
            }
            "denials.reported" => self.denied(time, details),
            _ => {}
        }
    }

    fn denied(&mut self, time: i64, details: &serde_json::Value) {
        let Some(list) = details.get("denials").and_then(serde_json::Value::as_array) else {
            return;
        };
        for d in list {
            let text = |n: &str| field(d, n).unwrap_or_default().to_owned();
            let count = d
                .get("count")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            let at = d
                .get("last_at")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(time);
            let key = (text("caller"), text("callee"), text("rule"));
            if !self.denials.contains_key(&key) && self.denials.len() >= MAX_DENIALS {
                // Full: the tenth seen longest ago goes, at once (not one scan per newcomer).
                let mut ats: Vec<i64> = self.denials.values().map(|(_, at)| *at).collect();
                let (_, cut_at, _) = ats.select_nth_unstable(MAX_DENIALS / 10);
                let cut_at = *cut_at;
                self.denials.retain(|_, (_, at)| *at > cut_at);
            }
            let slot = self.denials.entry(key).or_insert((0, at));
            slot.0 = slot.0.saturating_add(count);
            slot.1 = slot.1.max(at);
        }
    }

    /// The denials reported over the window ending at `now`, the most recent first.
    pub fn denials(&mut self, now: i64, limit: usize) -> Vec<Denial> {
        let since = now - WINDOW_HOURS * 3600;
        self.denials.retain(|_, (_, at)| *at >= since);
        let mut out: Vec<Denial> = self
            .denials
            .iter()
            .map(|((caller, callee, rule), (count, last_at))| Denial {
                caller: caller.clone(),
                callee: callee.clone(),
                rule: rule.clone(),
                count: *count,
                last_at: *last_at,
            })
            .collect();
        out.sort_by(|a, b| b.last_at.cmp(&a.last_at).then(b.count.cmp(&a.count)));
        out.truncate(limit);
        out
    }

    /// Keeps a record among the recent ones (summarized; see [`summary`]).
    pub fn remember(
        &mut self,
        seq: i64,
        time: i64,
        kind: &str,
        actor: &str,
        details: &serde_json::Value,
    ) {
        self.recent.push_back(Activity {
            seq,
            time,
            kind: kind.to_owned(),
            actor: actor.to_owned(),
            summary: summary(kind, details),
        });
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.agents.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.agents.insert(Arc::clone(&a), Arc::clone(&a));
        a
    }

    fn issued(&mut self, time: i64, actor: &str, details: &serde_json::Value) {
        let (Some(entry), Some(spiffe_id)) =
            (field(details, "entry_id"), field(details, "spiffe_id"))
        else {
            return;
        };
        let not_after = details
            .get("not_after")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let agent = self.intern(actor);
        let service = self.intern(spiffe_id);
        let holding = Holding {
            issued_at: time,
            not_after,
            service: Arc::clone(&service),
        };
        let previous = self
            .holders
            .insert((entry.to_owned(), Arc::clone(&agent)), holding);
        let bucket = self.services.entry(service).or_default().bucket(time);
        bucket.issued += 1;
        if let Some(Holding {
            issued_at,
            not_after: expires,
            ..
        }) = previous
        {
            bucket.renewals += 1;
            let life = (expires - issued_at).max(1) as f64;
            if ((time - issued_at) as f64) <= ON_TIME_SHARE * life {
                bucket.on_time += 1;
            }
        }
        self.latest.insert(
            entry.to_owned(),
            Latest {
                serial: field(details, "serial").unwrap_or_default().to_owned(),
                issued_at: time,
                not_after,
                issuer: field(details, "issuer").unwrap_or_default().to_owned(),
                agent,
            },
        );
    }

    /// The latest X509-SVID issued for an entry.
    pub fn latest(&self, entry_id: &str) -> Option<&Latest> {
        self.latest.get(entry_id)
    }

    /// When an entry was last rotated (`meshid-ca entry rotate`).
    pub fn rotated(&self, entry_id: &str) -> Option<i64> {
        self.rotated.get(entry_id).copied()
    }

    /// Unexpired latest SVIDs per agent at `now`.
    pub fn svids_per_agent(&self, now: i64) -> HashMap<Arc<str>, u64> {
        let mut out = HashMap::new();
        for l in self.latest.values().filter(|l| l.not_after > now) {
            *out.entry(Arc::clone(&l.agent)).or_insert(0) += 1;
        }
        out
    }

    /// Rotation compliance per service over the window ending at `now`, worst share first.
    pub fn compliance(&self, now: i64) -> Vec<Compliance> {
        let since = now - WINDOW_HOURS * 3600;
        let mut lapsed: HashMap<&Arc<str>, u64> = HashMap::new();
        for h in self.holders.values() {
            if h.not_after > since && h.not_after <= now {
                *lapsed.entry(&h.service).or_insert(0) += 1;
            }
        }
        let mut out: Vec<Compliance> = self
            .services
            .iter()
            .filter_map(|(id, s)| {
                let (_, renewals, on_time, _) = s.totals(now);
                let lapsed = lapsed.get(id).copied().unwrap_or(0);
                let due = renewals + lapsed;
                (due > 0).then(|| Compliance {
                    spiffe_id: id.to_string(),
                    renewals,
                    on_time,
                    lapsed,
                    share: on_time as f64 / due as f64,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            a.share
                .total_cmp(&b.share)
                .then(a.spiffe_id.cmp(&b.spiffe_id))
        });
        out
    }

    /// Forgets what no query over the window ending at `now` can show any more: holders whose
    /// SVID expired before the window, services with nothing in it, and interned names nothing
    /// refers to (entries come and go over a process's life).
    pub fn prune(&mut self, now: i64) {
        let since = now - WINDOW_HOURS * 3600;
        self.holders.retain(|_, h| h.not_after > since);
        self.services.retain(|id, s| {
            let (issued, ..) = s.totals(now);
            issued > 0 || self.holders.values().any(|h| &h.service == id)
        });
        let mut used: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for ((_, agent), h) in &self.holders {
            used.insert(agent);
            used.insert(&h.service);
        }
        for l in self.latest.values() {
            used.insert(&l.agent);
        }
        for id in self.services.keys() {
            used.insert(id);
        }
        let keep: std::collections::HashSet<String> = used.into_iter().map(str::to_owned).collect();
        self.agents.retain(|k, _| keep.contains(&**k));
    }

    /// The `limit` services issued the most X509-SVIDs over the window ending at `now`.
    pub fn top_fetchers(&self, now: i64, limit: usize) -> Vec<Fetcher> {
        let mut out: Vec<Fetcher> = self
            .services
            .iter()
            .filter_map(|(id, s)| {
                let (issued, _, _, hours) = s.totals(now);
                (issued > 0).then(|| Fetcher {
                    spiffe_id: id.to_string(),
                    issued,
                    hours,
                })
            })
            .collect();
        out.sort_by(|a, b| b.issued.cmp(&a.issued).then(a.spiffe_id.cmp(&b.spiffe_id)));
        out.truncate(limit);
        out
    }

    /// The most recent audit records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Activity> {
        self.recent.iter().rev().take(limit).cloned().collect()
    }
}

/// One line about an audit record, from an allowlist of its fields: SPIFFE IDs, entry ids,
/// serials, key ids, reasons, revisions, names and counts, also inside a revocation's `target`
/// and its list of `certificates` (counted, with the first serials and SPIFFE IDs). Never
/// anything else: the details of some records hold material the console must not show (token
/// ids, CSR digests, paths).
pub fn summary(kind: &str, d: &serde_json::Value) -> String {
    const FIELDS: &[&str] = &[
        "spiffe_id",
        "entry_id",
        "serial",
        "key_id",
        "kind",
        "reason",
        "revision",
        "subject",
        "trust_domain",
        "parent_id",
        "issued",
        "replaced",
        "total",
        "token_by",
    ];
    /// Bounded, single-line: an audit record's reason is operator text.
    fn clean(v: &serde_json::Value) -> Option<String> {
        let text = match v {
            serde_json::Value::String(s) if !s.is_empty() => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        Some(text.chars().filter(|c| !c.is_control()).take(200).collect())
    }
    let mut parts = Vec::new();
    let fields = |obj: &serde_json::Value, parts: &mut Vec<String>| {
        for name in FIELDS {
            if let Some(text) = obj.get(*name).and_then(clean) {
                parts.push(format!("{name}={text}"));
            }
        }
    };
    if let Some(target) = d.get("target").filter(|t| t.is_object()) {
        fields(target, &mut parts);
    }
    fields(d, &mut parts);
    if let Some(certs) = d.get("certificates").and_then(serde_json::Value::as_array) {
        parts.push(format!("certificates={}", certs.len()));
        for name in ["serial", "spiffe_id"] {
            let mut seen: Vec<String> = Vec::new();
            for v in certs.iter().filter_map(|c| c.get(name).and_then(clean)) {
                if !seen.contains(&v) && seen.len() < 3 {
                    seen.push(v);
                }
            }
            if !seen.is_empty() {
                parts.push(format!("{name}s={}", seen.join(",")));
            }
        }
    }
    if let Some(list) = d.get("denials").and_then(serde_json::Value::as_array) {
        parts.push(format!("counts={}", list.len()));
    }
    if parts.is_empty() {
        kind.to_owned()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests;
