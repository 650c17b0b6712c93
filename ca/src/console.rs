//! The read-only web console (`[console]` in ca.toml, off by default): the state of the mesh
//! for operators and security teams, served by the CA wherever it runs.
//!
//! - [`assets`]: the front end (built from `ca/console/`, embedded) and the security headers
//!   every response carries (a strict Content-Security-Policy among them).
//! - [`access`]: who may read it: a loopback peer, a client certificate of `console.admins`, or
//!   a session opened with a login token.
//! - [`api`]: the JSON the pages read (`/api/...`), answered from the datastore and the CA's
//!   state, and `/api/events`, a server-sent event at most once a second when something
//!   changed.
//! - [`state`]: the state the handlers share ([`Console`]): the CA, the access table, the view
//!   and the entries the identities page searches.
//! - [`view`]: what the audit log tells that no query answers (each entry's latest SVID,
//!   renewals, fetches, recent records), kept in memory by [`follow`].
//!
//! Nothing secret is ever sent: no key, no token, no CSR, and audit records only through an
//! allowlist of their fields ([`view::summary`]). A loopback address serves plain HTTP to this
//! host; any other serves HTTPS, and there the API answers 401 to a caller that is neither an
//! admin by certificate nor holding a session (the page and its script, which hold no data,
//! load for everyone so that the login form can).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshid_api::tls::{self, PeerBundles, SvidVerifier};
use rustls::server::ResolvesServerCert;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::service::Ca;

pub mod access;
pub mod api;
pub mod assets;
pub mod state;
pub mod view;

pub use state::{Console, EntryRow, EVENT_INTERVAL};

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client has for the TLS handshake and for each request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the view forgets what its window no longer shows.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// How often the audit log is read for changes.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

/// Applies the audit records after `last` to the view, re-reading the entries when one
/// changed, until `stop`; each batch moves [`Console::changes`].
pub async fn follow(console: Arc<Console>, mut last: i64, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut entries_stale = false;
    let mut behind = false;
    let mut pruned = tokio::time::Instant::now();
    loop {
        if !behind {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
        }
        if pruned.elapsed() >= PRUNE_INTERVAL {
            pruned = tokio::time::Instant::now();
            let mut view = console.view.write().unwrap_or_else(|p| p.into_inner());
            view.prune(crate::unix_now());
        }
        let records = match console.ca.store.audit_records(last, 1000).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "console: cannot read the audit log; will retry");
                continue;
            }
        };
        // A full page: more are waiting; read on without waiting for the tick.
        behind = records.len() == 1000;
        if records.is_empty() && !entries_stale {
            continue;
        }
        {
            let mut view = console.view.write().unwrap_or_else(|p| p.into_inner());
            for r in &records {
                last = r.seq;
                entries_stale |= r.kind.starts_with("entry.") || r.kind == "mesh.apply";
                let d = serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null);
                view.apply(r.seq, r.time, &r.kind, &r.actor, &d);
            }
        }
        if entries_stale {
            match console.reload_entries().await {
                Ok(()) => entries_stale = false,
                Err(e) => {
                    tracing::warn!(error = %e, "console: cannot read the entries; will retry")
                }
            }
        }
        console.changes.send_replace(last);
    }
}

/// How the console is reached: plain HTTP on loopback, or HTTPS with this certificate.
pub enum Transport {
    /// Plain HTTP (a loopback address).
    Plain,
    /// HTTPS presenting what `certs` resolves, with optional client certificates of the trust
    /// domain.
    Https(Arc<dyn ResolvesServerCert>),
}

/// The HTTPS configuration for the current trust bundle: client certificates are optional and
/// verified by meshid-api's one verifier; HTTP/1.1 only.
fn https_config(
    ca: &Ca,
    certs: &Arc<dyn ResolvesServerCert>,
) -> anyhow::Result<(u64, Arc<ServerConfig>)> {
    let bundle = ca.authority.bundle();
    let bundles =
        PeerBundles::from_roots([(bundle.trust_domain.clone(), bundle.x509_authorities.clone())])?;
    let mut config = tls::server_config(
        Arc::clone(certs),
        Arc::new(SvidVerifier::with_bundles(bundles)),
        false,
    )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((bundle.sequence, Arc::new(config)))
}

/// Serves the console on `listener` until `stop`.
pub async fn serve(
    console: Arc<Console>,
    listener: TcpListener,
    transport: Transport,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let last = console.load().await?;
    let follower = tokio::spawn(follow(Arc::clone(&console), last, stop.clone()));
    let router = api::router(Arc::clone(&console), stop.clone());
    let tls_config = match &transport {
        Transport::Plain => None,
        Transport::Https(certs) => Some((
            Arc::clone(certs),
            ArcSwap::from_pointee(https_config(&console.ca, certs)?),
        )),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refused = meshid_api::uds::admission::RateLimitedLog::default();
    tracing::info!(address = ?listener.local_addr().ok(), https = tls_config.is_some(), "console serving");
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p?,
            _ = stop.changed() => break,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    refused.info(|held| tracing::warn!(error = %e, held_back = held, "console: accept failed"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let mut conn_stop = stop.clone();
        let acceptor = match &tls_config {
            None => None,
            Some((certs, config)) => {
                let current = config.load();
                if current.0 != console.ca.authority.bundle().sequence {
                    match https_config(&console.ca, certs) {
                        Ok(fresh) => config.store(Arc::new(fresh)),
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "console: cannot rebuild the TLS configuration; keeping the previous one")
                        }
                    }
                }
                Some(tokio_rustls::TlsAcceptor::from(Arc::clone(
                    &config.load().1,
                )))
            }
        };
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => {
                    let peer = access::Peer {
                        addr,
                        client: None,
                        client_serial: None,
                    };
                    serve_connection(TokioIo::new(tcp), peer, router, &mut conn_stop).await;
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %addr, error = %e, "console: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(peer = %addr, "console: TLS handshake timed out");
                            return;
                        }
                    };
                    let leaf = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(tls::verify::peer_spiffe_id);
                    let client_serial = leaf.as_deref().and_then(|der| {
                        x509_parser::parse_x509_certificate(der)
                            .ok()
                            .map(|(_, c)| hex::encode(c.tbs_certificate.raw_serial()))
                    });
                    let peer = access::Peer {
                        addr,
                        client,
                        client_serial,
                    };
                    serve_connection(TokioIo::new(tls), peer, router, &mut conn_stop).await;
                }
            }
        });
    }
    let _ = follower.await;
    Ok(())
}

/// Serves HTTP/1.1 on one connection, every request tagged with `peer`, until it closes or
/// `stop` (then it finishes the request in flight).
async fn serve_connection<I>(
    io: I,
    peer: access::Peer,
    router: axum::Router,
    stop: &mut watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            router.clone().oneshot(req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "console: connection ended with an error");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
