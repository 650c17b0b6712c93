//! Load: each scenario's wrk load, and a measured cell (wrk itself: `meshid_bench::wrk`).

use std::path::Path;
use std::process::Command;

use meshid_bench::wrk::*;
use serde_json::{json, Value};

use crate::backend::*;
use crate::cli::*;
use crate::contenders::*;
use crate::measure::*;

pub(crate) fn load_of(scenario: &str) -> Load {
    match scenario {
        "keepalive16" => Load {
            conns: 16,
            path: "/1k",
            body: 1024,
            close: false,
        },
        "keepalive64" => Load {
            conns: 64,
            path: "/1k",
            body: 1024,
            close: false,
        },
        "bulk" => Load {
            conns: 4,
            path: "/1m",
            body: 1 << 20,
            close: false,
        },
        "newconn" => Load {
            conns: 16,
            path: "/1k",
            body: 1024,
            close: true,
        },
        other => panic!("not a load scenario: {other}"),
    }
}

/// One measured cell.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measure {
    pub(crate) rps: f64,
    pub(crate) mb_s: f64,
    pub(crate) p50_us: f64,
    pub(crate) p90_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
    pub(crate) max_us: f64,
    pub(crate) requests: u64,
    pub(crate) bytes: u64,
    pub(crate) duration_s: f64,
    /// CPU seconds of both hops together over the measured run.
    pub(crate) proxy_cpu_s: f64,
    /// nginx accepts over the measured run.
    pub(crate) backend_accepts: u64,
    /// Machine-wide TCP accepts over the measured run.
    pub(crate) passive_opens: u64,
    /// Peak VmRSS of each hop and of their sum, sampled every 100 ms.
    pub(crate) rss_peak_kib: Vec<u64>,
    pub(crate) rss_peak_sum_kib: u64,
    /// CPU used on the machine by anything but this bench, wrk, the hops and nginx, in cores,
    /// averaged over the measured run (other engineers' builds: noise).
    pub(crate) foreign_cores: f64,
}

impl Measure {
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "requests_per_s": self.rps,
            "mb_per_s": self.mb_s,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "requests": self.requests,
            "bytes": self.bytes,
            "duration_s": self.duration_s,
            "proxy_cpu_s": self.proxy_cpu_s,
            "proxy_cpu_us_per_request": self.cpu_us_per_req(),
            "backend_accepts": self.backend_accepts,
            "passive_opens": self.passive_opens,
            "rss_peak_kib": self.rss_peak_kib,
            "rss_peak_sum_kib": self.rss_peak_sum_kib,
            "foreign_cpu_cores": self.foreign_cores,
        })
    }

    pub(crate) fn cpu_us_per_req(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.proxy_cpu_s * 1e6 / self.requests as f64
        }
    }
}

/// Warm-up, then the measured run with CPU, accepts and RSS sampled around and during it.
pub(crate) fn run_cell(
    opts: &Opts,
    script: &Path,
    backend: &Backend,
    c: &mut Contender,
    scenario: &str,
) -> Result<Measure, String> {
    let load = load_of(scenario);
    c.check_alive()?;
    let check = |w: &WrkOut, what: &str| w.check(load.body, what);
    if !opts.warmup.is_zero() {
        let w = run_wrk(
            Command::new(WRK),
            script,
            &format!("http://127.0.0.1:{}", c.entry_port),
            &load,
            opts.wrk_threads,
            opts.warmup,
            || {},
        )?;
        check(&w, "warm-up")?;
    }
    let pids = c.pids();
    let cpu = |pids: &[u32]| pids.iter().filter_map(|p| cpu_secs(*p)).sum::<f64>();
    let mut peaks = vec![0u64; pids.len()];
    let mut peak_sum = 0u64;
    let mut sample = || {
        let now: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
        for (p, n) in peaks.iter_mut().zip(&now) {
            *p = (*p).max(*n);
        }
        peak_sum = peak_sum.max(now.iter().sum());
    };
    let accepts0 = backend.accepts();
    let opens0 = passive_opens();
    let nginx = backend.proc.pid();
    let ours = || {
        cpu(&pids) + cpu_secs(nginx).unwrap_or(0.0) + self_and_children_cpu_secs().unwrap_or(0.0)
    };
    let (busy0, ours0) = (machine_busy_secs(), ours());
    let cpu0 = cpu(&pids);
    let w = run_wrk(
        Command::new(WRK),
        script,
        &format!("http://127.0.0.1:{}", c.entry_port),
        &load,
        opts.wrk_threads,
        opts.duration,
        &mut sample,
    )?;
    sample();
    let (busy1, ours1) = (machine_busy_secs(), ours());
    let cpu1 = cpu(&pids);
    let opens1 = passive_opens();
    let accepts1 = backend.accepts();
    c.check_alive()?;
    check(&w, "measured run")?;
    let m = Measure {
        rps: w.requests as f64 / w.duration_s,
        mb_s: w.bytes as f64 / w.duration_s / 1e6,
        p50_us: w.p50_us,
        p90_us: w.p90_us,
        p99_us: w.p99_us,
        p999_us: w.p999_us,
        max_us: w.max_us,
        requests: w.requests,
        bytes: w.bytes,
        duration_s: w.duration_s,
        proxy_cpu_s: cpu1 - cpu0,
        // The status request itself is the one extra accept.
        backend_accepts: match (accepts0, accepts1) {
            (Some(a), Some(b)) => b.saturating_sub(a + 1),
            _ => 0,
        },
        passive_opens: match (opens0, opens1) {
            (Some(a), Some(b)) => b.saturating_sub(a + 1),
            _ => 0,
        },
        rss_peak_kib: peaks,
        rss_peak_sum_kib: peak_sum,
        foreign_cores: match (busy0, busy1) {
            (Some(a), Some(b)) => ((b - a) - (ours1 - ours0)).max(0.0) / w.duration_s,
            _ => f64::NAN,
        },
    };
    if load.close && c.name == "direct" && (m.backend_accepts as f64) < 0.9 * m.requests as f64 {
        return Err(format!(
            "wrk did not reconnect per request: {} nginx accepts for {} requests",
            m.backend_accepts, m.requests
        ));
    }
    Ok(m)
}
