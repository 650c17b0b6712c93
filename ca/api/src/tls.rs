//! SPIFFE-aware TLS: rustls configurations that authenticate peers by SPIFFE ID.
//!
//! Used by the CA (node API server), the agent (node API client) and the proxy. A peer is
//! authenticated by its X509-SVID: the chain must validate to the trust bundle's roots
//! (rustls-webpki path building, expiry, CA constraints, EKU when present), and the leaf must
//! carry exactly one URI SAN, a SPIFFE ID, which is then matched against what the caller expects
//! ([`ExpectedId`]). DNS names are never checked: the TLS server name sent by [`connect`] is a
//! fixed placeholder.
//!
//! Every configuration here uses the ring [`CryptoProvider`] explicitly, never a process-wide
//! default, and disables session resumption, so each connection verifies the peer's current
//! certificate against the current roots.
//!
//! # Rotation
//! - Own certificate: [`RotatingCert`] is a certificate resolver (server and client side) whose
//!   certified key is swapped with [`RotatingCert::set`]; new handshakes take the newest,
//!   established connections are untouched, and before the first `set` handshakes fail closed.
//! - Roots: a [`SpiffeServerVerifier`] holds its roots in an `ArcSwap`; keep an
//!   `Arc<SpiffeServerVerifier>`, build the config with [`client_config_with_verifier`] and call
//!   [`SpiffeServerVerifier::set_roots`] when the bundle changes. [`client_config`] is the simple
//!   form for callers that build a fresh `ClientConfig` per connection (cheap). On the server
//!   side, build a new `ServerConfig` with [`server_config`] when the bundle changes and use it
//!   for new handshakes.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use spiffe::{SpiffeId, TrustDomain};
use tonic::transport::{Channel, Endpoint, Uri};

/// The ALPN protocol of every meshid gRPC connection.
pub const ALPN_H2: &[u8] = b"h2";

/// The TLS server name [`connect`] sends. Not verified: the server is authenticated by its
/// SPIFFE ID.
pub const PLACEHOLDER_SERVER_NAME: &str = "meshid-ca";

/// How long [`connect`] waits for TCP and the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of SPIFFE TLS configuration and verification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate is not DER X.509, or its extensions are malformed.
    #[error("certificate does not parse: {0}")]
    MalformedCertificate(String),
    /// The leaf has no URI SAN, so no SPIFFE ID.
    #[error("certificate has no URI SAN: an X509-SVID carries its SPIFFE ID as its only URI SAN")]
    NoSpiffeId,
    /// The leaf has more than one URI SAN.
    #[error("certificate has {0} URI SANs: an X509-SVID has exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a (canonical) SPIFFE ID.
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    NotSpiffeId {
        /// The URI as found in the certificate.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The peer is authenticated but is not who the caller expected.
    #[error("peer is {actual}, expected {expected}")]
    UnexpectedId {
        /// The peer's SPIFFE ID.
        actual: String,
        /// What was expected ([`ExpectedId`]'s display form).
        expected: String,
    },
    /// The expected identity given to a verifier is not a valid SPIFFE ID or trust domain.
    #[error("invalid expected peer identity {value:?}: {reason}")]
    InvalidExpectedId {
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No trust anchor was given, or one cannot be used as a trust anchor.
    #[error("invalid trust anchors: {0}")]
    InvalidRoots(String),
    /// A private key that the crypto provider cannot use, or that does not match the
    /// certificate.
    #[error("invalid certificate or key: {0}")]
    InvalidKey(#[source] rustls::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
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
/// error", and what went wrong (a refused certificate, a reset) is in its sources.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        source = e.source();
    }
    text
}

/// The ring provider, which every configuration of this module uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE ID of a leaf certificate: its single URI SAN, which must be a SPIFFE ID in
/// canonical form. Zero or several URI SANs are refused, as is anything but `spiffe://`.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| TlsError::MalformedCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::MalformedCertificate(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(TlsError::NoSpiffeId),
        [one] => *one,
        many => return Err(TlsError::MultipleUriSans(many.len())),
    };
    let id = SpiffeId::new(uri).map_err(|e| TlsError::NotSpiffeId {
        uri: uri.to_owned(),
        reason: e.to_string(),
    })?;
    let canonical = id.to_string();
    if canonical != uri {
        return Err(TlsError::NotSpiffeId {
            uri: uri.to_owned(),
            reason: format!("not in canonical form ({canonical})"),
        });
    }
    Ok(canonical)
}

/// Whom a peer must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedId {
    /// Exactly this SPIFFE ID.
    Exact(String),
    /// Any SPIFFE ID of this trust domain (the bare name, e.g. `example.org`).
    TrustDomain(String),
}

impl ExpectedId {
    /// Checks that the expected value itself is well-formed.
    fn validate(&self) -> Result<(), TlsError> {
        let invalid = |value: &str, reason: String| TlsError::InvalidExpectedId {
            value: value.to_owned(),
            reason,
        };
        match self {
            ExpectedId::Exact(id) => {
                let parsed = SpiffeId::new(id).map_err(|e| invalid(id, e.to_string()))?;
                if parsed.to_string() != *id {
                    return Err(invalid(id, format!("write it canonically: {parsed}")));
                }
            }
            ExpectedId::TrustDomain(td) => {
                let parsed = TrustDomain::new(td).map_err(|e| invalid(td, e.to_string()))?;
                if parsed.as_str() != td {
                    return Err(invalid(td, format!("write the bare name: {parsed}")));
                }
            }
        }
        Ok(())
    }

