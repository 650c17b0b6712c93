//! meshid's own gRPC APIs: protocol definitions and typed clients.
//!
//! This crate holds the admin API that `meshid-ca` serves to operators on a Unix socket, the
//! node API between agents and the CA, and the SPIFFE Workload API that the agent serves. The
//! Rust code is generated from the `.proto` files under `proto/` and checked in under
//! `src/gen/`; `tests/bootstrap.rs` regenerates it and fails on any difference, so building
//! needs no `protoc`. It contains no server logic: the CA implements the generated service
//! traits.
//!
//! # Layout
//! - [`admin`], [`node`], [`workload`]: the generated messages, clients and server traits.
//! - [`client`]: connecting to a gRPC server on a Unix socket (the admin API).
//! - [`tls`]: SPIFFE-aware rustls configurations (peers authenticated by SPIFFE ID, rotating
//!   certificates and roots) and connecting over TCP + TLS (the node API).
//! - [`limits`]: bounds shared by the agent and the CA (a JWT-SVID's audience, per-caller
//!   rates).
//! - [`uds`]: serving gRPC on a Unix socket (the Workload API, the admin API): accepted
//!   connections whose HTTP/2 `:authority` is made acceptable, whatever the client put there.

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
