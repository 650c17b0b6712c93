//! Federation with other trust domains, after the SPIFFE Trust Domain and Bundle and SPIFFE
//! Federation specifications.
//!
//! - A *relationship* (`meshid-ca federation create`) names another trust domain, its bundle
//!   endpoint URL and the endpoint's profile: `https_web` (the endpoint has a Web PKI
//!   certificate, verified against the system's roots or `federation.web_roots_file`) or
//!   `https_spiffe` (it presents an X509-SVID of its own trust domain, verified against the
//!   bundle held for that domain, which the operator bootstraps with a bundle checked out of
//!   band). Validated here ([`validate`]); stored by the datastore with the last good bundle.
//! - [`fetch`] fetches a bundle from an endpoint; [`refresh`] keeps every relationship's
//!   bundle current (at the endpoint's `spiffe_refresh_hint`, keeping the last good bundle
//!   when a fetch fails) and the set in force in memory ([`Federation`]), which the node API
//!   hands to agents.
//! - [`endpoint`] serves this trust domain's bundle, in either profile.

pub mod endpoint;
pub mod fetch;
pub mod refresh;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use spiffe::{SpiffeId, TrustDomain};

use crate::bundle::TrustBundle;

/// The largest bundle document fetched or bootstrapped, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;
/// Most federation relationships of a trust domain.
pub const MAX_RELATIONSHIPS: usize = 256;
/// How often a bundle is refreshed when its endpoint gives no `spiffe_refresh_hint`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// The shortest and longest refresh interval honoured, whatever the hint says.
pub const REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
/// The longest wait before retrying a failed fetch.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// How a bundle endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// A Web PKI certificate for the URL's host.
    HttpsWeb,
    /// An X509-SVID with this SPIFFE ID, of the federated trust domain.
    HttpsSpiffe(SpiffeId),
}

impl Profile {
    /// `https_web` or `https_spiffe`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Profile::HttpsWeb => "https_web",
            Profile::HttpsSpiffe(_) => "https_spiffe",
        }
    }
}

/// A validated federation relationship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    /// The federated trust domain.
    pub trust_domain: TrustDomain,
    /// The bundle endpoint.
    pub endpoint_url: http::Uri,
    /// How the endpoint authenticates.
    pub profile: Profile,
}

/// Why a relationship or a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FederationError {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong and what to do.
    pub reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> FederationError {
    FederationError {
        field,
        reason: reason.into(),
    }
}

/// Checks a relationship as written: a trust domain other than `own`, an `https://` URL with a
/// host (no user information, no fragment), a known profile, and for `https_spiffe` the
/// endpoint's SPIFFE ID in the federated trust domain (empty for `https_web`).
pub fn validate(
    own: &TrustDomain,
    trust_domain: &str,
    endpoint_url: &str,
    profile: &str,
    endpoint_spiffe_id: &str,
) -> Result<Relationship, FederationError> {
    let td = TrustDomain::new(trust_domain)
        .map_err(|e| refuse("trust_domain", format!("{trust_domain:?}: {e}")))?;
    if td.as_str() != trust_domain {
        return Err(refuse(
            "trust_domain",
            format!(
                "{trust_domain:?}: write the trust domain alone, lower case (e.g. partner.org)"
            ),
        ));
    }
    if td == *own {
        return Err(refuse(
            "trust_domain",
            format!("{td} is this CA's own trust domain: federation is with other ones"),
        ));
    }
    let url = endpoint_url
        .parse::<http::Uri>()
        .map_err(|e| refuse("endpoint_url", format!("{endpoint_url:?}: {e}")))?;
    let authority = url.authority().map(|a| a.as_str()).unwrap_or("");
    if url.scheme_str() != Some("https") || url.host().is_none_or(str::is_empty) {
        return Err(refuse(
            "endpoint_url",
            format!("{endpoint_url:?}: write an https:// URL with a host, e.g. https://partner.org:8443"),
        ));
    }
    if authority.contains('@') {
        return Err(refuse(
            "endpoint_url",
            "user information in the URL is refused: bundle endpoints are public and never take credentials",
        ));
    }
    if endpoint_url.contains('#') || endpoint_url.len() > 2048 {
        return Err(refuse(
            "endpoint_url",
            "write the URL without a fragment, in at most 2048 bytes",
        ));
    }
    let profile = match (profile, endpoint_spiffe_id) {
        ("https_web", "") => Profile::HttpsWeb,
        ("https_web", _) => return Err(refuse(
            "endpoint_spiffe_id",
            "only for the https_spiffe profile: an https_web endpoint is known by its URL's host",
        )),
        ("https_spiffe", "") => {
            return Err(refuse(
                "endpoint_spiffe_id",
                format!(
                    "required with https_spiffe: the SPIFFE ID the endpoint presents (for meshid, \
                     spiffe://{td}/meshid/server)"
                ),
            ))
        }
        ("https_spiffe", id) => {
            let id = SpiffeId::new(id)
                .map_err(|e| refuse("endpoint_spiffe_id", format!("{id:?}: {e}")))?;
            if *id.trust_domain() != td {
                return Err(refuse(
                    "endpoint_spiffe_id",
                    format!(
                        "{id} is not in {td}: the endpoint is authenticated with {td}'s bundle"
                    ),
                ));
            }
            Profile::HttpsSpiffe(id)
        }
        (other, _) => {
            return Err(refuse(
                "profile",
                format!("{other:?}: use https_web or https_spiffe"),
            ))
        }
    };
    Ok(Relationship {
        trust_domain: td,
        endpoint_url: url,
        profile,
    })
}

