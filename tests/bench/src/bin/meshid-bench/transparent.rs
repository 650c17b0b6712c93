//! `meshid-bench transparent`: transparent mode against explicit mode, and both against no
//! proxy, between two hosts made of network namespaces, in one run (issue 16).
//!
//! ```text
//!              switch namespace: bridge 198.18.0.1/24, meshid-ca
//!          _______________|________________
//!         |                                |
//!   web 198.18.0.2                   api 198.18.0.3
//!   agent, meshid-proxy, wrk         agent, meshid-proxy, nginx on 8000, 8080 and 8001
//! ```
//!
//! The hosts are `meshid_tests::netns` hosts, set up as `tests/tests/e2e/netns.rs` does: a CA in
//! the switch, an agent per host (join token), an entry per host, and one meshid-proxy per host
//! running as root with `mark` exclusion and the rules of `meshid-proxy iptables install` in its
//! namespace (the CA's address excluded from outbound capture). Each proxy carries both the
//! explicit listeners and the `[transparent]` section, so both modes run through the very same
//! two processes: `worker_threads = 1`, `access_log = "off"`. wrk (2 threads) runs in web; nginx
//! in api is meshid-proxy-bench's (`meshid_bench::nginx`: one worker, the 1 KiB static file,
//! keep-alive). The paths, each a row:
//!
//! - `plain`: wrk → `198.18.0.3:8001`, a port excluded from both hosts' rules
//!   (`--exclude-outbound-ports 8001`, `--exclude-inbound-ports 8001,...`): no proxy, the limit
//!   of the link and of the machine.
//! - `explicit tcp` / `explicit detect`: wrk → web's `[[outbound]]` on 127.0.0.1:15080 / 15081
//!   → mTLS → api's `[[inbound]]` on 198.18.0.3:15443 / 15444 (`protocol = "tcp"` / `"detect"`;
//!   both ports excluded from api's inbound capture) → nginx on 127.0.0.1:8000 / 8080.
//! - `transparent tcp` / `transparent detect`: wrk → `http://198.18.0.3:8000/` / `:8080/`, the
//!   application's own address → iptables REDIRECT to web's transparent outbound listener →
//!   mTLS → REDIRECT to api's transparent inbound listener → nginx on 127.0.0.1:8000 / 8080
//!   (`inbound_forward = "loopback"`). Port 8000 is in `tcp_ports` (opaque, one decision per
//!   connection, as `protocol = "tcp"`); 8080 is detected (HTTP, a decision per request, as
//!   `protocol = "detect"`). Outbound both modes relay bytes (L4).
//!
//! Scenarios (meshid-proxy-bench's): `keepalive16`, HTTP/1.1 keep-alive over 16 connections;
//! `newconn`, each request on a new connection (`Connection: close`), 16 at a time. Each cell is
//! a warm-up and a measured run; it reports requests/s, p50 and p99 (wrk's histogram, printed by
//! its Lua `done()` hook), the two proxies' CPU per request (utime + stime from
//! `/proc/<pid>/stat`), nginx's accepts per request, and the connections each proxy counted, with
//! ratios to `plain` and transparent ÷ explicit. The rounds are interleaved (every cell once per
//! round, in the same order) and each number is the median of the rounds.
//!
//! A cell fails when wrk reports any error (connect, read, write, timeout, a status of 400 or
//! above) or a response shorter than the 1 KiB body, or when the proxies' metrics show the
//! requests did not take the path: `plain` must move no proxy counter
//! (`meshid_proxy_connections_total`, `meshid_proxy_transparent_connections_total`); `explicit`
//! must be accepted by both explicit listeners (at least one connection per wrk connection) and
//! move no transparent counter; `transparent` must be counted `mtls` by web's transparent
//! outbound and api's transparent inbound as often, with no other transparent outcome and no
//! connection on an explicit listener; `detect` rows must show at least wrk's requests in api's
//! `meshid_proxy_http_requests_total`, `tcp` rows none. (wrk opens one connection more than
//! `-c` to check the address before it starts: 17 are counted for 16.)
//!
//! Both modes' `detect` routes pool their connections to the application across callers (an
//! explicit listener one pool, transparent inbound one per application address), so with a new
//! caller connection per request nginx still sees almost no new connection: a `detect` cell
//! with more than 0.05 nginx accepts per request fails.
//!
//! Options, after the scenario name or from the environment: `--duration 10s`
//! (`MESHID_TRANSPARENT_DURATION`), `--warmup 2s` (`MESHID_TRANSPARENT_WARMUP`), `--rounds 3`
//! (`MESHID_TRANSPARENT_ROUNDS`). In the hosts' namespaces, conntrack forgets a closed connection
//! after 2 s (`net.netfilter.nf_conntrack_tcp_timeout_time_wait`, a per-namespace setting), so
//! that the new-connection cells (tens of thousands of connections per second on `plain`) do not
//! fill the machine's conntrack table. Needs root, `ip`, iptables, wrk, nginx and curl. The
//! processes, namespaces and temporary directory go when the bench ends, on panic and on
//! SIGINT/SIGTERM too (`MESHID_BENCH_KEEP=1` keeps the directory with configs and logs). Run:
//!
//! ```text
//! cargo build --release -p meshid-ca -p meshid-agent -p meshid-proxy -p meshid-bench
//! MESHID_NO_BUILD=1 target/release/meshid-bench transparent [--duration 10s] [--rounds 3]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_bench::nginx;
use meshid_bench::procs::{
    install_signal_handler, register_namespaces, temp_dir, Guard, Registered,
};
use meshid_bench::wrk::{run_wrk, Load, WrkOut, WRK_SCRIPT};
use meshid_tests::netns::{
    missing_prerequisite, Net, API_ADDR, CA_ADDR, MARK, NODE_PORT, PROXY_OPS, TRANSPARENT, WEB_ADDR,
};
use meshid_tests::{bin_dir, metric_value, wait_for, Ca, Proc};

