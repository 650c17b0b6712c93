//! Configuration of `meshid-proxy run`.
//!
//! TOML into [`RawConfig`] (unknown keys are errors naming the key, with line and column; the
//! file's text is never quoted), then into a typed [`Config`]. At least one `[[inbound]]` or
//! `[[outbound]]` listener is required; everything else has a default.
//!
//! ```toml
//! workload_api_socket = "unix:///run/meshid/agent/api.sock"
//! ops_address = "127.0.0.1:15000"
//! policy_file = "/etc/meshid/policy.yaml"   # or policy_source = "agent": the CA's policy
//! # policy_cache = "/var/lib/meshid-proxy/policy.json"   # with "agent": the last revision
//!
//! [[inbound]]
//! name = "api"
//! listen = "0.0.0.0:15443"
//! forward_to = "127.0.0.1:8080"
//!
//! [[outbound]]
//! name = "db"
//! listen = "127.0.0.1:15001"
//! upstream = "db.internal:15443"
//! expect = "spiffe://example.org/db/*"
//! ```

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshid_policy::Pattern;
use serde::Deserialize;
use spiffe::{SpiffeId, TrustDomain};

/// The Workload API socket used when neither the file nor `SPIFFE_ENDPOINT_SOCKET` names one.
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "unix:///run/meshid/agent/api.sock";
/// The default ops listener.
pub const DEFAULT_OPS_ADDRESS: &str = "127.0.0.1:15000";

use meshid_api::config::invalid;
pub use meshid_api::config::ConfigError;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `unix:///path` of the Workload API (default: `SPIFFE_ENDPOINT_SOCKET`, then
    /// [`DEFAULT_WORKLOAD_API_SOCKET`]).
    pub workload_api_socket: Option<String>,
    /// Use the SVID with this SPIFFE ID when the Workload API offers several (default: the
    /// first, as the Workload API orders them).
    pub spiffe_id: Option<String>,
    /// `/healthz`, `/readyz` and `/metrics` listener.
    pub ops_address: Option<String>,
    /// The policy file (YAML), watched and reloaded. Without one every inbound caller is
    /// refused.
    pub policy_file: Option<PathBuf>,
    /// `file` (default: `policy_file`) or `agent`: the CA's central policy, from the node agent
    /// on `workload_api_socket` (the rules that concern this proxy's SPIFFE IDs).
    pub policy_source: Option<String>,
    /// With `policy_source = "agent"`: a file (written with mode 0600) keeping the last
    /// revision received, put in force again when the proxy starts, before the agent answers:
    /// a proxy restarted while its agent is down comes back with the last revision, not with
    /// every caller refused. Not a secret: the rules that concern this proxy.
    pub policy_cache: Option<PathBuf>,
    /// Where JSON access log lines go: `stdout` (default), `stderr`, `off`, or a file path
    /// (appended, created with mode 0640).
    pub access_log: Option<String>,
    /// `text` (default) or `json` for the proxy's own log.
    pub log_format: Option<String>,
    /// How long open connections get to finish after SIGTERM (default 10s).
    #[serde(default, with = "humantime_serde_opt")]
    pub drain_timeout: Option<Duration>,
    /// TLS handshake deadline (default 10s).
    #[serde(default, with = "humantime_serde_opt")]
    pub handshake_timeout: Option<Duration>,
    /// How long an inbound connection's first bytes are awaited to recognize HTTP before it is
    /// treated as opaque TCP (default 200ms), so protocols where the server speaks first are
    /// not stalled for long.
    #[serde(default, with = "humantime_serde_opt")]
    pub detect_timeout: Option<Duration>,
    /// Timeout for connecting to an upstream or the local application (default 5s).
    #[serde(default, with = "humantime_serde_opt")]
    pub connect_timeout: Option<Duration>,
    /// Other trust domains whose SVIDs are accepted from peers (their bundles come from the
    /// Workload API). The proxy's own trust domain is always accepted.
    #[serde(default)]
    pub federated_trust_domains: Vec<String>,
    /// Threads serving connections (default 1: a sidecar shares its node with the service it
    /// fronts; raise it for a proxy that carries more than one core of traffic).
    pub worker_threads: Option<usize>,
    /// Connections open at once on each listener; past it, a new connection is closed at
    /// once, before any TLS byte. Default: what the open-files limit allows (two descriptors
    /// per connection on every listener, 256 kept aside), at most 10000.
    pub max_connections: Option<usize>,
    /// TLS handshakes in progress at once on each inbound listener (default 1024); past it the
    /// oldest handshake in progress is shed for the new one, so connections that never finish
    /// their handshake (half-open, or a byte a second) cannot keep legitimate callers out.
    pub max_handshakes: Option<usize>,
    /// TLS handshakes in progress at once from one source address (an IPv6 /64 counts as
    /// one) on each inbound listener (default 16); a newcomer from a source at it waits for
    /// one of them to end, within `handshake_timeout`. One busy source (a storm, or a client
    /// opening many connections at once) cannot queue so much handshake work that the
    /// handshakes of every other caller wait behind it.
    pub max_handshakes_per_source: Option<usize>,
    /// A connection on which no byte moved either way for this long is closed (default 1h).
    #[serde(default, with = "humantime_serde_opt")]
    pub idle_timeout: Option<Duration>,
    /// HTTP/1: how long a request head may take to arrive complete (default 30s), counted
    /// also while a kept-alive connection waits for its next request: a client that trickles
    /// its headers, or keeps a connection open and says nothing, is closed.
    #[serde(default, with = "humantime_serde_opt")]
    pub http_header_timeout: Option<Duration>,
    /// HTTP: the largest request head accepted, in bytes (default 65536; 8192 to 16777216).
    pub http_max_header_bytes: Option<usize>,
    /// HTTP/1: the most header fields a request may have (default 100; 1 to 10000); past it,
    /// `431`. (HTTP/2 heads are bounded by `http_max_header_bytes`.)
    pub http_max_headers: Option<usize>,
    /// HTTP: requests served on one caller connection before the proxy closes it gracefully
    /// (HTTP/1: `connection: close` on the last response; HTTP/2: GOAWAY), so that callers
    /// reconnect and spread over the listeners; default: no limit.
    pub http_max_requests_per_connection: Option<u64>,
    /// Listeners that terminate mTLS and forward plaintext to the local application.
    #[serde(default)]
    pub inbound: Vec<RawInbound>,
    /// Listeners that take plaintext from the local application and open mTLS upstream.
    #[serde(default)]
    pub outbound: Vec<RawOutbound>,
    /// Transparent mode: listeners that iptables REDIRECT rules send the application's
    /// traffic to (see `meshid-proxy iptables install`).
    pub transparent: Option<RawTransparent>,
}

