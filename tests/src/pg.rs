//! A private PostgreSQL cluster for tests, from the binaries in `/usr/lib/postgresql/*/bin` or
//! `PATH` (`initdb -A trust`, listening on 127.0.0.1 on a free port, run as the `postgres` user
//! when the tests run as root). A detached watchdog stops the cluster and removes its directory
//! once the test process has exited, however it exited. Standard library only: used by the
//! end-to-end harness and (by path) by meshid-ca's integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running private cluster, stopped (and its directory removed) when dropped.
pub struct Cluster {
    /// `postgres://meshid@127.0.0.1:PORT/postgres` (trust authentication).
    pub admin_url: String,
    dir: PathBuf,
    pg_ctl: PathBuf,
    root: bool,
    /// The server's options (`pg_ctl start -o`).
    options: String,
}

impl Cluster {
    /// Runs `sql` in database `db` with `psql` (unaligned, tuples only) and returns what it
    /// printed.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let port = self
            .admin_url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .ok_or("no port in the URL")?;
        let out = Command::new(self.pg_ctl.with_file_name("psql"))
            .args(["-h", "127.0.0.1", "-p", port, "-U", "meshid", "-d", db])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Stops the server (`fast`: clients are disconnected, what committed is kept; `immediate`:
    /// as a crash).
    pub fn stop(&self, mode: &str) {
        let mut stop = as_owner(self.root, &self.pg_ctl);
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-w", "-t", "30", "-m", mode]);
        if let Err(e) = run(stop, "pg_ctl stop") {
            panic!("{e:?}");
        }
    }

    /// Starts it again, on the same port, after [`Cluster::stop`].
    pub fn start(&self) {
        let mut start = as_owner(self.root, &self.pg_ctl);
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .arg("-o")
            .arg(&self.options)
            .args(["-w", "-t", "30", "start"]);
        if let Err(e) = run(start, "pg_ctl start") {
            panic!("{e:?}");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = as_owner(self.root, &self.pg_ctl);
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Why no cluster could be started.
#[derive(Debug, Clone)]
pub enum Unavailable {
    /// No PostgreSQL binaries here.
    NoBinaries,
    /// They are here, but starting failed; the reason.
    Failed(String),
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, bin)) = versioned.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command that runs `bin` as the cluster's owner.
fn as_owner(root: bool, bin: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), Unavailable> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Unavailable::Failed(format!("{what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Unavailable::Failed(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn free_port() -> Result<u16, Unavailable> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Unavailable::Failed(format!("no free port: {e}")))
}

/// Starts a private cluster (see the module documentation); a watchdog stops it and removes its
/// directory once this process has exited.
pub fn start_cluster() -> Result<Cluster, Unavailable> {
    start_cluster_with("")
}

/// [`start_cluster`] with more server options (`-c name=value ...`).
pub fn start_cluster_with(more_options: &str) -> Result<Cluster, Unavailable> {
    let bin = find_bin_dir().ok_or(Unavailable::NoBinaries)?;
    let root = is_root();
    let failed = |what: &str, e: std::io::Error| Unavailable::Failed(format!("{what}: {e}"));
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "meshid-pg-{}-{}-{}",
        std::process::id(),
        STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    std::fs::create_dir(&dir).map_err(|e| failed("create cluster dir", e))?;

    // The watchdog first, so the directory goes away even if starting fails half-way. It is
    // detached (setsid) so that it outlives this process and is not killed with its group.
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {owner}{pg_ctl} -D {data} stop -m immediate >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        owner = if root { "runuser -u postgres -- " } else { "" },
        pg_ctl = bin.join("pg_ctl").display(),
        data = dir.join("data").display(),
        dir = dir.display(),
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| failed("spawn the cluster watchdog", e))?;

    if root {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres").arg(&dir);
                c
            },
            "chown the cluster dir to postgres",
        )?;
    }
    let data = dir.join("data");
    let mut initdb = as_owner(root, &bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "meshid", "-E", "UTF8", "--no-sync"]);
    run(initdb, "initdb")?;

    let mut last_error = Unavailable::Failed("no attempt".to_owned());
    for _ in 0..3 {
        let port = free_port()?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 {more_options}",
            dir.display()
        );
        let mut start = as_owner(root, &bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .arg("-o")
            .arg(&options)
            .args(["-w", "-t", "30", "start"]);
        match run(start, "pg_ctl start") {
            Ok(()) => {
                return Ok(Cluster {
                    admin_url: format!("postgres://meshid@127.0.0.1:{port}/postgres"),
                    dir,
                    pg_ctl: bin.join("pg_ctl"),
                    root,
                    options,
                });
            }
            Err(e) => {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                last_error = match e {
                    Unavailable::Failed(why) => {
                        Unavailable::Failed(format!("{why}\nserver log:\n{log}"))
                    }
                    other => other,
                };
            }
        }
    }
    Err(last_error)
}
