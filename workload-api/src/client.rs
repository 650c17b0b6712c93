//! The node API client: TLS to the CA (authenticated by its SPIFFE ID
//! `spiffe://<td>/meshid/server` against the trust bundle), and mTLS with the agent's own SVID
//! once it has one. Also the agent's own identity, which may persist in the data directory
//! (mode 0600) so that a restart does not need a new join token.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use meshid_api::files;
use meshid_api::node::node_client::NodeClient;
use meshid_api::tls::{self, ExpectedId};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{SpiffeId, TrustDomain};
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// Errors talking to the CA or handling the agent's identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No CA address answered.
    #[error("no CA reachable at {addrs}: {last}")]
    Unreachable {
        /// The addresses tried.
        addrs: String,
        /// The last error.
        last: String,
    },
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    /// The CA refused or failed a call.
    #[error("CA: {0}")]
    Rpc(#[from] tonic::Status),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA's answer or a stored file is malformed.
    #[error("{0}")]
    Malformed(String),
    /// The CA's certificate does not verify against the roots this agent trusts (for example
    /// after a root rotation it was away for).
    #[error("the CA at {addr} is not trusted by this agent's trust bundle: {detail}")]
    ServerUntrusted {
        /// The CA address.
        addr: String,
        /// What the verifier said.
        detail: String,
    },
    /// The CA refused this agent's certificate in the handshake (it does not chain to the
    /// trust domain's current roots).
    #[error("the CA at {addr} refused this agent's SVID in the TLS handshake: {detail}")]
    ClientRefused {
        /// The CA address.
        addr: String,
        /// The alert.
        detail: String,
    },
}

/// The rustls error somewhere in `err`'s chain.
fn tls_failure<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                    return Some(tls);
                }
            }
        }
        source = e.source();
    }
    None
}

/// The agent's own SVID and key.
pub struct AgentIdentity {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER key.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .field("key_pkcs8", &"<redacted>")
            .finish()
    }
}

const KEY_FILE: &str = "agent-key.pem";
const SVID_FILE: &str = "agent-svid.pem";
/// The last trust bundle the agent received (public data).
pub const BUNDLE_FILE: &str = "bundle.pem";
/// The central policy the agent last took from the CA (JSON: revision and named documents),
/// so that it can serve it again after a restart while the CA is away. Policy, not secrets.
pub const POLICY_FILE: &str = "policy.json";
/// The federated trust domains' bundles the agent holds, kept for a start without the CA.
pub const FEDERATED_FILE: &str = "federated_bundles.json";
/// The digest ([`roots_digest`]) of the configured trust bundle (`--trust-bundle`) as the
/// agent last used it: the install-time file at first, then each one it re-bootstrapped from.
pub const TRUST_BUNDLE_SEEN_FILE: &str = "trust-bundle.seen";

/// A digest of a set of roots that ignores their order and the file's layout.
pub fn roots_digest(roots: &[Vec<u8>]) -> String {
    use sha2::Digest;
    let mut sorted: Vec<&Vec<u8>> = roots.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut h = sha2::Sha256::new();
    for r in sorted {
        h.update((r.len() as u64).to_be_bytes());
        h.update(r);
    }
    hex::encode(h.finalize())
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a file with `mode` atomically ([`meshid_api::files::write_atomic`]).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), ClientError> {
    meshid_api::files::write_atomic(path, contents, mode).map_err(file_err(path))
}

/// Reads PEM certificates.
pub fn read_certs(path: &Path) -> Result<Vec<Vec<u8>>, ClientError> {
    let text = std::fs::read(path).map_err(file_err(path))?;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&text)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ClientError::Malformed(format!("{}: not PEM certificates: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ClientError::Malformed(format!(
            "{}: no certificates",
            path.display()
        )));
    }
    Ok(certs)
}

fn validity(der: &[u8]) -> Result<(i64, i64, SpiffeId), ClientError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| ClientError::Malformed(format!("certificate does not parse: {e}")))?;
    let id = tls::verify::spiffe_id_of_parsed(&cert).map_err(|e| ClientError::Tls(e.into()))?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
        id,
    ))
}