/// The `[transparent]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTransparent {
    /// Where the application's redirected outbound TCP arrives (default 127.0.0.1:15001;
    /// `[::]:15001` for IPv4 and IPv6, with `iptables install --ipv6`).
    pub outbound_listen: Option<String>,
    /// Where redirected inbound connections arrive (default 0.0.0.0:15006; `[::]:15006` for
    /// both families).
    pub inbound_listen: Option<String>,
    /// `strict` (default: plaintext inbound is refused) or `permissive` (plaintext inbound is
    /// forwarded and counted, for migrating services into the mesh).
    pub inbound_mode: Option<String>,
    /// Where inbound connections are forwarded: `original` (default: the address the caller
    /// dialed, for services listening on their external address or on all) or `loopback`
    /// (the same port on 127.0.0.1 or ::1, for services that listen only on loopback).
    pub inbound_forward: Option<String>,
    /// SO_MARK set on the proxy's own upstream and forwarding sockets, so iptables rules can
    /// exclude them (needs CAP_NET_ADMIN; the alternative is excluding the proxy's uid).
    pub mark: Option<u32>,
    /// Destinations inside the mesh: connections to these networks are upgraded to mTLS and
    /// the server must present an ID matching `expect`. Others pass through untouched.
    #[serde(default)]
    pub mesh_cidrs: Vec<String>,
    /// The SPIFFE ID (or pattern) servers in `mesh_cidrs` must present.
    pub expect: Option<String>,
    /// Inbound service ports that carry opaque TCP (one decision per connection, no HTTP
    /// detection). Other ports are detected.
    #[serde(default)]
    pub tcp_ports: Vec<u16>,
    /// Mesh destinations by address, each with the SPIFFE ID its server must present (these
    /// take precedence over `mesh_cidrs`).
    #[serde(default)]
    pub destinations: Vec<RawDestination>,
}

