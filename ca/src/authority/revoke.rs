//! Revocation (`meshid-ca svid revoke`): which certificates, from the issuance records; one CRL
//! per issuing key, signed by the CA server that holds the key and stored for every server to
//! hand out.
//!
//! A CRL lists the unexpired revoked certificates its key signed; a certificate leaves it once
//! it has expired anyway. CRLs are valid for [`CRL_VALIDITY_S`] seconds and re-signed at half of that, or
//! at once when what they list changes. Verifiers in meshid keep a CRL past its nextUpdate
//! (an agent cut off from the CA must not start trusting what it revoked); openssl and other
//! relying parties that enforce nextUpdate get a fresh one long before.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use super::root::ISSUANCE_KINDS;
use super::{key_event, to_unix, Authority, AuthorityError};
use crate::audit::AuditEvent;
use crate::store::{CaKeyKind, CaKeyRecord, CrlRecord, RevocationRecord};
use crate::svid::{CaKey, Issuer};

/// How long a CRL is valid (its nextUpdate after thisUpdate).
pub const CRL_VALIDITY_S: i64 = 24 * 3600;

pub use super::CrlSet;

/// How many of the CRL sets this server served are remembered, to tell from the digest an
/// agent reports which revocations it delivered ([`Authority::crl_set_by_digest`]).
pub const CRL_HISTORY: usize = 256;

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One certificate, by serial (hex; colons and case ignored).
    Serial(String),
    /// Every unexpired X.509-SVID issued to a SPIFFE ID.
    SpiffeId(String),
    /// An intermediate: its certificate (and so everything it signed); it is tainted too.
    Key(String),
}

/// What a revocation did.
#[derive(Debug, Clone, Default)]
pub struct RevokeOutcome {
    /// Newly revoked.
    pub revoked: Vec<RevocationRecord>,
    /// Already revoked before.
    pub already: usize,
    /// The intermediate revoked was tainted by this call.
    pub tainted: bool,
}

/// A serial as the CA writes it: lowercase hex, no separators, no leading zero bytes beyond
/// what DER needs (as [`crate::svid::IssuedSvid::serial`]).
pub fn normalize_serial(s: &str) -> Result<String, AuthorityError> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let hex = hex.strip_prefix("0x").unwrap_or(&hex).to_owned();
    if hex.is_empty() || hex.len() > 42 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(AuthorityError::Refused(format!(
            "{s:?} is not a certificate serial (hex digits, colons allowed)"
        )));
    }
    Ok(if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex
    })
}

