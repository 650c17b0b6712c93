//! Harness for meshid's end-to-end tests: starts the real `meshid-ca` and `meshid-agent`
//! binaries as child processes in a temporary directory, talks to them as operators and
//! workloads do, and kills them when dropped, so a failing test leaves nothing running.
//! [`netns`] makes hosts out of network namespaces (transparent mode, traffic over a link) and
//! [`pg`] a private PostgreSQL cluster. Used by the benchmarks (`tests/bench`) too.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod netns;
pub mod pg;

/// A private PostgreSQL cluster for one test (stopped when dropped), or `None` after saying
/// SKIPPED when this machine has no PostgreSQL binaries (a failure under `CI` or `MESHID_CI`:
/// CI must not skip silently).
pub fn postgres_cluster() -> Option<pg::Cluster> {
    postgres_cluster_with("")
}

/// [`postgres_cluster`] with more server options (`-c name=value ...`).
pub fn postgres_cluster_with(more_options: &str) -> Option<pg::Cluster> {
    match pg::start_cluster_with(more_options) {
        Ok(c) => Some(c),
        Err(pg::Unavailable::NoBinaries) => {
            let ci = std::env::var_os("CI").is_some() || std::env::var_os("MESHID_CI").is_some();
            assert!(
                !ci,
                "PostgreSQL tests cannot run: no initdb found (CI is set)"
            );
            eprintln!("SKIPPED: no PostgreSQL binaries (initdb) found");
            None
        }
        Err(pg::Unavailable::Failed(why)) => panic!("cannot start PostgreSQL: {why}"),
    }
}

/// The directory holding the workspace's binaries (built on first use when any of them is
/// missing or older than a source it is built from, so the tests always run the current code).
/// It is the directory of the running executable, or its parent when that is `deps` (test
/// binaries live in `target/<profile>/deps`); from a `release` directory the binaries are built
/// with `--release`. Set `MESHID_NO_BUILD=1` to use the binaries as they are.
///
/// The freshness check matters beyond speed: `cargo test --workspace --all-targets` has just
/// built the binaries with the features every target of the workspace unifies (dev-dependencies
/// included), and a `cargo build -p …` of the three packages resolves fewer features, so it
/// would compile a second copy of rustls and everything above it (CI ran out of disk on that).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let mut dir = exe.parent().unwrap().to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        if std::env::var_os("MESHID_NO_BUILD").is_some() {
            return dir;
        }
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if binaries_are_fresh(&dir, root) {
            return dir;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet"]);
        for package in BIN_PACKAGES {
            cmd.args(["-p", package]);
        }
        cmd.arg("--bins");
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(root).status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    })
}

/// The packages whose binaries the tests run.
const BIN_PACKAGES: [&str; 3] = ["meshid-ca", "meshid-agent", "meshid-proxy"];

