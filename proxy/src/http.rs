//! Inbound HTTP/1.1 and HTTP/2: one policy decision per request.
//!
//! The caller's connection is served by hyper; requests go to the local application over the
//! listener's shared connections ([`AppPool`](crate::upstream::AppPool)), in the HTTP version
//! the caller spoke (the caller chose it for the application, the proxy is transparent to it):
//! HTTP/1 connections are reused from request to request across callers, and HTTP/2 requests
//! share one multiplexed connection. An idle caller connection holds no application
//! connection. A refused request gets a `403` whose body names no rule, policy or identity;
//! the reason goes to the proxy's log and access log. Paths are normalized before matching
//! ([`normalize_path`]) and the normalized path is what the application receives, so the
//! application serves exactly what was authorized; paths that cannot be normalized safely get
//! a `400`.
//!
//! Hop-by-hop headers (`Connection` and the headers it names, `Keep-Alive`, `TE`, `Upgrade`,
//! `HTTP2-Settings`, `Transfer-Encoding`, `Proxy-*`) are removed in both directions
//! ([`strip_hop_by_hop`]): they concern one connection, and forwarding them lets a caller
//! steer the application's connection. After a protocol switch the proxy sees no more
//! requests, so an upgrade (an `Upgrade` offer, or a `CONNECT` tunnel) is decided as its own
//! kind of request: only an allow rule that names the protocol in `upgrades`, or one without
//! `http` conditions, lets it through, and the spliced bytes are accounted to that request's
//! access record. An `h2c` offer is never passed: the caller gets HTTP/1.1, and every request
//! it sends after is decided on its own.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshid_policy::{AccessRecord, Decision, HttpRequest, Outcome, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::proxy::{account, drained, record, InboundState as Listener};
use crate::upstream::{H1Sender, Metered, RequestBody};

type ResponseBody = Metered<Either<Incoming, Full<Bytes>>>;
struct Conn {
    listener: Arc<Listener>,
    caller: SpiffeId,
    local: Arc<SpiffeId>,
    /// The negotiated key exchange group, for the access log.
    group: &'static str,
    h2: bool,
}

/// How long a caller the policy denies outright gets to send its one request head.
const DENIED_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A caller connection's head deadline and the requests it may carry: the configured ones, or
/// for a caller the policy denies outright one request whose head must come within 1 s (or
/// `http_header_timeout`, if shorter). Both HTTP servers ([`crate::h1`] and [`serve`]) use it.
pub(crate) fn connection_limits(
    shared: &crate::proxy::Shared,
    denied: bool,
) -> (std::time::Duration, Option<u64>) {
    if denied {
        (shared.http_header_timeout.min(DENIED_HEAD_TIMEOUT), Some(1))
    } else {
        (
            shared.http_header_timeout,
            shared.http_max_requests_per_connection,
        )
    }
}