impl Authority {
    /// Revokes `target`, recorded with `actor` and `reason`, and signs the CRLs this server can
    /// (the holders of other keys follow through the change feed).
    pub async fn revoke(
        &self,
        target: &RevokeTarget,
        actor: &str,
        reason: &str,
    ) -> Result<RevokeOutcome, AuthorityError> {
        let now_s = to_unix(SystemTime::now());
        let mut wanted: Vec<RevocationRecord> = Vec::new();
        let mut tainted = false;
        let record =
            |issuer_id: String, serial: String, spiffe_id: String, kind: String, not_after: i64| {
                RevocationRecord {
                    issuer_id,
                    serial,
                    spiffe_id,
                    kind,
                    not_after,
                    revoked_at: now_s,
                    reason: reason.to_owned(),
                    actor: actor.to_owned(),
                }
            };
        match target {
            RevokeTarget::Key(key_id) => {
                let journal = self.store.list_ca_keys().await?;
                let Some(rec) = journal.iter().find(|k| &k.id == key_id).cloned() else {
                    return Err(AuthorityError::Refused(format!(
                        "no CA key {key_id} (see meshid-ca ca status)"
                    )));
                };
                if rec.kind != CaKeyKind::X509Intermediate {
                    return Err(AuthorityError::Refused(format!(
                        "{key_id} is not an intermediate: a root is replaced by meshid-ca ca root prepare, activate and retire; a JWT key by meshid-ca ca taint"
                    )));
                }
                if rec.not_after <= now_s {
                    return Err(AuthorityError::Refused(format!(
                        "{key_id} has expired: nothing it signed is still valid"
                    )));
                }
                let Some(parent) = rec.parent_id.clone() else {
                    return Err(AuthorityError::Inconsistent(format!(
                        "intermediate {key_id} names no root in the journal"
                    )));
                };
                if rec.tainted_at == 0 {
                    // It must sign nothing more, and what it signed is replaced.
                    self.taint_key(key_id, actor, reason).await?;
                    tainted = true;
                }
                let serial = cert_serial(&rec.public_der)?;
                wanted.push(record(
                    parent,
                    serial,
                    self.td.id_string(),
                    "x509_intermediate".into(),
                    rec.not_after,
                ));
            }
            RevokeTarget::Serial(_) | RevokeTarget::SpiffeId(_) => {
                let serial = match target {
                    RevokeTarget::Serial(s) => Some(normalize_serial(s)?),
                    _ => None,
                };
                let id = match target {
                    RevokeTarget::SpiffeId(id) => Some(id.as_str()),
                    _ => None,
                };
                let since = now_s - self.longest_x509_ttl_s() - 60;
                let mut after = 0;
                let mut unattributed = 0;
                loop {
                    let records = self
                        .store
                        .audit_records_since(since, ISSUANCE_KINDS, after, 10_000)
                        .await?;
                    let Some(last) = records.last() else { break };
                    after = last.seq;
                    for r in &records {
                        let d: serde_json::Value =
                            serde_json::from_str(&r.details).unwrap_or_default();
                        let field =
                            |n: &str| d.get(n).and_then(serde_json::Value::as_str).unwrap_or("");
                        let not_after = d
                            .get("not_after")
                            .and_then(serde_json::Value::as_i64)
                            .unwrap_or(0);
                        if not_after <= now_s {
                            continue;
                        }
                        let matches = serial.as_deref().is_some_and(|s| s == field("serial"))
                            || id.is_some_and(|i| i == field("spiffe_id"));
                        if !matches {
                            continue;
                        }
                        if field("issuer").is_empty() {
                            unattributed += 1;
                            continue;
                        }
                        wanted.push(record(
                            field("issuer").to_owned(),
                            field("serial").to_owned(),
                            field("spiffe_id").to_owned(),
                            r.kind.clone(),
                            not_after,
                        ));
                    }
                }
                if wanted.is_empty() {
                    let what = match target {
                        RevokeTarget::Serial(s) => format!("serial {s}"),
                        RevokeTarget::SpiffeId(i) => format!("SPIFFE ID {i}"),
                        RevokeTarget::Key(_) => unreachable!("handled above"),
                    };
                    return Err(AuthorityError::Refused(if unattributed > 0 {
                        format!("the unexpired SVIDs of {what} were issued by an older CA version that did not record their issuer; taint the intermediate instead (meshid-ca ca taint)")
                    } else {
                        format!("no unexpired X.509-SVID of {what} in the issuance records")
                    }));
                }
            }
        }
        wanted.sort_by(|a, b| (&a.issuer_id, &a.serial).cmp(&(&b.issuer_id, &b.serial)));
        wanted.dedup_by(|a, b| a.issuer_id == b.issuer_id && a.serial == b.serial);
        let event = AuditEvent::new(
            "svid.revoked",
            actor,
            serde_json::json!({
                "reason": reason,
                "ca_server": self.server_id,
                "target": match target {
                    RevokeTarget::Serial(s) => serde_json::json!({"serial": s}),
                    RevokeTarget::SpiffeId(i) => serde_json::json!({"spiffe_id": i}),
                    RevokeTarget::Key(k) => serde_json::json!({"key_id": k}),
                },
                "certificates": wanted.iter().map(|r| serde_json::json!({
                    "serial": r.serial,
                    "issuer": r.issuer_id,
                    "spiffe_id": r.spiffe_id,
                    "kind": r.kind,
                    "not_after": r.not_after,
                })).collect::<Vec<_>>(),
            }),
        );
        let added = self.store.insert_revocations(&wanted, &event).await?;
        tracing::warn!(
            revoked = added.len(),
            already = wanted.len() - added.len(),
            actor,
            reason,
            "certificates revoked"
        );
        if !added.is_empty() {
            self.sign_crls().await?;
        }
        Ok(RevokeOutcome {
            already: wanted.len() - added.len(),
            revoked: added,
            tainted,
        })
    }

