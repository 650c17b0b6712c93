//! The proxy's resource limits, each hit and shown refused or closed, with its metric
//! (`meshid_proxy_limited_connections_total{reason}`) and, for the connection cap, its log:
//! `max_connections` (a connection past it is closed at once, before TLS; logged once per
//! burst; accepted again when one closes; when the listener is full of handshakes in progress,
//! the oldest is shed for the newcomer instead), `http_header_timeout` (a request head trickled
//! in is closed), `http_max_header_bytes` and `http_max_headers` (431),
//! `http_max_requests_per_connection` (closed after the last response), `idle_timeout` (an
//! HTTP request body that stops arriving, and an opaque connection that moves nothing, are
//! closed).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use meshid_tests::{Ca, Proxy};

use super::support::*;
use super::ALLOW_WEB_TO_API;

const LIMITED: &str = "meshid_proxy_limited_connections_total";

fn limited(p: &Proxy, listener: &str, reason: &str) -> f64 {
    p.metric(
        LIMITED,
        &[
            ("direction", "inbound"),
            ("listener", listener),
            ("reason", reason),
        ],
    )
}

/// Reads until EOF, an error, or `within`; `Some(elapsed)` when the peer closed.
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some((start.elapsed(), got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None
            }
            Err(_) => return Some((start.elapsed(), got)),
        }
    }
}

/// Whether the connection is still open (nothing to read, no EOF) after `wait`.
fn still_open(s: &mut TcpStream, wait: Duration) -> bool {
    closed_within(s, wait).is_none()
}

