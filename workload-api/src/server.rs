//! `meshid-agent run`: the manager, the Workload API socket and the ops listener.

use std::future::Future;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::cache::Snapshot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::delivery::Delivery;
use crate::manager::{Manager, Stats};
use crate::service::{Rpc, WorkloadApiMetrics};

/// Labels of Workload API call metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    rpc: &'static str,
    code: String,
}

/// Labels by RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
}

/// Labels of the SVID gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The agent's metrics: the manager's counters, Workload API calls, and gauges computed from
/// the current snapshot at scrape time.
struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<RpcLabels, Histogram>,
    updates: Family<RpcLabels, Counter>,
    no_identity: Counter,
    entries: Gauge,
    svids: Family<StateLabels, Gauge>,
    bundle_sequence: Gauge,
    bundle_delivered: Gauge,
    x509_streams: Gauge,
    connections: Gauge,
    connections_refused: Counter,
    connections_idle_closed: Counter,
}

impl Metrics {
    fn new(stats: &Stats) -> Self {
        let mut registry = Registry::with_prefix("meshid_agent");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "workload_api_calls",
            "Workload API calls by RPC and result code",
            calls.clone(),
        );
        let call_seconds = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1, 1.0, 10.0,
            ])
        });
        registry.register(
            "workload_api_call_duration_seconds",
            "Time to answer a Workload API call (to the first message, for streams)",
            call_seconds.clone(),
        );
        let updates = Family::<RpcLabels, Counter>::default();
        registry.register(
            "workload_api_stream_updates",
            "Updates pushed on open streams",
            updates.clone(),
        );
        let no_identity = Counter::default();
        registry.register(
            "attestation_denials",
            "Callers refused: attestation failed or no entry matched (no identity issued)",
            no_identity.clone(),
        );
        let entries = Gauge::default();
        registry.register(
            "entries",
            "Registration entries this agent holds",
            entries.clone(),
        );
        let svids = Family::<StateLabels, Gauge>::default();
        registry.register("svids", "SVIDs held, by state", svids.clone());
        let bundle_delivered = Gauge::default();
        registry.register(
            "bundle_sequence_delivered",
            "The trust bundle sequence every open X.509 Workload API stream has been handed (the bundle sequence held when none is open)",
            bundle_delivered.clone(),
        );
        let x509_streams = Gauge::default();
        registry.register(
            "workload_api_x509_streams",
            "Open X.509 Workload API streams (FetchX509SVID, FetchX509Bundles)",
            x509_streams.clone(),
        );
        let bundle_sequence = Gauge::default();
        registry.register(
            "bundle_sequence",
            "Sequence of the trust bundle held",
            bundle_sequence.clone(),
        );
        registry.register(
            "svids_signed",
            "SVIDs signed by the CA for this agent",
            stats.signed.clone(),
        );
        registry.register(
            "rotations",
            "SVIDs replaced by rotation",
            stats.rotations.clone(),
        );
        registry.register(
            "sign_errors",
            "Signing requests the CA refused",
            stats.sign_errors.clone(),
        );
        registry.register(
            "ca_connected",
            "1 while the sync stream to the CA is open",
            stats.connected.clone(),
        );
        registry.register(
            "ca_reconnects",
            "Reconnections to the CA",
            stats.reconnects.clone(),
        );
        registry.register(
            "policy_revision",
            "The central policy revision the agent holds (0: none)",
            stats.policy_revision.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "workload_api_connections",
            "Workload API connections open",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "workload_api_connections_refused",
            "Workload API connections closed at accept by the caps (in all, per uid)",
            connections_refused.clone(),
        );
        let connections_idle_closed = Counter::default();
        registry.register(
            "workload_api_connections_idle_closed",
            "Workload API connections closed for sending no request in time",
            connections_idle_closed.clone(),
        );
        Self {
            registry,
            calls,
            call_seconds,
            updates,
            no_identity,
            entries,
            svids,
            bundle_sequence,
            bundle_delivered,
            x509_streams,
            connections,
            connections_refused,
            connections_idle_closed,
        }
    }

    /// Mirrors the Workload API admission's state (its totals only grow).
    fn observe_delivery(&self, delivery: &Delivery, held: u64) {
        let delivered = delivery.delivered().map_or(held, |d| d.bundle);
        self.bundle_delivered
            .set(i64::try_from(delivered).unwrap_or(i64::MAX));
        self.x509_streams
            .set(i64::try_from(delivery.open_streams()).unwrap_or(i64::MAX));
    }

    fn observe_admission(&self, admission: &meshid_api::uds::Admission) {
        self.connections
            .set(i64::try_from(admission.open()).unwrap_or(i64::MAX));
        let refused = admission.refused();
        self.connections_refused
            .inc_by(refused.saturating_sub(self.connections_refused.get()));
        let idle = admission.closed_idle();
        self.connections_idle_closed
            .inc_by(idle.saturating_sub(self.connections_idle_closed.get()));
    }

    fn observe_snapshot(&self, snap: &Snapshot) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let (mut current, mut expired, mut pending) = (0i64, 0i64, 0i64);
        for i in &snap.identities {
            match &i.svid {
                None => pending += 1,
                Some(v) if v.not_after <= now => expired += 1,
                Some(_) => current += 1,
            }
        }
        self.entries.set(snap.identities.len() as i64);
        self.svids
            .get_or_create(&StateLabels { state: "current" })
            .set(current);
        self.svids
            .get_or_create(&StateLabels { state: "expired" })
            .set(expired);
        self.svids
            .get_or_create(&StateLabels { state: "pending" })
            .set(pending);
        self.bundle_sequence
            .set(i64::try_from(snap.bundle.sequence).unwrap_or(i64::MAX));
    }
}

