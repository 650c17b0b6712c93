//! A PostgreSQL database per test.
//!
//! With `MESHID_TEST_POSTGRES_URL` set (an admin URL, e.g. `postgres://user:pw@host/postgres`),
//! each test gets a fresh database on that server. Otherwise one private throwaway cluster is
//! started per test process from the PostgreSQL binaries found in `/usr/lib/postgresql/*/bin`
//! or `PATH` (`initdb -A trust`, listening on 127.0.0.1 on a free port, run as the `postgres`
//! user when the tests run as root). A detached watchdog stops the cluster and removes its
//! directory once the test process has exited, however it exited.
//!
//! Without PostgreSQL binaries, [`fresh_database`] returns `None` after printing a note, unless
//! the `CI` variable is set, in which case it panics: CI must not skip silently.
//!
//! Include it from a test binary with `#[path = "common/pg.rs"] mod pg;`.

#![allow(dead_code, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::Connection;

/// A database that exists for one test and is dropped (forcibly) when this value is dropped.
pub struct PgDatabase {
    /// URL of the database, for `SqlStore::open`.
    pub url: String,
    admin_url: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime (or during a panic): use a thread of our own.
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::raw_sql(&sql).execute(&mut conn).await?;
                conn.close().await
            })
            .map_err(std::io::Error::other)
        });
        if let Ok(Err(e)) = dropper.join() {
            eprintln!("warning: could not drop test database {}: {e}", self.name);
        }
    }
}

/// A fresh, empty database, or `None` when PostgreSQL is not available here (see the module
/// documentation).
pub async fn fresh_database() -> Option<PgDatabase> {
    let admin_url = match std::env::var("MESHID_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let cluster = tokio::task::spawn_blocking(cluster)
                .await
                .expect("cluster start panicked");
            match cluster {
                Ok(cluster) => cluster.admin_url.clone(),
                Err(Unavailable::NoBinaries) => {
                    if std::env::var_os("CI").is_some() {
                        panic!(
                            "PostgreSQL tests cannot run: no initdb found in \
                             /usr/lib/postgresql/*/bin or PATH (CI is set, so not skipping)"
                        );
                    }
                    eprintln!("skipping PostgreSQL: no initdb found");
                    return None;
                }
                Err(Unavailable::Failed(why)) => {
                    panic!("could not start a private PostgreSQL cluster: {why}")
                }
            }
        }
    };
    let name = format!("t_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::PgConnection::connect(&admin_url),
    )
    .await
    .expect("timed out connecting to PostgreSQL")
    .expect("connect to PostgreSQL");
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    conn.close().await.ok();
    Some(PgDatabase {
        url: with_database(&admin_url, &name),
        admin_url,
        name,
    })
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

struct Cluster {
    admin_url: String,
}

#[derive(Debug, Clone)]
enum Unavailable {
    NoBinaries,
    Failed(String),
}

/// The process-wide private cluster, started on first use.
fn cluster() -> Result<&'static Cluster, Unavailable> {
    static CLUSTER: OnceLock<Result<Cluster, Unavailable>> = OnceLock::new();
    CLUSTER
        .get_or_init(start_cluster)
        .as_ref()
        .map_err(Clone::clone)
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

fn start_cluster() -> Result<Cluster, Unavailable> {
    let bin = find_bin_dir().ok_or(Unavailable::NoBinaries)?;
    let root = is_root();
    let failed = |what: &str, e: std::io::Error| Unavailable::Failed(format!("{what}: {e}"));
    let dir = std::env::temp_dir().join(format!(
        "meshid-pg-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 4]>())
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
        let mut start = as_owner(root, &bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                dir.display()
            ))
            .args(["-w", "-t", "30", "start"]);
        match run(start, "pg_ctl start") {
            Ok(()) => {
                return Ok(Cluster {
                    admin_url: format!("postgres://meshid@127.0.0.1:{port}/postgres"),
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

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5/postgres", "t_1"),
            "postgres://u@h:5/t_1"
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "t_1"),
            "postgres://u@h/t_1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "t_1"), "postgres://u@h/t_1");
    }
}