fn wait_metric(p: &Proxy, listener: &str, reason: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = limited(p, listener, reason);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{LIMITED}{{listener={listener},reason={reason}}} = {v}, want {at_least}:\n{}",
            p.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn proxy_limits_refuse_and_close_with_their_metric() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (node1, node2) = web_and_api_nodes(dir, &ca, "1h");
    let http = HttpBackend::start();
    let echo = EchoBackend::start();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, super::BOTH_WAYS).unwrap();
    let (api_http, api_tcp, web_http, web_tcp) =
        (local_addr(), local_addr(), local_addr(), local_addr());
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(
            dir,
            "api",
            &node2,
            &id("api"),
            Some(&policy),
            "max_connections = 3\nidle_timeout = \"3s\"\nhttp_header_timeout = \"1s\"\nhttp_max_header_bytes = 8192\nhttp_max_headers = 20\nhttp_max_requests_per_connection = 3\n",
        ) + &inbound("api-http", &api_http, http.addr(), 8080, "detect")
            + &inbound("api-tcp", &api_tcp, echo.addr(), 8080, "tcp")),
    );
    let mut web = Proxy::start(
        dir,
        "web",
        &(proxy_head(dir, "web", &node1, &id("web"), None, "")
            + &outbound("to-api-http", &web_http, &api_http, &id("api"))
            + &outbound("to-api-tcp", &web_tcp, &api_tcp, &id("api"))),
    );
    wait_ready(&mut [&mut api, &mut web]);
    assert!(api.proc.log_text().contains("\"max_connections\":3"));
    // The descriptor table was sized at start for both listeners full (2 × 3 × 2 + 256), so it
    // does not grow, stalling the proxy, under load. Four connections would fit the 64 of a
    // new process.
    assert!(api.proc.log_text().contains("\"descriptor_table\":268"));
    let table = meshid_tests::fd_table_size(api.proc.id());
    assert!(table >= 268, "api's descriptor table holds {table}");
    // Its listeners ask for the largest accept queue the kernel allows.
    let port = api_http.rsplit(':').next().unwrap().parse().unwrap();
    let (queue, expected) = meshid_tests::listen_queue(port, meshid_api::server::LISTEN_BACKLOG);
    assert_eq!(queue, expected, "api-http's accept queue");

    // A request passes; the limits are not in the way of ordinary traffic.
    let r = request_once(&web_http, "GET", "/ok").unwrap();
    assert_eq!(r.status, 200);

    // http_header_timeout: a head that never completes is closed after about a second.
    let mut s = TcpStream::connect(&web_http).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: api\r\nx-a: 1\r\n")
        .unwrap();
    let (took, _) =
        closed_within(&mut s, Duration::from_secs(8)).expect("a trickled request head is closed");
    assert!(took >= Duration::from_millis(500), "closed after {took:?}");
    wait_metric(&api, "api-http", "header_timeout", 1.0);

    // http_max_header_bytes: a 10 KiB header is answered 431 and never reaches the app.
    let before = http.requests();
    let mut s = TcpStream::connect(&web_http).unwrap();
    let big = format!(
        "GET /big HTTP/1.1\r\nhost: api\r\nx-big: {}\r\n\r\n",
        "a".repeat(10 * 1024)
    );
    s.write_all(big.as_bytes()).unwrap();
    let (_, got) = closed_within(&mut s, Duration::from_secs(8)).expect("closed after 431");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(http.requests(), before);
    wait_metric(&api, "api-http", "header_too_large", 1.0);

    // http_max_headers: 25 small header fields are too many (431), 15 pass.
    let many = |n: usize| {
        let mut s = TcpStream::connect(&web_http).unwrap();
        let fields: String = (0..n).map(|i| format!("x-f{i}: v\r\n")).collect();
        s.write_all(
            format!("GET /many HTTP/1.1\r\nhost: api\r\n{fields}connection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let (_, got) = closed_within(&mut s, Duration::from_secs(8)).expect("answered and closed");
        String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert!(many(25).starts_with("HTTP/1.1 431"));
    assert!(many(15).starts_with("HTTP/1.1 200"));
    wait_metric(&api, "api-http", "header_too_large", 2.0);

    // http_max_requests_per_connection: the third request on a connection is answered with
    // `connection: close`, and the connection is closed after it.
    let mut c = HttpConn::connect(&web_http).unwrap();
    for _ in 0..3 {
        assert_eq!(c.request("GET", "/three", false).unwrap().status, 200);
    }
    let mut raw = c.into_stream();
    assert!(
        closed_within(&mut raw, Duration::from_secs(3)).is_some(),
        "closed after its third request"
    );
    wait_metric(&api, "api-http", "max_requests", 1.0);

    // idle_timeout: an opaque connection that moves bytes stays; once silent, it is closed.
    let mut s = TcpStream::connect(&web_tcp).unwrap();
    for _ in 0..3 {
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
        std::thread::sleep(Duration::from_millis(600));
    }
    let (took, _) =
        closed_within(&mut s, Duration::from_secs(10)).expect("a silent connection is closed");
    assert!(took >= Duration::from_millis(2900), "closed after {took:?}");
    wait_metric(&api, "api-tcp", "idle_timeout", 1.0);

    // idle_timeout on HTTP: a request whose body stops arriving is closed once nothing has
    // moved for the timeout (the application is waiting for the rest of the body too).
    let mut s = TcpStream::connect(&web_http).unwrap();
    s.write_all(b"POST /stall HTTP/1.1\r\nhost: api\r\ncontent-length: 100\r\n\r\n0123456789")
        .unwrap();
    let (took, got) =
        closed_within(&mut s, Duration::from_secs(10)).expect("a stalled request body is closed");
    assert!(took >= Duration::from_millis(2900), "closed after {took:?}");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    wait_metric(&api, "api-http", "idle_timeout", 1.0);

    // A listener full of handshakes in progress (3 silent connections) takes a newcomer by
    // shedding the oldest of them.
    let shed = limited(&api, "api-tcp", "handshake_shed");
    let mut silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&api_tcp).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut newcomer = TcpStream::connect(&api_tcp).unwrap();
    assert!(
        closed_within(&mut silent[0], Duration::from_secs(2)).is_some(),
        "the oldest handshake in progress was shed for the newcomer"
    );
    assert!(
        still_open(&mut newcomer, Duration::from_millis(200)),
        "admitted"
    );
    wait_metric(&api, "api-tcp", "handshake_shed", shed + 1.0);
    drop(silent);
    drop(newcomer);
    std::thread::sleep(Duration::from_millis(300));

    // max_connections: 3 established connections (through web's proxy) fill api-tcp; a fourth
    // is closed at once, before any TLS byte, and the burst is logged once; when one closes,
    // the next is accepted.
    let skip = count_events(
        &api,
        "listener full: refusing new connections until some close",
        &[],
    );
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(&web_tcp).unwrap();
            s.write_all(b"hold").unwrap();
            let mut back = [0u8; 4];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.read_exact(&mut back).unwrap();
            s
        })
        .collect();
    for _ in 0..3 {
        let mut extra = TcpStream::connect(&api_tcp).unwrap();
        let (took, got) = closed_within(&mut extra, Duration::from_secs(2))
            .expect("a connection past max_connections is closed at once");
        assert!(got.is_empty(), "no TLS byte before the refusal");
        assert!(took < Duration::from_secs(1), "refused after {took:?}");
    }
    wait_metric(&api, "api-tcp", "max_connections", 3.0);
    let full = wait_event(
        &api,
        skip,
        "listener full: refusing new connections until some close",
        &[("listener", "api-tcp")],
    );
    assert_eq!(field_str(&full, "max_connections").as_deref(), Some("3"));
    assert_eq!(
        count_events(
            &api,
            "listener full: refusing new connections until some close",
            &[]
        ),
        skip + 1,
        "logged once per burst"
    );
    // The other listener is not affected.
    assert_eq!(request_once(&web_http, "GET", "/ok").unwrap().status, 200);
    for s in &mut held {
        assert!(still_open(s, Duration::from_millis(100)));
    }
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut next = loop {
        let mut s = TcpStream::connect(&api_tcp).unwrap();
        if still_open(&mut s, Duration::from_millis(300)) {
            break s;
        }
        assert!(Instant::now() < deadline, "no connection accepted again");
    };
    wait_event(
        &api,
        0,
        "listener accepting again",
        &[("listener", "api-tcp")],
    );
    next.write_all(b"not tls").unwrap();
    drop(next);
    drop(held);
    let log = api.proc.log_text() + &web.proc.log_text();
    assert!(!log.contains("PRIVATE KEY"));
}

