//! Revocation as the admin API takes it: the [`Authority`](crate::authority::Authority)
//! records it and signs the CRLs; here the new CRLs are announced to this server's agents at
//! once (other servers follow through the change feed).

use super::{check_reason, Awaited, Ca, CaEvent, ServiceError};
use crate::authority::revoke::{RevokeOutcome, RevokeTarget};

impl Ca {
    /// `meshid-ca svid revoke`: records the revocation, signs the CRLs, and pushes them to
    /// every agent. Revoking an intermediate taints it first (it signs nothing more and what it
    /// signed is re-issued).
    pub async fn revoke(
        &self,
        target: RevokeTarget,
        actor: &str,
        reason: &str,
    ) -> Result<RevokeOutcome, ServiceError> {
        check_reason(reason)?;
        let out = self.authority.revoke(&target, actor, reason).await?;
        if out.tainted {
            // As `ca taint`: agents re-issue what the key signed, and renew their own SVIDs.
            self.publish(CaEvent::KeyTainted);
            self.publish(CaEvent::RenewAgents);
            self.publish(CaEvent::BundleChanged);
        }
        if !out.revoked.is_empty() {
            self.publish(CaEvent::CrlsChanged);
            let serials: std::collections::BTreeMap<String, i64> = out
                .revoked
                .iter()
                .map(|r| (r.serial.clone(), r.not_after))
                .collect();
            self.watch_effect(
                "svid.revoked",
                actor,
                serde_json::json!({"serials": serials.keys().collect::<Vec<_>>(), "reason": reason}),
                vec![Awaited::Crls(serials)],
            );
        }
        Ok(out)
    }

    /// Signs the CRLs this server holds the keys of when they are out of date, and announces
    /// any change of the CRLs served (the rotation loop, and peers' revocations).
    pub async fn refresh_crls(&self, sign: bool) -> Result<(), ServiceError> {
        let changed = if sign {
            self.authority.sign_crls().await?
        } else {
            self.authority.refresh_crls().await?
        };
        if changed {
            self.publish(CaEvent::CrlsChanged);
        }
        Ok(())
    }
}
