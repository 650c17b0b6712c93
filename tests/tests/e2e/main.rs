//! meshid's end-to-end tests over the real binaries, as one test binary (one link step instead
//! of seven): the agent, the deployment files, independent SPIFFE clients, network namespaces,
//! the proxy, the quickstart, and the security suite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent;
mod backup;
mod console;
mod deploy;
mod federation;
mod ha;
mod interop;
mod layout;
mod netns;
mod policy;
mod proxy;
mod quickstart;
mod revoke;
mod root;
mod security;

/// Tests that flood a server with connections and measure how it copes hold this lock, so that
/// two of them never run at once in this binary (each would starve the other's server and
/// measure the machine instead). Before the end-to-end tests were one binary they were already
/// in one file; now every other test runs beside them too, so they also keep their limits
/// within reach on a busy machine.
pub(crate) fn load_test() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The audit records whose kind starts with `kind` (`meshid-ca audit list --kind`), as JSON
/// objects with seq, time, kind, actor and details.
pub(crate) fn audit(ca: &meshid_tests::Ca, kind: &str) -> Vec<serde_json::Value> {
    ca.ok(&[
        "audit", "list", "--kind", kind, "--limit", "1000", "--output", "json",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

/// The journal id of the active key of `kind` (`x509_intermediate`, `jwt`, ...) that the CA
/// server signs with, from `ca status`.
pub(crate) fn active_key(ca: &meshid_tests::Ca, kind: &str) -> String {
    let status: serde_json::Value =
        serde_json::from_str(&ca.ok(&["ca", "status", "--output", "json"])).unwrap();
    status["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == kind && k["state"] == "active")
        .unwrap_or_else(|| panic!("no active {kind} key: {status}"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits up to `timeout` for the CA to record that a step took effect across the mesh (the
/// `n`th `<kind>.effective`, oldest first) and returns its details; panics if it was recorded
/// as not in effect.
pub(crate) fn effect(
    ca: &meshid_tests::Ca,
    kind: &str,
    n: usize,
    timeout: std::time::Duration,
) -> serde_json::Value {
    let kind = format!("{kind}.effective");
    let rec = meshid_tests::wait_for(timeout, &format!("an audit record {kind}"), || {
        audit(ca, &kind)
            .into_iter()
            .filter(|r| r["kind"] == kind.as_str())
            .nth(n)
    });
    let details = rec["details"].clone();
    assert_eq!(details["effective"], true, "{rec}");
    assert!(details["after_ms"].as_u64().is_some(), "{rec}");
    details
}