/// Serves one caller connection as HTTP/1.1 (`h2 = false`) or HTTP/2 until it ends, the drain
/// asks it to finish its in-flight requests, or it has carried `http_max_requests_per_connection`
/// requests (then it is closed gracefully, counted `limited{reason="max_requests"}`). When the
/// policy denies the caller outright (`denied`), only its first request is answered (403, by
/// the per-request decision) and the connection is closed; its head must come within
/// `http_header_timeout`, and at most 1 s. `served`: requests the connection has already
/// carried (on the HTTP/1 fast path, [`crate::h1`], which hands over what it does not take).
#[allow(clippy::too_many_arguments)]
pub async fn serve<T>(
    listener: Arc<Listener>,
    io: T,
    caller: SpiffeId,
    local: Arc<SpiffeId>,
    group: &'static str,
    h2: bool,
    denied: bool,
    served: u64,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut drain = listener.shared.drain.clone();
    let name = listener.config.name.clone();
    let (head_timeout, max_requests) = connection_limits(&listener.shared, denied);
    let limits = (head_timeout, listener.shared.http_max_header_bytes);
    // `answered` is notified when the last request this connection may carry has its response.
    let max_requests = max_requests.map(|max| max.saturating_sub(served).max(1));
    let answered = Arc::new(tokio::sync::Notify::new());
    let served = Arc::new(AtomicU64::new(0));
    let metrics = listener.metrics.clone();
    let max_headers = listener.shared.http_max_headers;
    let conn = Arc::new(Conn {
        listener,
        caller,
        local,
        group,
        h2,
    });
    let done = answered.clone();
    let limit_metrics = metrics.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        let (done, served, limit_metrics) = (done.clone(), served.clone(), limit_metrics.clone());
        async move {
            let mut response = handle(conn, req).await;
            let n = served.fetch_add(1, Ordering::Relaxed) + 1;
            if max_requests.is_some_and(|max| n >= max) {
                if !denied {
                    limit_metrics.limited("max_requests");
                }
                // HTTP/1 closes after this response; HTTP/2 says goodbye (below).
                if !h2 {
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                done.notify_one();
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.1).unwrap_or(u32::MAX));
        if denied {
            b.max_concurrent_streams(1);
        }
        // Boxed: the task holds the connection of the version it speaks, not both sizes.
        let mut c = Box::pin(b.serve_connection(io, service));
        // After the last request this connection may carry; a denied caller that opens no
        // stream is closed after the head deadline too.
        let first = async {
            match max_requests {
                _ if denied => {
                    let _ = tokio::time::timeout(limits.0, answered.notified()).await;
                }
                Some(_) => answered.notified().await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = c.as_mut() => r,
            () = drained(&mut drain) => {
                c.as_mut().graceful_shutdown();
                c.await
            }
            () = first => {
                // The goodbye waits for the caller to acknowledge a ping: a caller that never
                // does is closed after the head deadline once more.
                c.as_mut().graceful_shutdown();
                tokio::time::timeout(limits.0, c).await.unwrap_or(Ok(()))
            }
        }
    } else {
        // The head deadline also runs while a kept-alive connection waits for its next
        // request: a silent or trickling client is closed after it.
        let c = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(!denied)
            .max_headers(max_headers)
            .header_read_timeout(limits.0)
            .max_header_size(limits.1)
            .max_buf_size(limits.1.max(8192))
            .serve_connection(io, service)
            .with_upgrades();
        let mut c = Box::pin(c);
        tokio::select! {
            r = c.as_mut() => r,
            () = drained(&mut drain) => {
                c.as_mut().graceful_shutdown();
                c.await
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            metrics.limited("header_timeout");
            tracing::debug!(listener = %name, "http connection closed: no complete request head within http_header_timeout");
        } else if e.is_parse_too_large() {
            metrics.limited("header_too_large");
            tracing::info!(listener = %name, "http request head over http_max_header_bytes: refused (431)");
        } else {
            tracing::debug!(listener = %name, error = %e, "http connection ended with an error");
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Either<Incoming, Full<Bytes>>> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn refused(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    plain(status, body).map(|b| Metered::new(b, Box::new(|_| {})))
}

async fn handle(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let start = Instant::now();
    let l = &conn.listener;
    l.metrics.http_requests.inc();
    let mut offered = strip_hop_by_hop(req.headers_mut(), conn.h2);
    if req.method() == http::Method::CONNECT {
        offered = vec![Offer::connect()];
    }
    let path = match normalize_path(req.uri().path()) {
        Some(p) => p,
        None => {
            tracing::info!(listener = %l.config.name, caller = %conn.caller, "request path refused: cannot be normalized safely");
            return refused(StatusCode::BAD_REQUEST, "bad request\n");
        }
    };
    let active = l.shared.policy.load();
    let decide = |upgrade: Option<&str>| {
        active.policy.decide(&meshid_policy::Request {
            from: &conn.caller,
            to: &conn.local,
            port: Some(l.config.port),
            http: Some(HttpRequest {
                method: req.method().as_str(),
                path: &path,
                upgrade,
            }),
        })
    };
    // An upgrade is decided once per protocol offered; the refused ones are withdrawn from
    // the offer, and the request is refused when all are.
    let asked = offered.first().map(|o| o.name.clone());
    let decision = if offered.is_empty() {
        decide(None)
    } else {
        let decisions: Vec<Decision> = offered.iter().map(|o| decide(Some(&o.name))).collect();
        let mut kept = decisions.iter().map(|d| d.outcome != Outcome::Deny);
        offered.retain(|_| kept.next().unwrap_or(false));
        let first = decisions.iter().find(|d| d.outcome != Outcome::Deny);
        first.unwrap_or(&decisions[0]).clone()
    };
    account(l, &active, &conn.caller, &decision);
    let mut rec = l.shared.access.enabled().then(|| {
        let mut r = record(
            l,
            "request",
            &conn.caller,
            &conn.local,
            conn.group,
            active.policy.name(),
            &decision,
        );
        r.method = Some(req.method().as_str().to_owned());
        r.path = Some(path.to_string());
        r.upgrade = offered.first().map(|o| o.name.clone()).or(asked.clone());
        r
    });
    drop(active);
    if decision.outcome == Outcome::Deny {
        if asked.is_some() {
            tracing::info!(listener = %l.config.name, caller = %conn.caller, upgrade = asked.as_deref(), "upgrade refused: no allow rule names the protocol in `upgrades`");
        }
        if let Some(mut r) = rec {
            r.status = Some(403);
            if asked.is_some() {
                r.reason = Some("upgrade_not_allowed".to_owned());
            }
            r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            l.shared.access.log(r);
        }
        return refused(StatusCode::FORBIDDEN, "forbidden\n");
    }
    if let Cow::Owned(p) = &path {
        let mut parts = req.uri().clone().into_parts();
        let pq = match req.uri().query() {
            Some(q) => format!("{p}?{q}"),
            None => p.clone(),
        };
        if let Ok(pq) = http::uri::PathAndQuery::try_from(pq) {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    let tunnel = req.method() == http::Method::CONNECT;
    if !offered.is_empty() && !tunnel {
        // Only what the policy allowed is offered to the application.
        let tokens: Vec<&str> = offered.iter().map(|o| o.token.as_str()).collect();
        if let Ok(v) = http::HeaderValue::from_str(&tokens.join(", ")) {
            req.headers_mut().insert(http::header::UPGRADE, v);
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
        }
    }
    let bytes_in = Arc::new(AtomicU64::new(0));
    let down = (!offered.is_empty()).then(|| hyper::upgrade::on(&mut req));
    let rx = l.metrics.rx.clone();
    let counted = bytes_in.clone();
    let req = req.map(|b| {
        Metered::new(
            b,
            Box::new(move |n| {
                rx.inc_by(n);
                counted.store(n, Ordering::Relaxed);
            }),
        )
    });
    let upstream_failed = |rec: Option<AccessRecord>, reason: &str| {
        if let Some(mut r) = rec {
            r.status = Some(502);
            r.reason = Some(reason.to_owned());
            r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            l.shared.access.log(r);
        }
        refused(StatusCode::BAD_GATEWAY, "bad gateway\n")
    };
    let (mut resp, lease) = match send(&conn, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, error = %e, "local application request failed");
            return upstream_failed(rec, "upstream_error");
        }
    };
    let switched = if tunnel {
        resp.status().is_success()
    } else {
        resp.status() == StatusCode::SWITCHING_PROTOCOLS
    };
    let chosen = if switched && !tunnel {
        // The application must switch to a protocol that was offered (and so allowed).
        let named = resp
            .headers()
            .get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Offer::parse(v).into_iter().next());
        match named {
            Some(n) if offered.iter().any(|o| o.name == n.name) => Some(n),
            _ => {
                // Its connection is in an unknown state now: never reuse it.
                drop(lease);
                tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, "the application switched protocols to one that was not offered; refused");
                return upstream_failed(rec, "upgrade_mismatch");
            }
        }
    } else {
        None
    };
    strip_hop_by_hop(resp.headers_mut(), conn.h2);
    if let Some(n) = &chosen {
        if let Ok(v) = http::HeaderValue::from_str(&n.token) {
            resp.headers_mut().insert(http::header::UPGRADE, v);
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
        }
    }
    let status = resp.status().as_u16();
    if let Some(r) = rec.as_mut() {
        r.status = Some(status);
    }
    let (tx, rx) = (l.metrics.tx.clone(), l.metrics.rx.clone());
    let access = l.shared.access.clone();
    // A switched connection's record is written when the splice ends, with its bytes.
    let spliced = match (switched, down) {
        (true, Some(down)) => Some((down, rec.take())),
        _ => None,
    };
    if let Some((down, rec)) = spliced {
        let up = hyper::upgrade::on(&mut resp);
        let name = l.config.name.clone();
        let (access, tx, rx) = (access.clone(), tx.clone(), rx.clone());
        let bytes_in = bytes_in.clone();
        tokio::spawn(async move {
            let (mut sent, mut received) = (0, 0);
            match tokio::try_join!(down, up) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    if let Ok((d, u)) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                        (received, sent) = (d, u);
                    }
                }
                Err(e) => tracing::debug!(listener = %name, error = %e, "upgrade failed"),
            }
            rx.inc_by(received);
            tx.inc_by(sent);
            if let Some(mut r) = rec {
                r.bytes_in = bytes_in.load(Ordering::Relaxed) + received;
                r.bytes_out = sent;
                r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
                access.log(r);
            }
        });
    }
    // The application connection goes back to the pool when the response is done, unless the
    // protocol switched (the connection is the tunnel's now).
    let lease = lease.filter(|_| !switched);
    let pool = Arc::clone(&l.pool);
    resp.map(|b| {
        Metered::new(
            Either::Left(b),
            Box::new(move |n| {
                if let Some(s) = lease {
                    pool.checkin_h1(s);
                }
                tx.inc_by(n);
                if let Some(mut r) = rec {
                    r.bytes_in = bytes_in.load(Ordering::Relaxed);
                    r.bytes_out = n;
                    r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
                    access.log(r);
                }
            }),
        )
    })
}

