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
//! The path of a connection reads downward; no file imports one above it.
//! - [`server`]: the wiring of `meshid-proxy run`: bind every listener, start the credentials,
//!   the policy reload and the ops endpoint, drain on shutdown.
//! - [`transparent`]: transparent mode (iptables REDIRECT + SO_ORIGINAL_DST): mesh
//!   destinations upgraded to mTLS, plaintext inbound strict or permissive. It reuses:
//! - [`inbound`]: terminate mTLS, decide, forward plaintext; [`h1`]: one policy decision per
//!   HTTP/1.1 request on the fast path (head parsed in place, body relayed), under inbound;
//!   [`http`]: the full HTTP/1.1 and HTTP/2 server (hyper) for HTTP/2 and what the fast path
//!   hands over. [`outbound`]: plaintext in, mTLS out to an
//!   expected SPIFFE ID.
//! - [`proxy`]: the base they all use: shared state, the accept loop, connecting upstream,
//!   splicing bytes, and the inbound decision accounting.
//! - [`policy`]: the policy in force (loaded and checked before anything binds, hot reload).
//! - [`report`]: the refusals counted per (caller, callee, rule), reported to the agent for
//!   the CA's console.
//!   The language itself is the pure `meshid-policy` crate; the decision is made there.
//! - [`tls`]: credentials from the Workload API and the rustls configurations. Peers are
//!   verified by meshid-api's one X509-SVID verifier ([`meshid_api::tls::verify`]), which the
//!   CA's node API and the agent use too.
//! - [`config`], [`io`] (relay, protocol detection), [`metrics`], [`access`]: the leaves.
//!
//! The binary adds what only a command line needs (`src/cli/`): the policy author's tools
//! (`meshid-proxy policy ...`) and transparent mode's iptables rules (`meshid-proxy iptables`).

#![forbid(unsafe_code)]

pub mod access;
pub mod admission;
pub mod config;
pub mod h1;
pub mod http;
pub mod inbound;
pub mod io;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod proxy;
pub mod report;
pub mod server;
pub mod tls;
pub mod transparent;
pub mod upstream;
