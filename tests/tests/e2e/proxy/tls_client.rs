//! A raw rustls client for talking to a proxy's inbound listener directly, presenting any
//! certificate chain and key (the corpus of malformed SVIDs) and accepting any server
//! certificate: these tests are about the server side's verification.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::proxy::support::IO_TIMEOUT;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts every server certificate and signature.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Always presents the same chain and key, whatever they contain (no consistency check, so
/// deliberately broken certificates are sent as they are).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a client credential is made of.
pub struct Identity {
    /// Certificates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Every CERTIFICATE block of `pem` (in order) and its PRIVATE KEY block; the key may
    /// instead be in `key_pem`.
    pub fn from_pem(pem: &[u8], key_pem: Option<&[u8]>) -> Identity {
        let chain = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(pem)
            .or_else(|e| match key_pem {
                Some(k) => PrivateKeyDer::from_pem_slice(k),
                None => Err(e),
            })
            .unwrap();
        Identity { chain, key }
    }

    /// [`Identity::from_pem`] of a file (with a key file beside it, if given).
    pub fn from_files(pem: &Path, key: Option<&Path>) -> Identity {
        let key = key.map(|k| std::fs::read(k).unwrap());
        Identity::from_pem(&std::fs::read(pem).unwrap(), key.as_deref())
    }
}

/// A TLS 1.3 client configuration presenting `identity` (or no certificate).
pub fn client_config(identity: Option<&Identity>) -> Arc<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider.clone())));
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let key = provider
                .key_provider
                .load_private_key(id.key.clone_key())
                .unwrap();
            builder.with_client_cert_resolver(Arc::new(Fixed(Arc::new(CertifiedKey::new(
                id.chain.clone(),
                key,
            )))))
        }
    };
    Arc::new(config)
}

/// What happened to one exchange.
#[derive(Debug)]
pub struct Exchange {
    /// The client completed its side of the handshake.
    pub handshake_done: bool,
    /// Application bytes received before the end.
    pub received: Vec<u8>,
    /// How it ended (`None`: clean end of stream, or all expected bytes were in).
    pub error: Option<String>,
}

/// Connects to `addr`, sends `request` over TLS and reads until the peer closes, an error, or
/// `until` appears in what was received.
pub fn exchange(addr: &str, config: Arc<ClientConfig>, request: &[u8], until: &[u8]) -> Exchange {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let conn = ClientConnection::new(config, ServerName::try_from("api.test").unwrap()).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    let mut out = Exchange {
        handshake_done: false,
        received: Vec::new(),
        error: None,
    };
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            out.error = Some(format!("handshake: {e}"));
            return out;
        }
    }
    out.handshake_done = true;
    if let Err(e) = tls.write_all(request).and_then(|()| tls.flush()) {
        out.error = Some(format!("write: {e}"));
        return out;
    }
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => {
                out.received.extend_from_slice(&buf[..n]);
                if !until.is_empty() && out.received.windows(until.len()).any(|w| w == until) {
                    return out;
                }
            }
            Err(e) => {
                out.error = Some(format!("read: {e}"));
                return out;
            }
        }
    }
}

/// The leaf certificate the server at `addr` presents, from a handshake without a client
/// certificate (the server refuses it afterwards, which does not matter here).
pub fn server_leaf(addr: &str) -> Option<CertificateDer<'static>> {
    let tcp = TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    tcp.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    let conn =
        ClientConnection::new(client_config(None), ServerName::try_from("api.test").ok()?).ok()?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).ok()?;
    }
    tls.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
}
