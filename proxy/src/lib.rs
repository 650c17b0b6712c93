//! meshid-proxy: the mTLS sidecar. Two services that speak plain TCP or HTTP talk to each
//! other through a pair of these proxies, over mutual TLS with SPIFFE identities, and only
//! where the policy allows.
//!
//! The proxy is not a CA and holds no long-lived key: it takes its X509-SVID and the trust
//! bundles from the SPIFFE Workload API (the `spiffe` crate's `X509Source`, like any
//! workload), keeps the private key in memory only and swaps credentials on every update. It
//! does not link the CA server or the datastore.
//!
//! # Layout
//! - [`config`]: the TOML configuration.
//! - [`tls`]: credentials from the Workload API, rustls configurations, rotation.
//!   Peers are verified by meshid-api's one X509-SVID verifier
//!   ([`meshid_api::tls::verify`]), which the CA's node API and the agent use too.
//! - [`inbound`]: terminate mTLS, authorize, forward plaintext; [`http`]: per-request
//!   authorization for HTTP/1.1 and HTTP/2; [`outbound`]: plaintext in, mTLS out to an
//!   expected SPIFFE ID.
//! - [`server`]: wiring, policy hot reload, ops endpoint (`/healthz`, `/readyz`,
//!   `/metrics`), graceful drain; [`metrics`], [`access`]: observability.
//! - [`transparent`]: transparent mode (iptables REDIRECT + SO_ORIGINAL_DST): mesh
//!   destinations upgraded to mTLS, plaintext inbound strict or permissive; [`iptables`]:
//!   the rules that send the application's traffic there.
//! - [`policy_cli`]: the policy author's tools (`meshid-proxy policy ...`); the language
//!   itself is the pure `meshid-policy` crate.

#![forbid(unsafe_code)]

pub mod access;
pub mod config;
pub mod http;
pub mod inbound;
pub mod io;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod transparent;
