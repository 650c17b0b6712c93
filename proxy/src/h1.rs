//! Inbound HTTP/1.1, the fast path: one policy decision per request without a full HTTP
//! server stack per connection.
//!
//! The request head is parsed in place ([`wire`]), decided, rewritten for the application
//! (normalized path, hop-by-hop headers removed) and written to one of the listener's pooled
//! application connections together with the body bytes already read; the body and the
//! response are then relayed as they come (a chunked body as it was framed, its end found by a
//! scanner), in the same task, with no per-request channel or second task. The response head
//! is rewritten the same way. An idle caller connection holds no application connection and
//! at most a head's first read (1 KiB) of buffer.
//!
//! Anything but a plain request (an upgrade or `CONNECT`, HTTP/1.0, an unusual
//! target or framing, a malformed or oversized head) is handed, with the bytes read so far, to
//! the full server ([`crate::http`]) for the rest of the connection: it answers malformed
//! heads (`400`, `431`) and decides upgrades exactly as before. The limits are the same on
//! both paths: the head deadline (also while a kept-alive connection waits), the head size and
//! header count, requests per connection, one request for a caller denied outright, and the
//! drain (a request in flight finishes, an idle connection closes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use meshid_policy::{HttpRequest, Outcome, SpiffeId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::io::Prefixed;
use crate::proxy::{account, drained, record, InboundState as Listener};

pub mod wire;

use wire::{Framing, Parsed, RequestHead, ResponseHead};

/// The first read of a request head.
const HEAD_READ: usize = 1024;
/// The first buffer of a response; it doubles up to [`BODY_BUF_MAX`] while reads fill it.
const BODY_BUF: usize = 16 * 1024;
const BODY_BUF_MAX: usize = 64 * 1024;
/// The largest response head accepted from the application.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What one request came to, for the access log and the counters.
struct Exchange {
    status: Option<u16>,
    reason: Option<&'static str>,
    bytes_in: u64,
    bytes_out: u64,
    /// The caller connection can carry the next request.
    keep: bool,
}

