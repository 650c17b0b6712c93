//! `[console]`: the read-only web console's listener and who may reach it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use spiffe::{SpiffeId, TrustDomain};

use meshid_api::config::{invalid, ConfigError};

use super::value::duration;

/// How long a login token waits to be used, unless `token_ttl` says otherwise.
pub const TOKEN_TTL: Duration = Duration::from_secs(600);
/// How long a console session lasts, unless `session_ttl` says otherwise.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// `[console]` as written. Absent (or without `address`): no console.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsole {
    /// `host:port` of the console. Loopback serves plain HTTP to browsers on this host; any
    /// other address serves HTTPS, and a browser elsewhere needs an admin SVID or a login token.
    pub address: Option<String>,
    /// SPIFFE IDs whose X509-SVIDs (client certificates of this trust domain) open the console
    /// from elsewhere without a token.
    #[serde(default)]
    pub admins: Vec<String>,
    /// The HTTPS certificate (PEM chain) for a non-loopback address; default: the CA server's
    /// own SVID (`spiffe://<td>/meshid/server`), which browsers trust only if told to.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM), with `cert_file`.
    pub key_file: Option<PathBuf>,
    /// How long a login token (`meshid-ca console token`) waits to be used (default 10m).
    pub token_ttl: Option<String>,
    /// How long the session a token opens lasts (default 8h).
    pub session_ttl: Option<String>,
}

/// The validated `[console]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// The listener.
    pub address: SocketAddr,
    /// Client SPIFFE IDs admitted without a token.
    pub admins: Vec<SpiffeId>,
    /// A certificate and key from files for HTTPS (`None`: the CA server's SVID).
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Login token lifetime.
    pub token_ttl: Duration,
    /// Session lifetime.
    pub session_ttl: Duration,
}

impl ConsoleConfig {
    /// Whether the console serves HTTPS: it does on any address but loopback.
    pub fn tls(&self) -> bool {
        !self.address.ip().is_loopback()
    }
}

impl RawConsole {
    /// Validates `[console]` for trust domain `td`; `None` when the console is off.
    pub fn validate(self, td: &TrustDomain) -> Result<Option<ConsoleConfig>, ConfigError> {
        let Some(address) = self.address else {
            let set = !self.admins.is_empty()
                || self.cert_file.is_some()
                || self.key_file.is_some()
                || self.token_ttl.is_some()
                || self.session_ttl.is_some();
            if set {
                return Err(invalid(
                    "console.address",
                    "is required with the other console settings: set it to serve the console, e.g. \"127.0.0.1:8480\"",
                ));
            }
            return Ok(None);
        };
        let address: SocketAddr = address.parse().map_err(|e| {
            invalid(
                "console.address",
                format!("{address:?}: {e}; write host:port, e.g. 127.0.0.1:8480"),
            )
        })?;
        let admins = self
            .admins
            .iter()
            .map(|a| {
                let id = SpiffeId::new(a).map_err(|e| {
                    invalid("console.admins", format!("{a:?} is not a SPIFFE ID: {e}"))
                })?;
                if id.trust_domain() != td {
                    return Err(invalid(
                        "console.admins",
                        format!("{a:?} is not in trust domain {td}: only this trust domain's SVIDs are verified"),
                    ));
                }
                Ok(id)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cert = match (self.cert_file, self.key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((c, k)),
            _ => {
                return Err(invalid(
                    "console.cert_file",
                    "cert_file and key_file go together (a PEM certificate chain and its key)",
                ))
            }
        };
        let loopback = address.ip().is_loopback();
        if loopback && (cert.is_some() || !admins.is_empty()) {
            return Err(invalid(
                "console.address",
                "is loopback, served as plain HTTP to this host only: cert_file and admins apply to another address, e.g. \"0.0.0.0:8480\"",
            ));
        }
        Ok(Some(ConsoleConfig {
            address,
            admins,
            cert,
            token_ttl: duration("console.token_ttl", self.token_ttl.as_deref(), TOKEN_TTL)?,
            session_ttl: duration(
                "console.session_ttl",
                self.session_ttl.as_deref(),
                SESSION_TTL,
            )?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn parse(text: &str) -> Result<Option<ConsoleConfig>, ConfigError> {
        let raw: RawConsole = toml::from_str(text).unwrap();
        raw.validate(&td())
    }

    #[test]
    fn absent_is_off_and_loopback_is_plain() {
        assert_eq!(parse("").unwrap(), None);
        let c = parse("address = \"127.0.0.1:8480\"").unwrap().unwrap();
        assert!(!c.tls());
        assert_eq!(c.token_ttl, TOKEN_TTL);
        assert_eq!(c.session_ttl, SESSION_TTL);
        let c = parse("address = \"[::1]:8480\"").unwrap().unwrap();
        assert!(!c.tls());
    }

    #[test]
    fn another_address_is_https_with_admins() {
        let c = parse(
            "address = \"0.0.0.0:8480\"\nadmins = [\"spiffe://example.org/ops/alice\"]\ntoken_ttl = \"2m\"",
        )
        .unwrap()
        .unwrap();
        assert!(c.tls());
        assert_eq!(c.admins[0].to_string(), "spiffe://example.org/ops/alice");
        assert_eq!(c.token_ttl, Duration::from_secs(120));
    }

    #[test]
    fn mistakes_name_the_key_and_the_fix() {
        for (text, key, says) in [
            (
                "admins = [\"spiffe://example.org/a\"]",
                "console.address",
                "is required",
            ),
            ("address = \"localhost\"", "console.address", "host:port"),
            (
                "address = \"0.0.0.0:1\"\nadmins = [\"x\"]",
                "console.admins",
                "not a SPIFFE ID",
            ),
            (
                "address = \"0.0.0.0:1\"\nadmins = [\"spiffe://other.org/a\"]",
                "console.admins",
                "not in trust domain",
            ),
            (
                "address = \"0.0.0.0:1\"\ncert_file = \"c.pem\"",
                "console.cert_file",
                "go together",
            ),
            (
                "address = \"127.0.0.1:1\"\nadmins = [\"spiffe://example.org/a\"]",
                "console.address",
                "is loopback",
            ),
            (
                "address = \"127.0.0.1:1\"\nsession_ttl = \"soon\"",
                "console.session_ttl",
                "not a duration",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{text}: {e}");
        }
    }
}
