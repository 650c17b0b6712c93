//! The CA's operations and the admin API that exposes them.
//!
//! [`Ca`] is the one place where an operation is validated, carried out, measured and written
//! to the audit log; the gRPC services ([`AdminService`]) are thin wrappers over it, and the
//! node API will be another. Errors reach the wire through exactly one mapping,
//! `From<ServiceError> for tonic::Status`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_api::admin;
use spiffe::SpiffeId;
use tonic::{Request, Response, Status};

use crate::audit::{self, AuditEvent};
use crate::authority::{Authority, AuthorityError};
use crate::entry::{self, EntryError, EntryId, EntrySpec, RegistrationEntry};
use crate::metrics::{KindLabels, Metrics, SignLabels};
use crate::store::{CaKeyKind, CaKeyState, Datastore, StoreError};
use crate::svid::IssuedSvid;
use crate::token::JoinToken;

/// Errors of CA operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request is invalid.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// A request field is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The datastore refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// The audit log failed verification or could not be read.
    #[error(transparent)]
    Audit(#[from] audit::VerifyError),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::Entry(_) | ServiceError::InvalidArgument { .. } => {
                Status::invalid_argument(msg)
            }
            ServiceError::Store(StoreError::NotFound(_)) => Status::not_found(msg),
            ServiceError::Store(StoreError::AlreadyExists(_)) => Status::already_exists(msg),
            ServiceError::Store(StoreError::RevisionConflict { .. }) => Status::aborted(msg),
            ServiceError::Store(StoreError::TokenRejected) => Status::permission_denied(msg),
            ServiceError::Authority(
                AuthorityError::Svid(_) | AuthorityError::Jwt(_) | AuthorityError::ForeignId { .. },
            ) => Status::invalid_argument(msg),
            _ => {
                tracing::error!(error = %msg, "internal error");
                Status::internal(msg)
            }
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// The CA: authority, datastore, metrics and defaults, shared by every API.
#[derive(Debug, Clone)]
pub struct Ca {
    /// Signing keys.
    pub authority: Arc<Authority>,
    /// The datastore.
    pub store: Arc<dyn Datastore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
}

fn ttl(secs: u64, max: Duration, field: &'static str) -> Result<Option<Duration>, ServiceError> {
    if secs == 0 {
        return Ok(None);
    }
    if secs > max.as_secs() {
        return Err(invalid(
            field,
            format!("{secs}s is longer than the maximum {}s", max.as_secs()),
        ));
    }
    Ok(Some(Duration::from_secs(secs)))
}

