//! Workload attestation: from the credentials of a Unix socket peer to the selectors an entry is
//! matched against.
//!
//! The kernel tells the agent who connected (pid, uid and gid, `SO_PEERCRED`); [`Attestor`] reads
//! the rest from `/proc/<pid>` and the account databases: user and group names, supplementary
//! groups, the path of the binary and its SHA-256. It produces these selectors, sorted:
//!
//! | Selector | Source |
//! |---|---|
//! | `unix:uid:N`, `unix:gid:N` | the socket peer's credentials |
//! | `unix:user:NAME`, `unix:group:NAME` | `/etc/passwd`, `/etc/group` (only if the id has a name) |
//! | `unix:supplementary_gid:N` | `Groups:` of `/proc/<pid>/status`, one per group |
//! | `unix:path:/abs/binary` | the target of `/proc/<pid>/exe`, only when that path leads the agent (in its own mount namespace) to the very file running |
//! | `unix:sha256:HEX` | the binary, read through `/proc/<pid>/exe` (up to a size cap) |
//!
//! A path is what the process's own mount namespace shows, and the owner of a namespace may
//! mount any binary over any path in it (`unshare -Urm`): so `unix:path` is emitted only when the
//! path leads the agent to the same (device, inode) as the running binary. A
//! binary that was deleted or replaced since the process started yields no path and no hash
//! selector, and neither does one the agent may not inspect: missing selectors can only make a
//! caller match fewer entries. Hashes are cached by (device, inode, size, mtime, ctime), so a
//! busy workload is hashed once.
//!
//! Process ids are reused. The process start time (`/proc/<pid>/stat`, field 22) is read before
//! and after the inspection, and the effective uid of the process must still be the one the
//! socket reported; otherwise attestation fails with [`AttestError::ProcessChanged`] rather than
//! describe another process.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Default cap on the size of a binary hashed for `unix:sha256` (128 MiB).
pub const DEFAULT_MAX_BINARY_SIZE: u64 = 128 * 1024 * 1024;

/// Binaries one uid may have the agent hash (cache misses) per second on average...
pub const HASHES_PER_SECOND_PER_UID: u32 = 1;

/// ...and at once. Past that, its callers get no `unix:sha256` until the budget refills: a
/// caller that touches its own large binary between calls cannot make the agent hash it on
/// every call.
pub const HASH_BURST_PER_UID: u32 = 4;

/// Hashes remembered at most; the cache is cleared when it grows past this.
const HASH_CACHE_CAPACITY: usize = 1024;

/// Suffix the kernel appends to the `/proc/<pid>/exe` link of a deleted binary.
const DELETED_SUFFIX: &str = " (deleted)";

/// Why a workload could not be attested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The pid is not a valid process id (zero or negative).
    #[error("invalid pid {0}")]
    InvalidPid(i32),
    /// The process exited, or its pid now names another process, while it was being inspected.
    #[error("process {pid} exited or changed during attestation ({reason})")]
    ProcessChanged {
        /// The pid that was inspected.
        pid: i32,
        /// What was observed.
        reason: &'static str,
    },
    /// A `/proc` file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A `/proc` file did not have the expected format.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: &'static str,
    },
    /// The blocking attestation task did not complete (the runtime is shutting down).
    #[error("attestation task failed: {0}")]
    Task(String),
}

/// Attests local workloads from their process credentials. Cheap to clone; clones share the
/// binary hash cache.
#[derive(Debug, Clone)]
pub struct Attestor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    proc_root: PathBuf,
    passwd: PathBuf,
    group: PathBuf,
    max_binary_size: u64,
    hashes: Mutex<HashMap<FileKey, String>>,
    /// Hashing work per uid.
    hash_budget: meshid_api::limits::RateLimiter<u32>,
    /// `/etc/passwd` and `/etc/group` as last read, reused while their metadata is unchanged
    /// (one `stat` per lookup instead of a read and a parse).
    accounts: Mutex<HashMap<PathBuf, (FileKey, Arc<str>)>>,
}

/// Identifies one version of a file's content well enough to reuse its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl Default for Attestor {
    fn default() -> Self {
        Self::new()
    }
}