impl AgentIdentity {
    /// Builds an identity from a chain and key, reading validity and ID from the leaf.
    pub fn new(chain: Vec<Vec<u8>>, key_pkcs8: Zeroizing<Vec<u8>>) -> Result<Self, ClientError> {
        let leaf = chain
            .first()
            .ok_or_else(|| ClientError::Malformed("empty agent SVID chain".into()))?;
        let (not_before, not_after, spiffe_id) = validity(leaf)?;
        Ok(Self {
            spiffe_id,
            chain,
            key_pkcs8,
            not_before,
            not_after,
        })
    }

    /// Loads a persisted identity, if both files exist; refuses a key file others can read.
    pub fn load(dir: &Path) -> Result<Option<Self>, ClientError> {
        let key_path = dir.join(KEY_FILE);
        let svid_path = dir.join(SVID_FILE);
        if !key_path.exists() || !svid_path.exists() {
            return Ok(None);
        }
        let meta = std::fs::metadata(&key_path).map_err(file_err(&key_path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(ClientError::Malformed(format!(
                "{} is readable by group or others; chmod 600 it",
                key_path.display()
            )));
        }
        let pem_text = Zeroizing::new(std::fs::read(&key_path).map_err(file_err(&key_path))?);
        let key = PrivatePkcs8KeyDer::from_pem_slice(&pem_text).map_err(|_| {
            ClientError::Malformed(format!("{} is not a PKCS#8 PEM key", key_path.display()))
        })?;
        let chain = read_certs(&svid_path)?;
        Self::new(chain, Zeroizing::new(key.secret_pkcs8_der().to_vec())).map(Some)
    }

    /// Persists the identity (key with mode 0600).
    pub fn save(&self, dir: &Path) -> Result<(), ClientError> {
        let key_pem = files::pem_secret("PRIVATE KEY", &self.key_pkcs8);
        write_file(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
        write_file(
            &dir.join(SVID_FILE),
            files::pem("CERTIFICATE", self.chain.iter().map(Vec::as_slice)).as_bytes(),
            0o644,
        )
    }

    fn tls_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            self.chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec())),
        )
    }
}

/// A new P-256 key and a CSR over it (the subject is irrelevant: the CA takes the identity
/// from its own records).
pub fn key_and_csr() -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), ClientError> {
    let key = rcgen::KeyPair::generate()
        .map_err(|e| ClientError::Malformed(format!("key generation: {e}")))?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| ClientError::Malformed(format!("csr: {e}")))?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ClientError::Malformed(format!("csr: {e}")))?;
    Ok((Zeroizing::new(key.serialize_der()), csr.der().to_vec()))
}

/// Connects to the first CA address that answers.
pub async fn connect(
    addrs: &[String],
    td: &TrustDomain,
    roots: &[Vec<u8>],
    identity: Option<&AgentIdentity>,
) -> Result<NodeClient<Channel>, ClientError> {
    let roots: Vec<CertificateDer<'static>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.clone()))
        .collect();
    let config = Arc::new(tls::client_config(
        roots,
        ExpectedId::server_of(td)?,
        identity.map(AgentIdentity::tls_identity),
    )?);
    // A server that fails authentication does not end the search: another address may be a
    // server this agent can trust (one CA server of several restored from an old backup, say).
    // The most telling failure is returned when none works.
    let mut last = String::from("no address configured");
    let mut refusal = None;
    for addr in addrs {
        match tls::connect(addr, Arc::clone(&config)).await {
            Ok(channel) => {
                return Ok(NodeClient::new(channel)
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .max_encoding_message_size(64 * 1024 * 1024))
            }
            Err(e) => {
                tracing::debug!(addr = %addr, error = %e, "CA address not usable");
                match tls_failure(&e) {
                    Some(rustls::Error::InvalidCertificate(cert)) => {
                        let detail = tls::verify::peer_error(&rustls::Error::InvalidCertificate(
                            cert.clone(),
                        ))
                        .map_or_else(|| format!("{cert:?}"), ToString::to_string);
                        refusal = Some(ClientError::ServerUntrusted {
                            addr: addr.clone(),
                            detail,
                        });
                    }
                    Some(rustls::Error::AlertReceived(alert))
                        if identity.is_some()
                            && !matches!(refusal, Some(ClientError::ServerUntrusted { .. })) =>
                    {
                        refusal = Some(ClientError::ClientRefused {
                            addr: addr.clone(),
                            detail: format!("{alert:?}"),
                        });
                    }
                    _ => {}
                }
                last = e.to_string();
            }
        }
    }
    Err(refusal.unwrap_or_else(|| ClientError::Unreachable {
        addrs: addrs.join(", "),
        last,
    }))
}
