//! `meshid-bench`: the node agent's and the node API's benchmarks (DESIGN.md section 10)
//! against the real binaries, each scenario with a baseline measured in the same run.
//!
//! ```text
//! cargo build --release -p meshid-ca -p meshid-agent -p meshid-bench
//! target/release/meshid-bench <fetch-latency|propagation|rss|node-sign|all> [--perf]
//! ```
//!
//! Every scenario starts its own CA (SQLite) and, except `node-sign` (where the bench itself is
//! the agent), one agent attested with a join token, in a temporary directory, on loopback and
//! Unix sockets only, with `MESHID_LOG=info`. The processes are killed and the directory
//! removed when the scenario ends, on failure too (set `MESHID_BENCH_KEEP=1` to keep the
//! directory and the logs). Results are Markdown tables on stdout;
//! progress goes to stderr. Workload API calls use the generated client
//! (`meshid_api::workload::spiffe_workload_api_client`) with an interceptor that adds (or not)
//! the `workload.spiffe.io: true` header, so that the client's own work is minimal.
//!
//! - `fetch-latency`: FetchX509SVID, time from opening the call to its first message, with 1,
//!   100 and 1000 concurrent clients. Back to back: each client holds one connection and opens
//!   calls back to back for 5 s (saturation). Paced: the same connections, 1,000 calls/s in
//!   all, staggered. Cold: all clients start at the same instant, each connecting and then
//!   fetching. Baseline: the same call without the header, which the agent refuses with
//!   InvalidArgument before attesting (the transport floor), interleaved with the real calls.
//!   `--perf` profiles the agent during a further back-to-back run with 100 clients.
//! - `interop-latency`: the first FetchX509SVID through py-spiffe (PyPI `spiffe`, gRPC C-core,
//!   whose `:authority` is the percent-encoded socket path), a new client per sample, against
//!   the Rust `spiffe` crate doing the same (connect, fetch, parse), interleaved in 5 rounds of
//!   200 samples each. Needs the Python of the interop tests (`MESHID_INTEROP_PYTHON` or
//!   `target/interop-venv`, made by `.ci/run`).
//! - `propagation`: 100 times, an entry created through the admin API for the bench's uid, timed
//!   until the FetchX509SVID stream held open by the bench delivers its SVID, then deleted and
//!   timed until withdrawn; first with only the bench's entry, then with 10,000 background
//!   entries (selectors that do not match) registered while the agent runs and all signed.
//!   Baseline: the CreateEntry round trip itself. `MESHID_BENCH_LIVE=N` registers only N of
//!   them while the agent runs and the rest while it is stopped (signed in batches when it
//!   starts again).
//! - `rss`: the agent's VmRSS idle with 1 entry (baseline), with 1,000 and 10,000 signed entries
//!   (registered while it runs), and with 10,000 open FetchX509SVID streams (100 connections of
//!   100 streams); then a second agent with 1 entry, idle and with 10,000 streams, to isolate
//!   the cost of a stream.
//! - `node-sign`: X.509-SVIDs per second through the node API's BatchSignX509 (500 CSRs per call,
//!   CSRs generated before timing, for 500 entries of the bench's agent), 1 caller and then 2
//!   concurrent callers, against the in-process signing path (`parse_csr` + `sign_x509_svid`)
//!   in this process on the same CSRs, before and after. `--perf` then profiles the CA with
//!   `perf` during a further untimed 1-caller run.
//! - `taint`: 10,000 entries (1 h SVIDs) on 2 agents, all signed; then `ca taint` of the
//!   active intermediate, timed until the CA's issuance records show half, then all, of the
//!   holders it had signed for re-issued by a fresh intermediate (`ca status`, polled every
//!   250 ms). Baseline in the same run: both agents restarted at once (keys live in memory
//!   only, so they issue all 10,000 SVIDs anew), timed until both hold them all; and the
//!   scheduled replacement, which waits for each SVID's own rotation point (half its life).
//! - `policy-delivery`: the central policy from `policy apply` to every proxy: 4 agents, 25
//!   proxies on each (`MESHID_BENCH_PROXIES`, default 100) following the policy from their agent
//!   (`policy_source = "agent"`), each with its own SPIFFE ID and a rule of its own among 100;
//!   `MESHID_BENCH_APPLIES` (default 50) applies through the admin API, each changing a rule
//!   that concerns every proxy, timed from just before the call to the instant each proxy put the
//!   revision in force (the timestamp of its "central policy in force" log line, same clock).
//!   Baseline in the same run: the same proxies restarted on a local `policy_file` (reloaded
//!   when its content changes, looked at every 200 ms), the file replaced (rename) the same
//!   number of times, timed to each proxy's "policy reloaded" line; and the apply call alone.
//!   Also what the CA measured (`policy.apply.effective`, after_ms: every agent reported the
//!   revision handed to every proxy's stream; checked every 100 ms).
//! - `ha`: failover under load on three CA servers sharing PostgreSQL (see `ha.rs`): requests
//!   through two proxies for 20 s without a kill (the baseline), then 20 s with `kill -9` of
//!   each agent's server in turn; failures, throughput, latency and reattach times.
//! - `scale`: many agents (the agent's own manager, many in this process) on one and on three
//!   CA servers sharing PostgreSQL, 10,000 and then up to 100,000 entries (see `scale.rs`):
//!   entry create → SVID at the agent, CA memory, database statements per second, and the
//!   time for every agent to reconnect after a CA server restart.
//! - `storm`: api's inbound listener under connection storms (10,000 idle mTLS connections,
//!   half-open ones, slow ClientHellos, past max_connections) while legitimate requests flow
//!   (see `storm.rs`).
//! - `console`: the CA console's identities API with 10,000 entries, all signed: random pages,
//!   searches, against the CA's `/healthz` as the floor (see `console.rs`).
//! - `transparent`: transparent mode against explicit mode and against no proxy, between two
//!   hosts made of network namespaces (as root: ip, iptables, wrk, nginx, curl), wrk in one and
//!   nginx in the other, keep-alive and a new connection per request, L4 (`tcp`) and L7
//!   (`detect`) (see `transparent.rs`; `--duration`, `--warmup`, `--rounds` after the name).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use meshid_api::admin::authority_client::AuthorityClient;
use meshid_api::admin::entries_client::EntriesClient;
use meshid_api::admin::tokens_client::TokensClient;
use meshid_api::admin::{self};
use meshid_api::node::{self, node_client::NodeClient};
use meshid_api::tls::{self, ExpectedId};
use meshid_api::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_api::workload::{X509svidRequest, X509svidResponse};
use meshid_tests::{http_get, rss_kib, uid, Agent, Ca};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const TD: &str = "example.org";
const SCENARIOS: [&str; 13] = [
    "fetch-latency",
    "interop-latency",
    "propagation",
    "rss",
    "node-sign",
    "taint",
    "revocation",
    "policy-delivery",
    "ha",
    "scale",
    "storm",
    "transparent",
    "console",
];

// ---------------------------------------------------------------------------------------------
// Processes and measurements from /proc.

/// A CA and (optionally) one agent in a temporary directory. Fields drop in order: the
/// processes are killed before the directory is removed.
struct Stack {
    ca: Ca,
    agent: Option<Agent>,
    /// The agent's SPIFFE ID.
    agent_id: String,
    /// Its join token (used once; the agent keeps its identity across restarts).
    token: String,
    /// The bench's effective uid (what the agent attests).
    uid: u32,
    tmp: tempfile::TempDir,
}

impl Stack {
    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// Stops the agent (SIGTERM); [`Self::start_agent`] starts it again with the same data.
    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.proc.stop();
        }
    }

    fn start_agent(&mut self) {
        assert!(self.agent.is_none());
        self.agent = Some(Agent::start(self.tmp.path(), &self.ca, &self.token));
    }
}