/// Serves one caller connection speaking HTTP/1.1 until it ends, the drain starts between
/// requests, or it has carried `http_max_requests_per_connection` requests. A caller the policy
/// denies outright (`denied`) gets its one request answered (403) and is closed; its head must
/// come within `http_header_timeout`, and at most 1 s.
pub async fn serve<T>(
    listener: Arc<Listener>,
    mut io: T,
    caller: SpiffeId,
    local: Arc<SpiffeId>,
    group: &'static str,
    denied: bool,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let l = &*listener;
    let shared = &*l.shared;
    let mut drain = shared.drain.clone();
    let (head_timeout, max_requests) = crate::http::connection_limits(shared, denied);
    let (max_bytes, max_headers) = (shared.http_max_header_bytes, shared.http_max_headers);
    let mut buf: Vec<u8> = Vec::new();
    let mut served = 0u64;
    // One timer and one drain watch for the connection's life, not one per request: the
    // timer fires at most once per `head_timeout`, and is pushed back to the current head's
    // deadline when that is later.
    let mut deadline = Box::pin(tokio::time::sleep(head_timeout));
    let idle_timeout = shared.idle_timeout;
    // Bytes read on either side during exchanges, for the idle check.
    let progress = AtomicU64::new(0);
    let drain_started = drained(&mut drain);
    tokio::pin!(drain_started);
    loop {
        if buf.is_empty() && buf.capacity() > 2 * HEAD_READ {
            // Idle between requests: hold no more than a head's first read (a body's reads
            // made it larger).
            buf = Vec::new();
        }
        let idle = buf.is_empty();
        let due = tokio::time::Instant::now() + head_timeout;
        if deadline.deadline() > due {
            // An exchange pushed it past this head's deadline.
            deadline.as_mut().reset(due);
        }
        let parsed = {
            let read = read_head(&mut io, &mut buf, max_bytes, max_headers);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    biased;
                    r = &mut read => break Ok(r),
                    () = &mut drain_started, if idle => return,
                    () = deadline.as_mut() => {
                        if tokio::time::Instant::now() >= due {
                            break Err(());
                        }
                        deadline.as_mut().reset(due);
                    }
                }
            }
        };
        let head = match parsed {
            Err(_) => {
                l.metrics.limited("header_timeout");
                tracing::debug!(listener = %l.config.name, "http connection closed: no complete request head within http_header_timeout");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(listener = %l.config.name, error = %e, "http connection ended with an error");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(Parsed::Head(head)))) => head,
            Ok(Ok(Some(parsed))) => {
                let reason = match parsed {
                    Parsed::Fallback(why) => why,
                    _ => "head incomplete",
                };
                tracing::trace!(listener = %l.config.name, reason, "request handed to the full HTTP server");
                let io = Prefixed::new(buf, io);
                crate::http::serve(
                    listener.clone(),
                    io,
                    caller,
                    local,
                    group,
                    false,
                    denied,
                    served,
                )
                .await;
                return;
            }
        };
        buf.drain(..head.len);
        // The clock is read for the access log only.
        let start = shared.access.enabled().then(Instant::now);
        l.metrics.http_requests.inc();
        let active = shared.policy.load();
        let decision = active.policy.decide(&meshid_policy::Request {
            from: &caller,
            to: &local,
            port: Some(l.config.port),
            http: Some(HttpRequest {
                method: head.method(),
                path: head.path(),
                upgrade: None,
            }),
        });
        account(l, &active, &caller, &decision);
        let rec = shared.access.enabled().then(|| {
            let mut r = record(
                l,
                "request",
                &caller,
                &local,
                group,
                active.policy.name(),
                &decision,
            );
            r.method = Some(head.method().to_owned());
            r.path = Some(head.path().to_owned());
            r
        });
        drop(active);
        served += 1;
        let last = max_requests.is_some_and(|max| served >= max);
        if last && !denied {
            l.metrics.limited("max_requests");
        }
        let close = last || head.close || *shared.drain.borrow();
        let ex = if decision.outcome == Outcome::Deny {
            local_response(&mut io, &head.body, Local::FORBIDDEN, close).await
        } else {
            // No byte either way for `idle_timeout` (a body trickling to a stop, an application
            // that never answers, a caller that stops reading) ends the exchange. The
            // connection's one timer watches it: it fires at most once per period, and only
            // then is the progress looked at.
            let exchange = exchange(l, &mut io, &mut buf, head, close, &progress);
            tokio::pin!(exchange);
            let mut seen = (
                progress.load(Ordering::Relaxed),
                tokio::time::Instant::now(),
            );
            loop {
                tokio::select! {
                    biased;
                    ex = &mut exchange => break ex,
                    () = deadline.as_mut() => {
                        let (moved, now) = (progress.load(Ordering::Relaxed), tokio::time::Instant::now());
                        if moved != seen.0 {
                            seen = (moved, now);
                        } else if now >= seen.1 + idle_timeout {
                            l.metrics.limited("idle_timeout");
                            tracing::debug!(listener = %l.config.name, "http exchange closed: no byte either way within idle_timeout");
                            break failed(None, Some("idle_timeout"), 0);
                        }
                        deadline.as_mut().reset(seen.1 + idle_timeout);
                    }
                }
            }
        };
        l.metrics.rx.inc_by(ex.bytes_in);
        l.metrics.tx.inc_by(ex.bytes_out);
        if let Some(mut r) = rec {
            r.status = ex.status;
            r.reason = ex.reason.map(str::to_owned);
            r.bytes_in = ex.bytes_in;
            r.bytes_out = ex.bytes_out;
            r.duration_ms = start.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
            shared.access.log(r);
        }
        if !ex.keep {
            let _ = io.shutdown().await;
            return;
        }
    }
}

/// Reads until `buf` holds a complete request head (or something the fast path does not take).
/// `None` when the caller closes before sending a byte of it.
async fn read_head<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut Vec<u8>,
    max_bytes: usize,
    max_headers: usize,
) -> std::io::Result<Option<Parsed<RequestHead>>> {
    loop {
        if !buf.is_empty() {
            match wire::parse_request(buf, max_headers) {
                Parsed::Partial if buf.len() < max_bytes => {}
                Parsed::Partial => return Ok(Some(Parsed::Fallback("head over the size limit"))),
                other => return Ok(Some(other)),
            }
        }
        if buf.capacity() - buf.len() < HEAD_READ / 2 {
            buf.reserve(HEAD_READ);
        }
        if io.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                // A partial head and then EOF: the full server says what it makes of it.
                Ok(Some(Parsed::Fallback("closed inside a head")))
            };
        }
    }
}

/// A response the proxy writes itself.
struct Local {
    status: u16,
    line: &'static str,
    body: &'static str,
    reason: Option<&'static str>,
}

