//! The integration tests of meshid-agent, as one test binary: the Workload API served to real
//! clients, and the command line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli;
mod workload_api;
