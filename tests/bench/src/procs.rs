//! Processes: a guard that kills on drop, and a registry that a signal handler cleans up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What must go when the bench is interrupted.
struct Registry {
    /// Child processes, killed first.
    pids: Vec<u32>,
    /// Network namespaces (`ip netns del`), once their processes are gone.
    namespaces: Vec<String>,
    /// Temporary directories, removed last.
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    namespaces: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child the signal handler kills.
pub fn register_pid(pid: u32) {
    registry().pids.push(pid);
}

/// A child that has been reaped: its pid may be another process's from now on.
pub fn unregister_pid(pid: u32) {
    registry().pids.retain(|p| *p != pid);
}

/// A temporary directory the signal handler removes.
pub fn register_dir(dir: &Path) {
    registry().dirs.push(dir.to_owned());
}

/// Network namespaces the signal handler deletes (after killing the children).
pub fn register_namespaces(names: &[String]) {
    registry().namespaces.extend_from_slice(names);
}

/// On SIGINT or SIGTERM: kills every registered child by its pid, deletes the registered
/// network namespaces, removes the registered directories and exits 130. (Panics unwind
/// through the guards' `Drop` instead.)
pub fn install_signal_handler() {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt()).unwrap();
            let mut term = signal(SignalKind::terminate()).unwrap();
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        let reg = registry();
        for pid in &reg.pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        for ns in &reg.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        for dir in &reg.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("interrupted: children killed, namespaces and temporary directory removed");
        std::process::exit(130);
    });
}

/// A temporary directory for a run, named `<prefix>XXXXXX`: removed on drop and by the signal
/// handler, or kept (and said so) when `MESHID_BENCH_KEEP` is set.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let mut tmp = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    if std::env::var_os("MESHID_BENCH_KEEP").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("keeping {} (MESHID_BENCH_KEEP)", tmp.path().display());
    } else {
        register_dir(tmp.path());
    }
    tmp
}

/// A child process, killed (SIGKILL) and reaped on drop; stdout and stderr go to `log`.
pub struct Guard {
    /// The child (`None` once reaped).
    pub child: Option<std::process::Child>,
    /// What messages call it.
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Guard {
    /// Starts `program` with `args` and `env`, registered for the signal handler.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Result<Guard, String> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("open {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", program.display()))?;
        register_pid(child.id());
        Ok(Guard {
            child: Some(child),
            name: name.to_owned(),
            log,
        })
    }

    /// Its pid (0 once reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// `Err` with the end of the log if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.name));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited with {status}; log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unregister_pid(c.id());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last 20 lines of a log file.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Polls `f` every 50 ms until it returns `Ok(Some)`, an error, or `timeout` passes.
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids of children kept elsewhere (the harness's `meshid_tests::Proc`, a `Ca`), registered
/// with [`register_pid`] until this is dropped. Place it after those processes in a struct, so
/// that they are killed (dropped) before their pids are let go.
#[derive(Default)]
pub struct Registered(Vec<u32>);

impl Registered {
    /// Registers `pid` for the signal handler; returns it.
    pub fn add(&mut self, pid: u32) -> u32 {
        register_pid(pid);
        self.0.push(pid);
        pid
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for pid in &self.0 {
            unregister_pid(*pid);
        }
    }
}
