//! Shipping the audit trail out of the datastore as it is committed: every record, in order,
//! to each configured sink ([`super::sink`]), with a signed checkpoint of the head at each
//! interval ([`super::checkpoint`]); and the counted summaries ([`super::summary`]) written
//! into the chain.
//!
//! Each sink keeps its own cursor (the last record it holds), so a sink that fails or falls
//! behind does not hold up issuance or the other sink: its lag is a metric, and the gap is
//! filled from the datastore when it is back. Before appending, the shipper checks that the
//! datastore's records still extend what the sink holds (the next record links to the last
//! shipped hash, every hash recomputes) and, before each checkpoint, that the record it
//! checkpoints is still there unchanged. When not, it writes a fault line, counts
//! `meshid_ca_audit_chain_faults_total`, and stops shipping to that sink: what it holds is the
//! evidence.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::checkpoint::CheckpointKey;
use super::export::{FaultLine, Line};
use super::sink::{Cursor, FileSink, SyslogSink};
use super::{AuditEvent, ChainVerifier};
use crate::metrics::SinkLabels;
use crate::service::Ca;

/// How often the datastore is read for new records.
pub const SHIP_INTERVAL: Duration = Duration::from_millis(250);
/// Records read per query.
const PAGE: i64 = 500;
/// The longest wait before a failed sink is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What `meshid-ca run` ships, built before the server starts (so that a checkpoint key that
/// cannot be read stops it with a clear error).
#[derive(Debug, Default)]
pub struct Shipping {
    /// The JSON-lines file.
    pub file: Option<PathBuf>,
    /// The syslog socket, and where its cursor is kept.
    pub syslog: Option<(PathBuf, PathBuf)>,
    /// The checkpoint key (present when a sink is).
    pub key: Option<Arc<CheckpointKey>>,
    /// How often a checkpoint is shipped.
    pub checkpoint_interval: Duration,
    /// How often summaries are recorded.
    pub summary_interval: Duration,
}

impl Shipping {
    /// From the configuration: loads (or makes) the checkpoint key when a sink is configured.
    pub fn load(
        config: &crate::config::AuditConfig,
        data_dir: &std::path::Path,
    ) -> Result<Self, super::checkpoint::KeyError> {
        let key = if config.file.is_some() || config.syslog.is_some() {
            Some(Arc::new(CheckpointKey::load_or_create(
                &config.checkpoint_key_file,
            )?))
        } else {
            None
        };
        Ok(Self {
            file: config.file.clone(),
            syslog: config
                .syslog
                .clone()
                .map(|s| (s, data_dir.join("audit-syslog.cursor"))),
            key,
            checkpoint_interval: config.checkpoint_interval,
            summary_interval: config.summary_interval,
        })
    }
}

/// Records shipped to the file per tick (so that a long gap is filled in steps, each short).
const FILE_PER_TICK: usize = 10_000;
/// Records sent to syslog per tick: datagrams a flooded daemon would drop.
const SYSLOG_PER_TICK: usize = 100;

enum Out {
    File(FileSink),
    Syslog(SyslogSink),
}

impl Out {
    fn write(&mut self, lines: &[Line], cursor: Cursor) -> std::io::Result<()> {
        match self {
            Out::File(f) => f.append(lines),
            Out::Syslog(s) => s.send(lines, cursor),
        }
    }

    /// The file was moved aside (rotated) since it was opened.
    fn rotated(&self) -> bool {
        match self {
            Out::File(f) => !f.still_at_path(),
            Out::Syslog(_) => false,
        }
    }
}

type Opener = Arc<dyn Fn() -> std::io::Result<(Out, Cursor)> + Send + Sync>;

/// One sink's shipping state.
struct Target {
    name: &'static str,
    per_tick: usize,
    open: Opener,
    out: Option<Out>,
    cursor: Cursor,
    /// The cursor was checked against the datastore since the sink was opened.
    checked: bool,
    /// The file was rotated: the new one continues from the cursor.
    continuing: bool,
    faulted: bool,
    backoff: Duration,
    retry_at: Instant,
    checkpointed: i64,
    checkpoint_at: Instant,
}

impl Target {
    fn new(name: &'static str, per_tick: usize, open: Opener) -> Self {
        Self {
            name,
            per_tick,
            open,
            out: None,
            cursor: (0, [0; 32]),
            checked: false,
            continuing: false,
            faulted: false,
            backoff: Duration::ZERO,
            retry_at: Instant::now(),
            checkpointed: -1,
            checkpoint_at: Instant::now(),
        }
    }

    /// Writes off the async workers (a file on a slow or hung volume must not stall them).
    async fn write(&mut self, lines: Vec<Line>, cursor: Cursor) -> std::io::Result<()> {
        let Some(mut out) = self.out.take() else {
            return Err(std::io::Error::other("the sink is not open"));
        };
        match tokio::task::spawn_blocking(move || {
            let r = out.write(&lines, cursor);
            (out, r)
        })
        .await
        {
            Ok((out, r)) => {
                self.out = Some(out);
                r
            }
            Err(e) => Err(std::io::Error::other(format!(
                "the writing task failed: {e}"
            ))),
        }
    }

