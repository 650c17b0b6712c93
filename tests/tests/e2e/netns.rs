//! Transparent mTLS between unmodified programs on three "hosts": network namespaces joined by
//! veth pairs to a bridge, each host with its own agent, transparent proxy (iptables REDIRECT
//! rules installed by `meshid-proxy iptables install`) and program.
//!
//! ```text
//!               switch namespace: bridge 198.18.0.1/24 (+ .100), meshid-ca, a plain server
//!          ____________|______________________________
//!         |                       |                   |
//!   web 198.18.0.2          api 198.18.0.3      intruder 198.18.0.4
//!   agent, proxy, curl      agent, proxy,       agent, proxy, curl
//!                           python3 -m http.server 8000
//! ```
//!
//! `curl http://198.18.0.3:8000/...` from web reaches api's server by its plain address (and
//! by `[fd00:198:18::3]`, through ip6tables and dual-stack listeners); a
//! capture on api's veth shows TLS records and none of the request or response bytes; the
//! intruder's call is refused by api's policy; plaintext from a host without a proxy is
//! refused (strict) and then allowed and counted (permissive); destinations outside the mesh
//! pass through untouched (and the same capture does see their plaintext, which shows the
//! capture check can fail); `iptables uninstall` removes every rule.
//!
//! A second test puts two trust domains on two such hosts (a CA, agent and proxy each) and
//! federates them over the network (`federated_trust_domains_on_separate_hosts`).
//!
//! Needs root, `ip` (iproute2), iptables, tcpdump, curl and python3. Without them the test is
//! skipped with a message, unless `MESHID_CI=1` (set by `.ci/run`), which makes a
//! missing prerequisite a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshid_tests::netns::{
    missing_prerequisite, Net, API_ADDR, CA_ADDR, MARK, NODE_PORT, PROXY_OPS as OPS, TRANSPARENT,
    WEB_ADDR,
};
use meshid_tests::{bin_dir, wait_for, Ca, Proc};

const TD: &str = "spiffe://example.org";
const LEGACY_ADDR: &str = "198.18.0.100";
const INTRUDER_ADDR: &str = "198.18.0.4";
/// The hosts' IPv6 network (unique local addresses, inside the test's own namespaces): host
/// `198.18.0.N` is also `fd00:198:18::N`.
const V6_NET: &str = "fd00:198:18::";
/// api's IPv6 address.
const API_ADDR_V6: &str = "fd00:198:18::3";
/// Dual-stack transparent listeners (web and api): IPv4 arrives IPv4-mapped.
const DUAL_STACK: &str = "outbound_listen = \"[::]:15001\"\ninbound_listen = \"[::]:15006\"";
/// The unprivileged uid of the intruder's proxy.
const PROXY_UID: u32 = 1337;

/// The programs the tests need (besides root).
const TOOLS: [(&str, &str); 5] = [
    ("ip", "-V"),
    ("iptables", "--version"),
    ("tcpdump", "--version"),
    ("curl", "--version"),
    ("python3", "--version"),
];

/// The three hosts' network (and the CA's and the legacy server's addresses on the switch).
fn create_net(hosts: &[(&str, &str)]) -> Net {
    Net::create(&[CA_ADDR, LEGACY_ADDR], hosts, Some(V6_NET))
}

/// A host's agent and proxy.
struct Host {
    proxy: Option<Proc>,
    _agent: Proc,
    config: PathBuf,
}

/// Starts `host`'s agent (attesting with a fresh join token) and returns its SPIFFE ID.
fn start_agent(net: &Net, dir: &Path, ca: &Ca, host: &'static str) -> (Proc, String, PathBuf) {
    let (token, agent_id) = ca.join_token();
    let server = format!("{CA_ADDR}:{NODE_PORT}");
    let (agent, socket) = net.spawn_agent(
        dir,
        host,
        ("example.org", &server),
        &dir.join("bundle.pem"),
        &token,
    );
    (agent, agent_id, socket)
}

/// How a host's iptables rules recognize its proxy's own connections.
#[derive(Clone, Copy)]
enum Exclude {
    /// The proxy runs as root and sets SO_MARK [`MARK`] on its sockets.
    Mark,
    /// The proxy runs as this uid (and sets no mark).
    Uid(u32),
}

