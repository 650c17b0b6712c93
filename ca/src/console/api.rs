//! The console's HTTP routes: the page and its assets, the JSON the pages read, login, and
//! the change events. Every response goes through `guard`: the access check for `/api/`
//! (all but login) and the security headers for all.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::access::{self, Admission, Peer};
use super::assets;
use super::state::{Console, EntryRow, EVENT_INTERVAL};

type Shared = Arc<Console>;

/// How long a login's body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An error answered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, what, "console: cannot answer");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot read {what}: {e}"),
    )
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The console's routes, served until `stop` (which also ends the event streams).
pub fn router(console: Shared, stop: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .route("/api/overview", get(overview))
        .route("/api/agents", get(agents))
        .route("/api/identities", get(identities))
        .route("/api/policy", get(policy))
        .route("/api/policy/explain", get(explain))
        .route("/api/activity", get(activity))
        .route("/api/compliance", get(compliance))
        .route("/api/events", get(events))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/session", get(session))
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&console),
            guard,
        ))
        .layer(axum::Extension(stop))
        .with_state(console)
}

/// Refuses `/api/` (login aside) to callers [`access::Access::admit`] refuses, logging the
/// reason at most once a second; adds the security headers to every response.
async fn guard(State(c): State<Shared>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let path = path.as_str();
    let api = path.starts_with("/api/");
    if api && path != "/api/login" {
        let session = req
            .headers()
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| access::cookie(h, access::cookie_name(c.https)));
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        let admission = match req.extensions().get::<Peer>() {
            Some(peer) => {
                let revoked = peer
                    .client_serial
                    .as_ref()
                    .is_some_and(|s| c.ca.authority.crls().serials.contains(s));
                match c.access.admit(peer, session, crate::unix_now(), revoked) {
                    // A page elsewhere that rebinds its own name to 127.0.0.1 reaches this
                    // console from the operator's browser with that name in Host.
                    Admission::Loopback if !loopback_host(host) => {
                        Admission::Refused("a loopback caller naming another host (DNS rebinding?)")
                    }
                    a => a,
                }
            }
            None => Admission::Refused("no connection information"),
        };
        if let Admission::Refused(reason) = admission {
            let peer = req.extensions().get::<Peer>().map(|p| p.addr.to_string());
            static REFUSED: std::sync::OnceLock<meshid_api::uds::admission::RateLimitedLog> =
                std::sync::OnceLock::new();
            REFUSED.get_or_init(Default::default).info(|held| {
                tracing::warn!(peer = ?peer, path = %path, reason, held_back = held, "console: request refused");
            });
            let mut resp = ApiError(
                StatusCode::UNAUTHORIZED,
                format!("not authorized: {reason}"),
            )
            .into_response();
            assets::secure(resp.headers_mut(), true, c.https);
            return resp;
        }
        req.extensions_mut().insert(admission);
    }
    let mut resp = next.run(req).await;
    assets::secure(resp.headers_mut(), api, c.https);
    resp
}

/// Whether the `Host` header names this host's loopback: `localhost`, `127.0.0.1` (any of
/// 127/8) or `[::1]`, with or without a port.
pub fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn page(asset: assets::Asset) -> Response {
    let mut resp = asset.body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    resp
}