const TD: &str = "spiffe://example.org";
/// nginx's port that no rule captures.
const PLAIN_PORT: u16 = 8001;
const WRK_THREADS: usize = 2;
const CONNECTIONS: &str = "meshid_proxy_connections_total";
const HTTP_REQUESTS: &str = "meshid_proxy_http_requests_total";

/// What api's proxy does with a connection, and the ports of that variant.
struct Protocol {
    /// `tcp` or `detect`.
    name: &'static str,
    /// nginx's port, which the policy's rule and the transparent path use.
    app_port: u16,
    /// web's explicit outbound listener (127.0.0.1).
    outbound_port: u16,
    /// api's explicit inbound listener (198.18.0.3).
    inbound_port: u16,
}

static PROTOCOLS: [Protocol; 2] = [
    Protocol {
        name: "tcp",
        app_port: 8000,
        outbound_port: 15080,
        inbound_port: 15443,
    },
    Protocol {
        name: "detect",
        app_port: 8080,
        outbound_port: 15081,
        inbound_port: 15444,
    },
];

/// The scenarios: (name, title, load).
static SCENARIOS: [(&str, &str, Load); 2] = [
    (
        "keepalive16",
        "Keep-alive, 1 KiB responses, 16 connections",
        Load {
            conns: 16,
            path: "/1k",
            body: 1024,
            close: false,
        },
    ),
    (
        "newconn",
        "New connection per request, 1 KiB responses, 16 at a time",
        Load {
            conns: 16,
            path: "/1k",
            body: 1024,
            close: true,
        },
    ),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Explicit,
    Transparent,
}

/// The path of one row.
#[derive(Clone, Copy)]
struct Route {
    mode: Mode,
    protocol: Option<&'static Protocol>,
}

impl Route {
    fn all() -> Vec<Route> {
        let mut v = vec![Route {
            mode: Mode::Plain,
            protocol: None,
        }];
        for p in &PROTOCOLS {
            for mode in [Mode::Explicit, Mode::Transparent] {
                v.push(Route {
                    mode,
                    protocol: Some(p),
                });
            }
        }
        v
    }

    fn name(&self) -> String {
        let mode = match self.mode {
            Mode::Plain => "plain",
            Mode::Explicit => "explicit",
            Mode::Transparent => "transparent",
        };
        match self.protocol {
            Some(p) => format!("{mode} {}", p.name),
            None => mode.to_owned(),
        }
    }

