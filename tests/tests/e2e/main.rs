//! meshid's end-to-end tests over the real binaries, as one test binary (one link step instead
//! of seven): the agent, the deployment files, independent SPIFFE clients, network namespaces,
//! the proxy, the quickstart, and the security suite.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent;
mod deploy;
mod interop;
mod layout;
mod netns;
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