impl Ca {
    fn observe<T, E>(&self, kind: &'static str, started: Instant, result: &Result<T, E>) {
        let ok = result.is_ok();
        self.metrics
            .signed
            .get_or_create(&SignLabels {
                kind,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        if ok {
            self.metrics
                .sign_seconds
                .get_or_create(&KindLabels { kind })
                .observe(started.elapsed().as_secs_f64());
        }
    }

    async fn audit_issued(
        &self,
        kind: &str,
        actor: &str,
        svid: &IssuedSvid,
        spiffe_id: &SpiffeId,
        entry: Option<&EntryId>,
    ) -> Result<(), ServiceError> {
        let event = AuditEvent::new(
            kind,
            actor,
            serde_json::json!({
                "serial": svid.serial,
                "spiffe_id": spiffe_id.to_string(),
                "entry_id": entry.map(ToString::to_string),
                "not_after": svid.not_after,
            }),
        );
        self.store.append_audit(&event).await?;
        tracing::info!(spiffe_id = %spiffe_id, serial = %svid.serial, not_after = svid.not_after, caller = %actor, "issued X509-SVID");
        Ok(())
    }

    /// Signs the X.509-SVID of `entry` for `caller` and records the issuance. The identity,
    /// DNS names and lifetime come from the entry; only the public key comes from the CSR.
    pub async fn issue_for_entry(
        &self,
        entry: &RegistrationEntry,
        csr_der: &[u8],
        caller: &str,
    ) -> Result<IssuedSvid, ServiceError> {
        let started = Instant::now();
        let result = self.authority.sign_for_entry(entry, csr_der);
        self.observe("x509", started, &result);
        let svid = result?;
        self.audit_issued(
            "svid.x509.issued",
            caller,
            &svid,
            &entry.spiffe_id,
            Some(&entry.id),
        )
        .await?;
        Ok(svid)
    }

    /// Mints an X.509-SVID for any ID of the trust domain (operator debugging, `x509 mint`).
    pub async fn mint_x509(
        &self,
        spiffe_id: &str,
        csr_der: &[u8],
        ttl_secs: u64,
        dns_names: &[String],
        caller: &str,
    ) -> Result<IssuedSvid, ServiceError> {
        let id = entry::parse_id("spiffe_id", spiffe_id, self.authority.trust_domain())?;
        for name in dns_names {
            entry::validate_dns_name(name)?;
        }
        let ttl = ttl(ttl_secs, entry::MAX_X509_TTL, "ttl")?;
        let started = Instant::now();
        let result = self.authority.sign_x509_svid(csr_der, &id, dns_names, ttl);
        self.observe("x509", started, &result);
        let svid = result?;
        self.audit_issued("svid.x509.minted", caller, &svid, &id, None)
            .await?;
        Ok(svid)
    }

    /// Mints a JWT-SVID and records it (never the token itself).
    pub async fn mint_jwt(
        &self,
        spiffe_id: &str,
        audience: &[String],
        ttl_secs: u64,
        caller: &str,
    ) -> Result<(String, i64), ServiceError> {
        let id = entry::parse_id("spiffe_id", spiffe_id, self.authority.trust_domain())?;
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(invalid(
                "audience",
                "at least one non-empty audience is required",
            ));
        }
        let ttl = ttl(ttl_secs, entry::MAX_JWT_TTL, "ttl")?;
        let started = Instant::now();
        let result = self.authority.mint_jwt_svid(&id, audience, ttl);
        self.observe("jwt", started, &result);
        let (token, exp) = result?;
        let event = AuditEvent::new(
            "svid.jwt.minted",
            caller,
            serde_json::json!({"spiffe_id": id.to_string(), "audience": audience, "exp": exp}),
        );
        self.store.append_audit(&event).await?;
        Ok((token, exp))
    }

    /// Validates and stores a new entry.
    pub async fn create_entry(
        &self,
        spec: &EntrySpec,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        let entry = spec.validate(self.authority.trust_domain(), crate::unix_now())?;
        self.store
            .create_entry(&entry, &entry_event("entry.created", caller, &entry))
            .await?;
        tracing::info!(entry_id = %entry.id, spiffe_id = %entry.spiffe_id, caller = %caller, "entry created");
        Ok(entry)
    }

    /// Replaces an entry. `spec` must carry the id, and `revision` must be the stored one.
    pub async fn update_entry(
        &self,
        spec: &EntrySpec,
        revision: i64,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        let id: EntryId = spec
            .id
            .as_deref()
            .ok_or_else(|| invalid("entry.id", "is required"))?
            .parse()?;
        let old = self
            .store
            .get_entry(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("entry {id}")))?;
        let mut entry = spec.validate(self.authority.trust_domain(), crate::unix_now())?;
        entry.created_at = old.created_at;
        entry.revision = if revision == 0 {
            old.revision + 1
        } else {
            revision + 1
        };
        self.store
            .update_entry(&entry, &entry_event("entry.updated", caller, &entry))
            .await?;
        Ok(entry)
    }

    /// Deletes an entry.
    pub async fn delete_entry(
        &self,
        id: &str,
        caller: &str,
    ) -> Result<RegistrationEntry, ServiceError> {
        let id: EntryId = id.parse()?;
        let event = AuditEvent::new(
            "entry.deleted",
            caller,
            serde_json::json!({"entry_id": id.to_string()}),
        );
        Ok(self.store.delete_entry(&id, &event).await?)
    }

    /// Generates a join token; returns it with its secret, which is shown once.
    pub async fn generate_token(
        &self,
        ttl_secs: u64,
        caller: &str,
    ) -> Result<JoinToken, ServiceError> {
        let ttl = match ttl_secs {
            0 => self.join_token_ttl,
            s if s > 7 * 24 * 3600 => {
                return Err(invalid("ttl", "a join token may live at most 7 days"))
            }
            s => Duration::from_secs(s),
        };
        let token = JoinToken::generate(crate::unix_now(), ttl);
        let event = AuditEvent::new(
            "token.created",
            caller,
            serde_json::json!({"token_id": token.record.id, "expires_at": token.record.expires_at}),
        );
        self.store.create_join_token(&token.record, &event).await?;
        Ok(token)
    }

