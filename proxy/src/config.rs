//! Configuration of `meshid-proxy run`.
//!
//! TOML into [`RawConfig`] (unknown keys are errors naming the key, with line and column; the
//! file's text is never quoted), then into a typed [`Config`]. At least one `[[inbound]]` or
//! `[[outbound]]` listener is required; everything else has a default.
//!
//! ```toml
//! workload_api_socket = "unix:///run/meshid/agent/api.sock"
//! ops_address = "127.0.0.1:15000"
//! policy_file = "/etc/meshid/policy.yaml"
//!
//! [[inbound]]
//! name = "api"
//! listen = "0.0.0.0:15443"
//! forward_to = "127.0.0.1:8080"
//!
//! [[outbound]]
//! name = "db"
//! listen = "127.0.0.1:15001"
//! upstream = "db.internal:15443"
//! expect = "spiffe://example.org/db/*"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_policy::Pattern;
use serde::Deserialize;
use spiffe::{SpiffeId, TrustDomain};

/// The Workload API socket used when neither the file nor `SPIFFE_ENDPOINT_SOCKET` names one.
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "unix:///run/meshid/agent/api.sock";
/// The default ops listener.
pub const DEFAULT_OPS_ADDRESS: &str = "127.0.0.1:15000";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read or parsed (names the file, line and column, never quotes it).
    #[error(transparent)]
    File(#[from] meshid_api::config::TomlError),
    /// A value is present but wrong, or a required one is missing.
    #[error("invalid config: {key}: {reason}")]
    Invalid {
        /// The key (for listeners: `inbound[N].field`).
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `unix:///path` of the Workload API (default: `SPIFFE_ENDPOINT_SOCKET`, then
    /// [`DEFAULT_WORKLOAD_API_SOCKET`]).
    pub workload_api_socket: Option<String>,
    /// Use the SVID with this SPIFFE ID when the Workload API offers several (default: the
    /// first, as the Workload API orders them).
    pub spiffe_id: Option<String>,
    /// `/healthz`, `/readyz` and `/metrics` listener.
    pub ops_address: Option<String>,
    /// The policy file (YAML), watched and reloaded. Without one every inbound caller is
    /// refused.
    pub policy_file: Option<PathBuf>,
    /// Where JSON access log lines go: `stdout` (default), `stderr`, `off`, or a file path
    /// (appended, created with mode 0640).
    pub access_log: Option<String>,
    /// `text` (default) or `json` for the proxy's own log.
    pub log_format: Option<String>,
    /// How long open connections get to finish after SIGTERM (default 10s).
    #[serde(default, with = "humantime_serde_opt")]
    pub drain_timeout: Option<Duration>,
    /// TLS handshake deadline (default 10s).
    #[serde(default, with = "humantime_serde_opt")]
    pub handshake_timeout: Option<Duration>,
    /// How long an inbound connection's first bytes are awaited to recognize HTTP before it is
    /// treated as opaque TCP (default 200ms), so protocols where the server speaks first are
    /// not stalled for long.
    #[serde(default, with = "humantime_serde_opt")]
    pub detect_timeout: Option<Duration>,
    /// Timeout for connecting to an upstream or the local application (default 5s).
    #[serde(default, with = "humantime_serde_opt")]
    pub connect_timeout: Option<Duration>,
    /// Other trust domains whose SVIDs are accepted from peers (their bundles come from the
    /// Workload API). The proxy's own trust domain is always accepted.
    #[serde(default)]
    pub federated_trust_domains: Vec<String>,
    /// Threads serving connections (default 1: a sidecar shares its node with the service it
    /// fronts; raise it for a proxy that carries more than one core of traffic).
    pub worker_threads: Option<usize>,
    /// Listeners that terminate mTLS and forward plaintext to the local application.
    #[serde(default)]
    pub inbound: Vec<RawInbound>,
    /// Listeners that take plaintext from the local application and open mTLS upstream.
    #[serde(default)]
    pub outbound: Vec<RawOutbound>,
}

/// An `[[inbound]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInbound {
    /// Name used in metrics and logs (default `inbound-N`).
    pub name: Option<String>,
    /// Address to listen on for mTLS.
    pub listen: Option<String>,
    /// The local application's plaintext address.
    pub forward_to: Option<String>,
    /// The service port that policy rules match (default: `forward_to`'s port).
    pub port: Option<u16>,
    /// `detect` (default), `http` or `tcp`.
    pub protocol: Option<String>,
}

/// An `[[outbound]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbound {
    /// Name used in metrics and logs (default `outbound-N`).
    pub name: Option<String>,
    /// Address to listen on for the application's plaintext.
    pub listen: Option<String>,
    /// `host:port` of the peer's inbound listener.
    pub upstream: Option<String>,
    /// The SPIFFE ID (or pattern: `*` one segment, `**` the rest) the upstream must present.
    pub expect: Option<String>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// How an inbound listener treats what follows the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundProtocol {
    /// Look at the first bytes: HTTP/1.1 or HTTP/2 is proxied per request (L7 rules apply),
    /// anything else (or silence until the detect timeout) is opaque TCP.
    Detect,
    /// Always HTTP (L7 rules apply; non-HTTP bytes end the connection).
    Http,
    /// Always opaque TCP: one decision per connection, bytes spliced.
    Tcp,
}

