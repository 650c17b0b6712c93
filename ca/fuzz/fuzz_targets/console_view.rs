//! The console's view of the audit log takes any record (any kind, any JSON details) without
//! panicking, and what it shows of one stays one bounded line: the summary has no control
//! character and at most a fixed number of fields of at most 200 characters each.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshid_ca::console::view::{summary, View, RECENT};

const KINDS: [&str; 6] = [
    "svid.x509.issued",
    "entry.rotated",
    "entry.deleted",
    "denials.reported",
    "svid.revoked",
    "policy.apply",
];

fuzz_target!(|data: &[u8]| {
    let mut view = View::default();
    // Records separated by NUL: the first byte picks the kind, the rest is the details.
    for (seq, chunk) in data.split(|b| *b == 0).enumerate() {
        let Some((first, rest)) = chunk.split_first() else {
            continue;
        };
        let kind = KINDS[usize::from(*first) % KINDS.len()];
        let Ok(details) = serde_json::from_slice::<serde_json::Value>(rest) else {
            continue;
        };
        let time = i64::from(*first) * 3600;
        view.apply(seq as i64 + 1, time, kind, "actor", &details);
        let line = summary(kind, &details);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.chars().count() <= 20 * 230, "{} chars", line.len());
    }
    assert!(view.recent(usize::MAX).len() <= RECENT);
    let now = 200 * 3600;
    let _ = view.compliance(now);
    let _ = view.top_fetchers(now, 20);
    let _ = view.denials(now, 100);
    let _ = view.svids_per_agent(now);
});