async fn index() -> Response {
    page(assets::INDEX)
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match assets::get(&file) {
        Some(a) => page(a),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn fallback(method: Method, uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/api/") || uri.path().starts_with("/assets/") {
        return ApiError(
            StatusCode::NOT_FOUND,
            format!("no such resource: {}", uri.path()),
        )
        .into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    page(assets::INDEX)
}

async fn overview(State(c): State<Shared>) -> Result<Json<Value>, ApiError> {
    let keys =
        c.ca.store
            .list_ca_keys()
            .await
            .map_err(|e| internal("the CA keys", e))?;
    let root =
        c.ca.root_status()
            .await
            .map_err(|e| internal("the root status", e))?;
    let taints =
        c.ca.authority
            .taint_progress()
            .await
            .map_err(|e| internal("the taint progress", e))?;
    let now = crate::unix_now();
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({
                "id": k.id, "kind": k.kind.as_str(), "state": k.state.as_str(),
                "not_before": k.not_before, "not_after": k.not_after, "tainted_at": k.tainted_at,
                "parent": k.parent_id, "server_id": k.server_id,
            })
        })
        .collect();
    let taints: Vec<Value> = taints
        .iter()
        .map(|t| {
            json!({
                "key_id": t.key_id, "kind": t.kind.as_str(), "tainted_at": t.tainted_at,
                "remaining": t.remaining, "remaining_until": t.remaining_until,
                "replaced": t.replaced, "cleared_after_s": t.cleared_after_s,
            })
        })
        .collect();
    let detail = match (&root.prepared, root.phase) {
        (Some(p), _) => format!(
            "root {} prepared: {} of {} live agents delivered bundle {}",
            p.id, root.acknowledged, root.live_agents, root.target_sequence
        ),
        (None, crate::authority::root::RootPhase::Activated) => format!(
            "new root active; superseded roots {}",
            if root.retire.blockers.is_empty() {
                "can be retired"
            } else {
                "still needed"
            }
        ),
        _ => format!(
            "{} of {} live agents deliver bundle {}",
            root.acknowledged, root.live_agents, root.target_sequence
        ),
    };
    let lagging: Vec<Value> = root
        .lagging
        .iter()
        .map(|a| json!({"agent": a.agent.to_string(), "delivered": a.delivered, "reported_at": a.reported_at}))
        .collect();
    Ok(Json(json!({
        "trust_domain": c.ca.authority.trust_domain().to_string(),
        "server_id": c.ca.authority.server_id(),
        "now": now,
        "bundle_sequence": root.bundle_sequence,
        "policy_revision": c.ca.policy_in_force().map(|p| p.revision),
        "entries": c.entries.load().len(),
        "agents": {
            "total": root.live_agents,
            "current": root.acknowledged,
            "behind": root.live_agents.saturating_sub(root.acknowledged),
        },
        "keys": keys,
        "rotation": { "phase": root.phase.as_str(), "detail": detail, "lagging": lagging },
        "taints": taints,
    })))
}

async fn agents(State(c): State<Shared>) -> Result<Json<Value>, ApiError> {
    let agents =
        c.ca.store
            .list_agents()
            .await
            .map_err(|e| internal("the agents", e))?;
    let deliveries =
        c.ca.store
            .list_deliveries()
            .await
            .map_err(|e| internal("the deliveries", e))?;
    let sequence = c.ca.authority.bundle().sequence;
    let now = crate::unix_now();
    let svids = c
        .view
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .svids_per_agent(now);
    // An agent reports to each CA server it talks to: its latest report counts.
    let mut latest: HashMap<String, &crate::store::DeliveryRecord> = HashMap::new();
    for d in &deliveries {
        let slot = latest.entry(d.agent.to_string()).or_insert(d);
        if d.reported_at > slot.reported_at {
            *slot = d;
        }
    }
    let rows: Vec<Value> = agents
        .iter()
        .map(|a| {
            let id = a.spiffe_id.to_string();
            let d = latest.get(&id);
            json!({
                "spiffe_id": id,
                "attestation_type": a.attestation_type,
                "serial": a.serial,
                "expires_at": a.expires_at,
                "created_at": a.created_at,
                "banned": a.banned,
                "last_seen": d.map(|d| d.reported_at),
                "bundle_sequence": d.map(|d| d.bundle_sequence),
                "bundle_behind": d.map(|d| sequence.saturating_sub(d.bundle_sequence)),
                "policy_revision": d.map(|d| d.policy_revision),
                "x509_streams": d.map_or(0, |d| d.x509_streams),
                "svids": svids.get(id.as_str()).copied().unwrap_or(0),
            })
        })
        .collect();
    Ok(Json(json!({ "agents": rows })))
}