/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    /// Not written.
    Off,
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

/// A validated inbound listener.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// Name in metrics and logs.
    pub name: String,
    /// mTLS listen address.
    pub listen: SocketAddr,
    /// Local application address.
    pub forward_to: String,
    /// The port policy rules see.
    pub port: u16,
    /// Protocol handling.
    pub protocol: InboundProtocol,
}

/// A validated outbound listener.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Name in metrics and logs.
    pub name: String,
    /// Plaintext listen address.
    pub listen: SocketAddr,
    /// `host:port` of the upstream mTLS listener.
    pub upstream: String,
    /// What the upstream's SPIFFE ID must match.
    pub expect: Pattern,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Workload API endpoint (`unix:///path`).
    pub workload_api_socket: String,
    /// The SVID to use when several are offered.
    pub spiffe_id: Option<SpiffeId>,
    /// Ops listener.
    pub ops_address: SocketAddr,
    /// Policy file, if any.
    pub policy_file: Option<PathBuf>,
    /// Access log destination.
    pub access_log: AccessLog,
    /// JSON logs.
    pub log_json: bool,
    /// Grace period after SIGTERM.
    pub drain_timeout: Duration,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// First-bytes deadline for protocol detection.
    pub detect_timeout: Duration,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Federated trust domains accepted from peers.
    pub federated_trust_domains: Vec<TrustDomain>,
    /// Runtime worker threads.
    pub worker_threads: usize,
    /// Inbound listeners.
    pub inbound: Vec<Inbound>,
    /// Outbound listeners.
    pub outbound: Vec<Outbound>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = meshid_api::config::read_toml(path)?;
        Config::try_from(raw)
    }
}

fn socket_addr(key: String, value: Option<&str>) -> Result<SocketAddr, ConfigError> {
    let v = value.ok_or_else(|| invalid(key.clone(), "required"))?;
    v.parse().map_err(|_| {
        invalid(
            key,
            format!("{v:?} is not an IP:port address (for example 127.0.0.1:15001)"),
        )
    })
}

fn host_port(key: String, value: Option<&str>) -> Result<(String, u16), ConfigError> {
    let v = value.ok_or_else(|| invalid(key.clone(), "required"))?;
    let port = v
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(key, format!("{v:?} is not host:port")))?;
    Ok((v.to_owned(), port))
}

