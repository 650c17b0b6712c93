//! The access log record: one JSON line per connection or HTTP request, written by the proxy and
//! read back ([`parse_access_log`]) by `meshid-proxy policy diff` and `policy suggest`.

use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;

use crate::{AccessLogError, Decision, HttpRequest, Policy, Request};

/// One access log line. The proxy writes these as JSON lines; `policy diff` replays them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
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
    /// The key exchange group the mTLS connection negotiated (`X25519MLKEM768` when both ends
    /// have the hybrid post-quantum group, `X25519` with a classical peer), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_group: Option<String>,
}

/// The `decision` values the proxy writes: [`crate::Outcome::as_str`]'s, and `close` for an
/// established connection closed because the peer's certificate was revoked.
const DECISIONS: &[&str] = &["allow", "deny", "audit_deny", "close"];
const KINDS: &[&str] = &["connection", "request"];
const DIRECTIONS: &[&str] = &["inbound", "outbound"];

impl AccessRecord {
    /// Reads one access log line: a JSON object with the fields above, whose `decision`,
    /// `kind` and `direction` are values the proxy writes. The error says what is wrong, with
    /// the column when the JSON itself is.
    fn from_line(line: &str) -> Result<AccessRecord, (usize, String)> {
        let record: AccessRecord =
            serde_json::from_str(line).map_err(|e| (e.column().max(1), e.to_string()))?;
        for (field, value, known) in [
            ("decision", &record.decision, DECISIONS),
            ("kind", &record.kind, KINDS),
            ("direction", &record.direction, DIRECTIONS),
        ] {
            if !known.contains(&value.as_str()) {
                return Err((
                    1,
                    format!(
                        "unknown {field} `{}`: the proxy writes {}",
                        crate::yaml::clip(value),
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(record)
    }
}

impl AccessRecord {
    /// The decision `policy` gives the recorded traffic: a record with a method and path as
    /// that HTTP request (with its upgrade), any other as opaque traffic, on the recorded port.
    /// `None` unless the caller and callee are SPIFFE IDs.
    pub fn replay(&self, policy: &Policy) -> Option<Decision> {
        let from = SpiffeId::new(self.caller.as_deref()?).ok()?;
        let to = SpiffeId::new(self.callee.as_deref()?).ok()?;
        let http = match (&self.method, &self.path) {
            (Some(method), Some(path)) => Some(HttpRequest {
                method,
                path,
                upgrade: self.upgrade.as_deref(),
            }),
            _ => None,
        };
        Some(policy.decide(&Request {
            from: &from,
            to: &to,
            port: self.port,
            http,
        }))
    }
}

/// Reads an access log (JSON lines): one item per line that is not blank, a record or the
/// reason the line is not one, positioned in `origin` (line from 1). Callers choose whether a
/// bad line stops them or is counted.
pub fn parse_access_log<'a>(
    text: &'a str,
    origin: &'a str,
) -> impl Iterator<Item = Result<AccessRecord, AccessLogError>> + 'a {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(move |(i, l)| {
            AccessRecord::from_line(l).map_err(|(column, message)| AccessLogError::Invalid {
                origin: origin.to_owned(),
                line: i + 1,
                column,
                message,
            })
        })
}