    /// Uses a join token (node attestation): single use, refused once expired.
    pub async fn consume_token(
        &self,
        secret: &str,
        caller: &str,
    ) -> Result<crate::store::JoinTokenRecord, ServiceError> {
        let hash = crate::token::hash_token(secret);
        let event = AuditEvent::new(
            "token.used",
            caller,
            serde_json::json!({"token_id": crate::token::token_id(&hash)}),
        );
        Ok(self
            .store
            .consume_join_token(&hash, crate::unix_now(), &event)
            .await?)
    }
}

fn entry_event(kind: &str, caller: &str, e: &RegistrationEntry) -> AuditEvent {
    AuditEvent::new(
        kind,
        caller,
        serde_json::json!({
            "entry_id": e.id.to_string(),
            "spiffe_id": e.spiffe_id.to_string(),
            "parent_id": e.parent_id.to_string(),
            "selectors": e.selectors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "revision": e.revision,
        }),
    )
}

/// Converts a wire entry into a spec.
pub fn spec_from_proto(e: admin::Entry) -> EntrySpec {
    EntrySpec {
        id: (!e.id.is_empty()).then_some(e.id),
        spiffe_id: e.spiffe_id,
        parent_id: e.parent_id,
        selectors: e.selectors,
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names,
        federates_with: e.federates_with,
        admin: e.admin,
        hint: e.hint,
    }
}

/// Converts an entry to the wire.
pub fn entry_to_proto(e: &RegistrationEntry) -> admin::Entry {
    let spec = EntrySpec::from(e);
    admin::Entry {
        id: e.id.to_string(),
        spiffe_id: spec.spiffe_id,
        parent_id: spec.parent_id,
        selectors: spec.selectors,
        x509_svid_ttl: spec.x509_svid_ttl,
        jwt_svid_ttl: spec.jwt_svid_ttl,
        dns_names: spec.dns_names,
        federates_with: spec.federates_with,
        admin: spec.admin,
        hint: spec.hint,
        created_at: e.created_at,
        updated_at: e.updated_at,
        revision: e.revision,
    }
}

/// The admin API over a [`Ca`]. Callers are identified by their Unix credentials for the
/// audit log; the socket's mode (0600) is what admits them.
#[derive(Debug, Clone)]
pub struct AdminService {
    ca: Ca,
}

impl AdminService {
    /// Wraps a CA.
    pub fn new(ca: Ca) -> Self {
        Self { ca }
    }

    /// The routes of every admin service.
    pub fn routes(self) -> tonic::service::Routes {
        tonic::service::Routes::new(admin::entries_server::EntriesServer::new(self.clone()))
            .add_service(admin::tokens_server::TokensServer::new(self.clone()))
            .add_service(admin::authority_server::AuthorityServer::new(self.clone()))
            .add_service(admin::audit_server::AuditServer::new(self))
    }
}

