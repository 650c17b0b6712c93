//! `deploy/quickstart.sh` end to end, as a newcomer and CI run it: the script with the
//! workspace's binaries (`MESHID_BIN_DIR`), a temporary data directory and free ports.
//!
//! - `quickstart_once`: `--once --trust` exits 0 after showing the allowed call (web → api,
//!   200 from api) and the refused one (api → web, 403) with its reason: the proxy's `refused by
//!   policy` line, the access record of the rule that decided, and `policy explain`; then the
//!   trust lifecycle under the running mesh: `ca taint` of the issuing intermediate (every SVID
//!   it signed replaced, the proxies rotated, web still reaches api), `svid revoke` of api's
//!   SVID (web's proxy holds the CRL, api's proxy is re-issued, web still reaches api) and a
//!   root rotation up to activation (web still reaches api). The access logs it leaves agree, and nothing it
//!   started is still running.
//! - `quickstart_ctrl_c`: without `--once`, once it says "Press Ctrl-C" the mesh answers, a
//!   policy edit (the next step it prints) lets api call web within moments, and SIGINT to its
//!   process group, as a terminal sends on Ctrl-C, stops everything it started promptly: no
//!   process left in the group, none of the recorded pids alive, every port free again.
//! - `quickstart_sigterm`: SIGTERM to the script alone (the others get no signal) stops
//!   everything too, by the script's own cleanup.
//! - `quickstart_failure_midway`: a demo service that cannot start makes the script fail with
//!   that service's log, and stop the CA and agent it had started.
//!
//! The script needs curl: without it these tests skip, except in CI (`MESHID_CI`), where they
//! fail. Each test keeps the script in its own process group and kills the whole group when dropped,
//! so a failing test leaves nothing running.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use meshid_tests::{bin_dir, free_port, http_get};
use serde_json::Value;

/// How long the script gets to bring the mesh up (the binaries are already built).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The script's port variables (`MESHID_QUICKSTART_<NAME>_PORT`).
const PORTS: [&str; 12] = [
    "OPS",
    "NODE",
    "CONSOLE",
    "AGENT_OPS",
    "WEB",
    "WEB_INBOUND",
    "WEB_OUTBOUND",
    "WEB_PROXY_OPS",
    "API",
    "API_INBOUND",
    "API_OUTBOUND",
    "API_PROXY_OPS",
];

