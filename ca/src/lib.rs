//! The meshid certificate authority.
//!
//! `meshid-ca` holds a trust domain's trust anchors and issuing keys, its registration entries
//! (which workload gets which SPIFFE ID), join tokens and a tamper-evident audit log, and signs
//! X.509-SVIDs from CSRs and JWT-SVIDs. It does not attest workloads and never sees a workload's
//! private key: agents generate keys and send CSRs; the identity always comes from the entry.
//!
//! # Layout
//! - [`config`]: the TOML configuration, parsed strictly into a typed [`config::Config`].
//! - [`entry`]: registration entries and selectors, validated on construction.
//! - [`authority`]: trust anchors, issuing intermediates and their rotation; the CA journal.
//! - [`svid`]: the X509-SVID profile: CSR in, certificate chain out.
//! - [`jwt`]: JWT-SVID minting with the published ES256 key.
//! - [`bundle`]: the trust bundle as PEM and as a SPIFFE bundle (JWKS).
//! - [`token`]: single-use, expiring join tokens stored only as hashes.
//! - [`store`]: the datastore trait with its SQLite (default) and PostgreSQL backends.
//! - [`audit`]: the hash-chained audit log and its verifier.
//! - [`service`]: the CA's operations ([`service::Ca`]) and the admin API (gRPC on a Unix
//!   socket).
//! - [`node`]: the node API for agents (gRPC over TLS): attestation, renewal, entry sync,
//!   SVID signing.
//! - [`server`]: wiring for `meshid-ca run`: rotation task, admin socket, health and metrics.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod authority;
pub mod bundle;
pub mod config;
pub mod entry;
pub mod jwt;
pub mod metrics;
pub mod node;
pub mod server;
pub mod service;
pub mod store;
pub mod svid;
pub mod token;

pub use meshid_api::unix_now;
