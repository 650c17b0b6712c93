//! What the proxy tests share: plain backends (an HTTP server that answers with what it
//! received, an opaque echo server), a small HTTP/1.1 client that can keep its connection,
//! the mesh set-up (CA, agents as nodes, entries) and readers for the proxies' logs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshid_tests::{Agent, Ca, Proxy};
use serde_json::Value;

/// Read and write deadline of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy tests start several processes each and some measure latencies: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `127.0.0.1:<free port>`.
pub fn local_addr() -> String {
    format!("127.0.0.1:{}", meshid_tests::free_port())
}

// ---------------------------------------------------------------------------------------------
// Backends

struct Server {
    addr: String,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(handler: impl Fn(TcpStream, u64) + Send + Sync + 'static) -> Server {
        let handler = Arc::new(handler);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let id = c.fetch_add(1, Ordering::SeqCst) + 1;
                let handler = handler.clone();
                std::thread::spawn(move || handler(stream, id));
            }
        });
        Server {
            addr,
            connections,
            stop,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// A plain HTTP/1.1 application: every request gets `200` with the body
/// `<METHOD> <path> conn=<n>\n`, where `n` numbers the backend's connections from 1 (also in
/// the `x-backend-conn` header), so a test can tell that a request reached it and over which
/// connection. A path under `/slow/<ms>` is answered after that many milliseconds.
pub struct HttpBackend {
    server: Server,
    requests: Arc<AtomicU64>,
}

impl HttpBackend {
    /// Starts it on a free port.
    pub fn start() -> HttpBackend {
        let requests = Arc::new(AtomicU64::new(0));
        let r = requests.clone();
        HttpBackend {
            server: Server::start(move |stream, conn| serve_http(stream, conn, &r)),
            requests,
        }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> &str {
        &self.server.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.server.connections.load(Ordering::SeqCst)
    }

    /// Requests received so far (counted when their head is read).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn serve_http(stream: TcpStream, conn: u64, requests: &AtomicU64) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Ok(Some(head)) = read_head(&mut reader) else {
            return;
        };
        requests.fetch_add(1, Ordering::SeqCst);
        let mut parts = head.start.split(' ');
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        if head.read_body(&mut reader).is_err() {
            return;
        }
        let path = target.split('?').next().unwrap_or_default().to_owned();
        if let Some(ms) = path
            .strip_prefix("/slow/")
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let body = format!("{method} {path} conn={conn}\n");
        let close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-backend-conn: {conn}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// An opaque TCP application: echoes every byte back.
pub struct EchoBackend(Server);

impl EchoBackend {
    /// Starts it on a free port.
    pub fn start() -> EchoBackend {
        EchoBackend(Server::start(|mut stream, _| {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        }))
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.0.connections.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1

/// A request or response head.
pub struct Head {
    /// The request line or status line.
    pub start: String,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn read_body(&self, r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
        if self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line)?;
                let size =
                    usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                        .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 || line == "\r\n" {
                            return Ok(body);
                        }
                    }
                }
                let start = body.len();
                body.resize(start + size, 0);
                r.read_exact(&mut body[start..])?;
                line.clear();
                r.read_line(&mut line)?;
            }
        }
        let len = self
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        Ok(body)
    }
}

/// Reads a head; `Ok(None)` on a clean end of stream before any byte.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut start = String::new();
    if r.read_line(&mut start)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Ok(Some(Head {
        start: start.trim_end().to_owned(),
        headers,
    }))
}

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body, as text.
    pub body: String,
    /// The backend connection that served it (`x-backend-conn`), when it reached the backend.
    pub backend_conn: Option<u64>,
    /// The server announced `connection: close`.
    pub close: bool,
}

/// An HTTP/1.1 client connection that is kept open between requests.
pub struct HttpConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The client side's local port, which identifies this TCP connection.
    pub local_port: u16,
}