/// Starts an agent in `dir` with one entry for this process's uid (id `entry_id`); returns it,
/// its SPIFFE ID and its join token.
fn start_agent(dir: &Path, ca: &Ca, entry_id: &str, uid: u32) -> (Agent, String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let (secret, agent_id) = ca.join_token();
    ca.ok(&[
        "entry",
        "create",
        "--id",
        entry_id,
        "--spiffe-id",
        &format!("spiffe://{TD}/bench/{entry_id}"),
        "--parent-id",
        &agent_id,
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);
    (Agent::start(dir, ca, &secret), agent_id, secret)
}

fn start_stack(with_agent: bool, ca_flags: &[&str]) -> Stack {
    let tmp = meshid_bench::procs::temp_dir("meshid-bench-");
    let dir = tmp.path().to_owned();
    let ca = Ca::start(&dir, ca_flags);
    let uid = uid();
    let (agent, agent_id, token) = if with_agent {
        let (a, id, token) = start_agent(&dir, &ca, "workload", uid);
        (Some(a), id, token)
    } else {
        (None, String::new(), String::new())
    };
    Stack {
        ca,
        agent,
        agent_id,
        token,
        uid,
        tmp,
    }
}

/// User + system CPU seconds of a process (all its threads).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15 (clock ticks, USER_HZ = 100).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// The samples of `/metrics` at `addr`, as (series, value).
fn scrape(addr: &str) -> Vec<(String, f64)> {
    let Some((200, body)) = http_get(addr, "/metrics") else {
        return Vec::new();
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn sample(samples: &[(String, f64)], series: &str) -> Option<f64> {
    samples.iter().find(|(k, _)| k == series).map(|(_, v)| *v)
}

/// Waits until the agent holds `entries` entries and no SVID is pending; returns how long.
async fn wait_signed(agent: &Agent, entries: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let m = tokio::task::block_in_place(|| scrape(&agent.ops_address));
        let held = sample(&m, "meshid_agent_entries");
        let pending = sample(&m, "meshid_agent_svids{state=\"pending\"}");
        if held == Some(entries as f64) && pending == Some(0.0) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "the agent did not sign {entries} entries in {timeout:?}: entries {held:?}, pending {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

type Intercept = fn(Request<()>) -> Result<Request<()>, Status>;
type Workload = SpiffeWorkloadApiClient<InterceptedService<Channel, Intercept>>;

fn with_header(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.metadata_mut()
        .insert("workload.spiffe.io", MetadataValue::from_static("true"));
    Ok(req)
}

fn without_header(req: Request<()>) -> Result<Request<()>, Status> {
    Ok(req)
}

fn workload(channel: Channel, header: bool) -> Workload {
    let f: Intercept = if header { with_header } else { without_header };
    SpiffeWorkloadApiClient::with_interceptor(channel, f)
}

/// One FetchX509SVID: with the header, until its first message (which must hold an SVID);
/// without, until the InvalidArgument refusal. Never prints a message: it holds private keys.
async fn fetch_once(client: &mut Workload, header: bool) -> Result<(), String> {
    match (header, client.fetch_x509svid(X509svidRequest {}).await) {
        (true, Ok(resp)) => match resp.into_inner().message().await {
            Ok(Some(m)) if !m.svids.is_empty() => Ok(()),
            Ok(Some(_)) => Err("first message without an SVID".into()),
            Ok(None) => Err("stream ended before its first message".into()),
            Err(s) => Err(format!("{}: {}", s.code(), s.message())),
        },
        (false, Err(s)) if s.code() == Code::InvalidArgument => Ok(()),
        (false, Ok(_)) => Err("answered without the security header".into()),
        (_, Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
    }
}

async fn connect_unix(path: &Path) -> Channel {
    meshid_api::client::connect_unix(path).await.unwrap()
}

/// Creates entries through the admin API, `concurrency` calls in flight; returns them.
async fn create_entries(
    admin: &Channel,
    specs: Vec<admin::Entry>,
    concurrency: usize,
) -> Vec<admin::Entry> {
    let n = specs.len();
    let queue = Arc::new(Mutex::new(specs.into_iter().enumerate()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = EntriesClient::new(admin.clone());
        let queue = Arc::clone(&queue);
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().unwrap().next();
                let Some((i, entry)) = next else {
                    return done;
                };
                let created = client
                    .create_entry(admin::CreateEntryRequest { entry: Some(entry) })
                    .await
                    .unwrap_or_else(|e| panic!("CreateEntry: {e}"))
                    .into_inner();
                done.push((i, created));
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, e)| e).collect()
}

/// Entries for `parent` whose selector (`unix:uid:<uid>`) the bench does not match when `uid`
/// is not its own; SPIFFE IDs `spiffe://example.org/bench/<tag>/<i>`.
fn entry_specs(
    parent: &str,
    uid: u32,
    tag: &str,
    range: std::ops::Range<usize>,
) -> Vec<admin::Entry> {
    range
        .map(|i| admin::Entry {
            spiffe_id: format!("spiffe://{TD}/bench/{tag}/{i}"),
            parent_id: parent.to_owned(),
            selectors: vec![format!("unix:uid:{uid}")],
            ..Default::default()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting.

/// Latencies in nanoseconds, sorted.
#[derive(Default)]
struct Lat(Vec<u64>);

impl Lat {
    fn add(&mut self, more: Vec<u64>) {
        self.0.extend(more);
        self.0.sort_unstable();
    }

    /// Nearest-rank percentile.
    fn p(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        Duration::from_nanos(self.0[rank - 1])
    }

    fn max(&self) -> Duration {
        Duration::from_nanos(self.0.last().copied().unwrap_or(0))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn fmt_d(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.1} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "-".into();
    }
    format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**missed**"
    }
}

// ---------------------------------------------------------------------------------------------
// fetch-latency

/// Latencies, errors, time and agent CPU of some passes.
#[derive(Default)]
struct Acc {
    lat: Lat,
    errors: u64,
    first_error: Option<String>,
    wall: f64,
    cpu: f64,
}

impl Acc {
    fn rate(&self) -> f64 {
        self.lat.len() as f64 / self.wall.max(1e-9)
    }

    fn cpu_per_call(&self) -> Duration {
        Duration::from_secs_f64(self.cpu / (self.lat.len().max(1) as f64))
    }

    fn report_errors(&self, what: &str) {
        if self.errors > 0 {
            eprintln!(
                "  {what}: {} unexpected outcomes, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
    }
}

type PassResult = (Vec<u64>, u64, Option<String>);

/// Every client opens calls back to back on its own connection until `dur` has passed.
async fn warm_pass(channels: &[Channel], header: bool, dur: Duration) -> PassResult {
    let deadline = Instant::now() + dur;
    let tasks: Vec<_> = channels
        .iter()
        .map(|ch| {
            let mut client = workload(ch.clone(), header);
            tokio::spawn(async move {
                let (mut lat, mut errors, mut first) = (Vec::new(), 0, None);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match fetch_once(&mut client, header).await {
                        Ok(()) => lat.push(ns(t.elapsed())),
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert(e);
                        }
                    }
                }
                (lat, errors, first)
            })
        })
        .collect();
    gather(tasks).await
}

/// Every client opens one call per `interval` (staggered across clients) until `dur` has
/// passed: a load well below saturation, unlike [`warm_pass`].
async fn paced_pass(
    channels: &[Channel],
    header: bool,
    interval: Duration,
    dur: Duration,
) -> PassResult {
    let start = tokio::time::Instant::now();
    let deadline = start + dur;
    let n = channels.len() as u32;
    let tasks: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let mut client = workload(ch.clone(), header);
            let first = start + interval * (i as u32) / n;
            tokio::spawn(async move {
                let (mut lat, mut errors, mut first_err) = (Vec::new(), 0, None);
                let mut ticks = tokio::time::interval_at(first, interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    let t = Instant::now();
                    match fetch_once(&mut client, header).await {
                        Ok(()) => lat.push(ns(t.elapsed())),
                        Err(e) => {
                            errors += 1;
                            first_err.get_or_insert(e);
                        }
                    }
                }
                (lat, errors, first_err)
            })
        })
        .collect();
    gather(tasks).await
}

/// `clients` tasks released at once; each connects, fetches once and hangs up.
async fn cold_round(socket: &Path, clients: usize, header: bool) -> PassResult {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let socket = socket.to_owned();
            tokio::spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                let result = match meshid_api::client::connect_unix(&socket).await {
                    Ok(ch) => fetch_once(&mut workload(ch, header), header).await,
                    Err(e) => Err(e.to_string()),
                };
                match result {
                    Ok(()) => (vec![ns(t.elapsed())], 0, None),
                    Err(e) => (Vec::new(), 1, Some(e)),
                }
            })
        })
        .collect();
    gather(tasks).await
}

async fn gather(tasks: Vec<tokio::task::JoinHandle<PassResult>>) -> PassResult {
    let (mut lat, mut errors, mut first) = (Vec::new(), 0, None);
    for t in tasks {
        let (l, e, f) = t.await.unwrap();
        lat.extend(l);
        errors += e;
        if first.is_none() {
            first = f;
        }
    }
    (lat, errors, first)
}

fn absorb(acc: &mut Acc, (lat, errors, first): PassResult, wall: f64, cpu: f64) {
    acc.lat.add(lat);
    acc.errors += errors;
    if acc.first_error.is_none() {
        acc.first_error = first;
    }
    acc.wall += wall;
    acc.cpu += cpu;
}

async fn fetch_latency(st: &Stack, profile: bool) {
    const SLICE: Duration = Duration::from_millis(2500);
    let agent = st.agent();
    let pid = agent.proc.id();
    let mut warm_rows = Vec::new();
    let mut cold_rows = Vec::new();
    let mut paced_rows = Vec::new();
    let mut report = String::new();
    let mut p99_at_100 = Duration::ZERO;
    let mut paced_p99_at_100 = Duration::ZERO;
    for clients in [1usize, 100, 1000] {
        eprintln!("fetch-latency: {clients} clients, back to back");
        let mut channels = Vec::with_capacity(clients);
        for chunk in 0..clients.div_ceil(100) {
            let n = (clients - chunk * 100).min(100);
            let connects = (0..n).map(|_| connect_unix(&agent.socket));
            channels.extend(futures::future::join_all(connects).await);
        }
        // Warm-up (the first call hashes the bench's binary; caches fill), not recorded.
        warm_pass(&channels, true, Duration::from_millis(500)).await;
        warm_pass(&channels, false, Duration::from_millis(200)).await;
        // [floor, fetch], interleaved: floor, fetch, floor, fetch.
        let mut acc = [Acc::default(), Acc::default()];
        for round in 0..4 {
            let header = round % 2 == 1;
            let (c0, t0) = (cpu_secs(pid), Instant::now());
            let r = warm_pass(&channels, header, SLICE).await;
            let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_secs(pid) - c0);
            absorb(&mut acc[usize::from(header)], r, wall, cpu);
        }
        acc[0].report_errors("floor");
        acc[1].report_errors("FetchX509SVID");
        if clients == 100 {
            p99_at_100 = acc[1].lat.p(0.99);
        }

        // Paced: 1,000 calls/s in all, whatever the number of clients.
        eprintln!("fetch-latency: {clients} clients, paced");
        let interval = Duration::from_millis(clients as u64);
        let mut paced = [Acc::default(), Acc::default()];
        for round in 0..4 {
            let header = round % 2 == 1;
            let c0 = cpu_secs(pid);
            let r = paced_pass(&channels, header, interval, SLICE).await;
            // The last tick may come up to an interval after the deadline: rates over SLICE.
            let (wall, cpu) = (SLICE.as_secs_f64(), cpu_secs(pid) - c0);
            absorb(&mut paced[usize::from(header)], r, wall, cpu);
        }
        paced[0].report_errors("paced floor");
        paced[1].report_errors("paced FetchX509SVID");
        if clients == 100 {
            paced_p99_at_100 = paced[1].lat.p(0.99);
        }
        paced_rows.push(format!(
            "| {clients} | {} | {:.0} | {} / {} | {} / {} | {} | {} |",
            fmt_d(interval),
            paced[1].rate(),
            fmt_d(paced[0].lat.p(0.5)),
            fmt_d(paced[0].lat.p(0.99)),
            fmt_d(paced[1].lat.p(0.5)),
            fmt_d(paced[1].lat.p(0.99)),
            ratio(paced[1].lat.p(0.99), paced[0].lat.p(0.99)),
            paced[0].errors + paced[1].errors,
        ));

        if profile && clients == 100 {
            eprintln!("fetch-latency: profiling the agent (untimed)");
            let perf = perf_profile(pid, st.tmp.path(), 4);
            warm_pass(&channels, true, Duration::from_secs(5)).await;
            report = tokio::task::block_in_place(|| perf.join().unwrap());
        }
        drop(channels);
        warm_rows.push(format!(
            "| {clients} | {} / {} | {} / {} | {} | {:.0} / {:.0} | {} / {} | {} |",
            fmt_d(acc[0].lat.p(0.5)),
            fmt_d(acc[0].lat.p(0.99)),
            fmt_d(acc[1].lat.p(0.5)),
            fmt_d(acc[1].lat.p(0.99)),
            ratio(acc[1].lat.p(0.99), acc[0].lat.p(0.99)),
            acc[0].rate(),
            acc[1].rate(),
            fmt_d(acc[0].cpu_per_call()),
            fmt_d(acc[1].cpu_per_call()),
            acc[0].errors + acc[1].errors,
        ));

        eprintln!("fetch-latency: {clients} clients, cold");
        let rounds = (1000 / clients).max(3);
        let mut cold = [Acc::default(), Acc::default()];
        for round in 0..2 * rounds {
            let header = round % 2 == 1;
            let t0 = Instant::now();
            let r = cold_round(&agent.socket, clients, header).await;
            absorb(
                &mut cold[usize::from(header)],
                r,
                t0.elapsed().as_secs_f64(),
                0.0,
            );
        }
        cold[0].report_errors("cold floor");
        cold[1].report_errors("cold FetchX509SVID");
        cold_rows.push(format!(
            "| {clients} | {} | {} / {} | {} / {} | {} | {} |",
            cold[1].lat.len(),
            fmt_d(cold[0].lat.p(0.5)),
            fmt_d(cold[0].lat.p(0.99)),
            fmt_d(cold[1].lat.p(0.5)),
            fmt_d(cold[1].lat.p(0.99)),
            ratio(cold[1].lat.p(0.99), cold[0].lat.p(0.99)),
            cold[0].errors + cold[1].errors,
        ));
    }
    println!("\n### fetch-latency\n");
    println!("Back to back: each client holds one connection and opens FetchX509SVID calls back to back; time from");
    println!(
        "opening the call to its first message. Floor: the same call without the security header"
    );
    println!("(InvalidArgument before attestation). 2 × 2.5 s per variant, interleaved.\n");
    println!("| clients | floor p50 / p99 | FetchX509SVID p50 / p99 | p99 ratio | calls/s floor / fetch | agent CPU per call floor / fetch | errors |");
    println!("|---|---|---|---|---|---|---|");
    for r in &warm_rows {
        println!("{r}");
    }
    println!("\nCold: all clients released at once; each connects, calls, and hangs up; time from connect to");
    println!("the first message (floor: to the refusal).\n");
    println!("| clients at once | samples per variant | floor p50 / p99 | FetchX509SVID p50 / p99 | p99 ratio | errors |");
    println!("|---|---|---|---|---|---|");
    for r in &cold_rows {
        println!("{r}");
    }
    println!("\nPaced: the same connections, each client opening one call per interval (staggered), 1,000");
    println!("calls/s in all; time from opening the call to its first message. 2 × 2.5 s per variant, interleaved.\n");
    println!("| clients | interval per client | calls/s | floor p50 / p99 | FetchX509SVID p50 / p99 | p99 ratio | errors |");
    println!("|---|---|---|---|---|---|---|");
    for r in &paced_rows {
        println!("{r}");
    }
    println!(
        "\nTarget (100 clients): p99 < 1 ms: back to back {} ({}); paced at 1,000 calls/s {} ({})",
        verdict(p99_at_100 < Duration::from_millis(1)),
        fmt_d(p99_at_100),
        verdict(paced_p99_at_100 < Duration::from_millis(1)),
        fmt_d(paced_p99_at_100)
    );
    if profile {
        println!("\nperf profile of the agent during a further 5 s back-to-back run with 100 clients (flat, no children):\n");
        println!("```text\n{report}```");
    }
}

