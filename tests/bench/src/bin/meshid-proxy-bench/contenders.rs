//! The contenders: each two-hop setup (meshid, haproxy, stunnel) started, checked and probed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshid_tests::{free_port, http_get};

use crate::cli::*;
use crate::measure::*;
use crate::mesh::*;
use crate::pki::*;
use meshid_bench::procs::*;

/// One proxy process of a contender.
pub(crate) struct Hop {
    pub(crate) role: &'static str,
    pub(crate) proc: Guard,
    pub(crate) idle_rss_kib: u64,
    pub(crate) threads: u64,
}

/// A running contender: where the load generator connects, and its hops (none for `direct`).
pub(crate) struct Contender {
    pub(crate) name: &'static str,
    pub(crate) entry_port: u16,
    /// Hop 2's mTLS port (0 for `direct`).
    pub(crate) mtls_port: u16,
    pub(crate) hops: Vec<Hop>,
    /// What `openssl s_client` saw at hop 2 (see [`tls_check`]).
    pub(crate) tls: Option<TlsSeen>,
}

impl Contender {
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.hops.iter().map(|h| h.proc.pid()).collect()
    }

    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        for h in &mut self.hops {
            h.proc.check_alive()?;
        }
        Ok(())
    }

    pub(crate) fn hop(role: &'static str, proc: Guard) -> Hop {
        Hop {
            role,
            proc,
            idle_rss_kib: 0,
            threads: 0,
        }
    }
}

/// Waits (bounded) until `port` listens, failing early if `proc` exits.
pub(crate) fn wait_listening(proc: &mut Guard, port: u16) -> Result<(), String> {
    poll(
        Duration::from_secs(15),
        &format!("{} to listen on {port}", proc.name),
        || {
            proc.check_alive()?;
            Ok(listening(port).then_some(()))
        },
    )
}

/// Starts `program` as hop `role` of contender `name` (its log in `dir/<role>.log`) and waits
/// until it listens on `port`.
fn listening_hop(
    name: &str,
    role: &'static str,
    program: &Path,
    args: &[String],
    dir: &Path,
    port: u16,
) -> Result<Hop, String> {
    let mut proc = Guard::spawn(
        &format!("{name} {role}"),
        program,
        args,
        dir.join(format!("{role}.log")),
        &[],
    )?;
    wait_listening(&mut proc, port)?;
    Ok(Contender::hop(role, proc))
}

