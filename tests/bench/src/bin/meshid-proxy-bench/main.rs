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
//! - TLS 1.3 only everywhere, ECDSA P-256 certificates. Key exchange: X25519 for haproxy and
//!   stunnel (OpenSSL 3.0 has no ML-KEM); meshid's two hops negotiate its default, the hybrid
//!   X25519MLKEM768 (more work per handshake, and a larger ClientHello), so meshid's rows pay
//!   for post-quantum security that the others lack. The "Hop 2 TLS" table's group is what
//!   `openssl s_client` (classical) gets.
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

mod backend;
mod cli;
mod contenders;
mod load;
mod measure;
mod mesh;
mod pki;
mod report;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use meshid_bench::procs::*;
use meshid_bench::wrk::WRK_SCRIPT;
use serde_json::json;

use crate::backend::*;
use crate::cli::*;
use crate::contenders::*;
use crate::load::*;
use crate::measure::*;
use crate::mesh::*;
use crate::pki::*;
use crate::report::*;

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
        "haproxy-tcp" => start_haproxy(name, opts, &d, pki, backend.port, false, true),
        "haproxy-http" => start_haproxy(name, opts, &d, pki, backend.port, true, true),
        "haproxy-plain" => start_haproxy(name, opts, &d, pki, backend.port, false, false),
        "nginx-stream" => start_nginx_stream(opts, &d, pki, backend.port),
        "stunnel" => start_stunnel(opts, &d, pki, backend.port),
        "meshid-tcp" => start_meshid(name, &d, mesh()?, backend.port, "tcp", None, 1),
        "meshid-detect" => start_meshid(name, &d, mesh()?, backend.port, "detect", None, 1),
        "meshid-tcp-2t" => start_meshid(name, &d, mesh()?, backend.port, "tcp", None, 2),
        "meshid-detect-2t" => start_meshid(name, &d, mesh()?, backend.port, "detect", None, 2),
        "meshid-detect-log" => start_meshid(
            name,
            &d,
            mesh()?,
            backend.port,
            "detect",
            Some(&d.join("access.log")),
            1,
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
        register_dir(tmp.path());
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
