//! Prometheus metrics of the CA.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of signing metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignLabels {
    /// `x509` or `jwt`.
    pub kind: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of the signing latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `x509` or `jwt`.
    pub kind: &'static str,
}

/// Labels by agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    /// The agent's SPIFFE ID.
    pub agent: String,
}

/// Labels of completed node API handshakes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// The negotiated key exchange group ([`meshid_api::tls::kx_group_name`]).
    pub group: &'static str,
}

/// Labels of node API connection metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why: `source_pending`, `source_connections`, `connections`, `shed`, `hello_timeout`,
    /// `certless_lifetime`.
    pub reason: &'static str,
}

/// Labels of federation metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FederationLabels {
    /// The federated trust domain.
    pub trust_domain: String,
    /// `ok` or `error` (refreshes only).
    pub result: &'static str,
}

/// Labels by trust domain.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabels {
    /// The federated trust domain.
    pub trust_domain: String,
}

/// Labels of audit sink metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// `file` or `syslog`.
    pub sink: &'static str,
}

/// The CA's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// SVIDs signed, by kind and result.
    pub signed: Family<SignLabels, Counter>,
    /// Signing latency in seconds, by kind.
    pub sign_seconds: Family<KindLabels, Histogram>,
    /// Expiry of the active intermediate, unix seconds.
    pub intermediate_expiry: Gauge,
    /// Expiry of the active root, unix seconds.
    pub root_expiry: Gauge,
    /// Per agent that reported to this server: how many bundle sequences its workloads'
    /// streams are behind the current bundle.
    pub agent_bundle_lag: Family<AgentLabels, Gauge>,
    /// Intermediate and JWT key activations.
    pub rotations: Counter,
    /// Rotation checks that failed.
    pub rotation_errors: Counter,
    /// Node API connections whose TLS handshake failed or timed out.
    pub node_handshake_failures: Counter,
    /// Node API TLS handshakes completed, by negotiated key exchange group.
    pub node_handshakes: Family<GroupLabels, Counter>,
    /// Node API calls refused for lack of a valid agent identity.
    pub node_denied: Counter,
    /// Node API connections refused, shed or closed by the connection limits, by reason.
    pub node_connections_limited: Family<ReasonLabels, Counter>,
    /// Node API calls with a superseded agent SVID (refused: a compromise signal).
    pub node_superseded_svids: Counter,
    /// Node API connections open (TLS established).
    pub node_connections: Gauge,
    /// Node API TLS handshakes in progress.
    pub node_handshakes_pending: Gauge,
    /// Bundle fetches from federated trust domains' endpoints, by trust domain and result.
    pub federation_refreshes: Family<FederationLabels, Counter>,
    /// When each federated trust domain's bundle in force was last fetched (or bootstrapped),
    /// unix seconds.
    pub federation_bundle_updated: Family<TrustDomainLabels, Gauge>,
    /// Requests served by this server's bundle endpoint.
    pub bundle_endpoint_requests: Counter,
    /// CI token exchanges, by result (`ok` or the refusal's reason).
    pub ci_exchanges: Family<ReasonLabels, Counter>,
    /// Audit records committed to the datastore and not yet shipped, by sink.
    pub audit_sink_lag: Family<SinkLabels, Gauge>,
    /// Failed attempts to ship to a sink, by sink.
    pub audit_sink_failures: Family<SinkLabels, Counter>,
    /// Signed checkpoints shipped, by sink.
    pub audit_checkpoints: Family<SinkLabels, Counter>,
    /// Times a shipper found the datastore's chain no longer extending what it had shipped.
    pub audit_chain_faults: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshid_ca");
        let signed = Family::<SignLabels, Counter>::default();
        registry.register(
            "svids_signed",
            "SVIDs signed, by kind and result",
            signed.clone(),
        );
        let sign_seconds = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
            ])
        });
        registry.register(
            "sign_duration_seconds",
            "Time to sign one SVID",
            sign_seconds.clone(),
        );
        let intermediate_expiry = Gauge::default();
        registry.register(
            "intermediate_expiry_timestamp_seconds",
            "When the active issuing intermediate expires",
            intermediate_expiry.clone(),
        );
        let root_expiry = Gauge::default();
        registry.register(
            "root_expiry_timestamp_seconds",
            "When the active trust anchor expires",
            root_expiry.clone(),
        );
        let agent_bundle_lag = Family::<AgentLabels, Gauge>::default();
        registry.register(
            "agent_bundle_lag",
            "Bundle sequences by which an agent's workload streams are behind the current trust bundle, as the agent last reported to this server",
            agent_bundle_lag.clone(),
        );
        let rotations = Counter::default();
        registry.register(
            "key_activations",
            "Intermediate and JWT key activations",
            rotations.clone(),
        );
        let rotation_errors = Counter::default();
        registry.register(
            "rotation_errors",
            "Rotation checks that failed",
            rotation_errors.clone(),
        );
        let node_handshake_failures = Counter::default();
        registry.register(
            "node_tls_handshake_failures",
            "Node API connections whose TLS handshake failed or timed out",
            node_handshake_failures.clone(),
        );
        let node_handshakes = Family::<GroupLabels, Counter>::default();
        registry.register(
            "node_tls_handshakes",
            "Node API TLS handshakes completed, by negotiated key exchange group",
            node_handshakes.clone(),
        );
        let node_denied = Counter::default();
        registry.register(
            "node_requests_denied",
            "Node API calls refused for lack of a valid agent identity",
            node_denied.clone(),
        );
        let node_connections_limited = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "node_connections_limited",
            "Node API connections refused, shed or closed by the connection limits, by reason",
            node_connections_limited.clone(),
        );
        let node_superseded_svids = Counter::default();
        registry.register(
            "node_superseded_agent_svids",
            "Node API calls with an agent SVID superseded by a renewal (refused; its key may be stolen)",
            node_superseded_svids.clone(),
        );
        let node_connections = Gauge::default();
        registry.register(
            "node_connections",
            "Node API connections open (TLS established)",
            node_connections.clone(),
        );
        let node_handshakes_pending = Gauge::default();
        registry.register(
            "node_handshakes_pending",
            "Node API TLS handshakes in progress",
            node_handshakes_pending.clone(),
        );
        let federation_refreshes = Family::<FederationLabels, Counter>::default();
        registry.register(
            "federation_bundle_refreshes",
            "Bundle fetches from federated trust domains' endpoints, by trust domain and result",
            federation_refreshes.clone(),
        );
        let federation_bundle_updated = Family::<TrustDomainLabels, Gauge>::default();
        registry.register(
            "federation_bundle_updated_timestamp_seconds",
            "When each federated trust domain's bundle in force was stored (fetched or bootstrapped)",
            federation_bundle_updated.clone(),
        );
        let bundle_endpoint_requests = Counter::default();
        registry.register(
            "bundle_endpoint_requests",
            "Requests served by this server's bundle endpoint",
            bundle_endpoint_requests.clone(),
        );
        let ci_exchanges = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ci_exchanges",
            "CI token exchanges, by result (ok, or why the token was refused)",
            ci_exchanges.clone(),
        );
        let audit_sink_lag = Family::<SinkLabels, Gauge>::default();
        registry.register(
            "audit_sink_lag_records",
            "Audit records committed to the datastore and not yet shipped to the sink",
            audit_sink_lag.clone(),
        );
        let audit_sink_failures = Family::<SinkLabels, Counter>::default();
        registry.register(
            "audit_sink_failures",
            "Failed attempts to ship audit records or checkpoints to the sink (retried)",
            audit_sink_failures.clone(),
        );
        let audit_checkpoints = Family::<SinkLabels, Counter>::default();
        registry.register(
            "audit_checkpoints",
            "Signed audit checkpoints shipped to the sink",
            audit_checkpoints.clone(),
        );
        let audit_chain_faults = Counter::default();
        registry.register(
            "audit_chain_faults",
            "Times the datastore's audit chain no longer extended what was shipped (records rewritten, removed or re-hashed); shipping to the sink stops",
            audit_chain_faults.clone(),
        );
        Self {
            audit_sink_lag,
            audit_sink_failures,
            audit_checkpoints,
            audit_chain_faults,
            registry,
            signed,
            sign_seconds,
            intermediate_expiry,
            root_expiry,
            agent_bundle_lag,
            rotations,
            rotation_errors,
            node_handshake_failures,
            node_handshakes,
            node_denied,
            node_connections_limited,
            node_superseded_svids,
            node_connections,
            node_handshakes_pending,
            federation_refreshes,
            federation_bundle_updated,
            bundle_endpoint_requests,
            ci_exchanges,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
