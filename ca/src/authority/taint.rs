//! Event-based rotation: `meshid-ca ca taint KEY_ID` for a key that may be compromised.
//!
//! A tainted intermediate or JWT key signs nothing more: every CA server whose active key it
//! is replaces it at once with a fresh one ([`Authority::rotate`]). The tainted set goes to
//! every agent on its sync stream; an agent re-issues each SVID whose chain contains a tainted
//! certificate at once (soonest expiry first) and renews its own SVID, and stops serving cached
//! JWT-SVIDs of a tainted key. The key stays in the bundle (what it signed still verifies until
//! replaced: a taint forces rotation, it does not revoke).
//!
//! Progress is measured from the CA's own issuance records ([`Authority::taint_progress`]): for
//! each holder (an entry at an agent, an agent, a CA server) the latest X.509-SVID issued; a
//! holder whose latest SVID is unexpired and signed by a tainted key remains to be replaced.

use std::collections::HashMap;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use super::{key_event, to_unix, Authority, AuthorityError};
use crate::store::{CaKeyKind, CaKeyRecord, StoreError};

/// How far the replacement of what one tainted key signed has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintProgress {
    /// The tainted key.
    pub key_id: String,
    /// Its kind.
    pub kind: CaKeyKind,
    /// When it was tainted (unix seconds).
    pub tainted_at: i64,
    /// Unexpired, unrevoked X.509-SVIDs it signed that are still their holder's latest.
    pub remaining: u64,
    /// When the last of those expires anyway (unix seconds; 0 when none remain).
    pub remaining_until: i64,
    /// Holders it had signed for that have been re-issued since the taint.
    pub replaced: u64,
    /// Seconds from the taint to the last re-issue, once none remain.
    pub cleared_after_s: Option<i64>,
}