fn proxy_config(dir: &Path, host: &str, socket: &Path, exclude: Exclude, extra: &str) -> PathBuf {
    let path = dir.join(format!("{host}.toml"));
    std::fs::write(
        &path,
        format!(
            "workload_api_socket = \"unix://{socket}\"\n\
             ops_address = \"{OPS}\"\n\
             policy_file = \"{policy}\"\n\
             access_log = \"{access}\"\n\
             handshake_timeout = \"3s\"\n\
             [transparent]\n\
             {mark}\n\
             mesh_cidrs = [\"198.18.0.0/28\", \"{V6_NET}/112\"]\n\
             expect = \"{TD}/**\"\n\
             {extra}\n\
             [[transparent.destinations]]\n\
             address = \"{API_ADDR}:8000\"\n\
             expect = \"{TD}/api\"\n\
             [[transparent.destinations]]\n\
             address = \"[{API_ADDR_V6}]:8000\"\n\
             expect = \"{TD}/api\"\n",
            socket = socket.display(),
            mark = match exclude {
                Exclude::Mark => format!("mark = {MARK}"),
                Exclude::Uid(_) => String::new(),
            },
            policy = dir.join("policy.yaml").display(),
            access = dir.join(format!("{host}-access.log")).display(),
        ),
    )
    .unwrap();
    path
}

fn start_proxy(net: &Net, dir: &Path, host: &str, config: &Path, exclude: Exclude) -> Proc {
    let proxy = bin_dir().join("meshid-proxy");
    let config = config.display().to_string();
    let cmd = match exclude {
        Exclude::Mark => net.exec(host, &proxy, &["run", "--config", &config]),
        Exclude::Uid(uid) => {
            let uid = uid.to_string();
            net.exec(
                host,
                Path::new("setpriv"),
                &[
                    "--reuid",
                    &uid,
                    "--regid",
                    &uid,
                    "--clear-groups",
                    "--",
                    &proxy.display().to_string(),
                    "run",
                    "--config",
                    &config,
                ],
            )
        }
    };
    net.spawn_ready(dir, host, "meshid-proxy", cmd, OPS)
}

