//! Configuration of `meshid-ca run`.
//!
//! The TOML file is read into [`RawConfig`] (unknown keys are errors that name the key), then
//! converted into a typed [`Config`] in which every duration, path and identifier has been
//! checked. Every key has a default; `trust_domain` and `data_dir` are enough to start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spiffe::TrustDomain;

use crate::svid::KeyType;

pub mod console;
mod value;
pub use console::ConsoleConfig;
use value::duration;

/// Default lifetime of a trust anchor.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of an issuing intermediate.
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of an X.509-SVID.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default lifetime of a JWT-SVID.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// Default lifetime of a join token.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// How long an agent's superseded SVID is still honoured after a renewal by default (calls in
/// flight on the old connection finish; the agent reconnects with the new one at once).
pub const AGENT_SVID_OVERLAP: Duration = Duration::from_secs(120);

/// Default ops listener (`/healthz`, `/readyz`, `/metrics`): loopback only.
pub const DEFAULT_OPS_ADDRESS: &str = "127.0.0.1:8081";
/// Default node API listener: loopback only, so a fresh CA is not reachable from the network
/// until the operator says so (e.g. `0.0.0.0:8443`).
pub const DEFAULT_NODE_ADDRESS: &str = "127.0.0.1:8443";

use meshid_api::config::invalid;
pub use meshid_api::config::ConfigError;

/// Whether a datastore URL carries a password (`scheme://user:password@host`, or a
/// `password=` parameter).
fn has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    // Up to the last '@' before the query: a password may hold an unescaped '/'.
    let before_query = rest.split('?').next().unwrap_or("");
    let userinfo = before_query.rsplit_once('@').map(|(u, _)| u);
    userinfo.is_some_and(|u| u.contains(':')) || url.contains("password=")
}

/// The configuration file as written. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The trust domain, e.g. `example.org`.
    pub trust_domain: Option<String>,
    /// Directory for the CA's keys and the SQLite database.
    pub data_dir: Option<PathBuf>,
    /// `sqlite` (default: a file in the data directory), `sqlite://PATH` or `postgres://...`.
    pub datastore: Option<String>,
    /// Name of this CA server; each server of a trust domain has its own intermediate.
    pub server_id: Option<String>,
    /// Path of the admin API socket (default `<data_dir>/admin.sock`).
    pub admin_socket: Option<PathBuf>,
    /// `host:port` of the health and metrics HTTP listener (default `127.0.0.1:8081`).
    pub ops_address: Option<String>,
    /// `host:port` of the node API (gRPC over TLS) for agents (default `127.0.0.1:8443`).
    pub node_address: Option<String>,
    /// `text` (default) or `json` log lines.
    pub log_format: Option<String>,
    /// Key and certificate settings.
    #[serde(default)]
    pub ca: RawCaConfig,
    /// Join token settings.
    #[serde(default)]
    pub join_tokens: RawTokenConfig,
    /// Node API connection limits.
    #[serde(default)]
    pub node_limits: RawNodeLimits,
    /// How long an agent's superseded SVID is still honoured after a renewal (default 2m).
    pub agent_svid_overlap: Option<String>,
    /// Federation: the bundle endpoint, and how federated endpoints are verified.
    #[serde(default)]
    pub federation: RawFederation,
    /// CI systems whose OIDC tokens are exchanged for SVIDs.
    #[serde(default)]
    pub ci: RawCi,
    /// Where the audit trail is shipped besides the datastore.
    #[serde(default)]
    pub audit: RawAudit,
    /// The read-only web console (off unless `address` is set).
    #[serde(default)]
    pub console: console::RawConsole,
}

/// `[audit]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// The append-only JSON-lines file every record is shipped to (a volume of its own).
    pub file: Option<PathBuf>,
    /// A syslog socket (Unix datagram) every record is shipped to, e.g. "/dev/log".
    pub syslog: Option<PathBuf>,
    /// The Ed25519 key that signs checkpoints [default: DATA_DIR/keys/audit-checkpoint.key].
    pub checkpoint_key_file: Option<PathBuf>,
    /// How often a signed checkpoint is shipped [default: 60s].
    pub checkpoint_interval: Option<String>,
    /// How often the counts of refused node API calls and admin reads are recorded [default:
    /// 60s].
    pub summary_interval: Option<String>,
}

/// The validated `[audit]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The JSON-lines file sink.
    pub file: Option<PathBuf>,
    /// The syslog socket.
    pub syslog: Option<PathBuf>,
    /// The checkpoint key.
    pub checkpoint_key_file: PathBuf,
    /// The checkpoint interval.
    pub checkpoint_interval: Duration,
    /// The summary interval.
    pub summary_interval: Duration,
}

impl AuditConfig {
    /// The defaults for a data directory: no sinks, 60 s intervals.
    pub fn defaults(data_dir: &Path) -> Self {
        Self {
            file: None,
            syslog: None,
            checkpoint_key_file: data_dir.join("keys").join("audit-checkpoint.key"),
            checkpoint_interval: Duration::from_secs(60),
            summary_interval: Duration::from_secs(60),
        }
    }
}

