//! `meshid-bench storm`: the proxy's inbound listener under connection storms (issue 16).
//!
//! A CA, two agents (web's and api's), api's proxy with an inbound `detect` listener in front
//! of nginx, and web's proxy with an outbound listener to it. Throughout, a legitimate client
//! (on a thread and runtime of its own, apart from the attacker's connections) sends 100
//! requests a second through web's proxy, each on a new connection (so each is a new
//! mTLS handshake at api's listener, the case a storm hurts most), and its latency is recorded
//! per phase. The phases, against api's listener:
//!
//! 1. `idle`: 10,000 mTLS connections opened with web's SVID, each sends one request and then
//!    stays idle (keep-alive). api's RSS before and after gives the memory per idle connection.
//! 2. `half-open`: 10,000 TCP connections that send no byte. With `max_handshakes = 1024` each
//!    newcomer sheds the oldest; the time from connect to close of the shed ones is recorded.
//! 3. `slow`: 1,000 clients sending a real ClientHello one byte a second; they hold handshake
//!    slots until `handshake_timeout` (10 s) closes them.
//! 4. `full`: 1,500 more idle mTLS connections with `max_connections = 11000`: the listener
//!    fills with established connections, and past the cap a connection is closed at accept,
//!    before any TLS byte; the time from connect to that refusal is recorded. (Before this
//!    phase the cap is reached only with handshakes in progress, and then the oldest of those
//!    is shed for the newcomer instead.)
//!
//! api's proxy runs with `http_header_timeout = "10m"` so that the idle connections are not
//! closed between their requests during the run (that timer is tested elsewhere), and
//! `access_log = "off"`. Run:
//!
//! ```text
//! cargo build --release -p meshid-ca -p meshid-agent -p meshid-proxy -p meshid-bench
//! MESHID_NO_BUILD=1 target/release/meshid-bench storm
//! ```

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshid_tests::{free_port, rss_kib, uid, Agent, Ca, Proxy};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HALF_OPEN: usize = 10_000;
const SLOW: usize = 1_000;
const FULL_EXTRA: usize = 1_500;
const MAX_CONNECTIONS: usize = 11_000;
const MAX_HANDSHAKES: usize = 1_024;
const LEGIT_RATE: u64 = 100;
const NGINX: &str = "/usr/sbin/nginx";

/// nginx answering `ok` to every request, keeping connections alive.
struct Nginx(Child);

