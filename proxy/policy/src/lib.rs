//! meshid's policy language: who may call whom, on which ports and HTTP routes.
//!
//! Policy authors write YAML rules (`from` callers, `to` receiving workloads, optional `ports`
//! and `http` methods and paths, allow or deny, enforce or audit); this crate parses them into a
//! validated [`Policy`] (every error carries file:line:column), decides requests on the proxy's
//! hot path without allocating ([`Policy::decide`], [`Policy::connection`]), and answers the
//! policy author's questions ([`Policy::check`], [`Policy::explain`], [`Policy::who_can`], test
//! [`cases`]). It also defines the proxy's [`AccessRecord`] and reads access logs
//! ([`parse_access_log`]), which `policy diff` replays and from which [`Policy::suggest`] derives
//! least-privilege rules.
//!
//! It is pure: no network, no clock, no logging, no global state; the only I/O is reading a file
//! in [`Policy::load`] and [`load_cases`]. It does not verify certificates: callers pass the
//! SPIFFE IDs they have already authenticated. It does not know listeners: the proxy says which
//! ports speak HTTP ([`Policy::validate_ports`]).
//!
//! # Layout
//! - `pattern`: SPIFFE ID patterns ([`Pattern`]) and HTTP path patterns ([`PathPattern`]).
//! - `policy`: the rule model, the YAML reader and the decision functions.
//! - `check`, `explain`: lint findings; explanations and who-can answers.
//! - [`cases`]: policy test cases. `access`: the access log record and reader.
//! - `suggest`: least-privilege rules from recorded traffic.
//! - [`yaml`]: a positioned YAML tree over `saphyr-parser` events (strict, size and depth
//!   limited), public because the CA's mesh files are read with it too.
//!
//! # The language
//! ```yaml
//! name: payments            # optional (default: the file stem), for metrics and logs
//! default: deny             # deny (default) | allow
//! mode: enforce             # enforce (default) | audit: denials are only recorded
//! trust_domains: [example.org]          # optional: `check` warns on patterns naming others
//! ports: {8080: http, 5432: tcp}        # optional: protocol of service ports
//! rules:
//!   - name: web-to-api
//!     action: allow                     # allow (default) | deny
//!     from: ["spiffe://example.org/ns/web/**"]
//!     to: ["spiffe://example.org/ns/api/*"]
//!     ports: [8080]                     # optional; absent = any port
//!     http: {methods: [GET], paths: ["/v1/**"]}   # optional
//!     # http: {paths: ["/live"], upgrades: [websocket]}   # protocol switches it allows
//!     # mode: audit                     # deny rules only
//! ```
//! Any matching deny wins, otherwise any matching allow, otherwise the default. Rules with
//! `http` conditions never widen an allow to opaque traffic, and deny rules fail closed on it.
//! An HTTP request that asks to switch protocols ([`HttpRequest::upgrade`]) becomes opaque
//! traffic after the switch: an allow rule with `http` conditions matches it only when its
//! `upgrades` names the protocol (`h2c` cannot be named), and deny rules match it as they match
//! the plain request.

#![forbid(unsafe_code)]

mod access;
pub mod cases;
mod check;
mod combine;
mod error;
mod explain;
mod parse;
mod pattern;
mod policy;
mod render;
mod suggest;
pub mod yaml;

pub use access::{parse_access_log, AccessRecord};
pub use cases::{load_cases, parse_cases, CaseResult, TestCase};
pub use check::{Finding, Severity};
pub use error::{AccessLogError, PatternError, PolicyError};
pub use explain::{Explanation, Field, Grant, RuleMatch, RuleSummary, RuleTrace, WhoCan};
pub use pattern::{is_unambiguous_path, PathPattern, Pattern};
pub use policy::{
    Action, ConnectionVerdict, Decision, HttpRequest, Mode, Outcome, Policy, Protocol, Request,
    RuleRef, MAX_POLICY_BYTES,
};
pub use spiffe::{SpiffeId, TrustDomain};
pub use suggest::{Skip, SuggestOptions, Suggestion};