impl RawAudit {
    fn validate(self, data_dir: &Path) -> Result<AuditConfig, ConfigError> {
        let d = AuditConfig::defaults(data_dir);
        for (key, path) in [("audit.file", &self.file), ("audit.syslog", &self.syslog)] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(invalid(key, "must be an absolute path"));
            }
        }
        Ok(AuditConfig {
            file: self.file,
            syslog: self.syslog,
            checkpoint_key_file: self.checkpoint_key_file.unwrap_or(d.checkpoint_key_file),
            checkpoint_interval: duration(
                "audit.checkpoint_interval",
                self.checkpoint_interval.as_deref(),
                d.checkpoint_interval,
            )?,
            summary_interval: duration(
                "audit.summary_interval",
                self.summary_interval.as_deref(),
                d.summary_interval,
            )?,
        })
    }
}

/// `[ci]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCi {
    /// `[[ci.issuers]]`.
    #[serde(default)]
    pub issuers: Vec<RawCiIssuer>,
}

/// One `[[ci.issuers]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCiIssuer {
    /// A short name (`github`).
    pub name: String,
    /// The `iss` of its tokens.
    pub issuer: String,
    /// Where its JWKS is (`https://...`).
    pub jwks_url: String,
    /// The `aud` its tokens must carry.
    pub audience: String,
    /// How old a token may be (default 10m).
    pub max_age: Option<String>,
    /// The longest SVID granted (default 15m, at most 1h).
    pub max_ttl: Option<String>,
    /// PEM roots for the JWKS fetch (default: the system's).
    pub roots_file: Option<PathBuf>,
    /// `[[ci.issuers.rules]]`, in order.
    #[serde(default)]
    pub rules: Vec<RawCiRule>,
}

/// One `[[ci.issuers.rules]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCiRule {
    /// A name for audit records.
    pub name: String,
    /// The SPIFFE ID, with `{claim}` placeholders.
    pub spiffe_id: String,
    /// Claim conditions (`ref = "refs/heads/main"`; a trailing `*` matches a prefix).
    #[serde(default)]
    pub when: std::collections::BTreeMap<String, String>,
}

/// A validated `[[ci.issuers]]`.
#[derive(Debug, Clone)]
pub struct CiIssuerConfig {
    /// What tokens are verified and mapped with.
    pub issuer: crate::ci::CiIssuer,
    /// Its JWKS.
    pub jwks_url: http::Uri,
    /// Roots for the JWKS fetch (`None`: the system's).
    pub roots_file: Option<PathBuf>,
}

impl RawCi {
    fn validate(self, td: &TrustDomain) -> Result<Vec<CiIssuerConfig>, ConfigError> {
        let mut out: Vec<CiIssuerConfig> = Vec::new();
        for (i, raw) in self.issuers.into_iter().enumerate() {
            let key = |field: &str| format!("ci.issuers[{i}].{field}");
            let bad = |field: &str, why: String| invalid(key(field), why);
            let issuer = crate::oidc::check_issuer(&raw.issuer).map_err(|w| bad("issuer", w))?;
            if out
                .iter()
                .any(|c| c.issuer.issuer == issuer || c.issuer.name == raw.name)
            {
                return Err(bad("issuer", "each CI issuer (and name) once".into()));
            }
            let jwks_url: http::Uri = raw
                .jwks_url
                .parse()
                .ok()
                .filter(|u: &http::Uri| u.scheme_str() == Some("https") && u.host().is_some())
                .ok_or_else(|| {
                    bad(
                        "jwks_url",
                        format!("{:?}: write an https:// URL", raw.jwks_url),
                    )
                })?;
            if raw.audience.is_empty() || raw.name.is_empty() {
                return Err(bad(
                    "audience",
                    "name and audience must not be empty".into(),
                ));
            }
            let span =
                |field: &str, value: Option<&str>, default: u64| -> Result<Duration, ConfigError> {
                    match value {
                        None => Ok(Duration::from_secs(default)),
                        Some(v) => humantime::parse_duration(v)
                            .ok()
                            .filter(|d| !d.is_zero() && d.as_secs() <= 3600)
                            .ok_or_else(|| {
                                bad(field, format!("{v:?}: a duration from 1s to 1h, e.g. 10m"))
                            }),
                    }
                };
            let max_age = span("max_age", raw.max_age.as_deref(), 600)?;
            let max_ttl = span("max_ttl", raw.max_ttl.as_deref(), 900)?;
            if raw.rules.is_empty() {
                return Err(bad(
                    "rules",
                    "at least one rule: without one no token gets anything".into(),
                ));
            }
            let mut rules = Vec::new();
            for (j, r) in raw.rules.into_iter().enumerate() {
                let field = format!("rules[{j}]");
                if r.when.is_empty() {
                    return Err(bad(&field, format!("rule {:?} has no `when` condition: say which tokens it is for (e.g. repository and ref)", r.name)));
                }
                // The template, filled with a placeholder value, must be an ID of this trust
                // domain.
                let probe =
                    crate::ci::fill(&r.spiffe_id, |_| Some("x")).map_err(|w| bad(&field, w))?;
                match spiffe::SpiffeId::new(&probe) {
                    Ok(id) if id.trust_domain() == td => {}
                    Ok(_) => return Err(bad(&field, format!("{:?} is not in {td}", r.spiffe_id))),
                    Err(e) => return Err(bad(&field, format!("{:?}: {e}", r.spiffe_id))),
                }
                rules.push(crate::ci::Rule {
                    name: r.name,
                    when: r
                        .when
                        .into_iter()
                        .map(|(k, v)| (k, crate::ci::ClaimMatch::parse(&v)))
                        .collect(),
                    spiffe_id: r.spiffe_id,
                });
            }
            out.push(CiIssuerConfig {
                issuer: crate::ci::CiIssuer {
                    name: raw.name,
                    issuer,
                    audience: raw.audience,
                    max_age,
                    max_ttl,
                    rules,
                },
                jwks_url,
                roots_file: raw.roots_file,
            });
        }
        Ok(out)
    }
}