impl Authority {
    /// Taints `key_id` (an intermediate or a JWT key of this trust domain): it signs nothing
    /// more, and what it signed is re-issued across the mesh.
    pub async fn taint_key(
        &self,
        key_id: &str,
        actor: &str,
        reason: &str,
    ) -> Result<CaKeyRecord, AuthorityError> {
        let _one_at_a_time = self.rotation.lock().await;
        let now = SystemTime::now();
        let now_s = to_unix(now);
        let journal = self.store.list_ca_keys().await?;
        let Some(rec) = journal.iter().find(|k| k.id == key_id).cloned() else {
            return Err(AuthorityError::Refused(format!(
                "no CA key {key_id} (see meshid-ca ca status)"
            )));
        };
        match rec.kind {
            CaKeyKind::X509Intermediate | CaKeyKind::Jwt => {}
            CaKeyKind::X509Root | CaKeyKind::X509CrossSigned => {
                return Err(AuthorityError::Refused(format!(
                    "{key_id} is a root: replace it with meshid-ca ca root prepare, activate and retire (or taint the intermediates it signed)"
                )))
            }
        }
        if rec.not_after <= now_s {
            return Err(AuthorityError::Refused(format!(
                "{key_id} has expired: nothing it signed is still valid"
            )));
        }
        let mut event = key_event("ca.key.tainted", actor, &rec);
        event.details["reason"] = reason.into();
        event.details["kind"] = rec.kind.as_str().into();
        event.details["ca_server"] = self.server_id.clone().into();
        match self.store.taint_ca_key(key_id, now_s, &event).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists(_)) => {
                return Err(AuthorityError::Refused(format!(
                    "{key_id} is already tainted"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        tracing::warn!(
            key_id,
            actor,
            reason,
            "CA key tainted: everything it signed is re-issued"
        );
        self.follow_change(now, "key tainted").await;
        Ok(rec)
    }

    /// The tainted keys that may still have signed something valid: intermediate certificates,
    /// and JWT key ids.
    pub fn tainted_keys(&self) -> (Vec<CertificateDer<'static>>, Vec<String>) {
        let now_s = to_unix(SystemTime::now());
        let mut x509 = Vec::new();
        let mut jwt = Vec::new();
        for k in self.current().journal.iter() {
            if k.tainted_at == 0 || k.not_after <= now_s {
                continue;
            }
            match k.kind {
                CaKeyKind::X509Intermediate => {
                    x509.push(CertificateDer::from(k.public_der.clone()))
                }
                CaKeyKind::Jwt => jwt.push(k.id.trim_start_matches("jwt-").to_owned()),
                _ => {}
            }
        }
        (x509, jwt)
    }

    /// How far the replacement of what each tainted intermediate signed has come, from the
    /// issuance records.
    pub async fn taint_progress(&self) -> Result<Vec<TaintProgress>, AuthorityError> {
        let now_s = to_unix(SystemTime::now());
        let journal = self.store.list_ca_keys().await?;
        let tainted: Vec<&CaKeyRecord> = journal
            .iter()
            .filter(|k| k.tainted_at > 0 && k.kind == CaKeyKind::X509Intermediate)
            .filter(|k| k.not_after > now_s || k.tainted_at > now_s - 3600)
            .collect();
        if tainted.is_empty() {
            return Ok(Vec::new());
        }
        let since = tainted
            .iter()
            .map(|k| k.created_at)
            .min()
            .unwrap_or(now_s)
            .max(now_s - self.longest_x509_ttl_s() - 60);
        // The latest SVID of each holder, and when a holder last moved off a tainted key.
        struct Latest {
            issuer: String,
            serial: String,
            not_after: i64,
        }
        let mut latest: HashMap<String, Latest> = HashMap::new();
        let mut replaced: HashMap<String, (String, i64)> = HashMap::new();
        self.scan_issuances(since, |r, d| {
            let field = |n: &str| d.get(n).and_then(serde_json::Value::as_str);
            let holder = match r.kind.as_str() {
                "svid.x509.issued" => format!(
                    "entry {} at {}",
                    field("entry_id").unwrap_or_default(),
                    r.actor
                ),
                "agent.attested" | "agent.renewed" => {
                    format!("agent {}", field("spiffe_id").unwrap_or_default())
                }
                "svid.x509.server" => format!("server {}", r.actor),
                // A minted SVID has no holder that could be re-issued: its own.
                _ => format!("mint {}", field("serial").unwrap_or_default()),
            };
            let issuer = field("issuer").unwrap_or_default().to_owned();
            let not_after = d
                .get("not_after")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0);
            if let Some(prev) = latest.get(&holder) {
                if prev.issuer != issuer {
                    if let Some(t) = tainted.iter().find(|t| t.id == prev.issuer) {
                        if r.time >= t.tainted_at {
                            replaced.insert(holder.clone(), (t.id.clone(), r.time));
                        }
                    }
                }
            }
            let serial = field("serial").unwrap_or_default().to_owned();
            latest.insert(
                holder,
                Latest {
                    issuer,
                    serial,
                    not_after,
                },
            );
        })
        .await?;
        // A revoked certificate is refused everywhere already: nothing is left to replace.
        let norm = |s: &str| s.replace(':', "").to_ascii_lowercase();
        let revoked: std::collections::HashSet<(String, String)> = self
            .store
            .list_revocations(now_s)
            .await?
            .into_iter()
            .map(|r| (r.issuer_id, norm(&r.serial)))
            .collect();
        Ok(tainted
            .iter()
            .map(|t| {
                let mut p = TaintProgress {
                    key_id: t.id.clone(),
                    kind: t.kind,
                    tainted_at: t.tainted_at,
                    remaining: 0,
                    remaining_until: 0,
                    replaced: 0,
                    cleared_after_s: None,
                };
                for l in latest.values() {
                    let live = !revoked.contains(&(l.issuer.clone(), norm(&l.serial)));
                    if l.issuer == t.id && l.not_after > now_s && live {
                        p.remaining += 1;
                        p.remaining_until = p.remaining_until.max(l.not_after);
                    }
                }
                let mut last = None;
                for (key, at) in replaced.values() {
                    if key == &t.id {
                        p.replaced += 1;
                        last = Some(last.unwrap_or(0).max(*at));
                    }
                }
                if p.remaining == 0 {
                    p.cleared_after_s = Some(last.map_or(0, |at| at - t.tainted_at));
                }
                p
            })
            .collect())
    }
}
