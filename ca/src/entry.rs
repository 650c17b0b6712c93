//! Registration entries: "a workload on agent P with all of these selectors gets SPIFFE ID S".
//!
//! An [`EntrySpec`] is what an operator asks for; [`EntrySpec::validate`] turns it into a
//! [`RegistrationEntry`], which is valid by construction: SPIFFE IDs are parsed by the `spiffe`
//! crate, selectors by [`Selector::parse`], TTLs and the hint are range-checked.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use meshid_api::id::IdError;
use spiffe::{SpiffeId, TrustDomain};

/// Shortest X.509-SVID or JWT-SVID lifetime an entry may ask for.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest X.509-SVID lifetime an entry may ask for (SVIDs are also capped at the issuing CA's
/// expiry).
pub const MAX_X509_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest JWT-SVID lifetime an entry may ask for.
pub const MAX_JWT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest hint, in bytes (the Workload API says hints SHOULD be at most 1024 bytes).
pub const MAX_HINT_LEN: usize = 1024;
/// Most selectors on one entry.
pub const MAX_SELECTORS: usize = 64;
/// Most DNS names on one entry.
pub const MAX_DNS_NAMES: usize = 32;

/// Why an entry or a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The SPIFFE ID is not valid per the SPIFFE ID specification.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidSpiffeId {
        /// `spiffe_id` or `parent_id`.
        field: &'static str,
        /// What was given.
        value: String,
        /// The rule it broke.
        reason: String,
    },
    /// The SPIFFE ID belongs to another trust domain.
    #[error("{field} {value:?} is not in trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// `spiffe_id` or `parent_id`.
        field: &'static str,
        /// What was given.
        value: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The SPIFFE ID is under `/meshid/`, reserved for agents and CA servers.
    #[error("{field} {value:?} is under {RESERVED_PATH}/, which is reserved for meshid's agents and CA servers")]
    Reserved {
        /// `spiffe_id`.
        field: &'static str,
        /// What was given.
        value: String,
    },
    /// The admin flag is set: nothing enforces it yet, so no entry may promise it.
    #[error("the admin flag is not enforced yet: an entry cannot be created or updated with admin = true")]
    AdminNotEnforced,
    /// A workload SPIFFE ID must have a path.
    #[error(
        "spiffe_id {0:?} has no path; a workload identity needs one, e.g. spiffe://example.org/web"
    )]
    MissingPath(String),
    /// A selector is malformed.
    #[error("invalid selector {value:?}: {reason}")]
    InvalidSelector {
        /// What was given.
        value: String,
        /// The rule it broke.
        reason: String,
    },
    /// An entry needs at least one selector.
    #[error("an entry needs at least one selector, e.g. unix:uid:1000")]
    NoSelectors,
    /// Too many selectors or DNS names.
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        /// `selectors` or `dns_names`.
        what: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A TTL is out of range.
    #[error("{field} {given}s is out of range: use {min}s to {max}s")]
    TtlOutOfRange {
        /// `x509_svid_ttl` or `jwt_svid_ttl`.
        field: &'static str,
        /// Seconds given.
        given: u64,
        /// Minimum seconds.
        min: u64,
        /// Maximum seconds.
        max: u64,
    },
    /// The hint is too long.
    #[error("hint is {0} bytes; at most {MAX_HINT_LEN} are allowed")]
    HintTooLong(usize),
    /// A DNS name is invalid.
    #[error("invalid dns name {0:?}")]
    InvalidDnsName(String),
    /// A federated trust domain is invalid or is the CA's own.
    #[error("invalid federates_with {value:?}: {reason}")]
    InvalidFederation {
        /// What was given.
        value: String,
        /// The rule it broke.
        reason: String,
    },
    /// An entry id is malformed.
    #[error("invalid entry id {0:?}: use 1 to 64 characters from [A-Za-z0-9_-]")]
    InvalidId(String),
}

/// A registration entry id: 1 to 64 characters from `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(String);

