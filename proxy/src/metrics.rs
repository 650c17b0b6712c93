//! The proxy's Prometheus metrics.
//!
//! Per-listener counters are created once when the listener starts and cloned into each
//! connection (a `Counter` is an `Arc`), so the per-connection path does no label lookup.
//! Families keyed by something only known per connection (handshake failure reasons, policy
//! decisions) do one read-locked lookup.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of per-listener series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The listener's name.
    pub listener: String,
}

/// Labels of byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The listener's name.
    pub listener: String,
    /// `rx` (from the accepted peer) or `tx` (to it).
    pub flow: &'static str,
}

/// Labels of handshake failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The listener's name.
    pub listener: String,
    /// Why (see [`meshid_api::tls::PeerError::reason`]).
    pub reason: &'static str,
}

/// Labels of completed handshakes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The listener's name.
    pub listener: String,
    /// The negotiated key exchange group ([`meshid_api::tls::kx_group_name`]).
    pub group: &'static str,
}

/// Labels of policy decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The policy's name.
    pub policy: String,
    /// The deciding rule (`<default>` when none matched).
    pub rule: String,
    /// `allow`, `deny` or `audit_deny`.
    pub decision: &'static str,
}

/// Labels of policy reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of transparent-mode connection outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransparentLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Outbound: `mtls` or `passthrough`; inbound: `mtls`, `plaintext_refused` or
    /// `plaintext_allowed`; both: `not_redirected` (reached the listener directly).
    pub result: &'static str,
}

/// Every metric of the proxy.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Accepted connections.
    pub connections: Family<ListenerLabels, Counter>,
    /// Connections open now.
    pub open: Family<ListenerLabels, Gauge>,
    /// Bytes relayed.
    pub bytes: Family<ByteLabels, Counter>,
    /// TLS handshakes that failed, by reason.
    pub handshake_failures: Family<FailureLabels, Counter>,
    /// TLS handshakes completed, by negotiated key exchange group.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Authorization decisions.
    pub decisions: Family<DecisionLabels, Counter>,
    /// HTTP requests seen by inbound L7 proxying.
    pub http_requests: Family<ListenerLabels, Counter>,
    /// Unix time at which the current SVID expires (0 before the first).
    pub svid_expiry: Gauge,
    /// SVID updates applied after the first.
    pub rotations: Counter,
    /// Certificates the CRLs in force list.
    pub revoked_listed: Gauge,
    /// Established connections closed because the peer's chain was revoked.
    pub revoked_closed: Family<ListenerLabels, Counter>,
    /// Policy (re)loads.
    pub policy_reloads: Family<ReloadLabels, Counter>,
    /// The central policy revision in force (`policy_source = "agent"`; 0: none).
    pub policy_revision: Gauge,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Transparent-mode connections by what was done with them.
    pub transparent: Family<TransparentLabels, Counter>,
    /// Connections refused or closed by a resource limit, by reason.
    pub limited: Family<FailureLabels, Counter>,
}

/// The counters one listener's connections update.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The listener's name.
    pub name: String,
    /// Accepted connections.
    pub connections: Counter,
    /// Open connections.
    pub open: Gauge,
    /// Bytes from the accepted peer.
    pub rx: Counter,
    /// Bytes to the accepted peer.
    pub tx: Counter,
    /// HTTP requests.
    pub http_requests: Counter,
    all: Arc<Metrics>,
}

impl ListenerMetrics {
    /// Counts an established connection closed because its peer was revoked.
    pub fn revoked_closed(&self) {
        self.all
            .revoked_closed
            .get_or_create(&ListenerLabels {
                direction: self.direction,
                listener: self.name.clone(),
            })
            .inc();
    }

    /// Counts a connection refused or closed by a resource limit.
    pub fn limited(&self, reason: &'static str) {
        self.all
            .limited
            .get_or_create(&FailureLabels {
                direction: self.direction,
                listener: self.name.clone(),
                reason,
            })
            .inc();
    }

    /// Counts a completed handshake by its key exchange group.
    pub fn handshake(&self, group: &'static str) {
        self.all
            .handshakes
            .get_or_create(&HandshakeLabels {
                direction: self.direction,
                listener: self.name.clone(),
                group,
            })
            .inc();
    }

    /// Counts a handshake failure.
    pub fn handshake_failure(&self, reason: &'static str) {
        self.all
            .handshake_failures
            .get_or_create(&FailureLabels {
                direction: self.direction,
                listener: self.name.clone(),
                reason,
            })
            .inc();
    }
}