/// A run of the script in its own process group, killed with the whole group on drop.
struct Quickstart {
    child: Child,
    dir: tempfile::TempDir,
    output: PathBuf,
    ports: Vec<(&'static str, u16)>,
}

impl Quickstart {
    /// Starts the script with `args`, and `env` on top of the test's settings.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Quickstart {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("quickstart.out");
        let mut ports = Vec::new();
        let mut seen = BTreeSet::new();
        for name in PORTS {
            let port = loop {
                let p = free_port();
                if seen.insert(p) {
                    break p;
                }
            };
            ports.push((name, port));
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/quickstart.sh");
        // A shell cannot trap a signal that was ignored when it started (as it is for
        // background jobs of a non-interactive shell): give the script a default SIGINT.
        let mut cmd = if sigint_ignored() {
            let mut c = Command::new("env");
            c.args(["--default-signal=INT", "bash", script]);
            c
        } else {
            let mut c = Command::new("bash");
            c.arg(script);
            c
        };
        let out = File::create(&output).unwrap();
        cmd.args(args)
            .env("MESHID_BIN_DIR", bin_dir())
            .env("MESHID_DEMO_BIN", env!("CARGO_BIN_EXE_meshid-demo"))
            .env("MESHID_QUICKSTART_DIR", dir.path().join("mesh"))
            .env_remove("MESHID_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        for (name, port) in &ports {
            cmd.env(format!("MESHID_QUICKSTART_{name}_PORT"), port.to_string());
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().unwrap();
        Quickstart {
            child,
            dir,
            output,
            ports,
        }
    }

    /// The script's data directory.
    fn mesh(&self) -> PathBuf {
        self.dir.path().join("mesh")
    }

    fn addr(&self, name: &str) -> String {
        let port = self.ports.iter().find(|(n, _)| *n == name).unwrap().1;
        format!("127.0.0.1:{port}")
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// The process group: the script's pid.
    fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the script to exit; on timeout kills the group and panics with the output.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill_group();
                panic!(
                    "quickstart.sh still running after {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the output contains `text`, failing early if the script exits.
    fn wait_for_output(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "quickstart.sh exited ({status}) before {text:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} after {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to the whole process group, as a terminal does on Ctrl-C.
    fn signal_group(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{}", self.pgid())])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} the group");
    }

    /// Sends `signal` to the script alone, as `kill PID` does.
    fn signal_script(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pgid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} the script");
    }

    fn kill_group(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pgid())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the script started is gone: nothing left in its process group, none of the
    /// pids it recorded (`expected`, by name) alive, no process naming its directory, and no
    /// listener on any of its ports.
    fn assert_nothing_left(&self, expected: &[&str]) {
        let pids = std::fs::read_to_string(self.mesh().join("pids")).unwrap();
        let recorded: Vec<(u32, String)> = pids
            .lines()
            .map(|l| {
                let (pid, name) = l.split_once(' ').unwrap();
                (pid.parse().unwrap(), name.to_owned())
            })
            .collect();
        let names: BTreeSet<&str> = recorded.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            expected.iter().copied().collect(),
            "the pids file records every process"
        );
        let mesh = self.mesh().display().to_string();
        // Children that have just exited may take a moment to be reaped by init.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left = Vec::new();
            for (pid, stat, cmdline) in processes() {
                let in_group = stat_field(&stat, 5) == Some(self.pgid().to_string());
                let recorded = recorded.iter().any(|(p, _)| *p == pid);
                if in_group || recorded || cmdline.contains(&mesh) {
                    left.push(format!("{pid} {cmdline}"));
                }
            }
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes still running after the quickstart ended: {left:#?}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Nothing listens on its ports any more. (Not "the port can be bound": once released,
        // a port may be some other test's ephemeral client port.)
        let listening = listening_ports();
        for (name, port) in &self.ports {
            assert!(
                !listening.contains(port),
                "port {port} ({name}) still has a listener"
            );
        }
    }

    /// The JSON records of an access log in the data directory.
    fn access_records(&self, file: &str) -> Vec<Value> {
        std::fs::read_to_string(self.mesh().join("logs").join(file))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// True (after saying so) when curl, which the script needs, is missing; outside CI only.
fn skip_without_curl() -> bool {
    let ok = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return false;
    }
    let msg = "SKIPPED quickstart: curl is not installed (Debian: apt-get install curl)";
    assert!(
        std::env::var_os("MESHID_CI").is_none(),
        "{msg}; CI must run it"
    );
    eprintln!("{msg}");
    true
}

/// Whether this process ignores SIGINT (and so would the script it starts).
fn sigint_ignored() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << (2 - 1)) != 0
}

/// The local ports of every listening TCP socket.
fn listening_ports() -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; st 0A is LISTEN.
            if fields.get(3) == Some(&"0A") {
                let port = fields[1].rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// Live processes (zombies excluded): pid, the text of `/proc/PID/stat`, the command line.
fn processes() -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat_field(&stat, 3).as_deref() == Some("Z") {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, stat, cmdline));
    }
    out
}

/// Field `n` of a `/proc/PID/stat` line, numbered as in proc(5) (3 the state, 5 the process
/// group); `n` from 3.
fn stat_field(stat: &str, n: usize) -> Option<String> {
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(n.checked_sub(3)?).map(str::to_owned)
}

/// Everything a successful start runs, as the script names them.
const ALL: [&str; 6] = [
    "meshid-ca",
    "meshid-agent",
    "web",
    "api",
    "web-proxy",
    "api-proxy",
];

fn find<'a>(records: &'a [Value], want: &[(&str, &str)]) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| want.iter().all(|(k, v)| r[*k].as_str() == Some(*v)))
}

fn assert_contains(output: &str, wants: &[&str]) {
    for want in wants {
        assert!(output.contains(want), "no {want:?} in:\n{output}");
    }
}

