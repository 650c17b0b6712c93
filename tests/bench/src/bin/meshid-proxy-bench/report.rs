//! The report: medians of the rounds, ratios to the baseline, Markdown tables and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::*;
use crate::contenders::*;
use crate::load::*;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Picks one number out of a measurement.
pub(crate) type Metric = fn(&Measure) -> f64;

/// All rounds of one (scenario, contender) cell.
pub(crate) type Cells = BTreeMap<(&'static str, &'static str), Vec<Result<Measure, String>>>;

/// The per-metric medians of a cell, or `None` if any round failed (or none ran).
pub(crate) fn med(
    cells: &Cells,
    scenario: &'static str,
    contender: &'static str,
) -> Option<Measure> {
    let rounds = cells.get(&(scenario, contender))?;
    let ok: Vec<&Measure> = rounds.iter().filter_map(|r| r.as_ref().ok()).collect();
    if ok.is_empty() || ok.len() != rounds.len() {
        return None;
    }
    let m = |f: fn(&Measure) -> f64| median(ok.iter().map(|x| f(x)).collect());
    let hops = ok[0].rss_peak_kib.len();
    Some(Measure {
        rps: m(|x| x.rps),
        mb_s: m(|x| x.mb_s),
        p50_us: m(|x| x.p50_us),
        p90_us: m(|x| x.p90_us),
        p99_us: m(|x| x.p99_us),
        p999_us: m(|x| x.p999_us),
        max_us: m(|x| x.max_us),
        requests: m(|x| x.requests as f64) as u64,
        bytes: m(|x| x.bytes as f64) as u64,
        duration_s: m(|x| x.duration_s),
        proxy_cpu_s: m(|x| x.proxy_cpu_s),
        backend_accepts: m(|x| x.backend_accepts as f64) as u64,
        passive_opens: m(|x| x.passive_opens as f64) as u64,
        // Peaks: the maximum over the rounds.
        rss_peak_kib: (0..hops)
            .map(|i| ok.iter().map(|x| x.rss_peak_kib[i]).max().unwrap_or(0))
            .collect(),
        rss_peak_sum_kib: ok.iter().map(|x| x.rss_peak_sum_kib).max().unwrap_or(0),
        foreign_cores: m(|x| x.foreign_cores),
    })
}

pub(crate) fn fmt_ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

pub(crate) fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub(crate) fn fmt_ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

/// "median (min–max)" of one metric over the successful rounds.
pub(crate) fn spread(
    rounds: &[Result<Measure, String>],
    f: fn(&Measure) -> f64,
    digits: usize,
) -> String {
    let v: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(f)
        .collect();
    if v.len() < 2 {
        return String::new();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(" ({lo:.digits$}–{hi:.digits$})")
}

/// The state of a contender that could not run, or its hops.
pub(crate) enum Slot {
    Running(Contender),
    Unavailable(&'static str, String),
}

impl Slot {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Slot::Running(c) => c.name,
            Slot::Unavailable(n, _) => n,
        }
    }
}

/// The RSS of each running contender's hops idle after all load, and their VmHWM sum.
pub(crate) struct AfterLoad {
    pub(crate) rss_sum_kib: u64,
    pub(crate) hwm_sum_kib: u64,
}

pub(crate) struct Report<'a> {
    pub(crate) opts: &'a Opts,
    pub(crate) slots: &'a [Slot],
    pub(crate) cells: &'a Cells,
    pub(crate) after: &'a BTreeMap<&'static str, AfterLoad>,
    pub(crate) env: Value,
}