/// A protocol in an `Upgrade` header: its lower-case name (what policies name) and the token
/// as sent (with its version, if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The protocol name, lower case, without the version: `websocket`.
    pub name: String,
    /// The token as sent: `websocket`, `TLS/1.2`.
    pub token: String,
}

impl Offer {
    fn connect() -> Offer {
        Offer {
            name: "connect".to_owned(),
            token: String::new(),
        }
    }

    /// The protocols of an `Upgrade` header value, in order; empty tokens are skipped.
    pub fn parse(value: &str) -> Vec<Offer> {
        value
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| Offer {
                name: t.split('/').next().unwrap_or(t).to_ascii_lowercase(),
                token: t.to_owned(),
            })
            .collect()
    }
}

/// Headers that concern one connection only, whatever `Connection` says.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "http2-settings",
    "transfer-encoding",
];

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1): `Connection` and every header it
/// names, `Keep-Alive`, `TE`, `Upgrade`, `HTTP2-Settings`, `Transfer-Encoding` and `Proxy-*`.
/// `TE: trailers` stays on HTTP/2, where gRPC needs it
/// and it means no more than that trailers are welcome. Returns the protocols an HTTP/1.1
/// request offers to upgrade to (an `Upgrade` header with `upgrade` in `Connection`), without
/// HTTP/2 (`h2c`, `h2`, `HTTP/2.0`), which is never passed: after it the proxy would see no
/// more requests.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap, h2: bool) -> Vec<Offer> {
    let mut named: Vec<http::HeaderName> = Vec::new();
    let mut upgrade_named = false;
    for v in headers.get_all(http::header::CONNECTION) {
        for token in v.to_str().unwrap_or_default().split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("upgrade") {
                upgrade_named = true;
            }
            if let Ok(name) = http::HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    let offers = if upgrade_named && !h2 {
        let mut all = Vec::new();
        for v in headers.get_all(http::header::UPGRADE) {
            all.extend(Offer::parse(v.to_str().unwrap_or_default()));
        }
        all.retain(|o| !matches!(o.name.as_str(), "h2c" | "h2" | "http"));
        all
    } else {
        Vec::new()
    };
    let trailers = h2
        && headers
            .get(http::header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let proxy: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    if trailers {
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    }
    offers
}

/// Sends `req` to the application over the listener's pool; with an HTTP/1 connection, the
/// connection is returned (to give back to the pool when the response is done).
async fn send(
    conn: &Conn,
    req: Request<RequestBody>,
) -> Result<(Response<Incoming>, Option<H1Sender>), Box<dyn std::error::Error + Send + Sync>> {
    let l = &conn.listener;
    if conn.h2 {
        let mut slot = l.pool.h2.lock().await;
        let usable = match slot.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let tcp = l.shared.connect(&l.config.forward_to).await?;
            let name = l.config.name.clone();
            let (s, c) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(async move {
                if let Err(e) = c.await {
                    tracing::debug!(listener = %name, error = %e, "application connection ended");
                }
            });
            *slot = Some(s);
        }
        let mut s = slot.clone().ok_or("no application connection")?;
        drop(slot);
        return Ok((s.send_request(req).await?, None));
    }
    let mut s = match l.pool.checkout_h1().await {
        Some(s) => s,
        None => {
            let tcp = l.shared.connect(&l.config.forward_to).await?;
            let name = l.config.name.clone();
            let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                if let Err(e) = c.with_upgrades().await {
                    tracing::debug!(listener = %name, error = %e, "application connection ended");
                }
            });
            s
        }
    };
    let resp = s.send_request(req).await?;
    Ok((resp, Some(s)))
}

