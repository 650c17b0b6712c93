//! Refusals reported by an agent for its proxies (`Node.ReportDenials`): counts per (caller,
//! callee, rule), recorded in the audit log as one `denials.reported` record per report, where
//! every CA server of the trust domain, and the console, read them.

use meshid_api::denials::Key;
use spiffe::SpiffeId;

use super::{Ca, ServiceError};

impl Ca {
    /// Records `counts` reported by `agent` (checked already with
    /// [`meshid_api::denials::check`]). A count whose callee is not the SPIFFE ID of one of the
    /// agent's entries is dropped (an agent speaks only for its own workloads); returns how many
    /// were kept.
    pub async fn record_denials(
        &self,
        agent: &SpiffeId,
        counts: Vec<(Key, u64, i64)>,
    ) -> Result<usize, ServiceError> {
        let own: std::collections::HashSet<String> = self
            .store
            .list_entries_by_parent(agent)
            .await?
            .into_iter()
            .map(|e| e.spiffe_id.to_string())
            .collect();
        let (kept, foreign): (Vec<_>, Vec<_>) = counts
            .into_iter()
            .partition(|(k, ..)| own.contains(&k.callee));
        if !foreign.is_empty() {
            tracing::warn!(agent = %agent, dropped = foreign.len(), callee = %foreign[0].0.callee, "denial counts for workloads not the agent's were dropped");
        }
        if kept.is_empty() {
            return Ok(0);
        }
        let total = kept.iter().fold(0u64, |t, (_, n, _)| t.saturating_add(*n));
        // A reporter's clock, or a reporter, may be off: a count is recorded as no later than
        // now and no earlier than an hour ago, so that none sorts first forever or ages out at
        // once.
        let now = crate::unix_now();
        let denials: Vec<serde_json::Value> = kept
            .iter()
            .map(|(k, n, at)| {
                serde_json::json!({"caller": k.caller, "callee": k.callee, "rule": k.rule,
                    "count": n, "last_at": (*at).clamp(now - 3600, now)})
            })
            .collect();
        let event = crate::audit::AuditEvent::new(
            "denials.reported",
            agent.to_string(),
            serde_json::json!({ "denials": denials, "total": total }),
        );
        self.store.append_audit(&event).await?;
        tracing::debug!(agent = %agent, counts = kept.len(), total, "denials reported");
        Ok(kept.len())
    }
}
