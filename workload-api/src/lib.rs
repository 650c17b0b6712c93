//! The meshid node agent.
//!
//! One agent runs per node. It attests itself to the CA with a join token, keeps the
//! registration entries it is responsible for in sync with the CA (a pushed stream, no
//! polling), generates a key pair per entry in memory, has it signed, rotates it at half-life,
//! and serves the standard SPIFFE Workload API on a Unix socket to local workloads, which it
//! attests from the socket peer (uid, gid, pid, binary path and hash). It never writes a
//! workload private key anywhere.
//!
//! # Layout
//! - [`config`]: the agent's TOML configuration.
//! - [`attest`]: workload attestation from the Unix socket peer and `/proc`.
//! - [`cache`]: the entries, SVIDs and bundle the agent holds, published as snapshots.
//! - [`client`]: the node API client (TLS to the CA, then mTLS with the agent SVID).
//! - [`manager`]: agent bootstrap, entry sync, batch signing and rotation.
//! - [`service`]: the SPIFFE Workload API server; [`jwt`]: its JWT-SVID cache and validation.
//! - [`server`]: wiring for `meshid-agent run`.
//!
//! The binary adds the `api` commands (`src/cli.rs`). Peer verification, the socket, the ops
//! endpoint and file writing come from meshid-api. See ARCHITECTURE.md.

#![forbid(unsafe_code)]

pub mod attest;
pub mod cache;
pub mod client;
pub mod config;
pub mod delivery;
pub mod jwt;
pub mod manager;
pub mod server;
pub mod service;