    /// Where wrk sends the requests, from web.
    fn base(&self) -> String {
        match (self.mode, self.protocol) {
            (Mode::Explicit, Some(p)) => format!("http://127.0.0.1:{}", p.outbound_port),
            (Mode::Transparent, Some(p)) => format!("http://{API_ADDR}:{}", p.app_port),
            _ => format!("http://{API_ADDR}:{PLAIN_PORT}"),
        }
    }
}

struct Opts {
    duration: Duration,
    warmup: Duration,
    rounds: usize,
}

/// The options: `--duration`, `--warmup`, `--rounds` on the command line, else from the
/// environment, else 10 s, 2 s and 3.
fn opts() -> Opts {
    let duration = |s: &str, what: &str| {
        meshid_bench::parse_duration(s).unwrap_or_else(|| panic!("{what}: bad duration {s:?}"))
    };
    let rounds = |s: &str, what: &str| {
        s.parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{what}: {s:?} is not a positive number of rounds"))
    };
    let env = |name: &str| std::env::var(name).ok();
    let mut o = Opts {
        duration: env("MESHID_TRANSPARENT_DURATION").map_or(Duration::from_secs(10), |v| {
            duration(&v, "MESHID_TRANSPARENT_DURATION")
        }),
        warmup: env("MESHID_TRANSPARENT_WARMUP").map_or(Duration::from_secs(2), |v| {
            duration(&v, "MESHID_TRANSPARENT_WARMUP")
        }),
        rounds: env("MESHID_TRANSPARENT_ROUNDS")
            .map_or(3, |v| rounds(&v, "MESHID_TRANSPARENT_ROUNDS")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        if !["--duration", "--warmup", "--rounds"].contains(&flag.as_str()) {
            continue;
        }
        let v = inline
            .or_else(|| args.next())
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--duration" => o.duration = duration(&v, &flag),
            "--warmup" => o.warmup = duration(&v, &flag),
            _ => o.rounds = rounds(&v, &flag),
        }
    }
    assert!(
        o.duration >= Duration::from_secs(1),
        "--duration must be at least 1s (wrk runs whole seconds)"
    );
    o
}

/// Everything that runs, in drop order: the processes, then their registration for the signal
/// handler, then the namespaces, then the directory.
struct World {
    /// web's and api's proxies.
    proxies: [Proc; 2],
    nginx: Guard,
    _agents: Vec<Proc>,
    _ca: Ca,
    _registered: Registered,
    net: Net,
    tmp: tempfile::TempDir,
}