impl EntryId {
    /// A new random id (128 bits, hex).
    pub fn random() -> Self {
        Self(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EntryId {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(EntryError::InvalidId(s.to_owned()))
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The Unix selector keys the agent's workload attestor produces.
pub const UNIX_SELECTOR_KEYS: &[&str] = &[
    "uid",
    "gid",
    "user",
    "group",
    "supplementary_gid",
    "path",
    "sha256",
];

/// A workload selector, `type:key:value`, for example `unix:uid:1000`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    key: String,
    value: String,
}

impl Selector {
    /// Parses and checks `type:key:value`. The value may itself contain `:`.
    pub fn parse(s: &str) -> Result<Self, EntryError> {
        let bad = |reason: &str| EntryError::InvalidSelector {
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = s.splitn(3, ':');
        let (Some(kind), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected type:key:value, e.g. unix:uid:1000"));
        };
        if value.is_empty() {
            return Err(bad("the value is empty"));
        }
        if value.len() > 1024 {
            return Err(bad("the value is longer than 1024 bytes"));
        }
        if value.chars().any(char::is_control) {
            return Err(bad("the value contains a control character"));
        }
        match kind {
            "unix" => {
                if !UNIX_SELECTOR_KEYS.contains(&key) {
                    return Err(bad(&format!(
                        "unknown unix selector key {key:?}; expected one of {}",
                        UNIX_SELECTOR_KEYS.join(", ")
                    )));
                }
                let ok = match key {
                    "uid" | "gid" | "supplementary_gid" => {
                        value.parse::<u32>().is_ok() && !(value.len() > 1 && value.starts_with('0'))
                    }
                    "sha256" => {
                        value.len() == 64
                            && value
                                .bytes()
                                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                    }
                    "path" => value.starts_with('/'),
                    _ => true,
                };
                if !ok {
                    return Err(bad(match key {
                        "sha256" => "the value must be 64 lowercase hex digits",
                        "path" => "the value must be an absolute path",
                        _ => "the value must be a decimal number from 0 to 4294967295",
                    }));
                }
            }
            "" => return Err(bad("the type is empty")),
            other => {
                return Err(bad(&format!(
                    "unknown selector type {other:?}; supported: unix"
                )));
            }
        }
        Ok(Self {
            kind: kind.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The key, e.g. `uid`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value, e.g. `1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.kind, self.key, self.value)
    }
}

impl FromStr for Selector {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What an operator asks for; not yet validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySpec {
    /// Optional id chosen by the operator; random otherwise.
    pub id: Option<String>,
    /// The identity to issue.
    pub spiffe_id: String,
    /// The agent (or other parent) whose workloads may get it.
    pub parent_id: String,
    /// `type:key:value` selectors; a workload must have all of them.
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime in seconds; 0 means the CA default.
    pub x509_svid_ttl: u64,
    /// JWT-SVID lifetime in seconds; 0 means the CA default.
    pub jwt_svid_ttl: u64,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles the workload receives.
    pub federates_with: Vec<String>,
    /// May call the admin API with this identity.
    pub admin: bool,
    /// Disambiguates several SVIDs of one workload.
    pub hint: String,
}

/// A validated registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Unique id.
    pub id: EntryId,
    /// The identity to issue.
    pub spiffe_id: SpiffeId,
    /// The parent (an agent's SPIFFE ID).
    pub parent_id: SpiffeId,
    /// Sorted, deduplicated selectors.
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime; `None` means the CA default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` means the CA default.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs, in the order given.
    pub dns_names: Vec<String>,
    /// Federated trust domains, sorted.
    pub federates_with: Vec<TrustDomain>,
    /// Admin flag.
    pub admin: bool,
    /// Hint (may be empty).
    pub hint: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// Starts at 1, bumped on every update.
    pub revision: i64,
    /// The owner label of the mesh file that declared it (`meshid-ca apply`); empty for an
    /// entry made by hand. Only a mesh apply sets it; an update by hand keeps it.
    pub owner: String,
}

impl RegistrationEntry {
    /// True when `selectors` (a caller's) contain every selector of this entry.
    pub fn matches(&self, selectors: &[Selector]) -> bool {
        self.selectors.iter().all(|s| selectors.contains(s))
    }
}

pub use meshid_api::id::MAX_SPIFFE_ID_LEN;

/// The path under which the CA names agents (`/meshid/agent/...`) and its servers
/// (`/meshid/server`): never a workload's.
pub const RESERVED_PATH: &str = "/meshid";

/// [`parse_id`] for an identity the CA issues to a workload: anything but [`RESERVED_PATH`].
/// An SVID for an agent's or the server's ID would let its holder act as that agent, or pose
/// as the CA to an agent.
pub fn parse_workload_id(
    field: &'static str,
    value: &str,
    td: &TrustDomain,
) -> Result<SpiffeId, EntryError> {
    let id = parse_id(field, value, td)?;
    let path = id.path();
    if path == RESERVED_PATH || path.starts_with(&format!("{RESERVED_PATH}/")) {
        return Err(EntryError::Reserved {
            field,
            value: value.to_owned(),
        });
    }
    Ok(id)
}

/// Parses a SPIFFE ID of trust domain `td` strictly: canonical form, at most 2048 bytes.
pub fn parse_id(
    field: &'static str,
    value: &str,
    td: &TrustDomain,
) -> Result<SpiffeId, EntryError> {
    let id = meshid_api::id::parse(value).map_err(|e| EntryError::InvalidSpiffeId {
        field,
        value: match e {
            IdError::TooLong { .. } => {
                format!("{}...", value.chars().take(64).collect::<String>())
            }
            _ => value.to_owned(),
        },
        reason: e.to_string(),
    })?;
    if !id.is_member_of(td) {
        return Err(EntryError::ForeignTrustDomain {
            field,
            value: value.to_owned(),
            trust_domain: td.to_string(),
        });
    }
    Ok(id)
}

fn ttl(field: &'static str, secs: u64, max: Duration) -> Result<Option<Duration>, EntryError> {
    if secs == 0 {
        return Ok(None);
    }
    if secs < MIN_TTL.as_secs() || secs > max.as_secs() {
        return Err(EntryError::TtlOutOfRange {
            field,
            given: secs,
            min: MIN_TTL.as_secs(),
            max: max.as_secs(),
        });
    }
    Ok(Some(Duration::from_secs(secs)))
}

/// Checks a DNS name as used in a SAN: LDH labels of 1-63 bytes, at most 253 bytes, an optional
/// leading `*.` wildcard label.
pub fn validate_dns_name(name: &str) -> Result<(), EntryError> {
    let bad = || EntryError::InvalidDnsName(name.to_owned());
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in rest.split('.') {
        let b = label.as_bytes();
        if b.is_empty()
            || b.len() > 63
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
            || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        {
            return Err(bad());
        }
    }
    Ok(())
}

impl EntrySpec {
    /// What an operator may write now, beyond [`Self::validate`] (which also reads entries
    /// written before, and so cannot refuse them): a workload ID outside [`RESERVED_PATH`], and
    /// no admin flag, which nothing enforces yet.
    pub fn check_writable(&self, td: &TrustDomain) -> Result<(), EntryError> {
        parse_workload_id("spiffe_id", &self.spiffe_id, td)?;
        if self.admin {
            return Err(EntryError::AdminNotEnforced);
        }
        Ok(())
    }

    /// Validates the spec for trust domain `td` into an entry with revision 1, created `now`.
    pub fn validate(&self, td: &TrustDomain, now: i64) -> Result<RegistrationEntry, EntryError> {
        let id = match &self.id {
            Some(id) if !id.is_empty() => id.parse()?,
            _ => EntryId::random(),
        };
        let spiffe_id = parse_id("spiffe_id", &self.spiffe_id, td)?;
        if spiffe_id.path().is_empty() {
            return Err(EntryError::MissingPath(self.spiffe_id.clone()));
        }
        let parent_id = parse_id("parent_id", &self.parent_id, td)?;
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        if self.selectors.len() > MAX_SELECTORS {
            return Err(EntryError::TooMany {
                what: "selectors",
                count: self.selectors.len(),
                max: MAX_SELECTORS,
            });
        }
        let mut selectors = self
            .selectors
            .iter()
            .map(|s| Selector::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        selectors.sort();
        selectors.dedup();
        if self.dns_names.len() > MAX_DNS_NAMES {
            return Err(EntryError::TooMany {
                what: "dns_names",
                count: self.dns_names.len(),
                max: MAX_DNS_NAMES,
            });
        }
        for name in &self.dns_names {
            validate_dns_name(name)?;
        }
        let mut federates_with = Vec::new();
        for value in &self.federates_with {
            let bad = |reason: String| EntryError::InvalidFederation {
                value: value.clone(),
                reason,
            };
            let fed = TrustDomain::new(value).map_err(|e| bad(e.to_string()))?;
            if fed.as_str() != value {
                return Err(bad(
                    "a trust domain name is lower case, without scheme or path".to_owned(),
                ));
            }
            if &fed == td {
                return Err(bad("this is the CA's own trust domain".to_owned()));
            }
            federates_with.push(fed);
        }
        federates_with.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        federates_with.dedup();
        if self.hint.len() > MAX_HINT_LEN {
            return Err(EntryError::HintTooLong(self.hint.len()));
        }
        Ok(RegistrationEntry {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: ttl("x509_svid_ttl", self.x509_svid_ttl, MAX_X509_TTL)?,
            jwt_svid_ttl: ttl("jwt_svid_ttl", self.jwt_svid_ttl, MAX_JWT_TTL)?,
            dns_names: self.dns_names.clone(),
            federates_with,
            admin: self.admin,
            hint: self.hint.clone(),
            created_at: now,
            updated_at: now,
            revision: 1,
            owner: String::new(),
        })
    }
}

impl From<&RegistrationEntry> for EntrySpec {
    fn from(e: &RegistrationEntry) -> Self {
        Self {
            id: Some(e.id.to_string()),
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            selectors: e.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: e.x509_svid_ttl.map_or(0, |d| d.as_secs()),
            jwt_svid_ttl: e.jwt_svid_ttl.map_or(0, |d| d.as_secs()),
            dns_names: e.dns_names.clone(),
            federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
            admin: e.admin,
            hint: e.hint.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
