//! Signed checkpoints of the audit chain: the head (sequence number and hash) at a time, signed
//! with an Ed25519 key that lives in a file of the CA server, never in the datastore. Written
//! to the audit sinks beside the records, they let `meshid-ca audit verify --export` tell a
//! genuine chain from one that was rewritten in the datastore and re-hashed.

use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use base64::Engine as _;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a checkpoint key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file holds no usable key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The key that signs checkpoints.
pub struct CheckpointKey {
    pair: Ed25519KeyPair,
    public: [u8; 32],
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("key_id", &key_id(&self.public))
            .finish_non_exhaustive()
    }
}

impl CheckpointKey {
    /// Loads the PKCS#8 PEM key at `path` (mode 0600 or stricter), or makes one there when the
    /// file does not exist, with its public key beside it (`<path>.pub`, an SPKI PEM that
    /// `audit verify --public-key` and openssl read).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| KeyError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let key = match std::fs::read(path) {
            Ok(pem) => {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(invalid(format!(
                        "mode {:o} lets others read the key; chmod 600 it",
                        mode & 0o777
                    )));
                }
                let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&pem)
                    .map_err(|e| invalid(format!("not a PKCS#8 PEM private key ({e})")))?;
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
                    .map_err(|e| invalid(format!("not an Ed25519 key ({e})")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| invalid("cannot generate a key".to_owned()))?;
                // A directory made here is private; an existing one is left as it is (it may
                // be /etc/meshid).
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.exists() {
                        meshid_api::files::ensure_private_dir(dir).map_err(io)?;
                    }
                }
                let pem = meshid_api::files::pem_secret("PRIVATE KEY", doc.as_ref());
                meshid_api::files::write_private(path, pem.as_bytes()).map_err(io)?;
                Ed25519KeyPair::from_pkcs8(doc.as_ref())
                    .map_err(|e| invalid(format!("cannot read the key made ({e})")))?
            }
            Err(e) => return Err(io(e)),
        };
        let public: [u8; 32] = key
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| invalid("an Ed25519 public key is 32 bytes".to_owned()))?;
        let pub_path = public_key_path(path);
        let pub_pem = public_key_pem(&public);
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(pub_pem.as_str()) {
            meshid_api::files::write_atomic(&pub_path, pub_pem.as_bytes(), 0o644).map_err(
                |source| KeyError::Io {
                    path: pub_path.clone(),
                    source,
                },
            )?;
        }
        Ok(Self { pair: key, public })
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Signs the head `(seq, hash)` of `trust_domain`'s chain as `server_id` saw it at `time`.
    pub fn sign(
        &self,
        trust_domain: &str,
        server_id: &str,
        seq: i64,
        hash: &[u8; 32],
        time: i64,
    ) -> Checkpoint {
        let mut c = Checkpoint {
            trust_domain: trust_domain.to_owned(),
            server_id: server_id.to_owned(),
            seq,
            hash: hex::encode(hash),
            time,
            key_id: key_id(&self.public),
            public_key: base64::engine::general_purpose::STANDARD.encode(self.public),
            signature: String::new(),
        };
        let sig = self.pair.sign(&signed_bytes(&c, hash));
        c.signature = base64::engine::general_purpose::STANDARD.encode(sig.as_ref());
        c
    }
}

/// Where the public key of the key at `path` is written.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// A key's short name: the first 16 bytes of the SHA-256 of the public key, in hex.
pub fn key_id(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..16])
}

/// The SPKI PEM of an Ed25519 public key.
pub fn public_key_pem(public: &[u8; 32]) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    meshid_api::files::pem("PUBLIC KEY", [der.as_slice()])
}

/// The Ed25519 public key of an SPKI PEM (as [`public_key_pem`] or openssl write it).
pub fn parse_public_key_pem(pem: &[u8]) -> Result<[u8; 32], String> {
    let der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem)
        .map_err(|e| format!("not a PEM public key ({e})"))?;
    let der = der.as_ref();
    match der.strip_prefix(&SPKI_PREFIX[..]) {
        Some(key) if key.len() == 32 => Ok(key.try_into().unwrap_or([0; 32])),
        _ => Err("not an Ed25519 public key".to_owned()),
    }
}

/// A signed checkpoint, as written to a sink (one JSON line, `"type": "checkpoint"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The trust domain whose chain it is.
    pub trust_domain: String,
    /// The CA server that signed it.
    pub server_id: String,
    /// The head's sequence number.
    pub seq: i64,
    /// The head's hash, hex.
    pub hash: String,
    /// Unix seconds when it was signed.
    pub time: i64,
    /// [`key_id`] of the signing key.
    pub key_id: String,
    /// The signing key's public key, base64 (raw 32 bytes).
    pub public_key: String,
    /// The Ed25519 signature, base64.
    pub signature: String,
}

/// Why a checkpoint does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// A field does not decode.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The key is not the one expected.
    #[error("signed by key {found}, not the pinned key {expected}")]
    WrongKey {
        /// The pinned key's id.
        expected: String,
        /// The checkpoint's.
        found: String,
    },
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
}

impl Checkpoint {
    /// The head hash, decoded.
    pub fn hash_bytes(&self) -> Result<[u8; 32], CheckpointError> {
        hex::decode(&self.hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or(CheckpointError::Malformed("hash"))
    }

    /// Checks the signature with the checkpoint's own public key, which must be `pinned` when
    /// given. Returns the public key.
    pub fn verify(&self, pinned: Option<&[u8; 32]>) -> Result<[u8; 32], CheckpointError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let public: [u8; 32] = b64
            .decode(&self.public_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or(CheckpointError::Malformed("public_key"))?;
        if key_id(&public) != self.key_id {
            return Err(CheckpointError::Malformed("key_id"));
        }
        if let Some(pinned) = pinned {
            if *pinned != public {
                return Err(CheckpointError::WrongKey {
                    expected: key_id(pinned),
                    found: self.key_id.clone(),
                });
            }
        }
        let sig = b64
            .decode(&self.signature)
            .map_err(|_| CheckpointError::Malformed("signature"))?;
        let hash = self.hash_bytes()?;
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&signed_bytes(self, &hash), &sig)
            .map_err(|_| CheckpointError::BadSignature)?;
        Ok(public)
    }
}

/// What is signed: a domain-separated, length-prefixed encoding of every field that matters.
fn signed_bytes(c: &Checkpoint, hash: &[u8; 32]) -> Vec<u8> {
    let mut out = b"meshid-audit-checkpoint-v1".to_vec();
    for field in [c.trust_domain.as_bytes(), c.server_id.as_bytes()] {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(&c.seq.to_be_bytes());
    out.extend_from_slice(hash);
    out.extend_from_slice(&c.time.to_be_bytes());
    out
}

#[cfg(test)]
mod tests;
