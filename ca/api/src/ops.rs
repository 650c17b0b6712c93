//! The ops endpoint every meshid binary serves on its `ops_address`, and the `healthcheck`
//! command that asks it: `GET /healthz` (the process answers), `GET /readyz` (it can do its
//! job: 200 `ready`, else 503 and why), `GET /metrics` (OpenMetrics text).
//!
//! Each binary says what ready means and what its metrics are ([`Ops`]); the routes, status
//! codes, content type and the client are written once, here.

use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The OpenMetrics content type of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long [`healthcheck`] waits to connect, and then for the answer.
pub const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What a binary's ops endpoint reports.
pub trait Ops: Clone + Send + Sync + 'static {
    /// `Ok` when ready; otherwise why not (one line, shown in the 503 body).
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// The metrics, OpenMetrics text (refreshed for this scrape where needed).
    fn metrics(&self) -> Result<String, std::fmt::Error>;
}

/// The router of `/healthz`, `/readyz` and `/metrics` over `ops`.
pub fn router<O: Ops>(ops: O) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz::<O>))
        .route("/metrics", axum::routing::get(metrics::<O>))
        .with_state(ops)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz<O: Ops>(State(ops): State<O>) -> Response {
    match ops.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics<O: Ops>(State(ops): State<O>) -> Response {
    match ops.metrics() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Why [`healthcheck`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HealthError {
    /// Nothing answered at the address, or not in time.
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        /// The ops address.
        addr: String,
        /// What happened.
        source: std::io::Error,
    },
    /// It answered: not ready, and why.
    #[error("not ready: {0}")]
    NotReady(String),
}

/// Asks the ops endpoint at `addr` (`host:port`) whether the process is ready: `GET /readyz`
/// over plain HTTP/1.1, [`HEALTHCHECK_TIMEOUT`] to connect and again to answer. For the
/// `healthcheck` subcommand of every binary (container and systemd probes), so it blocks and
/// needs no runtime.
pub fn healthcheck(addr: &str) -> Result<(), HealthError> {
    let unreachable = |source| HealthError::Unreachable {
        addr: addr.to_owned(),
        source,
    };
    let answer = (|| {
        let mut last = None;
        let mut stream = None;
        for a in std::net::ToSocketAddrs::to_socket_addrs(addr)? {
            match TcpStream::connect_timeout(&a, HEALTHCHECK_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut s = stream.ok_or_else(|| {
            last.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing"))
        })?;
        s.set_read_timeout(Some(HEALTHCHECK_TIMEOUT))?;
        s.set_write_timeout(Some(HEALTHCHECK_TIMEOUT))?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })()
    .map_err(unreachable)?;
    if answer.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        let why = answer.lines().last().unwrap_or_default().trim();
        Err(HealthError::NotReady(why.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[derive(Clone)]
    struct Flag(Arc<AtomicBool>);

    impl Ops for Flag {
        async fn ready(&self) -> Result<(), String> {
            if self.0.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("no svid yet".to_owned())
            }
        }

        fn metrics(&self) -> Result<String, std::fmt::Error> {
            Ok("# EOF\n".to_owned())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthcheck_follows_readyz() {
        let flag = Flag(Arc::new(AtomicBool::new(false)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let app = router(flag.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let check = |addr: String| tokio::task::spawn_blocking(move || healthcheck(&addr));
        match check(addr.clone()).await.unwrap() {
            Err(HealthError::NotReady(why)) => assert_eq!(why, "no svid yet"),
            other => panic!("{other:?}"),
        }
        flag.0.store(true, Ordering::Relaxed);
        check(addr.clone()).await.unwrap().unwrap();
        server.abort();
        let _ = server.await;
        assert!(matches!(
            check(addr).await.unwrap(),
            Err(HealthError::Unreachable { .. })
        ));
    }
}
