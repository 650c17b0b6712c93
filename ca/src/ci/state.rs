//! The configured CI issuers and the JWKS fetched from them, as the CA holds them (the
//! exchange itself is the service's `ci` module).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::CiIssuerConfig;
use crate::federation::fetch::WebRoots;

/// The configured CI issuers and their JWKS cache.
#[derive(Debug, Default)]
pub struct CiState {
    /// Each issuer with the roots its JWKS is fetched with.
    pub(crate) issuers: Vec<(CiIssuerConfig, WebRoots)>,
    /// Each issuer's JWKS, by name, with when it was fetched.
    pub(crate) jwks: Mutex<HashMap<String, (Arc<String>, Instant)>>,
}

impl CiState {
    /// The issuers of `ca.toml`, with the roots their JWKS is fetched with.
    pub fn new(issuers: &[CiIssuerConfig]) -> anyhow::Result<CiState> {
        let issuers = issuers
            .iter()
            .map(|c| Ok((c.clone(), WebRoots::load(c.roots_file.as_deref())?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(CiState {
            issuers,
            jwks: Mutex::default(),
        })
    }

    /// Whether any issuer is configured.
    pub fn enabled(&self) -> bool {
        !self.issuers.is_empty()
    }
}
