//! Hosts made of network namespaces, for the end-to-end tests and the benchmarks that need
//! separate network stacks (transparent mode's iptables rules, traffic over a real link):
//!
//! ```text
//!             switch namespace "s": bridge br0 with the switch's addresses
//!          ____________|___________ ...
//!         |                       |
//!   <host> namespace        <host> namespace    (eth0, joined to br0 by a veth pair)
//! ```
//!
//! [`Net`] creates them and deletes them when dropped; programs run in a host with
//! `ip netns exec` ([`Net::exec`]). Every namespace has its own loopback, so each host's agent,
//! proxy and CA keep their ops listeners on the same addresses ([`AGENT_OPS`], [`PROXY_OPS`],
//! [`CA_OPS`]); the usual address plan is [`CA_ADDR`] on the switch and [`WEB_ADDR`],
//! [`API_ADDR`] for the hosts. Needs root and `ip` (iproute2); [`missing_prerequisite`] says
//! what is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{bin_dir, metric_value, wait_for, Ca, Proc};

/// The usual plan (`198.18.0.0/24`, from the range set aside for benchmarks, inside the run's
/// own namespaces): the switch's address on the bridge, where a CA runs...
pub const CA_ADDR: &str = "198.18.0.1";
/// ...a host `web`...
pub const WEB_ADDR: &str = "198.18.0.2";
/// ...and a host `api`.
pub const API_ADDR: &str = "198.18.0.3";
/// The CA's node API port.
pub const NODE_PORT: u16 = 8443;
/// The SO_MARK of proxies excluded from their host's rules by mark (`mark` in `[transparent]`).
pub const MARK: u32 = 0x539;
/// The proxy's counter of transparent connections, by `direction` and `result`.
pub const TRANSPARENT: &str = "meshid_proxy_transparent_connections_total";
/// A host's agent's ops address (on the host's own loopback).
pub const AGENT_OPS: &str = "127.0.0.1:15100";
/// A host's proxy's ops address (on the host's own loopback).
pub const PROXY_OPS: &str = "127.0.0.1:15000";
/// A host's CA's ops address (on the host's own loopback).
pub const CA_OPS: &str = "127.0.0.1:15200";

/// Why network-namespace hosts cannot be made here, if they cannot: not root, a program of
/// `tools` (each with an argument that makes it print its version and succeed) missing, or
/// `ip netns add` refused.
pub fn missing_prerequisite(tools: &[(&str, &str)]) -> Option<String> {
    let uid = run_out(Command::new("id").arg("-u"));
    if uid
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        != Some(true)
    {
        return Some("network namespaces need root".into());
    }
    for (tool, arg) in tools {
        if !run_out(Command::new(tool).arg(arg)).is_some_and(|o| o.status.success()) {
            return Some(format!("{tool} is not installed"));
        }
    }
    let probe = format!("mshprobe{}", std::process::id());
    let made = run_out(Command::new("ip").args(["netns", "add", &probe]));
    let _ = run_out(Command::new("ip").args(["netns", "del", &probe]));
    if !made.is_some_and(|o| o.status.success()) {
        return Some("cannot create a network namespace (ip netns add failed)".into());
    }
    None
}

fn run_out(cmd: &mut Command) -> Option<Output> {
    cmd.stdin(Stdio::null()).output().ok()
}

/// Runs `args` and panics with its output unless it succeeds; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives `dev` in `ns` the IPv4 address `v4` (in a /24) and, with `v6_net`, its IPv6 twin
/// (`a.b.c.N` → `<v6_net>N`/64, usable at once: no duplicate address detection).
fn add_addr(ns: &str, dev: &str, v4: &str, v6_net: Option<&str>) {
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{v4}/24"),
        "dev",
        dev,
    ]);
    let Some(v6_net) = v6_net else {
        return;
    };
    let n = v4.rsplit('.').next().unwrap();
    sh(&[
        "ip",
        "-n",
        ns,
        "-6",
        "addr",
        "add",
        &format!("{v6_net}{n}/64"),
        "dev",
        dev,
        "nodad",
    ]);
}

/// The namespaces of one run; deleted on drop (which also removes their veths and rules).
pub struct Net {
    prefix: String,
    names: Vec<String>,
}

