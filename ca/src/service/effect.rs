//! Measured time to effect. Every trust lifecycle step is an audit record when it is taken
//! (who, why, when); the CA server that took it then watches for the step to take effect across
//! the mesh and records that too, once, as `<step>.effective` with the milliseconds it took:
//!
//! | step | in effect once |
//! |---|---|
//! | `ca.root.prepared`, `ca.root.retired` | every live agent reported the new bundle handed to every X.509 stream of its workloads |
//! | `ca.root.activated` | every live agent renewed its own SVID (under the new root) |
//! | `svid.revoked` | every live agent reported a CRL set listing the certificates (or a later one) handed to every X.509 stream |
//! | `policy.apply`, `policy.delete`, `policy.rollback`, `mesh.apply` (when it changed the policy) | every live agent reported the revision (or a later one) handed to every policy stream (the proxies following it), or held when it has none |
//! | `entry.rotated` | an SVID was issued for the entry after the rotation |
//! | `agent.rotated` | the agent renewed its own SVID and one was issued for each of its entries |
//!
//! (`ca.key.tainted` has its own, `ca.key.taint_cleared`, kept by the rotation loop.)
//!
//! Progress is read from the datastore, so agents reporting to other CA servers count. A live
//! agent is one neither banned nor expired at the time of the check; one that left meanwhile is
//! not waited for. The time is from the step to the check that saw it done, so it overstates by
//! at most [`EFFECT_CHECK`] plus the agents' report interval (100 ms each). A step still not in
//! effect after [`EFFECT_WATCH_LIMIT`] is recorded as such (`"effective": false`, with what was
//! still missing), and a server restarted meanwhile stops watching (the step's record stands).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use spiffe::SpiffeId;

use super::{Awaited, Ca, ServiceError, Watch};
use crate::audit::AuditEvent;

/// How often the pending steps are checked.
pub const EFFECT_CHECK: Duration = Duration::from_millis(100);

/// How long a step is watched before it is recorded as not (yet) in effect.
pub const EFFECT_WATCH_LIMIT: Duration = Duration::from_secs(24 * 3600);