/// `?q=&page=&per_page=` of the identities page.
#[derive(Debug, Deserialize)]
pub struct IdentityQuery {
    /// Text to find in the SPIFFE ID, parent, selectors or entry id (case-insensitive).
    #[serde(default)]
    q: String,
    /// From 1.
    page: Option<usize>,
    /// At most 200 (default 50).
    per_page: Option<usize>,
}

async fn identities(
    State(c): State<Shared>,
    Query(q): Query<IdentityQuery>,
) -> Result<Json<Value>, ApiError> {
    let per_page = q.per_page.unwrap_or(50);
    if !(1..=200).contains(&per_page) {
        return Err(bad("per_page must be between 1 and 200"));
    }
    if q.q.len() > 512 {
        return Err(bad("q is longer than 512 bytes"));
    }
    let page = q.page.unwrap_or(1).max(1);
    let needle = q.q.trim().to_lowercase();
    let rows = c.entries.load();
    let matching: Vec<&EntryRow> = rows
        .iter()
        .filter(|r| needle.is_empty() || r.haystack.contains(&needle))
        .collect();
    // The journal the authority holds (kept current by this server's taints and, through the
    // change feed, its peers'): no datastore read per page.
    let tainted: BTreeSet<String> =
        c.ca.authority
            .journal()
            .into_iter()
            .filter(|k| k.tainted_at > 0)
            .map(|k| k.id)
            .collect();
    let view = c.view.read().unwrap_or_else(|p| p.into_inner());
    let items: Vec<Value> = matching
        .iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .map(|r| {
            let e = &r.entry;
            let id = e.id.to_string();
            let svid = view.latest(&id).map(|l| {
                json!({
                    "serial": l.serial, "issued_at": l.issued_at, "not_after": l.not_after,
                    "issuer": l.issuer, "tainted": tainted.contains(&l.issuer),
                })
            });
            json!({
                "entry_id": id,
                "spiffe_id": e.spiffe_id.to_string(),
                "parent_id": e.parent_id.to_string(),
                "selectors": e.selectors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "admin": e.admin,
                "dns_names": e.dns_names,
                "x509_ttl_s": e.x509_svid_ttl.map(|d| d.as_secs()),
                "svid": svid,
                "last_rotation": view.rotated(&id),
            })
        })
        .collect();
    Ok(Json(json!({
        "total": matching.len(), "page": page, "per_page": per_page, "items": items,
    })))
}

/// The central policy in force, merged from its documents.
fn policy_in_force(c: &Console) -> Result<(u64, Vec<String>, meshid_policy::Policy), ApiError> {
    let Some(revision) = c.ca.policy_in_force() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "no central policy has been applied".into(),
        ));
    };
    let merged = crate::service::policy::merge_set(&revision.documents, None)
        .map_err(|e| internal("the central policy", e))?;
    Ok((
        revision.revision,
        revision.documents.keys().cloned().collect(),
        merged,
    ))
}

async fn policy(State(c): State<Shared>) -> Result<Json<Value>, ApiError> {
    let (revision, documents, policy) = match policy_in_force(&c) {
        Ok(p) => p,
        Err(ApiError(StatusCode::NOT_FOUND, _)) => {
            return Ok(Json(json!({
                "revision": null, "policy": null, "default": "deny", "mode": "enforce",
                "documents": [], "rules": [], "graph": {"nodes": [], "edges": []},
            })))
        }
        Err(e) => return Err(e),
    };
    let summaries = policy.summaries();
    let mut nodes = BTreeSet::new();
    let mut edges = Vec::new();
    let rules: Vec<Value> = summaries
        .iter()
        .map(|r| {
            for from in &r.from {
                nodes.insert(from.clone());
                for to in &r.to {
                    nodes.insert(to.clone());
                    edges.push(json!({"from": from, "to": to, "rule": &*r.rule.name, "action": r.action.as_str()}));
                }
            }
            json!({
                "name": &*r.rule.name, "line": r.rule.line, "action": r.action.as_str(),
                "mode": r.mode.as_str(), "from": r.from, "to": r.to, "ports": r.ports, "http": r.http,
            })
        })
        .collect();
    let nodes: Vec<Value> = nodes.into_iter().map(|id| json!({ "id": id })).collect();
    Ok(Json(json!({
        "revision": revision, "policy": policy.name(), "default": policy.default_action().as_str(),
        "mode": policy.mode().as_str(), "documents": documents, "rules": rules,
        "graph": { "nodes": nodes, "edges": edges },
    })))
}

