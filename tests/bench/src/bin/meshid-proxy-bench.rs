//! `meshid-proxy-bench`: the mTLS sidecar's benchmarks (DESIGN.md section 10): meshid-proxy
//! against haproxy and stunnel in the same two-hop mTLS setup, with a direct baseline, all
//! measured in one run and reported as ratios.
//!
//! ```text
//! cargo build --release -p meshid-ca -p meshid-agent -p meshid-proxy -p meshid-bench
//! target/release/meshid-proxy-bench [--duration 10s] [--warmup 2s] [--rounds 3]
//!     [--only direct,meshid,haproxy,stunnel]
//!     [--scenarios keepalive16,keepalive64,bulk,newconn,rss]
//!     [--wrk-threads 2] [--tls-resumption] [--ciphersuite TLS_AES_128_GCM_SHA256]
//!     [--json FILE] [--keep]
//! ```
//!
//! # Topology
//!
//! Every contender is `wrk → hop 1 (plaintext in, mTLS out) → hop 2 (mTLS in, plaintext out) →
//! nginx`, on 127.0.0.1, each hop its own process:
//!
//! - `direct`: wrk → nginx (the ceiling; no proxy).
//! - `meshid-tcp`: meshid-proxy `[[outbound]]` → meshid-proxy `[[inbound]]` with
//!   `protocol = "tcp"` (opaque, spliced). Apples-to-apples with `haproxy-tcp` and `stunnel`.
//! - `meshid-detect`: the same with `protocol = "detect"` (HTTP detected, L7 per request).
//!   Apples-to-apples with `haproxy-http`.
//! - `meshid-detect-log` (only with `--only`): `meshid-detect` with the access log written to a
//!   file (every other meshid row runs with `access_log = "off"`, as haproxy has no `log` line
//!   and stunnel logs at `err` level only).
//! - `haproxy-tcp`: two haproxy processes, `mode tcp` on both hops; hop 1's server line is
//!   `ssl verify required ca-file crt`, hop 2's bind `ssl crt ca-file verify required`.
//! - `haproxy-http`: the same with `mode http` on hop 2 (hop 1 stays `mode tcp`).
//! - `stunnel`: two stunnel4 processes, client mode and server mode, `verifyChain = yes`
//!   (what `verify = 2` means).
//!
//! The meshid rows get their SVID (`spiffe://example.org/bench`, the default 1 h TTL, so no
//! rotation during the run) from a real CA and agent started with the test harness; both proxies
//! run as the bench's uid and so share that SVID. haproxy and stunnel use a PKI minted here with
//! rcgen in the same shape as meshid's: a P-256 root, a P-256 intermediate, and one P-256 leaf
//! with the URI SAN `spiffe://example.org/bench` presented with the intermediate.
//!
//! # Fairness
//!
//! - TLS 1.3 only everywhere, X25519 (every side's first group), ECDSA P-256 certificates.
//!   meshid-proxy prefers TLS_AES_128_GCM_SHA256 (`proxy/src/tls.rs`, `provider()`; its rustls
//!   server follows the client's order, so its two hops agree on it), and haproxy and stunnel
//!   are pinned to that same suite (`--ciphersuite` changes it). The "Hop 2 TLS" table shows
//!   what each hop 2 negotiates with a client offering meshid's order, and that each refuses
//!   a client without a certificate.
//! - No session resumption anywhere, so that `newconn` measures full mTLS handshakes:
//!   meshid-proxy disables it (client `Resumption::disabled()`, server no session storage and
//!   no tickets); haproxy gets `no-ssl-reuse` on hop 1's server line and stunnel
//!   `sessionResume = no` on both hops (it then sends no tickets either). haproxy 2.6 still
//!   sends two TLS 1.3 session tickets per handshake at hop 2 (no setting turns that off; a few
//!   µs each against a handshake of about a millisecond). `--tls-resumption` lets haproxy and
//!   stunnel resume, for a comparison with their best case.
//! - Threads: meshid-proxy runs a multi-threaded tokio runtime with one worker per core, so
//!   haproxy keeps its default `nbthread` (one per available core, the same number); stunnel
//!   has a thread per connection by design. The Threads column of the RSS table records what
//!   each process actually ran with.
//! - The backend is one nginx process for every contender (`daemon off; master_process off;
//!   worker_processes 1`): static 1 KiB and 1 MiB files, `access_log off`, `sendfile on`,
//!   `keepalive_requests 1000000`. One worker keeps the backend's share of the 2 cores small and
//!   equal; the `direct` row shows how far above the proxied rows its ceiling is.
//! - wrk (the load generator), both hops and nginx share the machine's cores for every
//!   contender; the cells of one round run back to back, contender after contender, and the
//!   rounds repeat that order (ABAB), each number being the median of the rounds. Each cell
//!   also reports "others' CPU": what the rest of the machine used during it (from /proc/stat,
//!   minus this bench, wrk, the hops and nginx), so that a cell disturbed by other work shows.
//! - `haproxy-http` keeps haproxy's HTTP defaults on hop 2 (keep-alive, `http-reuse safe` to
//!   nginx); hop 1 stays L4 in every row, so the mTLS connections hop 1 opens follow the
//!   client's.
//!
//! # Scenarios
//!
//! - `keepalive16` / `keepalive64`: HTTP/1.1 keep-alive, 1 KiB responses, 16 / 64 connections:
//!   requests per second, p50 and p99 latency (from wrk's own histogram, printed by a Lua
//!   `done()` hook), and the CPU the two hops used per request.
//! - `bulk`: 1 MiB responses over 4 keep-alive connections: MB/s of response bytes.
//! - `newconn`: each request on a new connection (`Connection: close`, which makes wrk
//!   reconnect after every response), 16 at a time: connections per second. Each client
//!   connection makes hop 1 open a new mTLS connection to hop 2. Checked: nginx's `accepts`
//!   counter must follow the requests for `direct`, and the table shows the backend's and the
//!   machine's (`/proc/net/snmp` PassiveOpens, so approximate) accepts per request.
//! - `rss`: VmRSS of each hop idle after start (before any traffic through it), the peak of
//!   the two hops' sum sampled every 100 ms during each load scenario, the sum idle after all
//!   load, and VmHWM.
//!
//! Each cell runs a warm-up (`--warmup`, discarded) and then the measured run (`--duration`).
//! Any wrk error (connect, read, write, timeout, or a status above 399) or a short response
//! fails the cell, which then shows as FAILED with the reason, and the bench exits 1.
//!
//! All processes run in a temporary directory and are killed, and the directory removed, when
//! the bench ends, on panic and on SIGINT/SIGTERM too (`--keep` or `MESHID_BENCH_KEEP=1` keeps
//! the directory with the configs and logs). Results are Markdown on stdout, then the JSON dump
//! (or into `--json FILE`); progress goes to stderr.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meshid_tests::{free_port, http_get, Agent, Ca};
use serde_json::{json, Value};

/// The SPIFFE ID both hops of every contender present.
const BENCH_ID: &str = "spiffe://example.org/bench";
/// The TLS 1.3 ciphersuite meshid-proxy prefers (`proxy/src/tls.rs`, `provider()`), and so
/// negotiates between its own hops; haproxy and stunnel are pinned to it (`--ciphersuite`).
const DEFAULT_CIPHERSUITE: &str = "TLS_AES_128_GCM_SHA256";
/// meshid-proxy's client preference order, offered by the hop 2 TLS check.
const MESHID_CIPHERSUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
const HAPROXY: &str = "/usr/sbin/haproxy";
const STUNNEL: &str = "/usr/bin/stunnel4";
const NGINX: &str = "/usr/sbin/nginx";
const WRK: &str = "wrk";

