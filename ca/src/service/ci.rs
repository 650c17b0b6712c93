//! The CI token exchange (`POST /v1/ci/exchange` on the bundle endpoint): a CI job's OIDC
//! token from a configured issuer (`[[ci.issuers]]`) becomes a short-lived X.509-SVID for the
//! CSR it sends (its key never leaves the job), and JWT-SVIDs for the audiences it asks.
//!
//! The token is verified against its issuer's JWKS (fetched over HTTPS and cached for five
//! minutes; fetched again, at most every ten seconds, for a `kid` it does not hold), mapped by
//! the issuer's rules ([`crate::ci`]), and used once: its `jti` is recorded until it expires,
//! and a second use is refused. Each exchange is issued like `x509 mint` (and recorded so),
//! and audited as `ci.exchanged` with the claims that decided it; a refusal is logged with its
//! reason and counted, never with the token.

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::{Ca, ServiceError};
use crate::audit::AuditEvent;
use crate::ci::{grant, verify, Refusal};
use crate::federation::fetch::{https_get, web_client_config};
use crate::store::StoreError;
use crate::svid::IssuedSvid;

/// The largest JWKS fetched from a CI issuer.
const MAX_JWKS_BYTES: usize = 256 * 1024;
/// How long a fetched JWKS is used.
const JWKS_TTL: Duration = Duration::from_secs(300);
/// The shortest wait between two fetches of one issuer's JWKS.
const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// What a job asks for.
#[derive(Debug, Clone, Default)]
pub struct CiExchange {
    /// The CI system's OIDC token.
    pub token: String,
    /// A PKCS#10 CSR (DER) for the X.509-SVID; empty for none.
    pub csr_der: Vec<u8>,
    /// Audiences of JWT-SVIDs to mint (one token for all); empty for none.
    pub jwt_audiences: Vec<String>,
}

