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
mod security;