fn proxy_config(dir: &Path, host: &str, socket: &Path, policy: &Path) -> PathBuf {
    let mut text = format!(
        "workload_api_socket = \"unix://{socket}\"\n\
         spiffe_id = \"{TD}/{host}\"\n\
         ops_address = \"{PROXY_OPS}\"\n\
         policy_file = \"{policy}\"\n\
         access_log = \"off\"\n\
         log_format = \"text\"\n\
         worker_threads = 1\n\
         \n\
         [transparent]\n\
         mark = {MARK}\n\
         inbound_forward = \"loopback\"\n\
         tcp_ports = [{tcp}]\n\
         [[transparent.destinations]]\n\
         address = \"{API_ADDR}\"\n\
         expect = \"{TD}/api\"\n",
        socket = socket.display(),
        policy = policy.display(),
        tcp = PROTOCOLS[0].app_port,
    );
    for p in &PROTOCOLS {
        text.push_str(&if host == "web" {
            format!(
                "\n[[outbound]]\nname = \"explicit-{}\"\nlisten = \"127.0.0.1:{}\"\n\
                 upstream = \"{API_ADDR}:{}\"\nexpect = \"{TD}/api\"\n",
                p.name, p.outbound_port, p.inbound_port
            )
        } else {
            format!(
                "\n[[inbound]]\nname = \"explicit-{}\"\nlisten = \"{API_ADDR}:{}\"\n\
                 forward_to = \"127.0.0.1:{}\"\nport = {}\nprotocol = \"{}\"\n",
                p.name, p.inbound_port, p.app_port, p.app_port, p.name
            )
        });
    }
    let path = dir.join(format!("{host}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The hosts, the CA, the agents, nginx and the proxies with their rules; every path checked
/// once with curl.
fn setup() -> World {
    let tmp = temp_dir("meshid-bench-transparent-");
    let dir = tmp.path().to_owned();
    let net = Net::create(&[CA_ADDR], &[("web", WEB_ADDR), ("api", API_ADDR)], None);
    register_namespaces(net.names());
    // Declared before the processes, so that on a panic here they are killed first.
    let mut registered = Registered::default();
    let server = format!("{CA_ADDR}:{NODE_PORT}");
    let ca = net.start_ca(&dir, "s", "example.org", &server, &[]);
    registered.add(ca.proc.id());
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, ca.ok(&["bundle", "show"])).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "name: bench\ndefault: deny\nrules:\n  - name: web-to-api\n    from: [\"{TD}/web\"]\n    \
             to: [\"{TD}/api\"]\n    ports: [{}, {}]\n",
            PROTOCOLS[0].app_port, PROTOCOLS[1].app_port
        ),
    )
    .unwrap();

    // nginx in api, on the two application ports and the plain one.
    let ndir = dir.join("nginx");
    let listen: Vec<String> = PROTOCOLS
        .iter()
        .map(|p| p.app_port)
        .chain([PLAIN_PORT])
        .map(|p| p.to_string())
        .collect();
    let mut args = vec![
        "netns".to_owned(),
        "exec".to_owned(),
        net.ns("api"),
        nginx::NGINX.to_owned(),
    ];
    args.extend(nginx::configure(&ndir, &listen));
    let nginx = Guard::spawn("nginx", Path::new("ip"), &args, ndir.join("nginx.log"), &[]).unwrap();

    // An agent, an entry, the rules and a proxy on each host.
    let proxy_bin = bin_dir().join("meshid-proxy");
    let excluded_in = format!(
        "{PLAIN_PORT},{},{}",
        PROTOCOLS[0].inbound_port, PROTOCOLS[1].inbound_port
    );
    let mut agents = Vec::new();
    let mut proxies = Vec::new();
    for host in ["web", "api"] {
        let (token, agent_id) = ca.join_token();
        let (agent, socket) =
            net.spawn_agent(&dir, host, ("example.org", &server), &bundle, &token);
        registered.add(agent.id());
        agents.push(agent);
        ca.entry_for_this_uid(
            host,
            &format!("{TD}/{host}"),
            &agent_id,
            &["--x509-ttl", "1h"],
        );
        let config = proxy_config(&dir, host, &socket, &policy);
        let config = config.display().to_string();
        let out = net.output(
            host,
            &proxy_bin.display().to_string(),
            &[
                "iptables",
                "install",
                "--config",
                &config,
                "--exclude-outbound-cidrs",
                &format!("{CA_ADDR}/32"),
                "--exclude-outbound-ports",
                &PLAIN_PORT.to_string(),
                "--exclude-inbound-ports",
                &excluded_in,
            ],
        );
        assert!(
            out.status.success(),
            "iptables install on {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sysctl = net.output(
            host,
            "sysctl",
            &["-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=2"],
        );
        if !sysctl.status.success() {
            eprintln!(
                "{host}: conntrack TIME_WAIT timeout unchanged (new-connection cells may fill the table): {}",
                String::from_utf8_lossy(&sysctl.stderr).trim()
            );
        }
        let cmd = net.exec(host, &proxy_bin, &["run", "--config", &config]);
        let proxy = net.spawn_ready(&dir, host, "meshid-proxy", cmd, PROXY_OPS);
        registered.add(proxy.id());
        // `ip netns exec` replaces itself with the program (no fork): this pid is the proxy's.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", proxy.id())).unwrap();
        assert_eq!(comm.trim(), "meshid-proxy", "the pid measured for CPU");
        proxies.push(proxy);
    }
    std::fs::write(dir.join("web-rules.txt"), net.nat_rules("web")).unwrap();
    std::fs::write(dir.join("api-rules.txt"), net.nat_rules("api")).unwrap();
    for route in Route::all() {
        let url = format!("{}/1k", route.base());
        wait_for(Duration::from_secs(20), &format!("{url} from web"), || {
            let (code, body) = net.curl("web", &url);
            (code == 200 && body.len() == 1024).then_some(())
        });
    }
    World {
        proxies: proxies.try_into().ok().unwrap(),
        nginx,
        _agents: agents,
        _ca: ca,
        _registered: registered,
        net,
        tmp,
    }
}