/// `?from=&to=&port=&method=&path=&upgrade=` of the explain form.
#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    from: String,
    to: String,
    port: Option<String>,
    method: Option<String>,
    path: Option<String>,
    upgrade: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

async fn explain(
    State(c): State<Shared>,
    Query(q): Query<ExplainQuery>,
) -> Result<Json<Value>, ApiError> {
    let id = |what: &str, s: &str| {
        spiffe::SpiffeId::new(s.trim())
            .map_err(|e| bad(format!("{what}: {:?} is not a SPIFFE ID: {e}", s)))
    };
    let from = id("from", &q.from)?;
    let to = id("to", &q.to)?;
    let port = match nonempty(&q.port) {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| bad(format!("port: {p:?} is not a port number")))?,
        ),
    };
    let http = match (nonempty(&q.method), nonempty(&q.path)) {
        (None, None) => None,
        (Some(m), Some(p)) => Some((m.to_owned(), p.to_owned())),
        _ => {
            return Err(bad(
                "method and path go together (or neither, for opaque traffic)",
            ))
        }
    };
    let upgrade = nonempty(&q.upgrade);
    if upgrade.is_some() && http.is_none() {
        return Err(bad("upgrade needs a method and a path"));
    }
    let (_, _, policy) = policy_in_force(&c)?;
    let req = meshid_policy::Request {
        from: &from,
        to: &to,
        port,
        http: http
            .as_ref()
            .map(|(method, path)| meshid_policy::HttpRequest {
                method,
                path,
                upgrade,
            }),
    };
    Ok(Json(policy.explain(&req).to_json(&policy)))
}

/// `?limit=` of the activity page.
#[derive(Debug, Deserialize)]
pub struct ActivityQuery {
    limit: Option<usize>,
}

async fn activity(
    State(c): State<Shared>,
    Query(q): Query<ActivityQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, super::view::RECENT);
    let (records, denials) = {
        let mut view = c.view.write().unwrap_or_else(|p| p.into_inner());
        (view.recent(limit), view.denials(crate::unix_now(), 100))
    };
    Ok(Json(
        json!({ "records": records, "denials": denials, "denials_reported": true }),
    ))
}

async fn compliance(State(c): State<Shared>) -> Json<Value> {
    let now = crate::unix_now();
    let view = c.view.read().unwrap_or_else(|p| p.into_inner());
    Json(json!({
        "window_s": super::view::WINDOW_HOURS * 3600,
        "on_time_share": super::view::ON_TIME_SHARE,
        "services": view.compliance(now),
        "top_fetchers": view.top_fetchers(now, 20),
    }))
}

/// A `change` event (`{"seq": n}`) whenever the audit log moved, at most once per
/// [`EVENT_INTERVAL`]; the stream ends at shutdown.
async fn events(
    State(c): State<Shared>,
    axum::Extension(stop): axum::Extension<watch::Receiver<bool>>,
) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(1);
    let mut changes = c.changes.subscribe();
    let mut stop = stop;
    tokio::spawn(async move {
        let ready = Event::default()
            .event("change")
            .data(json!({"seq": *changes.borrow_and_update()}).to_string());
        if tx.send(Ok(ready)).await.is_err() {
            return;
        }
        loop {
            let next = tokio::time::Instant::now() + EVENT_INTERVAL;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
                () = tx.closed() => return,
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                _ = stop.changed() => return,
            }
            let seq = *changes.borrow_and_update();
            let event = Event::default()
                .event("change")
                .data(json!({ "seq": seq }).to_string());
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::new())
}

