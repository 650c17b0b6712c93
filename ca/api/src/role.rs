//! The mark that tells meshid's own SVIDs (an agent's, the CA server's) from workload SVIDs.
//!
//! The node API identifies agents, and agents identify the CA, by SPIFFE IDs under
//! `/meshid/`. The CA refuses to issue those IDs to workloads, but an ID alone is a name
//! anyone with a signing key of the trust domain could write. So the CA also marks the SVIDs it
//! issues to agents and to itself with a certificate policy (a non-critical
//! `certificatePolicies` extension, which every verifier that does not know it ignores), and
//! both ends check it: the node API takes only agent-marked client certificates, and the
//! agent's (and the CLI's) client takes only a server-marked CA.
//!
//! The policy OIDs are under 2.25 (ITU-T X.667: an arc from a UUID, here
//! 231af312-9384-45f6-9699-66d284e79b33): `.1` agent, `.2` server.

/// meshid's OID arc, 2.25.<the UUID as an integer>.
const ARC: u128 = 46_662_909_668_088_778_726_611_170_003_383_720_755;

/// The path of a meshid CA server's SPIFFE ID, `spiffe://<td>/meshid/server`.
pub const SERVER_PATH: &str = "/meshid/server";

/// The path under which the CA names agents, `spiffe://<td>/meshid/agent/...`.
pub const AGENT_PATH_PREFIX: &str = "/meshid/agent/";

/// A role only meshid's own components hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A node agent (`spiffe://<td>/meshid/agent/...`).
    Agent,
    /// A CA server (`spiffe://<td>/meshid/server`).
    Server,
}

impl Role {
    /// Whether `id` names this role (`/meshid/server`, or under `/meshid/agent/`): such a
    /// peer must also carry the role's mark.
    pub fn claimed_by(self, id: &spiffe::SpiffeId) -> bool {
        match self {
            Role::Server => id.path() == SERVER_PATH,
            Role::Agent => id.path().starts_with(AGENT_PATH_PREFIX),
        }
    }

    /// The dotted policy OID.
    pub fn oid(self) -> String {
        format!("2.25.{ARC}.{}", self.last_arc())
    }

    fn last_arc(self) -> u8 {
        match self {
            Role::Agent => 1,
            Role::Server => 2,
        }
    }

    /// The policy OID's DER content octets (without tag and length).
    pub fn oid_der(self) -> Vec<u8> {
        // 2.25: the first two arcs in one sub-identifier, 2 * 40 + 25.
        let mut out = vec![2 * 40 + 25];
        base128(ARC, &mut out);
        base128(u128::from(self.last_arc()), &mut out);
        out
    }

    /// The DER content of a `certificatePolicies` extension (RFC 5280 4.2.1.4) naming this
    /// role's policy: `SEQUENCE { SEQUENCE { OID } }`.
    pub fn policies_extension(self) -> Vec<u8> {
        let oid = self.oid_der();
        let mut info = vec![0x06, len(oid.len())];
        info.extend(oid);
        let mut policy = vec![0x30, len(info.len())];
        policy.extend(info);
        let mut out = vec![0x30, len(policy.len())];
        out.extend(policy);
        out
    }

    /// Whether the certificate (DER) carries this role's policy.
    pub fn marks(self, cert_der: &[u8]) -> bool {
        x509_parser::parse_x509_certificate(cert_der)
            .is_ok_and(|(_, cert)| self.marks_parsed(&cert))
    }

    /// [`Self::marks`] for a certificate already parsed.
    pub fn marks_parsed(self, cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
        let want = self.oid_der();
        cert.extensions()
            .iter()
            .any(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::CertificatePolicies(policies) => policies
                    .iter()
                    .any(|p| p.policy_id.as_bytes() == want.as_slice()),
                _ => false,
            })
    }
}

/// The `certificatePolicies` extension's OID, 2.5.29.32, as rcgen takes it.
pub const CERTIFICATE_POLICIES: [u64; 4] = [2, 5, 29, 32];

fn base128(mut v: u128, out: &mut Vec<u8>) {
    let mut groups = vec![u8::try_from(v & 0x7f).unwrap_or(0)];
    v >>= 7;
    while v > 0 {
        groups.push(0x80 | u8::try_from(v & 0x7f).unwrap_or(0));
        v >>= 7;
    }
    out.extend(groups.iter().rev());
}

/// A short-form DER length (every structure here is under 128 octets).
fn len(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX) & 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_encode_as_openssl_reads_them() {
        // openssl decodes the extension to the dotted OIDs.
        for role in [Role::Agent, Role::Server] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("policies.der");
            std::fs::write(&file, role.policies_extension()).unwrap();
            let out = std::process::Command::new("openssl")
                .args(["asn1parse", "-inform", "DER", "-in"])
                .arg(&file)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&role.oid()), "{text}");
        }
        assert_ne!(Role::Agent.oid_der(), Role::Server.oid_der());
        // SEQUENCE, SEQUENCE, OID, and the lengths agree.
        let ext = Role::Server.policies_extension();
        assert_eq!((ext[0], usize::from(ext[1])), (0x30, ext.len() - 2));
        assert_eq!((ext[2], usize::from(ext[3])), (0x30, ext.len() - 4));
        assert_eq!((ext[4], usize::from(ext[5])), (0x06, ext.len() - 6));
    }
}
