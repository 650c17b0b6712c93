//! Keeps every federation relationship's bundle current, and the set in force in memory.
//!
//! Each CA server runs [`refresh_loop`]: once a second (and at once when a relationship is
//! made or deleted here) it reads the relationships and the stored bundles, puts the stored
//! bundles in force ([`super::Federation`]; agents are told when they change, so a bundle
//! another CA server fetched reaches this server's agents within a second), and fetches every
//! bundle that is due. A bundle is due when the relationship is new, then after its
//! `spiffe_refresh_hint` ([`super::next_refresh`]). A fetched bundle that differs from the
//! stored one is stored, with a `federation.bundle.updated` audit record. A failed fetch keeps
//! the last good bundle in force, is logged and counted, and is retried sooner.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::fetch::{fetch_bundle, FetchError, WebRoots};
use super::{next_refresh, parse_bundle, validate, Relationship};
use crate::audit::AuditEvent;
use crate::bundle::TrustBundle;
use crate::metrics::{FederationLabels, TrustDomainLabels};
use crate::service::{Ca, CaEvent};
use crate::store::FederatedBundle;

type Fetched = (String, Result<(TrustBundle, String), FetchError>);

/// Refreshes the federated bundles until `stop` turns true.
pub async fn refresh_loop(ca: Ca, web_roots: WebRoots, mut stop: watch::Receiver<bool>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut fetching: JoinSet<Fetched> = JoinSet::new();
    let mut in_flight: std::collections::HashSet<String> = Default::default();
    // The stored bundles parsed, kept while their document is unchanged (they are read every
    // second, parsed once).
    let mut parsed: HashMap<String, (String, Arc<TrustBundle>)> = HashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let state = match load(&ca, &mut parsed).await {
            Ok(state) => Some(state),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the federation relationships; will retry");
                None
            }
        };
        if let Some(State {
            relationships,
            stored,
        }) = &state
        {
            due.retain(|td, _| relationships.contains_key(td));
            ca.federation
                .retain_status(|td| relationships.contains_key(td));
            let now = Instant::now();
            for (td, relationship) in relationships {
                let at = *due.entry(td.clone()).or_insert(now);
                if at > now || in_flight.contains(td) {
                    continue;
                }
                in_flight.insert(td.clone());
                ca.federation
                    .update_status(td, |s| s.last_attempt = crate::unix_now());
                let held = stored.get(td).map(|(b, _)| Arc::clone(b));
                let (relationship, roots, td) =
                    (relationship.clone(), web_roots.clone(), td.clone());
                fetching.spawn(async move {
                    let result = fetch_bundle(&relationship, held.as_deref(), &roots).await;
                    (td, result)
                });
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = ca.federation.wake.notified() => {}
            Some(joined) = fetching.join_next(), if !fetching.is_empty() => {
                let Ok((td, result)) = joined else { continue };
                in_flight.remove(&td);
                let stored = state.as_ref().and_then(|s| s.stored.get(&td));
                let next = fetched(&ca, &td, result, stored).await;
                due.insert(td, Instant::now() + next);
            }
            _ = super::stopped(&mut stop) => {
                fetching.abort_all();
                return;
            }
        }
    }
}

/// The relationships (validated) and stored bundles (parsed), by trust domain.
struct State {
    relationships: BTreeMap<String, Relationship>,
    stored: BTreeMap<String, (Arc<TrustBundle>, String)>,
}