impl Local {
    const FORBIDDEN: Local = Local {
        status: 403,
        line: "403 Forbidden",
        body: "forbidden\n",
        reason: None,
    };
    const BAD_REQUEST: Local = Local {
        status: 400,
        line: "400 Bad Request",
        body: "bad request\n",
        reason: Some("bad_request"),
    };
    const BAD_GATEWAY: Local = Local {
        status: 502,
        line: "502 Bad Gateway",
        body: "bad gateway\n",
        reason: Some("upstream_error"),
    };
}

/// Answers with `what`. The request body, if any, was not read: the connection is closed
/// after (as when `close`).
async fn local_response<T: AsyncWrite + Unpin>(
    io: &mut T,
    body: &Framing,
    what: Local,
    close: bool,
) -> Exchange {
    let close = close || !complete(body);
    let text = format!(
        "HTTP/1.1 {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ndate: {}\r\n{}\r\n{}",
        what.line,
        what.body.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        if close { "connection: close\r\n" } else { "" },
        what.body,
    );
    let written = async {
        io.write_all(text.as_bytes()).await?;
        io.flush().await
    };
    let ok = written.await.is_ok();
    Exchange {
        status: Some(what.status),
        reason: what.reason,
        bytes_in: 0,
        bytes_out: 0,
        keep: ok && !close,
    }
}

/// Whether a body has been seen to its end.
fn complete(f: &Framing) -> bool {
    match f {
        Framing::Empty | Framing::Length(0) => true,
        Framing::Chunked(c) => c.done(),
        Framing::Length(_) | Framing::UntilClose => false,
    }
}

/// Takes the bytes of `input` that belong to the body framed by `f` (advancing it): how many,
/// and how many of them are payload.
fn advance(f: &mut Framing, input: &[u8]) -> Result<(usize, u64), &'static str> {
    match f {
        Framing::Empty => Ok((0, 0)),
        Framing::Length(left) => {
            let n = usize::try_from(*left)
                .unwrap_or(usize::MAX)
                .min(input.len());
            *left -= n as u64;
            Ok((n, n as u64))
        }
        Framing::Chunked(c) => {
            let before = c.data;
            let n = c.scan(input)?;
            Ok((n, c.data - before))
        }
        Framing::UntilClose => Ok((input.len(), input.len() as u64)),
    }
}

/// Why an exchange with the application failed.
enum Failure {
    /// Before any byte of a response (a reused connection may have been closed by the
    /// application meanwhile: worth one retry on a new one).
    NoResponse(std::io::Error),
    /// The caller's side failed (read or write): nothing to answer.
    Caller,
    /// The caller's chunked body framing is broken (answered `400`, then closed).
    BadBody(&'static str),
    /// The application's bytes were not a usable response, or it failed mid-response.
    Upstream(&'static str),
}

/// Forwards one allowed request to the application and relays its response.
async fn exchange<T>(
    l: &Listener,
    io: &mut T,
    buf: &mut Vec<u8>,
    head: RequestHead,
    close: bool,
    progress: &AtomicU64,
) -> Exchange
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut body = head.body;
    let mut out = head.out;
    out.extend_from_slice(b"\r\n");
    // The body bytes already read go in the same write as the head.
    let (taken, mut bytes_in) = match advance(&mut body, buf) {
        Ok(t) => t,
        Err(why) => {
            tracing::info!(listener = %l.config.name, caller_reason = why, "request body framing refused");
            return local_response(io, &body, Local::BAD_REQUEST, true).await;
        }
    };
    out.extend_from_slice(&buf[..taken]);
    buf.drain(..taken);
    let retryable = complete(&body);
    let (mut app, mut reused) = match l.pool.checkout_raw() {
        Some(s) => (s, true),
        None => match l.shared.connect(&l.config.forward_to).await {
            Ok(s) => (s, false),
            Err(e) => {
                tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, error = %e, "local application request failed");
                return local_response(io, &body, Local::BAD_GATEWAY, close).await;
            }
        },
    };
    let mut resp_buf = l.pool.take_buf(BODY_BUF);
    let answer = loop {
        let r = request(
            &mut app,
            &out,
            io,
            buf,
            &mut body,
            &mut bytes_in,
            &mut resp_buf,
            head.head,
            progress,
        )
        .await;
        match r {
            Err(Failure::NoResponse(_)) if reused && retryable => {
                // The pooled connection was closed under us: once more on a new one.
                reused = false;
                resp_buf.clear();
                match l.shared.connect(&l.config.forward_to).await {
                    Ok(s) => app = s,
                    Err(e) => break Err(Failure::NoResponse(e)),
                }
            }
            r => break r,
        }
    };
    let (resp, sent) = match answer {
        Ok(a) => a,
        Err(Failure::Caller) => return failed(None, None, bytes_in),
        Err(Failure::BadBody(why)) => {
            tracing::info!(listener = %l.config.name, caller_reason = why, "request body framing refused");
            let mut ex = local_response(io, &body, Local::BAD_REQUEST, true).await;
            ex.bytes_in = bytes_in;
            return ex;
        }
        Err(Failure::NoResponse(e)) => {
            tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, error = %e, "local application request failed");
            let mut ex = local_response(io, &body, Local::BAD_GATEWAY, close).await;
            ex.bytes_in = bytes_in;
            return ex;
        }
        Err(Failure::Upstream(why)) => {
            tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, reason = why, "local application response refused");
            let mut ex = local_response(io, &body, Local::BAD_GATEWAY, close).await;
            ex.bytes_in = bytes_in;
            return ex;
        }
    };
    let relayed = relay_response(
        l,
        io,
        &mut app,
        resp,
        resp_buf,
        close || !sent,
        (bytes_in, progress),
    );
    match relayed.await {
        Ok((ex, reuse)) => {
            if reuse && sent {
                l.pool.checkin_raw(app);
            }
            ex
        }
        Err((None, why)) => {
            tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, reason = why, "local application response refused");
            let mut ex = local_response(io, &body, Local::BAD_GATEWAY, true).await;
            ex.bytes_in = bytes_in;
            ex
        }
        Err((status, why)) => failed(status, Some(why), bytes_in),
    }
}