fn caller<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| format!("admin:uid={},pid={}", cred.uid(), cred.pid().unwrap_or(0)))
        .unwrap_or_else(|| "admin:unknown".to_owned())
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl admin::entries_server::Entries for AdminService {
    async fn create_entry(&self, req: Request<admin::CreateEntryRequest>) -> Rpc<admin::Entry> {
        let who = caller(&req);
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| invalid("entry", "is required"))?;
        let entry = self.ca.create_entry(&spec_from_proto(e), &who).await?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn list_entries(
        &self,
        req: Request<admin::ListEntriesRequest>,
    ) -> Rpc<admin::ListEntriesResponse> {
        let parent = req.into_inner().parent_id;
        let entries = if parent.is_empty() {
            self.ca.store.list_entries().await
        } else {
            self.ca.store.list_entries_by_parent(&parent).await
        }
        .map_err(ServiceError::from)?;
        Ok(Response::new(admin::ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    async fn get_entry(&self, req: Request<admin::GetEntryRequest>) -> Rpc<admin::Entry> {
        let id: EntryId = req.into_inner().id.parse().map_err(ServiceError::from)?;
        let entry = self
            .ca
            .store
            .get_entry(&id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::from(StoreError::NotFound(format!("entry {id}"))))?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn update_entry(&self, req: Request<admin::UpdateEntryRequest>) -> Rpc<admin::Entry> {
        let who = caller(&req);
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| invalid("entry", "is required"))?;
        let revision = e.revision;
        let entry = self
            .ca
            .update_entry(&spec_from_proto(e), revision, &who)
            .await?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn delete_entry(&self, req: Request<admin::DeleteEntryRequest>) -> Rpc<admin::Entry> {
        let who = caller(&req);
        let entry = self.ca.delete_entry(&req.into_inner().id, &who).await?;
        Ok(Response::new(entry_to_proto(&entry)))
    }
}

#[tonic::async_trait]
impl admin::tokens_server::Tokens for AdminService {
    async fn generate_token(
        &self,
        req: Request<admin::GenerateTokenRequest>,
    ) -> Rpc<admin::GenerateTokenResponse> {
        let who = caller(&req);
        let token = self.ca.generate_token(req.into_inner().ttl, &who).await?;
        Ok(Response::new(admin::GenerateTokenResponse {
            token: token.secret().to_owned(),
            id: token.record.id.clone(),
            expires_at: token.record.expires_at,
        }))
    }
}

fn key_kind(k: CaKeyKind) -> &'static str {
    match k {
        CaKeyKind::X509Root => "x509_root",
        CaKeyKind::X509Intermediate => "x509_intermediate",
        CaKeyKind::Jwt => "jwt",
    }
}

fn key_state(s: CaKeyState) -> &'static str {
    match s {
        CaKeyState::Prepared => "prepared",
        CaKeyState::Active => "active",
        CaKeyState::Retired => "retired",
    }
}

#[tonic::async_trait]
impl admin::authority_server::Authority for AdminService {
    async fn get_bundle(&self, _req: Request<admin::GetBundleRequest>) -> Rpc<admin::Bundle> {
        let bundle = self.ca.authority.bundle();
        Ok(Response::new(admin::Bundle {
            trust_domain: bundle.trust_domain.to_string(),
            pem: bundle.to_pem(),
            spiffe_json: bundle.to_spiffe_json().to_string(),
            sequence: bundle.sequence,
        }))
    }

    async fn status(&self, _req: Request<admin::StatusRequest>) -> Rpc<admin::StatusResponse> {
        let entries = self
            .ca
            .store
            .list_entries()
            .await
            .map_err(ServiceError::from)?
            .len() as u64;
        Ok(Response::new(admin::StatusResponse {
            trust_domain: self.ca.authority.trust_domain().to_string(),
            server_id: self.ca.authority.server_id().to_owned(),
            datastore: self.ca.store.backend().to_owned(),
            keys: self
                .ca
                .authority
                .journal()
                .iter()
                .map(|k| admin::CaKey {
                    id: k.id.clone(),
                    kind: key_kind(k.kind).to_owned(),
                    state: key_state(k.state).to_owned(),
                    server_id: k.server_id.clone(),
                    not_before: k.not_before,
                    not_after: k.not_after,
                })
                .collect(),
            entries,
        }))
    }

    async fn mint_x509_svid(
        &self,
        req: Request<admin::MintX509SvidRequest>,
    ) -> Rpc<admin::MintX509SvidResponse> {
        let who = caller(&req);
        let r = req.into_inner();
        let svid = self
            .ca
            .mint_x509(&r.spiffe_id, &r.csr, r.ttl, &r.dns_names, &who)
            .await?;
        let bundle = self.ca.authority.bundle();
        Ok(Response::new(admin::MintX509SvidResponse {
            chain: svid.chain.iter().map(|c| c.to_vec()).collect(),
            bundle: bundle.x509_authorities.iter().map(|c| c.to_vec()).collect(),
            serial: svid.serial,
            not_after: svid.not_after,
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<admin::MintJwtSvidRequest>,
    ) -> Rpc<admin::MintJwtSvidResponse> {
        let who = caller(&req);
        let r = req.into_inner();
        let (token, expires_at) = self
            .ca
            .mint_jwt(&r.spiffe_id, &r.audience, r.ttl, &who)
            .await?;
        Ok(Response::new(admin::MintJwtSvidResponse {
            token,
            expires_at,
        }))
    }
}

#[tonic::async_trait]
impl admin::audit_server::Audit for AdminService {
    async fn verify(
        &self,
        _req: Request<admin::VerifyAuditRequest>,
    ) -> Rpc<admin::VerifyAuditResponse> {
        match audit::verify_store(self.ca.store.as_ref()).await {
            Ok(records) => Ok(Response::new(admin::VerifyAuditResponse {
                ok: true,
                records,
                first_bad_seq: 0,
                reason: String::new(),
            })),
            Err(audit::VerifyError::Violation(v)) => {
                Ok(Response::new(admin::VerifyAuditResponse {
                    ok: false,
                    records: 0,
                    first_bad_seq: v.seq,
                    reason: v.to_string(),
                }))
            }
            Err(e) => Err(ServiceError::from(e).into()),
        }
    }
}
