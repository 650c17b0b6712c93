//! Load: wrk with a Lua `done()` hook that prints the summary as JSON.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::procs::{register_pid, unregister_pid};

/// wrk's `done()` hook: one line, `MESHID_WRK {json}`, with the counts, errors and latency
/// percentiles (µs) that [`run_wrk`] reads.
pub const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "MESHID_WRK {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d," ..
    "\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d," ..
    "\"p999_us\":%d,\"max_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"#;

/// What a load scenario sends.
pub struct Load {
    /// Connections wrk keeps open (`-c`).
    pub conns: usize,
    /// The path requested.
    pub path: &'static str,
    /// The response body's size: the bytes received must hold it for every request.
    pub body: u64,
    /// `Connection: close` on every request: each on a new connection.
    pub close: bool,
}

/// wrk's summary.
#[derive(Debug, Clone, Default)]
pub struct WrkOut {
    /// Requests completed.
    pub requests: u64,
    /// How long wrk ran, in seconds.
    pub duration_s: f64,
    /// Bytes received.
    pub bytes: u64,
    /// Errors by kind: `connect`, `read`, `write`, `status` (above 399) and `timeout`.
    pub errors: BTreeMap<&'static str, u64>,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// The slowest request, µs.
    pub max_us: f64,
}

/// Runs wrk (`cmd`: the program, perhaps behind `ip netns exec`) with `script` (holding
/// [`WRK_SCRIPT`]) against `base` (`http://host:port`) followed by the load's path, calling
/// `tick` every 100 ms while it runs.
pub fn run_wrk(
    mut cmd: Command,
    script: &Path,
    base: &str,
    load: &Load,
    threads: usize,
    duration: Duration,
    mut tick: impl FnMut(),
) -> Result<WrkOut, String> {
    let secs = duration.as_secs_f64().ceil().max(1.0) as u64;
    let mut args: Vec<String> = vec![
        "-t".into(),
        threads.min(load.conns).to_string(),
        "-c".into(),
        load.conns.to_string(),
        "-d".into(),
        format!("{secs}s"),
        "--timeout".into(),
        "5s".into(),
        "-s".into(),
        script.display().to_string(),
    ];
    if load.close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(format!("{base}{}", load.path));
    let mut child = cmd
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start wrk: {e}"))?;
    register_pid(child.id());
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err("wrk did not finish 30 s after its duration".to_owned());
            }
            Ok(None) => {
                tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => break Err(format!("wait for wrk: {e}")),
        }
    };
    unregister_pid(child.id());
    let status = status?;
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("MESHID_WRK "))
        .ok_or_else(|| format!("wrk ({status}) printed no summary: {out}{err}"))?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("wrk summary {line}: {e}"))?;
    let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut errors = BTreeMap::new();
    for k in ["connect", "read", "write", "status", "timeout"] {
        errors.insert(k, n(k) as u64);
    }
    Ok(WrkOut {
        requests: n("requests") as u64,
        duration_s: n("duration_us") / 1e6,
        bytes: n("bytes") as u64,
        errors,
        p50_us: n("p50_us"),
        p90_us: n("p90_us"),
        p99_us: n("p99_us"),
        p999_us: n("p999_us"),
        max_us: n("max_us"),
    })
}

impl WrkOut {
    /// `Err` if wrk saw any error (connect, read, write, timeout, or a status above 399), no
    /// request completed, or the bytes fall short of `body` bytes per request.
    pub fn check(&self, body: u64, what: &str) -> Result<(), String> {
        let bad: Vec<String> = self
            .errors
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !bad.is_empty() {
            return Err(format!(
                "{what}: wrk errors ({}) in {} requests",
                bad.join(", "),
                self.requests
            ));
        }
        if self.requests == 0 {
            return Err(format!("{what}: no request completed"));
        }
        if self.bytes < self.requests * body {
            return Err(format!(
                "{what}: {} bytes for {} requests, less than the {}-byte bodies",
                self.bytes, self.requests, body
            ));
        }
        Ok(())
    }
}
