//! The integration tests of meshid-proxy's command line, as one test binary: the policy tools
//! and the iptables command.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod iptables_cli;
mod policy_cli;