/// A `[[transparent.destinations]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    /// `IP:port`, or an IP for every port.
    pub address: Option<String>,
    /// The SPIFFE ID (or pattern) the server there must present.
    pub expect: Option<String>,
}

/// An `[[inbound]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInbound {
    /// Name used in metrics and logs (default `inbound-N`).
    pub name: Option<String>,
    /// Address to listen on for mTLS.
    pub listen: Option<String>,
    /// The local application's plaintext address.
    pub forward_to: Option<String>,
    /// The service port that policy rules match (default: `forward_to`'s port).
    pub port: Option<u16>,
    /// `detect` (default), `http` or `tcp`.
    pub protocol: Option<String>,
}

/// An `[[outbound]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbound {
    /// Name used in metrics and logs (default `outbound-N`).
    pub name: Option<String>,
    /// Address to listen on for the application's plaintext.
    pub listen: Option<String>,
    /// `host:port` of the peer's inbound listener.
    pub upstream: Option<String>,
    /// The SPIFFE ID (or pattern: `*` one segment, `**` the rest) the upstream must present.
    pub expect: Option<String>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// How an inbound listener treats what follows the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundProtocol {
    /// Look at the first bytes: HTTP/1.1 or HTTP/2 is proxied per request (L7 rules apply),
    /// anything else (or silence until the detect timeout) is opaque TCP.
    Detect,
    /// Always HTTP (L7 rules apply; non-HTTP bytes end the connection).
    Http,
    /// Always opaque TCP: one decision per connection, bytes spliced.
    Tcp,
}

/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    /// Not written.
    Off,
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

/// A validated inbound listener.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// Name in metrics and logs.
    pub name: String,
    /// mTLS listen address.
    pub listen: SocketAddr,
    /// Local application address.
    pub forward_to: String,
    /// The port policy rules see.
    pub port: u16,
    /// Protocol handling.
    pub protocol: InboundProtocol,
}

/// A validated outbound listener.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Name in metrics and logs.
    pub name: String,
    /// Plaintext listen address.
    pub listen: SocketAddr,
    /// `host:port` of the upstream mTLS listener.
    pub upstream: String,
    /// What the upstream's SPIFFE ID must match.
    pub expect: Pattern,
}

/// What transparent inbound does with a connection that does not start a TLS handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMode {
    /// Refuse it (the default): only authenticated, authorized peers reach the application.
    Strict,
    /// Forward it to the application and count it: for moving services into the mesh.
    Permissive,
}

/// Where transparent inbound forwards a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundForward {
    /// The original destination.
    Original,
    /// The original port on the loopback address of the same family.
    Loopback,
}

impl InboundForward {
    /// The application's address for a connection whose original destination is `dst`.
    pub fn target(self, dst: SocketAddr) -> SocketAddr {
        match (self, dst) {
            (InboundForward::Original, _) => dst,
            (InboundForward::Loopback, SocketAddr::V4(_)) => {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), dst.port())
            }
            (InboundForward::Loopback, SocketAddr::V6(_)) => {
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), dst.port())
            }
        }
    }
}

/// A mesh destination by address.
#[derive(Clone, Debug)]
pub struct Destination {
    /// The server's IP.
    pub ip: IpAddr,
    /// Its port, or every port.
    pub port: Option<u16>,
    /// What its SPIFFE ID must match.
    pub expect: Pattern,
}

