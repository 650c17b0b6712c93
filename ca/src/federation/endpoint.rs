//! This trust domain's bundle endpoint (`federation.bundle_endpoint_address`): `GET /`
//! answers the SPIFFE bundle (JWKS with `spiffe_sequence` and `spiffe_refresh_hint`), over
//! HTTPS in one of the two profiles of the SPIFFE Federation specification:
//! - `https_spiffe` (default): the CA server's own X509-SVID (`spiffe://<td>/meshid/server`,
//!   the node API's, renewed with it), so that a federated CA authenticates it with the bundle
//!   it already holds;
//! - `https_web`: a Web PKI certificate and key from files (PEM), reloaded when they change,
//!   for relying parties that only know Web PKI roots.
//!
//! With an OIDC issuer (`ca.jwt_issuer`) it also serves the issuer's discovery document and
//! JWKS ([`crate::oidc`]), at `<issuer path>/.well-known/openid-configuration` and `/keys`.
//!
//! It is public by nature, so it is bounded: at most [`MAX_CONNECTIONS`] at once, a TLS
//! handshake within [`HANDSHAKE_TIMEOUT`], the whole connection within [`CONNECTION_LIFETIME`],
//! HTTP/1.1 only, no request body read, nothing but the bundle served.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshid_api::tls;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::service::Ca;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may last, requests included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves the bundle on `listener` with the certificate `certs` resolves, until `stop`.
pub async fn serve(
    ca: Ca,
    listener: TcpListener,
    certs: Arc<dyn ResolvesServerCert>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut config = ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(address = ?listener.local_addr().ok(), "bundle endpoint serving");
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p?,
            _ = super::stopped(&mut stop) => return Ok(()),
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = super::stopped(&mut stop) => return Ok(()),
        };
        let (acceptor, ca) = (acceptor.clone(), ca.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let served = tokio::time::timeout(CONNECTION_LIFETIME, async {
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_owned())?
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let ca = ca.clone();
                        async move {
                            let response =
                                if req.uri().path() == CI_EXCHANGE_PATH && ca.ci.enabled() {
                                    exchange(&ca, req, &peer.to_string()).await
                                } else {
                                    answer(&ca, &req)
                                };
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    },
                );
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                    .map_err(|e| format!("HTTP: {e}"))
            })
            .await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    tracing::debug!(peer = %peer, reason = %why, "bundle endpoint connection failed")
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "bundle endpoint connection outlived its lifetime; closed")
                }
            }
        });
    }
}

/// Where CI jobs exchange their OIDC token (when `[[ci.issuers]]` are configured).
pub const CI_EXCHANGE_PATH: &str = "/v1/ci/exchange";
/// The largest exchange request, in bytes.
const MAX_EXCHANGE_BYTES: usize = 64 * 1024;

/// An exchange request as sent (JSON).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeRequest {
    /// The CI system's OIDC token.
    token: String,
    /// A PKCS#10 CSR, base64 DER, for an X.509-SVID.
    #[serde(default)]
    csr: String,
    /// Audiences for a JWT-SVID.
    #[serde(default)]
    jwt_audiences: Vec<String>,
}

/// `POST /v1/ci/exchange`: a JSON answer with the SVIDs, or with `error` (the refusal's
/// reason) and `message`.
async fn exchange(
    ca: &Ca,
    req: hyper::Request<hyper::body::Incoming>,
    peer: &str,
) -> hyper::Response<Full<Bytes>> {
    use crate::service::ci::{CiError, CiExchange};
    use http_body_util::BodyExt as _;
    use hyper::StatusCode;
    let reply = |status: StatusCode, body: serde_json::Value| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-store"),
        );
        r
    };
    let bad = |message: String| {
        reply(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "bad_request", "message": message }),
        )
    };
    if req.method() != hyper::Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "method", "message": "POST a JSON request" }),
        );
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_EXCHANGE_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return bad(format!(
                "the request is larger than {MAX_EXCHANGE_BYTES} bytes"
            ))
        }
    };
    let request: ExchangeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        // serde's message names the field, never its value.
        Err(e) => return bad(format!("not an exchange request: {e}")),
    };
    let csr_der = {
        use base64::Engine as _;
        match base64::engine::general_purpose::STANDARD.decode(request.csr.trim()) {
            Ok(der) => der,
            Err(_) => return bad("csr is not base64 (DER)".into()),
        }
    };
    let asked = CiExchange {
        token: request.token,
        csr_der,
        jwt_audiences: request.jwt_audiences,
    };
    match ca.exchange_ci_token(asked, peer).await {
        Ok(done) => {
            let pem = |certs: &[rustls_pki_types::CertificateDer<'_>]| {
                meshid_api::files::pem("CERTIFICATE", certs.iter().map(|c| c.as_ref()))
            };
            let bundle = ca.authority.bundle();
            reply(
                StatusCode::OK,
                serde_json::json!({
                    "spiffe_id": done.spiffe_id,
                    "x509_svid": done.x509.as_ref().map(|s| pem(&s.chain)),
                    "x509_svid_expires_at": done.x509.as_ref().map(|s| s.not_after),
                    "x509_bundle": pem(&bundle.x509_authorities),
                    "jwt_svid": done.jwt.as_ref().map(|(t, _)| t),
                    "jwt_svid_expires_at": done.jwt.as_ref().map(|(_, exp)| exp),
                }),
            )
        }
        Err(CiError::Refused(r)) => reply(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": r.reason(), "message": r.to_string() }),
        ),
        Err(CiError::BadRequest(m)) => bad(m),
        Err(e @ CiError::Unavailable(_)) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "unavailable", "message": e.to_string() }),
        ),
        Err(CiError::Failed(e)) => {
            let status = match &e {
                crate::service::ServiceError::InvalidArgument { .. }
                | crate::service::ServiceError::Authority(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            reply(
                status,
                serde_json::json!({ "error": "failed", "message": e.to_string() }),
            )
        }
    }
}

