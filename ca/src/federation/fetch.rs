//! Fetching a bundle from another trust domain's bundle endpoint: one `GET` over HTTPS
//! (HTTP/1.1, TLS 1.3), the server authenticated per the relationship's profile, the answer
//! bounded in time and size and parsed strictly as a SPIFFE bundle of that trust domain.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshid_api::tls::{self, ExpectedId};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;

use super::{parse_bundle, Profile, Relationship, MAX_BUNDLE_BYTES};
use crate::bundle::TrustBundle;

/// How long one fetch may take, connection and TLS handshake included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a fetch failed. Messages name the endpoint and what to check; never a body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The TCP connection failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// `host:port`.
        endpoint: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (for https_spiffe: the endpoint's SVID did not verify against
    /// the bundle held, or has another SPIFFE ID; for https_web: its certificate did not verify
    /// against the Web PKI roots).
    #[error("TLS handshake with {endpoint} failed: {source}")]
    Tls {
        /// `host:port`.
        endpoint: String,
        /// What rustls said.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed, or the answer was not 200.
    #[error("{endpoint}: {reason}")]
    Http {
        /// `host:port`.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The document is not a usable bundle of the trust domain.
    #[error("{endpoint}: {source}")]
    Bundle {
        /// `host:port`.
        endpoint: String,
        /// Why it was refused.
        #[source]
        source: super::FederationError,
    },
    /// No bundle is held to authenticate an https_spiffe endpoint with.
    #[error("no bundle of {0} is held to authenticate its https_spiffe endpoint: recreate the relationship with --bundle-file")]
    NoBundle(String),
    /// The fetch took longer than [`FETCH_TIMEOUT`].
    #[error("{0}: no answer within {FETCH_TIMEOUT:?}")]
    Timeout(String),
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// What a fetch verifies an `https_web` endpoint against.
#[derive(Debug, Clone)]
pub struct WebRoots(pub Arc<RootCertStore>);

impl WebRoots {
    /// No roots: every https_web endpoint is refused (tests that federate over https_spiffe
    /// only).
    pub fn none() -> WebRoots {
        WebRoots(Arc::new(RootCertStore::empty()))
    }

    /// The roots in `file` (PEM) when given, else the system's.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<WebRoots> {
        use anyhow::Context as _;
        use rustls_pki_types::pem::PemObject as _;
        let mut store = RootCertStore::empty();
        match file {
            Some(path) => {
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("{}: not PEM certificates", path.display()))?;
                let (added, _) = store.add_parsable_certificates(certs);
                anyhow::ensure!(added > 0, "{}: no usable root certificate", path.display());
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
            }
        }
        Ok(WebRoots(Arc::new(store)))
    }
}

/// Fetches the bundle of `relationship`'s trust domain from its endpoint. `held` is the bundle
/// held for that trust domain (required for https_spiffe: it authenticates the endpoint).
/// Returns the bundle and the document as fetched.
pub async fn fetch_bundle(
    relationship: &Relationship,
    held: Option<&TrustBundle>,
    web_roots: &WebRoots,
) -> Result<(TrustBundle, String), FetchError> {
    let config = client_config(relationship, held, web_roots)?;
    let url = &relationship.endpoint_url;
    let document = https_get(url, config, MAX_BUNDLE_BYTES).await?;
    let endpoint = format!(
        "{}:{}",
        url.host().unwrap_or_default(),
        url.port_u16().unwrap_or(443)
    );
    let bundle = parse_bundle(&relationship.trust_domain, &document)
        .map_err(|source| FetchError::Bundle { endpoint, source })?;
    Ok((bundle, document))
}

/// A Web PKI client configuration over `roots` (HTTP/1.1).
pub fn web_client_config(roots: &WebRoots) -> Result<ClientConfig, FetchError> {
    let mut config = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)
        .map_err(|e| FetchError::Config(e.to_string()))?
        .with_root_certificates(Arc::clone(&roots.0))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `GET url` over TLS with `config`: the body of a 200 answer (UTF-8, at most `max_bytes`),
/// within [`FETCH_TIMEOUT`].
pub async fn https_get(
    url: &http::Uri,
    config: ClientConfig,
    max_bytes: usize,
) -> Result<String, FetchError> {
    match https_request(url, config, None, max_bytes).await? {
        (200, body) => Ok(body),
        (status, _) => Err(FetchError::Http {
            endpoint: url.authority().map_or("", |a| a.as_str()).to_owned(),
            reason: format!("answered {status}, expected 200 OK"),
        }),
    }
}

/// One request over TLS with `config`: `GET url`, or `POST` of `json` when given. Returns the
/// status and the body (UTF-8, at most `max_bytes`), within [`FETCH_TIMEOUT`].
pub async fn https_request(
    url: &http::Uri,
    config: ClientConfig,
    json: Option<String>,
    max_bytes: usize,
) -> Result<(u16, String), FetchError> {
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = url.port_u16().unwrap_or(443);
    let endpoint = format!("{}:{port}", url.host().unwrap_or_default());
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|source| FetchError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| FetchError::Config(format!("server name {host:?}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|source| FetchError::Tls {
                endpoint: endpoint.clone(),
                source,
            })?;
        let http = |reason: String| FetchError::Http {
            endpoint: endpoint.clone(),
            reason,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http(format!("HTTP: {e}")))?;
        let driver = tokio::spawn(conn);
        let path = url.path_and_query().map_or("/", |p| p.as_str());
        let method = if json.is_some() {
            hyper::Method::POST
        } else {
            hyper::Method::GET
        };
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(
                hyper::header::HOST,
                url.authority().map_or("", |a| a.as_str()),
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "meshid-ca")
            .body(Full::new(Bytes::from(json.clone().unwrap_or_default())))
            .map_err(|e| http(format!("request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http(format!("HTTP: {e}")))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| {
                http(format!(
                    "reading the answer (at most {max_bytes} bytes): {e}"
                ))
            })?
            .to_bytes();
        driver.abort();
        let body = String::from_utf8(body.to_vec())
            .map_err(|_| http("the answer is not UTF-8".to_owned()))?;
        Ok((status, body))
    };
    tokio::time::timeout(FETCH_TIMEOUT, fetch)
        .await
        .map_err(|_| FetchError::Timeout(endpoint.clone()))?
}

/// The TLS client configuration for `relationship`'s endpoint.
fn client_config(
    relationship: &Relationship,
    held: Option<&TrustBundle>,
    web_roots: &WebRoots,
) -> Result<ClientConfig, FetchError> {
    let mut config = match &relationship.profile {
        Profile::HttpsWeb => web_client_config(web_roots)?,
        Profile::HttpsSpiffe(id) => {
            let held = held
                .filter(|b| !b.x509_authorities.is_empty())
                .ok_or_else(|| FetchError::NoBundle(relationship.trust_domain.to_string()))?;
            tls::client_config(
                held.x509_authorities.clone(),
                ExpectedId::Exact(id.clone()),
                None,
            )
            .map_err(|e| FetchError::Config(e.to_string()))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
