//! Inbound: terminate mTLS, authorize the caller, forward plaintext to the local application.
//!
//! Per connection: TLS handshake under a deadline (the verifier refuses anything that is not a
//! valid X509-SVID of an accepted trust domain), then, by the listener's protocol, either one
//! policy decision for the connection and a byte splice (`tcp`, or `detect` when the first
//! bytes are not HTTP), or HTTP proxying with one decision per request ([`crate::http`]).

use std::sync::Arc;
use std::time::Instant;

use meshid_policy::{ConnectionVerdict, Outcome, Request, SpiffeId};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::InboundProtocol;
use crate::io::{detect, Detected, Prefixed, ReadAhead};
use crate::proxy::{accept_loop, account, record, splice, InboundState as Listener};
use meshid_api::tls::verify;

/// Accepts connections until the drain starts.
pub async fn run(listener: TcpListener, this: Arc<Listener>) {
    let acceptor = TlsAcceptor::from(this.shared.creds.server_config());
    accept_loop(
        listener,
        &this.shared,
        &this.metrics,
        Some(&this.handshakes),
        |tcp, peer| {
            let (this, acceptor) = (this.clone(), acceptor.clone());
            async move { connection(&this, &acceptor, tcp, peer).await }
        },
    )
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
        refused(this, "no_svid");
        tracing::info!(listener = %this.config.name, peer = %peer_addr, reason = "no_svid", "inbound handshake refused");
        return;
    }
    let (mut slot, shed) = this.handshakes.begin();
    if shed > 0 {
        shed_handshakes(this, shed);
    }
    // The wait for this source's turn counts toward the handshake's deadline, and the
    // connection can be shed while it waits (it holds its slot).
    let handshakes = &this.handshakes;
    let handshake = tokio::time::timeout(
        this.shared.handshake_timeout,
        Box::pin(async move {
            let turn = handshakes
                .turn(peer_addr.ip().into(), || source_waits(this, peer_addr))
                .await;
            let accepted = acceptor.accept(ReadAhead::new(tcp)).await;
            drop(turn);
            accepted
        }),
    );
    let accepted = tokio::select! {
        r = handshake => r,
        () = slot.shed() => {
            // Counted, and logged at most once a second, by the newcomer that shed it.
            return;
        }
    };
    drop(slot);
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = verify::io_failure_reason(&e);
            refused(this, reason);
            tracing::info!(listener = %this.config.name, peer = %peer_addr, reason, error = %e, "inbound handshake refused");
            return;
        }
        Err(_) => {
            refused(this, "timeout");
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
        refused(this, "other");
        return;
    };
    let group = meshid_api::tls::kx_group_name(tls.get_ref().1);
    this.metrics.handshake(group);
    let chain = crate::proxy::peer_chain(tls.get_ref().1.peer_certificates());
    // Boxed, as the handshake above: the task keeps only the state it is in, so an idle
    // connection does not carry the size of every state it could be in.
    let serve = Box::pin(serve(
        this,
        tls,
        caller.clone(),
        local.clone(),
        group,
        start,
    ));
    tokio::select! {
        () = serve => {}
        serial = this.shared.creds.revoked(&chain) => {
            crate::proxy::closed_revoked(&this.metrics, &this.shared, "inbound", Some(&caller), Some(&local), &serial, start);
        }
    }
}

/// Counts handshakes shed for a newer one (`limited{reason="handshake_shed"}`) and says so at
/// most once a second per listener, with how many were shed since.
/// Counts an inbound handshake refused for `reason`: in the metrics, and for the CA's console.
fn refused(this: &Listener, reason: &'static str) {
    this.metrics.handshake_failure(reason);
    let local = this.shared.creds.local_id();
    this.shared.denials.handshake(local.as_deref(), reason);
}

/// Counts a connection that waits for its source's turn (`limited{reason=
/// "handshakes_per_source"}`) and says so at most once a second per listener.
fn source_waits(this: &Listener, peer: std::net::SocketAddr) {
    this.metrics.limited("handshakes_per_source");
    this.handshakes.source_log.info(|held_back| {
        tracing::warn!(
            listener = %this.config.name,
            source = %peer.ip(),
            max_handshakes_per_source = this.shared.max_handshakes_per_source,
            lines_held_back = held_back,
            "handshakes in progress from one source at max_handshakes_per_source: its new connections wait their turn"
        );
    });
}

fn shed_handshakes(this: &Listener, shed: usize) {
    for _ in 0..shed {
        this.metrics.limited("handshake_shed");
    }
    this.handshakes.shed_log.info(|held_back| {
        tracing::warn!(
            listener = %this.config.name,
            max_handshakes = this.shared.max_handshakes,
            lines_held_back = held_back,
            "handshakes in progress at max_handshakes: shedding the oldest"
        );
    });
}

/// Serves one authenticated connection: detects the protocol and proxies it.
async fn serve(
    this: &Arc<Listener>,
    mut tls: TlsStream<ReadAhead<TcpStream>>,
    caller: SpiffeId,
    local: Arc<SpiffeId>,
    group: &'static str,
    start: Instant,
) {
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
    let h2 = match kind {
        Detected::Http1 => Some(false),
        Detected::Http2 => Some(true),
        Detected::Opaque => None,
    };
    if let Some(h2) = h2 {
        let denied = denied_outright(this, &caller, &local);
        if h2 {
            crate::http::serve(this.clone(), io, caller, local, group, true, denied, 0).await;
        } else {
            crate::h1::serve(this.clone(), io, caller, local, group, denied).await;
        }
        return;
    }
    match (kind, this.config.protocol) {
        (Detected::Opaque, InboundProtocol::Http) => {
            tracing::info!(listener = %this.config.name, caller = %caller, "not HTTP on an http listener; closing");
        }
        (Detected::Opaque, _) => opaque(this, io, &caller, &local, group, start).await,
        (Detected::Http1 | Detected::Http2, _) => {}
    }
}

/// Whether the policy denies every request `caller` could send on this listener (no rule with
/// `http` conditions could change that). Such a connection gets one request, answered 403 so
/// that HTTP and gRPC callers see why, and is closed: it cannot hold the listener's resources
/// by keeping the connection alive. An opaque one is closed at once ([`opaque`]).
fn denied_outright(this: &Listener, caller: &SpiffeId, local: &SpiffeId) -> bool {
    let active = this.shared.policy.load();
    matches!(
        active.policy.connection(caller, local, this.config.port),
        ConnectionVerdict::Decided(d) if d.outcome == Outcome::Deny
    )
}

async fn opaque(
    this: &Arc<Listener>,
    mut io: Prefixed<TlsStream<ReadAhead<TcpStream>>>,
    caller: &SpiffeId,
    local: &SpiffeId,
    group: &'static str,
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
            group,
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
    let (rx, tx) = splice(&mut io, &mut app, &this.shared, &this.metrics).await;
    this.metrics.rx.inc_by(rx);
    this.metrics.tx.inc_by(tx);
    if let Some(mut r) = rec {
        r.bytes_in = rx;
        r.bytes_out = tx;
        r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        this.shared.access.log(r);
    }
}