/// Whether `meshid-ca`, `meshid-agent` and `meshid-proxy` in `dir` are all newer than every
/// file they are built from: the sources under `ca/`, `workload-api/` and `proxy/` (fuzz
/// targets aside) and the workspace's `Cargo.toml` and `Cargo.lock`.
fn binaries_are_fresh(dir: &Path, root: &Path) -> bool {
    let built = BIN_PACKAGES
        .iter()
        .map(|b| {
            std::fs::metadata(dir.join(b))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect::<Option<Vec<_>>>();
    let Some(oldest) = built.and_then(|t| t.into_iter().min()) else {
        return false;
    };
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let mut pending: Vec<PathBuf> = ["ca", "workload-api", "proxy", "Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|p| root.join(p))
        .collect();
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return false;
        };
        if meta.is_dir() {
            let skip = path
                .file_name()
                .is_some_and(|n| n == "fuzz" || n == "target");
            if skip {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&path) else {
                return false;
            };
            pending.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
        if let Ok(modified) = meta.modified() {
            newest = newest.max(modified);
        }
    }
    newest < oldest
}

static CHILD_LOG: OnceLock<String> = OnceLock::new();

/// Sets the `MESHID_LOG` filter of every process started afterwards (default `debug`, which
/// tests want; benchmarks use `info`, as in production). Only the first call has an effect.
pub fn set_child_log_level(filter: &str) {
    let _ = CHILD_LOG.set(filter.to_owned());
}

fn child_log_level() -> &'static str {
    CHILD_LOG.get().map_or("debug", String::as_str)
}

/// The effective uid of this process: what an agent attests it (and its children) by.
pub fn uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// A free TCP port on 127.0.0.1, for a process started later to listen on.
///
/// Taken below the kernel's ephemeral range (32768 and up by default), which `bind(0)` and
/// outgoing connections never use: between choosing a port and a child binding it, the other
/// tests of the binary open connections and listeners all the while, and an ephemeral port may
/// be handed to one of them (CI saw it). Ports are tried in turn, each checked free by binding,
/// from a start that differs per process; none is handed out twice by one process before the
/// 12,000 of the range are used.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const END: u16 = 32_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = FIRST + (std::process::id() % 1000) as u16 * 12;
    let _ = NEXT.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..(END - FIRST) {
        let mut p = NEXT.fetch_add(1, Ordering::Relaxed);
        if p >= END {
            NEXT.store(FIRST + 1, Ordering::Relaxed);
            p = FIRST;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    // Every one taken: an ephemeral port after all.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed on drop; its stderr goes to a log file.
pub struct Proc {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Starts `bin` from the workspace with `args`, logging to `log`.
    pub fn start(name: &str, bin: &str, args: &[String], log: PathBuf) -> Proc {
        let mut cmd = Command::new(bin_dir().join(bin));
        cmd.args(args);
        Proc::spawn(name, cmd, log)
    }

    /// Starts `cmd` (for example a workspace binary wrapped in `ip netns exec`), logging its
    /// stderr to `log`, with the children's `MESHID_LOG` filter.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let bin = format!("{:?}", cmd.get_program());
        let child = cmd
            .env("MESHID_LOG", child_log_level())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        Proc {
            child: Some(child),
            log,
            name: name.to_owned(),
        }
    }

    /// The process id (0 once stopped).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Panics with the log if the process has exited.
    pub fn check_alive(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("{} exited with {status}:\n{}", self.name, self.log_text());
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log_text()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not stop on SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running CA.
pub struct Ca {
    /// The process.
    pub proc: Proc,
    /// Admin socket.
    pub socket: PathBuf,
    /// Node API address.
    pub node_address: String,
    /// Ops address.
    pub ops_address: String,
    dir: PathBuf,
    extra: Vec<String>,
    trust_domain: String,
}

impl Ca {
    /// Starts a CA for example.org with its data under `dir/ca`; `extra` are more `run` flags.
    pub fn start(dir: &Path, extra: &[&str]) -> Ca {
        Self::start_domain(dir, "example.org", extra)
    }

    /// [`Ca::start`] for another trust domain.
    pub fn start_domain(dir: &Path, trust_domain: &str, extra: &[&str]) -> Ca {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // A port from `free_port` may be taken by another test before the CA binds it: then
        // try again with new ones.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let node_address = format!("127.0.0.1:{}", free_port());
            let ops_address = format!("127.0.0.1:{}", free_port());
            let log_before = std::fs::metadata(dir.join("ca.log")).map_or(0, |m| m.len());
            let proc = Self::spawn(dir, trust_domain, &node_address, &ops_address, &extra);
            let mut ca = Ca {
                proc,
                socket: dir.join("ca/admin.sock"),
                node_address,
                ops_address,
                dir: dir.to_owned(),
                extra: extra.clone(),
                trust_domain: trust_domain.to_owned(),
            };
            if ca.wait_healthy_unless_port_taken(log_before) || attempt == 3 {
                return ca;
            }
            eprintln!("a port of the CA was taken meanwhile; starting it again on others");
        }
    }

    /// [`Self::wait_healthy`], except that it returns false if the CA exited because an
    /// address was in use (its log past `log_before` says so).
    fn wait_healthy_unless_port_taken(&mut self, log_before: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ca_healthcheck(&self.ops_address) {
                return true;
            }
            if self.proc.has_exited() {
                let log = std::fs::read(&self.proc.log).unwrap_or_default();
                let new = String::from_utf8_lossy(log.get(log_before as usize..).unwrap_or(&[]));
                if new.contains("Address already in use") {
                    return false;
                }
                self.proc.check_alive();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the CA to become healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Adopts a CA started some other way (for example in a network namespace) with its data
    /// in `dir/ca`, once the caller has seen it ready (its ops address may be reachable only
    /// where it runs). [`Ca::restart`] does not apply to it.
    pub fn attach(proc: Proc, dir: &Path) -> Ca {
        Self::attach_domain(proc, dir, "example.org")
    }

    /// [`Ca::attach`] for a CA of another trust domain.
    pub fn attach_domain(proc: Proc, dir: &Path, trust_domain: &str) -> Ca {
        Ca {
            proc,
            socket: dir.join("ca/admin.sock"),
            node_address: String::new(),
            ops_address: String::new(),
            dir: dir.to_owned(),
            extra: Vec::new(),
            trust_domain: trust_domain.into(),
        }
    }

    fn spawn(dir: &Path, trust_domain: &str, node: &str, ops: &str, extra: &[String]) -> Proc {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--trust-domain".into(),
            trust_domain.into(),
            "--data-dir".into(),
            dir.join("ca").display().to_string(),
            "--ops-address".into(),
            ops.to_owned(),
            "--node-address".into(),
            node.to_owned(),
        ];
        args.extend(extra.iter().cloned());
        Proc::start("meshid-ca", "meshid-ca", &args, dir.join("ca.log"))
    }

    fn wait_healthy(&mut self) {
        let ops = self.ops_address.clone();
        let mut tries = 0;
        wait_for(Duration::from_secs(30), "the CA to become healthy", || {
            tries += 1;
            if tries % 10 == 0 {
                self.proc.check_alive();
            }
            ca_healthcheck(&ops).then_some(())
        });
    }

    /// Replaces the `run` flags [`Ca::restart`] passes (a server restored elsewhere).
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Starts again with the same data, addresses and options (after [`Proc::stop`]).
    pub fn restart(&mut self) {
        self.proc = Self::spawn(
            &self.dir,
            &self.trust_domain,
            &self.node_address,
            &self.ops_address,
            &self.extra,
        );
        self.wait_healthy();
    }

    /// A fresh join token (`token generate`): its secret, and the SPIFFE ID of the agent that
    /// attests with it (the parent of that node's entries).
    pub fn join_token(&self) -> (String, String) {
        let out = self.ok(&["token", "generate"]);
        let field = |prefix: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in `token generate`: {out}"))
                .to_owned()
        };
        (
            field("Token: "),
            format!(
                "spiffe://{}/meshid/agent/join_token/{}",
                self.trust_domain,
                field("Token ID: ")
            ),
        )
    }

    /// Registers `spiffe_id` (entry `id`) for this process's uid on the node whose agent is
    /// `parent`; `more` are further `entry create` flags (`--x509-ttl 1h`, `--hint web`).
    pub fn entry_for_this_uid(&self, id: &str, spiffe_id: &str, parent: &str, more: &[&str]) {
        let selector = format!("unix:uid:{}", uid());
        let mut args = vec![
            "entry",
            "create",
            "--id",
            id,
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent,
            "--selector",
            &selector,
        ];
        args.extend_from_slice(more);
        self.ok(&args);
    }

    /// Runs an operator command; panics on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = ca_cli(&self.socket, args);
        assert!(
            out.status.success(),
            "meshid-ca {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Runs `meshid-ca ARGS --socket SOCKET`.
pub fn ca_cli(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin_dir().join("meshid-ca"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Whether `meshid-ca healthcheck` passes for the CA whose ops listener is `ops`.
pub fn ca_healthcheck(ops: &str) -> bool {
    Command::new(bin_dir().join("meshid-ca"))
        .args(["healthcheck", "--ops-address", ops])
        .stdin(Stdio::null())
        .output()
        .unwrap()
        .status
        .success()
}

/// GET `path` on `addr`; returns the status code and body.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

/// `meshid-agent run` against `ca` for trust domain example.org, without a join token.
pub fn agent_run_args(
    ca: &Ca,
    bundle: &Path,
    data_dir: &Path,
    socket: &Path,
    ops_address: &str,
) -> Vec<String> {
    vec![
        "run".into(),
        "--trust-domain".into(),
        ca.trust_domain.clone(),
        "--server-address".into(),
        ca.node_address.clone(),
        "--trust-bundle".into(),
        bundle.display().to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--socket-path".into(),
        socket.display().to_string(),
        "--ops-address".into(),
        ops_address.to_owned(),
    ]
}

/// Process `pid`'s status line `field` (`VmRSS`, `FDSize`, …): its first number.
fn status_number(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// The accept queue of the TCP listener on `port` (its Send-Q in `ss -ltn`), and what a
/// listener that asked for `asked_for` gets: that or the kernel's `net.core.somaxconn`,
/// whichever is less.
pub fn listen_queue(port: u16, asked_for: u32) -> (u32, u32) {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // `LISTEN  0  4096  127.0.0.1:port  0.0.0.0:*`
    let queue = text
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listener on port {port}: {text:?}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (queue, somaxconn.min(asked_for))
}

/// The size of process `pid`'s descriptor table (`FDSize`).
pub fn fd_table_size(pid: u32) -> u64 {
    status_number(pid, "FDSize")
}

/// VmRSS of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_number(pid, "VmRSS")
}

/// A running agent.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Workload API socket.
    pub socket: PathBuf,
    /// Ops address.
    pub ops_address: String,
    /// Data directory.
    pub data_dir: PathBuf,
}

impl Agent {
    /// Starts an agent against `ca`, attesting with `token`, with its socket in `dir/agent`
    /// (a directory every user may enter, so tests can call it as another uid).
    pub fn start(dir: &Path, ca: &Ca, token: &str) -> Agent {
        Self::start_with(dir, ca, token, &[])
    }

    /// [`Agent::start`] with more `run` flags (`--config FILE` for several CA servers).
    pub fn start_with(dir: &Path, ca: &Ca, token: &str, extra: &[String]) -> Agent {
        use std::os::unix::fs::PermissionsExt;
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, ca.ok(&["bundle", "show"])).unwrap();
        let sock_dir = dir.join("agent");
        std::fs::create_dir_all(&sock_dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ops_address = format!("127.0.0.1:{}", free_port());
        let data_dir = dir.join("agent-data");
        let socket = sock_dir.join("api.sock");
        let mut args = agent_run_args(ca, &bundle, &data_dir, &socket, &ops_address);
        args.extend(["--join-token".into(), token.to_owned()]);
        args.extend(extra.iter().cloned());
        let mut proc = Proc::start("meshid-agent", "meshid-agent", &args, dir.join("agent.log"));
        let ops = ops_address.clone();
        let mut tries = 0;
        wait_for(Duration::from_secs(30), "the agent to become ready", || {
            tries += 1;
            if tries % 10 == 0 {
                proc.check_alive();
            }
            (http_get(&ops, "/readyz")?.0 == 200).then_some(())
        });
        Agent {
            proc,
            socket,
            ops_address,
            data_dir,
        }
    }

    /// Starts the agent again (after [`Proc::stop`]) on the identity in its data directory,
    /// with the bundle file [`Agent::start`] wrote in `dir`, logging to `dir/agent-restarted.log`.
    pub fn restart(&mut self, dir: &Path, ca: &Ca) {
        let args = agent_run_args(
            ca,
            &dir.join("bundle.pem"),
            &self.data_dir,
            &self.socket,
            &self.ops_address,
        );
        self.proc = Proc::start(
            "meshid-agent",
            "meshid-agent",
            &args,
            dir.join("agent-restarted.log"),
        );
        let ops = self.ops_address.clone();
        let proc = &mut self.proc;
        let mut tries = 0;
        wait_for(
            Duration::from_secs(30),
            "the restarted agent to become ready",
            || {
                tries += 1;
                if tries % 10 == 0 {
                    proc.check_alive();
                }
                (http_get(&ops, "/readyz")?.0 == 200).then_some(())
            },
        );
    }

    /// `unix:///...` for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Proc {
    /// Sends `signal` (a name such as `TERM` or `HUP`) without waiting.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; its status, or `None` if it
    /// is still running (it is then left running, and killed on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A running `meshid-proxy run`, its config in `dir/<name>.toml` and its log in
/// `dir/<name>.log`.
pub struct Proxy {
    /// The process.
    pub proc: Proc,
    /// Ops address (`/healthz`, `/readyz`, `/metrics`).
    pub ops_address: String,
    /// The configuration file.
    pub config: PathBuf,
}

impl Proxy {
    /// Starts a proxy with `config` (TOML without `ops_address`, which is added on a free
    /// port). Does not wait for readiness: see [`Proxy::wait_ready`].
    pub fn start(dir: &Path, name: &str, config: &str) -> Proxy {
        let ops_address = format!("127.0.0.1:{}", free_port());
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, format!("ops_address = \"{ops_address}\"\n{config}")).unwrap();
        let args: Vec<String> = vec!["run".into(), "--config".into(), path.display().to_string()];
        let proc = Proc::start(
            &format!("meshid-proxy {name}"),
            "meshid-proxy",
            &args,
            dir.join(format!("{name}.log")),
        );
        Proxy {
            proc,
            ops_address,
            config: path,
        }
    }

    /// The status of `GET /readyz`, `None` if the ops listener does not answer.
    pub fn readyz(&self) -> Option<u16> {
        http_get(&self.ops_address, "/readyz").map(|(code, _)| code)
    }

    /// Waits until `/readyz` answers 200 (panics with the log if the process exits).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let mut tries = 0;
        let ops = self.ops_address.clone();
        let proc = &mut self.proc;
        wait_for(timeout, "the proxy to become ready", || {
            tries += 1;
            if tries % 10 == 0 {
                proc.check_alive();
            }
            (http_get(&ops, "/readyz")?.0 == 200).then_some(())
        });
    }

    /// The Prometheus text of `/metrics` (empty if it cannot be fetched).
    pub fn metrics(&self) -> String {
        match http_get(&self.ops_address, "/metrics") {
            Some((200, body)) => body,
            _ => String::new(),
        }
    }

    /// The sum of the series of metric `name` whose labels include `labels` (0 if none).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics(), name, labels)
    }
}

/// In Prometheus (or OpenMetrics) text, the sum of the samples of metric `name` (the full
/// sample name, such as `meshid_proxy_connections_total`) whose labels include every pair of
/// `labels`; 0 when no series matches.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(inner) = rest.strip_prefix('{') {
            match inner.rsplit_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        let all = labels.iter().all(|(k, v)| {
            label_text
                .split(',')
                .any(|pair| pair.trim() == format!("{k}=\"{v}\""))
        });
        if !all {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            sum += v;
        }
    }
    sum
}

/// The Python interpreter of the independent clients' venv (`target/interop-venv`, made by
/// `.ci/run`; `MESHID_INTEROP_PYTHON` overrides) when it can import every module of
/// `modules` (comma-separated, as in `import a, b`). `None`, after saying SKIPPED, when it
/// cannot and this is not CI; in CI (`MESHID_CI`) that is a failure.
pub fn interop_python(modules: &str) -> Option<PathBuf> {
    let candidate = std::env::var_os("MESHID_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/interop-venv/bin/python3"
            ))
        });
    let usable = Command::new(&candidate)
        .args(["-c", &format!("import {modules}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if usable {
        return Some(candidate);
    }
    let why = format!(
        "no Python that can import {modules} at {} (set MESHID_INTEROP_PYTHON or run .ci/run)",
        candidate.display()
    );
    assert!(std::env::var_os("MESHID_CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}