/// Normalizes a request path before policy matching (RFC 3986 section 6.2.2): percent-encoded
/// unreserved characters are decoded, `.` and `..` segments are resolved and repeated slashes
/// merged. Returns `None` for paths whose meaning depends on the application's decoder and so
/// cannot be authorized safely: an encoded `/`, `\` or `%` that would change the segments,
/// a `..` above the root, a NUL or a path not starting with `/`. `*` (for `OPTIONS *`) is
/// kept as is.
pub fn normalize_path(path: &str) -> Option<Cow<'_, str>> {
    if path == "*" {
        return Some(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return None;
    }
    let simple = !path.contains("//")
        && !path.contains('%')
        && !path.contains('\\')
        && !path.split('/').any(|s| s == "." || s == "..");
    if simple {
        return Some(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            // Two hex digits exactly (`from_str_radix` alone would also take a sign: `%+f`).
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let s = std::str::from_utf8(hex).ok()?;
            let v = u8::from_str_radix(s, 16).ok()?;
            let unreserved = v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~');
            if unreserved {
                decoded.push(v as char);
            } else if v == b'/' || v == b'\\' || v == b'%' || v == 0 {
                return None;
            } else {
                decoded.push('%');
                decoded.push_str(&s.to_ascii_uppercase());
            }
            i += 3;
        } else if b == b'\\' || b == 0 {
            return None;
        } else {
            // A whole character: `i` is always on a boundary (`%XX` and `\\` are ASCII).
            let c = path[i..].chars().next()?;
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => {
                trailing = n == last;
            }
            "." => trailing = n == last,
            ".." => {
                out.pop()?;
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() || trailing {
        result.push('/');
    }
    Some(Cow::Owned(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &http::HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(http::HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn hop_by_hop_headers_never_reach_the_other_side() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Hop, Upgrade, HTTP2-Settings"),
            ("connection", "x-second"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("x-second", "1"),
            ("te", "trailers, deflate"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-connection", "keep-alive"),
            ("x-end-to-end", "kept"),
            ("host", "api"),
        ]);
        // h2c is never passed: no protocol is offered, and the request goes on as HTTP/1.1.
        assert_eq!(strip_hop_by_hop(&mut h, false), vec![]);
        assert_eq!(names(&h), vec!["host", "x-end-to-end"]);
        // On HTTP/2, `te: trailers` means only that and stays (gRPC needs it).
        let mut h = headers(&[("te", "trailers"), ("content-type", "application/grpc")]);
        assert_eq!(strip_hop_by_hop(&mut h, true), vec![]);
        assert_eq!(names(&h), vec!["content-type", "te"]);
        let mut h = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn upgrade_offers_are_read_only_when_connection_names_upgrade() {
        let offer = |name: &str, token: &str| Offer {
            name: name.to_owned(),
            token: token.to_owned(),
        };
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "WebSocket, h2c, HTTP/2.0, TLS/1.3,,"),
        ]);
        assert_eq!(
            strip_hop_by_hop(&mut h, false),
            vec![offer("websocket", "WebSocket"), offer("tls", "TLS/1.3")]
        );
        assert!(h.is_empty());
        // Without `upgrade` in `Connection` the header is not an offer (RFC 9110 7.8).
        let mut h = headers(&[("upgrade", "websocket")]);
        assert_eq!(strip_hop_by_hop(&mut h, false), vec![]);
        assert!(h.is_empty());
        // HTTP/2 has no upgrades.
        let mut h = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(strip_hop_by_hop(&mut h, true), vec![]);
        // Malformed values: nothing offered, nothing left behind.
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_bytes(b"upgrade, \xff bad").unwrap(),
        );
        h.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_bytes(b"\xffws").unwrap(),
        );
        assert_eq!(strip_hop_by_hop(&mut h, false), vec![]);
        assert!(h.is_empty());
    }

    #[test]
    fn paths_are_normalized_or_refused() {
        let ok = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(ok("/a/b").as_deref(), Some("/a/b"));
        assert!(matches!(normalize_path("/a/b"), Some(Cow::Borrowed(_))));
        assert_eq!(ok("/").as_deref(), Some("/"));
        assert_eq!(ok("*").as_deref(), Some("*"));
        assert_eq!(ok("/a//b").as_deref(), Some("/a/b"));
        assert_eq!(ok("/a/./b").as_deref(), Some("/a/b"));
        assert_eq!(ok("/a/x/../b").as_deref(), Some("/a/b"));
        assert_eq!(ok("/a/b/").as_deref(), Some("/a/b/"));
        assert_eq!(ok("/a/b/.").as_deref(), Some("/a/b/"));
        assert_eq!(ok("/%61dmin").as_deref(), Some("/admin"));
        assert_eq!(ok("/a%20b").as_deref(), Some("/a%20b"));
        assert_eq!(ok("/a%2fb"), None);
        assert_eq!(ok("/a%2Fb"), None);
        assert_eq!(ok("/a%5cb"), None);
        assert_eq!(ok("/a\\b"), None);
        assert_eq!(ok("/a%25"), None);
        assert_eq!(ok("/a%2"), None);
        assert_eq!(ok("/a%zz"), None);
        assert_eq!(ok("/.."), None);
        assert_eq!(ok("/a/../.."), None);
        assert_eq!(ok("/%2e%2e/admin"), None);
        assert_eq!(ok("/x/%2e%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(ok("relative"), None);
    }

    #[test]
    fn non_ascii_characters_are_kept_whole() {
        // Found by the request_path fuzz target: each byte of U+075A was pushed as a char of
        // its own, so the path came back mangled and normalizing it again changed it.
        let path = std::str::from_utf8(b"/\xdd\x9a%ee").unwrap();
        let once = normalize_path(path).unwrap().into_owned();
        assert_eq!(once, "/\u{75a}%EE");
        assert_eq!(normalize_path(&once).as_deref(), Some(once.as_str()));
        assert_eq!(
            normalize_path("/caf\u{e9}/./x").as_deref(),
            Some("/caf\u{e9}/x")
        );
    }

    #[test]
    fn percent_escapes_need_two_hex_digits() {
        for bad in ["/a%+f", "/a%-1", "/a%g0", "/a%f", "/a%"] {
            assert_eq!(normalize_path(bad), None, "{bad}");
        }
        assert_eq!(normalize_path("/a%2f%41").as_deref(), None, "encoded slash");
        assert_eq!(normalize_path("/a%41%7e").as_deref(), Some("/aA~"));
    }
}