/// api's policy for [`proxy_denied_caller_gets_one_request_and_is_closed`]: web may only GET
/// /public on port 8081, so on 8080 it is denied outright and on 8081 per request.
const WEB_PUBLIC_ONLY: &str = r#"name: web-public-only
default: deny
rules:
  - name: web-public
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8081]
    http: {methods: [GET], paths: ["/public/**"]}
"#;

/// The HTTP/2 client preface and an empty SETTINGS frame: a connection that opens no stream.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[test]
fn proxy_denied_caller_gets_one_request_and_is_closed() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let (node1, node2) = web_and_api_nodes(dir, &ca, "1h");
    let http = HttpBackend::start();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, WEB_PUBLIC_ONLY).unwrap();
    let (api_8080, api_8081, web_8080, web_8081) =
        (local_addr(), local_addr(), local_addr(), local_addr());
    // Default limits (http_header_timeout is 30 s), except 4 handshakes in progress.
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(
            dir,
            "api",
            &node2,
            &id("api"),
            Some(&policy),
            "max_handshakes = 4\n",
        ) + &inbound("api-8080", &api_8080, http.addr(), 8080, "detect")
            + &inbound("api-8081", &api_8081, http.addr(), 8081, "http")),
    );
    let mut web = Proxy::start(
        dir,
        "web",
        &(proxy_head(dir, "web", &node1, &id("web"), None, "")
            + &outbound("to-8080", &web_8080, &api_8080, &id("api"))
            + &outbound("to-8081", &web_8081, &api_8081, &id("api"))),
    );
    wait_ready(&mut [&mut api, &mut web]);
    let api_log = access_log_path(dir, "api");

    // Denied outright (port 8080): a kept-alive HTTP/1.1 request is answered 403, logged with
    // its method and path, and the connection is closed behind it.
    let mut c = HttpConn::connect(&web_8080).unwrap();
    let r = c.request("GET", "/anything", false).unwrap();
    assert_eq!(r.status, 403);
    let mut raw = c.into_stream();
    let (took, rest) = closed_within(&mut raw, Duration::from_secs(5))
        .expect("a denied caller's connection is closed after its one response");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    assert!(wait_record(
        &api_log,
        &[
            ("path", Some("/anything")),
            ("status", Some("403")),
            ("listener", Some("api-8080"))
        ],
        Duration::from_secs(5)
    ));
    assert_eq!(http.requests(), 0, "nothing reached the application");

    // A head trickled in by a denied caller is closed after 1 s, not http_header_timeout.
    let mut s = TcpStream::connect(&web_8080).unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: api\r\n").unwrap();
    let (took, _) = closed_within(&mut s, Duration::from_secs(10)).expect("closed");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );

    // HTTP/2 from a denied caller that opens no stream: closed within about a second too.
    let mut s = TcpStream::connect(&web_8080).unwrap();
    s.write_all(H2_PREFACE_AND_SETTINGS).unwrap();
    let (took, _) = closed_within(&mut s, Duration::from_secs(10)).expect("closed");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );

    // Opaque bytes from a denied caller: closed at once (after the 200 ms detection).
    let mut s = TcpStream::connect(&web_8080).unwrap();
    s.write_all(b"\x00\x01binary").unwrap();
    let (took, _) = closed_within(&mut s, Duration::from_secs(5)).expect("closed");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");

    // The control: on 8081 the decision depends on the request, so a refused request leaves
    // the connection open for the next, allowed one.
    let mut c = HttpConn::connect(&web_8081).unwrap();
    assert_eq!(c.request("DELETE", "/public/x", false).unwrap().status, 403);
    assert_eq!(c.request("GET", "/public/x", false).unwrap().status, 200);
    assert_eq!(http.requests(), 1);

    // max_handshakes: 4 connections that send no TLS byte fill api-8081's handshakes; a
    // legitimate caller still gets through, shedding the oldest, which is closed at once.
    let skip = count_events(
        &api,
        "handshakes in progress at max_handshakes: shedding the oldest",
        &[],
    );
    let mut silent: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&api_8081).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let r = request_once(&web_8081, "GET", "/public/shed").unwrap();
    assert_eq!(r.status, 200);
    let (took, got) = closed_within(&mut silent[0], Duration::from_secs(3))
        .expect("the oldest silent handshake is shed");
    assert!(got.is_empty() && took < Duration::from_secs(2), "{took:?}");
    for s in &mut silent[2..] {
        assert!(
            still_open(s, Duration::from_millis(100)),
            "younger ones stay"
        );
    }
    assert!(
        limited(&api, "api-8081", "handshake_shed") >= 1.0,
        "{}",
        api.metrics()
    );
    let line = wait_event(
        &api,
        skip,
        "handshakes in progress at max_handshakes: shedding the oldest",
        &[("listener", "api-8081")],
    );
    assert_eq!(field_str(&line, "max_handshakes").as_deref(), Some("4"));
}