fn start_host(
    net: &Net,
    dir: &Path,
    ca: &Ca,
    name: &'static str,
    exclude: Exclude,
    extra: &str,
) -> Host {
    let uid = match exclude {
        Exclude::Mark => 0,
        Exclude::Uid(uid) => {
            // The proxy's own files, writable by its uid.
            let access = dir.join(format!("{name}-access.log"));
            std::fs::write(&access, "").unwrap();
            std::os::unix::fs::chown(&access, Some(uid), Some(uid)).unwrap();
            uid
        }
    };
    let (agent, agent_id, socket) = start_agent(net, dir, ca, name);
    ca.ok(&[
        "entry",
        "create",
        "--id",
        name,
        "--spiffe-id",
        &format!("{TD}/{name}"),
        "--parent-id",
        &agent_id,
        "--selector",
        &format!("unix:uid:{uid}"),
        "--selector",
        &format!("unix:path:{}", bin_dir().join("meshid-proxy").display()),
        "--x509-ttl",
        "1h",
    ]);
    let config = proxy_config(dir, name, &socket, exclude, extra);
    // The rules: the agent's connection to the CA is not redirected (it is its own mTLS).
    let proxy_bin = bin_dir().join("meshid-proxy").display().to_string();
    let config_arg = config.display().to_string();
    let ca_cidr = format!("{CA_ADDR}/32");
    let mut args = vec![
        "iptables",
        "install",
        "--config",
        &config_arg,
        "--exclude-outbound-cidrs",
        &ca_cidr,
        "--ipv6",
    ];
    let uid_arg = uid.to_string();
    if let Exclude::Uid(_) = exclude {
        args.extend(["--proxy-uid", &uid_arg]);
    }
    let out = net.output(name, &proxy_bin, &args);
    assert!(
        out.status.success(),
        "iptables install on {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy = start_proxy(net, dir, name, &config, exclude);
    Host {
        proxy: Some(proxy),
        _agent: agent,
        config,
    }
}

/// A running tcpdump writing what it sees on an interface to a file.
struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    fn start(net: &Net, dir: &Path, iface: &str, filter: &str) -> Capture {
        let file = dir.join(format!("{iface}-{}.pcap", filter.replace(' ', "-")));
        let log = dir.join(format!("tcpdump-{iface}.log"));
        let _ = std::fs::remove_file(&log);
        let cmd = net.exec(
            "s",
            Path::new("tcpdump"),
            &[
                "-i",
                iface,
                // Packets reach the file as they come, not in blocks that a stop would lose.
                "--immediate-mode",
                "-n",
                "-s",
                "0",
                "-U",
                "-Z",
                "root",
                "-w",
                &file.display().to_string(),
                filter,
            ],
        );
        let proc = Proc::spawn("tcpdump", cmd, log);
        wait_for(Duration::from_secs(10), "tcpdump to listen", || {
            proc.log_text().contains("listening on").then_some(())
        });
        Capture { proc, file }
    }

    /// Stops the capture and returns the file's bytes.
    fn finish(mut self) -> Vec<u8> {
        // Let the last packets reach the file (-U writes each packet as it comes).
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal("INT");
        let _ = self.proc.wait_exit(Duration::from_secs(5));
        let bytes = std::fs::read(&self.file).unwrap();
        eprintln!(
            "capture {}: {} bytes; tcpdump: {}",
            self.file.display(),
            bytes.len(),
            self.proc.log_text().trim()
        );
        bytes
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// TLS records in a capture: a handshake record (`16 03 01`/`16 03 03`) and application data
/// (`17 03 03`).
fn looks_like_tls(pcap: &[u8]) -> bool {
    (contains(pcap, &[0x16, 0x03, 0x01]) || contains(pcap, &[0x16, 0x03, 0x03]))
        && contains(pcap, &[0x17, 0x03, 0x03])
}

/// curl from web to api's `url` answers the marker file, and a capture on api's veth shows
/// TLS records and neither the request nor the response.
fn web_to_api_encrypted(net: &Net, dir: &Path, url: &str, marker: &str) {
    let capture = Capture::start(net, dir, "vapi", "tcp port 8000");
    let (code, body) = net.curl("web", url);
    let pcap = capture.finish();
    assert_eq!(
        (code, body.trim()),
        (200, format!("body {marker}").as_str()),
        "web -> {url}"
    );
    assert!(
        pcap.len() > 200,
        "the capture on api's veth saw nothing ({} bytes)",
        pcap.len()
    );
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "plaintext of the request or response was seen on api's veth ({url})"
    );
    assert!(
        !contains(&pcap, b"GET /"),
        "an HTTP request line was seen on api's veth ({url})"
    );
    assert!(
        looks_like_tls(&pcap),
        "no TLS records on api's veth ({url})"
    );
}

fn wait_metric(net: &Net, host: &str, name: &str, labels: &[(&str, &str)], at_least: f64) {
    wait_for(
        Duration::from_secs(5),
        &format!("{name}{labels:?} on {host}"),
        || (net.metric(host, name, labels) >= at_least).then_some(()),
    );
}

#[test]
fn transparent_mtls_between_namespaces() {
    if let Some(why) = missing_prerequisite(&TOOLS) {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "MESHID_CI is set but the network-namespace test cannot run: {why}"
        );
        eprintln!("SKIPPED transparent_mtls_between_namespaces: {why}");
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The intruder's proxy runs as another user: it reads its configuration and the policy
    // and reaches its agent's socket under this directory.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let net = create_net(&[
        ("web", WEB_ADDR),
        ("api", API_ADDR),
        ("intruder", INTRUDER_ADDR),
    ]);

    // The CA, in the switch namespace.
    let ca = net.start_ca(
        dir,
        "s",
        "example.org",
        &format!("{CA_ADDR}:{NODE_PORT}"),
        &[],
    );
    std::fs::write(dir.join("bundle.pem"), ca.ok(&["bundle", "show"])).unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        format!(
            "name: mesh\ndefault: deny\nrules:\n  - name: web-to-api\n    from: [\"{TD}/web\"]\n    to: [\"{TD}/api\"]\n    ports: [8000, 8001]\n"
        ),
    )
    .unwrap();

    // An unmodified server on api, and a plain one outside the mesh (in the switch).
    let marker = format!("meshid-wire-marker-{}", std::process::id());
    let site = dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(
        site.join(format!("{marker}.txt")),
        format!("body {marker}\n"),
    )
    .unwrap();
    let site_arg = site.display().to_string();
    let server = |host: &str, bind: &str, port: &str| {
        let cmd = net.exec(
            host,
            Path::new("python3"),
            &[
                "-m",
                "http.server",
                port,
                "--bind",
                bind,
                "--directory",
                &site_arg,
            ],
        );
        Proc::spawn(
            &format!("http.server {host}"),
            cmd,
            dir.join(format!("{host}-http.log")),
        )
    };
    // `::`: python's dual-stack server, IPv4 and IPv6.
    let _api_server = server("api", "::", "8000");
    // A service that listens on loopback only (see `inbound_forward` in step 6).
    let _api_local_server = server("api", "127.0.0.1", "8001");
    let _legacy_server = server("s", LEGACY_ADDR, "9000");

    // web and api exclude their proxies' connections by SO_MARK, the intruder by uid (its
    // proxy runs as an unprivileged user, as in the Kubernetes example).
    // web and api listen dual-stack; the intruder on the IPv4-only defaults.
    let _web = start_host(&net, dir, &ca, "web", Exclude::Mark, DUAL_STACK);
    let mut api = start_host(&net, dir, &ca, "api", Exclude::Mark, DUAL_STACK);
    let _intruder = start_host(&net, dir, &ca, "intruder", Exclude::Uid(PROXY_UID), "");
    wait_for(Duration::from_secs(10), "api's python server", || {
        let out = net.output(
            "api",
            "curl",
            &["-s", "-m", "2", "-o", "/dev/null", "http://127.0.0.1:8000/"],
        );
        out.status.success().then_some(())
    });
    for (host, exclusion) in [
        ("web", "--mark 0x539"),
        ("api", "--mark 0x539"),
        ("intruder", "--uid-owner 1337"),
    ] {
        let rules = net.nat_rules(host);
        assert!(
            rules.contains("-A OUTPUT -p tcp -j MESHID_OUTPUT"),
            "{host}: {rules}"
        );
        assert!(
            rules.contains("-A PREROUTING -p tcp -j MESHID_INBOUND"),
            "{host}: {rules}"
        );
        assert!(rules.contains(exclusion), "{host}: {rules}");
    }

    // 1. web -> api by its plain address: mTLS on the wire, the response intact.
    let url = format!("http://{API_ADDR}:8000/{marker}.txt");
    web_to_api_encrypted(&net, dir, &url, &marker);
    wait_metric(
        &net,
        "web",
        TRANSPARENT,
        &[("direction", "outbound"), ("result", "mtls")],
        1.0,
    );
    wait_metric(
        &net,
        "api",
        TRANSPARENT,
        &[("direction", "inbound"), ("result", "mtls")],
        1.0,
    );
    let access = std::fs::read_to_string(dir.join("api-access.log")).unwrap_or_default();
    assert!(
        access
            .lines()
            .any(|l| l.contains(&format!("\"caller\":\"{TD}/web\""))
                && l.contains("\"port\":8000")
                && l.contains("\"decision\":\"allow\"")),
        "api's access log: {access}"
    );

    // 1b. The same over IPv6 (ip6tables rules, IP6T_SO_ORIGINAL_DST).
    let rules6 = net.nat6_rules("web");
    assert!(
        rules6.contains("-A OUTPUT -p tcp -j MESHID_OUTPUT"),
        "{rules6}"
    );
    let url6 = format!("http://[{API_ADDR_V6}]:8000/{marker}.txt");
    web_to_api_encrypted(&net, dir, &url6, &marker);
    wait_metric(
        &net,
        "api",
        TRANSPARENT,
        &[("direction", "inbound"), ("result", "mtls")],
        2.0,
    );

    // 2. The intruder is in the mesh but outside the policy: refused by api, and logged.
    let (code, body) = net.curl("intruder", &url);
    assert_eq!(code, 403, "intruder -> api: {body}");
    assert!(!body.contains(&marker));
    wait_for(Duration::from_secs(5), "api's refusal log line", || {
        let log = api.proxy.as_ref().unwrap().log_text();
        log.lines()
            .any(|l| {
                l.contains("refused by policy")
                    && l.contains(&format!("{TD}/intruder"))
                    && l.contains("port=8000")
            })
            .then_some(())
    });
    assert!(
        net.metric(
            "api",
            "meshid_proxy_decisions_total",
            &[("rule", "<default>"), ("decision", "deny")]
        ) >= 1.0
    );

    // 3. A host without a proxy speaks plaintext to api: refused (strict).
    let (code, _) = net.curl("s", &url);
    assert_eq!(code, 0, "plaintext reached api's server in strict mode");
    wait_metric(
        &net,
        "api",
        TRANSPARENT,
        &[("direction", "inbound"), ("result", "plaintext_refused")],
        1.0,
    );
    assert!(api
        .proxy
        .as_ref()
        .unwrap()
        .log_text()
        .contains("plaintext inbound refused"));

    // 4. A destination outside the mesh passes through untouched; the capture sees its
    //    plaintext, so the check in 1. can fail.
    let capture = Capture::start(&net, dir, "vweb", "tcp port 9000");
    let (code, body) = net.curl("web", &format!("http://{LEGACY_ADDR}:9000/{marker}.txt"));
    let pcap = capture.finish();
    assert_eq!(
        (code, body.trim()),
        (200, format!("body {marker}").as_str()),
        "web -> legacy"
    );
    assert!(
        contains(&pcap, marker.as_bytes()),
        "the pass-through plaintext was not captured"
    );
    wait_metric(
        &net,
        "web",
        TRANSPARENT,
        &[("direction", "outbound"), ("result", "passthrough")],
        1.0,
    );

    // 5. Connecting to the proxy's port directly (not redirected) is refused, not looped.
    let (code, _) = net.curl("web", "http://127.0.0.1:15001/");
    assert_eq!(code, 0);
    wait_metric(
        &net,
        "web",
        TRANSPARENT,
        &[("direction", "outbound"), ("result", "not_redirected")],
        1.0,
    );

    // 6. Permissive mode for migration: plaintext is forwarded and counted; mTLS still works.
    //    And inbound_forward = "loopback" reaches a service listening on 127.0.0.1 only, which
    //    forwarding to the original address cannot.
    let local_url = format!("http://{API_ADDR}:8001/{marker}.txt");
    assert_eq!(
        net.curl("web", &local_url).0,
        502,
        "loopback-only service, original forward"
    );
    api.proxy.as_mut().unwrap().stop();
    let permissive = proxy_config(
        dir,
        "api",
        &dir.join("api/agent/api.sock"),
        Exclude::Mark,
        &format!("{DUAL_STACK}\ninbound_mode = \"permissive\"\ninbound_forward = \"loopback\""),
    );
    assert_eq!(permissive, api.config);
    api.proxy = Some(start_proxy(&net, dir, "api", &api.config, Exclude::Mark));
    let (code, body) = net.curl("s", &url);
    assert_eq!(
        (code, body.trim()),
        (200, format!("body {marker}").as_str()),
        "permissive plaintext"
    );
    wait_metric(
        &net,
        "api",
        TRANSPARENT,
        &[("direction", "inbound"), ("result", "plaintext_allowed")],
        1.0,
    );
    assert_eq!(net.curl("web", &url).0, 200);
    assert_eq!(net.curl("intruder", &url).0, 403);
    let (code, body) = net.curl("web", &local_url);
    assert_eq!(
        (code, body.trim()),
        (200, format!("body {marker}").as_str()),
        "loopback-only service, loopback forward"
    );

    // 7. Uninstall removes every rule; web's curl is then plaintext, which api (permissive)
    //    lets through and counts.
    let proxy_bin = bin_dir().join("meshid-proxy").display().to_string();
    let out = net.output("web", &proxy_bin, &["iptables", "uninstall", "--ipv6"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = net.nat_rules("web") + &net.nat6_rules("web");
    assert!(
        !rules.contains("MESHID"),
        "rules left after uninstall: {rules}"
    );
    let out = net.output("web", &proxy_bin, &["iptables", "uninstall", "--ipv6"]);
    assert!(out.status.success(), "a second uninstall must succeed too");
    let before = net.metric(
        "api",
        TRANSPARENT,
        &[("direction", "inbound"), ("result", "plaintext_allowed")],
    );
    assert_eq!(net.curl("web", &url).0, 200);
    wait_metric(
        &net,
        "api",
        TRANSPARENT,
        &[("direction", "inbound"), ("result", "plaintext_allowed")],
        before + 1.0,
    );
    eprintln!(
        "transparent_mtls_between_namespaces: {:?}",
        started.elapsed()
    );
}

/// Federation across hosts: two trust domains, each with its CA, agent and (explicit) proxy
/// on its own network namespace, joined only by the switch. Each CA fetches the other's bundle
/// from its https_spiffe bundle endpoint over the network; example.org's web calls
/// partner.org's api through both proxies, each verifying the other's SVID with the fetched
/// bundle. Before the relationships the call fails; a root rotation in partner.org under
/// traffic fails no request; deleting the relationship makes the next connection fail.
#[test]
fn federated_trust_domains_on_separate_hosts() {
    if let Some(why) = missing_prerequisite(&TOOLS) {
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "MESHID_CI is set but the network-namespace test cannot run: {why}"
        );
        eprintln!("SKIPPED federated_trust_domains_on_separate_hosts: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (home_addr, partner_addr) = (WEB_ADDR, API_ADDR);
    let net = create_net(&[("home", home_addr), ("partner", partner_addr)]);
    // A CA on each host, serving its bundle endpoint (https_spiffe) on the host's address.
    let start_ca = |host: &str, td: &str, addr: &str| {
        let hdir = dir.join(host);
        std::fs::create_dir_all(&hdir).unwrap();
        let config = hdir.join("federation.toml");
        std::fs::write(
            &config,
            format!(
                "[ca]\nbundle_refresh_hint = \"1s\"\n\n[federation]\n\
                 bundle_endpoint_address = \"{addr}:9443\"\n"
            ),
        )
        .unwrap();
        net.start_ca(
            &hdir,
            host,
            td,
            &format!("127.0.0.1:{NODE_PORT}"),
            &["--config", &config.display().to_string()],
        )
    };
    let home = start_ca("home", "example.org", home_addr);
    let partner = start_ca("partner", "partner.org", partner_addr);

    // An agent on each host, with the workload's entry federating with the other domain.
    let start_agent = |host: &str, ca: &Ca, td: &str, id: &str, other: &str| {
        let hdir = dir.join(host);
        let bundle = hdir.join("bundle.pem");
        std::fs::write(&bundle, ca.ok(&["bundle", "show"])).unwrap();
        let (token, agent_id) = ca.join_token();
        ca.ok(&[
            "entry",
            "create",
            "--id",
            id,
            "--spiffe-id",
            &format!("spiffe://{td}/{id}"),
            "--parent-id",
            &agent_id,
            "--selector",
            "unix:uid:0",
            "--federates-with",
            other,
        ]);
        let server = format!("127.0.0.1:{NODE_PORT}");
        net.spawn_agent(dir, host, (td, &server), &bundle, &token)
    };
    let (_home_agent, home_socket) =
        start_agent("home", &home, "example.org", "web", "partner.org");
    let (_partner_agent, partner_socket) =
        start_agent("partner", &partner, "partner.org", "api", "example.org");

    // api: an unmodified server behind partner's proxy; web's proxy in front of curl.
    let site = dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("orders.txt"), "orders\n").unwrap();
    let _api_server = Proc::spawn(
        "http.server partner",
        net.exec(
            "partner",
            Path::new("python3"),
            &[
                "-m",
                "http.server",
                "8000",
                "--bind",
                "127.0.0.1",
                "--directory",
                &site.display().to_string(),
            ],
        ),
        dir.join("partner-http.log"),
    );
    let policy = dir.join("partner-policy.yaml");
    std::fs::write(
        &policy,
        "name: partner\ndefault: deny\nrules:\n  - name: home-web\n    from: [\"spiffe://example.org/web\"]\n    to: [\"spiffe://partner.org/api\"]\n",
    )
    .unwrap();
    let write_config = |host: &str, text: String| {
        let path = dir.join(format!("{host}-proxy.toml"));
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let api_config = write_config(
        "partner",
        format!(
            "workload_api_socket = \"unix://{}\"\nspiffe_id = \"spiffe://partner.org/api\"\n\
             ops_address = \"{OPS}\"\npolicy_file = \"{}\"\nfederated_trust_domains = [\"example.org\"]\n\
             [[inbound]]\nname = \"api-in\"\nlisten = \"{partner_addr}:8443\"\n\
             forward_to = \"127.0.0.1:8000\"\nport = 8000\nprotocol = \"http\"\n",
            partner_socket.display(),
            policy.display()
        ),
    );
    let web_config = write_config(
        "home",
        format!(
            "workload_api_socket = \"unix://{}\"\nspiffe_id = \"spiffe://example.org/web\"\n\
             ops_address = \"{OPS}\"\nfederated_trust_domains = [\"partner.org\"]\n\
             [[outbound]]\nname = \"to-api\"\nlisten = \"127.0.0.1:8080\"\n\
             upstream = \"{partner_addr}:8443\"\nexpect = \"spiffe://partner.org/api\"\n",
            home_socket.display()
        ),
    );
    let proxy = bin_dir().join("meshid-proxy");
    let _api_proxy = net.spawn_ready(
        dir,
        "partner",
        "meshid-proxy",
        net.exec("partner", &proxy, &["run", "--config", &api_config]),
        OPS,
    );
    let _web_proxy = net.spawn_ready(
        dir,
        "home",
        "meshid-proxy",
        net.exec("home", &proxy, &["run", "--config", &web_config]),
        OPS,
    );
    let url = "http://127.0.0.1:8080/orders.txt";
    assert_ne!(
        net.curl("home", url).0,
        200,
        "a call across trust domains without federation"
    );

    // Federated both ways, each bootstrapped with the other's bundle, fetched over the network.
    let federate = |ca: &Ca, other: &Ca, td: &str, addr: &str| {
        let file = dir.join(format!("{td}.json"));
        std::fs::write(&file, other.ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
        ca.ok(&[
            "federation",
            "create",
            "--trust-domain",
            td,
            "--endpoint-url",
            &format!("https://{addr}:9443"),
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            &format!("spiffe://{td}/meshid/server"),
            "--bundle-file",
            &file.display().to_string(),
        ]);
    };
    federate(&home, &partner, "partner.org", partner_addr);
    federate(&partner, &home, "example.org", home_addr);
    wait_for(
        Duration::from_secs(20),
        "a call across the trust domains",
        || (net.curl("home", url).0 == 200).then_some(()),
    );
    for (ca, td) in [(&home, "partner.org"), (&partner, "example.org")] {
        let s: serde_json::Value =
            serde_json::from_str(&ca.ok(&["federation", "show", td, "--output", "json"])).unwrap();
        assert!(s["refresh"]["last_success"].as_i64() > Some(0), "{s}");
    }

    // partner's root rotation under traffic: prepare, activate, api's SVID re-issued.
    let (mut ok, mut failed) = (0, Vec::new());
    let call = |ok: &mut u32, failed: &mut Vec<u16>| match net.curl("home", url).0 {
        200 => *ok += 1,
        other => failed.push(other),
    };
    partner.ok(&["ca", "root", "prepare", "--reason", "yearly"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        call(&mut ok, &mut failed);
        let activated = meshid_tests::ca_cli(
            &partner.socket,
            &["ca", "root", "activate", "--reason", "yearly"],
        );
        if activated.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partner's root activation refused for 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Home must hold partner's new root before api presents a chain to it.
    wait_for(
        Duration::from_secs(10),
        "partner's new bundle at home",
        || {
            call(&mut ok, &mut failed);
            let s: serde_json::Value = serde_json::from_str(&home.ok(&[
                "federation",
                "show",
                "partner.org",
                "--output",
                "json",
            ]))
            .unwrap();
            let want: serde_json::Value =
                serde_json::from_str(&partner.ok(&["bundle", "show", "--format", "spiffe"]))
                    .unwrap();
            (s["bundle"]["sequence"] == want["spiffe_sequence"]).then_some(())
        },
    );
    partner.ok(&["entry", "rotate", "api", "--reason", "new root"]);
    for _ in 0..30 {
        call(&mut ok, &mut failed);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 30, "only {ok} calls");

    // The relationship deleted on home: the next connection fails.
    home.ok(&[
        "federation",
        "delete",
        "partner.org",
        "--reason",
        "offboarding",
    ]);
    wait_for(
        Duration::from_secs(5),
        "calls to fail without the relationship",
        || (net.curl("home", url).0 != 200).then_some(()),
    );
}
