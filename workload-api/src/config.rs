//! Configuration of `meshid-agent run`.
//!
//! TOML into [`RawConfig`] (unknown keys are errors naming the key, with line and column; the
//! file's text is never quoted), then into a typed [`Config`]. `trust_domain`,
//! `server_address` and `trust_bundle_path` are required; everything else has a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spiffe::TrustDomain;

/// Default ops listener (`/healthz`, `/readyz`, `/metrics`): loopback only.
pub const DEFAULT_OPS_ADDRESS: &str = "127.0.0.1:8082";

use meshid_api::config::invalid;
pub use meshid_api::config::ConfigError;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The trust domain.
    pub trust_domain: Option<String>,
    /// `host:port` of the CA's node API.
    pub server_address: Option<String>,
    /// More CA addresses to fail over to, in order.
    #[serde(default)]
    pub extra_server_addresses: Vec<String>,
    /// PEM trust bundle used to authenticate the CA on first start (`meshid-ca bundle show`).
    pub trust_bundle_path: Option<PathBuf>,
    /// Where the agent keeps its own key and SVID (mode 0600) and the last bundle.
    pub data_dir: Option<PathBuf>,
    /// The Workload API socket.
    pub socket_path: Option<PathBuf>,
    /// Health and metrics listener.
    pub ops_address: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// File holding a join token (read once, at first attestation).
    pub join_token_file: Option<PathBuf>,
    /// Fraction of an SVID's life after which it is renewed (default 0.5).
    pub rotation_fraction: Option<f64>,
    /// Longest wait between reconnection attempts (default 30s).
    pub max_backoff: Option<String>,
    /// How long an agent without an identity keeps trying to attest with its join token
    /// before it exits non-zero, for its service manager to restart it (default 5m).
    pub attest_timeout: Option<String>,
    /// Workload API connections at once (default 8192).
    pub max_connections: Option<usize>,
    /// Workload API connections at once per peer uid (default 1024).
    pub max_connections_per_uid: Option<usize>,
    /// How long a new Workload API connection may take to send its first request (default 5s).
    pub first_request_timeout: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// CA node API addresses, tried in order.
    pub server_addresses: Vec<String>,
    /// Bootstrap trust bundle.
    pub trust_bundle_path: PathBuf,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Health and metrics listener.
    pub ops_address: SocketAddr,
    /// JSON logs.
    pub log_json: bool,
    /// Join token file.
    pub join_token_file: Option<PathBuf>,
    /// Renew SVIDs after this fraction of their life (with ±10 % jitter).
    pub rotation_fraction: f64,
    /// Longest reconnect backoff.
    pub max_backoff: Duration,
    /// How long to keep trying the first attestation.
    pub attest_timeout: Duration,
    /// Workload API connection limits.
    pub api_limits: meshid_api::uds::Limits,
}

/// Default Workload API socket path.
pub const DEFAULT_SOCKET: &str = "/run/meshid/agent/api.sock";

