//! A consistent snapshot of the whole datastore, read in one transaction while the CA runs, and
//! its restoration into an empty datastore of the same backend, in one transaction: for
//! `meshid-ca backup` and `meshid-ca restore` (which add the keys and the encryption).
//!
//! Rows travel as [`DumpLine`]s, so a datastore of any size streams through without being held
//! in memory; `schema_migrations` is not dumped (the target is migrated by this binary), but its
//! version is, and a restore needs the same version.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tokio_stream::StreamExt as _;

use super::{Dialect, SqlStore, Tx, SCHEMA_VERSION};
use crate::store::StoreError;

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// SQL NULL.
    #[serde(rename = "n")]
    Null,
    /// An integer.
    #[serde(rename = "i")]
    Int(i64),
    /// A float (no column of ours has one; kept for completeness).
    #[serde(rename = "f")]
    Real(f64),
    /// Text.
    #[serde(rename = "t")]
    Text(String),
    /// Bytes, base64.
    #[serde(rename = "b")]
    Blob(String),
}

/// One line of a dump: a table's header, then its rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DumpLine {
    /// The rows that follow are this table's, with these columns.
    Table {
        /// Its name.
        name: String,
        /// Its columns, in the order of each row's values.
        columns: Vec<String>,
    },
    /// A row of the last table named.
    Row(Vec<Value>),
}