impl Report<'_> {
    pub(crate) fn loads(&self) -> Vec<&'static str> {
        self.opts
            .scenarios
            .iter()
            .copied()
            .filter(|s| LOADS.contains(s))
            .collect()
    }

    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let o = self.opts;
        let _ = writeln!(
            md,
            "## meshid-proxy vs haproxy vs stunnel, two hops of mTLS on loopback\n"
        );
        let _ = writeln!(
            md,
            "{} per cell after a {} warm-up, {} round(s) interleaved, medians; wrk {} thread(s); \
             TLS 1.3 {} for haproxy and stunnel; resumption for haproxy/stunnel {}; {}.\n",
            fmt_dur(o.duration),
            fmt_dur(o.warmup),
            o.rounds,
            o.wrk_threads,
            o.ciphersuite,
            if o.resumption { "on" } else { "off" },
            self.env["machine"].as_str().unwrap_or(""),
        );
        for slot in self.slots {
            if let Slot::Unavailable(name, why) = slot {
                let _ = writeln!(md, "**{name}: not run**: {}\n", one_line(why));
            }
        }
        let running: Vec<&Contender> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Running(c) => Some(c),
                Slot::Unavailable(..) => None,
            })
            .collect();
        md.push_str(&self.tls_table(&running));
        for scenario in self.loads() {
            let load = load_of(scenario);
            let title = match scenario {
                "keepalive16" | "keepalive64" => format!(
                    "### Keep-alive, 1 KiB responses, {} connections (`{scenario}`)",
                    load.conns
                ),
                "bulk" => format!(
                    "### Bulk, 1 MiB responses, {} keep-alive connections (`bulk`)",
                    load.conns
                ),
                _ => format!(
                    "### New connection per request, 1 KiB responses, {} at a time (`newconn`)",
                    load.conns
                ),
            };
            let _ = writeln!(md, "{title}\n");
            let mut head = vec!["contender"];
            head.extend(match scenario {
                "bulk" => vec!["MB/s (min–max)", "p50", "p99", "proxy CPU ms per MB"],
                "newconn" => vec![
                    "connections/s (min–max)",
                    "p50",
                    "p99",
                    "proxy CPU µs per connection",
                    "nginx accepts per request",
                    "all accepts per request",
                ],
                _ => vec![
                    "requests/s (min–max)",
                    "p50",
                    "p99",
                    "proxy CPU µs per request",
                ],
            });
            head.extend(["vs direct", "others' CPU"]);
            let _ = writeln!(
                md,
                "| {} |\n|{}",
                head.join(" | "),
                "---|".repeat(head.len())
            );
            let direct = med(self.cells, scenario, "direct");
            for c in &running {
                let rounds = self
                    .cells
                    .get(&(scenario, c.name))
                    .map_or(&[][..], Vec::as_slice);
                let Some(m) = med(self.cells, scenario, c.name) else {
                    let failed = rounds.iter().filter(|r| r.is_err()).count();
                    let _ = writeln!(
                        md,
                        "| {} | **FAILED** ({failed}/{} rounds) |{}",
                        c.name,
                        rounds.len(),
                        " |".repeat(head.len() - 2)
                    );
                    continue;
                };
                let cpu = |v: f64| {
                    if c.hops.is_empty() {
                        "–".to_owned()
                    } else {
                        format!("{v:.1}")
                    }
                };
                let per = |n: u64| format!("{:.2}", n as f64 / m.requests.max(1) as f64);
                let vs_direct =
                    |f: fn(&Measure) -> f64| fmt_ratio(f(&m), direct.as_ref().map_or(f64::NAN, f));
                let mut row = vec![c.name.to_owned()];
                match scenario {
                    "bulk" => row.extend([
                        format!("{:.1}{}", m.mb_s, spread(rounds, |x| x.mb_s, 1)),
                        fmt_ms(m.p50_us),
                        fmt_ms(m.p99_us),
                        cpu(m.proxy_cpu_s * 1e3 / (m.bytes as f64 / 1e6)),
                        vs_direct(|x| x.mb_s),
                    ]),
                    "newconn" => row.extend([
                        format!("{:.0}{}", m.rps, spread(rounds, |x| x.rps, 0)),
                        fmt_ms(m.p50_us),
                        fmt_ms(m.p99_us),
                        cpu(m.cpu_us_per_req()),
                        per(m.backend_accepts),
                        per(m.passive_opens),
                        vs_direct(|x| x.rps),
                    ]),
                    _ => row.extend([
                        format!("{:.0}{}", m.rps, spread(rounds, |x| x.rps, 0)),
                        fmt_ms(m.p50_us),
                        fmt_ms(m.p99_us),
                        cpu(m.cpu_us_per_req()),
                        vs_direct(|x| x.rps),
                    ]),
                }
                row.push(format!("{:.2} cores", m.foreign_cores));
                let _ = writeln!(md, "| {} |", row.join(" | "));
            }
            if scenario == "newconn" {
                let _ = writeln!(
                    md,
                    "\nAccepts per request: nginx's own counter, and the machine's TCP \
                     PassiveOpens (approximate: anything else on the machine counts too). A \
                     two-hop chain that opens one mTLS connection per client connection \
                     accepts 3 per request (hop 1, hop 2, nginx); direct 1."
                );
            }
            let _ = writeln!(md);
        }
        if !self.loads().is_empty() {
            md.push_str(
                "Proxy CPU: user + system time of the two hops over the measured run. Others' \
                 CPU: what the rest of the machine used meanwhile (approximate, from /proc/stat; \
                 median over the rounds); above about 0.1 cores, other work was competing and the cell is noisy.\n\n",
            );
        }
        if o.scenarios.contains(&"rss") {
            md.push_str(&self.rss_table(&running));
        }
        md.push_str(&self.ratio_table(&running));
        let failures: Vec<String> = self
            .cells
            .iter()
            .flat_map(|((s, c), rounds)| {
                rounds.iter().enumerate().filter_map(move |(i, r)| {
                    r.as_ref()
                        .err()
                        .map(|e| format!("- `{s}` / `{c}` round {}: {}", i + 1, one_line(e)))
                })
            })
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(md, "### Failures\n\n{}\n", failures.join("\n"));
        }
        md
    }

    pub(crate) fn tls_table(&self, running: &[&Contender]) -> String {
        let mut md = String::from(
            "### Hop 2 TLS, as `openssl s_client` (offering meshid's suite order, no client \
             certificate) sees it\n\n\
             | contender | protocol | ciphersuite | group | server signature \
             | refused without a client certificate |\n\
             |---|---|---|---|---|---|\n",
        );
        for c in running.iter().filter(|c| c.mtls_port != 0) {
            let _ = match &c.tls {
                Some(t) => writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.name,
                    t.protocol,
                    t.cipher,
                    t.group,
                    t.signature,
                    if t.rejected_without_cert {
                        "yes"
                    } else {
                        "**no**"
                    }
                ),
                None => writeln!(md, "| {} | check failed | | | | |", c.name),
            };
        }
        md.push('\n');
        md
    }

    pub(crate) fn rss_table(&self, running: &[&Contender]) -> String {
        let mut md = String::from(
            "### Memory (`rss`): VmRSS of the two hops\n\n\
             | contender | hop 1 idle | hop 2 idle | sum idle |",
        );
        let loads = self.loads();
        for s in &loads {
            let _ = write!(md, " sum peak `{s}` |");
        }
        md.push_str(
            " sum idle after load | sum VmHWM | threads hop 1 / hop 2 |\n|---|---|---|---|",
        );
        for _ in &loads {
            md.push_str("---|");
        }
        md.push_str("---|---|---|\n");
        for c in running.iter().filter(|c| !c.hops.is_empty()) {
            let idle: u64 = c.hops.iter().map(|h| h.idle_rss_kib).sum();
            let _ = write!(
                md,
                "| {} | {} | {} | {} |",
                c.name,
                fmt_mib(c.hops[0].idle_rss_kib),
                fmt_mib(c.hops[1].idle_rss_kib),
                fmt_mib(idle)
            );
            for s in &loads {
                let ok: Vec<&Measure> = self
                    .cells
                    .get(&(*s, c.name))
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_ref().ok())
                    .collect();
                let peak = ok.iter().map(|m| m.rss_peak_sum_kib).max();
                let hop = |i: usize| {
                    ok.iter()
                        .filter_map(|m| m.rss_peak_kib.get(i).copied())
                        .max()
                        .unwrap_or(0) as f64
                        / 1024.0
                };
                let _ = write!(
                    md,
                    " {} |",
                    peak.map_or("–".into(), |p| format!(
                        "{} ({:.1} + {:.1})",
                        fmt_mib(p),
                        hop(0),
                        hop(1)
                    ))
                );
            }
            let after = self.after.get(c.name);
            let _ = writeln!(
                md,
                " {} | {} | {} / {} |",
                after.map_or("–".into(), |a| fmt_mib(a.rss_sum_kib)),
                after.map_or("–".into(), |a| fmt_mib(a.hwm_sum_kib)),
                c.hops[0].threads,
                c.hops[1].threads,
            );
        }
        md.push_str(
            "\nIdle: after start and readiness, before any connection through the hops. Peaks: \
             the highest sum (hop 1 + hop 2, each its own highest) sampled every 100 ms \
             during the scenario's measured runs (processes live through the whole bench, so a \
             peak can include memory kept from an earlier \
             scenario). Threads: at idle (stunnel starts a thread per connection).\n\n",
        );
        md
    }

    pub(crate) fn ratio_table(&self, running: &[&Contender]) -> String {
        let names: Vec<&str> = running.iter().map(|c| c.name).collect();
        let meshes: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.starts_with("meshid"))
            .collect();
        let bases: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !n.starts_with("meshid"))
            .collect();
        if meshes.is_empty() || bases.is_empty() {
            return String::new();
        }
        let loads = self.loads();
        let mut md = String::from(
            "### Ratios meshid / other (throughput: higher is better for meshid; latency and \
             memory: lower is better)\n\n| pair |",
        );
        let mut rule = String::from("|---|");
        let mut cols: Vec<(&str, &str, Metric)> = Vec::new();
        for s in &loads {
            match *s {
                "bulk" => cols.push((s, "MB/s", |m| m.mb_s)),
                "newconn" => cols.push((s, "conn/s", |m| m.rps)),
                _ => {
                    cols.push((s, "req/s", |m| m.rps));
                    cols.push((s, "p99", |m| m.p99_us));
                }
            }
        }
        for (s, what, _) in &cols {
            let _ = write!(md, " `{s}` {what} |");
            rule.push_str("---|");
        }
        let rss = self.opts.scenarios.contains(&"rss");
        if rss {
            md.push_str(" idle RSS |");
            rule.push_str("---|");
        }
        let _ = writeln!(md, "\n{rule}");
        let idle = |n: &str| -> f64 {
            running.iter().find(|c| c.name == n).map_or(f64::NAN, |c| {
                c.hops.iter().map(|h| h.idle_rss_kib).sum::<u64>() as f64
            })
        };
        for m in &meshes {
            for b in &bases {
                let fair = match (*m, *b) {
                    ("meshid-tcp", "haproxy-tcp" | "stunnel") => " (apples to apples, L4)",
                    ("meshid-detect", "haproxy-http") => " (apples to apples, L7 on hop 2)",
                    _ => "",
                };
                let _ = write!(md, "| {m} / {b}{fair} |");
                for (s, _, f) in &cols {
                    let a = med(self.cells, s, m).map_or(f64::NAN, |x| f(&x));
                    let z = med(self.cells, s, b).map_or(f64::NAN, |x| f(&x));
                    let _ = write!(md, " {} |", fmt_ratio(a, z));
                }
                if rss {
                    let cell = if *b == "direct" {
                        "–".into()
                    } else {
                        fmt_ratio(idle(m), idle(b))
                    };
                    let _ = write!(md, " {cell} |");
                }
                md.push('\n');
            }
        }
        md.push_str(
            "\nDESIGN.md section 10 targets, two hops: keep-alive requests/s ≥ 1.25 × haproxy's \
             and stunnel's, p99 ≤ haproxy's (ratio ≤ 1), bulk ≥ 1.5 × haproxy's, new connections/s \
             ≥ 3 × haproxy's, idle RSS under 10 MB per proxy.\n\n",
        );
        md
    }

    pub(crate) fn json(&self) -> Value {
        let o = self.opts;
        let contenders: Vec<Value> = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Unavailable(n, why) => json!({"name": n, "available": false, "error": why}),
                Slot::Running(c) => json!({
                    "name": c.name,
                    "available": true,
                    "hop2_tls": c.tls.as_ref().map(|t| json!({
                        "protocol": t.protocol,
                        "ciphersuite": t.cipher,
                        "group": t.group,
                        "signature": t.signature,
                        "rejected_without_client_cert": t.rejected_without_cert,
                    })),
                    "hops": c.hops.iter().map(|h| json!({
                        "role": h.role,
                        "idle_rss_kib": h.idle_rss_kib,
                        "threads": h.threads,
                    })).collect::<Vec<_>>(),
                    "after_load": self.after.get(c.name).map(|a| json!({
                        "rss_sum_kib": a.rss_sum_kib,
                        "hwm_sum_kib": a.hwm_sum_kib,
                    })),
                }),
            })
            .collect();
        let mut results = serde_json::Map::new();
        for ((s, c), rounds) in self.cells {
            let entry = results
                .entry(s.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap();
            entry.insert(
                c.to_string(),
                json!({
                    "median": med(self.cells, s, c).map(|m| m.to_json()),
                    "rounds": rounds.iter().map(|r| match r {
                        Ok(m) => m.to_json(),
                        Err(e) => json!({"error": e}),
                    }).collect::<Vec<_>>(),
                }),
            );
        }
        json!({
            "bench": "meshid-proxy-bench",
            "settings": {
                "duration_s": o.duration.as_secs_f64(),
                "warmup_s": o.warmup.as_secs_f64(),
                "rounds": o.rounds,
                "wrk_threads": o.wrk_threads,
                "tls_resumption_haproxy_stunnel": o.resumption,
                "ciphersuite": o.ciphersuite,
                "scenarios": o.scenarios,
            },
            "environment": self.env,
            "contenders": contenders,
            "results": results,
        })
    }
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// An error on one line, shortened, for a Markdown paragraph.
pub(crate) fn one_line(s: &str) -> String {
    let flat = s.lines().map(str::trim).collect::<Vec<_>>().join(" / ");
    if flat.chars().count() > 600 {
        format!("{}…", flat.chars().take(600).collect::<String>())
    } else {
        flat
    }
}
