//! JSON access log: one [`AccessRecord`] per line, written by a background task so the data
//! path never waits on disk. When the writer falls behind by more than [`QUEUE`] lines, lines
//! are dropped and counted (`meshid_proxy_access_log_dropped_total`), never blocking traffic.

use std::io::Write;
use std::sync::Arc;

use meshid_policy::AccessRecord;
use tokio::sync::mpsc;

use crate::config::AccessLog;
use crate::metrics::Metrics;

/// Lines buffered for the writer before new ones are dropped.
pub const QUEUE: usize = 16_384;

/// A cheap handle for emitting access log lines.
#[derive(Clone, Debug)]
pub struct AccessLogger {
    tx: Option<mpsc::Sender<AccessRecord>>,
    metrics: Arc<Metrics>,
}

impl AccessLogger {
    /// A logger that writes nothing.
    pub fn off(metrics: Arc<Metrics>) -> AccessLogger {
        AccessLogger { tx: None, metrics }
    }

    /// Opens the destination and starts the writer task (on the current runtime). The
    /// returned future completes once every line sent before all handles were dropped is
    /// written and flushed.
    pub fn start(
        target: &AccessLog,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(AccessLogger, tokio::task::JoinHandle<()>)> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLog::Off => {
                return Ok((
                    AccessLogger::off(metrics),
                    tokio::spawn(std::future::ready(())),
                ))
            }
            AccessLog::Stdout => Box::new(std::io::stdout()),
            AccessLog::Stderr => Box::new(std::io::stderr()),
            AccessLog::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o640)
                        .open(path)?,
                )
            }
        };
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(QUEUE);
        let task = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(first) = rx.blocking_recv() {
                let mut next = Some(first);
                while let Some(record) = next {
                    if serde_json::to_writer(&mut buf, &record).is_ok() {
                        buf.push(b'\n');
                    }
                    if buf.len() > 60 * 1024 {
                        break;
                    }
                    next = rx.try_recv().ok();
                }
                if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
                    tracing::warn!(error = %e, "cannot write the access log");
                }
                buf.clear();
            }
        });
        Ok((
            AccessLogger {
                tx: Some(tx),
                metrics,
            },
            tokio::spawn(async move {
                let _ = task.await;
            }),
        ))
    }

    /// Whether lines are written at all (callers skip building records when not).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a line.
    pub fn log(&self, record: AccessRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(record).is_err() {
                self.metrics.access_log_dropped.inc();
            }
        }
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&format).unwrap_or_default()
}

/// A connection record stamped now, with nothing known yet: callers fill in what they know
/// with struct update syntax.
pub fn connection(direction: &str, listener: &str) -> meshid_policy::AccessRecord {
    meshid_policy::AccessRecord {
        timestamp: timestamp(),
        kind: "connection".to_owned(),
        direction: direction.to_owned(),
        listener: listener.to_owned(),
        caller: None,
        callee: None,
        port: None,
        method: None,
        path: None,
        upgrade: None,
        status: None,
        policy: None,
        rule: None,
        decision: "allow".to_owned(),
        reason: None,
        bytes_in: 0,
        bytes_out: 0,
        duration_ms: 0.0,
        tls_group: None,
    }
}
