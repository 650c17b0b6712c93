//! Refusals counted per (caller, callee, rule), as proxies report them to their agent and
//! agents to the CA (`PolicyDelivery.ReportDenials`, `Node.ReportDenials`): counts, never
//! payloads. [`Tally`] adds them up between reports, bounded; [`check`] is the one reading of
//! a reported count, for the agent and the CA alike.

use std::collections::HashMap;

/// Distinct (caller, callee, rule) counted between two reports; past it, further new ones
/// are only counted as dropped.
pub const MAX_KEYS: usize = 1024;
/// The longest rule name a report may carry.
pub const MAX_RULE: usize = 128;

/// What a count is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The caller's SPIFFE ID; empty when a handshake failed before one was verified.
    pub caller: String,
    /// The SPIFFE ID that refused.
    pub callee: String,
    /// The deciding rule, `<default>`, or `handshake:<reason>`.
    pub rule: String,
}

/// Counts by key, each with the time of its last refusal (unix seconds).
pub type Counts = Vec<(Key, u64, i64)>;

/// Counts between two reports.
#[derive(Debug, Default)]
pub struct Tally {
    counts: HashMap<Key, (u64, i64)>,
    dropped: u64,
}

impl Tally {
    /// Adds `count` refusals of `key`, the last at `at` (unix seconds). A new key past
    /// [`MAX_KEYS`] is dropped (counted in [`Tally::take`]'s second value).
    pub fn add(&mut self, key: Key, count: u64, at: i64) {
        let len = self.counts.len();
        match self.counts.get_mut(&key) {
            Some((n, last)) => {
                *n = n.saturating_add(count);
                *last = (*last).max(at);
            }
            None if len >= MAX_KEYS => self.dropped = self.dropped.saturating_add(count),
            None => {
                self.counts.insert(key, (count, at));
            }
        }
    }

    /// Whether nothing was counted since the last take.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.dropped == 0
    }

    /// Everything counted since the last take, by key, and how many were dropped; starts over.
    pub fn take(&mut self) -> (Counts, u64) {
        let mut out: Counts = self.counts.drain().map(|(k, (n, at))| (k, n, at)).collect();
        out.sort();
        (out, std::mem::take(&mut self.dropped))
    }

    /// Counts again what a [`Tally::take`] gave and a report could not deliver, to go with the
    /// next one.
    pub fn put_back(&mut self, counts: Counts) {
        for (k, n, at) in counts {
            self.add(k, n, at);
        }
    }
}

/// Why a reported count is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DenialError {
    /// The caller is neither empty nor a SPIFFE ID.
    #[error("caller {0:?} is not a SPIFFE ID")]
    Caller(String),
    /// The callee is neither empty nor a SPIFFE ID.
    #[error("callee {0:?} is not a SPIFFE ID")]
    Callee(String),
    /// The rule is not a policy rule name (letters, digits, `-`, `_`, `.`), `<default>`, or
    /// `handshake:` and a reason (lower-case letters and `_`), or is too long.
    #[error("rule must be a policy rule name, <default> or handshake:<reason>, at most {MAX_RULE} bytes")]
    Rule,
    /// A count of zero.
    #[error("count must be at least 1")]
    Count,
    /// More counts than [`MAX_KEYS`] in one report.
    #[error("a report carries at most {MAX_KEYS} counts")]
    TooMany,
}

/// Checks a whole report: at most [`MAX_KEYS`] counts, each as [`check`] says (caller, callee,
/// rule, count).
pub fn check_report<'a>(
    counts: impl ExactSizeIterator<Item = (&'a str, &'a str, &'a str, u64)>,
) -> Result<(), DenialError> {
    if counts.len() > MAX_KEYS {
        return Err(DenialError::TooMany);
    }
    for (caller, callee, rule, count) in counts {
        check(caller, callee, rule, count)?;
    }
    Ok(())
}