    /// Signs, for every issuing key this server holds, a CRL whose content is out of date
    /// (revocations added or expired) or past half its validity, stores it, and reloads every
    /// server's CRLs. Returns whether the set of CRLs served changed.
    pub async fn sign_crls(&self) -> Result<bool, AuthorityError> {
        let now_s = to_unix(SystemTime::now());
        let journal = self.store.list_ca_keys().await?;
        let mut by_issuer: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
        for r in self.store.list_revocations(now_s).await? {
            by_issuer
                .entry(r.issuer_id)
                .or_default()
                .push((r.serial, r.revoked_at));
        }
        let stored: HashMap<String, CrlRecord> = self
            .store
            .list_crls()
            .await?
            .into_iter()
            .map(|c| (c.issuer_id.clone(), c))
            .collect();
        // Issuers with something listed now, or a CRL that still lists something.
        let issuers: BTreeSet<String> = by_issuer
            .keys()
            .cloned()
            .chain(
                stored
                    .values()
                    .filter(|c| c.entries > 0)
                    .map(|c| c.issuer_id.clone()),
            )
            .collect();
        for issuer_id in issuers {
            let Some(rec) = journal.iter().find(|k| k.id == issuer_id) else {
                continue;
            };
            if rec.server_id != self.server_id || rec.not_after <= now_s {
                continue;
            }
            let listed = by_issuer.remove(&issuer_id).unwrap_or_default();
            let previous = stored.get(&issuer_id);
            let want: BTreeSet<String> = listed.iter().map(|(s, _)| s.clone()).collect();
            let same = previous.is_some_and(|p| {
                crl_serials(&p.der) == want && now_s - p.this_update < CRL_VALIDITY_S / 2
            });
            if same {
                continue;
            }
            let signer = match self.crl_signer(rec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(issuer = %issuer_id, error = %e, "cannot sign the CRL of this key: its key is not readable here");
                    continue;
                }
            };
            let number = previous.map_or(1, |p| p.number + 1);
            let der = signer.sign_crl(number, now_s, now_s + CRL_VALIDITY_S, &listed)?;
            let crl = CrlRecord {
                issuer_id: issuer_id.clone(),
                server_id: self.server_id.clone(),
                number,
                this_update: now_s,
                entries: listed.len() as u64,
                der,
            };
            let mut event = key_event("ca.crl.signed", &format!("ca:{}", self.server_id), rec);
            event.details["crl_number"] = number.into();
            event.details["entries"] = listed.len().into();
            event.details["ca_server"] = self.server_id.clone().into();
            self.store.put_crl(&crl, &event).await?;
            tracing::info!(issuer = %issuer_id, crl_number = number, entries = listed.len(), "CRL signed");
        }
        self.refresh_crls().await
    }

    /// Reloads the CRLs every server stored; returns whether what is served changed. A CRL of
    /// an expired key is no longer served (nothing it could list is valid).
    pub async fn refresh_crls(&self) -> Result<bool, AuthorityError> {
        let now_s = to_unix(SystemTime::now());
        let journal = self.store.list_ca_keys().await?;
        let live: BTreeSet<&str> = journal
            .iter()
            .filter(|k| k.not_after > now_s)
            .map(|k| k.id.as_str())
            .collect();
        let crls: Vec<CrlRecord> = self
            .store
            .list_crls()
            .await?
            .into_iter()
            .filter(|c| live.contains(c.issuer_id.as_str()))
            .collect();
        let mut held = self.crls.write().unwrap_or_else(|p| p.into_inner());
        if held.records == crls {
            return Ok(false);
        }
        let serials = crls.iter().flat_map(|c| crl_serials(&c.der)).collect();
        let der: Vec<Vec<u8>> = crls.iter().map(|c| c.der.clone()).collect();
        let set = Arc::new(CrlSet {
            digest: meshid_api::tls::revocation::set_digest(&der),
            records: crls,
            serials,
        });
        *held = Arc::clone(&set);
        drop(held);
        let mut history = self.crl_history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == CRL_HISTORY {
            history.pop_front();
        }
        history.push_back(set);
        Ok(true)
    }

    /// The set of CRLs this server served (one of the last [`CRL_HISTORY`]) whose digest is
    /// `digest`.
    pub fn crl_set_by_digest(&self, digest: &str) -> Option<Arc<CrlSet>> {
        if digest.is_empty() {
            return None;
        }
        let history = self.crl_history.lock().unwrap_or_else(|p| p.into_inner());
        history.iter().rev().find(|s| s.digest == digest).cloned()
    }

    /// The CRLs to serve.
    pub fn crls(&self) -> Arc<CrlSet> {
        Arc::clone(&self.crls.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The key of `rec` (an intermediate or a root this server holds), as a CRL signer.
    fn crl_signer(&self, rec: &CaKeyRecord) -> Result<Issuer, AuthorityError> {
        let path = match rec.kind {
            CaKeyKind::X509Root => super::root_key_path(rec, self.upstream.as_ref(), &self.key_dir)
                .ok_or_else(|| {
                    AuthorityError::Inconsistent(format!("no key for root {}", rec.id))
                })?,
            _ => self.key_path(&rec.id),
        };
        let key = CaKey::from_pkcs8_pem(&super::read_private(&path)?)?;
        Ok(Issuer::new(
            rustls_pki_types::CertificateDer::from(rec.public_der.clone()),
            key,
            Vec::new(),
        )?)
    }
}

/// The serial (lowercase hex) of a DER certificate.
fn cert_serial(der: &[u8]) -> Result<String, AuthorityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
        AuthorityError::Inconsistent(format!("stored certificate does not parse: {e}"))
    })?;
    Ok(hex::encode(cert.raw_serial()))
}

/// The serials a stored CRL lists (empty if it does not parse: it is then re-signed).
fn crl_serials(der: &[u8]) -> BTreeSet<String> {
    x509_parser::parse_x509_crl(der)
        .map(|(_, crl)| {
            crl.iter_revoked_certificates()
                .map(|r| hex::encode(r.raw_serial()))
                .collect()
        })
        .unwrap_or_else(|_| BTreeSet::from([String::new()]))
}