/// `[federation]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederation {
    /// `host:port` of this trust domain's bundle endpoint (off when absent).
    pub bundle_endpoint_address: Option<String>,
    /// `https_spiffe` (default: the CA server's own SVID) or `https_web` (the files below).
    pub bundle_endpoint_profile: Option<String>,
    /// PEM certificate chain of the `https_web` bundle endpoint.
    pub bundle_endpoint_cert_file: Option<PathBuf>,
    /// PEM private key of the `https_web` bundle endpoint (mode 0600).
    pub bundle_endpoint_key_file: Option<PathBuf>,
    /// PEM roots that `https_web` endpoints of federated trust domains are verified against
    /// (default: the system's).
    pub web_roots_file: Option<PathBuf>,
}

/// `[node_limits]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeLimits {
    /// Open connections at once (default 16384).
    pub max_connections: Option<usize>,
    /// Open connections per source address (default 1024).
    pub max_connections_per_source: Option<usize>,
    /// TLS handshakes in progress at once, past which the oldest is shed (default 1024).
    pub max_pending_handshakes: Option<usize>,
    /// TLS handshakes in progress per source address (default 64).
    pub max_pending_handshakes_per_source: Option<usize>,
    /// Lifetime of a connection without a client certificate (default 10s).
    pub certless_lifetime: Option<String>,
}

/// `[ca]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaConfig {
    /// `ec-p256` (default) or `ec-p384`.
    pub key_type: Option<String>,
    /// Trust anchor lifetime, e.g. `8760h`.
    pub root_ttl: Option<String>,
    /// Issuing intermediate lifetime, e.g. `24h`.
    pub intermediate_ttl: Option<String>,
    /// JWT signing key lifetime (default: the intermediate's).
    pub jwt_key_ttl: Option<String>,
    /// `ec-p256` (default, ES256) or `rsa-2048` (RS256) for new JWT signing keys.
    pub jwt_key_type: Option<String>,
    /// Default X.509-SVID lifetime.
    pub default_x509_svid_ttl: Option<String>,
    /// Default JWT-SVID lifetime.
    pub default_jwt_svid_ttl: Option<String>,
    /// The longest JWT-SVID lifetime granted (default and at most 24h); a retired JWT key
    /// leaves the bundle this long after its last token.
    pub max_jwt_svid_ttl: Option<String>,
    /// How often rotation is checked (default 10s).
    pub rotation_interval: Option<String>,
    /// PEM certificate of an operator-supplied root (upstream authority).
    pub upstream_cert: Option<PathBuf>,
    /// PEM PKCS#8 key of the operator-supplied root.
    pub upstream_key: Option<PathBuf>,
    /// `spiffe_refresh_hint` published in the bundle (default 5m).
    pub bundle_refresh_hint: Option<String>,
    /// The OIDC issuer URL (`https://...`): JWT-SVIDs carry it as `iss`, and the bundle
    /// endpoint serves its discovery document and JWKS (default: none).
    pub jwt_issuer: Option<String>,
    /// `auto` (default): the root is rotated by its age (next root prepared at half its life,
    /// activated with a sixth left once every live agent has delivered it, the old one retired
    /// once nothing it vouches for is unexpired); `manual`: only `meshid-ca ca root ...`.
    pub root_rotation: Option<String>,
}

/// `[join_tokens]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenConfig {
    /// Default lifetime, e.g. `10m`.
    pub default_ttl: Option<String>,
}

/// Where the datastore lives.
#[derive(Clone, PartialEq, Eq)]
pub struct DatastoreUrl(String);

impl DatastoreUrl {
    /// The URL to open.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        if self.0.starts_with("postgres") {
            "postgres"
        } else {
            "sqlite"
        }
    }
}

impl std::fmt::Debug for DatastoreUrl {
    /// Never prints a password that may be in the URL.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatastoreUrl({})", redact_url(&self.0))
    }
}

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last `@` ends the user information, even when an unescaped `/`, `?` or `#` in the
    // password hides where the authority ends: better hide too much than a password.
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo
                .split(':')
                .next()
                .filter(|u| !u.contains(['/', '?', '#']))
                .unwrap_or("***");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// The upstream authority: an operator-supplied root certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAuthority {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key.
    pub key: PathBuf,
}