#[test]
fn quickstart_once() {
    if skip_without_curl() {
        return;
    }
    let mut qs = Quickstart::start(&["--once", "--trust"], &[]);
    let started = Instant::now();
    let status = qs.wait(START_TIMEOUT);
    let output = qs.output();
    assert!(status.success(), "quickstart.sh --once: {status}\n{output}");
    eprintln!("quickstart.sh --once took {:?}", started.elapsed());

    assert_contains(
        &output,
        &[
            "==> CA for spiffe://example.org is up",
            "==> console: http://127.0.0.1:",
            "==> agent is up",
            "/bin/web-proxy",
            "/bin/api-proxy",
            "==> services and proxies are up",
            // The allowed call reached api through both proxies.
            "==> web calls api",
            "    200 hello from api (GET /hello)",
            // The refused one, and why.
            "==> api calls web",
            "    403 refused by web's proxy",
            "refused by policy listener=web caller=spiffe://example.org/api port=8080 policy=\"quickstart\" rule=\"<default>\"",
            "\"decision\":\"deny\"",
            "decision: deny (the default)",
            "web-calls-api (line",
            "no match: from differs",
            "SPIFFE ID: spiffe://example.org/cli",
            // --trust: a taint, every SVID it signed replaced, no outage.
            "==> suspecting a leaked key: meshid-ca ca taint int-",
            "Tainted x509_intermediate int-",
            ": nothing it signed is left",
            "web's proxy rotated its SVID",
            "    web calls api: 200",
            // --trust: a revocation, the CRL at web's proxy, api re-issued, no outage.
            "==> revoking api's SVID: meshid-ca svid revoke --spiffe-id spiffe://example.org/api",
            "    Revoked spiffe://example.org/api serial ",
            "The CRLs are on their way",
            "revoked certificate(s) and closed its connections to them; api's proxy has a fresh SVID",
            "revoked certificates not yet expired",
            "CRL of int-",
            "    the CA measured it: every workload stream had the CRLs ",
            // A root rotation, gated on the agent's delivery.
            "==> rotating the root",
            "prepared root root-",
            "1/1 live agents delivered",
            "activated root root-",
            "    web calls api: 200 (both roots trusted",
            "Phase        : activated",
            "==> done (--once)",
            "==> stopped 6 processes",
        ],
    );
    if Command::new("openssl").arg("version").output().is_ok() {
        assert_contains(
            &output,
            &["openssl verify: svid.0.pem: OK", "openssl crl: issuer="],
        );
    }
    assert!(!output.contains("Press Ctrl-C"), "--once does not wait");

    // The access logs say the same: api's proxy allowed web by rule web-calls-api, web's
    // proxy refused api by the policy's default.
    let api = qs.access_records("api-access.log");
    let allowed = find(&api, &[("direction", "inbound"), ("decision", "allow")])
        .unwrap_or_else(|| panic!("no allow record in api's access log: {api:#?}"));
    assert_eq!(allowed["caller"], "spiffe://example.org/web");
    assert_eq!(allowed["callee"], "spiffe://example.org/api");
    assert_eq!(allowed["rule"], "web-calls-api");
    assert_eq!(allowed["path"], "/hello");
    assert_eq!(allowed["status"], 200);
    let web = qs.access_records("web-access.log");
    let refused = find(&web, &[("direction", "inbound"), ("decision", "deny")])
        .unwrap_or_else(|| panic!("no deny record in web's access log: {web:#?}"));
    assert_eq!(refused["caller"], "spiffe://example.org/api");
    assert_eq!(refused["callee"], "spiffe://example.org/web");
    assert_eq!(refused["rule"], "<default>");
    assert_eq!(refused["policy"], "quickstart");
    assert_eq!(refused["status"], 403);
    assert!(
        find(&web, &[("decision", "allow"), ("direction", "inbound")]).is_none(),
        "web allowed nothing: {web:#?}"
    );

    qs.assert_nothing_left(&ALL);
}

