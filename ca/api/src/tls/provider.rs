//! The one crypto provider and protocol version of every meshid TLS endpoint. All crypto goes
//! through them: no configuration of meshid uses a process-wide default provider.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The one crypto provider of every meshid TLS endpoint (node API, agent, proxy): ring, with
/// only the TLS 1.3 suites, AES-128-GCM first (on this class of hardware it is the fastest AEAD;
/// all three TLS 1.3 suites stay available).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites
            .retain(|s| s.version() == &rustls::version::TLS13);
        p.cipher_suites.sort_by_key(|s| match s.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
            _ => 2,
        });
        Arc::new(p)
    }))
}

/// The protocol versions every meshid TLS endpoint speaks: TLS 1.3 only.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