/// Checks one reported count: the caller and callee empty or SPIFFE IDs, the rule short and
/// printable, the count positive.
pub fn check(caller: &str, callee: &str, rule: &str, count: u64) -> Result<(), DenialError> {
    if !caller.is_empty() && spiffe::SpiffeId::new(caller).is_err() {
        return Err(DenialError::Caller(caller.chars().take(64).collect()));
    }
    if !callee.is_empty() && spiffe::SpiffeId::new(callee).is_err() {
        return Err(DenialError::Callee(callee.chars().take(64).collect()));
    }
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= MAX_RULE
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let reason = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let ok = rule == "<default>"
        || rule
            .strip_prefix("handshake:")
            .map_or_else(|| name(rule), reason);
    if !ok || rule.len() > MAX_RULE {
        return Err(DenialError::Rule);
    }
    if count == 0 {
        return Err(DenialError::Count);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(caller: &str, rule: &str) -> Key {
        Key {
            caller: caller.into(),
            callee: "spiffe://example.org/api".into(),
            rule: rule.into(),
        }
    }

    #[test]
    fn counts_add_up_per_key_and_start_over_when_taken() {
        let mut t = Tally::default();
        assert!(t.is_empty());
        t.add(key("spiffe://example.org/web", "<default>"), 1, 10);
        t.add(key("spiffe://example.org/web", "<default>"), 2, 5);
        t.add(key("", "handshake:untrusted"), 1, 12);
        let (counts, dropped) = t.take();
        assert_eq!(dropped, 0);
        assert_eq!(
            counts,
            vec![
                (key("", "handshake:untrusted"), 1, 12),
                (key("spiffe://example.org/web", "<default>"), 3, 10),
            ]
        );
        assert!(t.is_empty());
        // What a failed report carried is counted again, with what came meanwhile.
        t.add(key("", "handshake:untrusted"), 4, 20);
        t.put_back(counts);
        let (again, _) = t.take();
        assert_eq!(
            again,
            vec![
                (key("", "handshake:untrusted"), 5, 20),
                (key("spiffe://example.org/web", "<default>"), 3, 10),
            ]
        );
        assert!(check_report(
            again
                .iter()
                .map(|(k, n, _)| (&*k.caller, &*k.callee, &*k.rule, *n))
        )
        .is_ok());
    }

    #[test]
    fn new_keys_past_the_bound_are_dropped_and_counted() {
        let mut t = Tally::default();
        for i in 0..MAX_KEYS {
            t.add(key(&format!("spiffe://example.org/c{i}"), "r"), 1, 0);
        }
        t.add(key("spiffe://example.org/late", "r"), 5, 0);
        t.add(key("spiffe://example.org/c0", "r"), 1, 0);
        let (counts, dropped) = t.take();
        assert_eq!((counts.len(), dropped), (MAX_KEYS, 5));
        assert_eq!(
            counts
                .iter()
                .find(|(k, ..)| k.caller.ends_with("/c0"))
                .unwrap()
                .1,
            2
        );
    }

    #[test]
    fn malformed_counts_are_named() {
        assert_eq!(check("", "", "handshake:timeout", 1), Ok(()));
        assert_eq!(check("", "", "handshake:no_svid", 1), Ok(()));
        assert_eq!(check("", "", "<default>", 1), Ok(()));
        assert_eq!(check("", "", "web-reads.v2_x", 1), Ok(()));
        assert_eq!(check("", "", "handshake:", 1), Err(DenialError::Rule));
        assert_eq!(check("", "", "handshake:Evil", 1), Err(DenialError::Rule));
        assert_eq!(check("", "", "r\u{202e}x", 1), Err(DenialError::Rule));
        assert_eq!(check("", "", "two words", 1), Err(DenialError::Rule));
        assert_eq!(
            check("spiffe://a.org/x", "spiffe://b.org/y", "r", 1),
            Ok(())
        );
        assert!(matches!(
            check("web", "", "r", 1),
            Err(DenialError::Caller(_))
        ));
        assert!(matches!(
            check("", "http://x", "r", 1),
            Err(DenialError::Callee(_))
        ));
        assert_eq!(check("", "", "", 1), Err(DenialError::Rule));
        assert_eq!(
            check("", "", &"r".repeat(MAX_RULE + 1), 1),
            Err(DenialError::Rule)
        );
        assert_eq!(check("", "", "a\nb", 1), Err(DenialError::Rule));
        assert_eq!(check("", "", "r", 0), Err(DenialError::Count));
    }
}
