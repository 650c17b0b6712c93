//! The one crypto provider and protocol version of every meshid TLS endpoint. All crypto goes
//! through them: no configuration of meshid uses a process-wide default provider.

use std::sync::{Arc, OnceLock};

use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::CryptoProvider;

/// The one crypto provider of every meshid TLS endpoint (node API, agent, proxy): aws-lc-rs,
/// chosen on evidence against ring (BENCHMARKS.md, "The crypto provider": faster handshakes and
/// bulk, and the only one of the two with ML-KEM).
///
/// - Key exchange: the hybrid post-quantum group X25519MLKEM768 first, so that traffic recorded
///   today cannot be decrypted by a future quantum computer; then X25519 and P-256 for peers
///   without it (OpenSSL before 3.5, haproxy, stunnel). A rustls client sends both an
///   X25519MLKEM768 and an X25519 key share in its first flight, so a classical peer costs no
///   extra round trip.
/// - Only the TLS 1.3 suites, AES-128-GCM first (on this class of hardware it is the fastest
///   AEAD; all three TLS 1.3 suites stay available).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.kx_groups = KX_GROUPS.to_vec();
        tls13_suites_aes128_first(&mut p);
        Arc::new(p)
    }))
}

/// Keeps only `p`'s TLS 1.3 cipher suites, AES-128-GCM first, as [`provider()`] does (public for
/// the benchmark that compares providers under meshid's restrictions).
pub fn tls13_suites_aes128_first(p: &mut CryptoProvider) {
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
}

/// The key exchange groups of every meshid TLS endpoint, in order of preference.
static KX_GROUPS: &[&dyn rustls::crypto::SupportedKxGroup] = &[
    kx_group::X25519MLKEM768,
    kx_group::X25519,
    kx_group::SECP256R1,
];

/// The name of the key exchange group an established connection negotiated, as a metric label
/// and access-log value (`X25519MLKEM768`, `X25519`, `secp256r1`; `none` before the handshake
/// ends, `other` for a group meshid does not offer).
pub fn kx_group_name(conn: &rustls::CommonState) -> &'static str {
    use rustls::NamedGroup;
    match conn.negotiated_key_exchange_group().map(|g| g.name()) {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(_) => "other",
        None => "none",
    }
}

/// The protocol versions every meshid TLS endpoint speaks: TLS 1.3 only.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
