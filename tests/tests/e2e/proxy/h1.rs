//! The inbound HTTP/1.1 fast path (`proxy/src/h1.rs`) between independent peers: curl as the
//! caller (through web's outbound listener, so api's inbound listener sees curl's bytes) and
//! an application that writes its responses byte for byte, so every framing an HTTP/1.1
//! server may use reaches the proxy exactly as written.

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::support::{read_head, wait_record, Head, WebToApi, IO_TIMEOUT};

const POLICY: &str = r#"name: fast-path
default: deny
ports: {8080: http}
rules:
  - name: web-calls
    from: ["spiffe://example.org/web"]
    to: ["spiffe://example.org/api"]
    ports: [8080]
    http:
      methods: [GET, HEAD, POST, PUT]
      paths: ["/", "/a/**", "/echo", "/chunked", "/until-close", "/no-content", "/early-hints",
              "/big", "/hang-up", "/garbage", "/reject-early", "/then-close", "/p/**"]
"#;

/// Bytes of `/big`'s body.
const BIG: usize = 4 << 20;

fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// The application: answers by path, writing raw bytes; records every request head it read.
struct App {
    addr: String,
    heads: Arc<Mutex<Vec<Head>>>,
}

impl App {
    fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let seen = seen.clone();
                std::thread::spawn(move || serve(stream, &seen));
            }
        });
        App { addr, heads }
    }

    /// The request heads the application has read whose request line contains `what`.
    fn seen(&self, what: &str) -> Vec<Head> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.start.contains(what))
            .map(|h| Head {
                start: h.start.clone(),
                headers: h.headers.clone(),
            })
            .collect()
    }
}

