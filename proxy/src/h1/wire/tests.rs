use super::*;

fn head(bytes: &[u8]) -> RequestHead {
    match parse_request(bytes, 100) {
        Parsed::Head(h) => h,
        other => panic!("{other:?} for {:?}", String::from_utf8_lossy(bytes)),
    }
}

fn fallback(bytes: &[u8]) -> &'static str {
    match parse_request(bytes, 100) {
        Parsed::Fallback(why) => why,
        other => panic!("{other:?} for {:?}", String::from_utf8_lossy(bytes)),
    }
}

fn text(out: &[u8]) -> &str {
    std::str::from_utf8(out).unwrap()
}

#[test]
fn a_plain_request_is_rewritten_without_hop_by_hop_headers() {
    let raw = b"GET /a/./b/../c?x=1 HTTP/1.1\r\nHost: api\r\nConnection: keep-alive, X-Secret\r\n\
        X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: x\r\n\
        Accept: */*\r\n\r\nNEXT";
    let h = head(raw);
    assert_eq!(h.len, raw.len() - 4);
    assert_eq!(h.method(), "GET");
    assert_eq!(h.path(), "/a/c");
    assert_eq!(h.body, Framing::Empty);
    assert!(!h.close && !h.head);
    assert_eq!(
        text(&h.out),
        "GET /a/c?x=1 HTTP/1.1\r\nHost: api\r\nAccept: */*\r\n"
    );
}

