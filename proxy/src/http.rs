//! Inbound HTTP/1.1 and HTTP/2: one policy decision per request.
//!
//! The caller's connection is served by hyper; each downstream connection gets its own
//! upstream connection to the local application, speaking the same HTTP version (the caller
//! chose it for the application, the proxy is transparent to it). A refused request gets a
//! `403` whose body names no rule, policy or identity; the reason goes to the proxy's log and
//! access log. Paths are normalized before matching ([`normalize_path`]) and the normalized
//! path is what the application receives, so the application serves exactly what was
//! authorized; paths that cannot be normalized safely get a `400`. Upgrades (WebSocket,
//! `CONNECT`) are authorized like any request and then spliced.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshid_policy::{HttpRequest, Outcome, SpiffeId};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::inbound::{account, record, Listener};

type ResponseBody = Metered<Either<Incoming, Full<Bytes>>>;
type RequestBody = Metered<Incoming>;

/// A body that counts its data bytes and reports the count once, when it is dropped (complete
/// or abandoned).
pub struct Metered<B> {
    inner: B,
    bytes: u64,
    on_end: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl<B> Metered<B> {
    fn new(inner: B, on_end: Box<dyn FnOnce(u64) + Send + Sync>) -> Metered<B> {
        Metered {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<RequestBody>),
    H2(hyper::client::conn::http2::SendRequest<RequestBody>),
}

struct Conn {
    listener: Arc<Listener>,
    caller: SpiffeId,
    local: Arc<SpiffeId>,
    h2: bool,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
}

/// Serves one caller connection as HTTP/1.1 (`h2 = false`) or HTTP/2 until it ends or the
/// drain asks it to finish its in-flight requests.
pub async fn serve<T>(
    listener: Arc<Listener>,
    io: T,
    caller: SpiffeId,
    local: Arc<SpiffeId>,
    h2: bool,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut drain = listener.shared.drain.clone();
    let name = listener.config.name.clone();
    let conn = Arc::new(Conn {
        listener,
        caller,
        local,
        h2,
        upstream: tokio::sync::Mutex::new(None),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(conn, req).await) }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        let c = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service);
        tokio::pin!(c);
        tokio::select! {
            r = c.as_mut() => r,
            () = crate::server::drained(&mut drain) => {
                c.as_mut().graceful_shutdown();
                c.await
            }
        }
    } else {
        let c = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(c);
        tokio::select! {
            r = c.as_mut() => r,
            () = crate::server::drained(&mut drain) => {
                c.as_mut().graceful_shutdown();
                c.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(listener = %name, error = %e, "http connection ended with an error");
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

async fn handle(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let start = Instant::now();
    let l = &conn.listener;
    l.metrics.http_requests.inc();
    let path = match normalize_path(req.uri().path()) {
        Some(p) => p,
        None => {
            tracing::info!(listener = %l.config.name, caller = %conn.caller, "request path refused: cannot be normalized safely");
            return plain(StatusCode::BAD_REQUEST, "bad request\n")
                .map(|b| Metered::new(b, Box::new(|_| {})));
        }
    };
    let active = l.shared.policy.load();
    let decision = active.policy.decide(&meshid_policy::Request {
        from: &conn.caller,
        to: &conn.local,
        port: Some(l.config.port),
        http: Some(HttpRequest {
            method: req.method().as_str(),
            path: &path,
        }),
    });
    account(l, &active, &conn.caller, &decision);
    let mut rec = l.shared.access.enabled().then(|| {
        let mut r = record(
            l,
            "request",
            &conn.caller,
            &conn.local,
            active.policy.name(),
            &decision,
        );
        r.method = Some(req.method().as_str().to_owned());
        r.path = Some(path.to_string());
        r
    });
    drop(active);
    if decision.outcome == Outcome::Deny {
        if let Some(mut r) = rec {
            r.status = Some(403);
            r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
            l.shared.access.log(r);
        }
        return plain(StatusCode::FORBIDDEN, "forbidden\n")
            .map(|b| Metered::new(b, Box::new(|_| {})));
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
    let bytes_in = Arc::new(AtomicU64::new(0));
    let upgrade = (req.headers().contains_key(http::header::UPGRADE)
        || req.method() == http::Method::CONNECT)
        .then(|| hyper::upgrade::on(&mut req));
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
    let resp = match send(&conn, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, error = %e, "local application request failed");
            if let Some(mut r) = rec {
                r.status = Some(502);
                r.reason = Some("upstream_error".to_owned());
                r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
                l.shared.access.log(r);
            }
            return plain(StatusCode::BAD_GATEWAY, "bad gateway\n")
                .map(|b| Metered::new(b, Box::new(|_| {})));
        }
    };
    let mut resp = resp;
    if let Some(down) = upgrade {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (resp.status().is_success() && !conn.h2);
        if switching {
            let up = hyper::upgrade::on(&mut resp);
            let name = l.config.name.clone();
            tokio::spawn(async move {
                match tokio::try_join!(down, up) {
                    Ok((down, up)) => {
                        let mut down = TokioIo::new(down);
                        let mut up = TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                    Err(e) => tracing::debug!(listener = %name, error = %e, "upgrade failed"),
                }
            });
        }
    }
    let status = resp.status().as_u16();
    if let Some(r) = rec.as_mut() {
        r.status = Some(status);
    }
    let tx = l.metrics.tx.clone();
    let access = l.shared.access.clone();
    resp.map(|b| {
        Metered::new(
            Either::Left(b),
            Box::new(move |n| {
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

async fn send(
    conn: &Conn,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let mut slot = conn.upstream.lock().await;
    let usable = match slot.as_mut() {
        Some(Upstream::H1(s)) => s.ready().await.is_ok(),
        Some(Upstream::H2(s)) => s.ready().await.is_ok(),
        None => false,
    };
    if !usable {
        let l = &conn.listener;
        let tcp = l.shared.connect(&l.config.forward_to).await?;
        let io = TokioIo::new(tcp);
        let name = l.config.name.clone();
        *slot = Some(if conn.h2 {
            let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(async move {
                if let Err(e) = c.await {
                    tracing::debug!(listener = %name, error = %e, "application connection ended");
                }
            });
            Upstream::H2(s)
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = c.with_upgrades().await {
                    tracing::debug!(listener = %name, error = %e, "application connection ended");
                }
            });
            Upstream::H1(s)
        });
    }
    match slot.as_mut() {
        Some(Upstream::H1(s)) => {
            // HTTP/1 is one request at a time: hold the slot until the response head is in.
            Ok(s.send_request(req).await?)
        }
        Some(Upstream::H2(s)) => {
            let mut s = s.clone();
            drop(slot);
            Ok(s.send_request(req).await?)
        }
        None => Err("no application connection".into()),
    }
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