/// Reads the relationships and bundles, and puts the stored bundles in force (parsing only
/// documents not in `parsed`, which keeps what was parsed, by trust domain).
async fn load(
    ca: &Ca,
    parsed: &mut HashMap<String, (String, Arc<TrustBundle>)>,
) -> Result<State, crate::store::StoreError> {
    let own = ca.authority.trust_domain();
    let mut relationships = BTreeMap::new();
    for r in ca.store.list_federations().await? {
        match validate(
            own,
            r.trust_domain.as_str(),
            &r.endpoint_url,
            &r.profile,
            &r.endpoint_spiffe_id,
        ) {
            Ok(v) => {
                relationships.insert(r.trust_domain.to_string(), v);
            }
            Err(e) => tracing::error!(
                trust_domain = %r.trust_domain,
                error = %e,
                "a stored federation relationship is invalid; skipping it"
            ),
        }
    }
    let mut stored = BTreeMap::new();
    for b in ca.store.list_federated_bundles().await? {
        let td = b.trust_domain.to_string();
        if !relationships.contains_key(&td) {
            continue;
        }
        let known = parsed
            .get(&td)
            .filter(|(doc, _)| *doc == b.document)
            .map(|(_, bundle)| Arc::clone(bundle));
        let bundle = match known {
            Some(bundle) => Ok(bundle),
            None => parse_bundle(&b.trust_domain, &b.document).map(Arc::new),
        };
        match bundle {
            Ok(bundle) => {
                parsed.insert(td.clone(), (b.document.clone(), Arc::clone(&bundle)));
                ca.metrics
                    .federation_bundle_updated
                    .get_or_create(&TrustDomainLabels {
                        trust_domain: td.clone(),
                    })
                    .set(b.updated_at);
                stored.insert(td, (bundle, b.document));
            }
            Err(e) => tracing::error!(
                trust_domain = %td,
                error = %e,
                "a stored federated bundle does not parse; it is not in force"
            ),
        }
    }
    parsed.retain(|td, _| stored.contains_key(td));
    let in_force = stored
        .iter()
        .map(|(td, (b, _))| (td.clone(), Arc::clone(b)))
        .collect();
    if ca.federation.set_bundles(in_force) {
        tracing::info!(
            trust_domains = ?stored.keys().collect::<Vec<_>>(),
            "federated bundles in force changed"
        );
        ca.publish(CaEvent::FederationChanged);
    }
    Ok(State {
        relationships,
        stored,
    })
}

/// Handles a fetch's result: stores a bundle that changed; returns when to fetch again.
async fn fetched(
    ca: &Ca,
    td: &str,
    result: Result<(TrustBundle, String), FetchError>,
    stored: Option<&(Arc<TrustBundle>, String)>,
) -> std::time::Duration {
    let labels = |result| FederationLabels {
        trust_domain: td.to_owned(),
        result,
    };
    let (bundle, document) = match result {
        Ok(ok) => ok,
        Err(e) => {
            ca.metrics
                .federation_refreshes
                .get_or_create(&labels("error"))
                .inc();
            let error = e.to_string();
            tracing::warn!(trust_domain = %td, error = %error, "cannot refresh the federated bundle; the last good one stays in force");
            let hint = stored.map_or(std::time::Duration::ZERO, |(b, _)| b.refresh_hint);
            let next = next_refresh(hint, true);
            ca.federation.update_status(td, |s| {
                s.last_error = error;
                s.next_attempt = crate::unix_now() + next.as_secs() as i64;
            });
            return next;
        }
    };
    ca.metrics
        .federation_refreshes
        .get_or_create(&labels("ok"))
        .inc();
    let next = next_refresh(bundle.refresh_hint, false);
    let now = crate::unix_now();
    // A success is shown once what was fetched is what is stored (and so in force here).
    let succeeded = |ca: &Ca| {
        ca.federation.update_status(td, |s| {
            s.last_success = now;
            s.last_error.clear();
            s.next_attempt = now + next.as_secs() as i64;
        })
    };
    if stored.is_some_and(|(_, doc)| *doc == document) {
        succeeded(ca);
        return next;
    }
    let digest = hex::encode(Sha256::digest(document.as_bytes()));
    let event = AuditEvent::new(
        "federation.bundle.updated",
        format!("ca:{}", ca.authority.server_id()),
        serde_json::json!({
            "trust_domain": td,
            "sequence": bundle.sequence,
            "previous_sequence": stored.map(|(b, _)| b.sequence),
            "x509_authorities": bundle.x509_authorities.len(),
            "jwt_authorities": bundle.jwt_authorities.len(),
            "sha256": digest,
        }),
    );
    let record = FederatedBundle {
        trust_domain: bundle.trust_domain.clone(),
        document,
        sequence: i64::try_from(bundle.sequence).unwrap_or(i64::MAX),
        updated_at: now,
    };
    match ca.store.put_federated_bundle(&record, &event).await {
        Ok(()) => {
            succeeded(ca);
            tracing::info!(trust_domain = %td, sequence = bundle.sequence, "federated bundle updated");
            // In force at the next pass, a second from now at most; at once here.
            ca.federation.wake.notify_one();
        }
        Err(e) => {
            tracing::warn!(trust_domain = %td, error = %e, "cannot store the federated bundle fetched; will retry");
            let retry = next_refresh(bundle.refresh_hint, true);
            ca.federation.update_status(td, |s| {
                s.last_error = format!("cannot store the bundle fetched: {e}");
                s.next_attempt = now + retry.as_secs() as i64;
            });
            return retry;
        }
    }
    next
}