/// Tables not dumped: the migration bookkeeping (the target gets its own).
const SKIPPED: &[&str] = &["schema_migrations", "_sqlx_migrations"];

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl SqlStore {
    /// The schema version of this datastore.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    async fn tables(&self, tx: &mut Tx) -> Result<Vec<String>, StoreError> {
        let sql = match self.dialect {
            Dialect::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            Dialect::Postgres => {
                "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name"
            }
        };
        let rows = sqlx::query(sql).fetch_all(&mut **tx).await?;
        let mut out = Vec::new();
        for r in rows {
            let name: String = r.try_get(0)?;
            if SKIPPED.contains(&name.as_str()) {
                continue;
            }
            if !valid_name(&name) {
                return Err(StoreError::Corrupt(format!(
                    "unexpected table name {name:?}"
                )));
            }
            out.push(name);
        }
        Ok(out)
    }

    /// Reads every table in one read transaction (a snapshot: writes committed meanwhile are
    /// not in it) and hands each line to `out`, in order. Returns (tables, rows).
    pub async fn dump(
        &self,
        mut out: impl FnMut(DumpLine) -> std::io::Result<()>,
    ) -> Result<(u64, u64), StoreError> {
        let begin = match self.dialect {
            Dialect::Sqlite => "BEGIN",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        };
        let mut tx = Tx::begin(&self.pool, begin).await?;
        let tables = self.tables(&mut tx).await?;
        let io = |e: std::io::Error| StoreError::Corrupt(format!("cannot write the dump: {e}"));
        let mut rows = 0;
        for table in &tables {
            let columns = self.columns(&mut tx, table).await?;
            out(DumpLine::Table {
                name: table.clone(),
                columns: columns.clone(),
            })
            .map_err(io)?;
            // Streamed, in a stable order (by the first column: every table's key starts
            // there), so a table of any size passes through without being held.
            let list = columns.join(", ");
            let sql = format!("SELECT {list} FROM {table} ORDER BY 1");
            let mut stream = sqlx::query(&sql).fetch(&mut *tx);
            while let Some(r) = stream.next().await {
                let r = r?;
                let mut values = Vec::with_capacity(columns.len());
                for i in 0..columns.len() {
                    values.push(value(&r, i)?);
                }
                out(DumpLine::Row(values)).map_err(io)?;
                rows += 1;
            }
        }
        tx.commit().await?;
        Ok((tables.len() as u64, rows))
    }

    async fn columns(&self, tx: &mut Tx, table: &str) -> Result<Vec<String>, StoreError> {
        let sql = match self.dialect {
            Dialect::Sqlite => format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
            Dialect::Postgres => format!(
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = '{table}' ORDER BY ordinal_position"
            ),
        };
        let mut out = Vec::new();
        for r in sqlx::query(&sql).fetch_all(&mut **tx).await? {
            let name: String = r.try_get(0)?;
            if !valid_name(&name) {
                return Err(StoreError::Corrupt(format!(
                    "unexpected column name {name:?} in {table}"
                )));
            }
            out.push(name);
        }
        Ok(out)
    }

    /// Whether this datastore (opened with [`SqlStore::open_unmigrated`]) may be restored
    /// into: no tables at all, or this binary's schema with every table empty.
    pub async fn check_fresh(&self) -> Result<(), StoreError> {
        let mut tx = Tx::begin(&self.pool, "BEGIN").await?;
        let all = self.tables(&mut tx).await?;
        tx.commit().await?;
        if all.is_empty() {
            return Ok(());
        }
        let version = self.schema_version().await.unwrap_or(0);
        if version != SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "the target datastore holds tables of schema version {version} (this meshid-ca's is {SCHEMA_VERSION}): restore into a fresh database"
            )));
        }
        if !self.is_empty().await? {
            return Err(StoreError::Corrupt(
                "the target datastore is not empty: restore into a fresh database".to_owned(),
            ));
        }
        Ok(())
    }

    /// Whether every table of this datastore is empty (a fresh one, migrated).
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let mut tx = Tx::begin(&self.pool, "BEGIN").await?;
        for table in self.tables(&mut tx).await? {
            let row = sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&mut *tx)
                .await?;
            if row.try_get::<i64, _>(0)? > 0 {
                return Ok(false);
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Inserts the dump's rows in one transaction, or none: the datastore must be empty, of
    /// `schema_version`, and have every table the dump names with its columns.
    pub async fn restore(
        &self,
        schema_version: i64,
        lines: impl IntoIterator<Item = Result<DumpLine, String>>,
    ) -> Result<(u64, u64), StoreError> {
        self.restore_then(schema_version, lines, |_, _| Ok(()))
            .await
    }

    /// [`SqlStore::restore`], with `before_commit` run on the counts (tables, rows) before the
    /// transaction commits: an error from it rolls everything back.
    pub async fn restore_then(
        &self,
        schema_version: i64,
        lines: impl IntoIterator<Item = Result<DumpLine, String>>,
        before_commit: impl FnOnce(u64, u64) -> Result<(), String>,
    ) -> Result<(u64, u64), StoreError> {
        let refuse = |why: String| StoreError::Corrupt(why);
        let have = self.schema_version().await?;
        if schema_version != have || have != SCHEMA_VERSION {
            return Err(refuse(format!(
                "the backup is of schema version {schema_version}, this meshid-ca's is {SCHEMA_VERSION}: restore with the meshid-ca version that made it, then upgrade"
            )));
        }
        if !self.is_empty().await? {
            return Err(refuse(
                "the target datastore is not empty: restore into a fresh database".to_owned(),
            ));
        }
        let mut tx = Tx::begin(
            &self.pool,
            match self.dialect {
                Dialect::Sqlite => "BEGIN IMMEDIATE",
                Dialect::Postgres => "BEGIN",
            },
        )
        .await?;
        let known = self.tables(&mut tx).await?;
        let mut current: Option<(String, usize)> = None;
        let (mut tables, mut rows) = (0, 0);
        for line in lines {
            match line.map_err(refuse)? {
                DumpLine::Table { name, columns } => {
                    if !known.contains(&name) {
                        return Err(refuse(format!(
                            "the backup has a table {name:?} this datastore does not"
                        )));
                    }
                    let have = self.columns(&mut tx, &name).await?;
                    if columns.iter().any(|c| !have.contains(c)) || columns.len() != have.len() {
                        return Err(refuse(format!(
                            "table {name}: the backup's columns {columns:?} are not this datastore's {have:?}"
                        )));
                    }
                    let placeholders: Vec<String> =
                        (1..=columns.len()).map(|i| format!("${i}")).collect();
                    let sql = format!(
                        "INSERT INTO {name} ({}) VALUES ({})",
                        columns.join(", "),
                        placeholders.join(", ")
                    );
                    current = Some((sql, columns.len()));
                    tables += 1;
                }
                DumpLine::Row(values) => {
                    let Some((sql, n)) = &current else {
                        return Err(refuse("a row before any table".to_owned()));
                    };
                    if values.len() != *n {
                        return Err(refuse(format!(
                            "a row with {} values where its table has {n} columns",
                            values.len()
                        )));
                    }
                    let mut q = sqlx::query(sql);
                    for v in values {
                        q = match v {
                            Value::Null => q.bind(Option::<i64>::None),
                            Value::Int(i) => q.bind(i),
                            Value::Real(f) => q.bind(f),
                            Value::Text(t) => q.bind(t),
                            Value::Blob(b) => q.bind(
                                base64::engine::general_purpose::STANDARD
                                    .decode(b)
                                    .map_err(|e| refuse(format!("a blob is not base64: {e}")))?,
                            ),
                        };
                    }
                    q.execute(&mut *tx).await?;
                    rows += 1;
                }
            }
        }
        before_commit(tables, rows).map_err(refuse)?;
        tx.commit().await?;
        Ok((tables, rows))
    }
}

fn value(r: &sqlx::any::AnyRow, i: usize) -> Result<Value, StoreError> {
    use sqlx::any::AnyTypeInfoKind as K;
    use sqlx::ValueRef as _;
    let raw = r.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let kind = raw.type_info().kind();
    Ok(match kind {
        K::Null => Value::Null,
        K::Bool => Value::Int(i64::from(r.try_get::<bool, _>(i)?)),
        K::SmallInt | K::Integer | K::BigInt => Value::Int(r.try_get::<i64, _>(i)?),
        K::Real | K::Double => Value::Real(r.try_get::<f64, _>(i)?),
        K::Text => Value::Text(r.try_get::<String, _>(i)?),
        K::Blob => Value::Blob(
            base64::engine::general_purpose::STANDARD.encode(r.try_get::<Vec<u8>, _>(i)?),
        ),
    })
}
