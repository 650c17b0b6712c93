//! The integration tests of meshid-api, as one test binary: the generated code is up to date,
//! and the malformed-SVID corpus against the one X509-SVID verifier.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bootstrap;
mod corpus;
