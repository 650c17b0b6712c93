//! The command line: options, the contenders and the scenarios.

use std::path::PathBuf;
use std::time::Duration;

use meshid_bench::parse_duration;

/// The SPIFFE ID both hops of every contender present.
pub(crate) const BENCH_ID: &str = "spiffe://example.org/bench";
/// The TLS 1.3 ciphersuite meshid-proxy prefers (`proxy/src/tls.rs`, `provider()`), and so
/// negotiates between its own hops; haproxy and stunnel are pinned to it (`--ciphersuite`).
pub(crate) const DEFAULT_CIPHERSUITE: &str = "TLS_AES_128_GCM_SHA256";
/// meshid-proxy's client preference order, offered by the hop 2 TLS check.
pub(crate) const MESHID_CIPHERSUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
pub(crate) const HAPROXY: &str = "/usr/sbin/haproxy";
pub(crate) const STUNNEL: &str = "/usr/bin/stunnel4";
pub(crate) use meshid_bench::nginx::NGINX;
pub(crate) const WRK: &str = "wrk";

/// Every contender, in run order; `meshid-detect-log` only runs when named with `--only`.
pub(crate) const CONTENDERS: [&str; 11] = [
    "direct",
    "meshid-tcp",
    "meshid-detect",
    "meshid-tcp-2t",
    "meshid-detect-2t",
    "meshid-detect-log",
    "haproxy-tcp",
    "haproxy-http",
    "haproxy-plain",
    "nginx-stream",
    "stunnel",
];
pub(crate) const OPT_IN: [&str; 1] = ["meshid-detect-log"];
pub(crate) const SCENARIOS: [&str; 5] = ["keepalive16", "keepalive64", "bulk", "newconn", "rss"];
/// The load scenarios, in run order (`rss` is measured around and during them).
pub(crate) const LOADS: [&str; 4] = ["keepalive16", "keepalive64", "bulk", "newconn"];

/// The parsed command line.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) rounds: usize,
    pub(crate) contenders: Vec<&'static str>,
    pub(crate) scenarios: Vec<&'static str>,
    pub(crate) json: Option<PathBuf>,
    pub(crate) wrk_threads: usize,
    pub(crate) resumption: bool,
    pub(crate) ciphersuite: String,
    pub(crate) keep: bool,
}

pub(crate) const USAGE: &str =
    "usage: meshid-proxy-bench [--duration 10s] [--warmup 2s] [--rounds 3]
    [--only direct,meshid-tcp,meshid-detect,meshid-detect-log,haproxy-tcp,haproxy-http,stunnel]
      (a prefix names a family: --only meshid,haproxy)
    [--scenarios keepalive16,keepalive64,bulk,newconn,rss]
    [--wrk-threads 2] [--tls-resumption] [--ciphersuite TLS_AES_128_GCM_SHA256]
    [--json FILE] [--keep]";

pub(crate) fn usage_error(msg: &str) -> ! {
    eprintln!("{msg}\n{USAGE}");
    std::process::exit(64);
}

pub(crate) fn parse_list(value: &str, known: &[&'static str], what: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let matched: Vec<&'static str> = known
            .iter()
            .copied()
            .filter(|k| *k == item || k.starts_with(&format!("{item}-")))
            .filter(|k| *k == item || !OPT_IN.contains(k))
            .collect();
        if matched.is_empty() {
            usage_error(&format!("unknown {what} {item:?}"));
        }
        out.extend(matched);
    }
    // Keep the canonical order, without duplicates.
    known.iter().copied().filter(|k| out.contains(k)).collect()
}

pub(crate) fn parse_args() -> Opts {
    let mut opts = Opts {
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        rounds: 3,
        contenders: CONTENDERS
            .iter()
            .copied()
            .filter(|c| !OPT_IN.contains(c))
            .collect(),
        scenarios: SCENARIOS.to_vec(),
        json: None,
        wrk_threads: 2,
        resumption: false,
        ciphersuite: DEFAULT_CIPHERSUITE.to_owned(),
        keep: std::env::var_os("MESHID_BENCH_KEEP").is_some(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .unwrap_or_else(|| usage_error(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--duration" | "--warmup" => {
                let v = value();
                let d = parse_duration(&v)
                    .unwrap_or_else(|| usage_error(&format!("bad duration {v:?}")));
                if flag == "--duration" {
                    if d < Duration::from_secs(1) {
                        usage_error("--duration must be at least 1s");
                    }
                    opts.duration = d;
                } else {
                    opts.warmup = d;
                }
            }
            "--rounds" => {
                opts.rounds = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage_error("--rounds takes a positive integer"));
            }
            "--wrk-threads" => {
                opts.wrk_threads = value()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage_error("--wrk-threads takes a positive integer"));
            }
            "--only" => opts.contenders = parse_list(&value(), &CONTENDERS, "contender"),
            "--scenarios" => opts.scenarios = parse_list(&value(), &SCENARIOS, "scenario"),
            "--json" => opts.json = Some(PathBuf::from(value())),
            "--ciphersuite" => opts.ciphersuite = value(),
            "--tls-resumption" => opts.resumption = true,
            "--keep" => opts.keep = true,
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                std::process::exit(0);
            }
            other => usage_error(&format!("unknown argument {other:?}")),
        }
    }
    if opts.contenders.is_empty() || opts.scenarios.is_empty() {
        usage_error("nothing to run");
    }
    opts
}