/// A TCP connection to `to` from the local address `source` (another loopback address plays
/// another host).
fn connect_from(source: &str, to: &str) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let s = sock.connect(to.parse().unwrap()).await.unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

#[test]
fn proxy_handshakes_per_source_wait_their_turn() {
    let _serial = serial();
    let mesh = WebToApi::start_with(
        "1h",
        ALLOW_WEB_TO_API,
        None,
        "max_handshakes_per_source = 2\n",
    );
    let (api, api_in, web_out) = (&mesh.api, &mesh.api_in, &mesh.web_out);
    let skip = count_events(
        api,
        "handshakes in progress from one source at max_handshakes_per_source: its new connections wait their turn",
        &[],
    );

    // 127.0.0.2, another host: two connections that send no TLS byte hold its two turns; its
    // third sends bytes (not a ClientHello) and waits: nothing reads them, so nothing answers.
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect_from("127.0.0.2", api_in)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut third = connect_from("127.0.0.2", api_in);
    third.write_all(b"not a ClientHello\r\n").unwrap();
    assert!(
        still_open(&mut third, Duration::from_millis(500)),
        "the third from a busy source waits its turn"
    );
    assert_eq!(
        wait_metric(api, "api-in", "handshakes_per_source", 1.0),
        1.0
    );
    let line = wait_event(
        api,
        skip,
        "handshakes in progress from one source at max_handshakes_per_source: its new connections wait their turn",
        &[("listener", "api-in"), ("source", "127.0.0.2")],
    );
    assert_eq!(
        field_str(&line, "max_handshakes_per_source").as_deref(),
        Some("2")
    );

    // Another source (web's proxy, on 127.0.0.1) is not held up by 127.0.0.2's.
    let t = Instant::now();
    let r = request_once(web_out, "GET", "/turn").unwrap();
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // One of 127.0.0.2's ends: the third gets its turn, its bytes are read, and its handshake
    // fails and is closed, well before handshake_timeout (10 s).
    drop(held.remove(0));
    let (took, _) = closed_within(&mut third, Duration::from_secs(5))
        .expect("the waiting connection gets its turn when one ends");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(still_open(&mut held[0], Duration::from_millis(100)));
    assert_eq!(limited(api, "api-in", "handshakes_per_source"), 1.0);
}
