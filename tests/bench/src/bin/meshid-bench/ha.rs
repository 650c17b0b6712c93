//! `meshid-bench ha`: failover under load. Three CA servers on one PostgreSQL (a private
//! cluster) under an upstream root, two agents listing all three (web's starts on ca-1, api's
//! on ca-2), a proxy on each, requests from web to api through both proxies: 2 keep-alive
//! clients and 2 that open a connection per request, for 20 s. Run twice on the same mesh:
//! without a kill (the baseline), then with `kill -9` of ca-1 at 5 s and ca-2 at 12 s. Reports
//! requests and failures, throughput and latency of each round, and how long each agent took
//! to reattach (from the kill to a new session with a survivor, its /metrics polled every 5 ms).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_tests::{free_port, http_get, metric_value, Agent, Ca, Proxy};

const ROUND: Duration = Duration::from_secs(20);

/// An upstream root made with openssl, shared by the CA servers: (cert, key) paths.
pub fn upstream_root(dir: &Path) -> (String, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let (cert, key) = (dir.join("root.crt.pem"), dir.join("root.key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/O=meshid bench root"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-addext", "subjectAltName=URI:spiffe://example.org"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

/// An HTTP/1.1 backend answering `ok` to every request, keep-alive.
fn backend(stop: Arc<AtomicBool>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                let mut line = String::new();
                loop {
                    let mut head_done = false;
                    while !head_done {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => head_done = line == "\r\n",
                        }
                    }
                    if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One request on `s`; the response body must be `ok`.
fn request(s: &mut BufReader<TcpStream>) -> Result<(), String> {
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let mut len = 0;
    let mut status = String::new();
    loop {
        line.clear();
        if s.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
        if status.is_empty() {
            status = line.trim().to_owned();
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    if status.starts_with("HTTP/1.1 200") && body == b"ok" {
        Ok(())
    } else {
        Err(status)
    }
}

#[derive(Default)]
struct Stats {
    ok: u64,
    failed: Vec<String>,
    lat: Vec<Duration>,
}

fn client(addr: String, keepalive: bool, stop: Arc<AtomicBool>) -> Stats {
    let mut st = Stats::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        if conn.is_none() {
            match TcpStream::connect(&addr) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    conn = Some(BufReader::new(s));
                }
                Err(e) => {
                    st.failed.push(e.to_string());
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        match request(conn.as_mut().unwrap()) {
            Ok(()) => {
                st.ok += 1;
                st.lat.push(t.elapsed());
            }
            Err(e) => {
                st.failed.push(e);
                conn = None;
            }
        }
        if !keepalive {
            conn = None;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    st
}

fn agent_metric(agent: &Agent, name: &str) -> Option<f64> {
    let (code, body) = http_get(&agent.ops_address, "/metrics")?;
    (code == 200).then(|| metric_value(&body, name, &[]))
}

/// Kills `ca` and times `agent` back on a survivor.
fn kill_and_time(ca: &Ca, agent: &Agent) -> Duration {
    let before = agent_metric(agent, "meshid_agent_ca_reconnects_total").unwrap();
    let t0 = Instant::now();
    ca.proc.signal("KILL");
    loop {
        let r = agent_metric(agent, "meshid_agent_ca_reconnects_total").unwrap_or(before);
        let c = agent_metric(agent, "meshid_agent_ca_connected").unwrap_or(0.0);
        if r > before && c == 1.0 {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no reattach");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn pct(lat: &mut [Duration], p: f64) -> Duration {
    if lat.is_empty() {
        return Duration::ZERO;
    }
    lat.sort();
    lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
}

/// One round; `kills` are (offset, server index, agent index).
fn round(
    web_out: &str,
    cas: &[Ca],
    agents: &[&Agent],
    kills: &[(Duration, usize, usize)],
) -> (Stats, Stats, Vec<(String, Duration)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (a, s) = (web_out.to_owned(), Arc::clone(&stop));
            std::thread::spawn(move || client(a, i < 2, s))
        })
        .collect();
    let t0 = Instant::now();
    let mut reattach = Vec::new();
    for &(at, ca, agent) in kills {
        std::thread::sleep(at.saturating_sub(t0.elapsed()));
        let t = kill_and_time(&cas[ca], agents[agent]);
        reattach.push((
            format!("ca-{} killed: {} agent", ca + 1, ["web", "api"][agent]),
            t,
        ));
    }
    std::thread::sleep(ROUND.saturating_sub(t0.elapsed()));
    stop.store(true, Ordering::SeqCst);
    let mut ka = Stats::default();
    let mut fresh = Stats::default();
    for (i, h) in handles.into_iter().enumerate() {
        let s = h.join().unwrap();
        let into = if i < 2 { &mut ka } else { &mut fresh };
        into.ok += s.ok;
        into.failed.extend(s.failed);
        into.lat.extend(s.lat);
    }
    (ka, fresh, reattach)
}

pub fn run() {
    let Some(pg) = meshid_tests::postgres_cluster() else {
        panic!("ha needs PostgreSQL (initdb)");
    };
    let tmp = tempfile::Builder::new()
        .prefix("meshid-bench-ha-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let (cert, key) = upstream_root(dir);
    let cas: Vec<Ca> = (1..=3)
        .map(|n| {
            let d = dir.join(format!("ca-{n}"));
            std::fs::create_dir_all(&d).unwrap();
            let cfg = d.join("ca.toml");
            std::fs::write(
                &cfg,
                format!(
                    "datastore = \"{}\"\n[ca]\nupstream_cert = \"{cert}\"\nupstream_key = \"{key}\"\n",
                    pg.admin_url
                ),
            )
            .unwrap();
            Ca::start(&d, &["--config", &cfg.display().to_string(), "--server-id", &format!("ca-{n}")])
        })
        .collect();
    let uid = meshid_tests::uid();
    let mut agents = Vec::new();
    for (i, name) in ["web", "api"].into_iter().enumerate() {
        let (token, agent_id) = cas[0].join_token();
        cas[0].ok(&[
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
            "10s",
        ]);
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let others: Vec<String> = (1..3)
            .map(|k| format!("\"{}\"", cas[(i + k) % 3].node_address))
            .collect();
        let cfg = d.join("agent.toml");
        std::fs::write(
            &cfg,
            format!("extra_server_addresses = [{}]\n", others.join(", ")),
        )
        .unwrap();
        agents.push(Agent::start_with(
            &d,
            &cas[i],
            &token,
            &["--config".into(), cfg.display().to_string()],
        ));
    }
    let stop_backend = Arc::new(AtomicBool::new(false));
    let backend = backend(Arc::clone(&stop_backend));
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, "name: allow\ndefault: deny\nrules:\n  - name: web-to-api\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://example.org/api\"]\n").unwrap();
    let api_in = format!("127.0.0.1:{}", free_port());
    let web_out = format!("127.0.0.1:{}", free_port());
    let mut api = Proxy::start(dir, "api", &format!(
        "workload_api_socket = \"unix://{}\"\nspiffe_id = \"spiffe://example.org/api\"\npolicy_file = \"{}\"\n\n[[inbound]]\nname = \"in\"\nlisten = \"{api_in}\"\nforward_to = \"{backend}\"\nport = 8080\nprotocol = \"http\"\n",
        agents[1].socket.display(), policy.display()));
    let mut web = Proxy::start(dir, "web", &format!(
        "workload_api_socket = \"unix://{}\"\nspiffe_id = \"spiffe://example.org/web\"\n\n[[outbound]]\nname = \"out\"\nlisten = \"{web_out}\"\nupstream = \"{api_in}\"\nexpect = \"spiffe://example.org/api\"\n",
        agents[0].socket.display()));
    api.wait_ready(Duration::from_secs(30));
    web.wait_ready(Duration::from_secs(30));
    let refs: Vec<&Agent> = agents.iter().collect();
    eprintln!("== ha: baseline round (no kill), {} s", ROUND.as_secs());
    let base = round(&web_out, &cas, &refs, &[]);
    eprintln!("== ha: failover round (kill -9 ca-1 at 5 s, ca-2 at 12 s)");
    let fail = round(
        &web_out,
        &cas,
        &refs,
        &[
            (Duration::from_secs(5), 0, 0),
            (Duration::from_secs(12), 1, 1),
        ],
    );
    let reattach = fail.2.clone();
    println!("\n### Failover under load (`ha`)\n");
    println!("| round | keep-alive ok / failed | req/s | p50 / p99 / max | new-connection ok / failed | p50 / p99 |");
    println!("|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, (mut ka, mut fr, _)) in [
        ("no kill (baseline)", base),
        ("kill -9 ca-1, then ca-2", fail),
    ] {
        let rps = ka.ok as f64 / ROUND.as_secs_f64();
        println!(
            "| {name} | {} / {} | {:.0} | {:.2} / {:.2} / {:.2} ms | {} / {} | {:.2} / {:.2} ms |",
            ka.ok,
            ka.failed.len(),
            rps,
            pct(&mut ka.lat, 0.5).as_secs_f64() * 1e3,
            pct(&mut ka.lat, 0.99).as_secs_f64() * 1e3,
            pct(&mut ka.lat, 1.0).as_secs_f64() * 1e3,
            fr.ok,
            fr.failed.len(),
            pct(&mut fr.lat, 0.5).as_secs_f64() * 1e3,
            pct(&mut fr.lat, 0.99).as_secs_f64() * 1e3,
        );
        rows.push(rps);
        for f in ka.failed.iter().chain(fr.failed.iter()).take(3) {
            eprintln!("  failure: {f}");
        }
    }
    println!(
        "\nthroughput with kills / without: {:.2}",
        rows[1] / rows[0].max(1e-9)
    );
    println!("\n| kill | agent reattached to a survivor after |\n|---|---|");
    for (what, t) in &reattach {
        println!("| {what} | {:.0} ms |", t.as_secs_f64() * 1e3);
    }
    stop_backend.store(true, Ordering::SeqCst);
    drop(web);
    drop(api);
    drop(agents);
    drop(cas);
    drop(pg);
}