    async fn reopen(&mut self) -> std::io::Result<()> {
        let open = self.open.clone();
        let (out, cursor) = tokio::task::spawn_blocking(move || open())
            .await
            .map_err(|e| std::io::Error::other(format!("the opening task failed: {e}")))??;
        self.out = Some(out);
        if self.continuing && cursor.0 == 0 {
            // A fresh file after rotation: it continues the chain where the old one ended
            // (an export may start after record 1); its first checkpoint follows its first
            // records.
            self.checkpointed = self.cursor.0;
        } else {
            // A reopened sink holds what was shipped to it; its own record of that wins.
            self.cursor = cursor;
            self.checked = false;
        }
        self.continuing = false;
        Ok(())
    }

    fn failed(&mut self, ca: &Ca, what: &str, e: &dyn std::fmt::Display) {
        ca.metrics
            .audit_sink_failures
            .get_or_create(&SinkLabels { sink: self.name })
            .inc();
        if self.backoff.is_zero() {
            tracing::warn!(sink = self.name, error = %e, "audit sink: cannot {what}; records wait in the datastore and are shipped when it is back");
        }
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF);
        self.retry_at = Instant::now() + self.backoff;
        // Reopen on the next try: a file on a volume that came back, a syslog daemon restarted.
        self.out = None;
    }

    fn recovered(&mut self) {
        if !self.backoff.is_zero() {
            tracing::info!(
                sink = self.name,
                seq = self.cursor.0,
                "audit sink: shipping again"
            );
        }
        self.backoff = Duration::ZERO;
    }
}

/// Ships until `stop`, then ships what is committed and a last checkpoint.
pub async fn ship_loop(ca: Ca, shipping: Shipping, mut stop: watch::Receiver<bool>) {
    let mut targets = Vec::new();
    if let Some(path) = shipping.file.clone() {
        targets.push(Target::new(
            "file",
            FILE_PER_TICK,
            Arc::new(move || FileSink::open(&path).map(|(f, c)| (Out::File(f), c))),
        ));
    }
    if let Some((socket, cursor)) = shipping.syslog.clone() {
        targets.push(Target::new(
            "syslog",
            SYSLOG_PER_TICK,
            Arc::new(move || SyslogSink::open(&socket, &cursor).map(|(s, c)| (Out::Syslog(s), c))),
        ));
    }
    let Some(key) = shipping.key.clone() else {
        return;
    };
    if targets.is_empty() {
        return;
    }
    for t in &targets {
        drop(
            ca.metrics
                .audit_sink_lag
                .get_or_create(&SinkLabels { sink: t.name }),
        );
        drop(
            ca.metrics
                .audit_sink_failures
                .get_or_create(&SinkLabels { sink: t.name }),
        );
        drop(
            ca.metrics
                .audit_checkpoints
                .get_or_create(&SinkLabels { sink: t.name }),
        );
    }
    let mut tick = tokio::time::interval(SHIP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut store_down = false;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let head = match ca.store.audit_head().await {
            Ok(h) => {
                if store_down {
                    tracing::info!("audit shipping: the datastore answers again");
                    store_down = false;
                }
                h.map_or(0, |(seq, _)| seq)
            }
            Err(e) => {
                if !store_down {
                    tracing::warn!(error = %e, "audit shipping: cannot read the datastore; will retry");
                    store_down = true;
                }
                if stopping {
                    return;
                }
                continue;
            }
        };
        for t in &mut targets {
            ship_one(&ca, &key, &shipping, t, head, stopping).await;
            let lag = head.saturating_sub(t.cursor.0).max(0);
            ca.metrics
                .audit_sink_lag
                .get_or_create(&SinkLabels { sink: t.name })
                .set(lag);
        }
        if stopping {
            return;
        }
    }
}

