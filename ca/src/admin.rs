//! The admin API (`meshid.admin.v1`), served to operators on the CA's Unix socket: a thin
//! gRPC wrapper over [`Ca`], as the node API ([`crate::node`]) is for agents. Each call is
//! converted from its protobuf form, carried out by [`Ca`] (which validates, audits and
//! publishes), and converted back; errors reach the wire through `From<ServiceError> for
//! tonic::Status`.

use meshid_api::admin;
use tonic::{Request, Response, Status};

use crate::entry::{EntryId, EntrySpec, RegistrationEntry};
use crate::service::{invalid, Ca, ServiceError};
use crate::store::{AgentRecord, CaKeyKind, CaKeyState, DeliveryRecord, StoreError};

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

/// Converts a spec to the wire (what a client asks for).
pub fn spec_to_proto(spec: &EntrySpec) -> admin::Entry {
    admin::Entry {
        id: spec.id.clone().unwrap_or_default(),
        spiffe_id: spec.spiffe_id.clone(),
        parent_id: spec.parent_id.clone(),
        selectors: spec.selectors.clone(),
        x509_svid_ttl: spec.x509_svid_ttl,
        jwt_svid_ttl: spec.jwt_svid_ttl,
        dns_names: spec.dns_names.clone(),
        federates_with: spec.federates_with.clone(),
        admin: spec.admin,
        hint: spec.hint.clone(),
        ..Default::default()
    }
}

/// Converts an entry to the wire.
pub fn entry_to_proto(e: &RegistrationEntry) -> admin::Entry {
    admin::Entry {
        created_at: e.created_at,
        updated_at: e.updated_at,
        revision: e.revision,
        owner: e.owner.clone(),
        ..spec_to_proto(&EntrySpec::from(e))
    }
}

/// The admin API over a [`Ca`]. Callers are identified by their Unix credentials for the
/// audit log; the socket's mode (0600) is what admits them.
#[derive(Debug, Clone)]
pub struct AdminService {
    ca: Ca,
    console: Option<std::sync::Arc<crate::console::Console>>,
}

impl AdminService {
    /// Wraps a CA.
    pub fn new(ca: Ca) -> Self {
        Self { ca, console: None }
    }

    /// With the web console whose login tokens `Console.CreateLoginToken` mints.
    pub fn with_console(
        mut self,
        console: Option<std::sync::Arc<crate::console::Console>>,
    ) -> Self {
        self.console = console;
        self
    }

    /// The routes of every admin service.
    pub fn routes(self) -> tonic::service::Routes {
        tonic::service::Routes::new(admin::entries_server::EntriesServer::new(self.clone()))
            .add_service(admin::tokens_server::TokensServer::new(self.clone()))
            .add_service(admin::authority_server::AuthorityServer::new(self.clone()))
            .add_service(admin::agents_server::AgentsServer::new(self.clone()))
            .add_service(admin::audit_server::AuditServer::new(self.clone()))
            .add_service(admin::policy_server::PolicyServer::new(self.clone()))
            .add_service(
                admin::mesh_server::MeshServer::new(self.clone())
                    .max_decoding_message_size(crate::mesh::MAX_MESH_MESSAGE)
                    .max_encoding_message_size(crate::mesh::MAX_MESH_MESSAGE),
            )
            .add_service(admin::console_server::ConsoleServer::new(self.clone()))
            .add_service(admin::federation_server::FederationServer::new(self))
    }

    /// Every agent, and every delivery report.
    async fn agents_and_deliveries(
        &self,
    ) -> Result<(Vec<AgentRecord>, Vec<DeliveryRecord>), ServiceError> {
        let agents = self.ca.store.list_agents().await?;
        let deliveries = self.ca.store.list_deliveries().await?;
        Ok((agents, deliveries))
    }
}

