//! The SPIFFE mTLS every meshid connection runs over: the node API (CA server, agent client)
//! and the proxy's data plane alike.
//!
//! - [`verify`]: **the** X509-SVID peer verifier (leaf rules, one SPIFFE ID extraction, path
//!   validation per trust domain) and its rustls adapters, [`ClientVerifier`] and
//!   [`ServerVerifier`]. Every peer certificate meshid accepts passes through it.
//! - [`provider()`] and [`PROTOCOL_VERSIONS`]: the one crypto provider (aws-lc-rs; the hybrid
//!   post-quantum group X25519MLKEM768 first, X25519 for peers without it; TLS 1.3 suites only,
//!   AES-128-GCM first) and TLS 1.3 only. All crypto goes through them; no configuration uses a
//!   process-wide default.
//! - [`client_config`], [`server_config`]: the node API's configurations (ALPN `h2`, no session
//!   resumption, so each connection verifies the peer's current certificate against the
//!   current roots). DNS names are never checked: the TLS server name sent by [`connect`] is a
//!   fixed placeholder, and the server is authenticated by its SPIFFE ID ([`ExpectedId`]).
//! - [`RotatingCert`]: our own certificate, swapped while in use.
//!
//! # Rotation
//! - Own certificate: [`RotatingCert`] is a certificate resolver (server and client side) whose
//!   certified key is swapped with [`RotatingCert::set`]; new handshakes take the newest,
//!   established connections are untouched, and before the first `set` handshakes fail closed.
//! - Roots: an [`SvidVerifier`] holds its bundles in an `ArcSwap`; keep it, build the
//!   configuration over it ([`server_verifier`] + [`client_config_with_verifier`], or
//!   [`server_config`]) and call [`SvidVerifier::set_bundles`] when the bundle changes.
//!   [`client_config`] is the simple form for callers that build a fresh `ClientConfig` per
//!   connection (cheap).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper_util::rt::TokioIo;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use spiffe::{SpiffeId, TrustDomain};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::role::Role;

pub mod provider;
pub mod revocation;
pub mod verify;

pub use provider::{kx_group_name, provider, PROTOCOL_VERSIONS};

pub use verify::{
    ClientVerifier, PeerBundles, PeerError, PeerRole, ServerVerifier, SvidVerifier, VerifyError,
};

/// The ALPN protocol of every meshid gRPC connection.
pub const ALPN_H2: &[u8] = b"h2";

/// The TLS server name [`connect`] sends. Not verified: the server is authenticated by its
/// SPIFFE ID.
pub const PLACEHOLDER_SERVER_NAME: &str = "meshid-ca";

/// How long [`connect`] waits for TCP and the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of SPIFFE TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate is not an X509-SVID (see [`PeerError`]).
    #[error(transparent)]
    Svid(#[from] PeerError),
    /// A SPIFFE ID cannot be formed (too long).
    #[error("invalid SPIFFE ID: {0}")]
    InvalidId(String),
    /// A certificate chain is empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// No trust anchor was given, or one cannot be used as a trust anchor.
    #[error("invalid trust anchors: {0}")]
    InvalidRoots(#[from] VerifyError),
    /// A private key that the crypto provider cannot use, or that does not match the
    /// certificate.
    #[error("invalid certificate or key: {0}")]
    InvalidKey(#[source] rustls::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The address is not `host:port`.
    #[error("invalid address {addr:?}: {source}")]
    InvalidAddress {
        /// The address given.
        addr: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// The server could not be reached, or the handshake failed.
    #[error("cannot connect to {addr}: {}", chain(.source))]
    Connect {
        /// The address.
        addr: String,
        /// The transport error (its source chain names the TLS failure).
        source: tonic::transport::Error,
    },
}

/// An error and its sources, `: `-separated: tonic's transport error says only "transport
/// error", and what went wrong (a refused certificate, a reset) is in its sources. A peer
/// certificate our verifier refused is told by its [`PeerError`] (rustls shows it in `Debug`
/// form).
fn chain(error: &dyn std::error::Error) -> String {
    fn text_of(e: &(dyn std::error::Error + 'static)) -> String {
        // `io::Error::source` skips the error it wraps, so look inside it here.
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        match tls.and_then(verify::peer_error) {
            Some(refused) => format!("peer certificate refused: {refused}"),
            None => e.to_string(),
        }
    }
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = text_of(e);
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        source = e.source();
    }
    text
}

pub use crate::role::SERVER_PATH;

/// Whom a peer must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedId {
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// Any SPIFFE ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl ExpectedId {
    /// A CA server of `td`: `spiffe://<td>/meshid/server`, with the server mark.
    pub fn server_of(td: &TrustDomain) -> Result<Self, TlsError> {
        let id = SpiffeId::from_segments(td.clone(), &["meshid", "server"])
            .map_err(|e| TlsError::InvalidId(e.to_string()))?;
        Ok(ExpectedId::Exact(id))
    }

    /// The trust domain whose roots verify the peer.
    pub fn trust_domain(&self) -> &TrustDomain {
        match self {
            ExpectedId::Exact(id) => id.trust_domain(),
            ExpectedId::TrustDomain(td) => td,
        }
    }

    /// Whether `actual` (a verified peer's SPIFFE ID) is acceptable.
    pub fn admits(&self, actual: &SpiffeId) -> bool {
        match self {
            ExpectedId::Exact(id) => actual == id,
            ExpectedId::TrustDomain(td) => actual.trust_domain() == td,
        }
    }
}

impl std::fmt::Display for ExpectedId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedId::Exact(id) => write!(f, "{id}"),
            ExpectedId::TrustDomain(td) => write!(f, "any ID of trust domain {td}"),
        }
    }
}

