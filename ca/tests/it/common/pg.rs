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

#[path = "../../../../tests/src/pg.rs"]
mod cluster_impl;
use cluster_impl::{start_cluster, Cluster, Unavailable};

/// The process-wide private cluster, started on first use.
fn cluster() -> Result<&'static Cluster, Unavailable> {
    static CLUSTER: OnceLock<Result<Cluster, Unavailable>> = OnceLock::new();
    CLUSTER
        .get_or_init(start_cluster)
        .as_ref()
        .map_err(Clone::clone)
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