impl Attestor {
    /// An attestor reading `/proc`, `/etc/passwd` and `/etc/group`, hashing binaries up to
    /// [`DEFAULT_MAX_BINARY_SIZE`].
    pub fn new() -> Self {
        Self::with_paths(
            "/proc",
            "/etc/passwd",
            "/etc/group",
            DEFAULT_MAX_BINARY_SIZE,
        )
    }

    /// Sets the largest binary hashed for `unix:sha256`; a larger binary gets no hash selector.
    /// Zero turns hashing off.
    #[must_use]
    pub fn with_max_binary_size(self, bytes: u64) -> Self {
        Self::with_paths(
            self.inner.proc_root.clone(),
            self.inner.passwd.clone(),
            self.inner.group.clone(),
            bytes,
        )
    }

    fn with_paths(
        proc_root: impl Into<PathBuf>,
        passwd: impl Into<PathBuf>,
        group: impl Into<PathBuf>,
        max_binary_size: u64,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                proc_root: proc_root.into(),
                passwd: passwd.into(),
                accounts: Mutex::new(HashMap::new()),
                group: group.into(),
                max_binary_size,
                hashes: Mutex::new(HashMap::new()),
                hash_budget: meshid_api::limits::RateLimiter::new(
                    HASHES_PER_SECOND_PER_UID,
                    HASH_BURST_PER_UID,
                ),
            }),
        }
    }

    /// The sorted selectors of process `pid`, which connected with effective `uid` and `gid`.
    /// File I/O runs on the blocking thread pool.
    pub async fn attest(&self, pid: i32, uid: u32, gid: u32) -> Result<Vec<String>, AttestError> {
        self.attest_connected(pid, uid, gid, None).await
    }

    /// [`Self::attest`] for a call on a connection that `accepted` made: refused when process
    /// `pid` is no longer that process (it exited and the pid was reused) or has exec'd
    /// another program since (different start time, or a different file behind its `exe`).
    pub async fn attest_connected(
        &self,
        pid: i32,
        uid: u32,
        gid: u32,
        accepted: Option<meshid_api::uds::AcceptedProcess>,
    ) -> Result<Vec<String>, AttestError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.attest(pid, uid, gid, accepted))
            .await
            .map_err(|e| AttestError::Task(e.to_string()))?
    }
}