fn failed(status: Option<u16>, reason: Option<&'static str>, bytes_in: u64) -> Exchange {
    Exchange {
        status,
        reason,
        bytes_in,
        bytes_out: 0,
        keep: false,
    }
}

/// Writes the request to the application (`out`: head and the body bytes already read), sends
/// the rest of the body while reading the response head (informational responses, such as the
/// `100 Continue` a caller sending `Expect` waits for, are passed on as they come), and returns
/// the response head and whether the whole request body was sent (an application may answer
/// before reading all of it).
#[allow(clippy::too_many_arguments)]
async fn request<T>(
    app: &mut TcpStream,
    out: &[u8],
    io: &mut T,
    buf: &mut Vec<u8>,
    body: &mut Framing,
    bytes_in: &mut u64,
    resp_buf: &mut Vec<u8>,
    head_request: bool,
    progress: &AtomicU64,
) -> Result<(ResponseHead, bool), Failure>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    app.write_all(out).await.map_err(Failure::NoResponse)?;
    let (mut app_r, mut app_w) = app.split();
    if complete(body) {
        let h = read_response(&mut app_r, resp_buf, head_request, io, progress).await?;
        return Ok((h, true));
    }
    // The caller is read (its body) and written (informational responses) at once.
    let (mut caller_r, mut caller_w) = tokio::io::split(io);
    let send = send_body(&mut caller_r, buf, &mut app_w, body, bytes_in, progress);
    let recv = read_response(&mut app_r, resp_buf, head_request, &mut caller_w, progress);
    tokio::pin!(send, recv);
    tokio::select! {
        r = &mut send => {
            r?;
            Ok((recv.await?, true))
        }
        r = &mut recv => Ok((r?, false)),
    }
}

/// Relays the rest of a request body from the caller to the application. Bytes after the body
/// (a pipelined request) stay in `buf`.
async fn send_body<T, W>(
    io: &mut T,
    buf: &mut Vec<u8>,
    app: &mut W,
    body: &mut Framing,
    bytes_in: &mut u64,
    progress: &AtomicU64,
) -> Result<(), Failure>
where
    T: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while !complete(body) {
        buf.clear();
        buf.reserve(BODY_BUF);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(Failure::Caller),
            Ok(n) => {
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let (n, data) = advance(body, buf).map_err(Failure::BadBody)?;
        *bytes_in += data;
        app.write_all(&buf[..n])
            .await
            .map_err(|_| Failure::Upstream("application stopped reading the request body"))?;
        buf.drain(..n);
    }
    Ok(())
}