/// The validated `[transparent]` table.
#[derive(Clone, Debug)]
pub struct Transparent {
    /// Redirected outbound listener.
    pub outbound_listen: SocketAddr,
    /// Redirected inbound listener.
    pub inbound_listen: SocketAddr,
    /// Plaintext inbound handling.
    pub inbound_mode: InboundMode,
    /// Where inbound connections go.
    pub inbound_forward: InboundForward,
    /// SO_MARK of the proxy's own sockets.
    pub mark: Option<u32>,
    /// Networks upgraded to mTLS.
    pub mesh_cidrs: Vec<Cidr>,
    /// What servers in `mesh_cidrs` must present.
    pub expect: Option<Pattern>,
    /// Opaque inbound ports.
    pub tcp_ports: Vec<u16>,
    /// Mesh destinations by address.
    pub destinations: Vec<Destination>,
}

/// The default transparent outbound listener.
pub const DEFAULT_TRANSPARENT_OUTBOUND: &str = "127.0.0.1:15001";
/// The default transparent inbound listener.
pub const DEFAULT_TRANSPARENT_INBOUND: &str = "0.0.0.0:15006";

/// An IPv4 or IPv6 network, `addr/prefix` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits zero).
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// Whether this is an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack socket reports
/// IPv4 peers) turned into the IPv4 address it carries.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn mask_v4(v: u32, prefix: u8) -> u32 {
    v & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(v: u128, prefix: u8) -> u128 {
    v & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR (for example 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let net = match addr {
            IpAddr::V4(v4) => IpAddr::V4(mask_v4(u32::from(v4), prefix).into()),
            IpAddr::V6(v6) => IpAddr::V6(mask_v6(u128::from(v6), prefix).into()),
        };
        if net != addr {
            return Err(format!(
                "{s:?} has host bits set; the network is {net}/{prefix}"
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Workload API endpoint (`unix:///path`).
    pub workload_api_socket: String,
    /// The SVID to use when several are offered.
    pub spiffe_id: Option<SpiffeId>,
    /// Ops listener.
    pub ops_address: SocketAddr,
    /// Policy file, if any.
    pub policy_file: Option<PathBuf>,
    /// Whether the policy comes from the node agent (the CA's central policy) instead.
    pub policy_from_agent: bool,
    /// With the policy from the agent: where the last revision received is kept.
    pub policy_cache: Option<PathBuf>,
    /// Access log destination.
    pub access_log: AccessLog,
    /// JSON logs.
    pub log_json: bool,
    /// Grace period after SIGTERM.
    pub drain_timeout: Duration,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// First-bytes deadline for protocol detection.
    pub detect_timeout: Duration,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Federated trust domains accepted from peers.
    pub federated_trust_domains: Vec<TrustDomain>,
    /// Runtime worker threads.
    pub worker_threads: usize,
    /// Connections open at once per listener (`None`: from the open-files limit, see
    /// [`crate::server::max_connections`]).
    pub max_connections: Option<usize>,
    /// Handshakes in progress at once per inbound listener.
    pub max_handshakes: usize,
    /// Handshakes in progress at once per source address per inbound listener.
    pub max_handshakes_per_source: usize,
    /// Idle connection deadline.
    pub idle_timeout: Duration,
    /// HTTP/1 request head deadline.
    pub http_header_timeout: Duration,
    /// HTTP request head size limit.
    pub http_max_header_bytes: usize,
    /// HTTP/1 request header count limit.
    pub http_max_headers: usize,
    /// Requests per caller connection (`None`: no limit).
    pub http_max_requests_per_connection: Option<u64>,
    /// Inbound listeners.
    pub inbound: Vec<Inbound>,
    /// Outbound listeners.
    pub outbound: Vec<Outbound>,
    /// Transparent mode, if configured.
    pub transparent: Option<Transparent>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = meshid_api::config::read_toml(path)?;
        Config::try_from(raw)
    }
}

fn socket_addr(key: String, value: Option<&str>) -> Result<SocketAddr, ConfigError> {
    let v = value.ok_or_else(|| invalid(key.clone(), "required"))?;
    v.parse().map_err(|_| {
        invalid(
            key,
            format!("{v:?} is not an IP:port address (for example 127.0.0.1:15001)"),
        )
    })
}

fn host_port(key: String, value: Option<&str>) -> Result<(String, u16), ConfigError> {
    let v = value.ok_or_else(|| invalid(key.clone(), "required"))?;
    let port = v
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(key, format!("{v:?} is not host:port")))?;
    Ok((v.to_owned(), port))
}

fn duration(
    value: Option<Duration>,
    default: Duration,
    key: &str,
) -> Result<Duration, ConfigError> {
    let d = value.unwrap_or(default);
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let workload_api_socket = raw
            .workload_api_socket
            .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
            .unwrap_or_else(|| DEFAULT_WORKLOAD_API_SOCKET.to_owned());
        if !workload_api_socket.starts_with("unix:") && !workload_api_socket.starts_with("tcp:") {
            return Err(invalid(
                "workload_api_socket",
                format!("{workload_api_socket:?} is not unix:///path (or tcp://ip:port)"),
            ));
        }
        let spiffe_id = raw
            .spiffe_id
            .map(|s| {
                meshid_api::id::parse(&s).map_err(|e| invalid("spiffe_id", format!("{s:?}: {e}")))
            })
            .transpose()?;
        let ops_address = socket_addr(
            "ops_address".into(),
            Some(raw.ops_address.as_deref().unwrap_or(DEFAULT_OPS_ADDRESS)),
        )?;
        let access_log = match raw.access_log.as_deref() {
            None | Some("stdout") => AccessLog::Stdout,
            Some("stderr") => AccessLog::Stderr,
            Some("off") => AccessLog::Off,
            Some("") => {
                return Err(invalid(
                    "access_log",
                    "empty: use off, stdout, stderr or a path",
                ))
            }
            Some(path) => AccessLog::File(PathBuf::from(path)),
        };
        let log_json = meshid_api::config::log_json(raw.log_format.as_deref())?;
        let mut federated_trust_domains = Vec::new();
        for td in &raw.federated_trust_domains {
            federated_trust_domains.push(
                TrustDomain::new(td)
                    .map_err(|e| invalid("federated_trust_domains", format!("{td:?}: {e}")))?,
            );
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut check_unique = |kind: &str, i: usize, name: &str, addr: SocketAddr| {
            if !names.insert(name.to_owned()) {
                return Err(invalid(
                    format!("{kind}[{i}].name"),
                    format!("{name:?} is used by another listener"),
                ));
            }
            if !addrs.insert(addr) {
                return Err(invalid(
                    format!("{kind}[{i}].listen"),
                    format!("{addr} is used by another listener"),
                ));
            }
            Ok(())
        };
        let mut inbound = Vec::new();
        for (i, l) in raw.inbound.into_iter().enumerate() {
            let key = |f: &str| format!("inbound[{i}].{f}");
            let name = l.name.unwrap_or_else(|| format!("inbound-{i}"));
            let listen = socket_addr(key("listen"), l.listen.as_deref())?;
            let (forward_to, forward_port) = host_port(key("forward_to"), l.forward_to.as_deref())?;
            let protocol = match l.protocol.as_deref() {
                None | Some("detect") => InboundProtocol::Detect,
                Some("http") => InboundProtocol::Http,
                Some("tcp") => InboundProtocol::Tcp,
                Some(other) => {
                    return Err(invalid(
                        key("protocol"),
                        format!("{other:?}: use detect, http or tcp"),
                    ))
                }
            };
            check_unique("inbound", i, &name, listen)?;
            inbound.push(Inbound {
                name,
                listen,
                forward_to,
                port: l.port.unwrap_or(forward_port),
                protocol,
            });
        }
        let mut outbound = Vec::new();
        for (i, l) in raw.outbound.into_iter().enumerate() {
            let key = |f: &str| format!("outbound[{i}].{f}");
            let name = l.name.unwrap_or_else(|| format!("outbound-{i}"));
            let listen = socket_addr(key("listen"), l.listen.as_deref())?;
            let (upstream, _) = host_port(key("upstream"), l.upstream.as_deref())?;
            let expect_raw = l.expect.ok_or_else(|| {
                invalid(
                    key("expect"),
                    "required: the SPIFFE ID (or pattern) the upstream must present",
                )
            })?;
            let expect = expect_raw
                .parse::<Pattern>()
                .map_err(|e| invalid(key("expect"), format!("{expect_raw:?}: {e}")))?;
            check_unique("outbound", i, &name, listen)?;
            outbound.push(Outbound {
                name,
                listen,
                upstream,
                expect,
            });
        }
        let transparent = raw
            .transparent
            .map(|t| {
                let t = transparent(t)?;
                check_unique("transparent", 0, "transparent-outbound", t.outbound_listen)?;
                check_unique("transparent", 1, "transparent-inbound", t.inbound_listen)?;
                Ok::<_, ConfigError>(t)
            })
            .transpose()?;
        if inbound.is_empty() && outbound.is_empty() && transparent.is_none() {
            return Err(invalid(
                "inbound/outbound",
                "no listeners: add an [[inbound]], [[outbound]] or [transparent] table",
            ));
        }
        if let Some(t) = &transparent {
            if let Some(l) = inbound.iter().find(|l| t.tcp_ports.contains(&l.port)) {
                // A port is one protocol for the policy: opaque here, HTTP there cannot both hold.
                if l.protocol == InboundProtocol::Http {
                    return Err(invalid(
                        "transparent.tcp_ports",
                        format!("port {} is served as http by inbound {:?}", l.port, l.name),
                    ));
                }
            }
        }
        let policy_from_agent = match raw.policy_source.as_deref() {
            None | Some("file") => false,
            Some("agent") => {
                if raw.policy_file.is_some() {
                    return Err(invalid(
                        "policy_source",
                        "\"agent\" takes the policy from the node agent: remove policy_file, or \
                         set policy_source = \"file\"",
                    ));
                }
                true
            }
            Some(other) => {
                return Err(invalid(
                    "policy_source",
                    format!("{other:?}: use \"file\" or \"agent\""),
                ))
            }
        };
        if raw.policy_cache.is_some() && !policy_from_agent {
            return Err(invalid(
                "policy_cache",
                "keeps the policy received from the agent: set policy_source = \"agent\", or \
                 remove policy_cache",
            ));
        }
        Ok(Config {
            workload_api_socket,
            spiffe_id,
            ops_address,
            policy_file: raw.policy_file,
            policy_from_agent,
            policy_cache: raw.policy_cache,
            access_log,
            log_json,
            drain_timeout: duration(raw.drain_timeout, Duration::from_secs(10), "drain_timeout")?,
            handshake_timeout: duration(
                raw.handshake_timeout,
                Duration::from_secs(10),
                "handshake_timeout",
            )?,
            detect_timeout: duration(
                raw.detect_timeout,
                Duration::from_millis(200),
                "detect_timeout",
            )?,
            connect_timeout: duration(
                raw.connect_timeout,
                Duration::from_secs(5),
                "connect_timeout",
            )?,
            federated_trust_domains,
            worker_threads: match raw.worker_threads {
                None => 1,
                Some(n @ 1..=256) => n,
                Some(n) => return Err(invalid("worker_threads", format!("{n}: use 1 to 256"))),
            },
            max_connections: match raw.max_connections {
                None => None,
                Some(n @ 1..=1_000_000) => Some(n),
                Some(n) => {
                    return Err(invalid("max_connections", format!("{n}: use 1 to 1000000")))
                }
            },
            max_handshakes: match raw.max_handshakes {
                None => 1024,
                Some(n @ 1..=1_000_000) => n,
                Some(n) => return Err(invalid("max_handshakes", format!("{n}: use 1 to 1000000"))),
            },
            max_handshakes_per_source: match raw.max_handshakes_per_source {
                None => 16,
                Some(n @ 1..=1_000_000) => n,
                Some(n) => {
                    return Err(invalid(
                        "max_handshakes_per_source",
                        format!("{n}: use 1 to 1000000"),
                    ))
                }
            },
            idle_timeout: duration(raw.idle_timeout, Duration::from_secs(3600), "idle_timeout")?,
            http_header_timeout: duration(
                raw.http_header_timeout,
                Duration::from_secs(30),
                "http_header_timeout",
            )?,
            http_max_header_bytes: match raw.http_max_header_bytes {
                None => 64 * 1024,
                Some(n @ 8192..=16_777_216) => n,
                Some(n) => {
                    return Err(invalid(
                        "http_max_header_bytes",
                        format!("{n}: use 8192 to 16777216"),
                    ))
                }
            },
            http_max_headers: match raw.http_max_headers {
                None => 100,
                Some(n @ 1..=10_000) => n,
                Some(n) => return Err(invalid("http_max_headers", format!("{n}: use 1 to 10000"))),
            },
            http_max_requests_per_connection: match raw.http_max_requests_per_connection {
                None => None,
                Some(n @ 1..=4_294_967_295) => Some(n),
                Some(n) => {
                    return Err(invalid(
                        "http_max_requests_per_connection",
                        format!("{n}: use 1 to 4294967295"),
                    ))
                }
            },
            inbound,
            outbound,
            transparent,
        })
    }
}

fn pattern(key: &str, value: &str) -> Result<Pattern, ConfigError> {
    value
        .parse::<Pattern>()
        .map_err(|e| invalid(key, format!("{value:?}: {e}")))
}

fn transparent(t: RawTransparent) -> Result<Transparent, ConfigError> {
    let outbound_listen = socket_addr(
        "transparent.outbound_listen".into(),
        Some(
            t.outbound_listen
                .as_deref()
                .unwrap_or(DEFAULT_TRANSPARENT_OUTBOUND),
        ),
    )?;
    let inbound_listen = socket_addr(
        "transparent.inbound_listen".into(),
        Some(
            t.inbound_listen
                .as_deref()
                .unwrap_or(DEFAULT_TRANSPARENT_INBOUND),
        ),
    )?;
    let inbound_mode = match t.inbound_mode.as_deref() {
        None | Some("strict") => InboundMode::Strict,
        Some("permissive") => InboundMode::Permissive,
        Some(other) => {
            return Err(invalid(
                "transparent.inbound_mode",
                format!("{other:?}: use strict or permissive"),
            ))
        }
    };
    let inbound_forward = match t.inbound_forward.as_deref() {
        None | Some("original") => InboundForward::Original,
        Some("loopback") => InboundForward::Loopback,
        Some(other) => {
            return Err(invalid(
                "transparent.inbound_forward",
                format!("{other:?}: use original or loopback"),
            ))
        }
    };
    let mut mesh_cidrs = Vec::new();
    for c in &t.mesh_cidrs {
        mesh_cidrs.push(
            c.parse::<Cidr>()
                .map_err(|e| invalid("transparent.mesh_cidrs", e))?,
        );
    }
    let expect = t
        .expect
        .as_deref()
        .map(|e| pattern("transparent.expect", e))
        .transpose()?;
    if !mesh_cidrs.is_empty() && expect.is_none() {
        return Err(invalid(
            "transparent.expect",
            "required with mesh_cidrs: the SPIFFE ID (or pattern, e.g. spiffe://example.org/**) \
             servers there must present",
        ));
    }
    let mut destinations = Vec::new();
    for (i, d) in t.destinations.into_iter().enumerate() {
        let key = |f: &str| format!("transparent.destinations[{i}].{f}");
        let address = d
            .address
            .ok_or_else(|| invalid(key("address"), "required"))?;
        let (ip, port) = match address.parse::<SocketAddr>() {
            Ok(sa) => (sa.ip(), Some(sa.port())),
            Err(_) => (
                address.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        key("address"),
                        format!("{address:?} is not IP:port or an IP"),
                    )
                })?,
                None,
            ),
        };
        let expect_raw = d.expect.ok_or_else(|| {
            invalid(
                key("expect"),
                "required: the SPIFFE ID (or pattern) the server must present",
            )
        })?;
        destinations.push(Destination {
            ip,
            port,
            expect: pattern(&key("expect"), &expect_raw)?,
        });
    }
    if t.mark == Some(0) {
        return Err(invalid(
            "transparent.mark",
            "0 is the unmarked default; use a non-zero mark",
        ));
    }
    Ok(Transparent {
        outbound_listen,
        inbound_listen,
        inbound_mode,
        inbound_forward,
        mark: t.mark,
        mesh_cidrs,
        expect,
        tcp_ports: t.tcp_ports,
        destinations,
    })
}

#[cfg(test)]
mod tests;