/// The rustls server-certificate verifier of a client that expects `expected`: the server's
/// X509-SVID is verified by `inner` (see [`verify`]), its ID must be the expected one, and the
/// CA server's ID needs the server mark. Keep `inner` to swap the roots.
pub fn server_verifier(inner: Arc<SvidVerifier>, expected: ExpectedId) -> ServerVerifier {
    let display = expected.to_string();
    ServerVerifier::new(inner, Arc::new(move |id| expected.admits(id)), display)
        .requiring(Role::Server)
}

/// A client configuration that authenticates the server by SPIFFE ID against `roots` (of the
/// expected ID's trust domain), and presents `client_identity` (chain leaf first, and its key)
/// when given. ALPN `h2`.
pub fn client_config(
    roots: Vec<CertificateDer<'static>>,
    expected: ExpectedId,
    client_identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let bundles = PeerBundles::from_roots([(expected.trust_domain().clone(), roots)])?;
    let inner = Arc::new(SvidVerifier::with_bundles(bundles));
    client_config_with_verifier(Arc::new(server_verifier(inner, expected)), client_identity)
}

/// Like [`client_config`], with a verifier the caller keeps (to swap its roots).
pub fn client_config_with_verifier(
    verifier: Arc<ServerVerifier>,
    client_identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::InvalidKey)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// A server configuration presenting the certificate `cert_resolver` picks, verifying client
/// X509-SVIDs with `clients` (role [`PeerRole::Client`]; the caller decides whom it admits
/// after the handshake, from [`verify::peer_spiffe_id`]). When `require_client_cert` is false a
/// client without a certificate is admitted too, and the application decides per call; a
/// client that presents one is verified all the same. ALPN `h2`; no session resumption.
pub fn server_config(
    cert_resolver: Arc<dyn ResolvesServerCert>,
    clients: Arc<SvidVerifier>,
    require_client_cert: bool,
) -> Result<ServerConfig, TlsError> {
    let verifier = ClientVerifier::new(clients);
    let verifier = if require_client_cert {
        verifier
    } else {
        verifier.optional()
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert_resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A certificate and key that can be replaced while in use, for servers and clients alike.
/// Empty until the first [`RotatingCert::set`]: handshakes needing it fail closed.
#[derive(Debug, Default)]
pub struct RotatingCert {
    current: ArcSwapOption<CertifiedKey>,
}

impl RotatingCert {
    /// An empty resolver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes a new chain (leaf first) and its private key (PKCS#8, or any form the aws-lc-rs
    /// provider loads). Refused when the key does not match the leaf.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        if chain.is_empty() {
            return Err(TlsError::EmptyChain);
        }
        let certified =
            CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::InvalidKey)?;
        self.current.store(Some(Arc::new(certified)));
        Ok(())
    }

    /// Forgets the certified key: handshakes needing it fail closed until the next `set`
    /// (for an identity that was withdrawn).
    pub fn clear(&self) {
        self.current.store(None);
    }

    /// The certified key in use, if any.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesClientCert for RotatingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

/// Opens a gRPC channel to `addr` (`host:port`) over TCP and TLS with `config`. The
/// connection is made now, so an unreachable server or a failed handshake is reported here;
/// later the channel reconnects on its own with the same configuration. HTTP/2 keepalives
/// detect a dead peer on long-lived streams.
pub async fn connect(addr: &str, config: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| TlsError::InvalidAddress {
            addr: addr.to_owned(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    let target = addr.to_owned();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let target = target.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target.as_str()).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(PLACEHOLDER_SERVER_NAME)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| TlsError::Connect {
            addr: addr.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests;
