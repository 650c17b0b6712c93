//! The HTTP/1.1 wire pieces of the inbound fast path ([`crate::h1`]), pure and synchronous:
//! request and response heads parsed (httparse, the parser hyper uses) and rewritten for the
//! next hop, and a chunked-body scanner that finds where a chunked body ends so that it can be
//! relayed as it came.
//!
//! The fast path takes only requests whose meaning is plain: an origin-form target, HTTP/1.1,
//! no `Upgrade`, no `Expect` but `100-continue`, at most one clean framing (`Content-Length`, or
//! `Transfer-Encoding: chunked` alone). Everything else ([`Parsed::Fallback`]) goes to the
//! full HTTP server (hyper, [`crate::http`]) with the bytes read so far, which answers
//! malformed heads with `400` or `431` and decides upgrades: edge cases behave exactly as
//! before, and the fast path never has to be lenient.

/// Headers that concern one connection only, whatever `Connection` says (as
/// [`crate::http::strip_hop_by_hop`]); `Transfer-Encoding` is kept when a chunked body is
/// relayed as it came.
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "http2-settings",
];

/// Headers a `Connection` header may not name on the fast path: removing them would change
/// the message's framing or target.
const FRAMING: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// Header slots on the stack; more (up to `http_max_headers`) are on the heap.
const STACK_HEADERS: usize = 32;

/// Response headers an application may send.
pub const MAX_RESPONSE_HEADERS: usize = 256;

/// How a message body is delimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked, relayed as it came (the scanner finds its end).
    Chunked(Chunked),
    /// Until the application closes its connection (responses only).
    UntilClose,
}

/// The outcome of parsing the bytes read so far.
#[derive(Debug)]
pub enum Parsed<T> {
    /// More bytes are needed.
    Partial,
    /// Not for the fast path (the reason, for the debug log).
    Fallback(&'static str),
    /// A complete head.
    Head(T),
}

/// A request head for the fast path.
#[derive(Debug)]
pub struct RequestHead {
    /// Bytes of the head in the input.
    pub len: usize,
    /// The head to send to the application, without its final empty line. It starts with
    /// the method and the normalized path ([`RequestHead::method`], [`RequestHead::path`]),
    /// which are not copied again: no allocation per request but this one.
    pub out: Vec<u8>,
    /// Where the normalized path is in `out` (the method ends one byte before it).
    path_at: std::ops::Range<usize>,
    /// The body's framing.
    pub body: Framing,
    /// The caller asked to close after this response (`Connection: close`).
    pub close: bool,
    /// A `HEAD` request: its response has no body.
    pub head: bool,
}

impl RequestHead {
    /// The method, as sent.
    pub fn method(&self) -> &str {
        self.text(0..self.path_at.start - 1)
    }

    /// The normalized path (what the policy matches and the application receives).
    pub fn path(&self) -> &str {
        self.text(self.path_at.clone())
    }