/// Both proxies' metrics at one moment.
struct Scrape {
    web: String,
    api: String,
}

impl Scrape {
    fn take(net: &Net) -> Scrape {
        Scrape {
            web: net.metrics("web"),
            api: net.metrics("api"),
        }
    }

    fn get(&self, host: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = if host == "web" { &self.web } else { &self.api };
        metric_value(text, name, labels)
    }
}

/// One measured cell.
#[derive(Clone, Copy, Default)]
struct Cell {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Both proxies' CPU per request, µs.
    cpu_us: f64,
    /// nginx's accepts per request.
    accepts: f64,
    /// The connections web's and api's proxy counted on the route's listeners.
    seen: [f64; 2],
}

/// Whether the requests took `route`, from the proxies' counters before and after; returns
/// the connections web's and api's proxies counted on the route's listeners.
fn check_route(
    route: Route,
    load: &Load,
    w: &WrkOut,
    before: &Scrape,
    after: &Scrape,
) -> Result<[f64; 2], String> {
    let d = |host: &str, name: &str, labels: &[(&str, &str)]| {
        after.get(host, name, labels) - before.get(host, name, labels)
    };
    let both = |name: &str| d("web", name, &[]) + d("api", name, &[]);
    // Each wrk connection is one connection at each proxy.
    let expected = if load.close {
        w.requests as f64
    } else {
        load.conns as f64
    };
    let explicit = |host: &str, p: &Protocol| {
        d(
            host,
            CONNECTIONS,
            &[("listener", &format!("explicit-{}", p.name))],
        )
    };
    let transparent = [
        d(
            "web",
            TRANSPARENT,
            &[("direction", "outbound"), ("result", "mtls")],
        ),
        d(
            "api",
            TRANSPARENT,
            &[("direction", "inbound"), ("result", "mtls")],
        ),
    ];
    let seen = match (route.mode, route.protocol) {
        (Mode::Explicit, Some(p)) => {
            if both(TRANSPARENT) != 0.0 {
                return Err(format!(
                    "explicit traffic moved the transparent counters by {}",
                    both(TRANSPARENT)
                ));
            }
            [explicit("web", p), explicit("api", p)]
        }
        (Mode::Transparent, Some(_)) => {
            let explicit_all: f64 = PROTOCOLS
                .iter()
                .map(|p| explicit("web", p) + explicit("api", p))
                .sum();
            let other = both(TRANSPARENT) - transparent[0] - transparent[1];
            if explicit_all != 0.0 || other != 0.0 {
                return Err(format!(
                    "transparent traffic took another path: {explicit_all} explicit connections, \
                     {other} transparent ones not mtls"
                ));
            }
            transparent
        }
        _ => {
            if both(CONNECTIONS) != 0.0 || both(TRANSPARENT) != 0.0 {
                return Err(format!(
                    "plain traffic reached a proxy: {} connections, {} transparent",
                    both(CONNECTIONS),
                    both(TRANSPARENT)
                ));
            }
            return Ok([0.0, 0.0]);
        }
    };
    if seen.iter().any(|n| *n < expected) {
        return Err(format!(
            "the proxies counted {} (web) and {} (api) connections on the route, fewer than \
             wrk's {expected}",
            seen[0], seen[1]
        ));
    }
    let http = d("api", HTTP_REQUESTS, &[]);
    match route.protocol {
        Some(p) if p.name == "detect" && http < w.requests as f64 => Err(format!(
            "api saw {http} HTTP requests for wrk's {}: not detected as HTTP",
            w.requests
        )),
        Some(p) if p.name == "tcp" && http != 0.0 => {
            Err(format!("api saw {http} HTTP requests on an opaque route"))
        }
        _ => Ok(seen),
    }
}

