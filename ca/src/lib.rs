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
//! - [`mesh`]: mesh files (`meshid-ca apply -f`): one owner's entries and policy documents in
//!   YAML, read strictly with file:line:column errors (the CA applies them in
//!   [`service::mesh`]).
//! - [`ci`]: CI systems' OIDC tokens verified and mapped to SPIFFE IDs by rules (pure).
//! - [`oidc`]: OIDC discovery for JWT-SVIDs (the issuer, its discovery document and JWKS).
//! - [`federation`]: relationships with other trust domains, fetching their bundles from
//!   their bundle endpoints (https_web or https_spiffe) and serving ours.
//!
//! The binary adds the operator CLI (`src/cli.rs`); shared process plumbing (config errors,
//! files, the ops endpoint, sockets) comes from meshid-api. See ARCHITECTURE.md.
//! - [`audit`]: the hash-chained audit log and its verifier (pure; [`store::verify_audit`]
//!   checks the stored log).
//! - [`service`]: the CA's operations ([`service::Ca`]): each validated, carried out, measured,
//!   audited and published once.
//! - [`admin`]: the admin API for operators (gRPC on a Unix socket), a thin wrapper over `Ca`.
//! - [`node`]: the node API for agents (gRPC over mTLS, peers verified by meshid-api's one
//!   X509-SVID verifier): attestation, renewal, entry sync, SVID signing.
//! - [`console`]: the read-only web console (`[console]`), its JSON API and embedded front end.
//! - [`server`]: wiring for `meshid-ca run`: rotation task, admin socket, health and metrics.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod authority;
pub mod backup;
pub mod bundle;
pub mod ci;
pub mod config;
pub mod console;
pub mod entry;
pub mod federation;
pub mod jwt;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod oidc;
pub mod server;
pub mod service;
pub mod store;
pub mod svid;
pub mod token;

pub use meshid_api::unix_now;