#[test]
fn framing_is_read_from_the_head() {
    let h = head(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
    assert_eq!(h.body, Framing::Length(5));
    assert!(text(&h.out).contains("Content-Length: 5\r\n"));
    let h = head(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(h.body, Framing::Empty);
    let h = head(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\ncontent-length: 7\r\n\r\n");
    assert_eq!(h.body, Framing::Length(7));
    let h = head(b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  chunked \r\n\r\n");
    assert_eq!(h.body, Framing::Chunked(Chunked::default()));
    // Relayed as it came: the coding stays.
    assert!(
        text(&h.out).ends_with("Transfer-Encoding: chunked\r\n"),
        "{}",
        text(&h.out)
    );
    // The expectation is the application's to answer: it goes along.
    let h =
        head(b"PUT /p HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 9\r\n\r\n");
    assert!(text(&h.out).contains("Expect: 100-Continue\r\n"));
    let h = head(b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert!(h.head && h.close);
}

#[test]
fn anything_unusual_goes_to_the_full_server() {
    for (raw, why) in [
        (&b"GET / HTTP/1.0\r\n\r\n"[..], "not HTTP/1.1"),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n", "CONNECT"),
        (
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            "target not in plain origin form",
        ),
        (
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            "target not in plain origin form",
        ),
        (b"GET /%2f HTTP/1.1\r\n\r\n", "path cannot be normalized"),
        (b"GET /../x HTTP/1.1\r\n\r\n", "path cannot be normalized"),
        (
            b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "upgrade offered",
        ),
        (b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", "upgrade offered"),
        (
            b"PUT / HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\n",
            "expectation other than 100-continue",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "transfer-encoding other than chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "transfer-encoding other than chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "both content-length and chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "content-length invalid or repeated",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "content-length invalid or repeated",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            "content-length invalid or repeated",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "content-length invalid or repeated",
        ),
        (
            b"GET / HTTP/1.1\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n",
            "connection names a framing header",
        ),
        (
            b"GET / HTTP/1.1\r\nConnection: Host\r\n\r\n",
            "connection names a framing header",
        ),
        (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", "malformed head"),
        (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", "malformed head"),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", "malformed head"),
    ] {
        assert_eq!(fallback(raw), why, "{:?}", String::from_utf8_lossy(raw));
    }
    let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
    assert_eq!(fallback(raw.as_bytes()), "too many headers");
    // Over the stack's header slots, counted on the heap.
    let many: String = (0..150).map(|i| format!("x-{i}: v\r\n")).collect();
    let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
    assert!(matches!(
        parse_request(raw.as_bytes(), 200),
        Parsed::Head(_)
    ));
}

#[test]
fn partial_heads_ask_for_more() {
    let raw = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    for n in 1..raw.len() {
        assert!(
            matches!(parse_request(&raw[..n], 100), Parsed::Partial),
            "{n} bytes"
        );
    }
    assert!(matches!(parse_request(raw, 100), Parsed::Head(_)));
}

#[test]
fn responses_are_framed_and_rewritten() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nServer: s\r\n\r\nabc";
    let r = parse_response(raw, false).unwrap().unwrap();
    assert_eq!((r.status, r.len, r.close), (200, raw.len() - 3, false));
    assert_eq!(r.body, Framing::Length(3));
    assert_eq!(
        text(&r.out),
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: s\r\n"
    );
    let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true)
        .unwrap()
        .unwrap();
    assert_eq!(r.body, Framing::Empty, "a HEAD response has no body");
    assert!(text(&r.out).contains("Content-Length: 3"));
    for status in ["204 No Content", "304 Not Modified", "103 Early Hints"] {
        let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 9\r\n\r\n");
        let r = parse_response(raw.as_bytes(), false).unwrap().unwrap();
        assert_eq!(r.body, Framing::Empty, "{status}");
    }
    let r = parse_response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        false,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.body, Framing::Chunked(Chunked::default()));
    assert_eq!(
        text(&r.out),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",
        "the length goes when a coding frames the body"
    );
    let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false)
        .unwrap()
        .unwrap();
    assert_eq!(r.body, Framing::UntilClose);
    let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false)
        .unwrap()
        .unwrap();
    assert_eq!(r.body, Framing::UntilClose);
    assert!(r.close);
    assert!(text(&r.out).starts_with("HTTP/1.1 200 OK\r\n"));
    let r = parse_response(
        b"HTTP/1.1 500 \r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        false,
    )
    .unwrap()
    .unwrap();
    assert!(r.close);
    assert_eq!(r.body, Framing::Empty);
    assert_eq!(
        parse_response(b"HTTP/1.1 200 OK\r\nContent", false)
            .unwrap()
            .map(|r| r.status),
        None
    );
}

#[test]
fn unusable_responses_are_refused() {
    for raw in [
        &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SSH-2.0-x\r\n\r\n",
    ] {
        assert!(
            parse_response(raw, false).is_err(),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
}

/// Scans `input` in pieces of `step` bytes; returns the body's length, its payload and
/// whether it ended.
fn scan_in_steps(input: &[u8], step: usize) -> Result<(usize, u64, bool), &'static str> {
    let mut c = Chunked::default();
    let mut at = 0;
    while at < input.len() && !c.done() {
        let end = (at + step).min(input.len());
        let n = c.scan(&input[at..end])?;
        at += n;
        if at < end {
            break;
        }
    }
    Ok((at, c.data, c.done()))
}

#[test]
fn chunked_bodies_end_where_they_end_whatever_the_reads() {
    let body = b"5\r\nhello\r\n6;name=\"v\"\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
    let mut input = body.to_vec();
    input.extend_from_slice(b"GET / HTTP/1.1\r\n");
    for step in [1, 2, 3, 7, 16, 1000] {
        assert_eq!(
            scan_in_steps(&input, step),
            Ok((body.len(), 11, true)),
            "step {step}"
        );
    }
    assert_eq!(scan_in_steps(b"0\r\n\r\n", 1), Ok((5, 0, true)));
    assert_eq!(
        scan_in_steps(b"A\r\n0123456789\r\n", 4),
        Ok((15, 10, false))
    );
    assert_eq!(scan_in_steps(b"fF\r\n", 1), Ok((4, 0, false)));
}

#[test]
fn malformed_chunked_framing_is_refused() {
    for bad in [
        &b"\r\n"[..],
        b"g\r\n",
        b"5\nhello\r\n",
        b"5\r\nhelloXX",
        b"5\r\nhello\n",
        b"1000000000000000\r\n",
        b"5;\nx",
        b"0\r\nX: 1\n",
        b"0\r\n folded\r\n",
        b"0\r\nX: \x00\r\n",
        b"0\r\n\rX",
        b"-1\r\n",
    ] {
        assert!(
            Chunked::default().scan(bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = [b'1', b';']
        .into_iter()
        .chain(std::iter::repeat_n(b'a', MAX_CHUNK_LINE))
        .collect::<Vec<u8>>();
    assert!(Chunked::default().scan(&long).is_err());
    let mut trailers = b"0\r\n".to_vec();
    trailers.extend(std::iter::repeat_n(b'a', MAX_TRAILERS + 1));
    assert!(Chunked::default().scan(&trailers).is_err());
}