impl HttpConn {
    /// Connects to `addr`.
    pub fn connect(addr: &str) -> std::io::Result<HttpConn> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(HttpConn {
            local_port: s.local_addr()?.port(),
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// The connection, to read what follows the last response: [`HttpConn::request`] reads
    /// each response whole, so nothing past it is buffered unless the server sent more.
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    /// Sends a request (no body) and reads the response; the connection stays open unless
    /// `close`.
    pub fn request(&mut self, method: &str, path: &str, close: bool) -> std::io::Result<Response> {
        let connection = if close { "close" } else { "keep-alive" };
        write!(
            self.writer,
            "{method} {path} HTTP/1.1\r\nhost: api.test\r\nconnection: {connection}\r\n\r\n"
        )?;
        let head = read_head(&mut self.reader)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            )
        })?;
        let status = head
            .start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {:?}", head.start)))?;
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            head.read_body(&mut self.reader)?
        };
        Ok(Response {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            backend_conn: head.header("x-backend-conn").and_then(|v| v.parse().ok()),
            close: head
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        })
    }
}

/// One request on a new connection, closed afterwards.
pub fn request_once(addr: &str, method: &str, path: &str) -> std::io::Result<Response> {
    HttpConn::connect(addr)?.request(method, path, true)
}

/// What the peer did with a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Opaque {
    /// Echoed exactly what was sent.
    Echoed,
    /// Closed (or reset) the connection without sending a byte.
    Closed,
    /// Anything else (the bytes that came back).
    Other(Vec<u8>),
}

/// Sends `payload` on a new connection to `addr` and reports what came back.
pub fn opaque_exchange(addr: &str, payload: &[u8]) -> Opaque {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return Opaque::Closed;
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let _ = s.write_all(payload);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < payload.len() {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    if got == payload {
        Opaque::Echoed
    } else if got.is_empty() {
        Opaque::Closed
    } else {
        Opaque::Other(got)
    }
}

// ---------------------------------------------------------------------------------------------
// Mesh set-up

/// The trust domain of every test.
pub const TD: &str = "spiffe://example.org";

/// `spiffe://example.org/<path>`.
pub fn id(path: &str) -> String {
    format!("{TD}/{path}")
}

/// Registers `spiffe_id` for this process's uid on the node whose agent is `parent`.
pub fn create_entry(ca: &Ca, entry_id: &str, spiffe_id: &str, parent: &str, ttl: &str) {
    ca.entry_for_this_uid(entry_id, spiffe_id, parent, &["--x509-ttl", ttl]);
}

/// A node: an agent in its own directory with its own join token.
pub struct Node {
    /// The agent.
    pub agent: Agent,
    /// The agent's SPIFFE ID (parent of the node's entries).
    pub agent_id: String,
}

/// Starts the agent of a node in `dir/<name>` with `token` (from [`token`]: register the
/// node's entries with its agent ID first, or later).
/// node1 with the entry `web` and node2 with `api` (SVIDs of `ttl`), joined to `ca`.
pub fn web_and_api_nodes(dir: &Path, ca: &Ca, ttl: &str) -> (Node, Node) {
    let (t1, t2) = (ca.join_token(), ca.join_token());
    create_entry(ca, "web", &id("web"), &t1.1, ttl);
    create_entry(ca, "api", &id("api"), &t2.1, ttl);
    (
        start_node(dir, "node1", ca, t1),
        start_node(dir, "node2", ca, t2),
    )
}

pub fn start_node(dir: &Path, name: &str, ca: &Ca, token: (String, String)) -> Node {
    let node_dir = dir.join(name);
    std::fs::create_dir_all(&node_dir).unwrap();
    let agent = Agent::start(&node_dir, ca, &token.0);
    Node {
        agent,
        agent_id: token.1,
    }
}

/// An `[[inbound]]` table.
pub fn inbound(name: &str, listen: &str, forward_to: &str, port: u16, protocol: &str) -> String {
    format!(
        "\n[[inbound]]\nname = \"{name}\"\nlisten = \"{listen}\"\nforward_to = \"{forward_to}\"\nport = {port}\nprotocol = \"{protocol}\"\n"
    )
}

/// An `[[outbound]]` table.
pub fn outbound(name: &str, listen: &str, upstream: &str, expect: &str) -> String {
    format!(
        "\n[[outbound]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\nexpect = \"{expect}\"\n"
    )
}

/// The top of a proxy config: its agent, the SVID it picks, a policy file, JSON logs and a
/// file access log at `dir/<name>-access.log`; `extra` are more top-level lines.
pub fn proxy_head(
    dir: &Path,
    name: &str,
    node: &Node,
    spiffe_id: &str,
    policy: Option<&Path>,
    extra: &str,
) -> String {
    let mut s = format!(
        "workload_api_socket = \"{}\"\nspiffe_id = \"{spiffe_id}\"\nlog_format = \"json\"\naccess_log = \"{}\"\n",
        node.agent.endpoint(),
        access_log_path(dir, name).display(),
    );
    if let Some(p) = policy {
        s.push_str(&format!("policy_file = \"{}\"\n", p.display()));
    }
    s.push_str(extra);
    s
}

/// Where [`proxy_head`] puts a proxy's access log.
pub fn access_log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}-access.log"))
}