impl Ca {
    /// Watches for the effect of `kind` (just recorded by `actor`), to record
    /// `<kind>.effective` with `details` and the time it took once everything `awaited` holds.
    pub(crate) fn watch_effect(
        &self,
        kind: &str,
        actor: &str,
        details: serde_json::Value,
        awaited: Vec<Awaited>,
    ) {
        self.effects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Watch {
                kind: kind.to_owned(),
                actor: actor.to_owned(),
                details,
                started: Instant::now(),
                awaited,
            });
    }

    /// How many steps are being watched.
    pub fn effects_pending(&self) -> usize {
        self.effects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// What the live agents held at the last audit head: the input of [`Awaited::Renewed`]
    /// and [`Awaited::Issued`].
    pub(crate) async fn live_agent_serials(
        &self,
    ) -> Result<HashMap<SpiffeId, String>, ServiceError> {
        let agents = self.store.list_agents().await?;
        Ok(live(&agents, crate::unix_now())
            .map(|a| (a.spiffe_id.clone(), a.serial.clone()))
            .collect())
    }

    /// The audit log's head (0 when empty): where an [`Awaited::Issued`] starts reading.
    pub(crate) async fn audit_cursor(&self) -> Result<i64, ServiceError> {
        Ok(self.store.audit_head().await?.map_or(0, |(seq, _)| seq))
    }

    /// Checks every watched step once, recording those now in effect (and those given up on).
    pub async fn check_effects(&self) {
        let mut watches = std::mem::take(
            &mut *self
                .effects
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if watches.is_empty() {
            return;
        }
        // Read once per round, for every watch.
        let (agents, deliveries) = match tokio::try_join!(
            self.store.list_agents(),
            self.store.list_deliveries()
        ) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check whether steps took effect; will retry");
                self.effects
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(watches);
                return;
            }
        };
        let mut keep = Vec::new();
        for mut w in watches.drain(..) {
            match self.progress(&mut w, &agents, &deliveries).await {
                Ok(missing) if missing.is_empty() => self.record_effect(&w, None).await,
                Ok(missing) if w.started.elapsed() >= EFFECT_WATCH_LIMIT => {
                    self.record_effect(&w, Some(missing)).await;
                }
                Ok(_) => keep.push(w),
                Err(e) => {
                    tracing::warn!(kind = %w.kind, error = %e, "cannot check whether a step took effect; will retry");
                    keep.push(w);
                }
            }
        }
        self.effects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(keep);
    }

    /// What `w` still waits for, in words (empty: in effect).
    async fn progress(
        &self,
        w: &mut Watch,
        agents: &[crate::store::AgentRecord],
        deliveries: &[crate::store::DeliveryRecord],
    ) -> Result<Vec<String>, ServiceError> {
        let now = crate::unix_now();
        let mut missing = Vec::new();
        for awaited in &mut w.awaited {
            match awaited {
                Awaited::Bundle(sequence) => {
                    let (_, _, lagging) = crate::authority::root::acknowledgements(
                        agents, deliveries, *sequence, now,
                    );
                    let lagging = lagging.len();
                    if lagging > 0 {
                        missing.push(format!("{lagging} agents without bundle {sequence}"));
                    }
                }
                Awaited::Crls(serials) => {
                    serials.retain(|_, not_after| *not_after > now);
                    if serials.is_empty() {
                        continue;
                    }
                    // Each agent's latest report: the digest of the CRL set every stream of its
                    // workloads was handed.
                    let latest = latest_reports(deliveries);
                    let lagging = live(agents, now)
                        .filter(|a| {
                            let set = latest
                                .get(&a.spiffe_id)
                                .and_then(|d| self.authority.crl_set_by_digest(&d.crl_digest));
                            !set.is_some_and(|set| serials.keys().all(|s| set.serials.contains(s)))
                        })
                        .count();
                    if lagging > 0 {
                        missing.push(format!("{lagging} agents without the CRLs"));
                    }
                }
                Awaited::Policy(revision) => {
                    let latest = latest_reports(deliveries);
                    let lagging = live(agents, now)
                        .filter(|a| {
                            latest
                                .get(&a.spiffe_id)
                                .is_none_or(|d| d.policy_revision < *revision)
                        })
                        .count();
                    if lagging > 0 {
                        missing.push(format!(
                            "{lagging} agents without policy revision {revision}"
                        ));
                    }
                }
                Awaited::Renewed(before) => {
                    let current: HashMap<&SpiffeId, &crate::store::AgentRecord> =
                        live(agents, now).map(|a| (&a.spiffe_id, a)).collect();
                    before
                        .retain(|id, serial| current.get(id).is_some_and(|a| a.serial == *serial));
                    if !before.is_empty() {
                        missing.push(format!("{} agents not renewed", before.len()));
                    }
                }
                Awaited::Issued {
                    entries,
                    rotated,
                    cursor,
                } => {
                    const PAGE: i64 = 1000;
                    loop {
                        let records = self.store.audit_records(*cursor, PAGE).await?;
                        for r in &records {
                            *cursor = r.seq;
                            if r.kind != "entry.rotated" && r.kind != "svid.x509.issued" {
                                continue;
                            }
                            let details: serde_json::Value =
                                serde_json::from_str(&r.details).unwrap_or_default();
                            let Some(id) = details["entry_id"].as_str() else {
                                continue;
                            };
                            if r.kind == "entry.rotated" {
                                if entries.contains(id) {
                                    rotated.insert(id.to_owned());
                                }
                            } else if rotated.contains(id) {
                                entries.remove(id);
                            }
                        }
                        if (records.len() as i64) < PAGE || entries.is_empty() {
                            break;
                        }
                    }
                    if !entries.is_empty() {
                        missing.push(format!("{} entries not re-issued", entries.len()));
                    }
                }
            }
        }
        Ok(missing)
    }

    /// Records `<kind>.effective` for `w`: in effect, or (`missing`) given up on.
    async fn record_effect(&self, w: &Watch, missing: Option<Vec<String>>) {
        let after_ms = u64::try_from(w.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut details = w.details.clone();
        if !details.is_object() {
            details = serde_json::json!({});
        }
        details["after_ms"] = after_ms.into();
        details["effective"] = missing.is_none().into();
        details["ca_server"] = self.authority.server_id().into();
        if let Some(m) = &missing {
            details["missing"] = m.join(", ").into();
        }
        let kind = format!("{}.effective", w.kind);
        let event = AuditEvent::new(&kind, &w.actor, details);
        match self.store.append_audit(&event).await {
            Ok(_) if missing.is_none() => {
                tracing::info!(step = %w.kind, after_ms, "in effect across the mesh");
            }
            Ok(_) => {
                tracing::warn!(step = %w.kind, after_ms, missing = %missing.unwrap_or_default().join(", "), "not in effect across the mesh after the watch limit; no longer watched");
            }
            Err(e) => {
                tracing::warn!(step = %w.kind, error = %e, "cannot record that a step took effect");
            }
        }
    }
}

fn live(
    agents: &[crate::store::AgentRecord],
    now: i64,
) -> impl Iterator<Item = &crate::store::AgentRecord> {
    agents
        .iter()
        .filter(move |a| !a.banned && a.expires_at > now)
}

/// Each agent's latest delivery report, whichever CA server took it.
fn latest_reports(
    deliveries: &[crate::store::DeliveryRecord],
) -> HashMap<&SpiffeId, &crate::store::DeliveryRecord> {
    let mut latest: HashMap<&SpiffeId, &crate::store::DeliveryRecord> = HashMap::new();
    for d in deliveries {
        let slot = latest.entry(&d.agent).or_insert(d);
        if d.reported_at > slot.reported_at {
            *slot = d;
        }
    }
    latest
}