pub(crate) fn write_file(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

pub(crate) fn start_haproxy(
    name: &'static str,
    opts: &Opts,
    dir: &Path,
    pki: &Pki,
    backend: u16,
    hop2_http: bool,
    tls: bool,
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
    // `haproxy-plain`: the same two hops without TLS, the relay limit of the others.
    let client_tls = if tls {
        format!(
            " ssl verify required ca-file {} crt {}{reuse}",
            pki.ca.display(),
            pki.combined.display()
        )
    } else {
        String::new()
    };
    let server_tls = if tls {
        format!(
            " ssl crt {} ca-file {} verify required",
            pki.combined.display(),
            pki.ca.display()
        )
    } else {
        String::new()
    };
    let hop1 = format!(
        "{global}
frontend outbound
    bind 127.0.0.1:{p1}
    default_backend hop2
backend hop2
    server hop2 127.0.0.1:{p2}{client_tls}
",
    );
    let mode = if hop2_http { "http" } else { "tcp" };
    let hop2 = format!(
        "{global}
frontend inbound
    mode {mode}
    bind 127.0.0.1:{p2}{server_tls}
    default_backend app
backend app
    mode {mode}
    server app 127.0.0.1:{backend}
",
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
        let args = ["-db".into(), "-f".into(), file.display().to_string()];
        hops.push(listening_hop(
            name,
            role,
            Path::new(HAPROXY),
            &args,
            dir,
            port,
        )?);
    }
    hops.reverse();
    Ok(Contender {
        name,
        entry_port: p1,
        mtls_port: if tls { p2 } else { 0 },
        hops,
        tls: None,
    })
}

pub(crate) fn start_stunnel(
    opts: &Opts,
    dir: &Path,
    pki: &Pki,
    backend: u16,
) -> Result<Contender, String> {
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
        let args = [file.display().to_string()];
        hops.push(listening_hop(
            "stunnel",
            role,
            Path::new(STUNNEL),
            &args,
            dir,
            accept,
        )?);
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

pub(crate) fn start_meshid(
    name: &'static str,
    dir: &Path,
    mesh: &Mesh,
    backend: u16,
    protocol: &str,
    access_log: Option<&Path>,
    worker_threads: usize,
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
worker_threads = {worker_threads}
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

/// nginx's stream module (L4), both hops: hop 1 opens mTLS upstream (verifying the chain and,
/// as nginx always does, a host name: the bench leaf carries one), hop 2 terminates it and
/// requires a client certificate. One process per hop (`master_process off`: its CPU and
/// memory are measured from one pid, as meshid's and stunnel's are), so one worker each.
pub(crate) fn start_nginx_stream(
    opts: &Opts,
    dir: &Path,
    pki: &Pki,
    backend: u16,
) -> Result<Contender, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
    if !Path::new(module).exists() {
        return Err(format!(
            "{module} is missing (apt-get install libnginx-mod-stream)"
        ));
    }
    let (p1, p2) = (free_port(), free_port());
    let reuse = if opts.resumption { "on" } else { "off" };
    let conf = |role: &str, server: &str| {
        format!(
            "load_module {module};
daemon off;
master_process off;
error_log {dir}/{role}-error.log error;
pid {dir}/{role}.pid;
events {{ worker_connections 8192; }}
stream {{
    server {{
{server}
    }}
}}
",
            dir = dir.display(),
        )
    };
    let hop2 = conf(
        "hop2",
        &format!(
            "        listen 127.0.0.1:{p2} ssl;
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites {cs};
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_session_tickets off;
        ssl_session_cache off;
        tcp_nodelay on;
        proxy_pass 127.0.0.1:{backend};",
            cs = opts.ciphersuite,
            chain = pki.chain.display(),
            key = pki.key.display(),
            ca = pki.ca.display(),
        ),
    );
    let hop1 = conf(
        "hop1",
        &format!(
            "        listen 127.0.0.1:{p1};
        tcp_nodelay on;
        proxy_pass 127.0.0.1:{p2};
        proxy_ssl on;
        proxy_ssl_protocols TLSv1.3;
        proxy_ssl_conf_command Ciphersuites {cs};
        proxy_ssl_certificate {chain};
        proxy_ssl_certificate_key {key};
        proxy_ssl_trusted_certificate {ca};
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 3;
        proxy_ssl_name bench.invalid;
        proxy_ssl_session_reuse {reuse};",
            cs = opts.ciphersuite,
            chain = pki.chain.display(),
            key = pki.key.display(),
            ca = pki.ca.display(),
        ),
    );
    let mut hops = Vec::new();
    for (role, cfg, port) in [("hop2", hop2, p2), ("hop1", hop1, p1)] {
        let file = dir.join(format!("{role}.conf"));
        write_file(&file, &cfg)?;
        let args = [
            "-c".into(),
            file.display().to_string(),
            "-p".into(),
            dir.display().to_string(),
        ];
        hops.push(listening_hop(
            "nginx-stream",
            role,
            Path::new(NGINX),
            &args,
            dir,
            port,
        )?);
    }
    hops.reverse();
    Ok(Contender {
        name: "nginx-stream",
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
pub(crate) struct TlsSeen {
    pub(crate) protocol: String,
    pub(crate) cipher: String,
    pub(crate) group: String,
    pub(crate) signature: String,
    pub(crate) rejected_without_cert: bool,
}

pub(crate) fn tls_check(port: u16) -> Result<TlsSeen, String> {
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
        // By an alert, or (nginx's stream module) by closing the connection after the
        // handshake: either way the request got no response.
        rejected_without_cert: text.contains("alert certificate required")
            || text.contains("alert handshake failure")
            || text.contains("alert bad certificate")
            || !text.contains("HTTP/1.1 "),
    })
}

/// One GET through the contender, checked for status and body length; retried for up to 10 s.
pub(crate) fn probe(c: &mut Contender) -> Result<(), String> {
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