/// The CA's key settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    /// Key algorithm of roots and intermediates.
    pub key_type: KeyType,
    /// Root lifetime.
    pub root_ttl: Duration,
    /// Intermediate lifetime.
    pub intermediate_ttl: Duration,
    /// JWT key lifetime.
    pub jwt_key_ttl: Duration,
    /// Default X.509-SVID lifetime.
    pub default_x509_svid_ttl: Duration,
    /// Default JWT-SVID lifetime.
    pub default_jwt_svid_ttl: Duration,
    /// How often rotation is checked.
    pub rotation_interval: Duration,
    /// Operator-supplied root, if any.
    pub upstream: Option<UpstreamAuthority>,
    /// Published refresh hint.
    pub bundle_refresh_hint: Duration,
    /// The OIDC issuer of JWT-SVIDs (`iss`), if any.
    pub jwt_issuer: Option<String>,
    /// The kind of new JWT signing keys.
    pub jwt_key_type: crate::jwt::JwtKeyType,
    /// The longest JWT-SVID lifetime granted.
    pub max_jwt_svid_ttl: Duration,
    /// Whether the root rotates by its age.
    pub root_rotation: RootRotation,
}

/// How the trust anchor is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootRotation {
    /// By its age, gated on measured delivery like the manual steps.
    #[default]
    Auto,
    /// Only by the operator (`meshid-ca ca root prepare | activate | retire`).
    Manual,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory (created with mode 0700).
    pub data_dir: PathBuf,
    /// The datastore.
    pub datastore: DatastoreUrl,
    /// This server's name.
    pub server_id: String,
    /// Admin API socket path.
    pub admin_socket: PathBuf,
    /// Health and metrics listener.
    pub ops_address: SocketAddr,
    /// Node API listener.
    pub node_address: SocketAddr,
    /// JSON logs.
    pub log_json: bool,
    /// Key settings.
    pub ca: CaSettings,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
    /// The node API's connection limits.
    pub node_limits: crate::node::admission::Limits,
    /// How long an agent's superseded SVID is still honoured after a renewal.
    pub agent_svid_overlap: Duration,
    /// Federation settings.
    pub federation: FederationConfig,
    /// The CI systems whose tokens are exchanged (`[[ci.issuers]]`), served on the bundle
    /// endpoint.
    pub ci_issuers: Vec<CiIssuerConfig>,
    /// Audit sinks, checkpoints and summaries.
    pub audit: AuditConfig,
    /// The web console, if served.
    pub console: Option<ConsoleConfig>,
}

/// The validated `[federation]` settings.
#[derive(Debug, Clone, Default)]
pub struct FederationConfig {
    /// This trust domain's bundle endpoint, if served.
    pub bundle_endpoint: Option<BundleEndpoint>,
    /// The roots for federated `https_web` endpoints (`None`: the system's).
    pub web_roots_file: Option<PathBuf>,
}

/// Where and how the bundle endpoint is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpoint {
    /// The listener.
    pub address: SocketAddr,
    /// `None` for https_spiffe; the certificate and key files for https_web.
    pub web_cert: Option<(PathBuf, PathBuf)>,
}

impl RawFederation {
    fn validate(self) -> Result<FederationConfig, ConfigError> {
        let f = self;
        let files = (f.bundle_endpoint_cert_file, f.bundle_endpoint_key_file);
        let bundle_endpoint = match f.bundle_endpoint_address {
            None => {
                if f.bundle_endpoint_profile.is_some() || files.0.is_some() || files.1.is_some() {
                    return Err(invalid(
                        "federation.bundle_endpoint_address",
                        "is required with the other bundle_endpoint settings: set it to serve the bundle, e.g. \"0.0.0.0:8443\"",
                    ));
                }
                None
            }
            Some(address) => {
                let address = address.parse().map_err(|e| {
                    invalid(
                        "federation.bundle_endpoint_address",
                        format!("{address:?}: {e}; write host:port, e.g. 0.0.0.0:8443"),
                    )
                })?;
                let web_cert = match (f.bundle_endpoint_profile.as_deref(), files) {
                    (None | Some("https_spiffe"), (None, None)) => None,
                    (None | Some("https_spiffe"), _) => {
                        return Err(invalid(
                            "federation.bundle_endpoint_cert_file",
                            "only with bundle_endpoint_profile = \"https_web\" (https_spiffe presents the CA server's SVID)",
                        ))
                    }
                    (Some("https_web"), (Some(cert), Some(key))) => Some((cert, key)),
                    (Some("https_web"), _) => {
                        return Err(invalid(
                            "federation.bundle_endpoint_cert_file",
                            "https_web needs bundle_endpoint_cert_file and bundle_endpoint_key_file (a Web PKI certificate for the endpoint's host name)",
                        ))
                    }
                    (Some(other), _) => {
                        return Err(invalid(
                            "federation.bundle_endpoint_profile",
                            format!("{other:?}: use https_spiffe or https_web"),
                        ))
                    }
                };
                Some(BundleEndpoint { address, web_cert })
            }
        };
        Ok(FederationConfig {
            bundle_endpoint,
            web_roots_file: f.web_roots_file,
        })
    }
}

