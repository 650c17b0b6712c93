//! Join tokens: single-use, expiring secrets that let a new agent attest.
//!
//! The CA stores only the SHA-256 of a token, so a datastore leak gives nothing that attests.
//! The secret is shown to the operator once. [`JoinToken`] holds it zeroized on drop and never
//! prints it in `Debug`.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::store::JoinTokenRecord;

/// A freshly generated token: the secret and its stored record.
pub struct JoinToken {
    secret: Zeroizing<String>,
    /// What the store keeps.
    pub record: JoinTokenRecord,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("secret", &"<redacted>")
            .field("record", &self.record)
            .finish()
    }
}

impl JoinToken {
    /// A new token valid for `ttl` from `now` (unix seconds): 256 random bits, base64url.
    pub fn generate(now: i64, ttl: Duration) -> Self {
        let bytes = Zeroizing::new(rand::random::<[u8; 32]>());
        let secret =
            Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(*bytes));
        let hash = hash_token(&secret);
        let record = JoinTokenRecord {
            hash,
            id: token_id(&hash),
            created_at: now,
            expires_at: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            used_at: None,
        };
        Self { secret, record }
    }

    /// The secret, to hand to the operator exactly once.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

/// The SHA-256 under which a token is stored and looked up.
pub fn hash_token(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The non-secret id of a token: the first 8 bytes of its hash, hex. It names the agent that
/// attests with it, so the secret never appears in an identity or a log line.
pub fn token_id(hash: &[u8; 32]) -> String {
    hex::encode(&hash[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = JoinToken::generate(100, Duration::from_secs(600));
        let b = JoinToken::generate(100, Duration::from_secs(600));
        assert_ne!(a.secret(), b.secret());
        assert_eq!(a.record.hash, hash_token(a.secret()));
        assert_eq!(a.record.expires_at, 700);
        assert_eq!(a.record.id.len(), 16);
        assert!(!a.record.id.contains(a.secret()));
        let dbg = format!("{a:?}");
        assert!(!dbg.contains(a.secret()), "{dbg}");
    }
}
