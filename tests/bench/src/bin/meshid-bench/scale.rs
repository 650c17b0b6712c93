//! `meshid-bench scale`: many agents on several CA servers sharing PostgreSQL.
//!
//! The agents are the agent's own code, many of them in this one process: each is a
//! `meshid_agent::manager::Manager`, as `meshid-agent run` drives it (join-token attestation,
//! the sync stream, a key generated in memory for every entry, BatchSignX509, failover along
//! its list of servers, its backoff), with its own identity, data directory and connection to
//! the CA. Only the Workload API in front of it is left out: a "waiting workload" here is the
//! agent's published snapshot, which is what the Workload API's streams wait on (the hop from
//! there to a workload is measured by `propagation`, about 1 ms).
//!
//! Two deployments, each on a database of its own in one private PostgreSQL (fsync off, as
//! every test cluster here; `pg_stat_statements` loaded to count statements):
//! 1. one CA server, 100 agents, 10,000 entries (100 each): the single-server figure;
//! 2. three CA servers, 1,000 agents, 100,000 entries (100 each), registered in four steps
//!    of 25,000. Each agent lists all three servers, its own first (round robin).
//!
//! Entries are registered through the admin API of every server at once (16 calls in flight
//! on each), while the agents run. After each step, once every agent holds an SVID for every
//! one of its entries: 100 probes, each an entry created for a random agent through a
//! server's admin API in turn, timed from just before the call until that agent publishes its
//! SVID; the CA servers' RSS; statements and transactions per second in the database, idle
//! (5 s) and over the probes. Then a CA server killed (`-9`) and started again: the time until
//! every agent it served has a sync stream open again (on another server, or on it when it
//! was the only one); and, in deployment 2, all three killed and started again.
//!
//! `MESHID_BENCH_SCALE_AGENTS` (1,000) and `MESHID_BENCH_SCALE_PER_AGENT` (100) size
//! deployment 2.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_agent::cache::Snapshot;
use meshid_agent::config::Config as AgentConfig;
use meshid_agent::manager::{Manager, Stats};
use meshid_api::admin::{self, entries_client::EntriesClient, tokens_client::TokensClient};
use meshid_tests::{rss_kib, Ca};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{connect_unix, create_entries, fmt_d, mib, ns, verdict, Lat, TD};

const PROBES: usize = 100;
/// CreateEntry calls in flight on each server while registering.
const IN_FLIGHT: usize = 16;

/// A small deterministic generator (the bench has no `rand`).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

struct SimAgent {
    spiffe_id: String,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<Stats>,
}

impl SimAgent {
    /// Entries held with an SVID.
    fn signed(&self) -> usize {
        self.snapshots
            .borrow()
            .identities
            .iter()
            .filter(|i| i.svid.is_some())
            .count()
    }

    fn has_svid(&self, entry_id: &str) -> bool {
        let snap = self.snapshots.borrow();
        snap.identities
            .binary_search_by(|i| i.entry.id.as_str().cmp(entry_id))
            .ok()
            .is_some_and(|k| snap.identities[k].svid.is_some())
    }
}

struct Deployment {
    name: String,
    db: String,
    cas: Vec<Ca>,
    admins: Vec<Channel>,
    agents: Vec<SimAgent>,
    /// Entries registered per agent.
    expected: Vec<usize>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dir: PathBuf,
}

fn upstream_root(dir: &Path) -> (String, String) {
    super::ha::upstream_root(dir)
}