/// nginx's accepts counter, read from api.
fn nginx_accepts(net: &Net) -> Result<u64, String> {
    let url = format!("http://127.0.0.1:{PLAIN_PORT}/nginx_status");
    let (code, body) = net.curl("api", &url);
    (code == 200)
        .then(|| nginx::accepts(&body))
        .flatten()
        .ok_or_else(|| format!("nginx status: {code} {body}"))
}

fn run_cell(
    w: &mut World,
    o: &Opts,
    script: &Path,
    route: Route,
    load: &Load,
) -> Result<Cell, String> {
    let wrk = |duration: Duration| {
        run_wrk(
            w.net.exec("web", Path::new("wrk"), &[]),
            script,
            &route.base(),
            load,
            WRK_THREADS,
            duration,
            || {},
        )
    };
    if !o.warmup.is_zero() {
        wrk(o.warmup)?.check(load.body, "warm-up")?;
    }
    let pids = w.proxies.each_ref().map(Proc::id);
    let cpu = || pids.iter().map(|p| crate::cpu_secs(*p)).sum::<f64>();
    let before = Scrape::take(&w.net);
    let accepts0 = nginx_accepts(&w.net)?;
    let cpu0 = cpu();
    let out = wrk(o.duration)?;
    let cpu1 = cpu();
    let after = Scrape::take(&w.net);
    // The second status request is one more accept.
    let accepts = nginx_accepts(&w.net)?.saturating_sub(accepts0 + 1);
    for p in &mut w.proxies {
        if p.has_exited() {
            return Err(format!("a proxy exited:\n{}", p.log_text()));
        }
    }
    w.nginx.check_alive()?;
    out.check(load.body, "measured run")?;
    let seen = check_route(route, load, &out, &before, &after)?;
    let n = out.requests as f64;
    let detect = route.protocol.is_some_and(|p| p.name == "detect");
    if detect && accepts as f64 / n > 0.05 {
        return Err(format!(
            "nginx accepted {accepts} connections for {n} requests: the application connections are not pooled"
        ));
    }
    Ok(Cell {
        rps: n / out.duration_s,
        p50_us: out.p50_us,
        p99_us: out.p99_us,
        cpu_us: (cpu1 - cpu0) * 1e6 / n,
        accepts: accepts as f64 / n,
        seen,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

/// The per-field medians of a row's rounds, or the first failure.
fn summary(rounds: &[Result<Cell, String>]) -> Result<Cell, String> {
    let ok: Vec<Cell> = rounds.iter().cloned().collect::<Result<_, _>>()?;
    let m = |f: fn(&Cell) -> f64| median(ok.iter().map(f).collect());
    Ok(Cell {
        rps: m(|c| c.rps),
        p50_us: m(|c| c.p50_us),
        p99_us: m(|c| c.p99_us),
        cpu_us: m(|c| c.cpu_us),
        accepts: m(|c| c.accepts),
        seen: [m(|c| c.seen[0]), m(|c| c.seen[1])],
    })
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

pub fn run() {
    let o = opts();
    // wrk has no option that exits 0 without a URL: it is only looked for.
    let wrk = std::process::Command::new("wrk").arg("-v").output().is_ok();
    let missing = missing_prerequisite(&[
        ("ip", "-V"),
        ("iptables", "--version"),
        (nginx::NGINX, "-v"),
        ("curl", "--version"),
    ])
    .or_else(|| (!wrk).then(|| "wrk is not installed".to_owned()));
    if let Some(why) = missing {
        panic!(
            "transparent cannot run here: {why} (it needs root, ip, iptables, wrk, nginx and curl)"
        );
    }
    install_signal_handler();
    eprintln!("== transparent: network namespaces, CA, agents, nginx, proxies");
    let mut w = setup();
    let script = w.tmp.path().join("summary.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();
    let routes = Route::all();
    // Results by [scenario][route], one entry per round.
    let mut cells: Vec<Vec<Vec<Result<Cell, String>>>> =
        vec![vec![Vec::new(); routes.len()]; SCENARIOS.len()];
    for round in 1..=o.rounds {
        for (s, (scenario, _, load)) in SCENARIOS.iter().enumerate() {
            for (r, route) in routes.iter().enumerate() {
                eprint!("round {round}/{} {scenario} {}: ", o.rounds, route.name());
                let cell = run_cell(&mut w, &o, &script, *route, load);
                match &cell {
                    Ok(c) => eprintln!(
                        "{:.0} req/s, p50 {}, p99 {}, proxies' CPU {:.1} µs/request, counted {} / {}",
                        c.rps,
                        ms(c.p50_us),
                        ms(c.p99_us),
                        c.cpu_us,
                        c.seen[0],
                        c.seen[1]
                    ),
                    Err(e) => eprintln!("FAILED: {e}"),
                }
                cells[s][r].push(cell);
                // Let the connections close before the next cell.
                std::thread::sleep(Duration::from_millis(if load.close { 1000 } else { 300 }));
            }
        }
    }
    drop(w);
    report(&o, &routes, &cells);
}

fn report(o: &Opts, routes: &[Route], cells: &[Vec<Vec<Result<Cell, String>>>]) {
    println!("\n## Transparent mode vs explicit mode vs no proxy, two hosts (`transparent`)\n");
    println!(
        "{} s per cell after a {} s warm-up, {} round(s) interleaved, medians; wrk {WRK_THREADS} threads in web, nginx in api; \
         each proxy 1 worker thread, access log off.",
        o.duration.as_secs_f64(),
        o.warmup.as_secs_f64(),
        o.rounds
    );
    let mut failed = 0;
    for ((scenario, title, load), rows) in SCENARIOS.iter().zip(cells) {
        let sums: Vec<Result<Cell, String>> = rows.iter().map(|r| summary(r)).collect();
        let plain = sums[0].clone().ok();
        println!("\n### {title} (`{scenario}`)\n");
        println!(
            "| path | requests/s (min–max) | p50 | p99 | proxies' CPU per request | nginx accepts per request | connections counted (web / api) | req/s ÷ plain | p50 ÷ plain | p99 ÷ plain |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for ((route, rounds), sum) in routes.iter().zip(rows).zip(&sums) {
            let c = match sum {
                Ok(c) => c,
                Err(e) => {
                    failed += 1;
                    println!("| {} | FAILED: {e} | | | | | | | | |", route.name());
                    continue;
                }
            };
            let rps: Vec<f64> = rounds.iter().flatten().map(|c| c.rps).collect();
            let spread = if rps.len() > 1 {
                format!(
                    " ({:.0}–{:.0})",
                    rps.iter().copied().fold(f64::INFINITY, f64::min),
                    rps.iter().copied().fold(0.0, f64::max)
                )
            } else {
                String::new()
            };
            let p = plain.unwrap_or_default();
            println!(
                "| {} | {:.0}{spread} | {} | {} | {:.1} µs | {:.2} | {:.0} / {:.0} | {} | {} | {} |",
                route.name(),
                c.rps,
                ms(c.p50_us),
                ms(c.p99_us),
                c.cpu_us,
                c.accepts,
                c.seen[0],
                c.seen[1],
                ratio(c.rps, p.rps),
                ratio(c.p50_us, p.p50_us),
                ratio(c.p99_us, p.p99_us),
            );
        }
        println!(
            "\ntransparent ÷ explicit (`{scenario}`, {} connections{}):\n",
            load.conns,
            if load.close { ", one per request" } else { "" }
        );
        println!("| api's protocol | requests/s | p50 | p99 | proxies' CPU per request |");
        println!("|---|---|---|---|---|");
        for p in &PROTOCOLS {
            let find = |mode: Mode| {
                routes
                    .iter()
                    .position(|r| r.mode == mode && r.protocol.is_some_and(|q| q.name == p.name))
                    .and_then(|i| sums[i].clone().ok())
            };
            let (Some(e), Some(t)) = (find(Mode::Explicit), find(Mode::Transparent)) else {
                println!("| {} | – | – | – | – |", p.name);
                continue;
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                p.name,
                ratio(t.rps, e.rps),
                ratio(t.p50_us, e.p50_us),
                ratio(t.p99_us, e.p99_us),
                ratio(t.cpu_us, e.cpu_us),
            );
        }
    }
    assert!(failed == 0, "{failed} row(s) failed");
}