fn revocation_to_proto(r: &crate::store::RevocationRecord) -> admin::Revocation {
    admin::Revocation {
        serial: r.serial.clone(),
        issuer_id: r.issuer_id.clone(),
        spiffe_id: r.spiffe_id.clone(),
        kind: r.kind.clone(),
        not_after: r.not_after,
        revoked_at: r.revoked_at,
        reason: r.reason.clone(),
        actor: r.actor.clone(),
    }
}

fn key_to_proto(k: &crate::store::CaKeyRecord) -> admin::CaKey {
    admin::CaKey {
        id: k.id.clone(),
        kind: CaKeyKind::as_str(k.kind).to_owned(),
        state: CaKeyState::as_str(k.state).to_owned(),
        server_id: k.server_id.clone(),
        not_before: k.not_before,
        not_after: k.not_after,
        tainted_at: k.tainted_at,
    }
}

impl AdminService {
    /// The root rotation's status on the wire, with what the step just did.
    async fn root_status_with(&self, done: String) -> Rpc<admin::RootStatus> {
        let s = self.ca.root_status().await?;
        Ok(Response::new(admin::RootStatus {
            phase: s.phase.as_str().to_owned(),
            roots: s
                .roots
                .iter()
                .map(|r| admin::RootInfo {
                    id: r.id.clone(),
                    state: r.state.as_str().to_owned(),
                    not_before: r.not_before,
                    not_after: r.not_after,
                    created_at: r.created_at,
                    state_changed_at: r.state_changed_at,
                    cross_signed: s.cross_signed.contains(&r.id),
                    operator_supplied: !r.key_path.is_empty(),
                })
                .collect(),
            prepared_root_id: s.prepared.map(|p| p.id).unwrap_or_default(),
            target_sequence: s.target_sequence,
            bundle_sequence: s.bundle_sequence,
            agents_live: u32::try_from(s.live_agents).unwrap_or(u32::MAX),
            agents_acknowledged: u32::try_from(s.acknowledged).unwrap_or(u32::MAX),
            lagging: s
                .lagging
                .iter()
                .map(|a| admin::AgentDelivery {
                    spiffe_id: a.agent.to_string(),
                    delivered_sequence: a.delivered,
                    reported_at: a.reported_at,
                    server_id: a.server_id.clone(),
                    x509_streams: a.x509_streams,
                })
                .collect(),
            servers: s
                .servers
                .iter()
                .map(|i| admin::ServerIssuer {
                    server_id: i.server_id.clone(),
                    intermediate_id: i.intermediate_id.clone(),
                    root_id: i.root_id.clone(),
                })
                .collect(),
            retire_blockers: s.retire.blockers,
            unexpired_under_superseded: s.retire.unexpired,
            last_expiry_under_superseded: s.retire.last_expiry,
            done,
        }))
    }
}

fn caller<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<meshid_api::uds::UdsPeer>()
        .and_then(|peer| peer.info.peer_cred)
        .map(|cred| format!("admin:uid={},pid={}", cred.uid(), cred.pid().unwrap_or(0)))
        .unwrap_or_else(|| "admin:unknown".to_owned())
}

type Rpc<T> = Result<Response<T>, Status>;

/// Counts admin calls that change nothing (List*, Get*, Show, History, Status, Verify) by
/// caller and method, for the audit log's periodic `audit.summary` record: a read leaves a
/// trace without a record per call.
#[derive(Debug, Clone)]
pub struct CountReads<S> {
    inner: S,
    counts: std::sync::Arc<crate::audit::summary::Counts>,
}

impl<S> CountReads<S> {
    /// Wraps the admin routes.
    pub fn new(inner: S, counts: std::sync::Arc<crate::audit::summary::Counts>) -> Self {
        Self { inner, counts }
    }
}

/// Whether the gRPC method at `path` (`/package.Service/Method`) only reads.
pub fn is_read(path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or("");
    ["List", "Get", "Show", "History", "Status", "Verify"]
        .iter()
        .any(|p| method.starts_with(p))
}