impl Metrics {
    /// A registry exposing every metric.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("meshid_proxy");
        r.register(
            "connections",
            "Accepted connections",
            self.connections.clone(),
        );
        r.register(
            "open_connections",
            "Connections open now",
            self.open.clone(),
        );
        r.register("bytes", "Bytes relayed", self.bytes.clone());
        r.register(
            "handshake_failures",
            "TLS handshakes that failed, by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "handshakes",
            "TLS handshakes completed, by negotiated key exchange group",
            self.handshakes.clone(),
        );
        r.register(
            "decisions",
            "Authorization decisions by policy, rule and result",
            self.decisions.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests proxied by inbound listeners",
            self.http_requests.clone(),
        );
        r.register(
            "svid_expiry_timestamp_seconds",
            "Unix time at which the proxy's current X509-SVID expires",
            self.svid_expiry.clone(),
        );
        r.register(
            "svid_rotations",
            "SVID updates applied after the first",
            self.rotations.clone(),
        );
        r.register(
            "revoked_certificates",
            "Certificates listed by the certificate revocation lists in force",
            self.revoked_listed.clone(),
        );
        r.register(
            "revoked_connections_closed",
            "Established connections closed because a CRL listed a certificate of the peer's chain",
            self.revoked_closed.clone(),
        );
        r.register(
            "policy_revision",
            "The central policy revision in force (policy_source = agent; 0: none yet)",
            self.policy_revision.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy loads by result",
            self.policy_reloads.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            self.access_log_dropped.clone(),
        );
        r.register(
            "limited_connections",
            "Connections refused or closed by a resource limit: max_connections, idle_timeout, header_timeout, header_too_large",
            self.limited.clone(),
        );
        r.register(
            "transparent_connections",
            "Transparent-mode connections by direction and what was done with them",
            self.transparent.clone(),
        );
        r
    }

    /// The counter of one transparent-mode outcome.
    pub fn transparent(&self, direction: &'static str, result: &'static str) -> Counter {
        self.transparent
            .get_or_create(&TransparentLabels { direction, result })
            .clone()
    }

    /// The counters of one listener.
    pub fn listener(self: &Arc<Self>, direction: &'static str, name: &str) -> ListenerMetrics {
        let l = ListenerLabels {
            direction,
            listener: name.to_owned(),
        };
        let bytes = |flow| {
            self.bytes
                .get_or_create(&ByteLabels {
                    direction,
                    listener: name.to_owned(),
                    flow,
                })
                .clone()
        };
        ListenerMetrics {
            direction,
            name: name.to_owned(),
            connections: self.connections.get_or_create(&l).clone(),
            open: self.open.get_or_create(&l).clone(),
            rx: bytes("rx"),
            tx: bytes("tx"),
            http_requests: self.http_requests.get_or_create(&l).clone(),
            all: self.clone(),
        }
    }

    /// The decision counters of `policy`: one slot per rule (and the default) and outcome,
    /// each registered on first use, so counting a decision is an index, not a label lookup.
    pub fn decision_counters(self: &Arc<Self>, policy: &meshid_policy::Policy) -> DecisionCounters {
        DecisionCounters {
            policy: policy.name().to_owned(),
            slots: (0..=policy.rule_count())
                .map(|_| Default::default())
                .collect(),
            metrics: self.clone(),
        }
    }
}

/// Decision counters of one policy (see [`Metrics::decision_counters`]).
#[derive(Debug)]
pub struct DecisionCounters {
    policy: String,
    slots: Vec<[std::sync::OnceLock<Counter>; 3]>,
    metrics: Arc<Metrics>,
}

impl DecisionCounters {
    /// Counts a decision.
    pub fn count(&self, d: &meshid_policy::Decision) {
        let default = self.slots.len().saturating_sub(1);
        let i = d.rule.as_ref().map_or(default, |r| r.index.min(default));
        let o = match d.outcome {
            meshid_policy::Outcome::Allow => 0,
            meshid_policy::Outcome::Deny => 1,
            meshid_policy::Outcome::AuditDeny => 2,
        };
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        slot[o]
            .get_or_init(|| {
                self.metrics
                    .decisions
                    .get_or_create(&DecisionLabels {
                        policy: self.policy.clone(),
                        rule: d.rule_name().to_owned(),
                        decision: d.outcome.as_str(),
                    })
                    .clone()
            })
            .inc();
    }
}