fn duration(
    value: Option<Duration>,
    default: Duration,
    key: &str,
) -> Result<Duration, ConfigError> {
    let d = value.unwrap_or(default);
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let workload_api_socket = raw
            .workload_api_socket
            .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
            .unwrap_or_else(|| DEFAULT_WORKLOAD_API_SOCKET.to_owned());
        if !workload_api_socket.starts_with("unix:") && !workload_api_socket.starts_with("tcp:") {
            return Err(invalid(
                "workload_api_socket",
                format!("{workload_api_socket:?} is not unix:///path (or tcp://ip:port)"),
            ));
        }
        let spiffe_id = raw
            .spiffe_id
            .map(|s| {
                let id =
                    SpiffeId::new(&s).map_err(|e| invalid("spiffe_id", format!("{s:?}: {e}")))?;
                if id.to_string() != s {
                    return Err(invalid(
                        "spiffe_id",
                        format!("{s:?} is not in canonical form; write {id}"),
                    ));
                }
                Ok(id)
            })
            .transpose()?;
        let ops_address = socket_addr(
            "ops_address".into(),
            Some(raw.ops_address.as_deref().unwrap_or(DEFAULT_OPS_ADDRESS)),
        )?;
        let access_log = match raw.access_log.as_deref() {
            None | Some("stdout") => AccessLog::Stdout,
            Some("stderr") => AccessLog::Stderr,
            Some("off") => AccessLog::Off,
            Some("") => {
                return Err(invalid(
                    "access_log",
                    "empty: use off, stdout, stderr or a path",
                ))
            }
            Some(path) => AccessLog::File(PathBuf::from(path)),
        };
        let log_json = match raw.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?}: use text or json"),
                ))
            }
        };
        let mut federated_trust_domains = Vec::new();
        for td in &raw.federated_trust_domains {
            federated_trust_domains.push(
                TrustDomain::new(td)
                    .map_err(|e| invalid("federated_trust_domains", format!("{td:?}: {e}")))?,
            );
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut check_unique = |kind: &str, i: usize, name: &str, addr: SocketAddr| {
            if !names.insert(name.to_owned()) {
                return Err(invalid(
                    format!("{kind}[{i}].name"),
                    format!("{name:?} is used by another listener"),
                ));
            }
            if !addrs.insert(addr) {
                return Err(invalid(
                    format!("{kind}[{i}].listen"),
                    format!("{addr} is used by another listener"),
                ));
            }
            Ok(())
        };
        let mut inbound = Vec::new();
        for (i, l) in raw.inbound.into_iter().enumerate() {
            let key = |f: &str| format!("inbound[{i}].{f}");
            let name = l.name.unwrap_or_else(|| format!("inbound-{i}"));
            let listen = socket_addr(key("listen"), l.listen.as_deref())?;
            let (forward_to, forward_port) = host_port(key("forward_to"), l.forward_to.as_deref())?;
            let protocol = match l.protocol.as_deref() {
                None | Some("detect") => InboundProtocol::Detect,
                Some("http") => InboundProtocol::Http,
                Some("tcp") => InboundProtocol::Tcp,
                Some(other) => {
                    return Err(invalid(
                        key("protocol"),
                        format!("{other:?}: use detect, http or tcp"),
                    ))
                }
            };
            check_unique("inbound", i, &name, listen)?;
            inbound.push(Inbound {
                name,
                listen,
                forward_to,
                port: l.port.unwrap_or(forward_port),
                protocol,
            });
        }
        let mut outbound = Vec::new();
        for (i, l) in raw.outbound.into_iter().enumerate() {
            let key = |f: &str| format!("outbound[{i}].{f}");
            let name = l.name.unwrap_or_else(|| format!("outbound-{i}"));
            let listen = socket_addr(key("listen"), l.listen.as_deref())?;
            let (upstream, _) = host_port(key("upstream"), l.upstream.as_deref())?;
            let expect_raw = l.expect.ok_or_else(|| {
                invalid(
                    key("expect"),
                    "required: the SPIFFE ID (or pattern) the upstream must present",
                )
            })?;
            let expect = expect_raw
                .parse::<Pattern>()
                .map_err(|e| invalid(key("expect"), format!("{expect_raw:?}: {e}")))?;
            check_unique("outbound", i, &name, listen)?;
            outbound.push(Outbound {
                name,
                listen,
                upstream,
                expect,
            });
        }
        if inbound.is_empty() && outbound.is_empty() {
            return Err(invalid(
                "inbound/outbound",
                "no listeners: add an [[inbound]] or [[outbound]] table",
            ));
        }
        Ok(Config {
            workload_api_socket,
            spiffe_id,
            ops_address,
            policy_file: raw.policy_file,
            access_log,
            log_json,
            drain_timeout: duration(raw.drain_timeout, Duration::from_secs(10), "drain_timeout")?,
            handshake_timeout: duration(
                raw.handshake_timeout,
                Duration::from_secs(10),
                "handshake_timeout",
            )?,
            detect_timeout: duration(
                raw.detect_timeout,
                Duration::from_millis(200),
                "detect_timeout",
            )?,
            connect_timeout: duration(
                raw.connect_timeout,
                Duration::from_secs(5),
                "connect_timeout",
            )?,
            federated_trust_domains,
            worker_threads: match raw.worker_threads {
                None => 1,
                Some(n @ 1..=256) => n,
                Some(n) => return Err(invalid("worker_threads", format!("{n}: use 1 to 256"))),
            },
            inbound,
            outbound,
        })
    }
}

#[cfg(test)]
mod tests;
