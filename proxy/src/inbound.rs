//! Inbound: terminate mTLS, authorize the caller, forward plaintext to the local application.
//!
//! Per connection: TLS handshake under a deadline (the verifier refuses anything that is not a
//! valid X509-SVID of an accepted trust domain), then, by the listener's protocol, either one
//! policy decision for the connection and a byte splice (`tcp`, or `detect` when the first
//! bytes are not HTTP), or HTTP proxying with one decision per request ([`crate::http`]).

use std::sync::Arc;
use std::time::Instant;

use meshid_policy::{AccessRecord, Decision, Request, SpiffeId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{Inbound, InboundProtocol};
use crate::io::{detect, Detected, Prefixed};
use crate::metrics::ListenerMetrics;
use crate::server::{ActivePolicy, Shared};
use meshid_api::tls::verify;

/// What every connection of one inbound listener shares.
#[derive(Debug)]
pub struct Listener {
    /// The listener's configuration.
    pub config: Inbound,
    /// Its counters.
    pub metrics: ListenerMetrics,
    /// Process-wide state.
    pub shared: Arc<Shared>,
}

/// Accepts connections until the drain starts.
pub async fn run(listener: TcpListener, this: Arc<Listener>) {
    let acceptor = TlsAcceptor::from(this.shared.creds.server_config());
    crate::server::accept_loop(listener, &this.shared, &this.metrics, |tcp, peer| {
        let (this, acceptor) = (this.clone(), acceptor.clone());
        async move { connection(&this, &acceptor, tcp, peer).await }
    })
    .await;
}

pub(crate) async fn connection(
    this: &Arc<Listener>,
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer_addr: std::net::SocketAddr,
) {
    let _ = tcp.set_nodelay(true);
    let start = Instant::now();
    if !this.shared.creds.ready() {
        // Fail closed before the first SVID: no handshake can succeed without one.
        this.metrics.handshake_failure("no_svid");
        tracing::info!(listener = %this.config.name, peer = %peer_addr, reason = "no_svid", "inbound handshake refused");
        return;
    }
    let tls = match tokio::time::timeout(this.shared.handshake_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = verify::io_failure_reason(&e);
            this.metrics.handshake_failure(reason);
            tracing::info!(listener = %this.config.name, peer = %peer_addr, reason, error = %e, "inbound handshake refused");
            return;
        }
        Err(_) => {
            this.metrics.handshake_failure("timeout");
            tracing::info!(listener = %this.config.name, peer = %peer_addr, reason = "timeout", "inbound handshake refused");
            return;
        }
    };
    let (Some(caller), Some(local)) = (
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(verify::peer_spiffe_id),
        this.shared.creds.local_id(),
    ) else {
        // The verifier accepted the chain, so this cannot happen; fail closed anyway.
        this.metrics.handshake_failure("other");
        return;
    };
    let mut tls = tls;
    let detected = match this.config.protocol {
        InboundProtocol::Tcp => (Detected::Opaque, Vec::new()),
        InboundProtocol::Http | InboundProtocol::Detect => {
            match detect(&mut tls, this.shared.detect_timeout).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(listener = %this.config.name, error = %e, "connection ended before its first bytes");
                    return;
                }
            }
        }
    };
    let (kind, prefix) = detected;
    let io = Prefixed::new(prefix, tls);
    match (kind, this.config.protocol) {
        (Detected::Http1, _) => crate::http::serve(this.clone(), io, caller, local, false).await,
        (Detected::Http2, _) => crate::http::serve(this.clone(), io, caller, local, true).await,
        (Detected::Opaque, InboundProtocol::Http) => {
            tracing::info!(listener = %this.config.name, caller = %caller, "not HTTP on an http listener; closing");
        }
        (Detected::Opaque, _) => opaque(this, io, &caller, &local, start).await,
    }
}

/// Records a decision: metrics, and a log line for refusals and would-be refusals.
pub fn account(this: &Listener, active: &ActivePolicy, caller: &SpiffeId, d: &Decision) {
    active.counters.count(d);
    let policy = active.policy.name();
    match d.outcome {
        meshid_policy::Outcome::Allow => {}
        meshid_policy::Outcome::Deny => tracing::info!(
            listener = %this.config.name, caller = %caller, port = this.config.port,
            policy, rule = d.rule_name(), "refused by policy"
        ),
        meshid_policy::Outcome::AuditDeny => tracing::info!(
            listener = %this.config.name, caller = %caller, port = this.config.port,
            policy, rule = d.rule_name(), "audit: would be refused by policy; allowed"
        ),
    }
}

/// The access record skeleton of an inbound connection or request.
pub fn record(
    this: &Listener,
    kind: &str,
    caller: &SpiffeId,
    local: &SpiffeId,
    policy: &str,
    d: &Decision,
) -> AccessRecord {
    AccessRecord {
        kind: kind.to_owned(),
        caller: Some(caller.to_string()),
        callee: Some(local.to_string()),
        port: Some(this.config.port),
        policy: Some(policy.to_owned()),
        rule: Some(d.rule_name().to_owned()),
        decision: d.outcome.as_str().to_owned(),
        ..crate::access::connection("inbound", &this.config.name)
    }
}

async fn opaque(
    this: &Arc<Listener>,
    mut io: Prefixed<TlsStream<TcpStream>>,
    caller: &SpiffeId,
    local: &SpiffeId,
    start: Instant,
) {
    let active = this.shared.policy.load_full();
    let decision = active.policy.decide(&Request {
        from: caller,
        to: local,
        port: Some(this.config.port),
        http: None,
    });
    account(this, &active, caller, &decision);
    let mut rec = this.shared.access.enabled().then(|| {
        record(
            this,
            "connection",
            caller,
            local,
            active.policy.name(),
            &decision,
        )
    });
    drop(active);
    if !decision.outcome.allowed() {
        let _ = io.shutdown().await;
        if let Some(mut r) = rec {
            r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            this.shared.access.log(r);
        }
        return;
    }
    let mut app = match this.shared.connect(&this.config.forward_to).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(listener = %this.config.name, app = %this.config.forward_to, error = %e, "cannot reach the local application");
            if let Some(mut r) = rec.take() {
                r.reason = Some("upstream_unreachable".to_owned());
                this.shared.access.log(r);
            }
            return;
        }
    };
    let (rx, tx) = crate::server::splice(&mut io, &mut app).await;
    this.metrics.rx.inc_by(rx);
    this.metrics.tx.inc_by(tx);
    if let Some(mut r) = rec {
        r.bytes_in = rx;
        r.bytes_out = tx;
        r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        this.shared.access.log(r);
    }
}