/// What a path serves.
enum Document {
    /// The SPIFFE bundle.
    Bundle,
    /// The OIDC discovery document of `ca.jwt_issuer`.
    Discovery,
    /// The OIDC JWKS.
    Keys,
}

/// The answer to one request: the bundle for `GET /` (and `HEAD /`); with an OIDC issuer, its
/// discovery document and JWKS at their paths ([`crate::oidc::paths`]); else 404 or 405.
fn answer<B>(ca: &Ca, req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    use hyper::{header, Method, StatusCode};
    let issuer = ca.authority.settings().jwt_issuer.as_deref();
    let path = req.uri().path();
    let document = match issuer.map(crate::oidc::paths) {
        _ if path == "/" => Some(Document::Bundle),
        Some((discovery, _)) if path == discovery => Some(Document::Discovery),
        Some((_, keys)) if path == keys => Some(Document::Keys),
        _ => None,
    };
    let status = match (req.method(), &document) {
        (_, None) => StatusCode::NOT_FOUND,
        (&Method::GET | &Method::HEAD, Some(_)) => StatusCode::OK,
        _ => StatusCode::METHOD_NOT_ALLOWED,
    };
    let body = match (status, document, issuer) {
        (StatusCode::OK, Some(document), issuer) => {
            ca.metrics.bundle_endpoint_requests.inc();
            let bundle = ca.authority.bundle();
            match (document, issuer) {
                (Document::Discovery, Some(issuer)) => {
                    crate::oidc::discovery(issuer, &bundle).to_string()
                }
                (Document::Keys, _) => crate::oidc::jwks(&bundle).to_string(),
                _ => bundle.to_spiffe_json(),
            }
        }
        _ => String::new(),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// A Web PKI certificate and key from PEM files, reloaded (at most every few seconds, on the
/// next handshake) when either file changes; a reload that fails keeps the previous pair and
/// is logged.
pub struct FileCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    checked: Mutex<(Instant, Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for FileCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// How often the files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

impl FileCert {
    /// Loads the pair; the key file must not be readable by group or others.
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<FileCert> {
        let key = read_pair(cert_file, key_file)?;
        Ok(FileCert {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(key),
            checked: Mutex::new((Instant::now(), modified(cert_file), modified(key_file))),
        })
    }

    fn reload_if_changed(&self) {
        let mut checked = self
            .checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if checked.0.elapsed() < RELOAD_CHECK {
            return;
        }
        let (cert, key) = (modified(&self.cert_file), modified(&self.key_file));
        *checked = (Instant::now(), checked.1, checked.2);
        if (cert, key) == (checked.1, checked.2) {
            return;
        }
        match read_pair(&self.cert_file, &self.key_file) {
            Ok(pair) => {
                self.current.store(Arc::new(pair));
                *checked = (Instant::now(), cert, key);
                tracing::info!(cert_file = %self.cert_file.display(), "bundle endpoint certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot reload the bundle endpoint certificate; keeping the previous one")
            }
        }
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        Some(self.current.load_full())
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_pair(cert_file: &Path, key_file: &Path) -> anyhow::Result<CertifiedKey> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    meshid_api::config::check_private(key_file, "bundle endpoint key")?;
    let chain = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("cannot read {}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", cert_file.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{}: no certificate", cert_file.display());
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("{}: no PEM private key", key_file.display()))?;
    let signer = tls::provider()
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("{}: unusable private key", key_file.display()))?;
    let pair = CertifiedKey::new(chain, signer);
    pair.keys_match().with_context(|| {
        format!(
            "{} does not match {}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(pair)
}
