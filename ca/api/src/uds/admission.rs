//! Who may hold a connection to a Unix-socket server, and for how long.
//!
//! The Workload API socket is open to every local user (mode 0777: any process may ask who it
//! is). Without limits one user opened connections until the agent ran out of file
//! descriptors, after which its accept loop spun at 100 % CPU writing millions of `Too many
//! open files` lines, and every workload's call timed out. So [`super::incoming_with`]:
//! - caps connections in all and per uid (from `SO_PEERCRED` at accept); a connection past a
//!   cap is closed at once;
//! - closes a connection that sends no request within [`Limits::first_request_timeout`];
//! - backs off when accept fails (out of file descriptors), and says so at most once a
//!   second, with how many attempts failed meanwhile;
//! - records the connecting process as it was at accept time ([`AcceptedProcess`]), so a
//!   server can refuse calls once that process has exec'd another program or exited.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Connection limits of a Unix-socket server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections at once.
    pub connections: usize,
    /// Connections at once per peer uid.
    pub connections_per_uid: usize,
    /// How long a new connection may take to send its first request.
    pub first_request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 8192,
            connections_per_uid: 1024,
            first_request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    by_uid: HashMap<u32, usize>,
}

/// The shared state of one server's connections: limits, counts, refusals.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
    refused: AtomicU64,
    closed_idle: AtomicU64,
    log: RateLimitedLog,
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
            refused: AtomicU64::new(0),
            closed_idle: AtomicU64::new(0),
            log: RateLimitedLog::default(),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections refused by a cap so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed for sending no request in time, so far.
    pub fn closed_idle(&self) -> u64 {
        self.closed_idle.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts().open
    }

    pub(super) fn count_idle_close(&self) {
        self.closed_idle.fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Every update leaves the counts consistent.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a connection of `uid` (`None`: no credentials, counted in all only), or
    /// the cap that refuses it.
    pub fn admit(self: &Arc<Self>, uid: Option<u32>) -> Result<Slot, &'static str> {
        let mut c = self.counts();
        let refused = if c.open >= self.limits.connections {
            Some("connections")
        } else if uid.is_some_and(|u| {
            c.by_uid.get(&u).copied().unwrap_or(0) >= self.limits.connections_per_uid
        }) {
            Some("connections_per_uid")
        } else {
            None
        };
        if let Some(limit) = refused {
            drop(c);
            let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            self.log.info(|suppressed| {
                tracing::info!(
                    uid,
                    limit,
                    refused_total = n,
                    suppressed,
                    "Unix socket connection refused: over the connection limit"
                );
            });
            return Err(limit);
        }
        c.open += 1;
        if let Some(u) = uid {
            *c.by_uid.entry(u).or_default() += 1;
        }
        Ok(Slot {
            admission: Arc::clone(self),
            uid,
        })
    }
}

/// A connection's place under the caps; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    uid: Option<u32>,
}

impl Slot {
    pub(super) fn admission(&self) -> &Admission {
        &self.admission
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.admission.counts();
        c.open = c.open.saturating_sub(1);
        if let Some(u) = self.uid {
            if let Some(n) = c.by_uid.get_mut(&u) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_uid.remove(&u);
                }
            }
        }
    }
}

/// A log line written at most once a second; the lines held back meanwhile are counted and
/// reported with the next one (for errors that can repeat as fast as a loop spins).
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    /// Calls `write` with the number of lines held back since the last one, unless a line was
    /// written less than a second ago.
    pub fn info(&self, write: impl FnOnce(u64)) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        write(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

/// The process behind a connection as it was when the connection was accepted: its pid,
/// start time and the (device, inode) of the program it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptedProcess {
    /// The pid (from `SO_PEERCRED`).
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`, in clock ticks since boot.
    pub start_time: u64,
    /// The (device, inode) of `/proc/<pid>/exe`.
    pub exe: (u64, u64),
}

impl AcceptedProcess {
    /// Reads process `pid` under `/proc`; `None` when it is gone or cannot be inspected.
    pub fn read(pid: i32) -> Option<Self> {
        let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        let start_time = parse_start_time(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
        let meta = std::fs::metadata(dir.join("exe")).ok()?;
        Some(Self {
            pid,
            start_time,
            exe: (meta.dev(), meta.ino()),
        })
    }
}

/// Field 22 (`starttime`) of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are counted after the
/// last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = stat.rfind(')').and_then(|i| stat.get(i + 1..))?;
    // After the command name come fields 3 (state), 4, ...; field 22 is the 20th of them.
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_uid_and_in_all_and_free_on_drop() {
        let a = Admission::new(Limits {
            connections: 3,
            connections_per_uid: 2,
            ..Limits::default()
        });
        let s1 = a.admit(Some(1000)).unwrap();
        let _s2 = a.admit(Some(1000)).unwrap();
        assert_eq!(a.admit(Some(1000)).unwrap_err(), "connections_per_uid");
        let _s3 = a.admit(Some(0)).unwrap();
        assert_eq!(a.admit(Some(0)).unwrap_err(), "connections");
        assert_eq!(a.admit(None).unwrap_err(), "connections");
        assert_eq!(a.refused(), 3);
        drop(s1);
        assert_eq!(a.open(), 2);
        let _s4 = a.admit(Some(1000)).unwrap();
    }

    #[test]
    fn start_time_is_field_22_whatever_the_command_name() {
        let stat =
            "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1 2";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("4242 (x) S 1 2"), None);
        assert_eq!(parse_start_time("no parenthesis"), None);
        let me = AcceptedProcess::read(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(me.start_time > 0);
        assert_eq!(AcceptedProcess::read(i32::MAX), None);
    }
}