fn serve(stream: TcpStream, seen: &Mutex<Vec<Head>>) {
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    loop {
        let Ok(Some(head)) = read_head(&mut r) else {
            return;
        };
        let method = head.start.split(' ').next().unwrap_or_default().to_owned();
        let path = head.start.split(' ').nth(1).unwrap_or_default().to_owned();
        let path = path.split('?').next().unwrap_or_default().to_owned();
        seen.lock().unwrap().push(Head {
            start: head.start.clone(),
            headers: head.headers.clone(),
        });
        if path == "/reject-early" {
            // Refuses before reading the body, and closes.
            let _ = w.write_all(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 4\r\n\r\nbig\n");
            return;
        }
        if head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        let Ok(body) = head.read_body(&mut r) else {
            return;
        };
        let ok = |w: &mut TcpStream, bytes: &[u8]| w.write_all(bytes).is_ok();
        let sent = match (method.as_str(), path.as_str()) {
            ("HEAD", _) => ok(&mut w, b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
            (_, "/echo") => {
                let mut out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                    .into_bytes();
                out.extend_from_slice(&body);
                ok(&mut w, &out)
            }
            (_, "/chunked") => ok(
                &mut w,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n\
                  5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
            ),
            (_, "/until-close") => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ");
                std::thread::sleep(Duration::from_millis(50));
                let _ = w.write_all(b"close\n");
                return;
            }
            (_, "/no-content") => ok(&mut w, b"HTTP/1.1 204 No Content\r\n\r\n"),
            (_, "/early-hints") => ok(
                &mut w,
                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
                  HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
            ),
            (_, "/big") => {
                let mut out =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
                out.extend_from_slice(&big_body());
                ok(&mut w, &out)
            }
            (_, "/hang-up") => return,
            (_, "/garbage") => {
                let _ = w.write_all(b"NOT HTTP AT ALL\r\n\r\n");
                return;
            }
            (_, "/then-close") => {
                // Answers, then closes without saying so: the pooled connection goes stale.
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
                return;
            }
            _ => ok(
                &mut w,
                format!(
                    "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-app-hop\r\nx-app-hop: 1\r\n\
                     keep-alive: timeout=5\r\ncontent-length: {}\r\n\r\n{method} {path}\n",
                    method.len() + path.len() + 2
                )
                .as_bytes(),
            ),
        };
        if !sent {
            return;
        }
    }
}

/// curl through web's outbound listener: (status, body, stderr). `args` go before the URL.
fn curl(web_out: &str, path: &str, args: &[&str]) -> (u16, Vec<u8>, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "-m",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(format!("http://{web_out}{path}"))
        .output()
        .unwrap();
    let mut body = out.stdout;
    let nl = body.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let status = String::from_utf8_lossy(&body[nl..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(nl);
    (
        status,
        body,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `raw` on a new connection to `addr` and reads until the peer closes (or 5 s).
fn raw_exchange(addr: &str, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(raw).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

fn access_records(dir: &Path) -> Vec<serde_json::Value> {
    super::support::json_lines(&dir.join("api-access.log"))
}

#[test]
fn proxy_http1_fast_path_relays_every_framing_between_independent_peers() {
    let _serial = super::support::serial();
    let app = App::start();
    let mesh = WebToApi::start_to("1h", POLICY, Some(&app.addr));
    let web_out = mesh.web_out.clone();
    let dir = mesh.tmp.path().to_owned();

    // Hop-by-hop headers go, the path is normalized, and so is the response's.
    let (status, body, err) = curl(
        &web_out,
        "/a/./b/../c?q=1",
        &[
            "--path-as-is",
            "-i",
            "-H",
            "Connection: x-hop",
            "-H",
            "X-Hop: 1",
            "-H",
            "Keep-Alive: timeout=1",
            "-H",
            "Proxy-Authorization: Basic eA==",
            "-H",
            "X-End: 2",
        ],
    );
    assert_eq!(status, 200, "{err}");
    let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(text.ends_with("get /a/c\n"), "{text}");
    assert!(
        !text.contains("x-app-hop") && !text.contains("keep-alive"),
        "{text}"
    );
    let head = app.seen("/a/c").pop().expect("the app saw the request");
    assert_eq!(head.start, "GET /a/c?q=1 HTTP/1.1");
    for gone in ["connection", "x-hop", "keep-alive", "proxy-authorization"] {
        assert!(head.header(gone).is_none(), "{gone} reached the app");
    }
    assert_eq!(head.header("x-end"), Some("2"));
    assert_eq!(head.header("host"), Some(web_out.as_str()));

    // Request bodies, chunked and sized, both ways intact.
    let upload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let file = dir.join("upload.bin");
    std::fs::write(&file, &upload).unwrap();
    let data = format!("@{}", file.display());
    let (status, body, err) = curl(
        &web_out,
        "/echo",
        &["-H", "Transfer-Encoding: chunked", "--data-binary", &data],
    );
    assert_eq!((status, sha(&body)), (200, sha(&upload)), "{err}");
    let head = app.seen("POST /echo").pop().unwrap();
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    let (status, body, err) = curl(&web_out, "/echo", &["-X", "PUT", "--data-binary", &data]);
    assert_eq!((status, sha(&body)), (200, sha(&upload)), "{err}");
    assert!(
        wait_record(
            &dir.join("api-access.log"),
            &[
                ("method", Some("PUT")),
                ("path", Some("/echo")),
                ("status", Some("200")),
                ("bytes_in", Some("300000")),
                ("bytes_out", Some("300000")),
            ],
            Duration::from_secs(5),
        ),
        "{:?}",
        access_records(&dir).last()
    );

    // Response framings: chunked with a trailer, until close, none, informational first.
    let (status, body, err) = curl(&web_out, "/chunked", &[]);
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"hello world"[..]),
        "{err}"
    );
    let (status, body, err) = curl(&web_out, "/until-close", &[]);
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"until close\n"[..]),
        "{err}"
    );
    let (status, body, err) = curl(&web_out, "/no-content", &[]);
    assert_eq!((status, body.len()), (204, 0), "{err}");
    let (status, body, err) = curl(&web_out, "/early-hints", &[]);
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]), "{err}");
    let (status, body, err) = curl(&web_out, "/", &["-I"]);
    let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert_eq!(status, 200, "{err}");
    assert!(text.contains("content-length: 10"), "{text}");
    let (status, body, err) = curl(&web_out, "/big", &[]);
    assert_eq!((status, body.len()), (200, BIG), "{err}");
    assert_eq!(sha(&body), sha(&big_body()));
    assert!(wait_record(
        &dir.join("api-access.log"),
        &[
            ("path", Some("/big")),
            ("bytes_out", Some(&BIG.to_string()))
        ],
        Duration::from_secs(5),
    ));

    // Several requests on one connection (curl reuses it), and pipelined in one write.
    let (status, _, err) = curl(&web_out, "/p/1", &["-v", &format!("http://{web_out}/p/2")]);
    assert_eq!(status, 200);
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "{err}"
    );
    let got = raw_exchange(
        &web_out,
        b"GET /p/3 HTTP/1.1\r\nhost: a\r\n\r\nPOST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhelloGET /p/4 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    let statuses = got.matches("HTTP/1.1 200 OK").count();
    assert_eq!(statuses, 3, "{got}");
    let (p3, rest) = got.split_once("GET /p/3\n").expect(&got);
    assert!(!p3.contains("hello"));
    let (echo, p4) = rest.split_once("hello").expect(rest);
    assert!(echo.contains("content-length: 5"), "{echo}");
    assert!(p4.ends_with("GET /p/4\n"), "{p4}");

    // Refusals: not allowed (403), the application failing or hanging up (502), broken chunks
    // (400). Both lengths at once go to the full server, which reads the chunked one (RFC 9112
    // section 6.3) and then closes: what follows is never read as a request.
    assert_eq!(curl(&web_out, "/forbidden", &[]).0, 403);
    assert!(app.seen("/forbidden").is_empty());
    assert_eq!(curl(&web_out, "/hang-up", &[]).0, 502);
    assert_eq!(curl(&web_out, "/garbage", &[]).0, 502);
    let got = raw_exchange(
        &web_out,
        b"POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /forbidden HTTP/1.1\r\nhost: a\r\n\r\n",
    );
    assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{got}");
    assert!(got.contains("connection: close"), "{got}");
    let got = raw_exchange(
        &web_out,
        b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nGET /forbidden HTTP/1.1\r\nhost: a\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(
        app.seen("/forbidden").is_empty(),
        "a smuggled request reached the app"
    );

    // curl sends a body over 1 MiB only after `100 Continue` (or 1 s without): the
    // application's comes through at once.
    let large = dir.join("large.bin");
    std::fs::write(&large, vec![7u8; 4 << 20]).unwrap();
    let started = Instant::now();
    let (status, body, err) = curl(
        &web_out,
        "/echo",
        &["-v", "--data-binary", &format!("@{}", large.display())],
    );
    assert_eq!((status, body.len()), (200, 4 << 20), "{err}");
    assert!(
        err.contains("Expect: 100-continue") && err.contains("100 Continue"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "waited {:?} for 100 Continue",
        started.elapsed()
    );

    // An application that answers before reading the body: the caller gets its answer.
    let started = Instant::now();
    let (status, _, err) = curl(
        &web_out,
        "/reject-early",
        &["--data-binary", &format!("@{}", large.display())],
    );
    assert_eq!(status, 413, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Pooled application connections that the application closed are not used.
    for i in 0..10 {
        let (status, _, err) = curl(&web_out, "/then-close", &[]);
        assert_eq!(status, 200, "request {i}: {err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed: Vec<_> = access_records(&dir)
        .into_iter()
        .filter(|r| r["path"] == "/then-close" && r["status"] != 200)
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    drop(mesh);
}