impl RawConfig {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(meshid_api::config::read_toml(path)?)
    }

    /// Parses TOML text; `path` is only used in messages.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Ok(meshid_api::config::parse_toml(path, text)?)
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let td = raw
            .trust_domain
            .ok_or_else(|| invalid("trust_domain", "is required, e.g. example.org"))?;
        let trust_domain =
            TrustDomain::new(&td).map_err(|e| invalid("trust_domain", format!("{td:?}: {e}")))?;
        if trust_domain.as_str() != td {
            return Err(invalid(
                "trust_domain",
                "write the bare, lower-case name, e.g. example.org",
            ));
        }
        let first = raw.server_address.ok_or_else(|| {
            invalid(
                "server_address",
                "is required: the CA's node API, e.g. ca.internal:8443",
            )
        })?;
        let mut server_addresses = vec![first];
        server_addresses.extend(raw.extra_server_addresses);
        for a in &server_addresses {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(invalid("server_address", format!("{a:?}: write host:port")));
            }
        }
        let trust_bundle_path = raw.trust_bundle_path.ok_or_else(|| {
            invalid(
                "trust_bundle_path",
                "is required: a PEM file from `meshid-ca bundle show`",
            )
        })?;
        let ops = raw.ops_address.as_deref().unwrap_or(DEFAULT_OPS_ADDRESS);
        let ops_address = ops
            .parse()
            .map_err(|e| invalid("ops_address", format!("{ops:?}: {e}")))?;
        let log_json = meshid_api::config::log_json(raw.log_format.as_deref())?;
        let rotation_fraction = raw.rotation_fraction.unwrap_or(0.5);
        if !(0.1..=0.9).contains(&rotation_fraction) {
            return Err(invalid("rotation_fraction", "use a value from 0.1 to 0.9"));
        }
        let max_backoff = match raw.max_backoff.as_deref() {
            None => Duration::from_secs(30),
            Some(v) => humantime::parse_duration(v)
                .map_err(|e| invalid("max_backoff", format!("{v:?}: {e}")))?,
        };
        let attest_timeout = match raw.attest_timeout.as_deref() {
            None => Duration::from_secs(300),
            Some(v) => humantime::parse_duration(v)
                .map_err(|e| invalid("attest_timeout", format!("{v:?}: {e}")))?,
        };
        let defaults = meshid_api::uds::Limits::default();
        let count = |key: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(invalid(key, "must be at least 1")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let api_limits = meshid_api::uds::Limits {
            connections: count("max_connections", raw.max_connections, defaults.connections)?,
            connections_per_uid: count(
                "max_connections_per_uid",
                raw.max_connections_per_uid,
                defaults.connections_per_uid,
            )?,
            first_request_timeout: match raw.first_request_timeout.as_deref() {
                None => defaults.first_request_timeout,
                Some(v) => match humantime::parse_duration(v) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => return Err(invalid("first_request_timeout", "must be more than 0s")),
                    Err(e) => return Err(invalid("first_request_timeout", format!("{v:?}: {e}"))),
                },
            },
        };
        Ok(Config {
            api_limits,
            attest_timeout,
            trust_domain,
            server_addresses,
            trust_bundle_path,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/meshid/agent")),
            socket_path: raw
                .socket_path
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            ops_address,
            log_json,
            join_token_file: raw.join_token_file,
            rotation_fraction,
            max_backoff,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::try_from(RawConfig::from_toml(Path::new("agent.toml"), text)?)
    }

    const MIN: &str = "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8443\"\ntrust_bundle_path = \"/b.pem\"\n";

    #[test]
    fn minimal() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.server_addresses, vec!["127.0.0.1:8443".to_owned()]);
        assert_eq!(c.socket_path, PathBuf::from(DEFAULT_SOCKET));
        assert!((c.rotation_fraction - 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            (format!("{MIN}sockt_path = \"/x\""), "sockt_path"),
            (
                "server_address = \"a:1\"\ntrust_bundle_path = \"/b\"".to_owned(),
                "trust_domain",
            ),
            (
                "trust_domain = \"e.org\"\ntrust_bundle_path = \"/b\"".to_owned(),
                "server_address",
            ),
            (MIN.replace("127.0.0.1:8443", "nohost"), "server_address"),
            (format!("{MIN}rotation_fraction = 1.5"), "rotation_fraction"),
            (format!("{MIN}log_format = \"xml\""), "log_format"),
            (format!("{MIN}max_connections = 0"), "max_connections"),
            (
                format!("{MIN}max_connections_per_uid = 0"),
                "max_connections_per_uid",
            ),
            (
                format!("{MIN}first_request_timeout = \"0s\""),
                "first_request_timeout",
            ),
            (
                format!("{MIN}first_request_timeout = \"soon\""),
                "first_request_timeout",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn example_config_in_deploy_parses() {
        let c = parse(include_str!("../../deploy/agent.toml")).unwrap();
        let defaults = meshid_api::uds::Limits::default();
        assert_eq!(c.api_limits.connections, defaults.connections);
        assert_eq!(
            c.api_limits.connections_per_uid,
            defaults.connections_per_uid
        );
        assert_eq!(
            c.api_limits.first_request_timeout,
            defaults.first_request_timeout
        );
        let c = parse(&format!("{MIN}max_connections_per_uid = 64\n")).unwrap();
        assert_eq!(c.api_limits.connections_per_uid, 64);
    }
}
