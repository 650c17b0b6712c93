//! What the agent holds: the entries it is responsible for, the SVID of each, and the trust
//! bundle, published as immutable [`Snapshot`]s through a `tokio::sync::watch` channel so the
//! Workload API can stream every change without locks on its fetch path.

use std::fmt;
use std::sync::Arc;

use spiffe::{SpiffeId, TrustDomain};
use zeroize::Zeroizing;

/// A registration entry as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Entry id.
    pub id: String,
    /// Identity issued for it.
    pub spiffe_id: SpiffeId,
    /// `type:key:value` selectors, sorted; a caller needs all of them.
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime in seconds (0: the CA default).
    pub x509_svid_ttl: u64,
    /// JWT-SVID lifetime in seconds (0: the CA default).
    pub jwt_svid_ttl: u64,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Federated trust domains.
    pub federates_with: Vec<String>,
    /// Disambiguates several SVIDs.
    pub hint: String,
    /// Bumped by the CA on every change.
    pub revision: i64,
}

impl Entry {
    /// True when the caller's selectors include every selector of this entry.
    pub fn matches(&self, caller: &[String]) -> bool {
        self.selectors.iter().all(|s| caller.iter().any(|c| c == s))
    }
}

/// An X.509-SVID held in memory: chain and PKCS#8 key. The key is zeroized on drop and never
/// printed.
pub struct Svid {
    /// DER certificates, leaf first (then intermediates).
    pub chain: Vec<Vec<u8>>,
    /// Unencrypted PKCS#8 DER of the private key.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Leaf serial, hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pkcs8", &"<redacted>")
            .finish()
    }
}

impl Svid {
    /// The chain as one concatenated DER blob (the Workload API's wire form).
    pub fn chain_concat(&self) -> Vec<u8> {
        self.chain.concat()
    }
}

/// An entry and, once signed, its current SVID.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The entry.
    pub entry: Arc<Entry>,
    /// The SVID; `None` until the first signing completes.
    pub svid: Option<Arc<Svid>>,
}

/// The trust bundle of the agent's trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    /// DER X.509 authorities.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWKS JSON of the JWT authorities (`{"keys":[...]}`).
    pub jwt_authorities_json: String,
    /// The CA's bundle sequence number.
    pub sequence: u64,
}

impl Bundle {
    /// The X.509 authorities as one concatenated DER blob (the Workload API's wire form).
    pub fn x509_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }
}

/// Everything the Workload API serves, at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The agent's trust domain.
    pub trust_domain: TrustDomain,
    /// Local trust bundle.
    pub bundle: Arc<Bundle>,
    /// Every entry of this agent, ordered by entry id, with its SVID if signed.
    pub identities: Vec<Identity>,
    /// False until the agent has received the CA's full state once.
    pub synced: bool,
    /// Key ids of tainted JWT keys (`meshid-ca ca taint`): cached JWT-SVIDs they signed are
    /// not served again.
    pub tainted_jwt_kids: Arc<std::collections::BTreeSet<String>>,
    /// The CA's certificate revocation lists (DER), for the Workload API's `crl` fields.
    pub crls: Arc<Vec<Vec<u8>>>,
    /// Which set of CRLs this is: the agent counts the sets it received (0: none yet).
    pub crl_generation: u64,
    /// The central policy in force (`meshid-ca policy apply`), as the CA sent it.
    pub policy: Arc<CentralPolicy>,
    /// Its documents merged (`None` until a policy is held).
    pub policy_merged: Option<Arc<meshid_policy::Policy>>,
    /// The bundles of the trust domains this one federates with, by trust domain name, as the
    /// CA last sent them: each goes to the workloads whose entries federate with it.
    pub federated: Arc<Federated>,
}

/// Federated bundles by trust domain name (`partner.org`).
pub type Federated = std::collections::BTreeMap<String, Arc<Bundle>>;

/// The central policy as the CA sends it: every named document of one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CentralPolicy {
    /// The CA's revision number (0: none applied yet).
    pub revision: u64,
    /// Name → meshid-policy YAML.
    pub documents: std::collections::BTreeMap<String, String>,
}

impl CentralPolicy {
    /// The documents merged into one policy, as the proxies enforce it.
    ///
    /// # Errors
    ///
    /// The first document that does not parse, or why they do not merge (with file:line:column,
    /// the document's name as the file).
    pub fn merged(&self) -> Result<meshid_policy::Policy, meshid_policy::PolicyError> {
        let parts = self
            .documents
            .iter()
            .map(|(name, text)| meshid_policy::Policy::parse(text, name))
            .collect::<Result<Vec<_>, _>>()?;
        meshid_policy::Policy::merge("mesh", &parts)
    }
}

impl Snapshot {
    /// An empty, unsynced snapshot.
    pub fn empty(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            bundle: Arc::new(Bundle::default()),
            identities: Vec::new(),
            synced: false,
            tainted_jwt_kids: Arc::default(),
            crls: Arc::default(),
            crl_generation: 0,
            policy: Arc::default(),
            policy_merged: None,
            federated: Arc::default(),
        }
    }

    /// The federated bundles that the entries of `identities` federate with.
    pub fn federated_for<'a>(&self, identities: impl Iterator<Item = &'a Entry>) -> Federated {
        let mut out = Federated::new();
        for entry in identities {
            for td in &entry.federates_with {
                if let Some(b) = self.federated.get(td) {
                    out.insert(td.clone(), Arc::clone(b));
                }
            }
        }
        out
    }

    /// The identities whose entries match a caller's selectors, in entry id order.
    pub fn matching<'a>(&'a self, caller: &'a [String]) -> impl Iterator<Item = &'a Identity> + 'a {
        self.identities
            .iter()
            .filter(move |i| i.entry.matches(caller))
    }
}

/// Mints JWT-SVIDs for entries (through the CA); the Workload API calls it for FetchJWTSVID.
#[tonic::async_trait]
pub trait JwtMinter: Send + Sync + 'static {
    /// A JWT-SVID for `entry_id` with `audience`: the token and its expiry (unix seconds).
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<(String, i64), MintError>;
}

/// Why a JWT-SVID could not be minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// The CA cannot be reached right now.
    #[error("CA unavailable: {0}")]
    Unavailable(String),
    /// The CA refused.
    #[error("CA refused: {0}")]
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::CentralPolicy;

    #[test]
    fn a_central_policy_merges_or_says_why_and_keeps_as_json() {
        let doc = |default: &str, rule: &str| {
            format!("default: {default}\nrules:\n  - name: {rule}\n    from: [\"spiffe://example.org/a\"]\n    to: [\"spiffe://example.org/b\"]\n")
        };
        let mut p = CentralPolicy {
            revision: 3,
            documents: [
                ("a".to_owned(), doc("deny", "r1")),
                ("b".to_owned(), doc("deny", "r2")),
            ]
            .into(),
        };
        assert_eq!(p.merged().unwrap().rule_count(), 2);
        let back: CentralPolicy = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        p.documents.insert("c".to_owned(), doc("allow", "r3"));
        let e = p.merged().unwrap_err().to_string();
        assert!(e.starts_with("c:1:10: default allow"), "{e}");
        p.documents.insert("c".to_owned(), "rules: [".to_owned());
        assert!(p.merged().unwrap_err().to_string().starts_with("c:"));
        assert_eq!(CentralPolicy::default().merged().unwrap().rule_count(), 0);
    }
}
