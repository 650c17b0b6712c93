//! Outbound: take plaintext from the local application and open mTLS to the upstream, whose
//! SVID must match the listener's expected SPIFFE ID or pattern. Bytes are spliced; one access
//! log line per connection.

use std::sync::Arc;
use std::time::Instant;

use meshid_policy::AccessRecord;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::config::Outbound;
use crate::metrics::ListenerMetrics;
use crate::proxy::{accept_loop, splice, Shared};
use meshid_api::tls::verify;

/// What every connection of one outbound listener shares.
#[derive(Debug)]
pub struct Listener {
    /// The listener's configuration.
    pub config: Outbound,
    /// Its counters.
    pub metrics: ListenerMetrics,
    /// Process-wide state.
    pub shared: Arc<Shared>,
    /// TLS client configuration (credentials and expected peer).
    pub tls: Arc<rustls::ClientConfig>,
    /// The TLS server name sent (SNI: the upstream's host when it is a DNS name). Not what
    /// authenticates the server: its SPIFFE ID is.
    pub server_name: ServerName<'static>,
}

/// The SNI for an upstream `host:port`.
pub fn server_name(upstream: &str) -> ServerName<'static> {
    let host = upstream
        .rsplit_once(':')
        .map_or(upstream, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// Accepts connections until the drain starts.
pub async fn run(listener: TcpListener, this: Arc<Listener>) {
    let connector = TlsConnector::from(this.tls.clone());
    accept_loop(listener, &this.shared, &this.metrics, None, |tcp, _| {
        let (this, connector) = (this.clone(), connector.clone());
        async move { connection(&this, &connector, tcp).await }
    })
    .await;
}

async fn connection(this: &Listener, connector: &TlsConnector, app: TcpStream) {
    let _ = app.set_nodelay(true);
    let start = Instant::now();
    let name = &this.config.name;
    let upstream = &this.config.upstream;
    if !this.shared.creds.ready() {
        this.metrics.handshake_failure("no_svid");
        tracing::info!(listener = %name, "no svid yet; refusing outbound connection");
        return;
    }
    let tcp = match this.shared.connect(upstream).await {
        Ok(t) => t,
        Err(e) => {
            this.metrics.handshake_failure("connect");
            tracing::warn!(listener = %name, upstream = %upstream, error = %e, "cannot reach upstream");
            return;
        }
    };
    let to = Upstream {
        addr: upstream,
        port: None,
        server_name: this.server_name.clone(),
    };
    forward(&this.metrics, &this.shared, connector, to, tcp, app, start).await;
}

/// Where an outbound connection goes.
pub(crate) struct Upstream<'a> {
    /// For logs.
    pub addr: &'a str,
    /// For the access log (transparent mode: the original destination port).
    pub port: Option<u16>,
    /// SNI.
    pub server_name: ServerName<'static>,
}

/// Runs the mTLS handshake over `tcp` (the verifier checks the server's SVID against what the
/// connector expects), then relays between `app` and the upstream and writes the access log.
pub(crate) async fn forward(
    metrics: &ListenerMetrics,
    shared: &Shared,
    connector: &TlsConnector,
    to: Upstream<'_>,
    tcp: TcpStream,
    mut app: TcpStream,
    start: Instant,
) {
    let name = &metrics.name;
    let upstream = to.addr;
    let handshake = connector.connect(to.server_name, crate::io::ReadAhead::new(tcp));
    let mut tls = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = verify::io_failure_reason(&e);
            metrics.handshake_failure(reason);
            tracing::warn!(listener = %name, upstream = %upstream, reason, error = %e, "outbound handshake failed");
            return;
        }
        Err(_) => {
            metrics.handshake_failure("timeout");
            tracing::warn!(listener = %name, upstream = %upstream, reason = "timeout", "outbound handshake failed");
            return;
        }
    };
    let group = meshid_api::tls::kx_group_name(tls.get_ref().1);
    metrics.handshake(group);
    let callee = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(verify::peer_spiffe_id);
    let chain = crate::proxy::peer_chain(tls.get_ref().1.peer_certificates());
    let (tx, rx) = tokio::select! {
        r = splice(&mut app, &mut tls, shared, metrics) => r,
        serial = shared.creds.revoked(&chain) => {
            let local = shared.creds.local_id();
            crate::proxy::closed_revoked(metrics, shared, "outbound", local.as_deref(), callee.as_ref(), &serial, start);
            return;
        }
    };
    // rx/tx are from the accepted peer's point of view: the application.
    metrics.rx.inc_by(tx);
    metrics.tx.inc_by(rx);
    if shared.access.enabled() {
        shared.access.log(AccessRecord {
            caller: shared.creds.local_id().map(|id| id.to_string()),
            callee: callee.map(|id| id.to_string()),
            port: to.port,
            bytes_in: tx,
            bytes_out: rx,
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            tls_group: Some(group.to_owned()),
            ..crate::access::connection("outbound", name)
        });
    }
}