// ---------------------------------------------------------------------------------------------
// interop-latency

/// The Python of the interop tests (tests/tests/e2e/interop.rs).
fn interop_python() -> PathBuf {
    std::env::var_os("MESHID_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/interop-venv/bin/python3"
            ))
        })
}

/// `n` first-SVID latencies through py-spiffe, a new client each (timed inside Python).
fn py_spiffe_samples(python: &Path, socket: &Path, n: usize) -> Vec<u64> {
    let out = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/interop/workload_api.py"
        ))
        .args(["latency", &socket.display().to_string(), &n.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "py-spiffe latency run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let micros: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    micros.into_iter().map(|us| (us * 1000.0) as u64).collect()
}

/// `n` first-SVID latencies through the Rust `spiffe` crate: connect, fetch, parse.
async fn rust_spiffe_samples(endpoint: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let client = spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .unwrap();
        client.fetch_x509_svid().await.unwrap();
        out.push(ns(t0.elapsed()));
    }
    out
}

async fn interop_latency(st: &Stack) {
    const ROUNDS: usize = 5;
    const SAMPLES: usize = 200;
    let python = interop_python();
    let agent = st.agent();
    let endpoint = agent.endpoint();
    // Warm-up: the first calls hash each client's binary.
    rust_spiffe_samples(&endpoint, 20).await;
    tokio::task::block_in_place(|| py_spiffe_samples(&python, &agent.socket, 20));
    let (mut rust, mut py) = (Lat::default(), Lat::default());
    for round in 0..ROUNDS {
        eprintln!("interop-latency: round {}/{ROUNDS}", round + 1);
        rust.add(rust_spiffe_samples(&endpoint, SAMPLES).await);
        py.add(tokio::task::block_in_place(|| {
            py_spiffe_samples(&python, &agent.socket, SAMPLES)
        }));
    }
    println!("\n### interop-latency\n");
    println!(
        "First FetchX509SVID through a new client (connect, call, parse the SVID), one at a time,"
    );
    println!("{ROUNDS} interleaved rounds of {SAMPLES} samples per client.\n");
    println!("| client | samples | p50 | p99 | p50 ratio to Rust | p99 ratio to Rust |");
    println!("|---|---|---|---|---|---|");
    for (name, lat) in [
        ("Rust `spiffe` crate 0.19 (baseline)", &rust),
        (
            "py-spiffe 0.3.2 (gRPC C-core, `:authority` = percent-encoded path)",
            &py,
        ),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            lat.len(),
            fmt_d(lat.p(0.5)),
            fmt_d(lat.p(0.99)),
            ratio(lat.p(0.5), rust.p(0.5)),
            ratio(lat.p(0.99), rust.p(0.99)),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// propagation

#[derive(Default)]
struct Rounds {
    create_rtt: Lat,
    delivered: Lat,
    delete_rtt: Lat,
    withdrawn: Lat,
    timeouts: usize,
}

type Update = (Instant, HashSet<String>);

/// The time of the first update satisfying `pred`, within `timeout`.
async fn wait_update(
    rx: &mut mpsc::UnboundedReceiver<Update>,
    timeout: Duration,
    pred: impl Fn(&HashSet<String>) -> bool,
) -> Option<Instant> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((t, ids))) if pred(&ids) => return Some(t),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn propagation_rounds(
    admin: &Channel,
    rx: &mut mpsc::UnboundedReceiver<Update>,
    st: &Stack,
    tag: &str,
    n: usize,
) -> Rounds {
    let mut entries = EntriesClient::new(admin.clone());
    let mut r = Rounds::default();
    let (mut create, mut delivered, mut delete, mut withdrawn) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        while rx.try_recv().is_ok() {}
        let id = format!("spiffe://{TD}/bench/{tag}/{i}");
        let spec = admin::Entry {
            spiffe_id: id.clone(),
            parent_id: st.agent_id.clone(),
            selectors: vec![format!("unix:uid:{}", st.uid)],
            ..Default::default()
        };
        let t0 = Instant::now();
        let created = entries
            .create_entry(admin::CreateEntryRequest { entry: Some(spec) })
            .await
            .unwrap()
            .into_inner();
        create.push(ns(t0.elapsed()));
        match wait_update(rx, Duration::from_secs(10), |ids| ids.contains(&id)).await {
            Some(t) => delivered.push(ns(t - t0)),
            None => r.timeouts += 1,
        }
        let t3 = Instant::now();
        entries
            .delete_entry(admin::DeleteEntryRequest { id: created.id })
            .await
            .unwrap();
        delete.push(ns(t3.elapsed()));
        match wait_update(rx, Duration::from_secs(10), |ids| !ids.contains(&id)).await {
            Some(t) => withdrawn.push(ns(t - t3)),
            None => r.timeouts += 1,
        }
    }
    r.create_rtt.add(create);
    r.delivered.add(delivered);
    r.delete_rtt.add(delete);
    r.withdrawn.add(withdrawn);
    r
}

/// Opens a FetchX509SVID stream on the agent and forwards the SPIFFE IDs of every update after
/// the first, with its arrival time.
async fn watch(agent: &Agent) -> (mpsc::UnboundedReceiver<Update>, tokio::task::JoinHandle<()>) {
    let mut client = workload(connect_unix(&agent.socket).await, true);
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1, "the bench's own entry only");
    let (tx, rx) = mpsc::unbounded_channel::<Update>();
    let reader = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    let ids = m.svids.into_iter().map(|s| s.spiffe_id).collect();
                    if tx.send((Instant::now(), ids)).is_err() {
                        return;
                    }
                }
                Ok(None) if !tx.is_closed() => return eprintln!("propagation: the stream ended"),
                Err(e) if !tx.is_closed() => {
                    return eprintln!("propagation: the stream failed: {e}")
                }
                Ok(None) | Err(_) => return,
            }
        }
    });
    (rx, reader)
}