impl Net {
    /// The name of `host`'s namespace (`s` is the switch's).
    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// Every namespace of the run, the switch's first (for a cleanup that cannot wait for the
    /// drop, such as a signal handler's: `ip netns del` each).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// A bridge in the switch namespace (`s`) with the addresses `switch`, and one namespace
    /// per `(host, address)` of `hosts` joined to it by a veth pair (`v<host>` on the switch's
    /// side, `eth0` on the host's). Addresses are IPv4 in one /24. With `v6_net` (such as
    /// `fd00:198:18::`), the first of `switch` and every host's address also get their IPv6
    /// twins in that /64; the further addresses of `switch` stay IPv4 only.
    pub fn create(switch: &[&str], hosts: &[(&str, &str)], v6_net: Option<&str>) -> Net {
        // Tests of one binary run at once: each set of namespaces has its own prefix.
        static SETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let set = SETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut net = Net {
            prefix: format!("msh{}n{set}", std::process::id()),
            names: Vec::new(),
        };
        let sw = net.ns("s");
        sh(&["ip", "netns", "add", &sw]);
        net.names.push(sw.clone());
        sh(&["ip", "-n", &sw, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        for (i, addr) in switch.iter().enumerate() {
            add_addr(&sw, "br0", addr, v6_net.filter(|_| i == 0));
        }
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for (host, addr) in hosts {
            let ns = net.ns(host);
            sh(&["ip", "netns", "add", &ns]);
            net.names.push(ns.clone());
            let veth = format!("v{host}");
            sh(&[
                "ip", "-n", &sw, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            sh(&["ip", "-n", &sw, "link", "set", &veth, "master", "br0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            add_addr(&ns, "eth0", addr, v6_net);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// `ip netns exec <host's namespace> program args...`.
    pub fn exec(&self, host: &str, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)])
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs a command in `host` and returns its output (bounded by the command itself).
    pub fn output(&self, host: &str, program: &str, args: &[&str]) -> Output {
        self.exec(host, Path::new(program), args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `curl` in `host`: (HTTP status, body); status 0 when no HTTP response came.
    pub fn curl(&self, host: &str, url: &str) -> (u16, String) {
        let out = self.output(
            host,
            "curl",
            &["-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}", url],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The proxy metrics of `host` (its ops listener on [`PROXY_OPS`]).
    pub fn metrics(&self, host: &str) -> String {
        let out = self.output(
            host,
            "curl",
            &["-sS", "-m", "5", &format!("http://{PROXY_OPS}/metrics")],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One series of `host`'s proxy metrics, summed over the series that carry `labels`.
    pub fn metric(&self, host: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics(host), name, labels)
    }

    /// `iptables -t nat -S` in `host`.
    pub fn nat_rules(&self, host: &str) -> String {
        String::from_utf8_lossy(&self.output(host, "iptables", &["-t", "nat", "-S"]).stdout)
            .into_owned()
    }

    /// `ip6tables -t nat -S` in `host`.
    pub fn nat6_rules(&self, host: &str) -> String {
        String::from_utf8_lossy(&self.output(host, "ip6tables", &["-t", "nat", "-S"]).stdout)
            .into_owned()
    }

    /// Starts `cmd` (meshid-ca, meshid-agent or meshid-proxy in `host`), logging to
    /// `dir/<host>-<bin>.log`, and waits until `<bin> healthcheck --ops-address <ops>` in `host`
    /// succeeds.
    pub fn spawn_ready(&self, dir: &Path, host: &str, bin: &str, cmd: Command, ops: &str) -> Proc {
        let mut proc = Proc::spawn(
            &format!("{bin} {host}"),
            cmd,
            dir.join(format!("{host}-{bin}.log")),
        );
        let mut tries = 0;
        wait_for(
            Duration::from_secs(30),
            &format!("{bin} on {host} to become ready"),
            || {
                tries += 1;
                if tries % 10 == 0 {
                    proc.check_alive();
                }
                let out = self.output(
                    host,
                    &bin_dir().join(bin).display().to_string(),
                    &["healthcheck", "--ops-address", ops],
                );
                out.status.success().then_some(())
            },
        );
        proc
    }

    /// Starts a CA of trust domain `td` in `host`, its data in `dir/ca`, its node API on
    /// `node_address` and its ops listener on [`CA_OPS`]; `extra` are more `run` flags.
    pub fn start_ca(
        &self,
        dir: &Path,
        host: &str,
        td: &str,
        node_address: &str,
        extra: &[&str],
    ) -> Ca {
        let data = dir.join("ca").display().to_string();
        let mut args = vec![
            "run",
            "--trust-domain",
            td,
            "--data-dir",
            &data,
            "--ops-address",
            CA_OPS,
            "--node-address",
            node_address,
        ];
        args.extend_from_slice(extra);
        let cmd = self.exec(host, &bin_dir().join("meshid-ca"), &args);
        let proc = self.spawn_ready(dir, host, "meshid-ca", cmd, CA_OPS);
        Ca::attach_domain(proc, dir, td)
    }

    /// Starts an agent in `host` of trust domain `td` against the CA at `server`, trusting
    /// `bundle`, attesting with `token`, its files under `dir/<host>`; returns it and its socket.
    pub fn spawn_agent(
        &self,
        dir: &Path,
        host: &str,
        (td, server): (&str, &str),
        bundle: &Path,
        token: &str,
    ) -> (Proc, PathBuf) {
        let hdir = dir.join(host);
        std::fs::create_dir_all(hdir.join("agent")).unwrap();
        let socket = hdir.join("agent/api.sock");
        let cmd = self.exec(
            host,
            &bin_dir().join("meshid-agent"),
            &[
                "run",
                "--trust-domain",
                td,
                "--server-address",
                server,
                "--trust-bundle",
                &bundle.display().to_string(),
                "--data-dir",
                &hdir.join("agent-data").display().to_string(),
                "--socket-path",
                &socket.display().to_string(),
                "--ops-address",
                AGENT_OPS,
                "--join-token",
                token,
            ],
        );
        let agent = self.spawn_ready(dir, host, "meshid-agent", cmd, AGENT_OPS);
        (agent, socket)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .output();
        }
    }
}
