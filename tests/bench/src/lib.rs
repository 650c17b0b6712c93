//! meshid's benchmark binaries: `meshid-bench` (the node agent and the node API) and
//! `meshid-proxy-bench` (the sidecar against haproxy, stunnel and the plain relay). They run the
//! real binaries through the `meshid-tests` harness; results and commands are in BENCHMARKS.md.
//! A package of their own, so that the end-to-end tests link no server library.
//!
//! What the binaries share lives here: children that are cleaned up on SIGINT too ([`procs`]),
//! wrk with a summary hook ([`wrk`]) and the nginx backend ([`nginx`]). Not a library for
//! anything else: it panics where a benchmark should.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod nginx;
pub mod procs;
pub mod wrk;

use std::time::Duration;

/// `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}
