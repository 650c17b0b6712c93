use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = meshid_api::config::parse_toml(Path::new("proxy.toml"), text)?;
    Config::try_from(raw)
}

const MINIMAL: &str = r#"
workload_api_socket = "unix:///tmp/agent.sock"
[[inbound]]
listen = "127.0.0.1:15443"
forward_to = "127.0.0.1:8080"
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.workload_api_socket, "unix:///tmp/agent.sock");
    assert_eq!(c.ops_address.to_string(), DEFAULT_OPS_ADDRESS);
    assert_eq!(c.access_log, AccessLog::Stdout);
    assert_eq!(c.drain_timeout, Duration::from_secs(10));
    assert_eq!(c.detect_timeout, Duration::from_millis(200));
    assert_eq!(c.max_connections, None);
    assert_eq!(c.max_handshakes, 1024);
    assert_eq!(c.max_handshakes_per_source, 16);
    assert_eq!(c.idle_timeout, Duration::from_secs(3600));
    assert_eq!(c.http_header_timeout, Duration::from_secs(30));
    assert_eq!(c.http_max_header_bytes, 64 * 1024);
    assert_eq!(c.inbound[0].name, "inbound-0");
    assert_eq!(c.inbound[0].port, 8080);
    assert_eq!(c.inbound[0].protocol, InboundProtocol::Detect);
    assert!(c.outbound.is_empty());
}

#[test]
fn full_config_parses() {
    let c = parse(
        r#"
workload_api_socket = "unix:///run/a.sock"
spiffe_id = "spiffe://example.org/web"
ops_address = "127.0.0.1:9999"
policy_file = "/etc/meshid/policy.yaml"
access_log = "/var/log/access.log"
log_format = "json"
drain_timeout = "30s"
handshake_timeout = "2s"
detect_timeout = "50ms"
connect_timeout = "1s"
max_connections = 500
idle_timeout = "5m"
http_header_timeout = "15s"
http_max_header_bytes = 16384
federated_trust_domains = ["partner.org"]
[[inbound]]
name = "api"
listen = "0.0.0.0:15443"
forward_to = "localhost:8080"
port = 80
protocol = "tcp"
[[outbound]]
name = "db"
listen = "127.0.0.1:15001"
upstream = "db.internal:15443"
expect = "spiffe://example.org/db/*"
"#,
    )
    .unwrap();
    assert_eq!(c.spiffe_id.unwrap().to_string(), "spiffe://example.org/web");
    assert_eq!(c.access_log, AccessLog::File("/var/log/access.log".into()));
    assert!(c.log_json);
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.detect_timeout, Duration::from_millis(50));
    assert_eq!(c.max_connections, Some(500));
    assert_eq!(c.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.http_header_timeout, Duration::from_secs(15));
    assert_eq!(c.http_max_header_bytes, 16384);
    assert_eq!(c.federated_trust_domains[0].to_string(), "partner.org");
    assert_eq!(c.inbound[0].port, 80);
    assert_eq!(c.inbound[0].protocol, InboundProtocol::Tcp);
    assert_eq!(c.outbound[0].upstream, "db.internal:15443");
    assert!(c.outbound[0]
        .expect
        .matches(&spiffe::SpiffeId::new("spiffe://example.org/db/x").unwrap()));
}