/// Every contender, in run order; `meshid-detect-log` only runs when named with `--only`.
const CONTENDERS: [&str; 7] = [
    "direct",
    "meshid-tcp",
    "meshid-detect",
    "meshid-detect-log",
    "haproxy-tcp",
    "haproxy-http",
    "stunnel",
];
const OPT_IN: [&str; 1] = ["meshid-detect-log"];
const SCENARIOS: [&str; 5] = ["keepalive16", "keepalive64", "bulk", "newconn", "rss"];
/// The load scenarios, in run order (`rss` is measured around and during them).
const LOADS: [&str; 4] = ["keepalive16", "keepalive64", "bulk", "newconn"];

// ---------------------------------------------------------------------------------------------
// Command line.

/// The parsed command line.
#[derive(Debug, Clone)]
struct Opts {
    duration: Duration,
    warmup: Duration,
    rounds: usize,
    contenders: Vec<&'static str>,
    scenarios: Vec<&'static str>,
    json: Option<PathBuf>,
    wrk_threads: usize,
    resumption: bool,
    ciphersuite: String,
    keep: bool,
}

const USAGE: &str = "usage: meshid-proxy-bench [--duration 10s] [--warmup 2s] [--rounds 3]
    [--only direct,meshid-tcp,meshid-detect,meshid-detect-log,haproxy-tcp,haproxy-http,stunnel]
      (a prefix names a family: --only meshid,haproxy)
    [--scenarios keepalive16,keepalive64,bulk,newconn,rss]
    [--wrk-threads 2] [--tls-resumption] [--ciphersuite TLS_AES_128_GCM_SHA256]
    [--json FILE] [--keep]";

fn usage_error(msg: &str) -> ! {
    eprintln!("{msg}\n{USAGE}");
    std::process::exit(64);
}

/// `10s`, `500ms`, `2m` or a plain number of seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn parse_list(value: &str, known: &[&'static str], what: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let matched: Vec<&'static str> = known
            .iter()
            .copied()
            .filter(|k| *k == item || k.starts_with(&format!("{item}-")))
            .filter(|k| *k == item || !OPT_IN.contains(k))
            .collect();
        if matched.is_empty() {
            usage_error(&format!("unknown {what} {item:?}"));
        }
        out.extend(matched);
    }
    // Keep the canonical order, without duplicates.
    known.iter().copied().filter(|k| out.contains(k)).collect()
}

fn parse_args() -> Opts {
    let mut opts = Opts {
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        rounds: 3,
        contenders: CONTENDERS
            .iter()
            .copied()
            .filter(|c| !OPT_IN.contains(c))
            .collect(),
        scenarios: SCENARIOS.to_vec(),
        json: None,
        wrk_threads: 2,
        resumption: false,
        ciphersuite: DEFAULT_CIPHERSUITE.to_owned(),
        keep: std::env::var_os("MESHID_BENCH_KEEP").is_some(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| usage_error(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--duration" | "--warmup" => {
                let v = value();
                let d = parse_duration(&v)
                    .unwrap_or_else(|| usage_error(&format!("bad duration {v:?}")));
                if flag == "--duration" {
                    if d < Duration::from_secs(1) {
                        usage_error("--duration must be at least 1s");
                    }
                    opts.duration = d;
                } else {
                    opts.warmup = d;
                }
            }
            "--rounds" => {
                opts.rounds = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage_error("--rounds takes a positive integer"));
            }
            "--wrk-threads" => {
                opts.wrk_threads = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage_error("--wrk-threads takes a positive integer"));
            }
            "--only" => opts.contenders = parse_list(&value(), &CONTENDERS, "contender"),
            "--scenarios" => opts.scenarios = parse_list(&value(), &SCENARIOS, "scenario"),
            "--json" => opts.json = Some(PathBuf::from(value())),
            "--ciphersuite" => opts.ciphersuite = value(),
            "--tls-resumption" => opts.resumption = true,
            "--keep" => opts.keep = true,
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                std::process::exit(0);
            }
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    if opts.contenders.is_empty() || opts.scenarios.is_empty() {
        usage_error("nothing to run");
    }
    opts
}

// ---------------------------------------------------------------------------------------------
// Processes: a guard that kills on drop, and a registry that a signal handler cleans up.

/// What must go when the bench is interrupted: child pids and temporary directories.
static REGISTRY: Mutex<(Vec<u32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

fn register_pid(pid: u32) {
    REGISTRY.lock().unwrap().0.push(pid);
}

fn unregister_pid(pid: u32) {
    REGISTRY.lock().unwrap().0.retain(|p| *p != pid);
}

/// On SIGINT or SIGTERM: kills every registered child by its pid, removes the registered
/// directories and exits 130. (Panics unwind through the guards' `Drop` instead.)
fn install_signal_handler() {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt()).unwrap();
            let mut term = signal(SignalKind::terminate()).unwrap();
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        let (pids, dirs) = {
            let reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
            (reg.0.clone(), reg.1.clone())
        };
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("interrupted: children killed, temporary directory removed");
        std::process::exit(130);
    });
}

/// A child process, killed (SIGKILL) and reaped on drop; stdout and stderr go to `log`.
struct Guard {
    child: Option<std::process::Child>,
    name: String,
    log: PathBuf,
}

impl Guard {
    fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Result<Guard, String> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", program.display()))?;
        register_pid(child.id());
        Ok(Guard {
            child: Some(child),
            name: name.to_owned(),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// `Err` with the end of the log if the process has exited.
    fn check_alive(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.name));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unregister_pid(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last 20 lines of a log file.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Polls `f` every 50 ms until it returns `Ok(Some)`, an error, or `timeout` passes.
fn poll<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements from /proc.

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS:")
}

/// User + system CPU seconds of a process, all its threads (exited ones included).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    // After the command: utime is field 14 and stime 15 (USER_HZ = 100 ticks per second).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU seconds the whole machine spent busy (all cores), from /proc/stat.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user). Interrupt
    // time is left out: loopback packets are processed in softirqs charged to no process, so
    // it would count the bench's own traffic as others' work.
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(7)?;
    Some(busy as f64 / 100.0)
}

/// CPU seconds of this process and of its children it has waited for (wrk).
fn self_and_children_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14 to 17.
    let ticks: u64 = fields
        .get(11..15)?
        .iter()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Some(ticks as f64 / 100.0)
}

/// The machine's (network namespace's) count of accepted TCP connections.
fn passive_opens() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let values: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "PassiveOpens")?;
    values.get(i)?.parse().ok()
}

/// Whether something listens on 127.0.0.1:`port` (read from /proc/net/tcp, so that the check
/// itself opens no connection through a proxy).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
}

fn uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn tool_version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty() && !l.contains("inetd"))
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

// ---------------------------------------------------------------------------------------------
// PKI for haproxy and stunnel: root → intermediate → leaf, P-256, like meshid's CA.

/// PEM files of the bench PKI.
struct Pki {
    /// The root (trust anchor).
    ca: PathBuf,
    /// Leaf + intermediate.
    chain: PathBuf,
    /// The leaf's PKCS#8 key.
    key: PathBuf,
    /// Leaf + intermediate + key, as haproxy's `crt` wants.
    combined: PathBuf,
}

fn mint_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    };
    std::fs::create_dir_all(dir).unwrap();
    let p256 = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let ca_params = |cn: &str, constraint| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(constraint);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root = CertifiedIssuer::self_signed(
        ca_params("bench root", BasicConstraints::Unconstrained),
        p256(),
    )
    .unwrap();
    let inter = CertifiedIssuer::signed_by(
        ca_params("bench intermediate", BasicConstraints::Constrained(0)),
        p256(),
        &root,
    )
    .unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![SanType::URI(BENCH_ID.try_into().unwrap())];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_key = p256();
    let leaf_cert = leaf.signed_by(&leaf_key, &inter).unwrap();
    let chain_pem = format!("{}{}", leaf_cert.pem(), inter.pem());
    let key_pem = leaf_key.serialize_pem();
    let pki = Pki {
        ca: dir.join("root.pem"),
        chain: dir.join("chain.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("combined.pem"),
    };
    std::fs::write(&pki.ca, root.pem()).unwrap();
    std::fs::write(&pki.chain, &chain_pem).unwrap();
    std::fs::write(&pki.key, &key_pem).unwrap();
    std::fs::write(&pki.combined, format!("{chain_pem}{key_pem}")).unwrap();
    pki
}