impl Deployment {
    fn start(
        rt: &Runtime,
        pg: &meshid_tests::pg::Cluster,
        root: &(String, String),
        dir: &Path,
        name: &str,
        servers: usize,
        agents: usize,
    ) -> Self {
        let db = name.replace('-', "_");
        pg.psql("postgres", &format!("CREATE DATABASE {db}"))
            .unwrap();
        let url = pg.admin_url.replace("/postgres", &format!("/{db}"));
        let dir = dir.join(name);
        let cas: Vec<Ca> = (1..=servers)
            .map(|n| {
                let d = dir.join(format!("ca-{n}"));
                std::fs::create_dir_all(&d).unwrap();
                let cfg = d.join("ca.toml");
                // Every simulated agent connects from 127.0.0.1: the per-source limits are
                // raised as for agents behind one NAT address.
                std::fs::write(
                    &cfg,
                    format!(
                        "datastore = \"{url}\"\n[ca]\nupstream_cert = \"{}\"\nupstream_key = \"{}\"\n[node_limits]\nmax_connections_per_source = 8192\nmax_pending_handshakes_per_source = 1024\n",
                        root.0, root.1
                    ),
                )
                .unwrap();
                Ca::start(
                    &d,
                    &[
                        "--config",
                        &cfg.display().to_string(),
                        "--server-id",
                        &format!("ca-{n}"),
                    ],
                )
            })
            .collect();
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, cas[0].ok(&["bundle", "show"])).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let mut d = Deployment {
            name: name.to_owned(),
            db,
            admins: Vec::new(),
            agents: Vec::new(),
            expected: vec![0; agents],
            cas,
            stop,
            tasks: Vec::new(),
            dir,
        };
        d.admins = rt.block_on(async {
            let mut v = Vec::new();
            for ca in &d.cas {
                v.push(connect_unix(&ca.socket).await);
            }
            v
        });
        let t = Instant::now();
        for i in 0..agents {
            let (token, spiffe_id) = rt.block_on(join_token(&d.admins[i % servers]));
            let addrs: Vec<String> = (0..servers)
                .map(|k| d.cas[(i + k) % servers].node_address.clone())
                .collect();
            let data_dir = d.dir.join(format!("agents/{i}"));
            std::fs::create_dir_all(&data_dir).unwrap();
            let config = AgentConfig {
                trust_domain: spiffe::TrustDomain::new(TD).unwrap(),
                server_addresses: addrs,
                trust_bundle_path: bundle.clone(),
                data_dir,
                socket_path: d.dir.join("unused.sock"),
                ops_address: "127.0.0.1:0".parse().unwrap(),
                log_json: false,
                join_token_file: None,
                rotation_fraction: 0.5,
                max_backoff: Duration::from_secs(30),
                attest_timeout: Duration::from_secs(600),
                api_limits: Default::default(),
            };
            let (manager, snapshots) = Manager::new(&config, Some(token));
            let stats = Arc::clone(&manager.stats);
            let stop = stop_rx.clone();
            d.tasks.push(rt.spawn(async move {
                let _ = manager.run(stop).await;
            }));
            d.agents.push(SimAgent {
                spiffe_id,
                snapshots,
                stats,
            });
            // Attest in waves, as nodes joining, not all in the same millisecond.
            if i % 50 == 49 {
                d.wait_connected(i + 1, Duration::from_secs(120));
            }
        }
        d.wait_connected(agents, Duration::from_secs(120));
        eprintln!(
            "   {name}: {servers} CA servers, {agents} agents attested and connected in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        d
    }