#[test]
fn bad_configs_are_refused_with_the_key() {
    let cases: &[(&str, &str)] = &[
        ("", "no listeners"),
        ("bogus = 1\n[[inbound]]\nlisten='127.0.0.1:1'\nforward_to='a:1'", "proxy.toml:1:1"),
        ("[[inbound]]\nforward_to = 'a:1'", "inbound[0].listen: required"),
        ("[[inbound]]\nlisten = 'localhost:1'\nforward_to = 'a:1'", "inbound[0].listen"),
        ("[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a'", "inbound[0].forward_to"),
        ("[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:0'", "inbound[0].forward_to"),
        ("[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'\nprotocol = 'udp'", "inbound[0].protocol"),
        ("[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "inbound[1].listen"),
        ("[[inbound]]\nname='x'\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'\n[[outbound]]\nname='x'\nlisten = '127.0.0.1:2'\nupstream = 'a:1'\nexpect='spiffe://example.org/a'", "outbound[0].name"),
        ("[[outbound]]\nlisten = '127.0.0.1:2'\nupstream = 'a:1'", "outbound[0].expect: required"),
        ("[[outbound]]\nlisten = '127.0.0.1:2'\nupstream = 'a:1'\nexpect = 'spiffe://example.org/a*'", "outbound[0].expect"),
        ("[[outbound]]\nlisten = '127.0.0.1:2'\nupstream = 'a:1'\nexpect = 'https://example.org/a'", "outbound[0].expect"),
        ("workload_api_socket = '/tmp/x.sock'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "workload_api_socket"),
        ("spiffe_id = 'spiffe://Example.org/x'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "spiffe_id"),
        ("log_format = 'xml'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "log_format"),
        ("drain_timeout = 'soon'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "proxy.toml:1:"),
        ("drain_timeout = '0s'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "drain_timeout"),
        ("federated_trust_domains = ['Bad_TD!']\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "federated_trust_domains"),
        ("access_log = ''\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "access_log"),
        ("max_connections = 0\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "max_connections"),
        ("max_handshakes_per_source = 0\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "max_handshakes_per_source: 0: use 1 to 1000000"),
        ("max_connections = -1\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "proxy.toml:1:"),
        ("idle_timeout = '0s'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "idle_timeout"),
        ("http_header_timeout = '0s'\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "http_header_timeout"),
        ("http_max_header_bytes = 100\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "http_max_header_bytes"),
        ("http_max_header_bytes = 99999999\n[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:1'", "http_max_header_bytes"),
    ];
    for (text, want) in cases {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
    }
}

#[test]
fn deploy_examples_are_valid() {
    let c = parse(include_str!("../../../deploy/proxy.toml")).unwrap();
    assert_eq!(c.inbound.len(), 1);
    assert_eq!(c.outbound.len(), 1);
    assert_eq!(
        c.policy_file.as_deref(),
        Some(Path::new("/etc/meshid/policy.yaml"))
    );
    let policy = meshid_policy::Policy::parse(
        include_str!("../../../deploy/policy.yaml"),
        "deploy/policy.yaml",
    )
    .unwrap();
    let ports = [
        (8080, meshid_policy::Protocol::Http),
        (5432, meshid_policy::Protocol::Tcp),
    ];
    policy.validate_ports(&ports).unwrap();
    let warnings: Vec<_> = policy
        .check()
        .into_iter()
        .filter(|f| f.severity == meshid_policy::Severity::Warning)
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn deploy_policy_cases_pass() {
    let policy = meshid_policy::Policy::parse(
        include_str!("../../../deploy/policy.yaml"),
        "deploy/policy.yaml",
    )
    .unwrap();
    let cases = meshid_policy::parse_cases(
        include_str!("../../../deploy/policy-cases.yaml"),
        "deploy/policy-cases.yaml",
    )
    .unwrap();
    assert_eq!(cases.len(), 5);
    for case in &cases {
        let result = case.run(&policy);
        assert!(result.passed, "{result:?}");
    }
}

#[test]
fn transparent_defaults_and_full_table() {
    let c = parse("[transparent]\n").unwrap();
    let t = c.transparent.unwrap();
    assert_eq!(t.outbound_listen.to_string(), DEFAULT_TRANSPARENT_OUTBOUND);
    assert_eq!(t.inbound_listen.to_string(), DEFAULT_TRANSPARENT_INBOUND);
    assert_eq!(t.inbound_mode, InboundMode::Strict);
    assert_eq!(t.inbound_forward, InboundForward::Original);
    assert!(t.mark.is_none() && t.mesh_cidrs.is_empty() && t.destinations.is_empty());

    let c = parse(
        r#"
[transparent]
outbound_listen = "127.0.0.1:25001"
inbound_listen = "0.0.0.0:25006"
inbound_mode = "permissive"
inbound_forward = "loopback"
mark = 1337
mesh_cidrs = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]
expect = "spiffe://example.org/**"
tcp_ports = [5432]
[[transparent.destinations]]
address = "10.1.2.3:8080"
expect = "spiffe://example.org/api"
[[transparent.destinations]]
address = "10.1.2.4"
expect = "spiffe://example.org/db/*"
"#,
    )
    .unwrap();
    let t = c.transparent.unwrap();
    assert_eq!(t.inbound_mode, InboundMode::Permissive);
    assert_eq!(t.inbound_forward, InboundForward::Loopback);
    let dst: SocketAddr = "10.1.2.3:8080".parse().unwrap();
    assert_eq!(t.inbound_forward.target(dst).to_string(), "127.0.0.1:8080");
    let dst6: SocketAddr = "[fd00::3]:8080".parse().unwrap();
    assert_eq!(t.inbound_forward.target(dst6).to_string(), "[::1]:8080");
    assert_eq!(InboundForward::Original.target(dst), dst);
    assert_eq!(t.mark, Some(1337));
    assert_eq!(t.mesh_cidrs[2].to_string(), "192.0.2.7/32");
    assert_eq!(t.destinations[0].port, Some(8080));
    assert_eq!(t.destinations[1].port, None);
    assert_eq!(t.tcp_ports, [5432]);
    assert_eq!(
        crate::policy::port_protocols(&parse("[transparent]\ntcp_ports = [5432]\n").unwrap()),
        [(5432, meshid_policy::Protocol::Tcp)]
    );
}

#[test]
fn bad_transparent_tables_are_refused_with_the_key() {
    let cases: &[(&str, &str)] = &[
        ("[transparent]\nbogus = 1", "proxy.toml:2:1"),
        ("[transparent]\ninbound_mode = 'open'", "transparent.inbound_mode"),
        ("[transparent]\ninbound_forward = 'localhost'", "transparent.inbound_forward"),
        ("[transparent]\noutbound_listen = 'localhost:1'", "transparent.outbound_listen"),
        ("[transparent]\nmesh_cidrs = ['10.0.0.0/8']", "transparent.expect: required"),
        ("[transparent]\nmesh_cidrs = ['10.0.0.1/8']\nexpect = 'spiffe://example.org/**'", "host bits"),
        ("[transparent]\nmesh_cidrs = ['10.0.0.0/33']\nexpect = 'spiffe://example.org/**'", "prefix length"),
        ("[transparent]\nmesh_cidrs = ['ten/8']\nexpect = 'spiffe://example.org/**'", "transparent.mesh_cidrs"),
        ("[transparent]\nexpect = 'spiffe://example.org/a*'", "transparent.expect"),
        ("[transparent]\nmark = 0", "transparent.mark"),
        ("[transparent]\nmark = -1", "proxy.toml:2:"),
        ("[[transparent.destinations]]\nexpect = 'spiffe://example.org/a'", "destinations[0].address: required"),
        ("[[transparent.destinations]]\naddress = 'api:80'\nexpect = 'spiffe://example.org/a'", "destinations[0].address"),
        ("[[transparent.destinations]]\naddress = '10.0.0.1:80'", "destinations[0].expect: required"),
        ("[transparent]\noutbound_listen = '0.0.0.0:1'\ninbound_listen = '0.0.0.0:1'", "transparent[1].listen"),
        ("[[inbound]]\nlisten = '127.0.0.1:15001'\nforward_to = 'a:1'\n[transparent]", "transparent[0].listen"),
        ("[[inbound]]\nlisten = '127.0.0.1:1'\nforward_to = 'a:5432'\nprotocol = 'http'\n[transparent]\ntcp_ports = [5432]", "transparent.tcp_ports"),
    ];
    for (text, want) in cases {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
    }
}

#[test]
fn cidr_membership() {
    let c: Cidr = "198.18.0.0/15".parse().unwrap();
    assert!(c.contains("198.19.255.255".parse().unwrap()));
    assert!(!c.contains("198.20.0.0".parse().unwrap()));
    assert!(
        c.contains("::ffff:198.18.0.1".parse().unwrap()),
        "IPv4-mapped"
    );
    assert!(!c.contains("2001:db8::1".parse().unwrap()));
    let all: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("8.8.8.8".parse().unwrap()));
    let v6: Cidr = "fd00::/8".parse().unwrap();
    assert!(v6.contains("fd12::1".parse().unwrap()));
    assert!(!v6.contains("fe80::1".parse().unwrap()));
    assert!(!v6.contains("10.0.0.1".parse().unwrap()));
    let host: Cidr = "2001:db8::1".parse().unwrap();
    assert_eq!(host.prefix, 128);
    assert!(host.contains("2001:db8::1".parse().unwrap()));
    assert!(!host.contains("2001:db8::2".parse().unwrap()));
}

#[test]
fn the_policy_source_is_the_file_or_the_agent_never_both() {
    assert!(!parse(MINIMAL).unwrap().policy_from_agent);
    let agent = format!("policy_source = \"agent\"\n{MINIMAL}");
    assert!(parse(&agent).unwrap().policy_from_agent);
    let file = format!("policy_source = \"file\"\npolicy_file = \"/p.yaml\"\n{MINIMAL}");
    assert!(!parse(&file).unwrap().policy_from_agent);
    let both = format!("policy_source = \"agent\"\npolicy_file = \"/p.yaml\"\n{MINIMAL}");
    let e = parse(&both).unwrap_err().to_string();
    assert!(
        e.contains("policy_source") && e.contains("remove policy_file"),
        "{e}"
    );
    let bad = format!("policy_source = \"ca\"\n{MINIMAL}");
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.contains("policy_source") && e.contains("\"ca\""), "{e}");
}

#[test]
fn the_policy_cache_goes_with_the_agent_source_only() {
    let cached =
        format!("policy_source = \"agent\"\npolicy_cache = \"/var/lib/p.json\"\n{MINIMAL}");
    assert_eq!(
        parse(&cached).unwrap().policy_cache.as_deref(),
        Some(std::path::Path::new("/var/lib/p.json"))
    );
    let with_file =
        format!("policy_file = \"/p.yaml\"\npolicy_cache = \"/var/lib/p.json\"\n{MINIMAL}");
    let e = parse(&with_file).unwrap_err().to_string();
    assert!(
        e.contains("policy_cache") && e.contains("policy_source = \"agent\""),
        "{e}"
    );
}