/// Reads the application's response head, passing informational responses on to the caller.
async fn read_response<R, W>(
    app: &mut R,
    resp_buf: &mut Vec<u8>,
    head_request: bool,
    caller: &mut W,
    progress: &AtomicU64,
) -> Result<ResponseHead, Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut any = false;
    loop {
        if !resp_buf.is_empty() {
            any = true;
            match wire::parse_response(resp_buf, head_request) {
                Err(why) => return Err(Failure::Upstream(why)),
                Ok(Some(mut h)) if (100..200).contains(&h.status) => {
                    h.out.extend_from_slice(b"\r\n");
                    caller
                        .write_all(&h.out)
                        .await
                        .map_err(|_| Failure::Caller)?;
                    caller.flush().await.map_err(|_| Failure::Caller)?;
                    resp_buf.drain(..h.len);
                    continue;
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) if resp_buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(Failure::Upstream("response head too large"))
                }
                Ok(None) => {}
            }
        }
        if resp_buf.capacity() - resp_buf.len() < HEAD_READ {
            resp_buf.reserve(BODY_BUF);
        }
        match app.read_buf(resp_buf).await {
            Ok(0) if !any => {
                return Err(Failure::NoResponse(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the application closed the connection without a response",
                )))
            }
            Ok(0) => {
                return Err(Failure::Upstream(
                    "the application closed inside a response head",
                ))
            }
            Err(e) if !any => return Err(Failure::NoResponse(e)),
            Err(_) => {
                return Err(Failure::Upstream(
                    "the application failed inside a response head",
                ))
            }
            Ok(n) => {
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Writes `a` and then `b` with vectored writes: one TLS record (or one segment) when they fit,
/// without copying them together first.
async fn write_both<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else {
            w.write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
                .await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Relays the response (head, then body) to the caller. `Ok` with the exchange and whether
/// the application connection can be reused; `Err` with the status already sent, if any, when
/// the relay broke off (the caller connection is then closed).
#[allow(clippy::too_many_arguments)]
async fn relay_response<T>(
    l: &Listener,
    io: &mut T,
    app: &mut TcpStream,
    resp: ResponseHead,
    mut resp_buf: Vec<u8>,
    close: bool,
    (bytes_in, progress): (u64, &AtomicU64),
) -> Result<(Exchange, bool), (Option<u16>, &'static str)>
where
    T: AsyncWrite + Unpin,
{
    let status = resp.status;
    let mut body = resp.body;
    let close = close || body == Framing::UntilClose;
    let mut out = resp.out;
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // The body bytes read with the head go out with it, in one TLS record when they fit.
    let first = &resp_buf[resp.len..];
    let (n, mut bytes_out) = advance(&mut body, first).map_err(|why| (None, why))?;
    // Nothing was written yet: a failure above can still be answered (502).
    let mut extra = n < first.len();
    write_both(io, &out, &first[..n])
        .await
        .map_err(|_| (Some(status), "caller_gone"))?;
    drop(out);
    while !complete(&body) {
        resp_buf.clear();
        let read = app.read_buf(&mut resp_buf).await;
        let got = match read {
            Ok(0) if body == Framing::UntilClose => break,
            Ok(0) | Err(_) => {
                tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, "the application's response broke off");
                return Err((Some(status), "upstream_truncated"));
            }
            Ok(got) => {
                progress.fetch_add(got as u64, Ordering::Relaxed);
                got
            }
        };
        let (n, data) = advance(&mut body, &resp_buf).map_err(|why| {
            tracing::warn!(listener = %l.config.name, app = %l.config.forward_to, reason = why, "the application's response framing is broken");
            (Some(status), "upstream_framing")
        })?;
        extra |= n < got;
        bytes_out += data;
        io.write_all(&resp_buf[..n])
            .await
            .map_err(|_| (Some(status), "caller_gone"))?;
        if got == resp_buf.capacity() && got < BODY_BUF_MAX {
            // Reads fill it: larger reads, fewer system calls.
            resp_buf.clear();
            resp_buf.reserve((got * 2).min(BODY_BUF_MAX));
        }
    }
    io.flush()
        .await
        .map_err(|_| (Some(status), "caller_gone"))?;
    l.pool.give_buf(resp_buf, BODY_BUF_MAX);
    let reuse = !resp.close && body != Framing::UntilClose && !extra;
    Ok((
        Exchange {
            status: Some(status),
            reason: None,
            bytes_in,
            bytes_out,
            keep: !close,
        },
        reuse,
    ))
}
