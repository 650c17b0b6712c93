//! meshid's wire contracts and the SPIFFE mTLS they run over, shared by every binary.
//!
//! The wire contracts: the admin API that `meshid-ca` serves to operators on a Unix socket,
//! the node API between agents and the CA, and the SPIFFE Workload API that the agent serves.
//! The Rust code is generated from the `.proto` files under `proto/` and checked in under
//! `src/gen/` (`tests/it/bootstrap.rs` regenerates it and fails on any difference, so building
//! needs no `protoc`), each API behind its feature (`admin`, `node`, `workload`): a binary
//! compiles only the stubs it uses, and the sidecar none. There is no server logic here: the CA
//! and the agent implement the generated service traits.
//!
//! The SPIFFE mTLS: the one X509-SVID peer verifier and the one crypto provider of every
//! meshid TLS endpoint, and the rustls configurations of the node API.
//!
//! And the process plumbing every binary shares, written once.
//!
//! # Layout
//! - `admin`, `node`, `workload` (by feature): the generated messages, clients and server
//!   traits; `codec`: the Workload API's codec.
//! - [`tls`]: node API configurations, [`tls::verify`] (the peer verifier),
//!   [`tls::provider()`] (TLS 1.3, aws-lc-rs, hybrid post-quantum key exchange); [`id`]: SPIFFE IDs from text, canonical spelling only;
//!   [`role`]: the marks of agent and CA server SVIDs.
//! - [`uds`]: serving gRPC on a Unix socket (any client's `:authority`, connection caps, the
//!   socket itself); [`client`]: connecting to one.
//! - [`config`] (TOML, `ConfigError`, exit code 64, file modes), [`files`] (atomic writes,
//!   PEM), [`ops`] (`/healthz`, `/readyz`, `/metrics`, `healthcheck`), [`server`] (signals,
//!   the log subscriber), [`limits`] (audiences, rates), [`unix_now`]; [`denials`]: refusals
//!   counted per (caller, callee, rule), as proxies and agents report them.

#![forbid(unsafe_code)]

/// The admin API, `meshid.admin.v1` (feature `admin`).
#[cfg(feature = "admin")]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod admin {
    include!("gen/meshid.admin.v1.rs");
}

/// The node API, `meshid.node.v1`, between agents and the CA (feature `node`).
#[cfg(feature = "node")]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod node {
    include!("gen/meshid.node.v1.rs");
}

/// The central policy as the node agent hands it to proxies, `meshid.policy.v1` (feature
/// `workload`: served beside the Workload API).
#[cfg(feature = "workload")]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod policy {
    include!("gen/meshid.policy.v1.rs");
}

/// The SPIFFE Workload API (package-less, wire-compatible with the specification's proto):
/// server stubs for the agent (feature `workload`).
#[cfg(feature = "workload")]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod workload {
    include!("gen/_.rs");
}

pub mod client;
#[cfg(feature = "workload")]
pub mod codec;
pub mod config;
pub mod denials;
pub mod files;
pub mod id;
pub mod limits;
pub mod ops;
pub mod role;
pub mod server;
pub mod tls;
pub mod uds;

/// Seconds since the Unix epoch (0 before it), the time unit of meshid's records, certificates
/// and tokens.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
