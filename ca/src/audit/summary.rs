//! Counted summaries for the audit log: what is too frequent to record one by one but must not
//! go unrecorded, namely refused node API calls (a forged entry id, a caller without an agent
//! identity, a failed attestation) and admin reads. Each is counted by (kind, actor, what);
//! the counts are written as one `audit.summary` record per interval.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// At most this many distinct (kind, actor, what) keys per interval; more are counted as
/// `other` under their kind, so a flood of distinct callers cannot grow memory.
pub const MAX_KEYS: usize = 512;
/// At most this many distinct `what`s per (kind, actor); more are counted as that actor's
/// `other`, so one caller cannot crowd the others out.
pub const MAX_PER_ACTOR: usize = 16;
/// Longer actors and reasons are cut to this many bytes (at a character boundary).
pub const MAX_FIELD: usize = 200;

/// What the summary counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A node API call refused (its reason is its `what`).
    NodeRefused,
    /// An admin API call that changes nothing (its method is its `what`).
    AdminRead,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::NodeRefused => "node_refused",
            Kind::AdminRead => "admin_reads",
        }
    }
}

/// Counts since the last summary.
#[derive(Debug, Default)]
pub struct Counts {
    inner: Mutex<BTreeMap<(Kind, String, String), u64>>,
}

fn cut(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_owned();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl Counts {
    /// Counts one occurrence.
    pub fn add(&self, kind: Kind, actor: &str, what: &str) {
        self.add_n(kind, cut(actor), cut(what), 1);
    }

    fn add_n(&self, kind: Kind, actor: String, what: String, n: u64) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (kind, actor, what);
        if map.contains_key(&key) {
            *map.entry(key).or_default() += n;
            return;
        }
        let (kind, actor, what) = key;
        let of_actor = map
            .range((kind, actor.clone(), String::new())..)
            .take_while(|((k, a, _), _)| *k == kind && *a == actor)
            .count();
        let key = if map.len() >= MAX_KEYS {
            (kind, "other".to_owned(), "other".to_owned())
        } else if of_actor >= MAX_PER_ACTOR && what != "other" {
            (kind, actor, "other".to_owned())
        } else {
            (kind, actor, what)
        };
        *map.entry(key).or_default() += n;
    }

    /// Takes the counts, leaving none.
    pub fn take(&self) -> Taken {
        Taken(std::mem::take(
            &mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    }

    /// Puts back counts that could not be recorded, to go into the next summary.
    pub fn restore(&self, taken: Taken) {
        for ((kind, actor, what), n) in taken.0 {
            self.add_n(kind, actor, what, n);
        }
    }
}

/// Counts taken for one summary.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken(BTreeMap<(Kind, String, String), u64>);

impl Taken {
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `audit.summary` record's details: the window and, per kind, the counts by actor
    /// and what (highest first).
    pub fn details(&self, server_id: &str, window_s: u64) -> serde_json::Value {
        let mut out = serde_json::json!({ "ca_server": server_id, "window_s": window_s });
        for kind in [Kind::NodeRefused, Kind::AdminRead] {
            let mut rows: Vec<(&String, &String, u64)> = self
                .0
                .iter()
                .filter(|((k, _, _), _)| *k == kind)
                .map(|((_, actor, what), n)| (actor, what, *n))
                .collect();
            if rows.is_empty() {
                continue;
            }
            rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)).then(a.1.cmp(b.1)));
            let total: u64 = rows.iter().map(|r| r.2).sum();
            out[kind.name()] = serde_json::json!({
                "total": total,
                "by": rows.iter().map(|(actor, what, n)| serde_json::json!({"actor": actor, "what": what, "count": n})).collect::<Vec<_>>(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_grouped_taken_and_restored() {
        let c = Counts::default();
        c.add(
            Kind::NodeRefused,
            "spiffe://td/agent/a",
            "BatchSignX509: entry e-1 is not yours",
        );
        c.add(
            Kind::NodeRefused,
            "spiffe://td/agent/a",
            "BatchSignX509: entry e-1 is not yours",
        );
        c.add(
            Kind::AdminRead,
            "admin:uid=0",
            "/meshid.admin.v1.Entries/ListEntries",
        );
        let t = c.take();
        assert!(c.take().is_empty());
        let d = t.details("ca-1", 60);
        assert_eq!(d["node_refused"]["total"], 2);
        assert_eq!(d["node_refused"]["by"][0]["count"], 2);
        assert_eq!(
            d["admin_reads"]["by"][0]["what"],
            "/meshid.admin.v1.Entries/ListEntries"
        );
        c.restore(t);
        c.add(
            Kind::AdminRead,
            "admin:uid=0",
            "/meshid.admin.v1.Entries/ListEntries",
        );
        assert_eq!(c.take().details("ca-1", 60)["admin_reads"]["total"], 2);
    }

    #[test]
    fn memory_is_bounded_whatever_the_callers() {
        let c = Counts::default();
        for i in 0..(MAX_KEYS + 500) {
            c.add(
                Kind::NodeRefused,
                &format!("10.0.0.{i}"),
                "AttestJoinToken: token rejected",
            );
        }
        c.add(Kind::NodeRefused, &"x".repeat(10_000), "y");
        let t = c.take();
        assert_eq!(t.0.len(), MAX_KEYS + 1);
        let d = t.details("ca-1", 60);
        assert_eq!(d["node_refused"]["total"], (MAX_KEYS + 501) as u64);
        assert!(d.to_string().len() < 2 * MAX_KEYS * (2 * MAX_FIELD + 80));
    }

    #[test]
    fn one_caller_cannot_crowd_out_the_others() {
        let c = Counts::default();
        for i in 0..1000 {
            c.add(
                Kind::NodeRefused,
                "spiffe://td/agent/noisy",
                &format!("BatchSignX509: entry e-{i} is not yours"),
            );
        }
        c.add(
            Kind::NodeRefused,
            "spiffe://td/agent/quiet",
            "BatchSignX509: entry q is not yours",
        );
        let t = c.take();
        assert_eq!(t.0.len(), MAX_PER_ACTOR + 2);
        let d = t.details("ca-1", 60);
        assert_eq!(d["node_refused"]["total"], 1001);
        let by = d["node_refused"]["by"].as_array().unwrap();
        assert_eq!(by[0]["what"], "other");
        assert_eq!(by[0]["count"], 1000 - MAX_PER_ACTOR as u64);
        assert!(by
            .iter()
            .any(|r| r["actor"] == "spiffe://td/agent/quiet" && r["count"] == 1));
    }
}