async fn propagation(st: &mut Stack) {
    const ROUNDS: usize = 100;
    const BACKGROUND: usize = 10_000;
    // How many background entries are registered while the agent runs (the rest while it is
    // stopped); MESHID_BENCH_LIVE overrides it, up to 10,000.
    let live: usize = std::env::var("MESHID_BENCH_LIVE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BACKGROUND)
        .min(BACKGROUND);
    let admin = connect_unix(&st.ca.socket).await;

    let (mut rx, reader) = watch(st.agent()).await;
    eprintln!("propagation: {ROUNDS} rounds with 1 entry");
    let small = propagation_rounds(&admin, &mut rx, st, "prop-small", ROUNDS).await;

    // Registered while the agent is connected: it signs as the entries arrive.
    eprintln!("propagation: registering {live} background entries, agent connected");
    let t = Instant::now();
    let specs = entry_specs(&st.agent_id, st.uid + 1, "background", 0..live);
    create_entries(&admin, specs, 16).await;
    let live_registered = t.elapsed();
    wait_signed(st.agent(), live + 1, Duration::from_secs(150)).await;
    let live_signed = t.elapsed();
    drop(rx);
    reader.abort();

    // The rest while the agent is stopped: it signs them in batches of 500 when it starts.
    let mut restart_signed = None;
    if live < BACKGROUND {
        eprintln!(
            "propagation: registering {} more, agent stopped",
            BACKGROUND - live
        );
        tokio::task::block_in_place(|| st.stop_agent());
        let specs = entry_specs(&st.agent_id, st.uid + 1, "background", live..BACKGROUND);
        create_entries(&admin, specs, 16).await;
        let t = Instant::now();
        tokio::task::block_in_place(|| st.start_agent());
        wait_signed(st.agent(), BACKGROUND + 1, Duration::from_secs(120)).await;
        restart_signed = Some(t.elapsed());
    }

    eprintln!(
        "propagation: {ROUNDS} rounds with {} entries",
        BACKGROUND + 1
    );
    let (mut rx, reader) = watch(st.agent()).await;
    let large = propagation_rounds(&admin, &mut rx, st, "prop-large", ROUNDS).await;
    drop(rx);
    reader.abort();

    println!("\n### propagation\n");
    println!("{ROUNDS} rounds: CreateEntry (admin API) for the bench's uid, until the bench's open FetchX509SVID");
    println!(
        "stream delivers the new SVID; then DeleteEntry, until the stream no longer carries it."
    );
    println!("Baseline: the CreateEntry round trip itself.\n");
    println!("| entries held by the agent | CreateEntry RTT p50 / p99 (baseline) | create → SVID at the workload p50 / p99 / max | p50 ratio to baseline | delete → withdrawn p50 / p99 | timeouts |");
    println!("|---|---|---|---|---|---|");
    for (held, r) in [(1, &small), (BACKGROUND + 1, &large)] {
        println!(
            "| {held} | {} / {} | {} / {} / {} | {} | {} / {} | {} |",
            fmt_d(r.create_rtt.p(0.5)),
            fmt_d(r.create_rtt.p(0.99)),
            fmt_d(r.delivered.p(0.5)),
            fmt_d(r.delivered.p(0.99)),
            fmt_d(r.delivered.max()),
            ratio(r.delivered.p(0.5), r.create_rtt.p(0.5)),
            fmt_d(r.withdrawn.p(0.5)),
            fmt_d(r.withdrawn.p(0.99)),
            r.timeouts,
        );
    }
    println!(
        "\nBackground entries (16 CreateEntry calls in flight, unmatched selectors): {live} registered while the agent was connected in {} ({:.0}/s), all signed {} after the first CreateEntry.",
        fmt_d(live_registered),
        live as f64 / live_registered.as_secs_f64(),
        fmt_d(live_signed),
    );
    if let Some(took) = restart_signed {
        println!(
            "{} more registered while the agent was stopped; all {} signed {} after it was started again.",
            BACKGROUND - live,
            BACKGROUND + 1,
            fmt_d(took),
        );
    }
    let p99 = large.delivered.p(0.99);
    println!(
        "\nTarget (10,001 entries): p99 < 1 s: {} ({}; timeouts {})",
        verdict(p99 < Duration::from_secs(1) && large.timeouts == 0),
        fmt_d(p99),
        large.timeouts
    );
}

// ---------------------------------------------------------------------------------------------
// rss

/// Opens `conns` × `per_conn` FetchX509SVID streams and reads each one's first message.
async fn open_streams(
    socket: &Path,
    conns: usize,
    per_conn: usize,
) -> (Vec<Channel>, Vec<Streaming<X509svidResponse>>, Duration) {
    let t = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let socket = socket.to_owned();
            tokio::spawn(async move {
                let ch = connect_unix(&socket).await;
                let opens = (0..per_conn).map(|_| {
                    let mut c = workload(ch.clone(), true);
                    async move {
                        let mut s = c.fetch_x509svid(X509svidRequest {}).await?.into_inner();
                        s.message()
                            .await?
                            .ok_or_else(|| Status::internal("stream ended"))?;
                        Ok::<_, Status>(s)
                    }
                });
                let streams = futures::future::join_all(opens).await;
                (ch, streams)
            })
        })
        .collect();
    let (mut channels, mut streams, mut errors) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (ch, results) = task.await.unwrap();
        channels.push(ch);
        for r in results {
            match r {
                Ok(s) => streams.push(s),
                Err(e) => {
                    if errors == 0 {
                        eprintln!("rss: a stream failed to open: {e}");
                    }
                    errors += 1;
                }
            }
        }
    }
    assert_eq!(errors, 0, "{errors} streams failed to open");
    (channels, streams, t.elapsed())
}

/// VmRSS after letting the process settle.
async fn settled_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(pid)
}

async fn rss(st: &Stack) {
    const STREAMS: (usize, usize) = (100, 100);
    let admin = connect_unix(&st.ca.socket).await;
    let mut rows = Vec::new();

    wait_signed(st.agent(), 1, Duration::from_secs(30)).await;
    let idle = settled_rss(st.agent().proc.id()).await;
    rows.push(("idle, 1 entry (baseline)".to_owned(), idle, idle));

    for (range, what) in [(0..999, "1,000"), (999..9999, "10,000")] {
        eprintln!("rss: {what} entries");
        let specs = entry_specs(&st.agent_id, st.uid + 1, "background", range.clone());
        create_entries(&admin, specs, 16).await;
        wait_signed(st.agent(), range.end + 1, Duration::from_secs(120)).await;
        rows.push((
            format!("{what} entries signed"),
            settled_rss(st.agent().proc.id()).await,
            idle,
        ));
    }

    eprintln!("rss: 10,000 streams");
    let agent = st.agent();
    let pid = agent.proc.id();
    let (channels, streams, took) = open_streams(&agent.socket, STREAMS.0, STREAMS.1).await;
    let n = streams.len();
    rows.push((
        format!("10,000 entries + {n} open FetchX509SVID streams"),
        settled_rss(pid).await,
        idle,
    ));
    drop(streams);
    drop(channels);

    eprintln!("rss: second agent, 10,000 streams");
    let dir_b = st.tmp.path().join("second");
    let (agent_b, _, _) =
        tokio::task::block_in_place(|| start_agent(&dir_b, &st.ca, "second", st.uid));
    let pid_b = agent_b.proc.id();
    wait_signed(&agent_b, 1, Duration::from_secs(30)).await;
    let idle_b = settled_rss(pid_b).await;
    rows.push((
        "second agent: idle, 1 entry (baseline)".into(),
        idle_b,
        idle_b,
    ));
    let (channels, streams, took_b) = open_streams(&agent_b.socket, STREAMS.0, STREAMS.1).await;
    let n_b = streams.len();
    let streams_b = settled_rss(pid_b).await;
    rows.push((
        format!("second agent: 1 entry + {n_b} open streams"),
        streams_b,
        idle_b,
    ));
    drop(streams);
    drop(channels);

    println!("\n### rss\n");
    println!("Agent VmRSS (/proc/<pid>/status) 2 s after each step. Streams: {} connections × {} FetchX509SVID", STREAMS.0, STREAMS.1);
    println!("streams, each having delivered its first message, held open while measuring.\n");
    println!("| agent state | VmRSS | ratio to its idle baseline |");
    println!("|---|---|---|");
    for (what, kib, base) in &rows {
        println!(
            "| {what} | {} | {:.2} |",
            mib(*kib),
            *kib as f64 / *base as f64
        );
    }
    let per_stream = (streams_b.saturating_sub(idle_b)) as f64 * 1024.0 / n_b.max(1) as f64;
    println!(
        "\nOpening the streams took {} (10,000 entries) and {} (1 entry); about {per_stream:.0} bytes of agent RSS per open stream.",
        fmt_d(took),
        fmt_d(took_b)
    );
    let worst = rows[3].1.max(streams_b);
    println!(
        "\nTarget: 10,000 streams in under 100 MB: {} (largest: {}, i.e. {:.1} MB)",
        verdict((worst * 1024) < 100_000_000),
        mib(worst),
        worst as f64 * 1024.0 / 1e6
    );
}

// ---------------------------------------------------------------------------------------------
// node-sign

/// A fresh P-256 key and a CSR over it, as an agent makes them.
fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    (key, csr)
}

/// The in-process signing path on `threads` threads for `budget`: certificates per second.
fn in_process_rate(csrs: &[Vec<u8>], threads: usize, budget: Duration) -> f64 {
    use meshid_ca::svid::{
        generate_intermediate, generate_root, parse_csr, sign_x509_svid, CaKey, Issuer, KeyType,
    };
    const HOUR: Duration = Duration::from_secs(3600);
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let now = SystemTime::now();
                    let td = spiffe::TrustDomain::new(TD).unwrap();
                    let root_key = CaKey::generate(KeyType::EcP256).unwrap();
                    let root_cert = generate_root(&td, &root_key, 24 * HOUR, now).unwrap();
                    let root = Issuer::new(root_cert, root_key, Vec::new()).unwrap();
                    let key = CaKey::generate(KeyType::EcP256).unwrap();
                    let cert = generate_intermediate(&root, &td, &key, 24 * HOUR, now).unwrap();
                    let issuer = Issuer::new(cert, key, root.chain_for_child()).unwrap();
                    let id =
                        spiffe::SpiffeId::new(format!("spiffe://{TD}/bench/node/{t}")).unwrap();
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed() < budget {
                        for csr_der in csrs.iter().skip((n as usize) % csrs.len()).take(50) {
                            let csr = parse_csr(csr_der).unwrap();
                            let svid =
                                sign_x509_svid(&issuer, &csr, &id, &[], HOUR, SystemTime::now())
                                    .unwrap();
                            std::hint::black_box(svid);
                            n += 1;
                        }
                    }
                    n as f64 / start.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap() as u64).sum()
    });
    total as f64
}