    /// Whether `actual` (a canonical SPIFFE ID, from [`spiffe_id_of`]) is acceptable.
    pub fn check(&self, actual: &str) -> Result<(), TlsError> {
        let ok = match self {
            ExpectedId::Exact(id) => actual == id,
            ExpectedId::TrustDomain(td) => {
                SpiffeId::new(actual).is_ok_and(|id| id.trust_domain_name() == td)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(TlsError::UnexpectedId {
                actual: actual.to_owned(),
                expected: self.to_string(),
            })
        }
    }
}

impl std::fmt::Display for ExpectedId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedId::Exact(id) => f.write_str(id),
            ExpectedId::TrustDomain(td) => write!(f, "any ID of trust domain {td}"),
        }
    }
}

fn check_roots(roots: &[CertificateDer<'static>]) -> Result<(), TlsError> {
    if roots.is_empty() {
        return Err(TlsError::InvalidRoots(
            "no root certificates; pass the trust bundle".to_owned(),
        ));
    }
    for (i, root) in roots.iter().enumerate() {
        webpki::anchor_from_trusted_cert(root)
            .map_err(|e| TlsError::InvalidRoots(format!("root {i}: {e}")))?;
    }
    Ok(())
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert)
}

fn id_error(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Whether `id` (canonical) is a CA server's ID, `spiffe://<td>/meshid/server`.
fn is_server_id(id: &str) -> bool {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, path)| path == "meshid/server")
}

/// Verifies a server by SPIFFE ID: the chain must validate to the roots (serverAuth EKU when
/// the leaf has an EKU), the leaf's SPIFFE ID must be the expected one; the DNS name is
/// ignored. Roots can be replaced while the verifier is in use ([`Self::set_roots`]).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: ArcSwap<Vec<CertificateDer<'static>>>,
    expected: ExpectedId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// A verifier trusting `roots` (DER root certificates of the trust bundle).
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        expected: ExpectedId,
    ) -> Result<Self, TlsError> {
        check_roots(&roots)?;
        expected.validate()?;
        Ok(Self {
            roots: ArcSwap::from_pointee(roots),
            expected,
            algorithms: provider().signature_verification_algorithms,
        })
    }

    /// Replaces the roots; the next handshake uses them.
    pub fn set_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        check_roots(&roots)?;
        self.roots.store(Arc::new(roots));
        Ok(())
    }

    /// Whom this verifier accepts.
    pub fn expected(&self) -> &ExpectedId {
        &self.expected
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.roots.load();
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(webpki_error)?;
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        leaf.verify_for_usage(
            self.algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let id = spiffe_id_of(end_entity).map_err(id_error)?;
        self.expected.check(&id).map_err(id_error)?;
        // meshid's CA server must also carry the server mark: a workload SVID that merely
        // names the server's ID is not the CA.
        if is_server_id(&id) && !crate::role::Role::Server.marks(end_entity) {
            return Err(id_error(TlsError::UnexpectedId {
                actual: format!("{id} without the CA server mark (a workload SVID?)"),
                expected: self.expected.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration that authenticates the server by SPIFFE ID against `roots`, and
/// presents `client_identity` (chain leaf first, and its key) when given. ALPN `h2`.
pub fn client_config(
    roots: Vec<CertificateDer<'static>>,
    expected: ExpectedId,
    client_identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(roots, expected)?);
    client_config_with_verifier(verifier, client_identity)
}

/// Like [`client_config`], with a verifier the caller keeps (to swap its roots).
pub fn client_config_with_verifier(
    verifier: Arc<SpiffeServerVerifier>,
    client_identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
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
/// certificates against `client_roots` (path validation, clientAuth EKU when present; the
/// caller checks the client's SPIFFE ID after the handshake, with [`spiffe_id_of`]). When
/// `require_client_cert` is false a client without a certificate is admitted too, and the
/// application decides per call. ALPN `h2`; no session resumption.
pub fn server_config(
    cert_resolver: Arc<dyn ResolvesServerCert>,
    client_roots: Vec<CertificateDer<'static>>,
    require_client_cert: bool,
) -> Result<ServerConfig, TlsError> {
    check_roots(&client_roots)?;
    let provider = provider();
    let mut store = RootCertStore::empty();
    for root in client_roots {
        store
            .add(root)
            .map_err(|e| TlsError::InvalidRoots(e.to_string()))?;
    }
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(store), Arc::clone(&provider));
    let verifier = if require_client_cert {
        builder.build()?
    } else {
        builder.allow_unauthenticated().build()?
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
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

    /// Publishes a new chain (leaf first) and its private key (PKCS#8, or any form the ring
    /// provider loads). Refused when the key does not match the leaf.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        if chain.is_empty() {
            return Err(TlsError::MalformedCertificate(
                "empty certificate chain".to_owned(),
            ));
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
