//! The root rotation's steps as the admin API and the rotation loop take them: the
//! [`Authority`](crate::authority::Authority) changes the keys; here the change is announced to
//! this server's agents at once (other servers follow through the change feed).

use std::path::PathBuf;

use super::{check_reason, Awaited, Ca, CaEvent, ServiceError};
use crate::authority::root::{Activation, RootStatus};
use crate::store::CaKeyRecord;

impl Ca {
    /// Where the root rotation stands.
    pub async fn root_status(&self) -> Result<RootStatus, ServiceError> {
        Ok(self.authority.root_status().await?)
    }

    /// `meshid-ca ca root prepare`: the next root joins the bundle, pushed to every agent now.
    pub async fn root_prepare(
        &self,
        upstream: Option<(PathBuf, PathBuf)>,
        actor: &str,
        reason: &str,
    ) -> Result<CaKeyRecord, ServiceError> {
        check_reason(reason)?;
        let rec = self.authority.prepare_root(upstream, actor, reason).await?;
        self.publish(CaEvent::BundleChanged);
        self.watch_bundle(
            "ca.root.prepared",
            actor,
            serde_json::json!({"key_id": rec.id}),
        );
        Ok(rec)
    }

    /// `meshid-ca ca root activate`: refused while a live agent has not delivered the prepared
    /// root (unless `force`); then new SVIDs chain to it, and every agent renews its own SVID.
    pub async fn root_activate(
        &self,
        actor: &str,
        reason: &str,
        force: bool,
    ) -> Result<Activation, ServiceError> {
        check_reason(reason)?;
        let agents = self.live_agent_serials().await;
        let activation = self.authority.activate_root(actor, reason, force).await?;
        self.publish(CaEvent::RenewAgents);
        self.publish(CaEvent::BundleChanged);
        self.watch_renewals(
            "ca.root.activated",
            actor,
            serde_json::json!({"key_id": activation.root_id}),
            agents,
        );
        Ok(activation)
    }

    /// `meshid-ca ca root retire`: refused while anything signed under the superseded root is
    /// unexpired; then it leaves the bundle, pushed to every agent now, and agents renew their
    /// own SVIDs without the cross-signed root.
    pub async fn root_retire(
        &self,
        actor: &str,
        reason: &str,
    ) -> Result<Vec<String>, ServiceError> {
        check_reason(reason)?;
        let retired = self.authority.retire_root(actor, reason).await?;
        // The cross-signed root leaves every chain: agents and the node API renew their own
        // SVIDs, which carried it (workload SVIDs drop it at their next rotation).
        self.publish(CaEvent::RenewAgents);
        self.publish(CaEvent::BundleChanged);
        self.watch_bundle(
            "ca.root.retired",
            actor,
            serde_json::json!({"key_ids": retired}),
        );
        Ok(retired)
    }

    /// `meshid-ca ca taint`: the key signs nothing more and agents re-issue what it signed.
    pub async fn taint_key(
        &self,
        key_id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<CaKeyRecord, ServiceError> {
        check_reason(reason)?;
        let rec = self.authority.taint_key(key_id, actor, reason).await?;
        self.publish(CaEvent::KeyTainted);
        if rec.kind == crate::store::CaKeyKind::X509Intermediate {
            self.publish(CaEvent::RenewAgents);
        }
        self.publish(CaEvent::BundleChanged);
        Ok(rec)
    }

    /// One step of the automatic root rotation; announces what it changed.
    pub async fn root_auto_step(&self) -> Result<(), ServiceError> {
        if self.authority.settings().root_rotation != crate::config::RootRotation::Auto {
            return Ok(());
        }
        // Read before the step: agents renew within moments of an activation.
        let agents = self.live_agent_serials().await;
        if let Some(done) = self.authority.auto_root().await? {
            tracing::info!(what = %done, "automatic root rotation");
            if done.starts_with("activated") || done.starts_with("retired") {
                self.publish(CaEvent::RenewAgents);
            }
            self.publish(CaEvent::BundleChanged);
            let actor = format!("ca:{}", self.authority.server_id());
            let details = serde_json::json!({"step": done, "automatic": true});
            if done.starts_with("prepared") {
                self.watch_bundle("ca.root.prepared", &actor, details);
            } else if done.starts_with("activated") {
                self.watch_renewals("ca.root.activated", &actor, details, agents);
            } else if done.starts_with("retired") {
                self.watch_bundle("ca.root.retired", &actor, details);
            }
        }
        Ok(())
    }

    /// Watches for every live agent to deliver the bundle as it is now.
    fn watch_bundle(&self, kind: &str, actor: &str, mut details: serde_json::Value) {
        let sequence = self.authority.bundle().sequence;
        details["bundle_sequence"] = sequence.into();
        self.watch_effect(kind, actor, details, vec![Awaited::Bundle(sequence)]);
    }

    /// Watches for these agents (the live ones before the step) to renew their own SVIDs.
    fn watch_renewals(
        &self,
        kind: &str,
        actor: &str,
        details: serde_json::Value,
        agents: Result<std::collections::HashMap<spiffe::SpiffeId, String>, ServiceError>,
    ) {
        match agents {
            Ok(agents) => self.watch_effect(kind, actor, details, vec![Awaited::Renewed(agents)]),
            Err(e) => {
                tracing::warn!(step = kind, error = %e, "cannot list the agents; the step's effect is not measured");
            }
        }
    }
}
