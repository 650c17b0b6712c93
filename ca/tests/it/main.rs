//! The integration tests of meshid-ca, as one test binary (one link step instead of five, as
//! rustls does with `tests/api.rs`): the authority and its keys, the operator CLI, the node API,
//! the datastores (SQLite and PostgreSQL) and independent verification of what it issues.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/pg.rs"]
mod pg;

mod audit;
mod authority;
mod ci;
mod cli;
mod federation;
mod mesh;
mod node;
mod policy;
mod revoke;
mod root;
mod store;
mod taint;
mod x509_verify;