/// Waits until every proxy is ready.
pub fn wait_ready(proxies: &mut [&mut Proxy]) {
    for p in proxies.iter_mut() {
        p.wait_ready(Duration::from_secs(30));
    }
}

/// Two nodes, web's proxy with an outbound listener (`web_out`) to api's proxy, whose inbound
/// listener (`api_in`) forwards to an HTTP backend under `policy`; both proxies ready.
/// Fields drop in order: proxies, then agents, the CA, and the directory last.
pub struct WebToApi {
    /// api's proxy.
    pub api: Proxy,
    /// web's proxy.
    pub web: Proxy,
    /// web's outbound listener (plaintext in).
    pub web_out: String,
    /// api's inbound listener (mTLS).
    pub api_in: String,
    /// The policy file api's proxy watches.
    pub policy: PathBuf,
    _backend: Option<HttpBackend>,
    /// web's node, then api's.
    pub nodes: (Node, Node),
    /// The CA.
    pub ca: Ca,
    /// The directory everything lives in.
    pub tmp: tempfile::TempDir,
}

impl WebToApi {
    /// Starts the mesh with SVIDs of lifetime `ttl` and `policy_text` as api's policy.
    pub fn start(ttl: &str, policy_text: &str) -> WebToApi {
        WebToApi::start_to(ttl, policy_text, None)
    }

    /// As [`WebToApi::start`], with api's proxy forwarding to the application at `app`
    /// (`host:port`) instead of an [`HttpBackend`] when it is given.
    pub fn start_to(ttl: &str, policy_text: &str, app: Option<&str>) -> WebToApi {
        WebToApi::start_with(ttl, policy_text, app, "")
    }

    /// As [`WebToApi::start_to`], with `api_config` (top-level settings, one per line) added
    /// to api's proxy configuration.
    pub fn start_with(
        ttl: &str,
        policy_text: &str,
        app: Option<&str>,
        api_config: &str,
    ) -> WebToApi {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let ca = Ca::start(dir, &[]);
        let (node1, node2) = web_and_api_nodes(dir, &ca, ttl);
        let backend = app.is_none().then(HttpBackend::start);
        let app = app.unwrap_or_else(|| backend.as_ref().map_or("", HttpBackend::addr));
        let policy = dir.join("policy.yaml");
        std::fs::write(&policy, policy_text).unwrap();
        let (api, web, web_out, api_in) =
            web_to_api_proxies_with(dir, &node1, &node2, &policy, app, api_config);
        WebToApi {
            api,
            web,
            web_out,
            api_in,
            policy,
            _backend: backend,
            nodes: (node1, node2),
            ca,
            tmp,
        }
    }
}