impl Nginx {
    fn start(dir: &Path) -> (Nginx, String) {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;
master_process off;
worker_rlimit_nofile 40000;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    keepalive_timeout 10m;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 'ok'; }}
    }}
}}
",
                dir = dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(NGINX)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        (Nginx(child), addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Latencies of one phase, and failures.
#[derive(Default)]
struct Legit {
    lat: Vec<Duration>,
    failed: u64,
}

/// One request on a new connection through web's outbound listener.
async fn legit_request(addr: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(256);
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| e.to_string())?;
    if buf.starts_with(b"HTTP/1.1 200") && buf.ends_with(b"ok") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// Sends [`LEGIT_RATE`] requests a second into the phase `current` names, until `stop`; the
/// requests still in flight then are given 6 s (past their own 5 s timeout) to finish.
async fn legit_load(addr: String, phases: Arc<Mutex<Vec<(String, Legit)>>>, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LEGIT_RATE));
    let mut inflight = tokio::task::JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        while inflight.try_join_next().is_some() {}
        let (addr, phases) = (addr.clone(), phases.clone());
        inflight.spawn(async move {
            let t = Instant::now();
            let r = legit_request(&addr).await;
            let mut p = phases.lock().unwrap();
            let Some((_, cur)) = p.last_mut() else { return };
            match r {
                Ok(()) => cur.lat.push(t.elapsed()),
                Err(e) => {
                    if cur.failed < 3 {
                        eprintln!("legitimate request failed: {e}");
                    }
                    cur.failed += 1;
                }
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
}

fn begin_phase(phases: &Mutex<Vec<(String, Legit)>>, name: &str) {
    eprintln!("== storm: {name}");
    phases
        .lock()
        .unwrap()
        .push((name.to_owned(), Legit::default()));
}

/// The attacker's source address: another loopback address plays another host, as an attack
/// from elsewhere would be (`MESHID_STORM_SOURCE=127.0.0.1` puts it on the legitimate
/// callers' own address instead).
fn attacker_source() -> std::net::IpAddr {
    static SOURCE: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();
    *SOURCE.get_or_init(|| {
        std::env::var("MESHID_STORM_SOURCE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)))
    })
}

/// A TCP connection to `addr` from [`attacker_source`].
///
/// Each socket is bound to a port of its own choosing, the next of [`ATTACKER_PORTS`] in turn:
/// binding to port 0 makes the kernel search the range for a free port while holding its bind
/// locks, which with 10,000 bound grew to most of the attacker's CPU (1.4 of the 2 cores, 30%
/// of it in `inet_bhash2_conflict`), taken from the proxy it was to measure.
async fn attacker_connect(addr: &str) -> std::io::Result<TcpStream> {
    let to: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut last = None;
    for _ in 0..64 {
        let n = NEXT_ATTACKER_PORT.fetch_add(1, Ordering::Relaxed);
        let port = ATTACKER_PORTS.start
            + (n % u32::from(ATTACKER_PORTS.end - ATTACKER_PORTS.start)) as u16;
        let sock = tokio::net::TcpSocket::new_v4()?;
        // A port of a connection of an earlier run may still be in TIME_WAIT.
        sock.set_reuseaddr(true)?;
        if let Err(e) = sock.bind(std::net::SocketAddr::new(attacker_source(), port)) {
            last = Some(e);
            continue;
        }
        match sock.connect(to).await {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = Some(e);
            }
            Ok(s) => {
                if attacker_nodelay() {
                    s.set_nodelay(true)?;
                }
                return Ok(s);
            }
            r => return r,
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attacker port")))
}

/// `MESHID_STORM_NODELAY`: the attacker's sockets send at once (`TCP_NODELAY`). By default
/// they do not, like most clients, so the request an attacker sends right after its handshake
/// waits for the proxy's ACK (delayed up to 40 ms), and its connections arrive in waves.
fn attacker_nodelay() -> bool {
    static NODELAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NODELAY.get_or_init(|| std::env::var_os("MESHID_STORM_NODELAY").is_some())
}

/// The attacker's source ports, above the servers' (`free_port`: 20000–32000).
const ATTACKER_PORTS: std::ops::Range<u16> = 33_000..61_000;
static NEXT_ATTACKER_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// An idle mTLS connection: handshake with web's SVID, one request, then held.
async fn idle_connection(
    addr: &str,
    tls: tokio_rustls::TlsConnector,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = attacker_connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(meshid_api::tls::PLACEHOLDER_SERVER_NAME).unwrap();
    let mut s = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !got.ends_with(b"ok") {
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(s)
}

/// Opens `n` idle mTLS connections, 64 at a time: the ones held, and how many failed.
async fn open_idle(
    addr: &str,
    connector: &tokio_rustls::TlsConnector,
    n: usize,
) -> (Vec<tokio_rustls::client::TlsStream<TcpStream>>, usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut opening = Vec::with_capacity(n);
    for _ in 0..n {
        let (addr, tls, sem) = (addr.to_owned(), connector.clone(), sem.clone());
        opening.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            idle_connection(&addr, tls).await
        }));
    }
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    for o in opening {
        match o.await.unwrap() {
            Ok(s) => held.push(s),
            Err(e) => {
                if failed < 3 {
                    eprintln!("idle connection failed: {e}");
                }
                failed += 1;
            }
        }
    }
    (held, failed)
}

/// Connects `n` TCP connections that send `first` (nothing when empty) and records, for each
/// closed by the proxy within `watch`, the time from connect to close.
async fn raw_connections(addr: &str, n: usize, watch: Duration) -> (Vec<Duration>, usize) {
    let closed = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        let t = Instant::now();
        let s = match attacker_connect(addr).await {
            Ok(s) => s,
            Err(_) => {
                failed += 1;
                continue;
            }
        };
        let closed = closed.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = s;
            let mut b = [0u8; 64];
            // EOF or a reset: closed by the proxy.
            if tokio::time::timeout(watch, s.read(&mut b)).await.is_ok() {
                closed.lock().unwrap().push(t.elapsed());
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let v = std::mem::take(&mut *closed.lock().unwrap());
    (v, failed)
}

/// A real ClientHello (web's client configuration), as the slow clients send it.
fn client_hello(config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from(meshid_api::tls::PLACEHOLDER_SERVER_NAME).unwrap();
    let mut c = rustls::ClientConnection::new(config, name).unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

/// A client that sends `hello` one byte a second; returns when the proxy closes it (the time
/// since connect) or after `limit`.
async fn slow_client(addr: String, hello: Arc<Vec<u8>>, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut s = attacker_connect(&addr).await.ok()?;
    let mut b = [0u8; 64];
    for byte in hello.iter() {
        if s.write_all(&[*byte]).await.is_err() {
            return Some(t.elapsed());
        }
        // A second's wait for the proxy to close it (EOF or an error) between bytes.
        let read = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return Some(t.elapsed());
        }
        if t.elapsed() > limit {
            return None;
        }
    }
    None
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The peak resident set of a process (`VmHWM`), in KiB.
fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `MESHID_STORM_IDLE` (default 10,000): idle connections of phase 1.
/// `MESHID_STORM_PROTOCOL` (default `detect`): api's listener protocol (`tcp` relays bytes and
/// holds an application connection per caller connection).
/// `MESHID_STORM_ONLY_IDLE`: stop after phase 1 (to compare memory per idle connection).
/// `MESHID_STORM_PER_SOURCE` (default 16, the proxy's default): api's
/// `max_handshakes_per_source`. `MESHID_STORM_SOURCE` (default 127.0.0.2): the attacker's
/// address. `MESHID_STORM_REOPEN`: after phase 1, close the 10,000 at once (phase `closing`)
/// and open them again (`idle again`), into memory api has already touched (glibc keeps it).
/// `MESHID_STORM_NODELAY`: the attacker's sockets set `TCP_NODELAY`.
fn knobs() -> (usize, String, bool) {
    let idle = std::env::var("MESHID_STORM_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let protocol = std::env::var("MESHID_STORM_PROTOCOL").unwrap_or_else(|_| "detect".into());
    (
        idle,
        protocol,
        std::env::var_os("MESHID_STORM_ONLY_IDLE").is_some(),
    )
}

pub fn run() {
    #[allow(non_snake_case)]
    let (IDLE, protocol, only_idle) = knobs();
    // The bench holds 10,000 idle sockets and, at any moment, the half-open ones the proxy has
    // not shed yet; the proxy one descriptor per caller connection (its application
    // connections are pooled). `main` raised the limit as far as allowed; children inherit it.
    let open_files = meshid_api::server::open_files_limit();
    assert!(
        open_files >= Some(16_000),
        "storm needs at least 16,000 open files, has {open_files:?}"
    );
    // The bench's own descriptor table sized now, while it has one thread: grown under load,
    // each growth would stall the legitimate client's connect for an RCU grace period (10–14
    // ms here), a stall of the bench's, not of the proxy it measures.
    if let Some(n) = open_files {
        meshid_api::server::reserve_descriptors(n).unwrap();
    }
    let tmp = meshid_bench::procs::temp_dir("meshid-bench-storm-");
    let dir = tmp.path();
    let ca = Ca::start(dir, &[]);
    let uid = uid();
    let mut agents: Vec<Agent> = Vec::new();
    for name in ["web", "api"] {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (secret, agent_id) = ca.join_token();
        ca.ok(&[
            "entry",
            "create",
            "--id",
            name,
            "--spiffe-id",
            &format!("spiffe://example.org/{name}"),
            "--parent-id",
            &agent_id,
            "--selector",
            &format!("unix:uid:{uid}"),
            "--x509-ttl",
            "1h",
        ]);
        agents.push(Agent::start(&d, &ca, &secret));
    }
    let (_nginx, backend) = Nginx::start(dir);
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "name: storm\ndefault: deny\nrules:\n  - name: web-to-api\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://example.org/api\"]\n",
    )
    .unwrap();
    let api_in = format!("127.0.0.1:{}", free_port());
    let web_out = format!("127.0.0.1:{}", free_port());
    let mut api = Proxy::start(
        dir,
        "api",
        &format!(
            "workload_api_socket = \"{}\"\nspiffe_id = \"spiffe://example.org/api\"\npolicy_file = \"{}\"\naccess_log = \"off\"\nmax_connections = {MAX_CONNECTIONS}\nmax_handshakes = {MAX_HANDSHAKES}\nmax_handshakes_per_source = {per_source}\nhttp_header_timeout = \"10m\"\n\n[[inbound]]\nname = \"in\"\nlisten = \"{api_in}\"\nforward_to = \"{backend}\"\nport = 8080\nprotocol = \"{protocol}\"\n",
            agents[1].endpoint(),
            policy.display(),
            per_source = std::env::var("MESHID_STORM_PER_SOURCE").unwrap_or_else(|_| "16".into()),
        ),
    );
    let mut web = Proxy::start(
        dir,
        "web",
        &format!(
            "workload_api_socket = \"{}\"\nspiffe_id = \"spiffe://example.org/web\"\naccess_log = \"off\"\n\n[[outbound]]\nname = \"out\"\nlisten = \"{web_out}\"\nupstream = \"{api_in}\"\nexpect = \"spiffe://example.org/api\"\n",
            agents[0].endpoint()
        ),
    );
    api.wait_ready(Duration::from_secs(30));
    web.wait_ready(Duration::from_secs(30));

    // web's SVID, for the bench's own mTLS connections.
    let svid = dir.join("web-svid");
    std::fs::create_dir_all(&svid).unwrap();
    let out = Command::new(meshid_tests::bin_dir().join("meshid-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(&agents[0].socket)
        .arg("--write")
        .arg(&svid)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(svid.join("svid.0.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(svid.join("svid.0.key")).unwrap();
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(svid.join("bundle.0.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let mut config = meshid_api::tls::client_config(
        roots,
        meshid_api::tls::ExpectedId::Exact(
            spiffe::SpiffeId::new("spiffe://example.org/api").unwrap(),
        ),
        Some((chain, key)),
    )
    .unwrap();
    // As web's outbound proxy connects: no ALPN.
    config.alpn_protocols.clear();
    let config = Arc::new(config);
    let connector = tokio_rustls::TlsConnector::from(config.clone());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let phases: Arc<Mutex<Vec<(String, Legit)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let api_pid = api.proc.id();
    let mut report = Vec::new();
    let limited = |reason: &str| {
        api.metric(
            "meshid_proxy_limited_connections_total",
            &[("reason", reason)],
        )
    };
    rt.block_on(async {
        let load = {
            let (addr, phases, stop) = (web_out.clone(), phases.clone(), stop.clone());
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(legit_load(addr, phases, stop));
            })
        };
        // The first few requests take tens of milliseconds (45, 35 and 25 ms in one run: what
        // is set up on first use), which is no storm's doing: a second goes unrecorded.
        tokio::time::sleep(Duration::from_secs(1)).await;
        begin_phase(&phases, "baseline");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss_before = rss_kib(api_pid);

        // 1. Idle mTLS connections.
        begin_phase(&phases, "idle: 10,000 mTLS connections opened and held");
        let t = Instant::now();
        let (mut held, idle_failed) = open_idle(&api_in, &connector, IDLE).await;
        let open_time = t.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss_idle = rss_kib(api_pid);
        report.push(format!(
            "idle ({protocol} listener): {} of {IDLE} opened in {:.1} s ({} failed; {} waited for their source's turn, from {}); api RSS {:.1} → {:.1} MiB: **{:.1} KiB per idle connection**",
            held.len(),
            open_time.as_secs_f64(),
            idle_failed,
            limited("handshakes_per_source"),
            attacker_source(),
            rss_before as f64 / 1024.0,
            rss_idle as f64 / 1024.0,
            (rss_idle.saturating_sub(rss_before)) as f64 / held.len().max(1) as f64
        ));

        if std::env::var_os("MESHID_STORM_REOPEN").is_some() {
            begin_phase(&phases, "closing: the 10,000 closed at once");
            drop(std::mem::take(&mut held));
            tokio::time::sleep(Duration::from_secs(3)).await;
            let rss_closed = rss_kib(api_pid);
            begin_phase(&phases, "idle again: 10,000 reopened");
            let t = Instant::now();
            let failed;
            (held, failed) = open_idle(&api_in, &connector, IDLE).await;
            report.push(format!(
                "idle again: {} of {IDLE} reopened in {:.1} s ({failed} failed); api RSS {:.1} MiB once they had closed, then {:.1} MiB",
                held.len(),
                t.elapsed().as_secs_f64(),
                rss_closed as f64 / 1024.0,
                rss_kib(api_pid) as f64 / 1024.0
            ));
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if only_idle {
            stop.store(true, Ordering::SeqCst);
            let _ = load.join();
            return;
        }

        // 2. Half-open connections.
        begin_phase(&phases, "half-open: 10,000 TCP connections, no byte");
        let shed_before = limited("handshake_shed");
        let t = Instant::now();
        let (mut closed, failed) = raw_connections(&api_in, HALF_OPEN, Duration::from_secs(12)).await;
        let shed = limited("handshake_shed") - shed_before;
        let rss_half = rss_kib(api_pid);
        report.push(format!(
            "half-open: {HALF_OPEN} in {:.1} s ({failed} failed to connect); {} closed by the proxy ({shed} shed, the rest at handshake_timeout); connect → close p50 {} p99 {}; api RSS {:.1} MiB",
            t.elapsed().as_secs_f64(),
            closed.len(),
            ms(pct(&mut closed, 0.5)),
            ms(pct(&mut closed, 0.99)),
            rss_half as f64 / 1024.0,
        ));

        // 3. Slow clients.
        begin_phase(&phases, "slow: 1,000 ClientHellos at one byte a second");
        let hello = Arc::new(client_hello(config.clone()));
        let t = Instant::now();
        let slow: Vec<_> = (0..SLOW)
            .map(|_| tokio::spawn(slow_client(api_in.clone(), hello.clone(), Duration::from_secs(20))))
            .collect();
        let mut closed_at = Vec::new();
        let mut still = 0;
        for s in slow {
            match s.await.unwrap() {
                Some(d) => closed_at.push(d),
                None => still += 1,
            }
        }
        report.push(format!(
            "slow: {SLOW} clients ({}-byte ClientHello); {} closed by the proxy, p50 {} p99 {} after connect ({still} not closed within 20 s); {:.1} s",
            hello.len(),
            closed_at.len(),
            ms(pct(&mut closed_at, 0.5)),
            ms(pct(&mut closed_at, 0.99)),
            t.elapsed().as_secs_f64()
        ));

        // 4. Past max_connections.
        begin_phase(&phases, "full: 1,500 more mTLS connections past max_connections");
        let refused_before = limited("max_connections");
        let mut extra = Vec::new();
        let mut refused_after = Vec::new();
        for _ in 0..FULL_EXTRA {
            let t = Instant::now();
            match idle_connection(&api_in, connector.clone()).await {
                Ok(s) => extra.push(s),
                Err(_) => refused_after.push(t.elapsed()),
            }
        }
        let refused = limited("max_connections") - refused_before;
        report.push(format!(
            "full: {FULL_EXTRA} more with {} held (max_connections {MAX_CONNECTIONS}): {} established, {} refused ({refused} counted max_connections); connect → refusal p50 {} p99 {}",
            held.len(),
            extra.len(),
            refused_after.len(),
            ms(pct(&mut refused_after, 0.5)),
            ms(pct(&mut refused_after, 0.99)),
        ));
        drop(extra);
        report.push(format!(
            "api RSS at the end, 10,000 idle held: {:.1} MiB; its peak over the run (VmHWM): {:.1} MiB",
            rss_kib(api_pid) as f64 / 1024.0,
            hwm_kib(api_pid) as f64 / 1024.0
        ));

        // The idle connections are still alive: one request on a sample of them.
        let mut alive = 0;
        for s in held.iter_mut().step_by(100) {
            if s.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n").await.is_ok() {
                let mut b = [0u8; 256];
                if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
                    if b[..n].starts_with(b"HTTP/1.1 200") {
                        alive += 1;
                    }
                }
            }
        }
        report.push(format!("idle connections still served at the end: {alive} of {} sampled", held.len().div_ceil(100)));
        stop.store(true, Ordering::SeqCst);
        let _ = load.join();
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
    });
    drop(rt);
    println!("\n### Connection storms at api's inbound listener (`storm`)\n");
    println!("Legitimate requests, {LEGIT_RATE}/s, each on a new connection through web's proxy (a new mTLS handshake at api):\n");
    println!("| phase | requests | failed | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, mut l) in std::mem::take(&mut *phases.lock().unwrap()) {
        let max = l.lat.iter().max().copied().unwrap_or_default();
        let n = l.lat.len();
        println!(
            "| {name} | {n} | {} | {} | {} | {} |",
            l.failed,
            ms(pct(&mut l.lat, 0.5)),
            ms(pct(&mut l.lat, 0.99)),
            ms(max)
        );
    }
    println!();
    for r in report {
        println!("- {r}");
    }
    drop(web);
    drop(api);
    drop(agents);
    drop(ca);
}
