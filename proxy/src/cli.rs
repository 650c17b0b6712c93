//! The binary's subcommands besides `run`: the policy author's tools (`policy`) and transparent
//! mode's netfilter rules (`iptables`). Bin-only: the proxy library does not contain them.

pub mod iptables;
pub mod policy;