/// How this request was admitted: `{"via": "loopback" | "admin" | "session", "who": ...}`
/// (the admin's SPIFFE ID, or who made the session's token), for the page's header and its
/// logout button.
async fn session(admission: Option<axum::Extension<Admission>>) -> Json<Value> {
    Json(match admission.map(|a| a.0) {
        Some(Admission::Admin(id)) => json!({ "via": "admin", "who": id.to_string() }),
        Some(Admission::Session(by)) => json!({ "via": "session", "who": &*by }),
        _ => json!({ "via": "loopback", "who": null }),
    })
}

/// The body of `POST /api/login`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    token: String,
}

/// Whether a state-changing request came from this console's own page: JSON (which another
/// site cannot send without a CORS preflight the console never answers) and, when the browser
/// says where from, from this origin.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send JSON (Content-Type: application/json)".into(),
        ));
    }
    if let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        let origin = origin.to_str().unwrap_or("");
        let host = host.to_str().unwrap_or("");
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        if origin_host != host {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "cross-origin request refused".into(),
            ));
        }
    }
    Ok(())
}

fn session_cookie(value: &str, max_age: u64, https: bool) -> HeaderValue {
    let secure = if https { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
        access::cookie_name(https)
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("meshid_console=; Max-Age=0"))
}

async fn login(State(c): State<Shared>, req: Request) -> Result<Response, ApiError> {
    same_origin(req.headers())?;
    let peer = req.extensions().get::<Peer>().map(|p| p.addr.to_string());
    let body = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(req.into_body(), 4096))
        .await
        .map_err(|_| bad("the body did not arrive in time"))?
        .map_err(|_| bad("the body is larger than 4 KiB"))?;
    let body: LoginBody = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("expected {{\"token\": \"...\"}}: {e}")))?;
    match c.access.login(body.token.trim(), crate::unix_now()) {
        Ok((session, expires_at, by)) => {
            tracing::info!(peer = ?peer, token_by = %by, "console: session opened with a login token");
            let event = crate::audit::AuditEvent::new(
                "console.session.opened",
                format!("console:{}", peer.as_deref().unwrap_or("?")),
                json!({ "token_by": &*by, "expires_at": expires_at }),
            );
            if let Err(e) = c.ca.store.append_audit(&event).await {
                c.access.logout(&session);
                return Err(internal("the audit log", e));
            }
            let mut resp = StatusCode::NO_CONTENT.into_response();
            resp.headers_mut().insert(
                header::SET_COOKIE,
                session_cookie(&session, c.access.session_ttl().as_secs(), c.https),
            );
            Ok(resp)
        }
        Err(reason) => {
            static REFUSED: std::sync::OnceLock<meshid_api::uds::admission::RateLimitedLog> =
                std::sync::OnceLock::new();
            REFUSED.get_or_init(Default::default).info(|held| {
                tracing::warn!(peer = ?peer, reason, held_back = held, "console: login refused");
            });
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                format!("login refused: {reason}"),
            ))
        }
    }
}

async fn logout(
    State(c): State<Shared>,
    admission: Option<axum::Extension<Admission>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    same_origin(&headers)?;
    if let Some(session) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| access::cookie(h, access::cookie_name(c.https)))
    {
        c.access.logout(session);
        if let Some(axum::Extension(Admission::Session(by))) = admission {
            let peer = peer.map_or_else(|| "?".to_owned(), |p| p.addr.to_string());
            let event = crate::audit::AuditEvent::new(
                "console.session.closed",
                format!("console:{peer}"),
                json!({ "token_by": &*by }),
            );
            if let Err(e) = c.ca.store.append_audit(&event).await {
                tracing::warn!(error = %e, "console: cannot record a logout");
            }
        }
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0, c.https));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::loopback_host;

    #[test]
    fn only_loopback_names_pass_the_host_check() {
        for ok in [
            "localhost",
            "localhost:8480",
            "127.0.0.1:8480",
            "127.0.0.2",
            "[::1]:8480",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(loopback_host(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.example:8480",
            "evil.example",
            "198.18.0.1:8480",
            "127.0.0.1.evil.example",
            "[::2]:1",
            "",
            "localhost.evil",
        ] {
            assert!(!loopback_host(Some(bad)), "{bad}");
        }
        assert!(!loopback_host(None));
    }
}