/// What it gets.
#[derive(Debug, Clone)]
pub struct CiExchanged {
    /// The identity.
    pub spiffe_id: String,
    /// The X.509-SVID, when a CSR was sent.
    pub x509: Option<IssuedSvid>,
    /// The JWT-SVID and its expiry, when audiences were asked.
    pub jwt: Option<(String, i64)>,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum CiError {
    /// The token was refused (403).
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The request is incomplete (400).
    #[error("{0}")]
    BadRequest(String),
    /// The issuer's JWKS could not be fetched, or the CA failed (503 / 500).
    #[error(transparent)]
    Failed(#[from] ServiceError),
    /// The issuer's JWKS could not be fetched (503).
    #[error("the issuer's keys cannot be fetched now: {0}")]
    Unavailable(String),
}

/// The `iss` of a token, unverified: only to pick the issuer whose keys verify it.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

impl Ca {
    /// Exchanges a CI job's token; `peer` (its address) is logged and audited.
    pub async fn exchange_ci_token(
        &self,
        req: CiExchange,
        peer: &str,
    ) -> Result<CiExchanged, CiError> {
        let result = self.exchange(req, peer).await;
        if let Err(e) = &result {
            let reason = match e {
                CiError::Refused(r) => r.reason(),
                CiError::BadRequest(_) => "bad_request",
                CiError::Failed(_) => "failed",
                CiError::Unavailable(_) => "unavailable",
            };
            self.metrics
                .ci_exchanges
                .get_or_create(&crate::metrics::ReasonLabels { reason })
                .inc();
            tracing::warn!(peer = %peer, reason, error = %e, "CI token exchange refused");
        }
        result
    }

    async fn exchange(&self, req: CiExchange, peer: &str) -> Result<CiExchanged, CiError> {
        if req.csr_der.is_empty() && req.jwt_audiences.is_empty() {
            return Err(CiError::BadRequest(
                "ask for something: a CSR (an X.509-SVID) and/or JWT audiences".into(),
            ));
        }
        let iss = unverified_issuer(&req.token)
            .ok_or_else(|| CiError::Refused(Refusal::Malformed("no readable iss".into())))?;
        let Some(index) = self
            .ci
            .issuers
            .iter()
            .position(|(c, _)| c.issuer.issuer == iss)
        else {
            return Err(CiError::Refused(Refusal::WrongIssuer(
                "a configured CI issuer".into(),
            )));
        };
        let config = &self.ci.issuers[index].0;
        let issuer = &config.issuer;
        let now = crate::unix_now();
        let mut jwks = self.ci_jwks(index, false).await?;
        let verified = match verify(&req.token, issuer, &jwks, now) {
            Err(Refusal::UnknownKey(_)) => {
                // The issuer may have rotated its keys since the last fetch.
                jwks = self.ci_jwks(index, true).await?;
                verify(&req.token, issuer, &jwks, now)
            }
            other => other,
        }
        .map_err(CiError::Refused)?;
        let granted = grant(&verified, issuer, self.authority.trust_domain(), now)
            .map_err(CiError::Refused)?;
        match self
            .store
            .consume_ci_token(&issuer.name, &verified.jti, verified.exp)
            .await
        {
            Err(StoreError::AlreadyExists(_)) => return Err(CiError::Refused(Refusal::Replayed)),
            other => other.map_err(ServiceError::from)?,
        }
        let sub = verified
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let actor = format!("ci:{}:{}", issuer.name, meshid_policy::yaml::clip(sub));
        let id = granted.spiffe_id.to_string();
        let ttl = granted.ttl.as_secs();
        let x509 = if req.csr_der.is_empty() {
            None
        } else {
            Some(self.mint_x509(&id, &req.csr_der, ttl, &[], &actor).await?)
        };
        let jwt = if req.jwt_audiences.is_empty() {
            None
        } else {
            Some(self.mint_jwt(&id, &req.jwt_audiences, ttl, &actor).await?)
        };
        // The claims that decided, with the token's identity (never the token).
        let rule = issuer.rules.iter().find(|r| r.name == granted.rule);
        let decided: serde_json::Map<String, serde_json::Value> = rule
            .into_iter()
            .flat_map(|r| r.when.iter().map(|(name, _)| name))
            .filter_map(|name| Some((name.clone(), verified.claims.get(name)?.clone())))
            .collect();
        let event = AuditEvent::new(
            "ci.exchanged",
            &actor,
            serde_json::json!({
                "issuer": issuer.name,
                "rule": granted.rule,
                "spiffe_id": id,
                "claims": decided,
                "sub": sub,
                "jti": verified.jti,
                "ttl": ttl,
                "x509_serial": x509.as_ref().map(|s| s.serial.clone()),
                "jwt_audiences": req.jwt_audiences,
                "peer": peer,
            }),
        );
        self.store
            .append_audit(&event)
            .await
            .map_err(ServiceError::from)?;
        self.metrics
            .ci_exchanges
            .get_or_create(&crate::metrics::ReasonLabels { reason: "ok" })
            .inc();
        tracing::info!(issuer = %issuer.name, rule = %granted.rule, spiffe_id = %id, ttl, peer = %peer, "CI token exchanged");
        Ok(CiExchanged {
            spiffe_id: id,
            x509,
            jwt,
        })
    }

    /// The JWKS of issuer `index`: cached, or fetched (again when `force`, at most every
    /// [`JWKS_MIN_INTERVAL`]).
    async fn ci_jwks(&self, index: usize, force: bool) -> Result<Arc<String>, CiError> {
        let (config, roots) = &self.ci.issuers[index];
        let name = &config.issuer.name;
        {
            let cache = self.ci.jwks.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((doc, at)) = cache.get(name) {
                let age = at.elapsed();
                if age < JWKS_TTL && (!force || age < JWKS_MIN_INTERVAL) {
                    return Ok(Arc::clone(doc));
                }
            }
        }
        let client = web_client_config(roots).map_err(|e| CiError::Unavailable(e.to_string()))?;
        let doc = https_get(&config.jwks_url, client, MAX_JWKS_BYTES)
            .await
            .map_err(|e| CiError::Unavailable(e.to_string()))?;
        let doc = Arc::new(doc);
        self.ci
            .jwks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone(), (Arc::clone(&doc), Instant::now()));
        Ok(doc)
    }
}
