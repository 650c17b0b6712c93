//! Independent clients against the real `meshid-agent` and `meshid-ca`: py-spiffe (PyPI
//! `spiffe`, on gRPC C-core) as a workload uses it, the C-core stubs, hyper-h2 (an independent
//! HTTP/2 stack and HPACK encoder) and grpc-js (npm, on Node's nghttp2) with every
//! `:authority` form, and `cryptography` and PyJWT as independent verifiers of what they
//! receive. The checks themselves are in `tests/interop/workload_api.py` and
//! `tests/interop/grpc_js.js`; each prints `ok NAME` or `FAIL NAME: DETAIL`, and this test
//! fails with the whole list if any did.
//!
//! The Python environment comes from `MESHID_INTEROP_PYTHON`, or `target/interop-venv`, and
//! grpc-js from `tests/interop/node_modules` (both made by `.ci/run`). Without them the test
//! says SKIPPED, except under `MESHID_CI=1`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshid_tests::{uid, Agent, Ca};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/workload_api.py");

/// The Python interpreter with py-spiffe, hyper-h2, PyJWT, cryptography and grpcio.
fn python() -> Option<PathBuf> {
    meshid_tests::interop_python("spiffe, h2, jwt, cryptography, grpc")
}

const JS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop");

/// Node.js with `tests/interop/node_modules` (grpc-js; `npm ci --prefix tests/interop`, which
/// `.ci/run` does); `None` (after saying SKIPPED) when missing and this is not CI.
fn node() -> Option<PathBuf> {
    let installed = Path::new(JS_DIR)
        .join("node_modules/@grpc/grpc-js")
        .is_dir();
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if installed && node {
        return Some(PathBuf::from("node"));
    }
    let why = "grpc-js needs node and `npm ci --prefix tests/interop` (run .ci/run)";
    assert!(std::env::var_os("MESHID_CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

fn run_node(node: &Path, title: &str, args: &[&str]) -> Run {
    let out = Command::new(node)
        .arg(Path::new(JS_DIR).join("grpc_js.js"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    collect(title, &out)
}

/// The lines a checker printed.
fn collect(title: &str, out: &std::process::Output) -> Run {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("--- {title}\n{stdout}");
    Run {
        title: title.to_owned(),
        lines: stdout.lines().map(str::to_owned).collect(),
        success: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn is_root() -> bool {
    uid() == 0
}

/// The `ok`/`FAIL` lines of one run of the script, and whether it exited 0.
struct Run {
    title: String,
    lines: Vec<String>,
    success: bool,
    stderr: String,
}

impl Run {
    fn failures(&self) -> Vec<String> {
        let mut f: Vec<String> = self
            .lines
            .iter()
            .filter(|l| l.starts_with("FAIL"))
            .map(|l| format!("{}: {l}", self.title))
            .collect();
        if !self.success && f.is_empty() {
            f.push(format!(
                "{}: exited non-zero without a FAIL line:\n{}",
                self.title, self.stderr
            ));
        }
        if self.lines.iter().all(|l| !l.starts_with("ok")) && f.is_empty() {
            f.push(format!("{}: no check ran", self.title));
        }
        f
    }
}

fn run(python: &Path, title: &str, args: &[&str], as_nobody: bool) -> Run {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.arg(python);
        c
    } else {
        Command::new(python)
    };
    let out = cmd
        .arg(SCRIPT)
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    collect(title, &out)
}

fn create_entry(ca: &Ca, id: &str, spiffe_id: &str, parent: &str, hint: &str) {
    let more = ["--x509-ttl", "8s", "--jwt-ttl", "6s", "--hint", hint];
    ca.entry_for_this_uid(id, spiffe_id, parent, &more);
}

/// Waits until the agent serves both entries to this process (through the Rust client).
fn wait_for_svids(agent: &Agent, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    loop {
        let got = rt.block_on(async {
            let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
                .await
                .ok()?;
            client
                .fetch_x509_context()
                .await
                .ok()
                .map(|c| c.svids().len())
        });
        if got == Some(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never served {count} SVIDs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn independent_clients_get_the_whole_workload_api_contract() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::start(dir.path(), &[]);
    let (token, agent_id) = ca.join_token();
    let agent = Agent::start(dir.path(), &ca, &token);
    let socket = agent.socket.display().to_string();

    // Two identities for this process. As SPIRE's agent does, the agent lists them by entry
    // id, so the default (the first) is `a-default`, although it was created last.
    create_entry(
        &ca,
        "b-other",
        "spiffe://example.org/py/second",
        &agent_id,
        "second",
    );
    create_entry(
        &ca,
        "a-default",
        "spiffe://example.org/py/first",
        &agent_id,
        "first",
    );
    wait_for_svids(&agent, 2);

    let spec = serde_json::json!({
        "trust_domain": "example.org",
        "ids": ["spiffe://example.org/py/first", "spiffe://example.org/py/second"],
        "hints": ["first", "second"],
        // 8 s SVIDs rotate at about half their life.
        "rotation_within_s": 12,
    })
    .to_string();
    let mut runs = vec![
        run(
            &python,
            "py-spiffe contract",
            &["check", &socket, &spec],
            false,
        ),
        run(
            &python,
            "C-core :authority forms, agent",
            &["authority", &socket, "agent"],
            false,
        ),
        run(
            &python,
            "hyper-h2, agent",
            &["raw", &socket, "agent"],
            false,
        ),
    ];
    let admin = ca.socket.display().to_string();
    runs.push(run(
        &python,
        "C-core :authority forms, CA admin",
        &["authority", &admin, "admin"],
        false,
    ));
    runs.push(run(
        &python,
        "hyper-h2, CA admin",
        &["raw", &admin, "admin"],
        false,
    ));
    if let Some(node) = node() {
        let proto = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ca/api/proto/workload.proto"
        );
        runs.push(run_node(
            &node,
            "grpc-js, agent",
            &[&socket, "agent", proto],
        ));
        runs.push(run_node(&node, "grpc-js, CA admin", &[&admin, "admin"]));
    }
    if is_root() {
        let id = "spiffe://example.org/py/first";
        let jwt = ca.ok(&["jwt", "mint", "--spiffe-id", id, "--audience", "billing"]);
        let args = ["denied", &socket, jwt.trim(), id];
        runs.push(run(&python, "another uid (nobody)", &args, true));
    } else {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "the PermissionDenied case needs root (setpriv)"
        );
        eprintln!("SKIPPED: the PermissionDenied case needs root to run a client as another uid");
    }

    // The identity goes away under an open stream.
    let mut child = Command::new(&python)
        .args([SCRIPT, "withdraw", &socket])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let line = line.trim_end().to_owned();
        let streaming = line == "streaming";
        lines.push(line);
        if streaming {
            ca.ok(&["entry", "delete", "a-default"]);
            ca.ok(&["entry", "delete", "b-other"]);
            child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        }
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    eprintln!("--- identity withdrawn\n{}", lines.join("\n"));
    lines.retain(|l| l != "streaming");
    runs.push(Run {
        title: "identity withdrawn".into(),
        lines,
        success: status.success(),
        stderr,
    });

    let failures: Vec<String> = runs.iter().flat_map(Run::failures).collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}\n\nagent log:\n{}",
        failures.len(),
        failures.join("\n"),
        agent
            .proc
            .log_text()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Every gRPC server on a Unix socket goes through `meshid_api::uds::incoming` (so that it
/// accepts any `:authority`): no server code hands a Unix listener to tonic directly.
#[test]
fn every_unix_socket_server_accepts_any_authority() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut offenders = Vec::new();
    let mut stack = vec![
        root.join("ca/src"),
        root.join("workload-api/src"),
        root.join("proxy/src"),
    ];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                if text.contains("UnixListenerStream") {
                    offenders.push(path.display().to_string());
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "serve Unix sockets through meshid_api::uds::incoming, not UnixListenerStream: {offenders:?}"
    );
}