impl Inner {
    fn attest(
        &self,
        pid: i32,
        uid: u32,
        gid: u32,
        accepted: Option<meshid_api::uds::AcceptedProcess>,
    ) -> Result<Vec<String>, AttestError> {
        if pid <= 0 {
            return Err(AttestError::InvalidPid(pid));
        }
        let dir = self.proc_root.join(pid.to_string());
        let started = start_time(pid, &dir)?;
        // The running binary, opened once: for the connection's identity, the path check and
        // the hash.
        let exe_path = dir.join("exe");
        let running = match File::open(&exe_path).and_then(|f| Ok((f.metadata()?, f))) {
            // Without it, a connection's identity cannot be checked.
            Err(e) if accepted.is_some() => return Err(proc_error(pid, &exe_path, e)),
            r => r,
        };
        if let (Some(a), Ok((exe, _))) = (accepted, &running) {
            // The identity of the connection is the process that made it, as it was then.
            if a.pid != pid || a.start_time != started {
                return Err(AttestError::ProcessChanged {
                    pid,
                    reason: "the process that connected has exited",
                });
            }
            if (exe.dev(), exe.ino()) != a.exe {
                return Err(AttestError::ProcessChanged {
                    pid,
                    reason: "the process that connected has since exec'd another program",
                });
            }
        }

        let status_path = dir.join("status");
        let status = read_proc(pid, &status_path)?;
        let status = parse_status(&status).map_err(|reason| AttestError::Parse {
            path: status_path,
            reason,
        })?;
        if status.euid != uid {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: "effective uid differs from the socket peer's",
            });
        }

        let mut selectors = vec![format!("unix:uid:{uid}"), format!("unix:gid:{gid}")];
        if let Some(name) = self.lookup_name(&self.passwd, uid) {
            selectors.push(format!("unix:user:{name}"));
        }
        if let Some(name) = self.lookup_name(&self.group, gid) {
            selectors.push(format!("unix:group:{name}"));
        }
        for g in &status.groups {
            selectors.push(format!("unix:supplementary_gid:{g}"));
        }
        selectors.extend(self.binary_selectors(pid, uid, &exe_path, running));

        // The pid must still name the process that was inspected.
        if start_time(pid, &dir)? != started {
            return Err(AttestError::ProcessChanged {
                pid,
                reason: "start time changed",
            });
        }
        selectors.sort();
        selectors.dedup();
        Ok(selectors)
    }

    /// `unix:path` and `unix:sha256`, or none when the binary is gone or cannot be inspected.
    fn binary_selectors(
        &self,
        pid: i32,
        uid: u32,
        exe: &Path,
        running: io::Result<(std::fs::Metadata, File)>,
    ) -> Vec<String> {
        let target = match std::fs::read_link(exe) {
            Ok(t) => t,
            Err(error) => {
                tracing::debug!(pid, %error, "cannot resolve workload binary");
                return Vec::new();
            }
        };
        let Some(path) = target.to_str() else {
            tracing::debug!(pid, "workload binary path is not UTF-8");
            return Vec::new();
        };
        if path.ends_with(DELETED_SUFFIX) || !path.starts_with('/') {
            tracing::debug!(pid, path, "workload binary deleted or not a file");
            return Vec::new();
        }
        let running = match running {
            Ok(r) => r,
            Err(error) => {
                tracing::debug!(pid, path, %error, "cannot open workload binary");
                return Vec::new();
            }
        };
        let mut selectors = Vec::new();
        if self.names_the_running_file(pid, &running.0, path) {
            selectors.push(format!("unix:path:{path}"));
        }
        if self.max_binary_size > 0 {
            match self.hash(running, uid) {
                Ok(Some(hex)) => selectors.push(format!("unix:sha256:{hex}")),
                Ok(None) => tracing::debug!(
                    pid,
                    path,
                    limit = self.max_binary_size,
                    "no unix:sha256: binary over the size cap, or hash budget spent"
                ),
                Err(error) => tracing::debug!(pid, path, %error, "cannot hash workload binary"),
            }
        }
        selectors
    }

    /// Whether `path`, as the agent sees it, is the very file process `pid` runs.
    /// `/proc/<pid>/exe` renders the path as the process's own mount namespace sees it: in a
    /// namespace of its own (`unshare -Urm`) anyone can bind-mount their binary over a path that
    /// names another program for the agent. So the path must lead the agent, in its own
    /// namespace, to the same (device, inode) as the running binary. Then the selector means
    /// what an operator reads in it, whatever namespace the process is in (`ip netns exec`
    /// gives each command a mount namespace of its own; a container's paths lead the agent
    /// elsewhere and get no selector).
    fn names_the_running_file(&self, pid: i32, running: &std::fs::Metadata, path: &str) -> bool {
        match std::fs::metadata(path) {
            Ok(named) if (running.dev(), running.ino()) == (named.dev(), named.ino()) => true,
            _ => {
                tracing::debug!(
                    pid,
                    path,
                    "the path leads the agent to another file than the one running: no unix:path"
                );
                false
            }
        }
    }

    /// The hex SHA-256 of the running binary (opened, with its metadata), from the cache when
    /// its identity is unchanged. `None` when it is larger than the cap.
    fn hash(
        &self,
        (meta, mut file): (std::fs::Metadata, File),
        uid: u32,
    ) -> io::Result<Option<String>> {
        if meta.size() > self.max_binary_size {
            return Ok(None);
        }
        let key = FileKey::of(&meta);
        if let Some(hex) = self.cache().get(&key) {
            return Ok(Some(hex.clone()));
        }
        if self
            .hash_budget
            .take(&uid, std::time::Instant::now())
            .is_err()
        {
            tracing::info!(
                uid,
                size = meta.size(),
                "workload binary hash budget exceeded: no unix:sha256 for now"
            );
            return Ok(None);
        }
        tracing::debug!(uid, size = meta.size(), "hashing workload binary");
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total = total.saturating_add(n as u64);
            if total > self.max_binary_size {
                // Grew while being read.
                return Ok(None);
            }
            ctx.update(buf.get(..n).unwrap_or_default());
        }
        // Only cache when the file did not change while it was read.
        let hex = hex::encode(ctx.finish());
        if FileKey::of(&file.metadata()?) == key {
            let mut cache = self.cache();
            if cache.len() >= HASH_CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(key, hex.clone());
        }
        Ok(Some(hex))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.hashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads a `/proc` file; a missing file means the process is gone.