async fn ship_one(
    ca: &Ca,
    key: &CheckpointKey,
    shipping: &Shipping,
    t: &mut Target,
    head: i64,
    stopping: bool,
) {
    if t.faulted || Instant::now() < t.retry_at {
        return;
    }
    if t.out.as_ref().is_some_and(Out::rotated) {
        tracing::info!(
            sink = t.name,
            seq = t.cursor.0 + 1,
            "audit file: it was moved aside (rotated); a new one continues from the next record"
        );
        t.out = None;
        t.continuing = true;
    }
    if t.out.is_none() {
        if let Err(e) = t.reopen().await {
            return t.failed(ca, "open it", &e);
        }
    }
    // The head only grows: one behind the cursor means records were removed.
    if !t.checked || head < t.cursor.0 {
        match still_there(ca, t.cursor).await {
            Ok(None) => t.checked = true,
            Ok(Some(reason)) => return fault(ca, t, t.cursor.0, &reason).await,
            Err(()) => return,
        }
    }
    // Ship what was committed since, a bounded number of records per tick.
    let mut shipped = 0;
    while shipped < t.per_tick && t.cursor.0 < head {
        let page = PAGE.min((t.per_tick - shipped) as i64);
        let records = match ca.store.audit_records(t.cursor.0, page).await {
            Ok(r) => r,
            Err(_) => return,
        };
        if records.is_empty() {
            // The head is past the cursor but nothing follows it: the records after the
            // cursor were removed.
            return fault(
                ca,
                t,
                t.cursor.0 + 1,
                "the datastore's head is past the last shipped record, but no record follows it",
            )
            .await;
        }
        let mut verifier = ChainVerifier::resume(t.cursor.0, t.cursor.1);
        for r in &records {
            if let Err(v) = verifier.push(r) {
                return fault(ca, t, v.seq, &v.reason.to_string()).await;
            }
        }
        let Some(last) = records.last() else {
            return;
        };
        let cursor = (last.seq, last.hash);
        let lines: Vec<Line> = records.iter().map(|r| Line::Record(r.into())).collect();
        if let Err(e) = t.write(lines, cursor).await {
            return t.failed(ca, "write to it", &e);
        }
        t.cursor = cursor;
        t.recovered();
        shipped += records.len();
        if (records.len() as i64) < page {
            break;
        }
    }
    // Each interval (and on the way out): the last shipped record is checked to be still
    // there unchanged, and a checkpoint is shipped when there is something new.
    let due = t.checkpoint_at.elapsed() >= shipping.checkpoint_interval || stopping;
    if due && t.cursor.0 > 0 {
        match still_there(ca, t.cursor).await {
            Ok(None) => {}
            Ok(Some(reason)) => return fault(ca, t, t.cursor.0, &reason).await,
            Err(()) => return,
        }
        t.checkpoint_at = Instant::now();
    }
    if due && t.cursor.0 > 0 && t.checkpointed != t.cursor.0 {
        let c = key.sign(
            ca.authority.trust_domain().as_str(),
            ca.authority.server_id(),
            t.cursor.0,
            &t.cursor.1,
            crate::unix_now(),
        );
        let cursor = t.cursor;
        match t.write(vec![Line::Checkpoint(c)], cursor).await {
            Ok(()) => {
                t.checkpointed = t.cursor.0;
                ca.metrics
                    .audit_checkpoints
                    .get_or_create(&SinkLabels { sink: t.name })
                    .inc();
            }
            Err(e) => t.failed(ca, "write a checkpoint to it", &e),
        }
    }
}

/// Whether the datastore still holds the record at `cursor` unchanged: `Ok(None)` when it
/// does (or the cursor is the start), `Ok(Some(why))` when not, `Err` when it cannot be read.
async fn still_there(ca: &Ca, cursor: Cursor) -> Result<Option<String>, ()> {
    if cursor.0 == 0 {
        return Ok(None);
    }
    let records = ca
        .store
        .audit_records(cursor.0 - 1, 1)
        .await
        .map_err(|_| ())?;
    Ok(match records.first() {
        Some(r) if r.seq == cursor.0 && r.hash == cursor.1 => None,
        Some(r) if r.seq == cursor.0 => Some(format!(
            "record {} no longer has the hash shipped (the record or one before it was rewritten)",
            r.seq
        )),
        _ => Some(format!(
            "record {} that was shipped is no longer in the datastore (the log was truncated or restored from an older backup)",
            cursor.0
        )),
    })
}

async fn fault(ca: &Ca, t: &mut Target, seq: i64, reason: &str) {
    ca.metrics.audit_chain_faults.inc();
    tracing::error!(sink = t.name, seq, reason, "AUDIT CHAIN FAULT: the datastore's audit log no longer extends what was shipped; shipping to this sink stops (what it holds is the evidence: keep it, compare with `meshid-ca audit verify --export`)");
    let line = Line::Fault(FaultLine {
        time: crate::unix_now(),
        server_id: ca.authority.server_id().to_owned(),
        seq,
        reason: reason.to_owned(),
    });
    let cursor = t.cursor;
    if t.out.is_some() {
        if let Err(e) = t.write(vec![line], cursor).await {
            tracing::error!(sink = t.name, error = %e, "audit sink: cannot write the fault line");
        }
    }
    t.faulted = true;
}

/// Writes the counted summaries as `audit.summary` records every `interval` (and once more at
/// `stop`); counts that cannot be written go into the next one.
pub async fn summary_loop(ca: Ca, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since = Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let taken = ca.audit_counts.take();
        if !taken.is_empty() {
            let event = AuditEvent::new(
                "audit.summary",
                format!("ca:{}", ca.authority.server_id()),
                taken.details(ca.authority.server_id(), since.elapsed().as_secs()),
            );
            match ca.store.append_audit(&event).await {
                Ok(_) => since = Instant::now(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the audit summary; its counts go into the next one");
                    ca.audit_counts.restore(taken);
                }
            }
        }
        if stopping {
            return;
        }
    }
}