    fn connected(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.stats.connected.get() == 1)
            .count()
    }

    fn wait_connected(&self, n: usize, timeout: Duration) {
        let t = Instant::now();
        while self.connected() < n {
            assert!(
                t.elapsed() < timeout,
                "{}: only {} of {n} agents connected",
                self.name,
                self.connected()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Registers `per_agent` more entries for every agent through every server at once, then
    /// waits until every agent holds them all signed. Returns (registered in, all signed in,
    /// database statements per second meanwhile).
    fn register(
        &mut self,
        rt: &Runtime,
        pg: &meshid_tests::pg::Cluster,
        per_agent: usize,
    ) -> (Duration, Duration, f64) {
        let servers = self.cas.len();
        let mut batches: Vec<Vec<admin::Entry>> = vec![Vec::new(); servers];
        for (a, agent) in self.agents.iter().enumerate() {
            let from = self.expected[a];
            for j in from..from + per_agent {
                batches[(a + j) % servers].push(admin::Entry {
                    spiffe_id: format!("spiffe://{TD}/scale/{a}/{j}"),
                    parent_id: agent.spiffe_id.clone(),
                    selectors: vec![format!("unix:uid:{}", 100_000 + a)],
                    ..Default::default()
                });
            }
            self.expected[a] += per_agent;
        }
        let total: usize = batches.iter().map(Vec::len).sum();
        let (s0, _) = self.db_counts(pg);
        let t = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = batches
                .into_iter()
                .zip(self.admins.iter().cloned())
                .map(|(specs, admin)| {
                    tokio::spawn(async move { create_entries(&admin, specs, IN_FLIGHT).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let registered = t.elapsed();
        let want: usize = self.expected.iter().sum();
        let mut last_report = Instant::now();
        loop {
            let signed: usize = self.agents.iter().map(SimAgent::signed).sum();
            let done = self
                .agents
                .iter()
                .zip(&self.expected)
                .all(|(a, &e)| a.signed() >= e);
            if done {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("   {}: {signed} of {want} signed", self.name);
                last_report = Instant::now();
            }
            assert!(
                t.elapsed() < Duration::from_secs(900),
                "{}: only {signed} of {want} SVIDs after 900 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let signed = t.elapsed();
        let (s1, _) = self.db_counts(pg);
        eprintln!(
            "   {}: {total} entries registered in {:.1} s ({:.0}/s), all {want} signed after {:.1} s",
            self.name,
            registered.as_secs_f64(),
            total as f64 / registered.as_secs_f64(),
            signed.as_secs_f64()
        );
        (registered, signed, (s1 - s0) / signed.as_secs_f64())
    }

    /// (statements, transactions) run in this deployment's database so far.
    fn db_counts(&self, pg: &meshid_tests::pg::Cluster) -> (f64, f64) {
        let statements = pg
            .psql(
                "postgres",
                &format!("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{}'", self.db),
            )
            .unwrap();
        let xacts = pg
            .psql(
                "postgres",
                &format!(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{}'",
                    self.db
                ),
            )
            .unwrap();
        (
            statements.parse().unwrap_or(0.0),
            xacts.parse().unwrap_or(0.0),
        )
    }

    fn rss(&self) -> Vec<u64> {
        self.cas.iter().map(|c| rss_kib(c.proc.id())).collect()
    }

    /// Entry create → SVID published by its agent, `PROBES` times, one at a time.
    fn probes(&mut self, rt: &Runtime, rng: &mut Rng) -> (Lat, u64) {
        let mut lat = Lat::default();
        let mut timeouts = 0;
        for k in 0..PROBES {
            let a = rng.below(self.agents.len());
            let admin = self.admins[k % self.admins.len()].clone();
            let j = self.expected[a];
            self.expected[a] += 1;
            let entry = admin::Entry {
                spiffe_id: format!("spiffe://{TD}/scale/{a}/{j}"),
                parent_id: self.agents[a].spiffe_id.clone(),
                selectors: vec![format!("unix:uid:{}", 100_000 + a)],
                ..Default::default()
            };
            let mut rx = self.agents[a].snapshots.clone();
            let agent = &self.agents[a];
            let took = rt.block_on(async {
                let t = Instant::now();
                let created = EntriesClient::new(admin)
                    .create_entry(admin::CreateEntryRequest { entry: Some(entry) })
                    .await
                    .unwrap()
                    .into_inner();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    if agent.has_svid(&created.id) {
                        return Some(t.elapsed());
                    }
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        return None;
                    }
                }
            });
            match took {
                Some(d) => lat.add(vec![ns(d)]),
                None => timeouts += 1,
            }
            std::thread::sleep(Duration::from_millis(20 + rng.below(30) as u64));
        }
        (lat, timeouts)
    }

    /// Kills `servers` (-9) and starts them again at once; returns (how many agents had to
    /// reconnect, the time from the kill until the last of them had a sync stream open again,
    /// the time until the servers were healthy again).
    fn restart(&mut self, servers: &[usize]) -> (usize, Duration, Duration) {
        let before: Vec<u64> = self
            .agents
            .iter()
            .map(|a| a.stats.reconnects.get())
            .collect();
        let mut back: Vec<Option<Duration>> = vec![None; self.agents.len()];
        let t0 = Instant::now();
        for &s in servers {
            self.cas[s].proc.signal("KILL");
        }
        for &s in servers {
            self.cas[s].restart();
        }
        let healthy = t0.elapsed();
        let mut last_new = Instant::now();
        loop {
            for (i, a) in self.agents.iter().enumerate() {
                if back[i].is_none()
                    && a.stats.reconnects.get() > before[i]
                    && a.stats.connected.get() == 1
                {
                    back[i] = Some(t0.elapsed());
                    last_new = Instant::now();
                }
            }
            let all = self.connected() == self.agents.len();
            if all && last_new.elapsed() > Duration::from_secs(3) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "{}: {} of {} agents connected 180 s after the restart",
                self.name,
                self.connected(),
                self.agents.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let times: Vec<Duration> = back.iter().flatten().copied().collect();
        (
            times.len(),
            times.iter().max().copied().unwrap_or_default(),
            healthy,
        )
    }

    fn stop(self, rt: &Runtime) {
        let _ = self.stop.send(true);
        rt.block_on(async {
            for t in self.tasks {
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
        });
        drop(self.cas);
    }
}

async fn join_token(admin: &Channel) -> (String, String) {
    let t = TokensClient::new(admin.clone())
        .generate_token(admin::GenerateTokenRequest { ttl: 0 })
        .await
        .unwrap()
        .into_inner();
    (
        t.token,
        format!("spiffe://{TD}/meshid/agent/join_token/{}", t.id),
    )
}

struct Row {
    deployment: String,
    entries: usize,
    lat: Lat,
    timeouts: u64,
    rss: Vec<u64>,
    idle_qps: (f64, f64),
    probe_qps: (f64, f64),
}

/// One measuring point: idle database rates over 5 s, then the probes and their rates.
fn measure(d: &mut Deployment, rt: &Runtime, pg: &meshid_tests::pg::Cluster, rng: &mut Rng) -> Row {
    let entries: usize = d.expected.iter().sum();
    let (s0, x0) = d.db_counts(pg);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (s1, x1) = d.db_counts(pg);
    let idle = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (lat, timeouts) = d.probes(rt, rng);
    let (s2, x2) = d.db_counts(pg);
    let busy = t.elapsed().as_secs_f64();
    let row = Row {
        deployment: d.name.clone(),
        entries,
        lat,
        timeouts,
        rss: d.rss(),
        idle_qps: ((s1 - s0) / idle, (x1 - x0) / idle),
        probe_qps: ((s2 - s1) / busy, (x2 - x1) / busy),
    };
    eprintln!(
        "   {} at {entries} entries: create → SVID p50 {} p99 {} max {} ({} timeouts)",
        row.deployment,
        fmt_d(row.lat.p(0.5)),
        fmt_d(row.lat.p(0.99)),
        fmt_d(row.lat.max()),
        row.timeouts
    );
    row
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn run() {
    let agents = env_usize("MESHID_BENCH_SCALE_AGENTS", 1000);
    let per_agent = env_usize("MESHID_BENCH_SCALE_PER_AGENT", 100);
    let Some(pg) = meshid_tests::postgres_cluster_with(
        "-c shared_preload_libraries=pg_stat_statements -c max_connections=300",
    ) else {
        panic!("scale needs PostgreSQL (initdb)");
    };
    pg.psql(
        "postgres",
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    )
    .unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("meshid-bench-scale-")
        .tempdir()
        .unwrap();
    let root = upstream_root(tmp.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rows = Vec::new();
    let mut restarts = Vec::new();
    let mut registration = Vec::new();

    // 1. One server, 10,000 entries.
    eprintln!("== scale: one CA server, 100 agents, 10,000 entries");
    let mut one = Deployment::start(&rt, &pg, &root, tmp.path(), "one-server", 1, 100);
    let (reg, signed, qps) = one.register(&rt, &pg, 100);
    registration.push(("one server".to_owned(), 10_000usize, reg, signed, qps));
    rows.push(measure(&mut one, &rt, &pg, &mut rng));
    let (n, all, healthy) = one.restart(&[0]);
    restarts.push((
        "one server: the CA killed and started again".to_owned(),
        n,
        all,
        healthy,
    ));
    one.stop(&rt);

    // 2. Three servers, 100,000 entries in four steps.
    eprintln!("== scale: three CA servers, {agents} agents, {per_agent} entries each");
    let mut three = Deployment::start(&rt, &pg, &root, tmp.path(), "three-servers", 3, agents);
    let steps = 4;
    for step in 0..steps {
        let n = per_agent / steps + usize::from(step < per_agent % steps);
        let (reg, signed, qps) = three.register(&rt, &pg, n);
        registration.push((
            format!("three servers, step {}", step + 1),
            n * agents,
            reg,
            signed,
            qps,
        ));
        rows.push(measure(&mut three, &rt, &pg, &mut rng));
    }
    let (n, all, healthy) = three.restart(&[0]);
    restarts.push((
        "three servers: ca-1 killed and started again".to_owned(),
        n,
        all,
        healthy,
    ));
    let (n, all, healthy) = three.restart(&[0, 1, 2]);
    restarts.push((
        "three servers: all three killed and started again".to_owned(),
        n,
        all,
        healthy,
    ));
    // After the storm: still converging as before?
    rows.push(measure(&mut three, &rt, &pg, &mut rng));
    let last_rss = three.rss();
    three.stop(&rt);

    println!("\n### Scale: many agents on several CA servers (`scale`)\n");
    println!("| deployment | entries | create → SVID p50 / p99 / max | timeouts | CA RSS | DB statements/s idle / probes | DB transactions/s idle / probes |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} / {} / {} | {} | {} | {:.0} / {:.0} | {:.0} / {:.0} |",
            r.deployment,
            r.entries,
            fmt_d(r.lat.p(0.5)),
            fmt_d(r.lat.p(0.99)),
            fmt_d(r.lat.max()),
            r.timeouts,
            r.rss.iter().map(|k| mib(*k)).collect::<Vec<_>>().join(", "),
            r.idle_qps.0,
            r.probe_qps.0,
            r.idle_qps.1,
            r.probe_qps.1,
        );
    }
    let base = rows[0].lat.p(0.99);
    let worst = rows[1..]
        .iter()
        .map(|r| r.lat.p(0.99))
        .max()
        .unwrap_or_default();
    println!(
        "\np99 ratio, three servers' worst to one server: {:.2}; target p99 under 2 s at {} entries: {}",
        worst.as_secs_f64() / base.as_secs_f64().max(1e-9),
        agents * per_agent,
        verdict(worst < Duration::from_secs(2) && rows.iter().all(|r| r.timeouts == 0))
    );
    println!("\n| registration | entries | CreateEntry calls done | all signed at the agents | DB statements/s |\n|---|---|---|---|---|");
    for (what, n, reg, signed, qps) in &registration {
        println!(
            "| {what} | {n} | {:.1} s ({:.0}/s) | {:.1} s | {qps:.0} |",
            reg.as_secs_f64(),
            *n as f64 / reg.as_secs_f64(),
            signed.as_secs_f64()
        );
    }
    println!("\n| restart | agents that reconnected | the last reconnected after | servers healthy after |\n|---|---|---|---|");
    for (what, n, all, healthy) in &restarts {
        println!("| {what} | {n} | {} | {} |", fmt_d(*all), fmt_d(*healthy));
    }
    println!(
        "\nCA RSS at the end: {}",
        last_rss
            .iter()
            .map(|k| mib(*k))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