/// api's proxy (SVID `api` from `api_node`'s agent) with an inbound listener forwarding to
/// `app` under the policy file `policy`, and web's (from `web_node`'s) with an outbound listener
/// to it; both ready. Returns (api, web, web's outbound listener, api's inbound listener).
pub fn web_to_api_proxies(
    dir: &Path,
    web_node: &Node,
    api_node: &Node,
    policy: &Path,
    app: &str,
) -> (Proxy, Proxy, String, String) {
    web_to_api_proxies_with(dir, web_node, api_node, policy, app, "")
}

/// As [`web_to_api_proxies`], with `api_config` added to api's proxy configuration.
pub fn web_to_api_proxies_with(
    dir: &Path,
    web_node: &Node,
    api_node: &Node,
    policy: &Path,
    app: &str,
    api_config: &str,
) -> (Proxy, Proxy, String, String) {
    let api_in = local_addr();
    let mut api = Proxy::start(
        dir,
        "api",
        &(proxy_head(dir, "api", api_node, &id("api"), Some(policy), api_config)
            + &inbound("api-in", &api_in, app, 8080, "detect")),
    );
    let web_out = local_addr();
    let mut web = Proxy::start(
        dir,
        "web",
        &(proxy_head(dir, "web", web_node, &id("web"), None, "")
            + &outbound("to-api", &web_out, &api_in, &id("api"))),
    );
    wait_ready(&mut [&mut api, &mut web]);
    (api, web, web_out, api_in)
}

/// Writes `text` to `path` atomically (a temporary file in the same directory, renamed).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Logs

/// The JSON events of a proxy's own log (lines that are not JSON are skipped).
pub fn log_events(proxy: &Proxy) -> Vec<Value> {
    json_lines(&proxy.proc.log)
}

/// The JSON objects of a file with one per line (missing file: none).
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// A field of a log event (`message` and the structured fields live under `fields`).
pub fn field<'a>(event: &'a Value, name: &str) -> Option<&'a Value> {
    event.get("fields").and_then(|f| f.get(name))
}

/// A field as text (strings as they are, other values as JSON).
pub fn field_str(event: &Value, name: &str) -> Option<String> {
    field(event, name).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Whether `event` has the message `message` and every field of `fields`.
pub fn event_matches(event: &Value, message: &str, fields: &[(&str, &str)]) -> bool {
    field_str(event, "message").as_deref() == Some(message)
        && fields
            .iter()
            .all(|(k, v)| field_str(event, k).as_deref() == Some(*v))
}

/// Waits (up to 5 s) until the proxy's log has more than `skip` events matching, and returns
/// the first one after the `skip` first.
pub fn wait_event(proxy: &Proxy, skip: usize, message: &str, fields: &[(&str, &str)]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<Value> = log_events(proxy)
            .into_iter()
            .filter(|e| event_matches(e, message, fields))
            .collect();
        if let Some(e) = found.into_iter().nth(skip) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no log event {message:?} with {fields:?} in {}:\n{}",
            proxy.proc.log.display(),
            tail(&proxy.proc.log_text(), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many of the proxy's log events match.
pub fn count_events(proxy: &Proxy, message: &str, fields: &[(&str, &str)]) -> usize {
    log_events(proxy)
        .iter()
        .filter(|e| event_matches(e, message, fields))
        .count()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits up to `timeout` for the access log at `path` to hold a record matching `want` (see
/// [`record_matches`]); whether one came.
pub fn wait_record(path: &Path, want: &[(&str, Option<&str>)], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if json_lines(path).iter().any(|r| record_matches(r, want)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether an access log record has every `(key, value)` (values compared as text; a `None`
/// value means the key must be absent).
pub fn record_matches(record: &Value, want: &[(&str, Option<&str>)]) -> bool {
    want.iter().all(|(k, v)| {
        let got = record.get(*k).map(|x| match x {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
        got.as_deref() == *v
    })
}