/// A node API client over mTLS with the agent's identity.
struct NodeAgent {
    address: String,
    config: Arc<rustls::ClientConfig>,
}

impl NodeAgent {
    async fn client(&self) -> NodeClient<Channel> {
        let ch = tls::connect(&self.address, Arc::clone(&self.config))
            .await
            .unwrap();
        NodeClient::new(ch)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

/// Attests as an agent with a join token (the bench is the agent) and returns its mTLS client
/// configuration and SPIFFE ID.
async fn attest(ca: &Ca, admin: &Channel) -> (NodeAgent, String) {
    let tok = TokensClient::new(admin.clone())
        .generate_token(admin::GenerateTokenRequest { ttl: 0 })
        .await
        .unwrap()
        .into_inner();
    let bundle = AuthorityClient::new(admin.clone())
        .get_bundle(admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bundle.pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = ExpectedId::Exact(
        spiffe::SpiffeId::new(format!("spiffe://{TD}/meshid/server")).expect("server id"),
    );
    let anonymous = Arc::new(tls::client_config(roots.clone(), expected.clone(), None).unwrap());
    let mut node = NodeClient::new(tls::connect(&ca.node_address, anonymous).await.unwrap());
    let (key, csr) = key_and_csr();
    let svid = node
        .attest_join_token(node::AttestJoinTokenRequest {
            token: tok.token,
            csr,
        })
        .await
        .unwrap()
        .into_inner();
    let chain = svid.chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = Arc::new(tls::client_config(roots, expected, Some((chain, key))).unwrap());
    (
        NodeAgent {
            address: ca.node_address.clone(),
            config,
        },
        svid.spiffe_id,
    )
}

struct SignRun {
    certs: u64,
    errors: u64,
    first_error: Option<String>,
    wall: f64,
    ca_cpu: f64,
    sign_secs: f64,
    call_lat: Lat,
}

fn ca_sign_seconds(ca: &Ca) -> f64 {
    scrape(&ca.ops_address)
        .iter()
        .filter(|(k, _)| {
            k.starts_with("meshid_ca_sign_duration_seconds_sum") && k.contains("kind=\"x509\"")
        })
        .map(|(_, v)| *v)
        .sum()
}

/// `callers` concurrent callers, each on its own connection, sending the batches back to back
/// for `budget`.
async fn node_sign_run(
    ca: &Ca,
    agent: &NodeAgent,
    batches: &Arc<Vec<node::BatchSignX509Request>>,
    callers: usize,
    budget: Duration,
) -> SignRun {
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(agent.client().await);
    }
    let pid = ca.proc.id();
    let sign0 = tokio::task::block_in_place(|| ca_sign_seconds(ca));
    let (cpu0, t0) = (cpu_secs(pid), Instant::now());
    let deadline = t0 + budget;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            let batches = Arc::clone(batches);
            tokio::spawn(async move {
                let (mut certs, mut errors, mut first, mut lat) = (0u64, 0u64, None, Vec::new());
                let mut i = c;
                while Instant::now() < deadline {
                    let req = batches[i % batches.len()].clone();
                    i += 1;
                    let t = Instant::now();
                    let resp = client.batch_sign_x509(req).await.unwrap().into_inner();
                    lat.push(ns(t.elapsed()));
                    for r in resp.results {
                        if r.error.is_empty() && !r.chain.is_empty() {
                            certs += 1;
                        } else {
                            errors += 1;
                            first.get_or_insert(r.error);
                        }
                    }
                }
                (certs, errors, first, lat)
            })
        })
        .collect();
    let mut run = SignRun {
        certs: 0,
        errors: 0,
        first_error: None,
        wall: 0.0,
        ca_cpu: 0.0,
        sign_secs: 0.0,
        call_lat: Lat::default(),
    };
    for t in tasks {
        let (c, e, f, l) = t.await.unwrap();
        run.certs += c;
        run.errors += e;
        if run.first_error.is_none() {
            run.first_error = f;
        }
        run.call_lat.add(l);
    }
    run.wall = t0.elapsed().as_secs_f64();
    run.ca_cpu = cpu_secs(pid) - cpu0;
    run.sign_secs = tokio::task::block_in_place(|| ca_sign_seconds(ca)) - sign0;
    if run.errors > 0 {
        eprintln!(
            "node-sign: {} refusals, first: {}",
            run.errors,
            run.first_error.as_deref().unwrap_or("?")
        );
    }
    run
}

/// `perf record` on `pid` for `secs`, then the top of the flat profile by thread name, by DSO
/// and by symbol.
fn perf_profile(pid: u32, dir: &Path, secs: u64) -> std::thread::JoinHandle<String> {
    let data: PathBuf = dir.join("perf.data");
    std::thread::spawn(move || {
        let rec = std::process::Command::new("perf")
            .args(["record", "-F", "2000", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .args(["--", "sleep", &secs.to_string()])
            .output();
        match rec {
            Ok(o) if o.status.success() => {}
            Ok(o) => return format!("perf record failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => return format!("perf not available: {e}"),
        }
        let mut out = String::new();
        for sort in ["comm", "dso", "sym"] {
            let rep = std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    "1.5",
                    "--sort",
                    sort,
                    "-i",
                ])
                .arg(&data)
                .output();
            if let Ok(o) = rep {
                let text = String::from_utf8_lossy(&o.stdout);
                for line in text
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                {
                    out.push_str(line);
                    out.push('\n');
                }
                out.push('\n');
            }
        }
        out
    })
}

async fn node_sign(st: &Stack, profile: bool) {
    const ENTRIES: usize = 500;
    const POOL: usize = 2000;
    const BUDGET: Duration = Duration::from_secs(10);
    const IN_PROCESS: Duration = Duration::from_secs(3);
    let admin = connect_unix(&st.ca.socket).await;
    let (agent, agent_id) = attest(&st.ca, &admin).await;
    eprintln!("node-sign: attested as {agent_id}; creating {ENTRIES} entries");
    let entries = create_entries(
        &admin,
        entry_specs(&agent_id, st.uid + 1, "node", 0..ENTRIES),
        16,
    )
    .await;
    eprintln!("node-sign: generating {POOL} CSRs");
    let csrs: Vec<Vec<u8>> = (0..POOL).map(|_| key_and_csr().1).collect();
    let batches: Arc<Vec<node::BatchSignX509Request>> = Arc::new(
        csrs.chunks(500)
            .map(|chunk| node::BatchSignX509Request {
                requests: chunk
                    .iter()
                    .enumerate()
                    .map(|(j, csr)| node::SignRequest {
                        entry_id: entries[j % entries.len()].id.clone(),
                        csr: csr.clone(),
                    })
                    .collect(),
            })
            .collect(),
    );

    eprintln!("node-sign: in-process baseline");
    let before = tokio::task::block_in_place(|| {
        (
            in_process_rate(&csrs, 1, IN_PROCESS),
            in_process_rate(&csrs, 2, IN_PROCESS),
        )
    });
    // Warm-up: connections, the CA's caches and SQLite pages.
    node_sign_run(&st.ca, &agent, &batches, 1, Duration::from_secs(1)).await;
    eprintln!("node-sign: 1 caller");
    let one = node_sign_run(&st.ca, &agent, &batches, 1, BUDGET).await;
    eprintln!("node-sign: 2 callers");
    let two = node_sign_run(&st.ca, &agent, &batches, 2, BUDGET).await;
    eprintln!("node-sign: in-process baseline again");
    let after = tokio::task::block_in_place(|| {
        (
            in_process_rate(&csrs, 1, IN_PROCESS),
            in_process_rate(&csrs, 2, IN_PROCESS),
        )
    });
    let base1 = (before.0 + after.0) / 2.0;
    let base2 = (before.1 + after.1) / 2.0;

    println!("\n### node-sign\n");
    println!("BatchSignX509 with 500 CSRs per call (pre-generated, {POOL} in rotation) for {ENTRIES} entries of the");
    println!("bench's agent, {} s per row; in-process: `parse_csr` + `sign_x509_svid` on the same CSRs in the bench", BUDGET.as_secs());
    println!(
        "process, {} s per row, before and after the node API rows (mean shown).\n",
        IN_PROCESS.as_secs()
    );
    println!("| path | certs/s (wall) | CA CPU per cert | certs per CA CPU-second | vs in-process, per core | vs in-process, wall |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| in-process, 1 thread (baseline) | {base1:.0} (before {:.0}, after {:.0}) | - | {base1:.0} | 1.00 | 1.00 |",
        before.0, after.0
    );
    println!(
        "| in-process, 2 threads | {base2:.0} (before {:.0}, after {:.0}) | - | - | - | {:.2} vs 1 thread |",
        before.1,
        after.1,
        base2 / base1
    );
    for (label, run, wall_base) in [
        ("node API, 1 connection", &one, base1),
        ("node API, 2 concurrent callers", &two, base2),
    ] {
        let rate = run.certs as f64 / run.wall;
        let per_cpu = run.certs as f64 / run.ca_cpu.max(1e-9);
        println!(
            "| {label} | {rate:.0} | {} | {per_cpu:.0} | **{:.2}** | {:.2} |",
            fmt_d(Duration::from_secs_f64(
                run.ca_cpu / run.certs.max(1) as f64
            )),
            per_cpu / base1,
            rate / wall_base,
        );
    }
    println!();
    for (label, run) in [("1 connection", &one), ("2 callers", &two)] {
        println!(
            "- {label}: {} certs in {:.1} s, {} refused; BatchSignX509 call p50 {} / p99 {}; CA CPU {:.2} s, of which {:.2} s ({:.0} %) inside the CA's signing function (`meshid_ca_sign_duration_seconds`).",
            run.certs,
            run.wall,
            run.errors,
            fmt_d(run.call_lat.p(0.5)),
            fmt_d(run.call_lat.p(0.99)),
            run.ca_cpu,
            run.sign_secs,
            100.0 * run.sign_secs / run.ca_cpu.max(1e-9),
        );
    }
    let per_core = one.certs as f64 / one.ca_cpu.max(1e-9) / base1;
    println!(
        "\nTarget: node API ≥ 70 % of the in-process path per core: {} ({:.0} %)",
        verdict(per_core >= 0.7),
        100.0 * per_core
    );

    if profile {
        eprintln!("node-sign: profiling the CA (untimed)");
        let perf = perf_profile(st.ca.proc.id(), st.tmp.path(), 5);
        node_sign_run(&st.ca, &agent, &batches, 1, Duration::from_secs(6)).await;
        let report = tokio::task::block_in_place(|| perf.join().unwrap());
        println!("\nperf profile of the CA during a further 1-caller run (flat, no children):\n");
        println!("```text\n{}```", report);
    }
}

// ---------------------------------------------------------------------------------------------
// main

/// Raises the open-files limit by re-executing under `ulimit -n` when it is low: to 65,536
/// where allowed (as root; `storm` holds over 20,000 sockets and its children inherit the
/// limit), else to the hard limit (1000 clients and 10,000 streams need a few thousand).
fn ensure_fd_limit() {
    const WANT: u64 = 65_536;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
        return;
    };
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let (soft, hard) = (nums[0].parse::<u64>().unwrap_or(0), nums[1]);
    if soft >= WANT || std::env::var_os("MESHID_BENCH_REEXEC").is_some() {
        if soft < 8192 {
            eprintln!("warning: open files limited to {soft}; 1000 clients may fail");
        }
        return;
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {WANT} 2>/dev/null || ulimit -n \"$0\"; exec \"$@\""
        ))
        .arg(hard)
        .arg(std::env::current_exe().unwrap())
        .args(std::env::args_os().skip(1))
        .env("MESHID_BENCH_REEXEC", "1")
        .exec();
    eprintln!("warning: cannot raise the open files limit: {err}");
}