impl RawConfig {
    /// Reads and parses a TOML file. A file that holds a datastore password must not be
    /// readable by group or others.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let raw: Self = meshid_api::config::read_toml(path)?;
        if raw.datastore.as_deref().is_some_and(has_password) {
            meshid_api::config::check_private(path, "config (it holds the datastore password)")?;
        }
        Ok(raw)
    }

    /// Parses TOML text; `path` is only used in messages.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Ok(meshid_api::config::parse_toml(path, text)?)
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let td = raw.trust_domain.ok_or_else(|| {
            invalid(
                "trust_domain",
                "is required (or pass --trust-domain), e.g. example.org",
            )
        })?;
        let trust_domain =
            TrustDomain::new(&td).map_err(|e| invalid("trust_domain", format!("{td:?}: {e}")))?;
        if trust_domain.as_str() != td {
            return Err(invalid(
                "trust_domain",
                format!(
                    "{td:?}: write the bare, lower-case name, e.g. {}",
                    trust_domain.as_str()
                ),
            ));
        }
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/meshid/ca"));
        let datastore = match raw.datastore.as_deref() {
            None | Some("sqlite") => {
                format!("sqlite://{}", data_dir.join("meshid-ca.db").display())
            }
            Some(url)
                if url.starts_with("sqlite://")
                    || url.starts_with("postgres://")
                    || url.starts_with("postgresql://") =>
            {
                url.to_owned()
            }
            Some(other) => {
                return Err(invalid(
                    "datastore",
                    format!(
                        "{:?}: use \"sqlite\", sqlite://PATH or postgres://...",
                        redact_url(other)
                    ),
                ))
            }
        };
        let server_id = raw.server_id.unwrap_or_else(|| "ca-1".to_owned());
        if server_id.is_empty()
            || server_id.len() > 64
            || !server_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid(
                "server_id",
                "use 1 to 64 characters from [A-Za-z0-9._-]",
            ));
        }
        let admin_socket = raw
            .admin_socket
            .unwrap_or_else(|| data_dir.join("admin.sock"));
        let ops = raw.ops_address.as_deref().unwrap_or(DEFAULT_OPS_ADDRESS);
        let ops_address = ops.parse().map_err(|e| {
            invalid(
                "ops_address",
                format!("{ops:?}: {e}; write host:port, e.g. 127.0.0.1:8081"),
            )
        })?;
        let node = raw.node_address.as_deref().unwrap_or(DEFAULT_NODE_ADDRESS);
        let node_address = node.parse().map_err(|e| {
            invalid(
                "node_address",
                format!("{node:?}: {e}; write ip:port, e.g. 0.0.0.0:8443"),
            )
        })?;
        let log_json = meshid_api::config::log_json(raw.log_format.as_deref())?;
        let c = raw.ca;
        let key_type = match c.key_type.as_deref() {
            None => KeyType::default(),
            Some(k) => k
                .parse()
                .map_err(|_| invalid("ca.key_type", format!("{k:?}: use ec-p256 or ec-p384")))?,
        };
        let root_ttl = duration("ca.root_ttl", c.root_ttl.as_deref(), DEFAULT_ROOT_TTL)?;
        let intermediate_ttl = duration(
            "ca.intermediate_ttl",
            c.intermediate_ttl.as_deref(),
            DEFAULT_INTERMEDIATE_TTL,
        )?;
        if intermediate_ttl > root_ttl {
            return Err(invalid(
                "ca.intermediate_ttl",
                "must not be longer than ca.root_ttl",
            ));
        }
        let jwt_key_ttl = duration("ca.jwt_key_ttl", c.jwt_key_ttl.as_deref(), intermediate_ttl)?;
        let default_x509_svid_ttl = duration(
            "ca.default_x509_svid_ttl",
            c.default_x509_svid_ttl.as_deref(),
            DEFAULT_X509_SVID_TTL,
        )?;
        let default_jwt_svid_ttl = duration(
            "ca.default_jwt_svid_ttl",
            c.default_jwt_svid_ttl.as_deref(),
            DEFAULT_JWT_SVID_TTL,
        )?;
        let rotation_interval = duration(
            "ca.rotation_interval",
            c.rotation_interval.as_deref(),
            Duration::from_secs(10),
        )?;
        let bundle_refresh_hint = duration(
            "ca.bundle_refresh_hint",
            c.bundle_refresh_hint.as_deref(),
            Duration::from_secs(300),
        )?;
        let jwt_issuer = match c.jwt_issuer {
            None => None,
            Some(issuer) => Some(
                crate::oidc::check_issuer(&issuer).map_err(|why| invalid("ca.jwt_issuer", why))?,
            ),
        };
        let max_jwt_svid_ttl = duration(
            "ca.max_jwt_svid_ttl",
            c.max_jwt_svid_ttl.as_deref(),
            crate::entry::MAX_JWT_TTL,
        )?;
        if max_jwt_svid_ttl > crate::entry::MAX_JWT_TTL {
            return Err(invalid("ca.max_jwt_svid_ttl", "is at most 24h"));
        }
        if default_jwt_svid_ttl > max_jwt_svid_ttl {
            return Err(invalid(
                "ca.default_jwt_svid_ttl",
                "is longer than ca.max_jwt_svid_ttl: lower it, or raise the maximum",
            ));
        }
        let jwt_key_type = match c.jwt_key_type.as_deref() {
            None | Some("ec-p256") => crate::jwt::JwtKeyType::Es256,
            Some("rsa-2048") => crate::jwt::JwtKeyType::Rs256,
            Some(other) => {
                return Err(invalid(
                    "ca.jwt_key_type",
                    format!("{other:?}: use \"ec-p256\" (ES256) or \"rsa-2048\" (RS256)"),
                ))
            }
        };
        let root_rotation = match c.root_rotation.as_deref() {
            None | Some("auto") => RootRotation::Auto,
            Some("manual") => RootRotation::Manual,
            Some(_) => {
                return Err(invalid(
                    "ca.root_rotation",
                    "must be \"auto\" or \"manual\"",
                ))
            }
        };
        let upstream = match (c.upstream_cert, c.upstream_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(UpstreamAuthority { cert, key }),
            _ => {
                return Err(invalid(
                    "ca.upstream_cert",
                    "upstream_cert and upstream_key go together",
                ))
            }
        };
        let join_token_ttl = duration(
            "join_tokens.default_ttl",
            raw.join_tokens.default_ttl.as_deref(),
            DEFAULT_JOIN_TOKEN_TTL,
        )?;
        let defaults = crate::node::admission::Limits::default();
        let n = raw.node_limits;
        let count = |key: &'static str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(invalid(key, "must be at least 1")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let node_limits = crate::node::admission::Limits {
            connections: count(
                "node_limits.max_connections",
                n.max_connections,
                defaults.connections,
            )?,
            connections_per_source: count(
                "node_limits.max_connections_per_source",
                n.max_connections_per_source,
                defaults.connections_per_source,
            )?,
            pending: count(
                "node_limits.max_pending_handshakes",
                n.max_pending_handshakes,
                defaults.pending,
            )?,
            pending_per_source: count(
                "node_limits.max_pending_handshakes_per_source",
                n.max_pending_handshakes_per_source,
                defaults.pending_per_source,
            )?,
            certless_lifetime: duration(
                "node_limits.certless_lifetime",
                n.certless_lifetime.as_deref(),
                defaults.certless_lifetime,
            )?,
            ..defaults
        };
        let agent_svid_overlap = duration(
            "agent_svid_overlap",
            raw.agent_svid_overlap.as_deref(),
            AGENT_SVID_OVERLAP,
        )?;
        let federation = raw.federation.validate()?;
        let ci_issuers = raw.ci.validate(&trust_domain)?;
        if !ci_issuers.is_empty() && federation.bundle_endpoint.is_none() {
            return Err(invalid(
                "ci.issuers",
                "need federation.bundle_endpoint_address: the exchange is served there",
            ));
        }
        if jwt_issuer.is_some() && federation.bundle_endpoint.is_none() {
            return Err(invalid(
                "ca.jwt_issuer",
                "needs federation.bundle_endpoint_address: the bundle endpoint serves the issuer's \
                 discovery document and JWKS (with bundle_endpoint_profile = \"https_web\" for \
                 relying parties that know only Web PKI roots)",
            ));
        }
        let audit = raw.audit.validate(&data_dir)?;
        let console = raw.console.validate(&trust_domain)?;
        Ok(Config {
            audit,
            console,
            agent_svid_overlap,
            federation,
            ci_issuers,
            node_limits,
            trust_domain,
            data_dir,
            datastore: DatastoreUrl(datastore),
            server_id,
            admin_socket,
            ops_address,
            node_address,
            log_json,
            ca: CaSettings {
                key_type,
                root_ttl,
                intermediate_ttl,
                jwt_key_ttl,
                default_x509_svid_ttl,
                default_jwt_svid_ttl,
                rotation_interval,
                upstream,
                bundle_refresh_hint,
                root_rotation,
                jwt_issuer,
                jwt_key_type,
                max_jwt_svid_ttl,
            },
            join_token_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_found_wherever_a_url_carries_one() {
        for (url, has) in [
            ("sqlite", false),
            ("sqlite:///var/lib/meshid/ca.db", false),
            ("postgres://meshid@db/meshid", false),
            ("postgres://meshid:pw@db/meshid", true),
            (
                "postgres://meshid:p%40ss@db:5432/meshid?sslmode=require",
                true,
            ),
            ("postgres://meshid:a/b@db/meshid", true),
            ("postgres://db/meshid?user=meshid&password=pw", true),
            ("postgres://db/meshid?user=a:b", false),
            ("postgres://u:p@h", true),
        ] {
            assert_eq!(super::has_password(url), has, "{url}");
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::try_from(RawConfig::from_toml(Path::new("ca.toml"), text)?)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"").unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.datastore.as_str(), "sqlite:///tmp/x/meshid-ca.db");
        assert_eq!(c.admin_socket, PathBuf::from("/tmp/x/admin.sock"));
        assert_eq!(c.ca.intermediate_ttl, DEFAULT_INTERMEDIATE_TTL);
        assert_eq!(c.ca.key_type, KeyType::EcP256);
        assert_eq!(c.join_token_ttl, Duration::from_secs(600));
        assert_eq!(c.node_address, "127.0.0.1:8443".parse().unwrap());
        let c = parse("trust_domain = \"example.org\"\nnode_address = \"0.0.0.0:9443\"").unwrap();
        assert_eq!(c.node_address, "0.0.0.0:9443".parse().unwrap());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("trust_domain = \"example.org\"\ntrust_domian = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("trust_domian"), "{err}");
        let err = parse("trust_domain = \"example.org\"\n[ca]\nroot_tll = \"1h\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("root_tll"), "{err}");
        assert!(err.contains("ca.toml:3:1"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (text, key) in [
            ("trust_domain = \"Example.org\"", "trust_domain"),
            ("", "trust_domain"),
            (
                "trust_domain = \"e.org\"\n[ca]\nintermediate_ttl = \"soon\"",
                "ca.intermediate_ttl",
            ),
            (
                "trust_domain = \"e.org\"\n[ca]\nintermediate_ttl = \"0s\"",
                "ca.intermediate_ttl",
            ),
            (
                "trust_domain = \"e.org\"\n[ca]\nkey_type = \"rsa-1024\"",
                "ca.key_type",
            ),
            (
                "trust_domain = \"e.org\"\n[ca]\nroot_ttl = \"1h\"\nintermediate_ttl = \"2h\"",
                "ca.intermediate_ttl",
            ),
            (
                "trust_domain = \"e.org\"\nops_address = \"nowhere\"",
                "ops_address",
            ),
            (
                "trust_domain = \"e.org\"\ndatastore = \"mysql://u:pw@h/db\"",
                "datastore",
            ),
            (
                "trust_domain = \"e.org\"\nnode_address = \"ca.example.org\"",
                "node_address",
            ),
            ("trust_domain = \"e.org\"\nserver_id = \"a b\"", "server_id"),
            (
                "trust_domain = \"e.org\"\n[ca]\nupstream_cert = \"/x\"",
                "ca.upstream_cert",
            ),
            (
                "trust_domain = \"e.org\"\n[node_limits]\nmax_connections = 0",
                "node_limits.max_connections",
            ),
            (
                "trust_domain = \"e.org\"\n[node_limits]\nmax_pending_handshakes_per_source = -1",
                "ca.toml:3:37",
            ),
            (
                "trust_domain = \"e.org\"\n[node_limits]\ncertless_lifetime = \"0s\"",
                "node_limits.certless_lifetime",
            ),
            (
                "trust_domain = \"e.org\"\n[node_limits]\nmax_handshakes = 3",
                "max_handshakes",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err}");
        }
    }

    #[test]
    fn example_config_in_deploy_parses() {
        let text = include_str!("../../deploy/ca.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.ca.default_jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.node_address, DEFAULT_NODE_ADDRESS.parse().unwrap());
        let defaults = crate::node::admission::Limits::default();
        assert_eq!(c.node_limits.connections, defaults.connections);
        assert_eq!(
            c.node_limits.pending_per_source,
            defaults.pending_per_source
        );
        assert_eq!(c.node_limits.certless_lifetime, defaults.certless_lifetime);
        let c = parse(
            "trust_domain = \"e.org\"\n[node_limits]\nmax_connections_per_source = 5000\ncertless_lifetime = \"30s\"",
        )
        .unwrap();
        assert_eq!(c.node_limits.connections_per_source, 5000);
        assert_eq!(c.node_limits.certless_lifetime, Duration::from_secs(30));
    }

    #[test]
    fn the_bundle_endpoint_is_off_unless_an_address_is_set_and_its_profile_is_whole() {
        let c = parse("trust_domain = \"e.org\"").unwrap();
        assert_eq!(c.federation.bundle_endpoint, None);
        let c = parse(
            "trust_domain = \"e.org\"\n[federation]\nbundle_endpoint_address = \"127.0.0.1:9443\"",
        )
        .unwrap();
        let e = c.federation.bundle_endpoint.unwrap();
        assert_eq!((e.address.port(), e.web_cert), (9443, None));
        let c = parse(
            "trust_domain = \"e.org\"\n[federation]\nbundle_endpoint_address = \"0.0.0.0:9443\"\n\
             bundle_endpoint_profile = \"https_web\"\nbundle_endpoint_cert_file = \"/c.pem\"\n\
             bundle_endpoint_key_file = \"/k.pem\"\nweb_roots_file = \"/roots.pem\"",
        )
        .unwrap();
        assert_eq!(
            c.federation.bundle_endpoint.unwrap().web_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
        assert_eq!(c.federation.web_roots_file, Some("/roots.pem".into()));
        for (text, key) in [
            ("bundle_endpoint_profile = \"https_web\"", "bundle_endpoint_address"),
            ("bundle_endpoint_address = \"nowhere\"", "bundle_endpoint_address"),
            (
                "bundle_endpoint_address = \"127.0.0.1:1\"\nbundle_endpoint_profile = \"https_web\"",
                "bundle_endpoint_cert_file",
            ),
            (
                "bundle_endpoint_address = \"127.0.0.1:1\"\nbundle_endpoint_cert_file = \"/c.pem\"",
                "bundle_endpoint_cert_file",
            ),
            (
                "bundle_endpoint_address = \"127.0.0.1:1\"\nbundle_endpoint_profile = \"web\"",
                "bundle_endpoint_profile",
            ),
            ("bundle_endpoint = \"x\"", "bundle_endpoint"),
        ] {
            let text = format!("trust_domain = \"e.org\"\n[federation]\n{text}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err}");
        }
    }

    #[test]
    fn a_jwt_issuer_is_an_https_url_served_by_the_bundle_endpoint() {
        let endpoint = "[federation]\nbundle_endpoint_address = \"127.0.0.1:9443\"";
        let c = parse(&format!(
            "trust_domain = \"e.org\"\n[ca]\njwt_issuer = \"https://oidc.e.org\"\n{endpoint}"
        ))
        .unwrap();
        assert_eq!(c.ca.jwt_issuer.as_deref(), Some("https://oidc.e.org"));
        for (text, says) in [
            ("jwt_issuer = \"http://oidc.e.org\"", "https://"),
            ("jwt_issuer = \"https://oidc.e.org/\"", "trailing slash"),
        ] {
            let err = parse(&format!(
                "trust_domain = \"e.org\"\n[ca]\n{text}\n{endpoint}"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("ca.jwt_issuer") && err.contains(says), "{err}");
        }
        let err = parse("trust_domain = \"e.org\"\n[ca]\njwt_issuer = \"https://oidc.e.org\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bundle_endpoint_address"), "{err}");
    }

    #[test]
    fn ci_issuers_are_validated_with_their_rules() {
        let base = "trust_domain = \"example.org\"\n[federation]\nbundle_endpoint_address = \"127.0.0.1:9443\"\n";
        let issuer = "[[ci.issuers]]\nname = \"github\"\nissuer = \"https://token.actions.githubusercontent.com\"\n\
            jwks_url = \"https://token.actions.githubusercontent.com/.well-known/jwks\"\naudience = \"meshid\"\n";
        let rule = "[[ci.issuers.rules]]\nname = \"prod\"\nspiffe_id = \"spiffe://example.org/ci/{repository}\"\n\
            when = { repository = \"acme/payments\", ref = \"refs/heads/main\" }\n";
        let c = parse(&format!("{base}{issuer}{rule}")).unwrap();
        let i = &c.ci_issuers[0];
        assert_eq!(i.issuer.max_ttl, Duration::from_secs(900));
        assert_eq!(i.issuer.max_age, Duration::from_secs(600));
        assert_eq!(i.issuer.rules[0].when.len(), 2);
        for (text, says) in [
            (format!("{base}{issuer}"), "at least one rule"),
            (format!("{base}{issuer}[[ci.issuers.rules]]\nname = \"any\"\nspiffe_id = \"spiffe://example.org/ci\"\n"), "no `when`"),
            (format!("{base}{issuer}{rule}{issuer}{rule}"), "once"),
            (format!("{base}{issuer}{}", rule.replace("spiffe://example.org", "spiffe://other.org")), "not in example.org"),
            (format!("{base}{}{rule}", issuer.replace("jwks_url = \"https", "jwks_url = \"http")), "jwks_url"),
            (format!("{base}{issuer}max_ttl = \"2h\"\n{rule}"), "max_ttl"),
            (format!("trust_domain = \"example.org\"\n{issuer}{rule}"), "bundle_endpoint_address"),
        ] {
            let err = parse(&text).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn the_jwt_svid_cap_bounds_the_default_and_24h() {
        let c = parse("trust_domain = \"e.org\"\n[ca]\nmax_jwt_svid_ttl = \"10m\"").unwrap();
        assert_eq!(c.ca.max_jwt_svid_ttl, Duration::from_secs(600));
        for (text, key) in [
            ("max_jwt_svid_ttl = \"25h\"", "ca.max_jwt_svid_ttl"),
            ("max_jwt_svid_ttl = \"1m\"", "ca.default_jwt_svid_ttl"),
        ] {
            let err = parse(&format!("trust_domain = \"e.org\"\n[ca]\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn passwords_never_printed() {
        let err = parse("trust_domain = \"e.org\"\ndatastore = \"postgres://u:hunter2@h/db\" junk")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("ca.toml:2:"), "{err}");
        let err = parse("trust_domain = \"e.org\"\ndatastore = \"mysql://u:hunter2@h/db\"")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let c = parse("trust_domain = \"e.org\"\ndatastore = \"postgres://u:hunter2@h:5432/db\"")
            .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        // Unescaped `/`, `?` and `#` in a password.
        assert_eq!(redact_url("mysql://u:pa/ss@h/db"), "mysql://u:***@h/db");
        assert_eq!(
            redact_url("postgres://u:a?b#c@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres:///x/y:pw@h/db"),
            "postgres://***:***@h/db"
        );
        assert_eq!(redact_url("sqlite:///a/b"), "sqlite:///a/b");
    }
}
