//! HTTP/2 without TLS (h2c with prior knowledge, as an application talks to its sidecar): a
//! backend that answers `<METHOD> <path> <version>` and a client whose requests share one
//! connection.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// An HTTP/2 application on a free port, on the current runtime.
pub struct H2Backend {
    /// `127.0.0.1:port`.
    pub addr: String,
    requests: Arc<AtomicU64>,
}

impl H2Backend {
    /// Starts it (from within a runtime).
    pub async fn start() -> H2Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let body = format!(
                            "{} {} {:?}\n",
                            req.method(),
                            req.uri().path(),
                            req.version()
                        );
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        H2Backend { addr, requests }
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// One HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct H2Client {
    send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
}

impl H2Client {
    /// Connects to `addr` and does the HTTP/2 handshake.
    pub async fn connect(addr: &str) -> H2Client {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        H2Client { send }
    }

    /// Sends a request on the shared connection: status and body.
    pub async fn request(&self, method: &str, path: &str) -> Result<(u16, String), String> {
        let mut send = self.send.clone();
        send.ready().await.map_err(|e| format!("connection: {e}"))?;
        let req = Request::builder()
            .method(method)
            .uri(format!("http://api.test{path}"))
            .body(Empty::new())
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The connection is still usable.
    pub fn is_open(&self) -> bool {
        !self.send.is_closed()
    }
}
