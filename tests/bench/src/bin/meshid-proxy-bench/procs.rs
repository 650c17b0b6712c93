//! Processes: a guard that kills on drop, and a registry that a signal handler cleans up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What must go when the bench is interrupted: child pids and temporary directories.
pub(crate) static REGISTRY: Mutex<(Vec<u32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

pub(crate) fn register_pid(pid: u32) {
    REGISTRY.lock().unwrap().0.push(pid);
}

pub(crate) fn unregister_pid(pid: u32) {
    REGISTRY.lock().unwrap().0.retain(|p| *p != pid);
}

/// On SIGINT or SIGTERM: kills every registered child by its pid, removes the registered
/// directories and exits 130. (Panics unwind through the guards' `Drop` instead.)
pub(crate) fn install_signal_handler() {
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
        let (pids, dirs) = {
            let reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
            (reg.0.clone(), reg.1.clone())
        };
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("interrupted: children killed, temporary directory removed");
        std::process::exit(130);
    });
}

/// A child process, killed (SIGKILL) and reaped on drop; stdout and stderr go to `log`.
pub(crate) struct Guard {
    pub(crate) child: Option<std::process::Child>,
    pub(crate) name: String,
    pub(crate) log: PathBuf,
}

impl Guard {
    pub(crate) fn spawn(
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

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// `Err` with the end of the log if the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
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
pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Polls `f` every 50 ms until it returns `Ok(Some)`, an error, or `timeout` passes.
pub(crate) fn poll<T>(
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