/// The active intermediate of the CA and, for a tainted key, its progress from `ca status`.
async fn taint_status(admin: &Channel, key: &str) -> (String, Option<admin::TaintProgress>) {
    let s = AuthorityClient::new(admin.clone())
        .status(admin::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let active = s
        .keys
        .iter()
        .find(|k| k.kind == "x509_intermediate" && k.state == "active")
        .map(|k| k.id.clone())
        .unwrap_or_default();
    (active, s.taints.into_iter().find(|t| t.key_id == key))
}

async fn taint(st: &mut Stack) {
    let total: usize = std::env::var("MESHID_BENCH_TAINT_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let admin = connect_unix(&st.ca.socket).await;
    let dir2 = st.tmp.path().join("agent2");
    let (mut agent2, agent2_id, token2) =
        tokio::task::block_in_place(|| start_agent(&dir2, &st.ca, "workload2", st.uid));
    // Short enough that the scheduled replacement can be measured in the same run, long enough
    // that none is due while the taint is measured (rotation at 50 % ± 10 % of the lifetime).
    let ttl: u64 = std::env::var("MESHID_BENCH_TAINT_TTL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let half = total / 2;
    eprintln!("taint: registering {total} entries on 2 agents ({ttl} s SVIDs)");
    let mut specs = entry_specs(&st.agent_id, st.uid + 1, "a1", 0..half);
    specs.extend(entry_specs(&agent2_id, st.uid + 1, "a2", half..total));
    for s in &mut specs {
        s.x509_svid_ttl = ttl;
    }
    create_entries(&admin, specs, 16).await;
    let per = [half + 1, total - half + 1];
    wait_signed(st.agent(), per[0], Duration::from_secs(600)).await;
    wait_signed(&agent2, per[1], Duration::from_secs(600)).await;

    // Baseline: both agents restarted at once issue every SVID anew.
    eprintln!("taint: baseline, both agents restarted");
    st.stop_agent();
    agent2.proc.stop();
    let restarted = Instant::now();
    st.agent = Some(tokio::task::block_in_place(|| {
        Agent::start(st.tmp.path(), &st.ca, &st.token)
    }));
    agent2 = tokio::task::block_in_place(|| Agent::start(&dir2, &st.ca, &token2));
    let (a, b) = tokio::join!(
        wait_signed(st.agent(), per[0], Duration::from_secs(600)),
        wait_signed(&agent2, per[1], Duration::from_secs(600))
    );
    let baseline = restarted.elapsed();
    eprintln!("taint: baseline {baseline:?} ({a:?} / {b:?} after start)");

    let (tainted, _) = taint_status(&admin, "").await;
    let rotations = |agent: &Agent| {
        sample(&scrape(&agent.ops_address), "meshid_agent_rotations_total").unwrap_or(0.0)
    };
    let before = tokio::task::block_in_place(|| rotations(st.agent()) + rotations(&agent2));
    let holders = (per[0] + per[1]) as f64;
    eprintln!("taint: tainting {tainted}");
    let asked = Instant::now();
    AuthorityClient::new(admin.clone())
        .taint_key(admin::TaintKeyRequest {
            key_id: tainted.clone(),
            reason: "bench".into(),
        })
        .await
        .unwrap();
    let command = asked.elapsed();
    // Re-issued SVIDs as the agents count them (each agent's rotation counter), every 20 ms.
    let mut half_at = None;
    let mut polls = 0;
    let clean_at = loop {
        let done =
            tokio::task::block_in_place(|| rotations(st.agent()) + rotations(&agent2)) - before;
        polls += 1;
        let at = asked.elapsed();
        if half_at.is_none() && done * 2.0 >= holders {
            half_at = Some(at);
        }
        if done >= holders {
            break at;
        }
        assert!(
            at < Duration::from_secs(300),
            "{done} of {holders} re-issued after 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The CA's own account, from its issuance records.
    let p = loop {
        let (_, p) = taint_status(&admin, &tainted).await;
        let p = p.expect("the taint is in ca status");
        if p.remaining == 0 {
            break p;
        }
        assert!(asked.elapsed() < Duration::from_secs(300), "{p:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "taint: agents re-issued all after {clean_at:?}; the CA counts {} replaced, clean {} s after the taint",
        p.replaced, p.cleared_after_s
    );
    let half_at = half_at.unwrap_or(clean_at);
    let ca_clean = p.cleared_after_s;

    // The scheduled replacement, measured: how long until each entry's SVID (all just issued)
    // is replaced again on schedule, with nothing forcing it, timed from the same taint command
    // (the agents' own SVIDs live longer and are not counted).
    eprintln!("taint: waiting for the scheduled replacement of every SVID");
    let start = tokio::task::block_in_place(|| rotations(st.agent()) + rotations(&agent2));
    let since = Instant::now();
    let mut sched_half = None;
    let sched_all = loop {
        let done =
            tokio::task::block_in_place(|| rotations(st.agent()) + rotations(&agent2)) - start;
        let at = asked.elapsed();
        if sched_half.is_none() && done * 2.0 >= total as f64 {
            sched_half = Some(at);
        }
        if done >= total as f64 {
            break at;
        }
        assert!(
            since.elapsed() < Duration::from_secs(ttl * 2),
            "{done} of {total} replaced on schedule after {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sched_half = sched_half.unwrap_or(sched_all);
    println!("\n### Taint: {total} entries on 2 agents (`taint`)\n");
    println!("| | time | ratio to the baseline |");
    println!("|---|---|---|");
    println!(
        "| baseline: both agents restarted, all {total} SVIDs issued anew | {} | 1.00 |",
        fmt_ms(baseline)
    );
    println!(
        "| `ca taint` → half the SVIDs re-issued at the agents (p50 over entries) | {} | {:.2} |",
        fmt_ms(half_at),
        half_at.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "| `ca taint` → all re-issued at the agents (max over entries) | {} | {:.2} |",
        fmt_ms(clean_at),
        clean_at.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "| scheduled replacement, measured ({ttl} s SVIDs): half replaced | {} | {:.0} |",
        fmt_ms(sched_half),
        sched_half.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "| scheduled replacement, measured ({ttl} s SVIDs): all replaced | {} | {:.0} |",
        fmt_ms(sched_all),
        sched_all.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "\nTaint / scheduled (all replaced): {:.4}. The scheduled replacement scales with the lifetime (each SVID at 50 % ± 10 % of it): with 1 h SVIDs, about {:.0} min.",
        clean_at.as_secs_f64() / sched_all.as_secs_f64(),
        sched_all.as_secs_f64() * 3600.0 / ttl as f64 / 60.0
    );
    println!(
        "\nRe-issues counted at the agents (their rotation counters, polled every 20 ms: {polls} polls); the CA's issuance records agree: {} holders replaced (the entries, both agents, the CA's server SVID), the last {ca_clean} s after the taint (whole seconds). The taint command itself took {}. Target: under 10 s at 10,000 entries: {}.",
        p.replaced,
        fmt_ms(command),
        if clean_at < Duration::from_secs(10) { "met" } else { "NOT met" }
    );
    drop(agent2);
}

/// A TCP echo server on a free loopback port (the application behind api's proxy).
fn echo_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                use std::io::{Read, Write};
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A connection through web's proxy to the echo server behind api's proxy that has carried one
/// round trip; `None` while the mesh refuses it (api's proxy has no valid SVID yet).
fn echo_connection(web_out: &str) -> Option<std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(web_out).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"ping").ok()?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).ok()?;
    (&buf == b"ping").then_some(s)
}

/// Revocation that closes live connections: a TCP connection through two proxies, whose
/// upstream proxy's SVID is then revoked (`RevokeSvid` by SPIFFE ID), is closed by the
/// downstream proxy; the time from the call to the client seeing the close, over
/// `MESHID_BENCH_REVOCATIONS` (default 100) revocations, each on a fresh SVID. Baseline from the
/// same run: the admin call alone (the CA recording the revocation and signing the CRL).
async fn revocation(st: &mut Stack) {
    let n: usize = std::env::var("MESHID_BENCH_REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = st.tmp.path().to_owned();
    let (agent2, _, _) =
        tokio::task::block_in_place(|| start_agent(&dir.join("agent2"), &st.ca, "api", st.uid));
    let echo = echo_server();
    let api_in = format!("127.0.0.1:{}", meshid_tests::free_port());
    let web_out = format!("127.0.0.1:{}", meshid_tests::free_port());
    let head = |agent: &Agent, id: &str| {
        format!(
            "workload_api_socket = \"{}\"\nspiffe_id = \"spiffe://{TD}/bench/{id}\"\n",
            agent.endpoint()
        )
    };
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!("name: bench\ndefault: deny\nrules:\n  - name: web-to-api\n    from: [\"spiffe://{TD}/bench/workload\"]\n    to: [\"spiffe://{TD}/bench/api\"]\n"),
    )
    .unwrap();
    let mut api = meshid_tests::Proxy::start(
        &dir,
        "api",
        &format!(
            "{}policy_file = \"{}\"\n[[inbound]]\nname = \"api-in\"\nlisten = \"{api_in}\"\nforward_to = \"{echo}\"\nport = 9000\nprotocol = \"tcp\"\n",
            head(&agent2, "api"),
            policy.display()
        ),
    );
    let mut web = meshid_tests::Proxy::start(
        &dir,
        "web",
        &format!(
            "{}[[outbound]]\nname = \"to-api\"\nlisten = \"{web_out}\"\nupstream = \"{api_in}\"\nexpect = \"spiffe://{TD}/bench/api\"\n",
            head(st.agent(), "workload")
        ),
    );
    tokio::task::block_in_place(|| {
        api.wait_ready(Duration::from_secs(60));
        web.wait_ready(Duration::from_secs(60));
    });
    let admin = connect_unix(&st.ca.socket).await;
    let mut closed = Vec::with_capacity(n);
    let mut calls = Vec::with_capacity(n);
    let mut recovered = Vec::with_capacity(n);
    eprintln!("revocation: {n} revocations");
    for i in 0..n {
        // A live connection (waiting for api's proxy to hold a valid SVID again).
        let waited = Instant::now();
        let conn = loop {
            if let Some(c) = tokio::task::block_in_place(|| echo_connection(&web_out)) {
                break c;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "the mesh did not recover"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if i > 0 {
            recovered.push(waited.elapsed());
        }
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut conn = conn;
            let mut buf = [0u8; 1];
            let r = conn.read(&mut buf);
            let _ = tx.send((Instant::now(), r.map(|n| n == 0).unwrap_or(true)));
        });
        let t0 = Instant::now();
        AuthorityClient::new(admin.clone())
            .revoke_svid(admin::RevokeSvidRequest {
                spiffe_id: format!("spiffe://{TD}/bench/api"),
                reason: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        calls.push(t0.elapsed());
        let (at, eof) = rx.await.unwrap();
        assert!(eof, "the connection was not closed");
        closed.push(at.duration_since(t0));
    }
    let closed_n = web.metric("meshid_proxy_revoked_connections_closed_total", &[]);
    // What the CA measured: each revocation in effect once both agents had handed the CRLs to
    // every X.509 stream (svid.revoked.effective, after_ms).
    let mut effects: Vec<Duration> = Vec::new();
    let waited = Instant::now();
    while effects.len() < n && waited.elapsed() < Duration::from_secs(30) {
        effects.clear();
        let mut after = 0;
        loop {
            let page = meshid_api::admin::audit_client::AuditClient::new(admin.clone())
                .list(admin::ListAuditRequest {
                    after_seq: after,
                    limit: 1000,
                    kind_prefix: "svid.revoked.effective".into(),
                })
                .await
                .unwrap()
                .into_inner();
            for r in &page.records {
                let d: serde_json::Value = serde_json::from_str(&r.details).unwrap();
                assert_eq!(d["effective"], true, "{}", r.details);
                effects.push(Duration::from_millis(d["after_ms"].as_u64().unwrap()));
            }
            if page.next_after_seq == after {
                break;
            }
            after = page.next_after_seq;
        }
        if effects.len() < n {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        effects.len(),
        n,
        "the CA did not record every revocation's effect"
    );
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    };
    let (c50, c99, cmax) = (
        pct(&mut closed, 0.5),
        pct(&mut closed, 0.99),
        pct(&mut closed, 1.0),
    );
    let (r50, r99) = (pct(&mut calls, 0.5), pct(&mut calls, 0.99));
    let rec50 = if recovered.is_empty() {
        Duration::ZERO
    } else {
        pct(&mut recovered, 0.5)
    };
    println!("\n## Revocation: live connections closed ({n} revocations)\n");
    println!("| measure | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| connection closed after `RevokeSvid` | {:.1} ms | {:.1} ms | {:.1} ms |",
        c50.as_secs_f64() * 1e3,
        c99.as_secs_f64() * 1e3,
        cmax.as_secs_f64() * 1e3
    );
    println!(
        "| baseline: the `RevokeSvid` call alone | {:.1} ms | {:.1} ms | |",
        r50.as_secs_f64() * 1e3,
        r99.as_secs_f64() * 1e3
    );
    let (e50, e99, emax) = (
        pct(&mut effects, 0.5),
        pct(&mut effects, 0.99),
        pct(&mut effects, 1.0),
    );
    println!(
        "| in effect as the CA measured it (every stream had the CRLs) | {:.0} ms | {:.0} ms | {:.0} ms |",
        e50.as_secs_f64() * 1e3,
        e99.as_secs_f64() * 1e3,
        emax.as_secs_f64() * 1e3
    );
    println!(
        "| a new connection works again (api re-issued, proxy rotated) | {:.1} ms | | |",
        rec50.as_secs_f64() * 1e3
    );
    println!(
        "\np99 closed / p99 call: {:.2}; target p99 under 1 s: {}; connections the proxy closed as revoked: {closed_n}",
        c99.as_secs_f64() / r99.as_secs_f64().max(1e-9),
        if c99 < Duration::from_secs(1) { "met" } else { "MISSED" }
    );
    drop(web);
    drop(api);
    drop(agent2);
}

/// The instant of an RFC 3339 UTC timestamp as the proxies log it
/// (`2026-12-05T14:20:00.123456Z`).
fn log_instant(ts: &str) -> Option<SystemTime> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|v| v.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Reads what each log gained since the last call and records, per marker found on a line
/// (`marker(line)`), the first instant each log logged it.
struct LogTail {
    paths: Vec<PathBuf>,
    offsets: Vec<u64>,
    /// Per log: marker → instant.
    seen: Vec<std::collections::HashMap<String, SystemTime>>,
}

impl LogTail {
    fn new(paths: Vec<PathBuf>) -> Self {
        let offsets = paths
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .collect();
        let seen = vec![std::collections::HashMap::new(); paths.len()];
        Self {
            paths,
            offsets,
            seen,
        }
    }

    fn poll(&mut self, marker: impl Fn(&str) -> Option<String>) {
        use std::io::{Read, Seek};
        for (i, path) in self.paths.iter().enumerate() {
            let Ok(mut f) = std::fs::File::open(path) else {
                continue;
            };
            if f.seek(std::io::SeekFrom::Start(self.offsets[i])).is_err() {
                continue;
            }
            let mut text = String::new();
            if f.read_to_string(&mut text).is_err() {
                continue;
            }
            // Only whole lines; a partial one is read again next time.
            let whole = text.rfind('\n').map_or(0, |n| n + 1);
            self.offsets[i] += whole as u64;
            for line in text[..whole].lines() {
                let Some(key) = marker(line) else { continue };
                let Some(at) = line.split_whitespace().next().and_then(log_instant) else {
                    continue;
                };
                self.seen[i].entry(key).or_insert(at);
            }
        }
    }

    /// The instants every log logged `key`, once all have (`None` while some have not).
    fn all(&self, key: &str) -> Option<Vec<SystemTime>> {
        self.seen.iter().map(|s| s.get(key).copied()).collect()
    }
}

/// Waits (polling the logs every 50 ms, at most `limit`) until every log has `key`; the delays
/// from `t0`, or the number of logs still without it.
async fn delays_until(
    tail: &mut LogTail,
    key: &str,
    t0: SystemTime,
    limit: Duration,
    marker: &(impl Fn(&str) -> Option<String> + Sync),
) -> Result<Vec<Duration>, usize> {
    let started = Instant::now();
    loop {
        tail.poll(marker);
        if let Some(at) = tail.all(key) {
            return Ok(at
                .iter()
                .map(|a| a.duration_since(t0).unwrap_or(Duration::ZERO))
                .collect());
        }
        if started.elapsed() > limit {
            return Err(tail.seen.iter().filter(|s| !s.contains_key(key)).count());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 200 to 400 ms, different each time: the pause before each policy change, so that the
/// changes do not fall in step with the proxies' 200 ms look at their policy file.
fn jitter() -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    Duration::from_millis(200) + Duration::from_nanos(u64::from(nanos % 200_000_000))
}

/// The central policy from `policy apply` to every proxy (see the module documentation).
async fn policy_delivery(st: &mut Stack) {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (n_proxies, applies) = (
        env("MESHID_BENCH_PROXIES", 100),
        env("MESHID_BENCH_APPLIES", 50),
    );
    let dir = st.tmp.path().to_owned();
    let admin = connect_unix(&st.ca.socket).await;
    // Three more agents.
    let mut extra = Vec::new();
    let mut agents = vec![(st.agent().endpoint(), st.agent_id.clone())];
    for k in 2..=4 {
        let (agent, id, _) = tokio::task::block_in_place(|| {
            start_agent(
                &dir.join(format!("agent{k}")),
                &st.ca,
                &format!("a{k}"),
                st.uid,
            )
        });
        agents.push((agent.endpoint(), id));
        extra.push(agent);
    }
    let ids: Vec<String> = (0..n_proxies)
        .map(|i| format!("spiffe://{TD}/bench/p{i}"))
        .collect();
    let specs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| admin::Entry {
            spiffe_id: id.clone(),
            parent_id: agents[i % agents.len()].1.clone(),
            selectors: vec![format!("unix:uid:{}", st.uid)],
            ..Default::default()
        })
        .collect();
    create_entries(&admin, specs, 8).await;
    // 100 rules, one per proxy, and one about every proxy that each apply changes.
    let document = |k: usize, name: &str| {
        let mut text = format!(
            "name: {name}\ndefault: deny\nrules:\n  - name: changing-{k}\n    from: [\"spiffe://{TD}/bench/workload\"]\n    to: [\"spiffe://{TD}/bench/*\"]\n    ports: [{}]\n",
            9000 + k % 2
        );
        for (i, id) in ids.iter().enumerate() {
            text.push_str(&format!(
                "  - name: to-p{i}\n    from: [\"spiffe://{TD}/bench/a{}\"]\n    to: [\"{id}\"]\n",
                2 + i % 3
            ));
        }
        text
    };
    let apply = |k: usize| {
        let admin = admin.clone();
        let text = document(k, "bench");
        async move {
            meshid_api::admin::policy_client::PolicyClient::new(admin)
                .apply(admin::ApplyPolicyRequest {
                    name: "bench".into(),
                    text,
                    reason: format!("bench {k}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = apply(0).await;
    let base_revision = first.revision;
    let echo = echo_server();
    let start_proxies = |source: &str, tag: &str| {
        (0..n_proxies)
            .map(|i| {
                // Each ready before the next takes free ports: a port is free only until bound.
                let mut proxy = meshid_tests::Proxy::start(
                    &dir,
                    &format!("{tag}{i}"),
                    &format!(
                        "workload_api_socket = \"{}\"\nspiffe_id = \"{}\"\n{source}\n[[inbound]]\nname = \"in\"\nlisten = \"127.0.0.1:{}\"\nforward_to = \"{echo}\"\nport = 9000\nprotocol = \"tcp\"\n[[inbound]]\nname = \"in2\"\nlisten = \"127.0.0.1:{}\"\nforward_to = \"{echo}\"\nport = 9001\nprotocol = \"tcp\"\n",
                        agents[i % agents.len()].0,
                        ids[i],
                        meshid_tests::free_port(),
                        meshid_tests::free_port(),
                    ),
                );
                proxy.wait_ready(Duration::from_secs(120));
                proxy
            })
            .collect::<Vec<_>>()
    };
    eprintln!(
        "policy-delivery: {n_proxies} proxies on {} agents, {applies} applies",
        agents.len()
    );
    let mut proxies =
        tokio::task::block_in_place(|| start_proxies("policy_source = \"agent\"", "central"));
    let revision_marker = |line: &str| {
        line.contains("central policy in force").then(|| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("revision="))
                .unwrap_or_default()
                .to_owned()
        })
    };
    let mut tail = LogTail::new(proxies.iter().map(|p| p.proc.log.clone()).collect());
    let mut central = Vec::new();
    let mut calls = Vec::new();
    let mut worst_per_apply = Vec::new();
    for k in 1..=applies {
        tokio::time::sleep(jitter()).await;
        let t0 = SystemTime::now();
        let started = Instant::now();
        let change = apply(k).await;
        calls.push(started.elapsed());
        assert_eq!(change.revision, base_revision + k as u64);
        let delays = delays_until(
            &mut tail,
            &change.revision.to_string(),
            t0,
            Duration::from_secs(30),
            &revision_marker,
        )
        .await
        .unwrap_or_else(|missing| {
            panic!(
                "revision {} did not reach {missing} proxies in 30 s",
                change.revision
            )
        });
        worst_per_apply.push(*delays.iter().max().unwrap());
        central.extend(delays);
    }
    // What the CA measured: each revision in effect once every agent reported it handed to
    // every proxy following it (policy.apply.effective, after_ms).
    let mut effects: Vec<Duration> = Vec::new();
    let waited = Instant::now();
    while effects.len() < applies && waited.elapsed() < Duration::from_secs(30) {
        let page = meshid_api::admin::audit_client::AuditClient::new(admin.clone())
            .list(admin::ListAuditRequest {
                after_seq: 0,
                limit: 10_000,
                kind_prefix: "policy.apply.effective".into(),
            })
            .await
            .unwrap()
            .into_inner();
        effects = page
            .records
            .iter()
            .filter_map(|r| {
                let d: serde_json::Value = serde_json::from_str(&r.details).unwrap();
                assert_eq!(d["effective"], true, "{}", r.details);
                (d["revision"].as_u64()? > base_revision)
                    .then(|| Duration::from_millis(d["after_ms"].as_u64().unwrap()))
            })
            .collect();
        if effects.len() < applies {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        effects.len(),
        applies,
        "the CA did not record every apply's effect"
    );
    let revision_metric: f64 = proxies
        .iter()
        .map(|p| p.metric("meshid_proxy_policy_revision", &[]))
        .fold(f64::INFINITY, f64::min);
    drop(std::mem::take(&mut proxies));

    // Baseline: the same proxies on a local file.
    let file = dir.join("policy-local.yaml");
    std::fs::write(&file, document(0, "bench-l0")).unwrap();
    let proxies = tokio::task::block_in_place(|| {
        start_proxies(&format!("policy_file = \"{}\"", file.display()), "local")
    });
    let reload_marker = |line: &str| {
        line.contains("policy reloaded").then(|| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("policy="))
                .unwrap_or_default()
                .trim_matches('"')
                .to_owned()
        })
    };
    let mut tail = LogTail::new(proxies.iter().map(|p| p.proc.log.clone()).collect());
    let mut local = Vec::new();
    let mut worst_local = Vec::new();
    for k in 1..=applies {
        tokio::time::sleep(jitter()).await;
        let name = format!("bench-l{k}");
        let tmp = dir.join("policy-local.yaml.new");
        std::fs::write(&tmp, document(k, &name)).unwrap();
        let t0 = SystemTime::now();
        std::fs::rename(&tmp, &file).unwrap();
        let delays = delays_until(
            &mut tail,
            &name,
            t0,
            Duration::from_secs(30),
            &reload_marker,
        )
        .await
        .unwrap_or_else(|missing| panic!("{name} did not reach {missing} proxies in 30 s"));
        worst_local.push(*delays.iter().max().unwrap());
        local.extend(delays);
    }
    drop(proxies);
    drop(extra);

    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    };
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!(
        "\n## Central policy: apply → in force at every proxy ({n_proxies} proxies on {} agents, {applies} applies)\n",
        agents.len()
    );
    println!("| measure | p50 | p99 | max |");
    println!("|---|---|---|---|");
    let row = |what: &str, v: &mut Vec<Duration>| {
        let (a, b, c) = (pct(v, 0.5), pct(v, 0.99), pct(v, 1.0));
        println!("| {what} | {} | {} | {} |", ms(a), ms(b), ms(c));
        (a, b)
    };
    let (c50, c99) = row(
        "central: `policy apply` → in force at a proxy (every proxy, every apply)",
        &mut central,
    );
    let (_, w99) = row(
        "central: `policy apply` → in force at the last of the proxies",
        &mut worst_per_apply,
    );
    let (l50, l99) = row(
        "baseline: local file replaced → reloaded at a proxy",
        &mut local,
    );
    row(
        "baseline: local file replaced → reloaded at the last of the proxies",
        &mut worst_local,
    );
    row("baseline: the `policy apply` call alone", &mut calls);
    row(
        "in effect as the CA measured it (every agent reported it handed to every proxy)",
        &mut effects,
    );
    println!(
        "\ncentral / local file: p50 {:.2}, p99 {:.2}; target p99 under 1 s at every proxy: {} (p99 of the last proxy per apply {}); lowest revision any proxy reports: {revision_metric}",
        c50.as_secs_f64() / l50.as_secs_f64().max(1e-9),
        c99.as_secs_f64() / l99.as_secs_f64().max(1e-9),
        if c99 < Duration::from_secs(1) { "met" } else { "MISSED" },
        ms(w99),
    );
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn machine() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "{cpus} CPUs, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

#[path = "meshid-bench/console.rs"]
mod console;
#[path = "meshid-bench/ha.rs"]
mod ha;
#[path = "meshid-bench/scale.rs"]
mod scale;
#[path = "meshid-bench/storm.rs"]
mod storm;
#[path = "meshid-bench/transparent.rs"]
mod transparent;

fn run(scenario: &str, profile: bool) {
    let started = Instant::now();
    if ["ha", "scale", "storm", "transparent"].contains(&scenario) {
        match scenario {
            "ha" => ha::run(),
            "scale" => scale::run(),
            "storm" => storm::run(),
            _ => transparent::run(),
        }
        println!(
            "\n({scenario} took {:.0} s; {})",
            started.elapsed().as_secs_f64(),
            machine()
        );
        return;
    }
    eprintln!("== {scenario}: starting the processes");
    let console = format!("127.0.0.1:{}", meshid_tests::free_port());
    let flags: Vec<&str> = if scenario == "console" {
        vec!["--console-address", &console]
    } else {
        Vec::new()
    };
    let mut stack = start_stack(scenario != "node-sign", &flags);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match scenario {
            "fetch-latency" => fetch_latency(&stack, profile).await,
            "interop-latency" => interop_latency(&stack).await,
            "propagation" => propagation(&mut stack).await,
            "rss" => rss(&stack).await,
            "node-sign" => node_sign(&stack, profile).await,
            "taint" => taint(&mut stack).await,
            "revocation" => revocation(&mut stack).await,
            "policy-delivery" => policy_delivery(&mut stack).await,
            "console" => console::run(&mut stack, &console).await,
            other => panic!("unknown scenario {other}"),
        }
    });
    drop(rt);
    drop(stack);
    println!(
        "\n({scenario} took {:.0} s; {})",
        started.elapsed().as_secs_f64(),
        machine()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let profile = args.iter().any(|a| a == "--perf");
    let scenario = args.iter().find(|a| !a.starts_with("--")).cloned();
    let scenarios: Vec<&str> = match scenario.as_deref() {
        Some("all") => SCENARIOS.to_vec(),
        Some(s) if SCENARIOS.contains(&s) => vec![s],
        _ => {
            eprintln!("usage: meshid-bench <{}|all> [--perf]", SCENARIOS.join("|"));
            std::process::exit(2);
        }
    };
    ensure_fd_limit();
    meshid_tests::set_child_log_level("info");
    // Build (or check) the binaries before any timing.
    eprintln!("binaries: {}", meshid_tests::bin_dir().display());
    println!("meshid-bench {} — {}", scenarios.join(", "), machine());
    let mut failed = Vec::new();
    for s in scenarios {
        if std::panic::catch_unwind(|| run(s, profile)).is_err() {
            eprintln!("== {s}: FAILED");
            failed.push(s);
        }
    }
    if !failed.is_empty() {
        eprintln!("failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}