impl WorkloadApiMetrics for Metrics {
    fn call(&self, rpc: Rpc, code: tonic::Code, elapsed: std::time::Duration) {
        self.calls
            .get_or_create(&CallLabels {
                rpc: rpc.name(),
                code: format!("{code:?}"),
            })
            .inc();
        self.call_seconds
            .get_or_create(&RpcLabels { rpc: rpc.name() })
            .observe(elapsed.as_secs_f64());
        if code == tonic::Code::PermissionDenied {
            self.no_identity.inc();
        }
    }

    fn update(&self, rpc: Rpc) {
        self.updates
            .get_or_create(&RpcLabels { rpc: rpc.name() })
            .inc();
    }
}

/// The agent's ops endpoint ([`meshid_api::ops`]): ready once synchronized with the CA.
#[derive(Clone)]
struct AgentOps {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    admission: Arc<meshid_api::uds::Admission>,
    delivery: Arc<Delivery>,
}

impl meshid_api::ops::Ops for AgentOps {
    async fn ready(&self) -> Result<(), String> {
        if self.snapshots.borrow().synced {
            Ok(())
        } else {
            Err("not yet synchronized with the CA".to_owned())
        }
    }

    fn metrics(&self) -> Result<String, std::fmt::Error> {
        let snap = self.snapshots.borrow().clone();
        self.metrics.observe_snapshot(&snap);
        self.metrics.observe_admission(&self.admission);
        self.metrics
            .observe_delivery(&self.delivery, snap.bundle.sequence);
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.metrics.registry)?;
        Ok(body)
    }
}

/// Serves until `shutdown` completes: the manager's CA session, the Workload API on `socket`,
/// and `/healthz`, `/readyz`, `/metrics` on `ops`.
pub async fn run(
    manager: Manager,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    socket: UnixListener,
    api_limits: meshid_api::uds::Limits,
    ops: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new(&manager.stats));
    let minter = Arc::new(manager.minter());
    let delivery = manager.delivery();
    let denials = manager.denials();
    let mut manager_task = tokio::spawn(manager.run(stop_rx.clone()));

    let api = crate::service::WorkloadApi::new(
        snapshots.clone(),
        Arc::new(crate::attest::Attestor::new()),
        minter,
    )
    .with_metrics(Arc::clone(&metrics) as Arc<dyn WorkloadApiMetrics>)
    .with_delivery(Arc::clone(&delivery))
    .with_denials(denials);
    let admission = meshid_api::uds::Admission::new(api_limits);
    let api = api.with_admission(Arc::clone(&admission));
    let mut api_stop = stop_rx.clone();
    let api_task = tokio::spawn(api.serve(socket, async move {
        let _ = api_stop.changed().await;
    }));

    let mut ops_stop = stop_rx;
    let router = meshid_api::ops::router(AgentOps {
        snapshots,
        metrics,
        admission,
        delivery,
    });
    let ops_task = tokio::spawn(async move {
        axum::serve(ops, router)
            .with_graceful_shutdown(async move {
                let _ = ops_stop.changed().await;
            })
            .await
    });

    tracing::info!("meshid-agent serving");
    // The manager ends by itself only when an agent without an identity gives up attesting.
    let gave_up = tokio::select! {
        () = shutdown => None,
        r = &mut manager_task => Some(r),
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let manager_result = match gave_up {
        Some(r) => r,
        None => manager_task.await,
    };
    let api_result = api_task.await;
    let ops_result = ops_task.await;
    api_result??;
    ops_result??;
    manager_result??;
    Ok(())
}