    fn text(&self, r: std::ops::Range<usize>) -> &str {
        // `out` was written from the method and the path, both `str`, at these offsets.
        std::str::from_utf8(&self.out[r]).unwrap_or_default()
    }
}

/// A response head from the application.
#[derive(Debug)]
pub struct ResponseHead {
    /// Bytes of the head in the input.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// The head to send to the caller, without its final empty line.
    pub out: Vec<u8>,
    /// The body's framing.
    pub body: Framing,
    /// The application will not take another request on this connection.
    pub close: bool,
}

/// Parses a request head from the start of `buf`, with at most `max_headers` headers.
pub fn parse_request(buf: &[u8], max_headers: usize) -> Parsed<RequestHead> {
    // Most heads have a handful of headers: a few slots on the stack first (zeroing all of
    // `max_headers` for every request costs more than parsing), the full count on the heap
    // when they are not enough.
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    if max_headers <= STACK_HEADERS {
        request_head(buf, &mut stack[..max_headers])
    } else {
        match request_head(buf, &mut stack) {
            Parsed::Fallback("too many headers") => {
                let mut heap = vec![httparse::EMPTY_HEADER; max_headers];
                request_head(buf, &mut heap)
            }
            other => other,
        }
    }
}

fn request_head<'b>(buf: &'b [u8], slots: &mut [httparse::Header<'b>]) -> Parsed<RequestHead> {
    let mut req = httparse::Request::new(slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Fallback("too many headers"),
        Err(_) => return Parsed::Fallback("malformed head"),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Fallback("not HTTP/1.1");
    };
    if method == "CONNECT" {
        return Parsed::Fallback("CONNECT");
    }
    if !target.starts_with('/') || !target.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Parsed::Fallback("target not in plain origin form");
    }
    if target.contains('#') {
        return Parsed::Fallback("fragment in target");
    }
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let Some(path) = crate::http::normalize_path(raw_path) else {
        return Parsed::Fallback("path cannot be normalized");
    };
    let headers = &*req.headers;
    let conn = match connection_tokens(headers) {
        Ok(c) => c,
        Err(why) => return Parsed::Fallback(why),
    };
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            return Parsed::Fallback("upgrade offered");
        }
        if name.eq_ignore_ascii_case("expect")
            && !trimmed(h.value).eq_ignore_ascii_case(b"100-continue")
        {
            return Parsed::Fallback("expectation other than 100-continue");
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !trimmed(h.value).eq_ignore_ascii_case(b"chunked") {
                return Parsed::Fallback("transfer-encoding other than chunked");
            }
            chunked = true;
        }
        if name.eq_ignore_ascii_case("content-length") {
            match (content_length(h.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Parsed::Fallback("content-length invalid or repeated"),
            }
        }
    }
    let body = match (chunked, length) {
        (true, Some(_)) => return Parsed::Fallback("both content-length and chunked"),
        (true, None) => Framing::Chunked(Chunked::default()),
        (false, Some(0) | None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    // Room for the body bytes read with the head, which follow it in the same write.
    let mut out = Vec::with_capacity(buf.len() + 16);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    let path_at = out.len()..out.len() + path.len();
    out.extend_from_slice(path.as_bytes());
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in headers {
        let keep_framing = chunked && h.name.eq_ignore_ascii_case("transfer-encoding");
        if keep_framing || !hop_by_hop(h.name, &conn.named) {
            push_header(&mut out, h.name, h.value);
        }
    }
    Parsed::Head(RequestHead {
        len,
        out,
        path_at,
        body,
        close: conn.close,
        head: method == "HEAD",
    })
}

/// Parses a response head from the start of `buf`, the answer to a request that was a `HEAD`
/// (`head`) or not. `Err` when the application's bytes are not a usable HTTP/1 response.
pub fn parse_response(buf: &[u8], head: bool) -> Result<Option<ResponseHead>, &'static str> {
    let mut stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
    match response_head(buf, head, &mut stack) {
        Err("too many response headers") => {
            let mut heap = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            response_head(buf, head, &mut heap)
        }
        other => other,
    }
}

fn response_head<'b>(
    buf: &'b [u8],
    head: bool,
    slots: &mut [httparse::Header<'b>],
) -> Result<Option<ResponseHead>, &'static str> {
    let mut resp = httparse::Response::new(slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
        Err(_) => return Err("malformed response head"),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err("malformed response head");
    };
    if status == 101 {
        return Err("switched protocols without an upgrade offered");
    }
    let headers = &*resp.headers;
    let conn = connection_tokens(headers).map_err(|_| "connection names a framing header")?;
    let mut length: Option<u64> = None;
    let mut coding: Option<&[u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if coding.is_some() {
                return Err("repeated transfer-encoding");
            }
            coding = Some(h.value);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            match (content_length(h.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err("content-length invalid or repeated"),
            }
        }
    }
    let chunked = coding.is_some_and(|c| {
        c.rsplit(|b| *b == b',')
            .next()
            .is_some_and(|last| trimmed(last).eq_ignore_ascii_case(b"chunked"))
    });
    let no_body = head || (100..200).contains(&status) || status == 204 || status == 304;
    let body = match (no_body, coding, length) {
        (true, ..) => Framing::Empty,
        (false, Some(_), _) if chunked => Framing::Chunked(Chunked::default()),
        (false, Some(_), _) => Framing::UntilClose,
        (false, None, Some(0)) => Framing::Empty,
        (false, None, Some(n)) => Framing::Length(n),
        (false, None, None) => Framing::UntilClose,
    };
    let mut out = Vec::with_capacity(len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in headers {
        // With a transfer coding, the length is the coding's business (RFC 9112 6.3).
        let dropped_length = coding.is_some() && h.name.eq_ignore_ascii_case("content-length");
        let keep_coding = h.name.eq_ignore_ascii_case("transfer-encoding") && !no_body;
        if !dropped_length && (keep_coding || !hop_by_hop(h.name, &conn.named)) {
            push_header(&mut out, h.name, h.value);
        }
    }
    Ok(Some(ResponseHead {
        len,
        status,
        out,
        body,
        close: conn.close || version == 0,
    }))
}