impl<S, B> tower::Service<http::Request<B>> for CountReads<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_read(req.uri().path()) {
            let who = req
                .extensions()
                .get::<meshid_api::uds::UdsPeer>()
                .and_then(|peer| peer.info.peer_cred)
                .map(|cred| format!("admin:uid={}", cred.uid()))
                .unwrap_or_else(|| "admin:unknown".to_owned());
            self.counts.add(
                crate::audit::summary::Kind::AdminRead,
                &who,
                req.uri().path(),
            );
        }
        self.inner.call(req)
    }
}

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
        // A parent that is not a (canonical) SPIFFE ID has no entries.
        let entries = if parent.is_empty() {
            self.ca.store.list_entries().await
        } else if let Ok(parent) = meshid_api::id::parse(&parent) {
            self.ca.store.list_entries_by_parent(&parent).await
        } else {
            Ok(Vec::new())
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

    async fn rotate_entry(&self, req: Request<admin::RotateEntryRequest>) -> Rpc<admin::Entry> {
        let who = caller(&req);
        let r = req.into_inner();
        let entry = self.ca.rotate_entry(&r.id, &r.reason, &who).await?;
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

/// Where a browser reaches a console bound to `addr`: this host's name for a wildcard address
/// (`0.0.0.0`, `[::]`), the address itself otherwise.
fn reachable(addr: std::net::SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .map_or_else(|| addr.to_string(), |h| format!("{h}:{}", addr.port()))
}

#[tonic::async_trait]
impl admin::console_server::Console for AdminService {
    async fn create_login_token(
        &self,
        req: Request<admin::ConsoleLoginTokenRequest>,
    ) -> Rpc<admin::ConsoleLoginToken> {
        let who = caller(&req);
        let Some(console) = &self.console else {
            return Err(Status::failed_precondition(
                "the console is off: set [console] address in the CA's configuration",
            ));
        };
        let ttl = req.into_inner().ttl;
        let ttl = (ttl > 0).then(|| std::time::Duration::from_secs(ttl));
        if ttl.is_some_and(|t| t > std::time::Duration::from_secs(24 * 3600)) {
            return Err(Status::invalid_argument("a login token lives at most 24h"));
        }
        let now = crate::unix_now();
        let (token, expires_at) = console.access.mint_token(now, ttl, &who);
        let event = crate::audit::AuditEvent::new(
            "console.token.created",
            &who,
            serde_json::json!({ "expires_at": expires_at }),
        );
        self.ca
            .store
            .append_audit(&event)
            .await
            .map_err(ServiceError::from)?;
        tracing::info!(caller = %who, expires_at, "console login token created");
        let scheme = if console.https { "https" } else { "http" };
        Ok(Response::new(admin::ConsoleLoginToken {
            token: token.to_string(),
            expires_at,
            address: format!("{scheme}://{}", reachable(console.address)),
            session_ttl: console.access.session_ttl().as_secs(),
        }))
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
        let bundle_sequence = self.ca.authority.bundle().sequence;
        let (agents, deliveries) = self.agents_and_deliveries().await?;
        let live: Vec<&AgentRecord> = agents.iter().filter(|a| !a.banned).collect();
        let delivered = live
            .iter()
            .filter(|a| {
                latest_delivery(&a.spiffe_id, &deliveries)
                    .is_some_and(|d| d.bundle_sequence >= bundle_sequence)
            })
            .count();
        Ok(Response::new(admin::StatusResponse {
            trust_domain: self.ca.authority.trust_domain().to_string(),
            server_id: self.ca.authority.server_id().to_owned(),
            datastore: self.ca.store.backend().to_owned(),
            keys: self
                .ca
                .authority
                .journal()
                .iter()
                .map(key_to_proto)
                .collect(),
            entries,
            bundle_sequence,
            agents_delivered: u32::try_from(delivered).unwrap_or(u32::MAX),
            agents_live: u32::try_from(live.len()).unwrap_or(u32::MAX),
            taints: self
                .ca
                .authority
                .taint_progress()
                .await
                .map_err(ServiceError::from)?
                .into_iter()
                .map(|p| admin::TaintProgress {
                    key_id: p.key_id,
                    tainted_at: p.tainted_at,
                    remaining: p.remaining,
                    remaining_until: p.remaining_until,
                    replaced: p.replaced,
                    cleared_after_s: p.cleared_after_s.unwrap_or(-1),
                })
                .collect(),
        }))
    }

    async fn taint_key(&self, req: Request<admin::TaintKeyRequest>) -> Rpc<admin::CaKey> {
        let who = caller(&req);
        let r = req.into_inner();
        let rec = self.ca.taint_key(&r.key_id, &who, &r.reason).await?;
        let mut key = key_to_proto(&rec);
        key.tainted_at = crate::unix_now();
        Ok(Response::new(key))
    }

    async fn revoke_svid(
        &self,
        req: Request<admin::RevokeSvidRequest>,
    ) -> Rpc<admin::RevokeSvidResponse> {
        use crate::authority::revoke::RevokeTarget;
        let who = caller(&req);
        let r = req.into_inner();
        let given = [&r.serial, &r.spiffe_id, &r.key_id]
            .iter()
            .filter(|s| !s.is_empty())
            .count();
        if given != 1 {
            return Err(Status::invalid_argument(
                "give exactly one of serial, spiffe_id and key_id",
            ));
        }
        let target = if !r.serial.is_empty() {
            RevokeTarget::Serial(r.serial)
        } else if !r.spiffe_id.is_empty() {
            RevokeTarget::SpiffeId(r.spiffe_id)
        } else {
            RevokeTarget::Key(r.key_id)
        };
        let out = self.ca.revoke(target, &who, &r.reason).await?;
        Ok(Response::new(admin::RevokeSvidResponse {
            revoked: out.revoked.iter().map(revocation_to_proto).collect(),
            already_revoked: u32::try_from(out.already).unwrap_or(u32::MAX),
        }))
    }

    async fn list_revocations(
        &self,
        _req: Request<admin::ListRevocationsRequest>,
    ) -> Rpc<admin::ListRevocationsResponse> {
        let revocations = self
            .ca
            .store
            .list_revocations(crate::unix_now())
            .await
            .map_err(crate::service::ServiceError::from)?;
        let crls = self.ca.authority.crls();
        Ok(Response::new(admin::ListRevocationsResponse {
            revocations: revocations.iter().map(revocation_to_proto).collect(),
            crls: crls
                .records
                .iter()
                .map(|c| admin::Crl {
                    issuer_id: c.issuer_id.clone(),
                    number: c.number,
                    this_update: c.this_update,
                    entries: u32::try_from(c.entries).unwrap_or(u32::MAX),
                    der: c.der.clone(),
                })
                .collect(),
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

    async fn prepare_root(
        &self,
        req: Request<admin::PrepareRootRequest>,
    ) -> Rpc<admin::RootStatus> {
        let who = caller(&req);
        let r = req.into_inner();
        let upstream = match (r.upstream_cert.is_empty(), r.upstream_key.is_empty()) {
            (true, true) => None,
            (false, false) => Some((r.upstream_cert.into(), r.upstream_key.into())),
            _ => {
                return Err(invalid(
                    "upstream_cert",
                    "upstream_cert and upstream_key go together",
                )
                .into())
            }
        };
        let rec = self.ca.root_prepare(upstream, &who, &r.reason).await?;
        self.root_status_with(format!(
            "prepared root {} (bundle sequence {})",
            rec.id, rec.created_at
        ))
        .await
    }

    async fn activate_root(
        &self,
        req: Request<admin::ActivateRootRequest>,
    ) -> Rpc<admin::RootStatus> {
        let who = caller(&req);
        let r = req.into_inner();
        let a = self.ca.root_activate(&who, &r.reason, r.force).await?;
        let mut done = format!("activated root {}", a.root_id);
        if !a.superseded.is_empty() {
            done.push_str(&format!(", superseding {}", a.superseded.join(", ")));
        }
        if a.forced {
            done.push_str(&format!(
                "; FORCED past {} agent(s) that had not acknowledged: {}",
                a.lagging.len(),
                a.lagging.join(", ")
            ));
        }
        if let Some(s) = a.acknowledged_within_s {
            done.push_str(&format!("; agents acknowledged within {s} s of prepare"));
        }
        self.root_status_with(done).await
    }

    async fn retire_root(&self, req: Request<admin::RetireRootRequest>) -> Rpc<admin::RootStatus> {
        let who = caller(&req);
        let r = req.into_inner();
        let retired = self.ca.root_retire(&who, &r.reason).await?;
        self.root_status_with(format!("retired root {}", retired.join(", ")))
            .await
    }

    async fn get_root_status(
        &self,
        _req: Request<admin::RootStatusRequest>,
    ) -> Rpc<admin::RootStatus> {
        self.root_status_with(String::new()).await
    }
}

#[tonic::async_trait]
impl admin::audit_server::Audit for AdminService {
    async fn verify(
        &self,
        _req: Request<admin::VerifyAuditRequest>,
    ) -> Rpc<admin::VerifyAuditResponse> {
        match crate::store::verify_audit(self.ca.store.as_ref()).await {
            Ok(records) => Ok(Response::new(admin::VerifyAuditResponse {
                ok: true,
                records,
                first_bad_seq: 0,
                reason: String::new(),
            })),
            Err(crate::store::AuditVerifyError::Violation(v)) => {
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

    async fn list(&self, req: Request<admin::ListAuditRequest>) -> Rpc<admin::ListAuditResponse> {
        /// Records read per request at most, matching or not: a narrow prefix over a long log
        /// is paged by the caller (`next_after_seq`).
        const SCAN: i64 = 20_000;
        const PAGE: i64 = 1000;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n => usize::try_from(n.min(1000)).unwrap_or(1000),
        };
        if r.after_seq < 0 {
            return Err(Status::invalid_argument("after_seq must not be negative"));
        }
        let mut after = r.after_seq;
        let mut scanned = 0;
        let mut records = Vec::new();
        while records.len() < limit && scanned < SCAN {
            let page = self
                .ca
                .store
                .audit_records(after, PAGE)
                .await
                .map_err(|e| Status::from(ServiceError::from(e)))?;
            let n = page.len() as i64;
            for rec in page {
                after = rec.seq;
                scanned += 1;
                if rec.kind.starts_with(&r.kind_prefix) {
                    records.push(admin::AuditRecord {
                        seq: rec.seq,
                        time: rec.time,
                        kind: rec.kind,
                        actor: rec.actor,
                        details: rec.details,
                        prev_hash: rec.prev_hash.to_vec(),
                        hash: rec.hash.to_vec(),
                    });
                    if records.len() == limit {
                        break;
                    }
                }
            }
            if n < PAGE {
                break;
            }
        }
        Ok(Response::new(admin::ListAuditResponse {
            records,
            next_after_seq: after,
        }))
    }
}

fn policy_change(c: crate::service::policy::PolicyChange) -> admin::PolicyChange {
    admin::PolicyChange {
        revision: c.revision,
        changed: c.changed,
        diff: c.diff,
        dry_run: c.dry_run,
    }
}

fn policy_revision(r: crate::store::PolicyRevision) -> admin::PolicyRevision {
    admin::PolicyRevision {
        revision: r.revision,
        created_at: r.created_at,
        author: r.author,
        reason: r.reason,
        action: r.action,
        subject: r.subject,
        documents: r
            .documents
            .into_iter()
            .map(|(name, text)| admin::PolicyDocument {
                owner: r.owners.get(&name).cloned().unwrap_or_default(),
                name,
                text,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl admin::federation_server::Federation for AdminService {
    async fn create(
        &self,
        req: Request<admin::CreateFederationRequest>,
    ) -> Rpc<admin::FederationRelationship> {
        let who = caller(&req);
        let r = req.into_inner();
        let spec = crate::service::federation::FederationSpec {
            trust_domain: r.trust_domain,
            endpoint_url: r.endpoint_url,
            profile: r.profile,
            endpoint_spiffe_id: r.endpoint_spiffe_id,
            bootstrap_bundle: r.bootstrap_bundle,
            reason: r.reason,
        };
        let view = self.ca.create_federation(spec, &who).await?;
        Ok(Response::new(federation_to_proto(&view)))
    }

    async fn list(
        &self,
        _req: Request<admin::ListFederationsRequest>,
    ) -> Rpc<admin::ListFederationsResponse> {
        let views = self.ca.list_federations().await?;
        Ok(Response::new(admin::ListFederationsResponse {
            relationships: views.iter().map(federation_to_proto).collect(),
        }))
    }

    async fn get(
        &self,
        req: Request<admin::GetFederationRequest>,
    ) -> Rpc<admin::FederationRelationship> {
        let view = self
            .ca
            .get_federation(&req.into_inner().trust_domain)
            .await?;
        Ok(Response::new(federation_to_proto(&view)))
    }

    async fn delete(
        &self,
        req: Request<admin::DeleteFederationRequest>,
    ) -> Rpc<admin::FederationRelationship> {
        let who = caller(&req);
        let r = req.into_inner();
        let record = self
            .ca
            .delete_federation(&r.trust_domain, &r.reason, &who)
            .await?;
        Ok(Response::new(federation_to_proto(
            &crate::service::federation::FederationView {
                record,
                bundle: None,
                bundle_updated_at: 0,
                status: Default::default(),
            },
        )))
    }
}

fn federation_to_proto(
    v: &crate::service::federation::FederationView,
) -> admin::FederationRelationship {
    let r = &v.record;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    admin::FederationRelationship {
        trust_domain: r.trust_domain.to_string(),
        endpoint_url: r.endpoint_url.clone(),
        profile: r.profile.clone(),
        endpoint_spiffe_id: r.endpoint_spiffe_id.clone(),
        owner: r.owner.clone(),
        created_at: r.created_at,
        bundle_sequence: v.bundle.as_ref().map_or(0, |b| b.sequence),
        bundle_updated_at: v.bundle_updated_at,
        x509_authorities: count(v.bundle.as_ref().map_or(0, |b| b.x509_authorities.len())),
        jwt_authorities: count(v.bundle.as_ref().map_or(0, |b| b.jwt_authorities.len())),
        refresh_hint: v.bundle.as_ref().map_or(0, |b| b.refresh_hint.as_secs()),
        last_attempt: v.status.last_attempt,
        last_success: v.status.last_success,
        last_error: v.status.last_error.clone(),
        next_attempt: v.status.next_attempt,
    }
}

#[tonic::async_trait]
impl admin::policy_server::Policy for AdminService {
    async fn apply(&self, req: Request<admin::ApplyPolicyRequest>) -> Rpc<admin::PolicyChange> {
        let who = caller(&req);
        let r = req.into_inner();
        let change = self
            .ca
            .apply_policy(&r.name, &r.text, &r.origin, &r.reason, &who, r.dry_run)
            .await?;
        Ok(Response::new(policy_change(change)))
    }

    async fn delete(&self, req: Request<admin::DeletePolicyRequest>) -> Rpc<admin::PolicyChange> {
        let who = caller(&req);
        let r = req.into_inner();
        let change = self
            .ca
            .delete_policy(&r.name, &r.reason, &who, r.dry_run)
            .await?;
        Ok(Response::new(policy_change(change)))
    }

    async fn rollback(
        &self,
        req: Request<admin::RollbackPolicyRequest>,
    ) -> Rpc<admin::PolicyChange> {
        let who = caller(&req);
        let r = req.into_inner();
        let change = self
            .ca
            .rollback_policy(r.revision, &r.reason, &who, r.dry_run)
            .await?;
        Ok(Response::new(policy_change(change)))
    }

    async fn show(&self, req: Request<admin::ShowPolicyRequest>) -> Rpc<admin::PolicyRevision> {
        let n = req.into_inner().revision;
        match self.ca.policy_revision((n > 0).then_some(n)).await? {
            Some(r) => Ok(Response::new(policy_revision(r))),
            None if n == 0 => Err(Status::not_found("no policy has been applied yet")),
            None => Err(Status::not_found(format!("policy revision {n} not found"))),
        }
    }

    async fn history(
        &self,
        _req: Request<admin::PolicyHistoryRequest>,
    ) -> Rpc<admin::PolicyHistory> {
        let revisions = self.ca.policy_history().await?;
        Ok(Response::new(admin::PolicyHistory {
            revisions: revisions.into_iter().map(policy_revision).collect(),
        }))
    }
}

fn mesh_request(r: admin::ApplyMeshRequest) -> crate::service::mesh::MeshRequest {
    use crate::service::mesh::{EntryDeclaration, LoadedPolicy, MeshRequest};
    let offset = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
    MeshRequest {
        owner: r.owner,
        entries: r
            .entries
            .into_iter()
            .map(|e| EntryDeclaration {
                spec: spec_from_proto(e.entry.unwrap_or_default()),
                at: e.origin,
            })
            .collect(),
        policies: r
            .policies
            .into_iter()
            .map(|p| LoadedPolicy {
                origin: if p.origin.is_empty() {
                    p.name.clone()
                } else {
                    p.origin
                },
                at: if p.declared_at.is_empty() {
                    p.name.clone()
                } else {
                    p.declared_at
                },
                name: p.name,
                text: p.text,
                line_offset: offset(p.line_offset),
                column_offset: offset(p.column_offset),
            })
            .collect(),
        federations: r
            .federations
            .into_iter()
            .map(|f| crate::service::mesh::DeclaredFederation {
                at: if f.declared_at.is_empty() {
                    f.trust_domain.clone()
                } else {
                    f.declared_at
                },
                trust_domain: f.trust_domain,
                endpoint_url: f.endpoint_url,
                profile: f.profile,
                endpoint_spiffe_id: f.endpoint_spiffe_id,
                bundle: if f.bootstrap_bundle.is_empty() {
                    crate::service::mesh::FederationBundle::None
                } else {
                    crate::service::mesh::FederationBundle::Text(f.bootstrap_bundle)
                },
            })
            .collect(),
        prune: r.prune,
        adopt: r.adopt,
        dry_run: r.dry_run,
        reason: r.reason,
    }
}

fn mesh_change(c: crate::service::mesh::MeshChange) -> admin::MeshChange {
    admin::MeshChange {
        kind: c.kind.as_str().to_owned(),
        action: c.action.as_str().to_owned(),
        id: c.id,
        spiffe_id: c.spiffe_id,
        parent_id: c.parent_id,
        selectors: c.selectors,
        fields: c.fields,
        diff: c.diff,
        declared_at: c.at,
    }
}

#[tonic::async_trait]
impl admin::mesh_server::Mesh for AdminService {
    async fn apply(&self, req: Request<admin::ApplyMeshRequest>) -> Rpc<admin::MeshPlan> {
        let who = caller(&req);
        let plan = self
            .ca
            .apply_mesh(mesh_request(req.into_inner()), &who)
            .await?;
        Ok(Response::new(admin::MeshPlan {
            changes: plan.changes.into_iter().map(mesh_change).collect(),
            applied: plan.applied,
            dry_run: plan.dry_run,
            policy_revision: plan.policy_revision,
            orphans: plan.orphans.into_iter().map(mesh_change).collect(),
            unchanged: u32::try_from(plan.unchanged).unwrap_or(u32::MAX),
        }))
    }
}

/// Converts an agent record to the wire.
pub fn agent_to_proto(a: &AgentRecord) -> admin::Agent {
    admin::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        created_at: a.created_at,
        banned: a.banned,
        ..Default::default()
    }
}

/// [`agent_to_proto`] with the agent's latest delivery report among `deliveries`.
fn agent_with_delivery(a: &AgentRecord, deliveries: &[DeliveryRecord]) -> admin::Agent {
    let mut out = agent_to_proto(a);
    if let Some(d) = latest_delivery(&a.spiffe_id, deliveries) {
        out.delivered_bundle_sequence = d.bundle_sequence;
        out.x509_streams = u32::try_from(d.x509_streams).unwrap_or(u32::MAX);
        out.delivery_reported_at = d.reported_at;
        out.delivery_server_id = d.server_id.clone();
        out.policy_revision = d.policy_revision;
    }
    out
}

/// An agent's most recent delivery report, to whichever CA server it reported.
fn latest_delivery<'d>(
    agent: &spiffe::SpiffeId,
    deliveries: &'d [DeliveryRecord],
) -> Option<&'d DeliveryRecord> {
    deliveries
        .iter()
        .filter(|d| d.agent == *agent)
        .max_by_key(|d| d.reported_at)
}

#[tonic::async_trait]
impl admin::agents_server::Agents for AdminService {
    async fn list_agents(
        &self,
        _req: Request<admin::ListAgentsRequest>,
    ) -> Rpc<admin::ListAgentsResponse> {
        let (agents, deliveries) = self.agents_and_deliveries().await?;
        Ok(Response::new(admin::ListAgentsResponse {
            agents: agents
                .iter()
                .map(|a| agent_with_delivery(a, &deliveries))
                .collect(),
        }))
    }

    async fn get_agent(&self, req: Request<admin::GetAgentRequest>) -> Rpc<admin::Agent> {
        let id = req.into_inner().spiffe_id;
        let agent = match meshid_api::id::parse(&id) {
            Ok(parsed) => self
                .ca
                .store
                .get_agent(&parsed)
                .await
                .map_err(ServiceError::from)?,
            Err(_) => None,
        }
        .ok_or_else(|| ServiceError::from(StoreError::NotFound(format!("agent {id}"))))?;
        let deliveries = self
            .ca
            .store
            .list_deliveries()
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(agent_with_delivery(&agent, &deliveries)))
    }

    async fn evict_agent(&self, req: Request<admin::EvictAgentRequest>) -> Rpc<admin::Agent> {
        let who = caller(&req);
        let agent = self
            .ca
            .evict_agent(&req.into_inner().spiffe_id, &who)
            .await?;
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn ban_agent(&self, req: Request<admin::BanAgentRequest>) -> Rpc<admin::Agent> {
        let who = caller(&req);
        let agent = self.ca.ban_agent(&req.into_inner().spiffe_id, &who).await?;
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn rotate_agent(
        &self,
        req: Request<admin::RotateAgentRequest>,
    ) -> Rpc<admin::RotateAgentResponse> {
        let who = caller(&req);
        let r = req.into_inner();
        let (agent, entries) = self.ca.rotate_agent(&r.spiffe_id, &r.reason, &who).await?;
        Ok(Response::new(admin::RotateAgentResponse {
            agent: Some(agent_to_proto(&agent)),
            entries: u32::try_from(entries).unwrap_or(u32::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::reachable;

    #[test]
    fn a_wildcard_console_address_is_named_by_this_host() {
        assert_eq!(
            reachable("198.18.0.1:8480".parse().unwrap()),
            "198.18.0.1:8480"
        );
        assert_eq!(reachable("[::1]:8480".parse().unwrap()), "[::1]:8480");
        for wildcard in ["0.0.0.0:8480", "[::]:8480"] {
            let named = reachable(wildcard.parse().unwrap());
            assert!(named.ends_with(":8480"), "{named}");
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            if !host.trim().is_empty() {
                assert_eq!(named, format!("{}:8480", host.trim()));
            }
        }
    }
}
