//! The access log record: one JSON line per connection or HTTP request, written by the proxy and
//! read back by `meshid-proxy policy diff`.

use serde::{Deserialize, Serialize};

/// One access log line. The proxy writes these as JSON lines; `policy diff` replays them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AccessRecord {
    /// When the connection or request ended, RFC 3339 in UTC.
    pub timestamp: String,
    /// `"connection"` (one per TCP connection) or `"request"` (one per HTTP request).
    pub kind: String,
    /// `"inbound"` (we are the callee) or `"outbound"` (we are the caller).
    pub direction: String,
    /// The listener's name from the proxy configuration.
    pub listener: String,
    /// The caller's SPIFFE ID, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The callee's SPIFFE ID, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callee: Option<String>,
    /// The service port the caller reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The HTTP method, for HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The HTTP path without the query string, for HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The protocol the request switched the connection to (`websocket`, `connect`), for an
    /// upgrade request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// The HTTP response status, for HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The name of the policy that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The rule that decided (`<default>` when the policy default did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `"allow"`, `"deny"` or `"audit_deny"` (see [`crate::Outcome::as_str`]).
    pub decision: String,
    /// Why the connection ended or was refused, when not a plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes received from the caller.
    #[serde(default)]
    pub bytes_in: u64,
    /// Bytes sent to the caller.
    #[serde(default)]
    pub bytes_out: u64,
    /// How long the connection or request took, in milliseconds.
    #[serde(default)]
    pub duration_ms: f64,
}