/// What the `Connection` headers say: `close`, and the headers they name (other than the
/// ones removed anyway).
struct ConnectionTokens<'a> {
    close: bool,
    named: Vec<&'a [u8]>,
}

fn connection_tokens<'a>(
    headers: &[httparse::Header<'a>],
) -> Result<ConnectionTokens<'a>, &'static str> {
    let mut c = ConnectionTokens {
        close: false,
        named: Vec::new(),
    };
    for h in headers {
        if !h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        for token in h.value.split(|b| *b == b',').map(trimmed) {
            if token.is_empty() {
                continue;
            }
            if token.eq_ignore_ascii_case(b"close") {
                c.close = true;
            } else if FRAMING
                .iter()
                .any(|f| token.eq_ignore_ascii_case(f.as_bytes()))
            {
                return Err("connection names a framing header");
            } else if !HOP_BY_HOP
                .iter()
                .any(|f| token.eq_ignore_ascii_case(f.as_bytes()))
            {
                c.named.push(token);
            }
        }
    }
    Ok(c)
}

fn hop_by_hop(name: &str, named: &[&[u8]]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || name.eq_ignore_ascii_case("transfer-encoding")
        || name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
        || named
            .iter()
            .any(|n| name.as_bytes().eq_ignore_ascii_case(n))
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn trimmed(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// A `Content-Length` value: digits only (at most 18, so it fits), no sign, no list.
fn content_length(v: &[u8]) -> Option<u64> {
    let v = trimmed(v);
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The longest chunk-size line (with extensions) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a chunked body is: the scanner's state between calls to [`Chunked::scan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes of the current size line or of the trailer section so far.
    line: usize,
    size: u64,
    digits: u32,
    /// Payload bytes seen (without the framing).
    pub data: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ChunkState {
    /// In the hex digits of a chunk size.
    #[default]
    Size,
    /// After the digits: extensions until CR.
    Extension,
    /// CR seen at the end of the size line.
    SizeLf,
    /// In chunk data, this many bytes left.
    Data(u64),
    /// After the data: CR expected.
    DataCr,
    /// After the data's CR: LF expected.
    DataLf,
    /// At the start of a trailer line (an empty one ends the body).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// CR seen at the end of a trailer line.
    TrailerLf,
    /// CR seen on the empty last line.
    EndLf,
    /// The body is complete.
    Done,
}

impl Chunked {
    /// Whether the body's last byte has been seen.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Scans `input`, the body's next bytes; returns how many of them belong to the body (all
    /// of them unless it ended inside). `Err` when they are not valid chunked framing.
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(left) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    self.data += n as u64;
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                    continue;
                }
                ChunkState::Size => {
                    self.line += 1;
                    if let Some(d) = (b as char).to_digit(16) {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + u64::from(d);
                    } else if self.digits == 0 {
                        return Err("chunk size missing");
                    } else if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = ChunkState::Extension;
                    } else {
                        return Err("invalid chunk size");
                    }
                }
                ChunkState::Extension => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err("chunk extension too long");
                    }
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err("invalid byte in chunk extension");
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err("chunk size line without CRLF");
                    }
                    self.line = 0;
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data(self.size)
                    };
                    self.size = 0;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err("chunk data without CRLF");
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err("chunk data without CRLF");
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart | ChunkState::Trailer => {
                    self.line += 1;
                    if self.line > MAX_TRAILERS {
                        return Err("trailer section too long");
                    }
                    let start = self.state == ChunkState::TrailerStart;
                    if b == b'\r' {
                        self.state = if start {
                            ChunkState::EndLf
                        } else {
                            ChunkState::TrailerLf
                        };
                    } else if start && (b == b' ' || b == b'\t') {
                        return Err("folded trailer line");
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err("invalid byte in trailer");
                    } else {
                        self.state = ChunkState::Trailer;
                    }
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err("trailer line without CRLF");
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err("chunked body without its final CRLF");
                    }
                    self.state = ChunkState::Done;
                    return Ok(i + 1);
                }
            }
            if self.line > MAX_CHUNK_LINE && self.state == ChunkState::Size {
                return Err("chunk size line too long");
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests;