/// Parses a bundle of `td` fetched or given by an operator: a SPIFFE bundle document with at
/// least one X.509 authority (a bundle without one would verify nothing, and an https_spiffe
/// endpoint could never be reached again).
pub fn parse_bundle(td: &TrustDomain, document: &str) -> Result<TrustBundle, FederationError> {
    if document.len() > MAX_BUNDLE_BYTES {
        return Err(refuse(
            "bundle",
            format!("larger than {MAX_BUNDLE_BYTES} bytes"),
        ));
    }
    let bundle = TrustBundle::from_spiffe_json(td, document)
        .map_err(|e| refuse("bundle", format!("not a SPIFFE bundle of {td}: {e}")))?;
    if bundle.x509_authorities.is_empty() {
        return Err(refuse(
            "bundle",
            format!("the bundle of {td} has no X.509 authority"),
        ));
    }
    Ok(bundle)
}

/// How long to wait before the next fetch: half the bundle's refresh hint, so that a change
/// the endpoint publishes is in force here within the hint (the refresher's 1 s tick and the
/// fetch fit in the other half of any hint of 3 s or more); [`DEFAULT_REFRESH`] without a
/// hint; within [`REFRESH_BOUNDS`]; after a failure, at most [`MAX_RETRY`].
pub fn next_refresh(hint: Duration, failed: bool) -> Duration {
    let every = if hint.is_zero() {
        DEFAULT_REFRESH
    } else {
        (hint / 2).clamp(REFRESH_BOUNDS.0, REFRESH_BOUNDS.1)
    };
    if failed {
        every.min(MAX_RETRY)
    } else {
        every
    }
}

/// The state of one relationship's refresh, for `federation list` and `show`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStatus {
    /// Unix seconds of the last attempt (0: none yet on this server).
    pub last_attempt: i64,
    /// Unix seconds of the last successful fetch (0: none yet on this server).
    pub last_success: i64,
    /// Why the last attempt failed; empty after a success.
    pub last_error: String,
    /// Unix seconds of the next attempt.
    pub next_attempt: i64,
}

/// The federated bundles in force on this server, and the refresh state of each relationship.
#[derive(Debug, Default)]
pub struct Federation {
    bundles: ArcSwap<BTreeMap<String, Arc<TrustBundle>>>,
    status: std::sync::Mutex<BTreeMap<String, RefreshStatus>>,
    /// Wakes the refresher (a relationship was created or deleted on this server).
    pub wake: tokio::sync::Notify,
}

impl Federation {
    /// The federated bundles in force, by trust domain.
    pub fn bundles(&self) -> Arc<BTreeMap<String, Arc<TrustBundle>>> {
        self.bundles.load_full()
    }

    /// Replaces the bundles in force; whether they changed.
    pub fn set_bundles(&self, bundles: BTreeMap<String, Arc<TrustBundle>>) -> bool {
        let changed = *self.bundles.load_full() != bundles;
        if changed {
            self.bundles.store(Arc::new(bundles));
        }
        changed
    }

    /// The refresh state of the relationship with `td`.
    pub fn status(&self, td: &str) -> RefreshStatus {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(td)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes the refresh state of the relationship with `td`.
    pub fn update_status(&self, td: &str, change: impl FnOnce(&mut RefreshStatus)) {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        change(status.entry(td.to_owned()).or_default());
    }

    /// Forgets the refresh state of relationships not in `keep`.
    pub fn retain_status(&self, keep: impl Fn(&str) -> bool) {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|td, _| keep(td));
    }
}

/// Resolves when `stop` turns true or its sender is gone.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests;
