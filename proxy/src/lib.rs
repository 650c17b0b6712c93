//! meshid-proxy (placeholder; being written).
pub mod policy_cli;