fn read_proc(pid: i32, path: &Path) -> Result<String, AttestError> {
    std::fs::read_to_string(path).map_err(|source| proc_error(pid, path, source))
}

/// A failed read of `path` under `/proc/<pid>`: the process is gone, or the file unreadable.
fn proc_error(pid: i32, path: &Path, source: io::Error) -> AttestError {
    match source.kind() {
        io::ErrorKind::NotFound => AttestError::ProcessChanged {
            pid,
            reason: "process exited",
        },
        // ESRCH: the process died while the file was read.
        _ if source.raw_os_error() == Some(3) => AttestError::ProcessChanged {
            pid,
            reason: "process exited",
        },
        _ => AttestError::Read {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn start_time(pid: i32, dir: &Path) -> Result<u64, AttestError> {
    let path = dir.join("stat");
    let stat = read_proc(pid, &path)?;
    meshid_api::uds::admission::parse_start_time(&stat).ok_or(AttestError::Parse {
        path,
        reason: "no start time (field 22) after the command name",
    })
}

#[derive(Debug, PartialEq, Eq)]
struct Status {
    euid: u32,
    groups: Vec<u32>,
}

/// The effective uid (second `Uid:` field) and the `Groups:` of `/proc/<pid>/status`.
fn parse_status(status: &str) -> Result<Status, &'static str> {
    let mut euid = None;
    let mut groups = None;
    for line in status.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            euid = Some(
                v.split_ascii_whitespace()
                    .nth(1)
                    .ok_or("Uid: has fewer than two fields")?
                    .parse()
                    .map_err(|_| "Uid: is not a number")?,
            );
        } else if let Some(v) = line.strip_prefix("Groups:") {
            groups = Some(
                v.split_ascii_whitespace()
                    .map(str::parse)
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(|_| "Groups: holds a non-number")?,
            );
        }
    }
    Ok(Status {
        euid: euid.ok_or("no Uid: line")?,
        groups: groups.ok_or("no Groups: line")?,
    })
}

impl Inner {
    /// The name of `id` in an `/etc/passwd` or `/etc/group` style file (`name:x:id:...`); the
    /// first line wins. A missing or unreadable file means no name.
    fn lookup_name(&self, path: &Path, id: u32) -> Option<String> {
        let key = match std::fs::metadata(path) {
            Ok(meta) => FileKey::of(&meta),
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "cannot read account database");
                return None;
            }
        };
        let cached = self.accounts.lock().ok().and_then(|c| {
            c.get(path)
                .filter(|(k, _)| *k == key)
                .map(|(_, t)| Arc::clone(t))
        });
        let text = match cached {
            Some(text) => text,
            None => {
                let text: Arc<str> = match std::fs::read_to_string(path) {
                    Ok(t) => t.into(),
                    Err(error) => {
                        tracing::debug!(path = %path.display(), %error, "cannot read account database");
                        return None;
                    }
                };
                if let Ok(mut c) = self.accounts.lock() {
                    c.insert(path.to_owned(), (key, Arc::clone(&text)));
                }
                text
            }
        };
        find_name(&text, id).map(str::to_owned)
    }
}

fn find_name(db: &str, id: u32) -> Option<&str> {
    db.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let line_id: u32 = fields.next()?.parse().ok()?;
        (line_id == id && !name.is_empty()).then_some(name)
    })
}

#[cfg(test)]
mod tests;
