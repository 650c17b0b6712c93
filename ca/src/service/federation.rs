//! Federation relationships (`meshid-ca federation create | list | show | delete`): validated
//! ([`crate::federation::validate`]), stored with the bootstrap bundle and an audit record,
//! and put in force here at once (other CA servers follow within a second, see
//! [`crate::federation::refresh`]).

use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use spiffe::TrustDomain;

use super::{check_reason, invalid, Ca, CaEvent, ServiceError};
use crate::audit::AuditEvent;
use crate::bundle::TrustBundle;
use crate::federation::{parse_bundle, validate, RefreshStatus, MAX_RELATIONSHIPS};
use crate::store::{FederatedBundle, FederationRecord, StoreError};

/// What `federation create` asks for.
#[derive(Debug, Clone, Default)]
pub struct FederationSpec {
    /// The other trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint.
    pub endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// For https_spiffe: the ID the endpoint presents.
    pub endpoint_spiffe_id: String,
    /// The trust domain's bundle as the operator verified it (required for https_spiffe).
    pub bootstrap_bundle: String,
    /// Why (recorded).
    pub reason: String,
}

/// A relationship with its bundle and this server's refresh state.
#[derive(Debug, Clone)]
pub struct FederationView {
    /// The relationship.
    pub record: FederationRecord,
    /// The bundle held, when there is one.
    pub bundle: Option<Arc<TrustBundle>>,
    /// When it was stored (unix seconds; 0: none).
    pub bundle_updated_at: i64,
    /// This server's refresh state.
    pub status: RefreshStatus,
}

impl Ca {
    /// Creates a relationship; its bundle (the bootstrap one, if given) is in force at once and
    /// the first fetch starts now.
    pub async fn create_federation(
        &self,
        spec: FederationSpec,
        caller: &str,
    ) -> Result<FederationView, ServiceError> {
        let own = self.authority.trust_domain();
        let relationship = validate(
            own,
            &spec.trust_domain,
            &spec.endpoint_url,
            &spec.profile,
            &spec.endpoint_spiffe_id,
        )
        .map_err(|e| invalid(e.field, e.reason))?;
        check_reason(&spec.reason)?;
        let td = relationship.trust_domain.clone();
        let bootstrap = match spec.bootstrap_bundle.trim() {
            "" if spec.profile == "https_spiffe" => {
                return Err(invalid(
                    "bootstrap_bundle",
                    format!(
                        "required with https_spiffe: {td}'s bundle, checked out of band (e.g. \
                         its `meshid-ca bundle show --format spiffe`), authenticates the endpoint"
                    ),
                ))
            }
            "" => None,
            text => {
                let bundle = parse_bundle(&td, text).map_err(|e| invalid(e.field, e.reason))?;
                Some((bundle, text.to_owned()))
            }
        };
        if self.store.list_federations().await?.len() >= MAX_RELATIONSHIPS {
            return Err(invalid(
                "trust_domain",
                format!("at most {MAX_RELATIONSHIPS} federation relationships"),
            ));
        }
        let now = crate::unix_now();
        let record = FederationRecord {
            trust_domain: td.clone(),
            endpoint_url: spec.endpoint_url.clone(),
            profile: relationship.profile.as_str().to_owned(),
            endpoint_spiffe_id: spec.endpoint_spiffe_id.clone(),
            owner: String::new(),
            created_at: now,
            updated_at: now,
        };
        let stored = bootstrap.as_ref().map(|(b, text)| FederatedBundle {
            trust_domain: td.clone(),
            document: text.clone(),
            sequence: i64::try_from(b.sequence).unwrap_or(i64::MAX),
            updated_at: now,
        });
        let event = AuditEvent::new(
            "federation.created",
            caller,
            serde_json::json!({
                "trust_domain": td.to_string(),
                "endpoint_url": record.endpoint_url,
                "profile": record.profile,
                "endpoint_spiffe_id": record.endpoint_spiffe_id,
                "reason": spec.reason,
                "bootstrap_bundle": bootstrap.as_ref().map(|(b, text)| serde_json::json!({
                    "sequence": b.sequence,
                    "x509_authorities": b.x509_authorities.len(),
                    "sha256": hex::encode(Sha256::digest(text.as_bytes())),
                })),
            }),
        );
        self.store
            .create_federation(&record, stored.as_ref(), &event)
            .await?;
        tracing::info!(trust_domain = %td, endpoint_url = %record.endpoint_url, profile = %record.profile, caller = %caller, "federation relationship created");
        let bundle = bootstrap.map(|(b, _)| Arc::new(b));
        if let Some(b) = &bundle {
            let mut bundles = (*self.federation.bundles()).clone();
            bundles.insert(td.to_string(), Arc::clone(b));
            if self.federation.set_bundles(bundles) {
                self.publish(CaEvent::FederationChanged);
            }
        }
        self.federation.wake.notify_one();
        Ok(FederationView {
            record,
            bundle,
            bundle_updated_at: if stored.is_some() { now } else { 0 },
            status: RefreshStatus::default(),
        })
    }

    /// Every relationship, with its bundle and refresh state.
    pub async fn list_federations(&self) -> Result<Vec<FederationView>, ServiceError> {
        let records = self.store.list_federations().await?;
        // The refresher records a success only after its bundle is stored: reading the status
        // before the bundles means a success shown always comes with its bundle (read the
        // other way round, a fetch completing in between showed a success and no bundle).
        let statuses: Vec<_> = records
            .iter()
            .map(|r| self.federation.status(r.trust_domain.as_str()))
            .collect();
        let stored = self.store.list_federated_bundles().await?;
        Ok(records
            .into_iter()
            .zip(statuses)
            .map(|(record, status)| {
                let held = stored
                    .iter()
                    .find(|b| b.trust_domain == record.trust_domain);
                FederationView {
                    bundle: held.and_then(|b| {
                        parse_bundle(&b.trust_domain, &b.document)
                            .ok()
                            .map(Arc::new)
                    }),
                    bundle_updated_at: held.map_or(0, |b| b.updated_at),
                    status,
                    record,
                }
            })
            .collect())
    }

    /// One relationship; `NotFound` when there is none.
    pub async fn get_federation(&self, trust_domain: &str) -> Result<FederationView, ServiceError> {
        self.list_federations()
            .await?
            .into_iter()
            .find(|v| v.record.trust_domain.as_str() == trust_domain)
            .ok_or_else(|| {
                StoreError::NotFound(format!("federation relationship with {trust_domain}")).into()
            })
    }

    /// Deletes a relationship and its bundle; agents stop handing the bundle out at once.
    pub async fn delete_federation(
        &self,
        trust_domain: &str,
        reason: &str,
        caller: &str,
    ) -> Result<FederationRecord, ServiceError> {
        check_reason(reason)?;
        let td = TrustDomain::new(trust_domain)
            .map_err(|e| invalid("trust_domain", format!("{trust_domain:?}: {e}")))?;
        let event = AuditEvent::new(
            "federation.deleted",
            caller,
            serde_json::json!({ "trust_domain": td.to_string(), "reason": reason }),
        );
        let record = self.store.delete_federation(&td, &event).await?;
        tracing::info!(trust_domain = %td, caller = %caller, "federation relationship deleted");
        let mut bundles = (*self.federation.bundles()).clone();
        bundles.remove(td.as_str());
        if self.federation.set_bundles(bundles) {
            self.publish(CaEvent::FederationChanged);
        }
        self.federation.wake.notify_one();
        Ok(record)
    }
}