#[test]
fn quickstart_ctrl_c() {
    if skip_without_curl() {
        return;
    }
    let mut qs = Quickstart::start(&[], &[]);
    let started = Instant::now();
    qs.wait_for_output("Press Ctrl-C", START_TIMEOUT);
    eprintln!("the mesh was up after {:?}", started.elapsed());
    let output = qs.output();
    assert_contains(
        &output,
        &[
            "    200 hello from api (GET /hello)",
            "    403 refused by web's proxy",
            "The mesh keeps running",
            "api fetch x509 -s",
            "api watch -s",
            "/metrics",
        ],
    );
    assert!(!output.contains("==> stopped"), "still running");

    // The mesh works while the script waits, as the printed next steps say.
    let (web_out, api_out) = (qs.addr("WEB_OUTBOUND"), qs.addr("API_OUTBOUND"));
    assert_eq!(
        http_get(&web_out, "/hello"),
        Some((200, "hello from api (GET /hello)\n".to_owned())),
        "web -> api"
    );
    assert_eq!(
        http_get(&web_out, "/admin").map(|r| r.0),
        Some(403),
        "web -> api /admin"
    );
    assert_eq!(
        http_get(&api_out, "/hello").map(|r| r.0),
        Some(403),
        "api -> web"
    );

    // Uncommenting the api-calls-web rule lets api call web, without a restart.
    let policy = qs.mesh().join("policy.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let (head, tail) = text.split_once("  # - name: api-calls-web").unwrap();
    let tail = format!("  # - name: api-calls-web{tail}").replace("\n  # ", "\n  ");
    let edited = format!("{head}{}", tail.replacen("  # ", "  ", 1));
    assert!(
        edited.contains("\n  - name: api-calls-web\n    from: [\"spiffe://example.org/api\"]"),
        "{edited}"
    );
    std::fs::write(&policy, edited).unwrap();
    let edited_at = Instant::now();
    loop {
        match http_get(&api_out, "/hello") {
            Some((200, body)) => {
                assert_eq!(body, "hello from web (GET /hello)\n");
                break;
            }
            other => assert!(
                edited_at.elapsed() < Duration::from_secs(5),
                "api -> web after the policy edit: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("the policy edit applied after {:?}", edited_at.elapsed());

    // Every port has its listener now (and so the check after Ctrl-C means something).
    let listening = listening_ports();
    for (name, port) in &qs.ports {
        assert!(
            listening.contains(port),
            "nothing listens on {port} ({name})"
        );
    }

    // Ctrl-C: SIGINT to the whole foreground process group.
    qs.signal_group("INT");
    let stopping = Instant::now();
    let status = qs.wait(Duration::from_secs(20));
    eprintln!(
        "quickstart.sh exited {status} {:?} after SIGINT",
        stopping.elapsed()
    );
    let output = qs.output();
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after Ctrl-C\n{output}"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped promptly\n{output}"
    );
    assert_contains(&output, &["==> stopped 6 processes"]);
    assert!(!output.contains("exited unexpectedly"), "{output}");
    qs.assert_nothing_left(&ALL);
}

#[test]
fn quickstart_sigterm() {
    if skip_without_curl() {
        return;
    }
    // SIGTERM to the script alone (a service manager, `kill PID`): the processes it started
    // get no signal themselves, so the script's cleanup is what stops them.
    let mut qs = Quickstart::start(&[], &[]);
    qs.wait_for_output("Press Ctrl-C", START_TIMEOUT);
    assert_eq!(
        http_get(&qs.addr("WEB_OUTBOUND"), "/hello").map(|r| r.0),
        Some(200),
        "web -> api"
    );
    qs.signal_script("TERM");
    let stopping = Instant::now();
    let status = qs.wait(Duration::from_secs(20));
    let output = qs.output();
    eprintln!(
        "quickstart.sh exited {status} {:?} after SIGTERM",
        stopping.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(143),
        "exit status after SIGTERM\n{output}"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped promptly\n{output}"
    );
    assert_contains(&output, &["==> stopped 6 processes"]);
    qs.assert_nothing_left(&ALL);
}

#[test]
fn quickstart_failure_midway() {
    if skip_without_curl() {
        return;
    }
    // A demo service that cannot start: the script says which, shows its log, and stops the CA
    // and the agent it had already started.
    let mut qs = Quickstart::start(&["--once"], &[("MESHID_DEMO_BIN", "/bin/false")]);
    let status = qs.wait(START_TIMEOUT);
    let output = qs.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert_contains(
        &output,
        &[
            "==> agent is up",
            "quickstart: web exited",
            "---- last lines of ",
            "==> stopped 3 processes",
        ],
    );
    assert!(
        !output.contains("==> services and proxies are up"),
        "{output}"
    );
    qs.assert_nothing_left(&["meshid-ca", "meshid-agent", "web"]);
}