// ---------------------------------------------------------------------------------------------
// Backend: one nginx process for every contender.

/// The nginx backend.
struct Backend {
    proc: Guard,
    port: u16,
}

const NGINX_CONF: &str = "daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {
    worker_connections 8192;
    multi_accept on;
}
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    open_file_cache max=16;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
        location = /nginx_status {
            stub_status;
        }
    }
}
";

impl Backend {
    fn start(dir: &Path) -> Backend {
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::write(dir.join("www/1k"), vec![b'k'; 1024]).unwrap();
        std::fs::write(dir.join("www/1m"), vec![b'm'; 1 << 20]).unwrap();
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            NGINX_CONF
                .replace("{dir}", &dir.display().to_string())
                .replace("{port}", &port.to_string()),
        )
        .unwrap();
        let args: Vec<String> = vec![
            "-p".into(),
            dir.display().to_string(),
            "-e".into(),
            dir.join("error.log").display().to_string(),
            "-c".into(),
            conf.display().to_string(),
        ];
        let mut proc =
            Guard::spawn("nginx", Path::new(NGINX), &args, dir.join("nginx.log"), &[]).unwrap();
        let addr = format!("127.0.0.1:{port}");
        poll(Duration::from_secs(10), "nginx", || {
            proc.check_alive()?;
            Ok(http_get(&addr, "/1k").filter(|(c, b)| *c == 200 && b.len() == 1024))
        })
        .unwrap_or_else(|e| panic!("nginx: {e}\n{}", log_tail(&dir.join("error.log"))));
        Backend { proc, port }
    }

    /// nginx's `accepts` counter.
    fn accepts(&self) -> Option<u64> {
        let (_, body) = http_get(&format!("127.0.0.1:{}", self.port), "/nginx_status")?;
        body.lines().nth(2)?.split_whitespace().next()?.parse().ok()
    }
}

// ---------------------------------------------------------------------------------------------
// meshid: a CA and an agent from the harness, and the meshid-proxy binary.

/// The meshid control plane shared by the meshid rows.
struct Mesh {
    // Drops in order: the agent before the CA.
    agent: Agent,
    _ca: Ca,
    proxy: PathBuf,
}

/// Builds meshid-proxy next to the harness's binaries (unless `MESHID_NO_BUILD` is set) and
/// checks that it has the `run` subcommand.
fn meshid_proxy_bin() -> Result<PathBuf, String> {
    let dir = meshid_tests::bin_dir();
    if std::env::var_os("MESHID_NO_BUILD").is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "meshid-proxy", "--bins"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .map_err(|e| format!("run cargo build: {e}"))?;
        if !status.success() {
            return Err("cargo build -p meshid-proxy failed".into());
        }
    }
    let bin = dir.join("meshid-proxy");
    let out = Command::new(&bin)
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} run --help` failed (no `run` subcommand yet?): {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }
    Ok(bin)
}

impl Mesh {
    fn start(dir: &Path) -> Result<Mesh, String> {
        let proxy = meshid_proxy_bin()?;
        std::fs::create_dir_all(dir).unwrap();
        let ca = Ca::start(dir, &[]);
        register_pid(ca.proc.id());
        let (secret, agent_id) = ca.join_token();
        ca.ok(&[
            "entry",
            "create",
            "--id",
            "bench",
            "--spiffe-id",
            BENCH_ID,
            "--parent-id",
            &agent_id,
            "--selector",
            &format!("unix:uid:{}", uid()),
        ]);
        let agent = Agent::start(dir, &ca, &secret);
        register_pid(agent.proc.id());
        Ok(Mesh {
            agent,
            _ca: ca,
            proxy,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Contenders.

/// One proxy process of a contender.
struct Hop {
    role: &'static str,
    proc: Guard,
    idle_rss_kib: u64,
    threads: u64,
}

/// A running contender: where the load generator connects, and its hops (none for `direct`).
struct Contender {
    name: &'static str,
    entry_port: u16,
    /// Hop 2's mTLS port (0 for `direct`).
    mtls_port: u16,
    hops: Vec<Hop>,
    /// What `openssl s_client` saw at hop 2 (see [`tls_check`]).
    tls: Option<TlsSeen>,
}

impl Contender {
    fn pids(&self) -> Vec<u32> {
        self.hops.iter().map(|h| h.proc.pid()).collect()
    }

    fn check_alive(&mut self) -> Result<(), String> {
        for h in &mut self.hops {
            h.proc.check_alive()?;
        }
        Ok(())
    }

    fn hop(role: &'static str, proc: Guard) -> Hop {
        Hop {
            role,
            proc,
            idle_rss_kib: 0,
            threads: 0,
        }
    }
}

/// Waits (bounded) until `port` listens, failing early if `proc` exits.
fn wait_listening(proc: &mut Guard, port: u16) -> Result<(), String> {
    poll(
        Duration::from_secs(15),
        &format!("{} to listen on {port}", proc.name),
        || {
            proc.check_alive()?;
            Ok(listening(port).then_some(()))
        },
    )
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

fn start_haproxy(
    name: &'static str,
    opts: &Opts,
    dir: &Path,
    pki: &Pki,
    backend: u16,
    hop2_http: bool,
) -> Result<Contender, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (p1, p2) = (free_port(), free_port());
    // No `nbthread`: haproxy's default is one thread per available core, as meshid-proxy's
    // tokio runtime. No `log` line: no per-connection logging, as meshid's access_log = "off".
    let global = format!(
        "global
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-bind-ciphersuites {cs}
    ssl-default-server-options ssl-min-ver TLSv1.3
    ssl-default-server-ciphersuites {cs}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
",
        cs = opts.ciphersuite,
    );
    let reuse = if opts.resumption { "" } else { " no-ssl-reuse" };
    let hop1 = format!(
        "{global}
frontend outbound
    bind 127.0.0.1:{p1}
    default_backend hop2
backend hop2
    server hop2 127.0.0.1:{p2} ssl verify required ca-file {ca} crt {crt}{reuse}
",
        ca = pki.ca.display(),
        crt = pki.combined.display(),
    );
    let mode = if hop2_http { "http" } else { "tcp" };
    let hop2 = format!(
        "{global}
frontend inbound
    mode {mode}
    bind 127.0.0.1:{p2} ssl crt {crt} ca-file {ca} verify required
    default_backend app
backend app
    mode {mode}
    server app 127.0.0.1:{backend}
",
        ca = pki.ca.display(),
        crt = pki.combined.display(),
    );
    let mut hops = Vec::new();
    for (role, cfg, port) in [("hop2", hop2, p2), ("hop1", hop1, p1)] {
        let file = dir.join(format!("{role}.cfg"));
        write_file(&file, &cfg)?;
        let check = Command::new(HAPROXY)
            .args(["-c", "-q", "-f"])
            .arg(&file)
            .output()
            .map_err(|e| format!("{HAPROXY}: {e}"))?;
        if !check.status.success() {
            return Err(format!(
                "haproxy -c {}: {}",
                file.display(),
                String::from_utf8_lossy(&check.stderr)
            ));
        }
        let args = vec!["-db".into(), "-f".into(), file.display().to_string()];
        let mut proc = Guard::spawn(
            &format!("{name} {role}"),
            Path::new(HAPROXY),
            &args,
            dir.join(format!("{role}.log")),
            &[],
        )?;
        wait_listening(&mut proc, port)?;
        hops.push(Contender::hop(role, proc));
    }
    hops.reverse();
    Ok(Contender {
        name,
        entry_port: p1,
        mtls_port: p2,
        hops,
        tls: None,
    })
}

fn start_stunnel(opts: &Opts, dir: &Path, pki: &Pki, backend: u16) -> Result<Contender, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (p1, p2) = (free_port(), free_port());
    let resume = if opts.resumption { "yes" } else { "no" };
    // debug = 3 (err): no per-connection log lines, as meshid's access_log = "off".
    let conf = |role: &str, client: bool, accept: u16, connect: u16| {
        format!(
            "foreground = yes
pid =
debug = 3
output = {log}
[{role}]
client = {client}
accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {chain}
key = {key}
CAfile = {ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
ciphersuites = {cs}
sessionResume = {resume}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
",
            log = dir.join(format!("{role}.out")).display(),
            client = if client { "yes" } else { "no" },
            chain = pki.chain.display(),
            key = pki.key.display(),
            ca = pki.ca.display(),
            cs = opts.ciphersuite,
        )
    };
    let mut hops = Vec::new();
    for (role, client, accept, connect) in [("hop2", false, p2, backend), ("hop1", true, p1, p2)] {
        let file = dir.join(format!("{role}.conf"));
        write_file(&file, &conf(role, client, accept, connect))?;
        let mut proc = Guard::spawn(
            &format!("stunnel {role}"),
            Path::new(STUNNEL),
            &[file.display().to_string()],
            dir.join(format!("{role}.log")),
            &[],
        )?;
        wait_listening(&mut proc, accept)?;
        hops.push(Contender::hop(role, proc));
    }
    hops.reverse();
    Ok(Contender {
        name: "stunnel",
        entry_port: p1,
        mtls_port: p2,
        hops,
        tls: None,
    })
}

fn start_meshid(
    name: &'static str,
    dir: &Path,
    mesh: &Mesh,
    backend: u16,
    protocol: &str,
    access_log: Option<&Path>,
) -> Result<Contender, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let policy = dir.join("policy.yaml");
    write_file(
        &policy,
        &format!(
            "default: deny\nrules:\n  - name: bench\n    from: [\"{BENCH_ID}\"]\n    \
             to: [\"{BENCH_ID}\"]\n"
        ),
    )?;
    let (p1, p2) = (free_port(), free_port());
    let access_log = access_log.map_or_else(|| "off".to_owned(), |p| p.display().to_string());
    let head = |ops: u16| {
        format!(
            "workload_api_socket = \"{api}\"
ops_address = \"127.0.0.1:{ops}\"
policy_file = \"{policy}\"
access_log = \"{access_log}\"
log_format = \"text\"
",
            api = mesh.agent.endpoint(),
            policy = policy.display(),
        )
    };
    let (ops1, ops2) = (free_port(), free_port());
    let hop2 = format!(
        "{}
[[inbound]]
name = \"bench\"
listen = \"127.0.0.1:{p2}\"
forward_to = \"127.0.0.1:{backend}\"
protocol = \"{protocol}\"
",
        head(ops2)
    );
    let hop1 = format!(
        "{}
[[outbound]]
name = \"bench\"
listen = \"127.0.0.1:{p1}\"
upstream = \"127.0.0.1:{p2}\"
expect = \"{BENCH_ID}\"
",
        head(ops1)
    );
    let mut hops = Vec::new();
    for (role, cfg, ops) in [("hop2", hop2, ops2), ("hop1", hop1, ops1)] {
        let file = dir.join(format!("{role}.toml"));
        write_file(&file, &cfg)?;
        let args = vec!["run".into(), "--config".into(), file.display().to_string()];
        let mut proc = Guard::spawn(
            &format!("{name} {role}"),
            &mesh.proxy,
            &args,
            dir.join(format!("{role}.log")),
            &[("MESHID_LOG", "info"), ("NO_COLOR", "1")],
        )?;
        let ops_addr = format!("127.0.0.1:{ops}");
        poll(
            Duration::from_secs(30),
            &format!("{name} {role} /readyz on {ops_addr}"),
            || {
                proc.check_alive()?;
                Ok(http_get(&ops_addr, "/readyz").and_then(|(c, _)| (c == 200).then_some(())))
            },
        )
        .map_err(|e| format!("{e}; log:\n{}", log_tail(&proc.log)))?;
        hops.push(Contender::hop(role, proc));
    }
    hops.reverse();
    Ok(Contender {
        name,
        entry_port: p1,
        mtls_port: p2,
        hops,
        tls: None,
    })
}

/// What `openssl s_client`, connecting without a client certificate, saw at hop 2: the
/// negotiated protocol, ciphersuite, key exchange group and server signature, and whether the
/// server then refused the connection for the missing certificate (it must: mTLS).
#[derive(Debug, Clone, Default)]
struct TlsSeen {
    protocol: String,
    cipher: String,
    group: String,
    signature: String,
    rejected_without_cert: bool,
}

fn tls_check(port: u16) -> Result<TlsSeen, String> {
    // The request is sent after the handshake and the pause lets the server's alert arrive;
    // `timeout` bounds the whole exchange.
    let script = format!(
        "(printf 'GET /1k HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'; sleep 1) | \
         timeout 10 openssl s_client -ciphersuites {MESHID_CIPHERSUITES} \
         -connect 127.0.0.1:{port} 2>&1"
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("openssl s_client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    let new = find("New, ");
    let (protocol, cipher) = new
        .split_once(", Cipher is ")
        .map_or((String::new(), String::new()), |(p, c)| {
            (p.to_owned(), c.to_owned())
        });
    if protocol.is_empty() {
        return Err(format!("no TLS handshake with 127.0.0.1:{port}: {text}"));
    }
    let group = match find("Server Temp Key:") {
        g if g.is_empty() => find("Negotiated TLS1.3 group:"),
        g => g,
    };
    Ok(TlsSeen {
        protocol,
        cipher,
        group,
        signature: find("Peer signature type:"),
        rejected_without_cert: text.contains("alert certificate required")
            || text.contains("alert handshake failure")
            || text.contains("alert bad certificate"),
    })
}

/// One GET through the contender, checked for status and body length; retried for up to 10 s.
fn probe(c: &mut Contender) -> Result<(), String> {
    let addr = format!("127.0.0.1:{}", c.entry_port);
    for (path, len) in [("/1k", 1024), ("/1m", 1 << 20)] {
        let mut last = None;
        poll(
            Duration::from_secs(10),
            &format!("GET {path} through {}", c.name),
            || {
                c.check_alive()?;
                let r = http_get(&addr, path);
                let ok = matches!(&r, Some((200, b)) if b.len() == len);
                last = r.map(|(code, b)| (code, b.len(), b.chars().take(200).collect::<String>()));
                Ok(ok.then_some(()))
            },
        )
        .map_err(|e| {
            let got = last
                .as_ref()
                .map_or("no response".to_owned(), |(code, n, b)| {
                    format!("status {code}, {n} body bytes: {b:?}")
                });
            let logs: Vec<String> = c
                .hops
                .iter()
                .map(|h| format!("{} log:\n{}", h.role, log_tail(&h.proc.log)))
                .collect();
            format!("{e} (last: {got})\n{}", logs.join("\n"))
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Load: wrk with a Lua `done()` hook that prints the summary as JSON.

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "MESHID_WRK {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d," ..
    "\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d," ..
    "\"p999_us\":%d,\"max_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"#;

/// What a load scenario sends.
struct Load {
    conns: usize,
    path: &'static str,
    body: u64,
    close: bool,
}

fn load_of(scenario: &str) -> Load {
    match scenario {
        "keepalive16" => Load {
            conns: 16,
            path: "/1k",
            body: 1024,
            close: false,
        },
        "keepalive64" => Load {
            conns: 64,
            path: "/1k",
            body: 1024,
            close: false,
        },
        "bulk" => Load {
            conns: 4,
            path: "/1m",
            body: 1 << 20,
            close: false,
        },
        "newconn" => Load {
            conns: 16,
            path: "/1k",
            body: 1024,
            close: true,
        },
        other => panic!("not a load scenario: {other}"),
    }
}

/// wrk's summary.
#[derive(Debug, Clone, Default)]
struct WrkOut {
    requests: u64,
    duration_s: f64,
    bytes: u64,
    errors: BTreeMap<&'static str, u64>,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

/// Runs wrk against 127.0.0.1:`port`, calling `tick` every 100 ms while it runs.
fn run_wrk(
    script: &Path,
    port: u16,
    load: &Load,
    threads: usize,
    duration: Duration,
    mut tick: impl FnMut(),
) -> Result<WrkOut, String> {
    let secs = duration.as_secs_f64().ceil().max(1.0) as u64;
    let mut args: Vec<String> = vec![
        "-t".into(),
        threads.min(load.conns).to_string(),
        "-c".into(),
        load.conns.to_string(),
        "-d".into(),
        format!("{secs}s"),
        "--timeout".into(),
        "5s".into(),
        "-s".into(),
        script.display().to_string(),
    ];
    if load.close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(format!("http://127.0.0.1:{port}{}", load.path));
    let mut child = Command::new(WRK)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start wrk: {e}"))?;
    register_pid(child.id());
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err("wrk did not finish 30 s after its duration".to_owned());
            }
            Ok(None) => {
                tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => break Err(format!("wait for wrk: {e}")),
        }
    };
    unregister_pid(child.id());
    let status = status?;
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("MESHID_WRK "))
        .ok_or_else(|| format!("wrk ({status}) printed no summary: {out}{err}"))?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("wrk summary {line}: {e}"))?;
    let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut errors = BTreeMap::new();
    for k in ["connect", "read", "write", "status", "timeout"] {
        errors.insert(k, n(k) as u64);
    }
    Ok(WrkOut {
        requests: n("requests") as u64,
        duration_s: n("duration_us") / 1e6,
        bytes: n("bytes") as u64,
        errors,
        p50_us: n("p50_us"),
        p90_us: n("p90_us"),
        p99_us: n("p99_us"),
        p999_us: n("p999_us"),
        max_us: n("max_us"),
    })
}

/// One measured cell.
#[derive(Debug, Clone, Default)]
struct Measure {
    rps: f64,
    mb_s: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    requests: u64,
    bytes: u64,
    duration_s: f64,
    /// CPU seconds of both hops together over the measured run.
    proxy_cpu_s: f64,
    /// nginx accepts over the measured run.
    backend_accepts: u64,
    /// Machine-wide TCP accepts over the measured run.
    passive_opens: u64,
    /// Peak VmRSS of each hop and of their sum, sampled every 100 ms.
    rss_peak_kib: Vec<u64>,
    rss_peak_sum_kib: u64,
    /// CPU used on the machine by anything but this bench, wrk, the hops and nginx, in cores,
    /// averaged over the measured run (other engineers' builds: noise).
    foreign_cores: f64,
}

impl Measure {
    fn to_json(&self) -> Value {
        json!({
            "requests_per_s": self.rps,
            "mb_per_s": self.mb_s,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "requests": self.requests,
            "bytes": self.bytes,
            "duration_s": self.duration_s,
            "proxy_cpu_s": self.proxy_cpu_s,
            "proxy_cpu_us_per_request": self.cpu_us_per_req(),
            "backend_accepts": self.backend_accepts,
            "passive_opens": self.passive_opens,
            "rss_peak_kib": self.rss_peak_kib,
            "rss_peak_sum_kib": self.rss_peak_sum_kib,
            "foreign_cpu_cores": self.foreign_cores,
        })
    }

    fn cpu_us_per_req(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.proxy_cpu_s * 1e6 / self.requests as f64
        }
    }
}

/// Warm-up, then the measured run with CPU, accepts and RSS sampled around and during it.
fn run_cell(
    opts: &Opts,
    script: &Path,
    backend: &Backend,
    c: &mut Contender,
    scenario: &str,
) -> Result<Measure, String> {
    let load = load_of(scenario);
    c.check_alive()?;
    let check = |w: &WrkOut, what: &str| -> Result<(), String> {
        let bad: Vec<String> = w
            .errors
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !bad.is_empty() {
            return Err(format!(
                "{what}: wrk errors ({}) in {} requests",
                bad.join(", "),
                w.requests
            ));
        }
        if w.requests == 0 {
            return Err(format!("{what}: no request completed"));
        }
        if w.bytes < w.requests * load.body {
            return Err(format!(
                "{what}: {} bytes for {} requests, less than the {}-byte bodies",
                w.bytes, w.requests, load.body
            ));
        }
        Ok(())
    };
    if !opts.warmup.is_zero() {
        let w = run_wrk(
            script,
            c.entry_port,
            &load,
            opts.wrk_threads,
            opts.warmup,
            || {},
        )?;
        check(&w, "warm-up")?;
    }
    let pids = c.pids();
    let cpu = |pids: &[u32]| pids.iter().filter_map(|p| cpu_secs(*p)).sum::<f64>();
    let mut peaks = vec![0u64; pids.len()];
    let mut peak_sum = 0u64;
    let mut sample = || {
        let now: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
        for (p, n) in peaks.iter_mut().zip(&now) {
            *p = (*p).max(*n);
        }
        peak_sum = peak_sum.max(now.iter().sum());
    };
    let accepts0 = backend.accepts();
    let opens0 = passive_opens();
    let nginx = backend.proc.pid();
    let ours = || {
        cpu(&pids) + cpu_secs(nginx).unwrap_or(0.0) + self_and_children_cpu_secs().unwrap_or(0.0)
    };
    let (busy0, ours0) = (machine_busy_secs(), ours());
    let cpu0 = cpu(&pids);
    let w = run_wrk(
        script,
        c.entry_port,
        &load,
        opts.wrk_threads,
        opts.duration,
        &mut sample,
    )?;
    sample();
    let (busy1, ours1) = (machine_busy_secs(), ours());
    let cpu1 = cpu(&pids);
    let opens1 = passive_opens();
    let accepts1 = backend.accepts();
    c.check_alive()?;
    check(&w, "measured run")?;
    let m = Measure {
        rps: w.requests as f64 / w.duration_s,
        mb_s: w.bytes as f64 / w.duration_s / 1e6,
        p50_us: w.p50_us,
        p90_us: w.p90_us,
        p99_us: w.p99_us,
        p999_us: w.p999_us,
        max_us: w.max_us,
        requests: w.requests,
        bytes: w.bytes,
        duration_s: w.duration_s,
        proxy_cpu_s: cpu1 - cpu0,
        // The status request itself is the one extra accept.
        backend_accepts: match (accepts0, accepts1) {
            (Some(a), Some(b)) => b.saturating_sub(a + 1),
            _ => 0,
        },
        passive_opens: match (opens0, opens1) {
            (Some(a), Some(b)) => b.saturating_sub(a + 1),
            _ => 0,
        },
        rss_peak_kib: peaks,
        rss_peak_sum_kib: peak_sum,
        foreign_cores: match (busy0, busy1) {
            (Some(a), Some(b)) => ((b - a) - (ours1 - ours0)).max(0.0) / w.duration_s,
            _ => f64::NAN,
        },
    };
    if load.close && c.name == "direct" && (m.backend_accepts as f64) < 0.9 * m.requests as f64 {
        return Err(format!(
            "wrk did not reconnect per request: {} nginx accepts for {} requests",
            m.backend_accepts, m.requests
        ));
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Report.

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Picks one number out of a measurement.
type Metric = fn(&Measure) -> f64;

/// All rounds of one (scenario, contender) cell.
type Cells = BTreeMap<(&'static str, &'static str), Vec<Result<Measure, String>>>;

/// The per-metric medians of a cell, or `None` if any round failed (or none ran).
fn med(cells: &Cells, scenario: &'static str, contender: &'static str) -> Option<Measure> {
    let rounds = cells.get(&(scenario, contender))?;
    let ok: Vec<&Measure> = rounds.iter().filter_map(|r| r.as_ref().ok()).collect();
    if ok.is_empty() || ok.len() != rounds.len() {
        return None;
    }
    let m = |f: fn(&Measure) -> f64| median(ok.iter().map(|x| f(x)).collect());
    let hops = ok[0].rss_peak_kib.len();
    Some(Measure {
        rps: m(|x| x.rps),
        mb_s: m(|x| x.mb_s),
        p50_us: m(|x| x.p50_us),
        p90_us: m(|x| x.p90_us),
        p99_us: m(|x| x.p99_us),
        p999_us: m(|x| x.p999_us),
        max_us: m(|x| x.max_us),
        requests: m(|x| x.requests as f64) as u64,
        bytes: m(|x| x.bytes as f64) as u64,
        duration_s: m(|x| x.duration_s),
        proxy_cpu_s: m(|x| x.proxy_cpu_s),
        backend_accepts: m(|x| x.backend_accepts as f64) as u64,
        passive_opens: m(|x| x.passive_opens as f64) as u64,
        // Peaks: the maximum over the rounds.
        rss_peak_kib: (0..hops)
            .map(|i| ok.iter().map(|x| x.rss_peak_kib[i]).max().unwrap_or(0))
            .collect(),
        rss_peak_sum_kib: ok.iter().map(|x| x.rss_peak_sum_kib).max().unwrap_or(0),
        foreign_cores: m(|x| x.foreign_cores),
    })
}

fn fmt_ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn fmt_ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

/// "median (min–max)" of one metric over the successful rounds.
fn spread(rounds: &[Result<Measure, String>], f: fn(&Measure) -> f64, digits: usize) -> String {
    let v: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(f)
        .collect();
    if v.len() < 2 {
        return String::new();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(" ({lo:.digits$}–{hi:.digits$})")
}

/// The state of a contender that could not run, or its hops.
enum Slot {
    Running(Contender),
    Unavailable(&'static str, String),
}

impl Slot {
    fn name(&self) -> &'static str {
        match self {
            Slot::Running(c) => c.name,
            Slot::Unavailable(n, _) => n,
        }
    }
}

/// The RSS of each running contender's hops idle after all load, and their VmHWM sum.
struct AfterLoad {
    rss_sum_kib: u64,
    hwm_sum_kib: u64,
}

struct Report<'a> {
    opts: &'a Opts,
    slots: &'a [Slot],
    cells: &'a Cells,
    after: &'a BTreeMap<&'static str, AfterLoad>,
    env: Value,
}

impl Report<'_> {
    fn loads(&self) -> Vec<&'static str> {
        self.opts
            .scenarios
            .iter()
            .copied()
            .filter(|s| LOADS.contains(s))
            .collect()
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let o = self.opts;
        let _ = writeln!(
            md,
            "## meshid-proxy vs haproxy vs stunnel, two hops of mTLS on loopback\n"
        );
        let _ = writeln!(
            md,
            "{} per cell after a {} warm-up, {} round(s) interleaved, medians; wrk {} thread(s); \
             TLS 1.3 {} for haproxy and stunnel; resumption for haproxy/stunnel {}; {}.\n",
            fmt_dur(o.duration),
            fmt_dur(o.warmup),
            o.rounds,
            o.wrk_threads,
            o.ciphersuite,
            if o.resumption { "on" } else { "off" },
            self.env["machine"].as_str().unwrap_or(""),
        );
        for slot in self.slots {
            if let Slot::Unavailable(name, why) = slot {
                let _ = writeln!(md, "**{name}: not run**: {}\n", one_line(why));
            }
        }
        let running: Vec<&Contender> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Running(c) => Some(c),
                Slot::Unavailable(..) => None,
            })
            .collect();
        md.push_str(&self.tls_table(&running));
        for scenario in self.loads() {
            let load = load_of(scenario);
            let title = match scenario {
                "keepalive16" | "keepalive64" => format!(
                    "### Keep-alive, 1 KiB responses, {} connections (`{scenario}`)",
                    load.conns
                ),
                "bulk" => format!(
                    "### Bulk, 1 MiB responses, {} keep-alive connections (`bulk`)",
                    load.conns
                ),
                _ => format!(
                    "### New connection per request, 1 KiB responses, {} at a time (`newconn`)",
                    load.conns
                ),
            };
            let _ = writeln!(md, "{title}\n");
            let mut head = vec!["contender"];
            head.extend(match scenario {
                "bulk" => vec!["MB/s (min–max)", "p50", "p99", "proxy CPU ms per MB"],
                "newconn" => vec![
                    "connections/s (min–max)",
                    "p50",
                    "p99",
                    "proxy CPU µs per connection",
                    "nginx accepts per request",
                    "all accepts per request",
                ],
                _ => vec![
                    "requests/s (min–max)",
                    "p50",
                    "p99",
                    "proxy CPU µs per request",
                ],
            });
            head.extend(["vs direct", "others' CPU"]);
            let _ = writeln!(
                md,
                "| {} |\n|{}",
                head.join(" | "),
                "---|".repeat(head.len())
            );
            let direct = med(self.cells, scenario, "direct");
            for c in &running {
                let rounds = self
                    .cells
                    .get(&(scenario, c.name))
                    .map_or(&[][..], Vec::as_slice);
                let Some(m) = med(self.cells, scenario, c.name) else {
                    let failed = rounds.iter().filter(|r| r.is_err()).count();
                    let _ = writeln!(
                        md,
                        "| {} | **FAILED** ({failed}/{} rounds) |{}",
                        c.name,
                        rounds.len(),
                        " |".repeat(head.len() - 2)
                    );
                    continue;
                };
                let cpu = |v: f64| {
                    if c.hops.is_empty() {
                        "–".to_owned()
                    } else {
                        format!("{v:.1}")
                    }
                };
                let per = |n: u64| format!("{:.2}", n as f64 / m.requests.max(1) as f64);
                let vs_direct =
                    |f: fn(&Measure) -> f64| fmt_ratio(f(&m), direct.as_ref().map_or(f64::NAN, f));
                let mut row = vec![c.name.to_owned()];
                match scenario {
                    "bulk" => row.extend([
                        format!("{:.1}{}", m.mb_s, spread(rounds, |x| x.mb_s, 1)),
                        fmt_ms(m.p50_us),
                        fmt_ms(m.p99_us),
                        cpu(m.proxy_cpu_s * 1e3 / (m.bytes as f64 / 1e6)),
                        vs_direct(|x| x.mb_s),
                    ]),
                    "newconn" => row.extend([
                        format!("{:.0}{}", m.rps, spread(rounds, |x| x.rps, 0)),
                        fmt_ms(m.p50_us),
                        fmt_ms(m.p99_us),
                        cpu(m.cpu_us_per_req()),
                        per(m.backend_accepts),
                        per(m.passive_opens),
                        vs_direct(|x| x.rps),
                    ]),
                    _ => row.extend([
                        format!("{:.0}{}", m.rps, spread(rounds, |x| x.rps, 0)),
                        fmt_ms(m.p50_us),
                        fmt_ms(m.p99_us),
                        cpu(m.cpu_us_per_req()),
                        vs_direct(|x| x.rps),
                    ]),
                }
                row.push(format!("{:.2} cores", m.foreign_cores));
                let _ = writeln!(md, "| {} |", row.join(" | "));
            }
            if scenario == "newconn" {
                let _ = writeln!(
                    md,
                    "\nAccepts per request: nginx's own counter, and the machine's TCP \
                     PassiveOpens (approximate: anything else on the machine counts too). A \
                     two-hop chain that opens one mTLS connection per client connection \
                     accepts 3 per request (hop 1, hop 2, nginx); direct 1."
                );
            }
            let _ = writeln!(md);
        }
        if !self.loads().is_empty() {
            md.push_str(
                "Proxy CPU: user + system time of the two hops over the measured run. Others' \
                 CPU: what the rest of the machine used meanwhile (approximate, from /proc/stat; \
                 median over the rounds); above about 0.1 cores, other work was competing and the cell is noisy.\n\n",
            );
        }
        if o.scenarios.contains(&"rss") {
            md.push_str(&self.rss_table(&running));
        }
        md.push_str(&self.ratio_table(&running));
        let failures: Vec<String> = self
            .cells
            .iter()
            .flat_map(|((s, c), rounds)| {
                rounds.iter().enumerate().filter_map(move |(i, r)| {
                    r.as_ref()
                        .err()
                        .map(|e| format!("- `{s}` / `{c}` round {}: {}", i + 1, one_line(e)))
                })
            })
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(md, "### Failures\n\n{}\n", failures.join("\n"));
        }
        md
    }

    fn tls_table(&self, running: &[&Contender]) -> String {
        let mut md = String::from(
            "### Hop 2 TLS, as `openssl s_client` (offering meshid's suite order, no client \
             certificate) sees it\n\n\
             | contender | protocol | ciphersuite | group | server signature \
             | refused without a client certificate |\n\
             |---|---|---|---|---|---|\n",
        );
        for c in running.iter().filter(|c| c.mtls_port != 0) {
            let _ = match &c.tls {
                Some(t) => writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.name,
                    t.protocol,
                    t.cipher,
                    t.group,
                    t.signature,
                    if t.rejected_without_cert {
                        "yes"
                    } else {
                        "**no**"
                    }
                ),
                None => writeln!(md, "| {} | check failed | | | | |", c.name),
            };
        }
        md.push('\n');
        md
    }

    fn rss_table(&self, running: &[&Contender]) -> String {
        let mut md = String::from(
            "### Memory (`rss`): VmRSS of the two hops\n\n\
             | contender | hop 1 idle | hop 2 idle | sum idle |",
        );
        let loads = self.loads();
        for s in &loads {
            let _ = write!(md, " sum peak `{s}` |");
        }
        md.push_str(
            " sum idle after load | sum VmHWM | threads hop 1 / hop 2 |\n|---|---|---|---|",
        );
        for _ in &loads {
            md.push_str("---|");
        }
        md.push_str("---|---|---|\n");
        for c in running.iter().filter(|c| !c.hops.is_empty()) {
            let idle: u64 = c.hops.iter().map(|h| h.idle_rss_kib).sum();
            let _ = write!(
                md,
                "| {} | {} | {} | {} |",
                c.name,
                fmt_mib(c.hops[0].idle_rss_kib),
                fmt_mib(c.hops[1].idle_rss_kib),
                fmt_mib(idle)
            );
            for s in &loads {
                let ok: Vec<&Measure> = self
                    .cells
                    .get(&(*s, c.name))
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_ref().ok())
                    .collect();
                let peak = ok.iter().map(|m| m.rss_peak_sum_kib).max();
                let hop = |i: usize| {
                    ok.iter()
                        .filter_map(|m| m.rss_peak_kib.get(i).copied())
                        .max()
                        .unwrap_or(0) as f64
                        / 1024.0
                };
                let _ = write!(
                    md,
                    " {} |",
                    peak.map_or("–".into(), |p| format!(
                        "{} ({:.1} + {:.1})",
                        fmt_mib(p),
                        hop(0),
                        hop(1)
                    ))
                );
            }
            let after = self.after.get(c.name);
            let _ = writeln!(
                md,
                " {} | {} | {} / {} |",
                after.map_or("–".into(), |a| fmt_mib(a.rss_sum_kib)),
                after.map_or("–".into(), |a| fmt_mib(a.hwm_sum_kib)),
                c.hops[0].threads,
                c.hops[1].threads,
            );
        }
        md.push_str(
            "\nIdle: after start and readiness, before any connection through the hops. Peaks: \
             the highest sum (hop 1 + hop 2, each its own highest) sampled every 100 ms \
             during the scenario's measured runs (processes live through the whole bench, so a \
             peak can include memory kept from an earlier \
             scenario). Threads: at idle (stunnel starts a thread per connection).\n\n",
        );
        md
    }

    fn ratio_table(&self, running: &[&Contender]) -> String {
        let names: Vec<&str> = running.iter().map(|c| c.name).collect();
        let meshes: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.starts_with("meshid"))
            .collect();
        let bases: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !n.starts_with("meshid"))
            .collect();
        if meshes.is_empty() || bases.is_empty() {
            return String::new();
        }
        let loads = self.loads();
        let mut md = String::from(
            "### Ratios meshid / other (throughput: higher is better for meshid; latency and \
             memory: lower is better)\n\n| pair |",
        );
        let mut rule = String::from("|---|");
        let mut cols: Vec<(&str, &str, Metric)> = Vec::new();
        for s in &loads {
            match *s {
                "bulk" => cols.push((s, "MB/s", |m| m.mb_s)),
                "newconn" => cols.push((s, "conn/s", |m| m.rps)),
                _ => {
                    cols.push((s, "req/s", |m| m.rps));
                    cols.push((s, "p99", |m| m.p99_us));
                }
            }
        }
        for (s, what, _) in &cols {
            let _ = write!(md, " `{s}` {what} |");
            rule.push_str("---|");
        }
        let rss = self.opts.scenarios.contains(&"rss");
        if rss {
            md.push_str(" idle RSS |");
            rule.push_str("---|");
        }
        let _ = writeln!(md, "\n{rule}");
        let idle = |n: &str| -> f64 {
            running.iter().find(|c| c.name == n).map_or(f64::NAN, |c| {
                c.hops.iter().map(|h| h.idle_rss_kib).sum::<u64>() as f64
            })
        };
        for m in &meshes {
            for b in &bases {
                let fair = match (*m, *b) {
                    ("meshid-tcp", "haproxy-tcp" | "stunnel") => " (apples to apples, L4)",
                    ("meshid-detect", "haproxy-http") => " (apples to apples, L7 on hop 2)",
                    _ => "",
                };
                let _ = write!(md, "| {m} / {b}{fair} |");
                for (s, _, f) in &cols {
                    let a = med(self.cells, s, m).map_or(f64::NAN, |x| f(&x));
                    let z = med(self.cells, s, b).map_or(f64::NAN, |x| f(&x));
                    let _ = write!(md, " {} |", fmt_ratio(a, z));
                }
                if rss {
                    let cell = if *b == "direct" {
                        "–".into()
                    } else {
                        fmt_ratio(idle(m), idle(b))
                    };
                    let _ = write!(md, " {cell} |");
                }
                md.push('\n');
            }
        }
        md.push_str(
            "\nDESIGN.md section 10 targets, two hops: keep-alive requests/s ≥ 1.25 × haproxy's \
             and stunnel's, p99 ≤ haproxy's (ratio ≤ 1), bulk ≥ 1.5 × haproxy's, new connections/s \
             ≥ 3 × haproxy's, idle RSS under 10 MB per proxy.\n\n",
        );
        md
    }

    fn json(&self) -> Value {
        let o = self.opts;
        let contenders: Vec<Value> = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Unavailable(n, why) => json!({"name": n, "available": false, "error": why}),
                Slot::Running(c) => json!({
                    "name": c.name,
                    "available": true,
                    "hop2_tls": c.tls.as_ref().map(|t| json!({
                        "protocol": t.protocol,
                        "ciphersuite": t.cipher,
                        "group": t.group,
                        "signature": t.signature,
                        "rejected_without_client_cert": t.rejected_without_cert,
                    })),
                    "hops": c.hops.iter().map(|h| json!({
                        "role": h.role,
                        "idle_rss_kib": h.idle_rss_kib,
                        "threads": h.threads,
                    })).collect::<Vec<_>>(),
                    "after_load": self.after.get(c.name).map(|a| json!({
                        "rss_sum_kib": a.rss_sum_kib,
                        "hwm_sum_kib": a.hwm_sum_kib,
                    })),
                }),
            })
            .collect();
        let mut results = serde_json::Map::new();
        for ((s, c), rounds) in self.cells {
            let entry = results
                .entry(s.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap();
            entry.insert(
                c.to_string(),
                json!({
                    "median": med(self.cells, s, c).map(|m| m.to_json()),
                    "rounds": rounds.iter().map(|r| match r {
                        Ok(m) => m.to_json(),
                        Err(e) => json!({"error": e}),
                    }).collect::<Vec<_>>(),
                }),
            );
        }
        json!({
            "bench": "meshid-proxy-bench",
            "settings": {
                "duration_s": o.duration.as_secs_f64(),
                "warmup_s": o.warmup.as_secs_f64(),
                "rounds": o.rounds,
                "wrk_threads": o.wrk_threads,
                "tls_resumption_haproxy_stunnel": o.resumption,
                "ciphersuite": o.ciphersuite,
                "scenarios": o.scenarios,
            },
            "environment": self.env,
            "contenders": contenders,
            "results": results,
        })
    }
}

fn fmt_dur(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// An error on one line, shortened, for a Markdown paragraph.
fn one_line(s: &str) -> String {
    let flat = s.lines().map(str::trim).collect::<Vec<_>>().join(" / ");
    if flat.chars().count() > 600 {
        format!("{}…", flat.chars().take(600).collect::<String>())
    } else {
        flat
    }
}

// ---------------------------------------------------------------------------------------------
// Main.

/// Everything that runs, in drop order: the contenders, then the meshid control plane, then the
/// backend, then the directory.
struct World {
    slots: Vec<Slot>,
    _mesh: Option<Mesh>,
    backend: Backend,
    tmp: tempfile::TempDir,
}

fn start_contender(
    name: &'static str,
    opts: &Opts,
    dir: &Path,
    pki: &Pki,
    backend: &Backend,
    mesh: &Result<Mesh, String>,
) -> Result<Contender, String> {
    let mesh = || mesh.as_ref().map_err(Clone::clone);
    let d = dir.join(name);
    match name {
        "direct" => Ok(Contender {
            name,
            entry_port: backend.port,
            mtls_port: 0,
            hops: Vec::new(),
            tls: None,
        }),
        "haproxy-tcp" => start_haproxy(name, opts, &d, pki, backend.port, false),
        "haproxy-http" => start_haproxy(name, opts, &d, pki, backend.port, true),
        "stunnel" => start_stunnel(opts, &d, pki, backend.port),
        "meshid-tcp" => start_meshid(name, &d, mesh()?, backend.port, "tcp", None),
        "meshid-detect" => start_meshid(name, &d, mesh()?, backend.port, "detect", None),
        "meshid-detect-log" => start_meshid(
            name,
            &d,
            mesh()?,
            backend.port,
            "detect",
            Some(&d.join("access.log")),
        ),
        other => Err(format!("unknown contender {other}")),
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cores} cores, load average {} at start",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn main() {
    let opts = parse_args();
    install_signal_handler();
    meshid_tests::set_child_log_level("info");
    let env = json!({
        "machine": machine(),
        "haproxy": tool_version(HAPROXY, "-v"),
        "stunnel": tool_version(STUNNEL, "-version"),
        "nginx": tool_version(NGINX, "-v"),
        "wrk": tool_version(WRK, "-v"),
    });
    eprintln!("{env}");

    let mut tmp = tempfile::Builder::new()
        .prefix("meshid-proxy-bench-")
        .tempdir()
        .unwrap();
    if opts.keep {
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    } else {
        REGISTRY.lock().unwrap().1.push(tmp.path().to_owned());
    }
    let dir = tmp.path().to_owned();
    let script = dir.join("summary.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();
    let pki = mint_pki(&dir.join("pki"));
    let backend = Backend::start(&dir.join("nginx"));
    eprintln!(
        "nginx on 127.0.0.1:{} (pid {})",
        backend.port,
        backend.proc.pid()
    );

    let mesh = if opts.contenders.iter().any(|c| c.starts_with("meshid")) {
        eprintln!("starting the meshid CA and agent");
        Mesh::start(&dir.join("mesh"))
    } else {
        Err("not selected".into())
    };
    if let Err(e) = &mesh {
        if opts.contenders.iter().any(|c| c.starts_with("meshid")) {
            eprintln!("meshid rows cannot run: {e}");
        }
    }
    let mut slots = Vec::new();
    for name in &opts.contenders {
        eprintln!("starting {name}");
        slots.push(
            match start_contender(name, &opts, &dir, &pki, &backend, &mesh) {
                Ok(c) => Slot::Running(c),
                Err(e) => {
                    eprintln!("{name}: not run: {e}");
                    Slot::Unavailable(name, e)
                }
            },
        );
    }
    let mut world = World {
        slots,
        _mesh: mesh.ok(),
        backend,
        tmp,
    };

    // Idle memory, before any connection through the hops.
    std::thread::sleep(Duration::from_secs(1));
    for slot in &mut world.slots {
        if let Slot::Running(c) = slot {
            for h in &mut c.hops {
                h.idle_rss_kib = rss_kib(h.proc.pid()).unwrap_or(0);
                h.threads = proc_status_kib(h.proc.pid(), "Threads:").unwrap_or(0);
            }
        }
    }
    for slot in &mut world.slots {
        if let Slot::Running(c) = slot {
            if c.mtls_port != 0 {
                match tls_check(c.mtls_port) {
                    Ok(t) => {
                        eprintln!("{} hop 2 TLS: {t:?}", c.name);
                        c.tls = Some(t);
                    }
                    Err(e) => eprintln!("{} hop 2 TLS check: {e}", c.name),
                }
            }
            if let Err(e) = probe(c) {
                eprintln!("{}: not run: {e}", c.name);
                *slot = Slot::Unavailable(slot.name(), e);
            }
        }
    }

    let mut cells: Cells = BTreeMap::new();
    let loads: Vec<&'static str> = opts
        .scenarios
        .iter()
        .copied()
        .filter(|s| LOADS.contains(s))
        .collect();
    for round in 0..opts.rounds {
        for scenario in &loads {
            for slot in &mut world.slots {
                let Slot::Running(c) = slot else { continue };
                eprint!(
                    "round {}/{} {scenario} {}: ",
                    round + 1,
                    opts.rounds,
                    c.name
                );
                let r = run_cell(
                    &opts,
                    &world.tmp.path().join("summary.lua"),
                    &world.backend,
                    c,
                    scenario,
                );
                match &r {
                    Ok(m) => eprintln!(
                        "{:.0} req/s, {:.1} MB/s, p50 {}, p99 {}, proxy CPU {:.2} s",
                        m.rps,
                        m.mb_s,
                        fmt_ms(m.p50_us),
                        fmt_ms(m.p99_us),
                        m.proxy_cpu_s
                    ),
                    Err(e) => eprintln!("FAILED: {e}"),
                }
                cells.entry((scenario, c.name)).or_default().push(r);
                // Let connections close (and stunnel's threads exit) before the next cell.
                std::thread::sleep(Duration::from_millis(if *scenario == "newconn" {
                    1000
                } else {
                    300
                }));
            }
        }
    }

    let mut after = BTreeMap::new();
    if opts.scenarios.contains(&"rss") {
        std::thread::sleep(Duration::from_secs(2));
        for slot in &world.slots {
            if let Slot::Running(c) = slot {
                if c.hops.is_empty() {
                    continue;
                }
                let pids = c.pids();
                after.insert(
                    c.name,
                    AfterLoad {
                        rss_sum_kib: pids.iter().filter_map(|p| rss_kib(*p)).sum(),
                        hwm_sum_kib: pids
                            .iter()
                            .filter_map(|p| proc_status_kib(*p, "VmHWM:"))
                            .sum(),
                    },
                );
            }
        }
    }

    let report = Report {
        opts: &opts,
        slots: &world.slots,
        cells: &cells,
        after: &after,
        env,
    };
    println!("{}", report.markdown());
    let dump = serde_json::to_string_pretty(&report.json()).unwrap();
    match &opts.json {
        Some(path) => {
            std::fs::write(path, format!("{dump}\n")).unwrap();
            eprintln!("JSON written to {}", path.display());
        }
        None => println!("```json\n{dump}\n```"),
    }
    let failed = cells.values().flatten().any(Result::is_err)
        || world
            .slots
            .iter()
            .any(|s| matches!(s, Slot::Unavailable(..)));
    drop(world);
    if failed {
        std::process::exit(1);
    }
}
