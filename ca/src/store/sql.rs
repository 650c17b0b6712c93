//! [`SqlStore`]: the [`Datastore`] over SQLite or PostgreSQL, through `sqlx`'s `Any` driver.
//!
//! One implementation serves both databases; the few places where they differ (column types,
//! how a write transaction is serialized) switch on a private `Dialect`. Only types the `Any`
//! driver carries are used: `i64`, `String`, `Vec<u8>` and `Option`s of those; booleans are
//! stored as 0/1 and times as Unix seconds.
//!
//! Writes that carry an [`AuditEvent`] are serialized and append the chained audit record in
//! the same transaction as the change: on PostgreSQL under a transaction-scoped advisory lock
//! (so several CA servers sharing the database cannot fork the chain), on SQLite under an
//! in-process mutex and `BEGIN IMMEDIATE` (which also excludes other processes, such as the
//! operator CLI, from writing at the same time).

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use spiffe::{SpiffeId, TrustDomain};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::pool::PoolConnectionMetadata;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Executor, Row};
use tokio::sync::{Mutex, MutexGuard};

use super::{
    AgentRecord, CaKeyKind, CaKeyRecord, CaKeyState, CrlRecord, Datastore, DeliveryRecord,
    FederatedBundle, FederationRecord, JoinTokenRecord, MeshPlanner, MeshState, PolicyRevision,
    RevocationRecord, StoreError,
};
use crate::audit::{AuditEvent, AuditRecord};
use crate::config::redact_url;
use crate::entry::{EntryId, EntrySpec, RegistrationEntry};

/// How long a call waits for a PostgreSQL connection before it is refused as unavailable.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The newest schema version this binary knows (the last entry of the migration list).
pub const SCHEMA_VERSION: i64 = 10;

/// The file [`SqlStore::open_sqlite_in`] uses inside the data directory.
pub const SQLITE_FILE_NAME: &str = "meshid-ca.db";

/// Advisory lock key held while migrating (PostgreSQL). "meshid" then 1.
const MIGRATION_LOCK: i64 = 0x6d65_7368_6964_0001;
/// Advisory lock key held by every audited write transaction (PostgreSQL). "meshid" then 2.
const AUDIT_LOCK: i64 = 0x6d65_7368_6964_0002;

/// Which SQL database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// One schema migration: its version and its SQL for each dialect (several statements each,
/// separated by `;`, run in one transaction together with the `schema_migrations` row).
struct Migration {
    version: i64,
    sqlite: &'static str,
    postgres: &'static str,
}

/// Ordered by version; append only. Never edit a migration that has shipped.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: r#"
CREATE TABLE registration_entries (
    id TEXT NOT NULL PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    selectors TEXT NOT NULL,
    x509_ttl INTEGER NOT NULL,
    jwt_ttl INTEGER NOT NULL,
    dns_names TEXT NOT NULL,
    federates_with TEXT NOT NULL,
    admin INTEGER NOT NULL,
    hint TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    revision INTEGER NOT NULL
);
CREATE INDEX registration_entries_parent ON registration_entries (parent_id, id);
CREATE TABLE agents (
    spiffe_id TEXT NOT NULL PRIMARY KEY,
    attestation_type TEXT NOT NULL,
    serial TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    banned INTEGER NOT NULL
);
CREATE TABLE join_tokens (
    hash BLOB NOT NULL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE ca_keys (
    id TEXT NOT NULL PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    server_id TEXT NOT NULL,
    parent_id TEXT,
    public_der BLOB NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE bundles (
    trust_domain TEXT NOT NULL PRIMARY KEY,
    document TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE audit_log (
    seq INTEGER NOT NULL PRIMARY KEY,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE audit_head (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL
);
"#,
        postgres: r#"
CREATE TABLE registration_entries (
    id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT COLLATE "C" NOT NULL,
    selectors TEXT NOT NULL,
    x509_ttl BIGINT NOT NULL,
    jwt_ttl BIGINT NOT NULL,
    dns_names TEXT NOT NULL,
    federates_with TEXT NOT NULL,
    admin BIGINT NOT NULL,
    hint TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision BIGINT NOT NULL
);
CREATE INDEX registration_entries_parent ON registration_entries (parent_id, id);
CREATE TABLE agents (
    spiffe_id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    attestation_type TEXT NOT NULL,
    serial TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    banned BIGINT NOT NULL
);
CREATE TABLE join_tokens (
    hash BYTEA NOT NULL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE TABLE ca_keys (
    id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    server_id TEXT NOT NULL,
    parent_id TEXT,
    public_der BYTEA NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE bundles (
    trust_domain TEXT NOT NULL PRIMARY KEY,
    document TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE audit_log (
    seq BIGINT NOT NULL PRIMARY KEY,
    time BIGINT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL
);
CREATE TABLE audit_head (
    id BIGINT NOT NULL PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
"#,
    },
    // The superseded agent SVID, honoured until `previous_until` (unix seconds) so that calls in
    // flight on the old connection finish; afterwards it is refused as a compromise signal.
    Migration {
        version: 2,
        sqlite: r#"
ALTER TABLE agents ADD COLUMN previous_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN previous_until INTEGER NOT NULL DEFAULT 0
"#,
        postgres: r#"
ALTER TABLE agents ADD COLUMN previous_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN previous_until BIGINT NOT NULL DEFAULT 0
"#,
    },
    // What each agent last reported delivered to its workloads, per CA server it reported to.
    Migration {
        version: 3,
        sqlite: r#"
CREATE TABLE agent_deliveries (
    spiffe_id TEXT NOT NULL,
    server_id TEXT NOT NULL,
    bundle_sequence INTEGER NOT NULL,
    x509_streams INTEGER NOT NULL,
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (spiffe_id, server_id)
)
"#,
        postgres: r#"
CREATE TABLE agent_deliveries (
    spiffe_id TEXT COLLATE "C" NOT NULL,
    server_id TEXT COLLATE "C" NOT NULL,
    bundle_sequence BIGINT NOT NULL,
    x509_streams BIGINT NOT NULL,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (spiffe_id, server_id)
)
"#,
    },
    // Root rotation and taint: when a CA key last changed state (0 for rows from before: not
    // recorded), where an operator-supplied root's private key lives (a path, never the key),
    // and when the operator tainted the key (0: never).
    Migration {
        version: 4,
        sqlite: r#"
ALTER TABLE ca_keys ADD COLUMN state_changed_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ca_keys ADD COLUMN key_path TEXT NOT NULL DEFAULT '';
ALTER TABLE ca_keys ADD COLUMN tainted_at INTEGER NOT NULL DEFAULT 0
"#,
        postgres: r#"
ALTER TABLE ca_keys ADD COLUMN state_changed_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ca_keys ADD COLUMN key_path TEXT NOT NULL DEFAULT '';
ALTER TABLE ca_keys ADD COLUMN tainted_at BIGINT NOT NULL DEFAULT 0
"#,
    },
    // Version 5: revoked certificates (`meshid-ca svid revoke`), and the CRL each issuing key
    // signed over them (signed by the server holding the key, read by every server).
    Migration {
        version: 5,
        sqlite: r#"
CREATE TABLE revocations (
    issuer_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (issuer_id, serial)
);
CREATE TABLE crls (
    issuer_id TEXT PRIMARY KEY,
    server_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    der BLOB NOT NULL
)
"#,
        postgres: r#"
CREATE TABLE revocations (
    issuer_id TEXT NOT NULL,
    serial TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    not_after BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (issuer_id, serial)
);
CREATE TABLE crls (
    issuer_id TEXT PRIMARY KEY,
    server_id TEXT NOT NULL,
    number BIGINT NOT NULL,
    this_update BIGINT NOT NULL,
    entries BIGINT NOT NULL,
    der BYTEA NOT NULL
)
"#,
    },
    // Version 6: which CRL set (its digest) each agent last reported handed to every workload
    // stream, to measure when a revocation reached the mesh.
    Migration {
        version: 6,
        sqlite: "ALTER TABLE agent_deliveries ADD COLUMN crl_digest TEXT NOT NULL DEFAULT ''",
        postgres: "ALTER TABLE agent_deliveries ADD COLUMN crl_digest TEXT NOT NULL DEFAULT ''",
    },
    // Version 7: the central policy (`meshid-ca policy`), one row per revision holding the
    // whole set of named documents (JSON object name -> YAML text), and the revision each
    // agent reported holding.
    Migration {
        version: 7,
        sqlite: r#"
CREATE TABLE policy_revisions (
    revision INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    author TEXT NOT NULL,
    reason TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    documents TEXT NOT NULL
);
ALTER TABLE agent_deliveries ADD COLUMN policy_revision INTEGER NOT NULL DEFAULT 0
"#,
        postgres: r#"
CREATE TABLE policy_revisions (
    revision BIGINT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    author TEXT NOT NULL,
    reason TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    documents TEXT NOT NULL
);
ALTER TABLE agent_deliveries ADD COLUMN policy_revision BIGINT NOT NULL DEFAULT 0
"#,
    },
    // Version 8: owner labels (`meshid-ca apply`): the mesh file owner that declared an entry
    // ('' for one made by hand), and the owner of each policy document of a revision (a JSON
    // object name -> owner, without the documents applied by hand).
    Migration {
        version: 8,
        sqlite: r#"
ALTER TABLE registration_entries ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE policy_revisions ADD COLUMN owners TEXT NOT NULL DEFAULT '{}'
"#,
        postgres: r#"
ALTER TABLE registration_entries ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE policy_revisions ADD COLUMN owners TEXT NOT NULL DEFAULT '{}'
"#,
    },
    // Version 9: federation relationships (`meshid-ca federation`); their bundles are in
    // `bundles` (the last good document fetched), deleted with them.
    Migration {
        version: 9,
        sqlite: r#"
CREATE TABLE federation_relationships (
    trust_domain TEXT NOT NULL PRIMARY KEY,
    endpoint_url TEXT NOT NULL,
    profile TEXT NOT NULL,
    endpoint_spiffe_id TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
)
"#,
        postgres: r#"
CREATE TABLE federation_relationships (
    trust_domain TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    endpoint_url TEXT NOT NULL,
    profile TEXT NOT NULL,
    endpoint_spiffe_id TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
)
"#,
    },
    // Version 10: CI tokens exchanged (`meshid_ca::ci`), by issuer and jti, kept until they
    // expire, so that each is used once.
    Migration {
        version: 10,
        sqlite: r#"
CREATE TABLE ci_tokens (
    issuer TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER NOT NULL,
    PRIMARY KEY (issuer, jti)
)
"#,
        postgres: r#"
CREATE TABLE ci_tokens (
    issuer TEXT COLLATE "C" NOT NULL,
    jti TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT NOT NULL,
    PRIMARY KEY (issuer, jti)
)
"#,
    },
];

const ENTRY_COLUMNS: &str = "id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, dns_names, \
     federates_with, admin, hint, created_at, updated_at, revision, owner";
const AGENT_COLUMNS: &str = "spiffe_id, attestation_type, serial, expires_at, created_at, banned, \
     previous_serial, previous_until";
const TOKEN_COLUMNS: &str = "hash, id, created_at, expires_at, used_at";
const CA_KEY_COLUMNS: &str = "id, kind, state, server_id, parent_id, public_der, not_before, \
     not_after, created_at, state_changed_at, key_path, tainted_at";
const AUDIT_COLUMNS: &str = "seq, time, kind, actor, details, prev_hash, hash";

/// The SQL datastore. Cheap to share behind an `Arc`; the pool inside is already shared.
#[derive(Debug)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    /// Serializes this process's write transactions on SQLite, so they queue here rather than
    /// spin on SQLite's busy handler. Unused on PostgreSQL (the advisory lock does the job).
    sqlite_writer: Mutex<()>,
    /// The last write that could not begin or commit, while no write has committed since.
    write_failure: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// PostgreSQL: the URL, for the connection that listens for other servers' commits.
    listen_url: Option<String>,
    /// PostgreSQL: woken when another transaction committed (see [`Datastore::change_signal`]).
    changes: std::sync::OnceLock<std::sync::Arc<tokio::sync::Notify>>,
}

/// The channel every PostgreSQL write transaction notifies at commit.
const CHANGES_CHANNEL: &str = "meshid_changes";

/// Listens on [`CHANGES_CHANNEL`] and wakes `notify` on each notification, and after each
/// (re)connection (something may have been missed meanwhile); reconnects after a second when
/// the connection is lost. Ends when `notify` is dropped.
async fn listen_for_changes(url: String, notify: std::sync::Weak<tokio::sync::Notify>) {
    let wake = || match notify.upgrade() {
        Some(n) => {
            n.notify_one();
            true
        }
        None => false,
    };
    let mut failing = false;
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(CHANGES_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(mut l) => {
                if failing {
                    tracing::info!("listening for other servers' changes again");
                }
                if !wake() {
                    return;
                }
                loop {
                    match l.try_recv().await {
                        // A notification, or the connection lost (the next call reconnects):
                        // either way, look.
                        Ok(_) => {
                            if !wake() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "lost the connection that listens for other servers' changes; polling meanwhile");
                            failing = true;
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot listen for other servers' changes; polling meanwhile");
                    failing = true;
                }
            }
        }
        if notify.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How long a failed write keeps the store reported as failing (unless a write commits).
const WRITE_FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(30);

/// A write transaction, holding what serializes it until it commits or is dropped (rolled back).
struct WriteTx<'a> {
    tx: Tx,
    _guard: Option<MutexGuard<'a, ()>>,
    /// Where the outcome of the commit is recorded (`None` for the readiness probe).
    health: Option<&'a std::sync::Mutex<Option<(std::time::Instant, String)>>>,
}

impl WriteTx<'_> {
    async fn commit(mut self) -> Result<(), StoreError> {
        let result = self.tx.commit().await;
        if let Some(health) = self.health {
            note_write(health, result.as_ref().err());
        }
        result
    }
}

/// Records the outcome of a write's begin or commit.
fn note_write(
    health: &std::sync::Mutex<Option<(std::time::Instant, String)>>,
    error: Option<&StoreError>,
) {
    let mut h = health
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match error {
        None => *h = None,
        Some(e) => {
            tracing::error!(error = %e, "datastore write failed; readiness reports it");
            *h = Some((std::time::Instant::now(), e.to_string()));
        }
    }
}

/// A pooled connection inside a transaction begun (`BEGIN`) and ended (`COMMIT`) here rather
/// than by sqlx's `Transaction`, whose bookkeeping went wrong when a commit failed: after
/// `SQLITE_FULL` the connection went back to the pool still counted as in a transaction, and
/// every later write failed (`begin_with at non-zero transaction depth`) until a restart. Here
/// a connection goes back to the pool only after a successful `COMMIT`; when the commit fails,
/// or the transaction is dropped without one (an error path), the connection is closed
/// instead, which rolls back whatever it held: the next write gets a fresh one.
struct Tx {
    conn: sqlx::pool::PoolConnection<Any>,
    committed: bool,
}

impl Tx {
    async fn begin(pool: &AnyPool, begin: &'static str) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await?;
        if let Err(e) = sqlx::query(begin).execute(&mut *conn).await {
            conn.close_on_drop();
            return Err(e.into());
        }
        Ok(Self {
            conn,
            committed: false,
        })
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.committed = true;
        Ok(())
    }
}

impl std::ops::Deref for Tx {
    type Target = sqlx::AnyConnection;

    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

impl SqlStore {
    /// Opens (creating if needed) and migrates the datastore at `url`: `sqlite://PATH` or
    /// `postgres://...` (also `postgresql://...`).
    ///
    /// A new SQLite file is created with mode 0600. Fails with
    /// [`StoreError::SchemaTooNew`] when the database was migrated by a newer binary.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() || path.contains('?') || path == ":memory:" {
                return Err(StoreError::UnsupportedUrl(url.to_owned()));
            }
            Self::open_sqlite(Path::new(path), true).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::open_postgres(url, true).await
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    /// Opens an existing datastore as it is: no file is created and nothing is migrated
    /// (`backup` reads it; `restore` checks a target before it writes anything).
    pub async fn open_unmigrated(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() || path.contains('?') || path == ":memory:" {
                return Err(StoreError::UnsupportedUrl(url.to_owned()));
            }
            if !Path::new(path).is_file() {
                return Err(StoreError::NotFound(format!("SQLite datastore {path}")));
            }
            Self::open_sqlite(Path::new(path), false).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::open_postgres(url, false).await
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    /// Opens (creating if needed) the SQLite datastore `dir/meshid-ca.db`.
    pub async fn open_sqlite_in(dir: &Path) -> Result<Self, StoreError> {
        Self::open_sqlite(&dir.join(SQLITE_FILE_NAME), true).await
    }

    async fn open_sqlite(path: &Path, migrate: bool) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let path = create_private_file(path)?;
        let options = SqliteConnectOptions::new().filename(&path).to_url_lossy();
        let options = AnyConnectOptions::from_url(&options)?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(|conn: &mut AnyConnection, _meta: PoolConnectionMetadata| {
                Box::pin(sqlite_pragmas(conn))
            })
            .connect_with(options)
            .await?;
        let store = Self {
            pool,
            dialect: Dialect::Sqlite,
            sqlite_writer: Mutex::new(()),
            write_failure: std::sync::Mutex::new(None),
            listen_url: None,
            changes: std::sync::OnceLock::new(),
        };
        if migrate {
            store.migrate().await?;
        }
        // SQLite creates -wal and -shm with the database file's mode; make sure regardless.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.clone().into_os_string();
            side.push(suffix);
            restrict_mode(Path::new(&side))?;
        }
        Ok(store)
    }

    async fn open_postgres(url: &str, migrate: bool) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        // A database that cannot be reached fails a call after this wait (unavailable: nothing
        // was begun) rather than holding it: agents serve what they hold meanwhile, and callers
        // retry. Under load a free connection comes well within it.
        let pool = AnyPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        let store = Self {
            pool,
            dialect: Dialect::Postgres,
            sqlite_writer: Mutex::new(()),
            write_failure: std::sync::Mutex::new(None),
            listen_url: Some(url.to_owned()),
            changes: std::sync::OnceLock::new(),
        };
        if migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Closes the pool, waiting for connections in use to be returned (on SQLite this also
    /// checkpoints the write-ahead log).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Begins a transaction that writes and may append to the audit log: serialized against
    /// every other such transaction (see the module documentation).
    async fn begin_write(&self) -> Result<WriteTx<'_>, StoreError> {
        match self.dialect {
            Dialect::Sqlite => {
                let guard = self.sqlite_writer.lock().await;
                let tx = Tx::begin(&self.pool, "BEGIN IMMEDIATE")
                    .await
                    .inspect_err(|e| note_write(&self.write_failure, Some(e)))?;
                Ok(WriteTx {
                    tx,
                    _guard: Some(guard),
                    health: Some(&self.write_failure),
                })
            }
            Dialect::Postgres => {
                // READ COMMITTED whatever the server's default: each statement after the lock
                // sees what the previous holder committed (the head, above all).
                let mut tx = Tx::begin(&self.pool, "BEGIN ISOLATION LEVEL READ COMMITTED")
                    .await
                    .inspect_err(|e| note_write(&self.write_failure, Some(e)))?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(AUDIT_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(WriteTx {
                    tx,
                    _guard: None,
                    health: Some(&self.write_failure),
                })
            }
        }
    }

    /// Begins a migration transaction (serialized between processes too).
    async fn begin_migration(&self) -> Result<WriteTx<'_>, StoreError> {
        match self.dialect {
            Dialect::Sqlite => self.begin_write().await,
            Dialect::Postgres => {
                let mut tx = Tx::begin(&self.pool, "BEGIN").await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(WriteTx {
                    tx,
                    _guard: None,
                    health: None,
                })
            }
        }
    }

    /// Creates `schema_migrations` if needed and returns the highest applied version (0 for a
    /// new database), refusing a schema newer than this binary.
    async fn current_version(tx: &mut Tx) -> Result<i64, StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut **tx)
        .await?;
        let found: i64 =
            sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
                .fetch_one(&mut **tx)
                .await?
                .try_get("v")?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(found)
    }

    /// Applies every migration newer than the database, each in its own transaction.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut w = self.begin_migration().await?;
        let initial = Self::current_version(&mut w.tx).await?;
        w.commit().await?;
        for step in MIGRATIONS.iter().filter(|m| m.version > initial) {
            let mut w = self.begin_migration().await?;
            // Another CA server may have migrated while this one waited for the lock.
            let current = Self::current_version(&mut w.tx).await?;
            if current >= step.version {
                w.commit().await?;
                continue;
            }
            let sql = match self.dialect {
                Dialect::Sqlite => step.sqlite,
                Dialect::Postgres => step.postgres,
            };
            let migration_error = |source| StoreError::Migration {
                version: step.version,
                source,
            };
            // One statement at a time: prepared statements hold one each. Migration SQL has no
            // `;` inside literals.
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(statement)
                    .execute(&mut *w.tx)
                    .await
                    .map_err(migration_error)?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(step.version)
                .bind(crate::unix_now())
                .execute(&mut *w.tx)
                .await
                .map_err(migration_error)?;
            w.commit().await.map_err(|e| match e {
                StoreError::Backend(source) => migration_error(source),
                other => other,
            })?;
            tracing::info!(
                version = step.version,
                backend = self.backend(),
                "datastore migrated"
            );
        }
        Ok(())
    }

    async fn fetch_entries(
        &self,
        filter: Option<&str>,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let rows = match filter {
            None => {
                sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM registration_entries ORDER BY id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
            Some(parent) => {
                sqlx::query(&format!(
                "SELECT {ENTRY_COLUMNS} FROM registration_entries WHERE parent_id = $1 ORDER BY id"
            ))
                .bind(parent)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(decode_entry).collect()
    }
}

const FEDERATION_COLUMNS: &str =
    "trust_domain, endpoint_url, profile, endpoint_spiffe_id, owner, created_at, updated_at";

/// The `trust_domain` column of a row of `table`.
fn trust_domain_column(row: &AnyRow, table: &str) -> Result<TrustDomain, StoreError> {
    let td: String = row.try_get("trust_domain")?;
    TrustDomain::new(&td)
        .map_err(|e| StoreError::Corrupt(format!("{table} row {td:?}: trust domain: {e}")))
}

fn decode_federation(row: &AnyRow) -> Result<FederationRecord, StoreError> {
    Ok(FederationRecord {
        trust_domain: trust_domain_column(row, "federation_relationships")?,
        endpoint_url: row.try_get("endpoint_url")?,
        profile: row.try_get("profile")?,
        endpoint_spiffe_id: row.try_get("endpoint_spiffe_id")?,
        owner: row.try_get("owner")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Stores a new relationship (and the bundle it starts from) inside the caller's write
/// transaction; [`StoreError::AlreadyExists`] when the trust domain has one.
async fn insert_federation_in_tx(
    tx: &mut Tx,
    r: &FederationRecord,
    bootstrap: Option<&FederatedBundle>,
) -> Result<(), StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO federation_relationships (trust_domain, endpoint_url, profile, \
         endpoint_spiffe_id, owner, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(r.trust_domain.as_str())
    .bind(r.endpoint_url.as_str())
    .bind(r.profile.as_str())
    .bind(r.endpoint_spiffe_id.as_str())
    .bind(r.owner.as_str())
    .bind(r.created_at)
    .bind(r.updated_at)
    .execute(&mut **tx)
    .await;
    map_unique(inserted, || {
        format!("federation relationship with {}", r.trust_domain)
    })?;
    // A bundle left by an earlier relationship is not trusted again by accident.
    sqlx::query("DELETE FROM bundles WHERE trust_domain = $1")
        .bind(r.trust_domain.as_str())
        .execute(&mut **tx)
        .await?;
    if let Some(bundle) = bootstrap {
        put_bundle_in_tx(tx, bundle).await?;
    }
    Ok(())
}

/// Deletes a relationship and its bundle inside the caller's write transaction and returns
/// it; [`StoreError::NotFound`] when there is none.
async fn delete_federation_in_tx(
    tx: &mut Tx,
    trust_domain: &TrustDomain,
) -> Result<FederationRecord, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {FEDERATION_COLUMNS} FROM federation_relationships WHERE trust_domain = $1"
    ))
    .bind(trust_domain.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Err(StoreError::NotFound(format!(
            "federation relationship with {trust_domain}"
        )));
    };
    let record = decode_federation(&row)?;
    for table in ["federation_relationships", "bundles"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE trust_domain = $1"))
            .bind(trust_domain.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(record)
}

/// Stores (inserts or replaces) a federated bundle inside the caller's write transaction.
async fn put_bundle_in_tx(tx: &mut Tx, bundle: &FederatedBundle) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO bundles (trust_domain, document, sequence, updated_at) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (trust_domain) DO UPDATE SET document = excluded.document, \
         sequence = excluded.sequence, updated_at = excluded.updated_at",
    )
    .bind(bundle.trust_domain.as_str())
    .bind(bundle.document.as_str())
    .bind(bundle.sequence)
    .bind(bundle.updated_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Chains `event` after the stored head and writes the record and the new head, inside `tx`.
/// The caller must have begun `tx` with [`SqlStore::begin_write`], which serializes appends.
async fn append_in_tx(tx: &mut Tx, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
    let mut records = append_many_in_tx(tx, std::slice::from_ref(event)).await?;
    records
        .pop()
        .ok_or_else(|| StoreError::Corrupt("audit append produced no record".into()))
}

/// Chains `events` after the current head, inside the caller's write transaction: reads the
/// head once, inserts one record per event, moves the head once.
async fn append_many_in_tx(
    tx: &mut Tx,
    events: &[AuditEvent],
) -> Result<Vec<AuditRecord>, StoreError> {
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
        .fetch_optional(&mut **tx)
        .await?;
    let (mut head_seq, mut head_hash) = match head {
        Some(row) => {
            let seq: i64 = row.try_get("seq")?;
            (
                seq,
                hash32(row.try_get("hash")?, "audit_head", &seq.to_string())?,
            )
        }
        None => (0, [0; 32]),
    };
    let now = crate::unix_now();
    let mut records = Vec::with_capacity(events.len());
    for event in events {
        let record = AuditRecord::chain(event, now, head_seq, head_hash);
        head_seq = record.seq;
        head_hash = record.hash;
        records.push(record);
    }
    // Multi-row inserts: one statement (one round trip to the database) per 100 records.
    for chunk in records.chunks(100) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let b = i * 7;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for record in chunk {
            query = query
                .bind(record.seq)
                .bind(record.time)
                .bind(record.kind.as_str())
                .bind(record.actor.as_str())
                .bind(record.details.as_str())
                .bind(record.prev_hash.to_vec())
                .bind(record.hash.to_vec());
        }
        query.execute(&mut **tx).await?;
    }
    // A change the other servers act on: they are notified at commit (not at all on
    // rollback), and their change feeds read at once instead of at their next poll.
    if tx.backend_name() == "PostgreSQL"
        && events
            .iter()
            .any(|e| crate::audit::PEER_CHANGES.contains(&e.kind.as_str()))
    {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANGES_CHANNEL)
            .execute(&mut **tx)
            .await?;
    }
    if !records.is_empty() {
        sqlx::query(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        )
        .bind(head_seq)
        .bind(head_hash.to_vec())
        .execute(&mut **tx)
        .await?;
    }
    Ok(records)
}

/// A query over the `Any` driver.
type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

/// Binds an entry's columns from `spiffe_id` to `hint`, in the order of [`ENTRY_COLUMNS`].
fn bind_entry_fields<'q>(
    query: AnyQuery<'q>,
    entry: &'q RegistrationEntry,
) -> Result<AnyQuery<'q>, StoreError> {
    Ok(query
        .bind(entry.spiffe_id.to_string())
        .bind(entry.parent_id.to_string())
        .bind(entry_selectors_json(entry)?)
        .bind(ttl_secs(entry.x509_svid_ttl))
        .bind(ttl_secs(entry.jwt_svid_ttl))
        .bind(json_strings(entry.dns_names.iter().map(String::as_str))?)
        .bind(json_strings(
            entry.federates_with.iter().map(|t| t.as_str()),
        )?)
        .bind(i64::from(entry.admin))
        .bind(entry.hint.as_str()))
}

/// Inserts a new entry inside the caller's write transaction.
async fn insert_entry_in_tx(tx: &mut Tx, entry: &RegistrationEntry) -> Result<(), StoreError> {
    let insert = format!(
        "INSERT INTO registration_entries ({ENTRY_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    );
    let result = sqlx::query(&insert).bind(entry.id.as_str());
    let result = bind_entry_fields(result, entry)?
        .bind(entry.created_at)
        .bind(entry.updated_at)
        .bind(entry.revision)
        .bind(entry.owner.as_str())
        .execute(&mut **tx)
        .await;
    map_unique(result, || format!("registration entry {}", entry.id))?;
    Ok(())
}

/// Replaces an entry whose stored revision is `entry.revision - 1`, inside the caller's write
/// transaction; its owner too when `with_owner`.
async fn update_entry_in_tx(
    tx: &mut Tx,
    entry: &RegistrationEntry,
    with_owner: bool,
) -> Result<(), StoreError> {
    let found: Option<i64> = sqlx::query("SELECT revision FROM registration_entries WHERE id = $1")
        .bind(entry.id.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .map(|row| row.try_get("revision"))
        .transpose()?;
    let Some(found) = found else {
        return Err(StoreError::NotFound(format!(
            "registration entry {}",
            entry.id
        )));
    };
    let expected = entry.revision - 1;
    if found != expected {
        return Err(StoreError::RevisionConflict {
            id: entry.id.to_string(),
            expected,
            found,
        });
    }
    // created_at is kept as stored: an update does not change when the entry was made. The
    // owner is `$14` when it changes, else kept.
    let owner = if with_owner { "$14" } else { "owner" };
    let sql = format!(
        "UPDATE registration_entries SET spiffe_id = $1, parent_id = $2, selectors = $3, \
         x509_ttl = $4, jwt_ttl = $5, dns_names = $6, federates_with = $7, admin = $8, \
         hint = $9, updated_at = $10, revision = $11, owner = {owner} \
         WHERE id = $12 AND revision = $13"
    );
    let updated = bind_entry_fields(sqlx::query(&sql), entry)?
        .bind(entry.updated_at)
        .bind(entry.revision)
        .bind(entry.id.as_str())
        .bind(expected);
    let updated = if with_owner {
        updated.bind(entry.owner.as_str())
    } else {
        updated
    };
    let updated = updated.execute(&mut **tx).await?;
    if updated.rows_affected() != 1 {
        // Unreachable while writes are serialized; kept as a guard.
        return Err(StoreError::RevisionConflict {
            id: entry.id.to_string(),
            expected,
            found,
        });
    }
    Ok(())
}

/// Deletes an entry (only at `revision`, when given) inside the caller's write transaction,
/// and returns it.
async fn delete_entry_in_tx(
    tx: &mut Tx,
    id: &EntryId,
    revision: Option<i64>,
) -> Result<RegistrationEntry, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {ENTRY_COLUMNS} FROM registration_entries WHERE id = $1"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Err(StoreError::NotFound(format!("registration entry {id}")));
    };
    let entry = decode_entry(&row)?;
    if let Some(expected) = revision.filter(|r| *r != entry.revision) {
        return Err(StoreError::RevisionConflict {
            id: id.to_string(),
            expected,
            found: entry.revision,
        });
    }
    sqlx::query("DELETE FROM registration_entries WHERE id = $1")
        .bind(id.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(entry)
}

/// The newest policy revision with its documents and owners, read through `conn`.
async fn newest_policy_revision(
    conn: &mut AnyConnection,
    revision: Option<u64>,
) -> Result<Option<PolicyRevision>, StoreError> {
    const COLUMNS: &str =
        "revision, created_at, author, reason, action, subject, documents, owners";
    let row = match revision {
        None => {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM policy_revisions ORDER BY revision DESC LIMIT 1"
            ))
            .fetch_optional(&mut *conn)
            .await?
        }
        Some(n) => {
            let Ok(n) = i64::try_from(n) else {
                return Ok(None);
            };
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM policy_revisions WHERE revision = $1"
            ))
            .bind(n)
            .fetch_optional(&mut *conn)
            .await?
        }
    };
    row.as_ref()
        .map(|row| {
            let mut rev = decode_policy_revision(row)?;
            let json =
                |column: &str| -> Result<std::collections::BTreeMap<String, String>, StoreError> {
                    let text: String = row.try_get(column)?;
                    serde_json::from_str(&text).map_err(|e| {
                        corrupt(
                            "policy_revisions",
                            &rev.revision.to_string(),
                            format!("{column}: {e}"),
                        )
                    })
                };
            let (documents, owners) = (json("documents")?, json("owners")?);
            rev.documents = documents;
            rev.owners = owners;
            Ok(rev)
        })
        .transpose()
}

/// Inserts policy revision `r`, which must be the head's plus one, inside the caller's write
/// transaction.
async fn insert_policy_revision_in_tx(tx: &mut Tx, r: &PolicyRevision) -> Result<(), StoreError> {
    let revision = i64::try_from(r.revision)
        .map_err(|_| StoreError::Corrupt(format!("policy revision {}", r.revision)))?;
    let documents = serde_json::to_string(&r.documents)
        .map_err(|e| StoreError::Corrupt(format!("policy documents: {e}")))?;
    let owners = serde_json::to_string(&r.owners)
        .map_err(|e| StoreError::Corrupt(format!("policy owners: {e}")))?;
    let head: i64 = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS head FROM policy_revisions")
        .fetch_one(&mut **tx)
        .await?
        .try_get("head")?;
    if head + 1 != revision {
        return Err(StoreError::AlreadyExists(format!(
            "policy revision {revision} (the policy changed meanwhile: revision {head} is the \
             newest; reload and retry)"
        )));
    }
    sqlx::query(
        "INSERT INTO policy_revisions (revision, created_at, author, reason, action, \
         subject, documents, owners) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(revision)
    .bind(r.created_at)
    .bind(r.author.as_str())
    .bind(r.reason.as_str())
    .bind(r.action.as_str())
    .bind(r.subject.as_str())
    .bind(documents)
    .bind(owners)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Datastore for SqlStore {
    fn backend(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    fn change_signal(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        use std::sync::Arc;
        let url = self.listen_url.as_ref()?;
        Some(Arc::clone(self.changes.get_or_init(|| {
            let notify = Arc::new(tokio::sync::Notify::new());
            tokio::spawn(listen_for_changes(url.clone(), Arc::downgrade(&notify)));
            notify
        })))
    }

    async fn create_entry(
        &self,
        entry: &RegistrationEntry,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        insert_entry_in_tx(&mut w.tx, entry).await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM registration_entries WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_entry).transpose()
    }

    async fn get_entries(&self, ids: &[EntryId]) -> Result<Vec<RegistrationEntry>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT {ENTRY_COLUMNS} FROM registration_entries WHERE id IN ({})",
                placeholders.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            let rows = query.fetch_all(&self.pool).await?;
            for row in &rows {
                out.push(decode_entry(row)?);
            }
        }
        Ok(out)
    }

    async fn list_entries(&self) -> Result<Vec<RegistrationEntry>, StoreError> {
        self.fetch_entries(None).await
    }

    async fn list_entries_by_parent(
        &self,
        parent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        self.fetch_entries(Some(&parent_id.to_string())).await
    }

    async fn update_entry(
        &self,
        entry: &RegistrationEntry,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        // The owner is kept as stored: only a mesh apply changes it.
        update_entry_in_tx(&mut w.tx, entry, false).await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn delete_entry(
        &self,
        id: &EntryId,
        audit: &AuditEvent,
    ) -> Result<RegistrationEntry, StoreError> {
        let mut w = self.begin_write().await?;
        let entry = delete_entry_in_tx(&mut w.tx, id, None).await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await?;
        Ok(entry)
    }

    async fn create_join_token(
        &self,
        token: &JoinTokenRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        let result = sqlx::query(&format!(
            "INSERT INTO join_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
        ))
        .bind(token.hash.to_vec())
        .bind(token.id.as_str())
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(token.used_at)
        .execute(&mut *w.tx)
        .await;
        map_unique(result, || format!("join token {}", token.id))?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn consume_join_token(
        &self,
        hash: &[u8; 32],
        now: i64,
        audit: &AuditEvent,
    ) -> Result<JoinTokenRecord, StoreError> {
        let mut w = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE join_tokens SET used_at = $1 \
             WHERE hash = $2 AND used_at IS NULL AND expires_at > $1 RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(now)
        .bind(hash.to_vec())
        .fetch_optional(&mut *w.tx)
        .await?;
        // Dropping `w` rolls back; nothing was changed anyway.
        let Some(row) = row else {
            return Err(StoreError::TokenRejected);
        };
        let token = decode_token(&row)?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await?;
        Ok(token)
    }

    async fn upsert_agent(
        &self,
        agent: &AgentRecord,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO agents ({AGENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (spiffe_id) DO UPDATE SET attestation_type = excluded.attestation_type, \
             serial = excluded.serial, expires_at = excluded.expires_at, \
             created_at = excluded.created_at, banned = excluded.banned, \
             previous_serial = excluded.previous_serial, previous_until = excluded.previous_until"
        ))
        .bind(agent.spiffe_id.to_string())
        .bind(agent.attestation_type.as_str())
        .bind(agent.serial.as_str())
        .bind(agent.expires_at)
        .bind(agent.created_at)
        .bind(i64::from(agent.banned))
        .bind(agent.previous_serial.as_str())
        .bind(agent.previous_until)
        .execute(&mut *w.tx)
        .await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn renew_agent(
        &self,
        spiffe_id: &SpiffeId,
        serial: &str,
        expires_at: i64,
        previous_until: i64,
        audit: &AuditEvent,
    ) -> Result<AgentRecord, StoreError> {
        let mut w = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "UPDATE agents SET previous_serial = serial, previous_until = $1, serial = $2, \
             expires_at = $3 WHERE spiffe_id = $4 AND banned = 0 RETURNING {AGENT_COLUMNS}"
        ))
        .bind(previous_until)
        .bind(serial)
        .bind(expires_at)
        .bind(spiffe_id.to_string())
        .fetch_optional(&mut *w.tx)
        .await?;
        // Dropping `w` rolls back; nothing was changed anyway.
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("agent {spiffe_id}")));
        };
        let agent = decode_agent(&row)?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await?;
        Ok(agent)
    }

    async fn get_agent(&self, spiffe_id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE spiffe_id = $1"
        ))
        .bind(spiffe_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_agent).transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents ORDER BY spiffe_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_agent).collect()
    }

    async fn delete_agent(
        &self,
        spiffe_id: &SpiffeId,
        audit: &AuditEvent,
    ) -> Result<AgentRecord, StoreError> {
        let mut w = self.begin_write().await?;
        let row = sqlx::query(&format!(
            "DELETE FROM agents WHERE spiffe_id = $1 RETURNING {AGENT_COLUMNS}"
        ))
        .bind(spiffe_id.to_string())
        .fetch_optional(&mut *w.tx)
        .await?;
        // Dropping `w` rolls back; nothing was changed anyway.
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("agent {spiffe_id}")));
        };
        let agent = decode_agent(&row)?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await?;
        Ok(agent)
    }

    async fn insert_ca_key(&self, key: &CaKeyRecord, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        let result = sqlx::query(&format!(
            "INSERT INTO ca_keys ({CA_KEY_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(key.id.as_str())
        .bind(key.kind.as_str())
        .bind(key.state.as_str())
        .bind(key.server_id.as_str())
        .bind(key.parent_id.clone())
        .bind(key.public_der.clone())
        .bind(key.not_before)
        .bind(key.not_after)
        .bind(key.created_at)
        .bind(key.state_changed_at)
        .bind(key.key_path.as_str())
        .bind(key.tainted_at)
        .execute(&mut *w.tx)
        .await;
        map_unique(result, || format!("CA key {}", key.id))?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn transition_ca_key(
        &self,
        id: &str,
        from: Option<CaKeyState>,
        to: CaKeyState,
        at: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        let row = sqlx::query("SELECT state FROM ca_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *w.tx)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("CA key {id}")));
        };
        let found: String = row.try_get("state")?;
        if let Some(from) = from {
            if found != from.as_str() {
                return Err(StoreError::StateConflict {
                    id: id.to_owned(),
                    expected: from.as_str(),
                    found,
                });
            }
        }
        sqlx::query("UPDATE ca_keys SET state = $1, state_changed_at = $2 WHERE id = $3")
            .bind(to.as_str())
            .bind(at)
            .bind(id)
            .execute(&mut *w.tx)
            .await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn taint_ca_key(&self, id: &str, at: i64, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        let row = sqlx::query("SELECT tainted_at FROM ca_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *w.tx)
            .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("CA key {id}")));
        };
        let tainted_at: i64 = row.try_get("tainted_at")?;
        if tainted_at != 0 {
            return Err(StoreError::AlreadyExists(format!(
                "a taint of CA key {id} (at {tainted_at})"
            )));
        }
        sqlx::query("UPDATE ca_keys SET tainted_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&mut *w.tx)
            .await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn list_ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CA_KEY_COLUMNS} FROM ca_keys ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_ca_key).collect()
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        let mut w = self.begin_write().await?;
        let record = append_in_tx(&mut w.tx, event).await?;
        w.commit().await?;
        Ok(record)
    }

    async fn append_audit_batch(
        &self,
        events: &[AuditEvent],
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = self.begin_write().await?;
        let records = append_many_in_tx(&mut w.tx, events).await?;
        w.commit().await?;
        Ok(records)
    }

    async fn audit_records(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_audit).collect()
    }

    async fn audit_records_since(
        &self,
        since_time: i64,
        kinds: &[&str],
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if kinds.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (0..kinds.len()).map(|i| format!("${}", i + 4)).collect();
        let sql = format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 AND time >= $2 AND kind IN ({}) \
             ORDER BY seq LIMIT $3",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql)
            .bind(after)
            .bind(since_time)
            .bind(limit.max(0));
        for kind in kinds {
            query = query.bind(*kind);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(decode_audit).collect()
    }

    async fn record_delivery(&self, d: &DeliveryRecord) -> Result<(), StoreError> {
        let seq = i64::try_from(d.bundle_sequence)
            .map_err(|_| StoreError::Corrupt(format!("bundle sequence {}", d.bundle_sequence)))?;
        let streams = i64::try_from(d.x509_streams).unwrap_or(i64::MAX);
        let mut w = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO agent_deliveries (spiffe_id, server_id, bundle_sequence, x509_streams, \
             reported_at, crl_digest, policy_revision) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (spiffe_id, server_id) DO \
             UPDATE SET bundle_sequence = excluded.bundle_sequence, \
             x509_streams = excluded.x509_streams, reported_at = excluded.reported_at, \
             crl_digest = excluded.crl_digest, policy_revision = excluded.policy_revision",
        )
        .bind(d.agent.to_string())
        .bind(d.server_id.as_str())
        .bind(seq)
        .bind(streams)
        .bind(d.reported_at)
        .bind(d.crl_digest.as_str())
        .bind(i64::try_from(d.policy_revision).unwrap_or(i64::MAX))
        .execute(&mut *w.tx)
        .await?;
        w.commit().await
    }

    async fn insert_revocations(
        &self,
        revocations: &[RevocationRecord],
        audit: &AuditEvent,
    ) -> Result<Vec<RevocationRecord>, StoreError> {
        let mut w = self.begin_write().await?;
        let mut added = Vec::new();
        for r in revocations {
            let done = sqlx::query(
                "INSERT INTO revocations (issuer_id, serial, spiffe_id, kind, not_after, \
                 revoked_at, reason, actor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (issuer_id, serial) DO NOTHING",
            )
            .bind(r.issuer_id.clone())
            .bind(r.serial.clone())
            .bind(r.spiffe_id.clone())
            .bind(r.kind.clone())
            .bind(r.not_after)
            .bind(r.revoked_at)
            .bind(r.reason.clone())
            .bind(r.actor.clone())
            .execute(&mut *w.tx)
            .await?;
            if done.rows_affected() == 1 {
                added.push(r.clone());
            }
        }
        if !added.is_empty() {
            append_in_tx(&mut w.tx, audit).await?;
        }
        w.commit().await?;
        Ok(added)
    }

    async fn list_revocations(&self, now: i64) -> Result<Vec<RevocationRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT issuer_id, serial, spiffe_id, kind, not_after, revoked_at, reason, actor \
             FROM revocations WHERE not_after > $1 ORDER BY issuer_id, serial",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RevocationRecord {
                    issuer_id: row.try_get("issuer_id")?,
                    serial: row.try_get("serial")?,
                    spiffe_id: row.try_get("spiffe_id")?,
                    kind: row.try_get("kind")?,
                    not_after: row.try_get("not_after")?,
                    revoked_at: row.try_get("revoked_at")?,
                    reason: row.try_get("reason")?,
                    actor: row.try_get("actor")?,
                })
            })
            .collect()
    }

    async fn prune_revocations(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM revocations WHERE not_after <= $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn put_crl(&self, crl: &CrlRecord, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO crls (issuer_id, server_id, number, this_update, entries, der) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (issuer_id) DO UPDATE SET server_id = excluded.server_id, \
             number = excluded.number, this_update = excluded.this_update, \
             entries = excluded.entries, der = excluded.der",
        )
        .bind(crl.issuer_id.clone())
        .bind(crl.server_id.clone())
        .bind(i64::try_from(crl.number).unwrap_or(i64::MAX))
        .bind(crl.this_update)
        .bind(i64::try_from(crl.entries).unwrap_or(i64::MAX))
        .bind(crl.der.clone())
        .execute(&mut *w.tx)
        .await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn list_crls(&self) -> Result<Vec<CrlRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT issuer_id, server_id, number, this_update, entries, der FROM crls \
             ORDER BY issuer_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let number: i64 = row.try_get("number")?;
                let entries: i64 = row.try_get("entries")?;
                Ok(CrlRecord {
                    issuer_id: row.try_get("issuer_id")?,
                    server_id: row.try_get("server_id")?,
                    number: u64::try_from(number).unwrap_or(0),
                    this_update: row.try_get("this_update")?,
                    entries: u64::try_from(entries).unwrap_or(0),
                    der: row.try_get("der")?,
                })
            })
            .collect()
    }

    async fn append_policy_revision(
        &self,
        r: &PolicyRevision,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        insert_policy_revision_in_tx(&mut w.tx, r).await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn get_policy_revision(
        &self,
        revision: Option<u64>,
    ) -> Result<Option<PolicyRevision>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        newest_policy_revision(&mut conn, revision).await
    }

    async fn list_policy_revisions(&self) -> Result<Vec<PolicyRevision>, StoreError> {
        let rows = sqlx::query(
            "SELECT revision, created_at, author, reason, action, subject FROM policy_revisions \
             ORDER BY revision",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_policy_revision).collect()
    }

    async fn apply_mesh(&self, plan: MeshPlanner<'_>) -> Result<bool, StoreError> {
        let mut w = self.begin_write().await?;
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM registration_entries ORDER BY id"
        ))
        .fetch_all(&mut *w.tx)
        .await?;
        let entries = rows.iter().map(decode_entry).collect::<Result<_, _>>()?;
        let policy = newest_policy_revision(&mut w.tx, None).await?;
        let federations = sqlx::query(&format!(
            "SELECT {FEDERATION_COLUMNS} FROM federation_relationships ORDER BY trust_domain"
        ))
        .fetch_all(&mut *w.tx)
        .await?
        .iter()
        .map(decode_federation)
        .collect::<Result<_, _>>()?;
        let Some(write) = plan(MeshState {
            entries,
            policy,
            federations,
        }) else {
            // Nothing was written: committing keeps the connection (a rollback would close it).
            w.commit().await?;
            return Ok(false);
        };
        for entry in &write.create {
            insert_entry_in_tx(&mut w.tx, entry).await?;
        }
        for entry in &write.update {
            update_entry_in_tx(&mut w.tx, entry, true).await?;
        }
        for (id, revision) in &write.delete {
            delete_entry_in_tx(&mut w.tx, id, Some(*revision)).await?;
        }
        for (id, revision, owner) in &write.adopt {
            let done = sqlx::query(
                "UPDATE registration_entries SET owner = $1 WHERE id = $2 AND revision = $3",
            )
            .bind(owner.as_str())
            .bind(id.as_str())
            .bind(*revision)
            .execute(&mut *w.tx)
            .await?;
            if done.rows_affected() != 1 {
                // Unreachable while writes are serialized; kept as a guard.
                return Err(StoreError::NotFound(format!(
                    "registration entry {id} at revision {revision}"
                )));
            }
        }
        if let Some(revision) = &write.policy {
            insert_policy_revision_in_tx(&mut w.tx, revision).await?;
        }
        for (relationship, bundle) in &write.federations_created {
            insert_federation_in_tx(&mut w.tx, relationship, bundle.as_ref()).await?;
        }
        for r in &write.federations_updated {
            let done = sqlx::query(
                "UPDATE federation_relationships SET endpoint_url = $1, profile = $2, \
                 endpoint_spiffe_id = $3, owner = $4, updated_at = $5 WHERE trust_domain = $6",
            )
            .bind(r.endpoint_url.as_str())
            .bind(r.profile.as_str())
            .bind(r.endpoint_spiffe_id.as_str())
            .bind(r.owner.as_str())
            .bind(r.updated_at)
            .bind(r.trust_domain.as_str())
            .execute(&mut *w.tx)
            .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::NotFound(format!(
                    "federation relationship with {}",
                    r.trust_domain
                )));
            }
        }
        for td in &write.federations_deleted {
            delete_federation_in_tx(&mut w.tx, td).await?;
        }
        append_many_in_tx(&mut w.tx, &write.audit).await?;
        w.commit().await?;
        Ok(true)
    }

    async fn create_federation(
        &self,
        relationship: &FederationRecord,
        bootstrap: Option<&FederatedBundle>,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        insert_federation_in_tx(&mut w.tx, relationship, bootstrap).await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn delete_federation(
        &self,
        trust_domain: &TrustDomain,
        audit: &AuditEvent,
    ) -> Result<FederationRecord, StoreError> {
        let mut w = self.begin_write().await?;
        let record = delete_federation_in_tx(&mut w.tx, trust_domain).await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await?;
        Ok(record)
    }

    async fn list_federations(&self) -> Result<Vec<FederationRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {FEDERATION_COLUMNS} FROM federation_relationships ORDER BY trust_domain"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_federation).collect()
    }

    async fn put_federated_bundle(
        &self,
        bundle: &FederatedBundle,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM federation_relationships WHERE trust_domain = $1")
            .bind(bundle.trust_domain.as_str())
            .fetch_optional(&mut *w.tx)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!(
                "federation relationship with {}",
                bundle.trust_domain
            )));
        }
        put_bundle_in_tx(&mut w.tx, bundle).await?;
        append_in_tx(&mut w.tx, audit).await?;
        w.commit().await
    }

    async fn list_federated_bundles(&self) -> Result<Vec<FederatedBundle>, StoreError> {
        let rows = sqlx::query(
            "SELECT trust_domain, document, sequence, updated_at FROM bundles \
             ORDER BY trust_domain",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(FederatedBundle {
                    trust_domain: trust_domain_column(row, "bundles")?,
                    document: row.try_get("document")?,
                    sequence: row.try_get("sequence")?,
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }

    async fn consume_ci_token(
        &self,
        issuer: &str,
        jti: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let mut w = self.begin_write().await?;
        let now = crate::unix_now();
        // Tokens past their expiry cannot be presented again: their jti need not be kept.
        sqlx::query("DELETE FROM ci_tokens WHERE expires_at < $1")
            .bind(now - 3600)
            .execute(&mut *w.tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO ci_tokens (issuer, jti, expires_at, used_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(issuer)
        .bind(jti)
        .bind(expires_at)
        .bind(now)
        .execute(&mut *w.tx)
        .await;
        map_unique(inserted, || format!("CI token {jti} of {issuer}"))?;
        w.commit().await
    }

    async fn list_deliveries(&self) -> Result<Vec<DeliveryRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT spiffe_id, server_id, bundle_sequence, x509_streams, reported_at, \
             crl_digest, policy_revision FROM agent_deliveries ORDER BY spiffe_id, server_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let text: String = row.try_get("spiffe_id")?;
                let agent = SpiffeId::new(&text).map_err(|e| {
                    corrupt(
                        "agent_deliveries",
                        &text,
                        format!("spiffe_id {text:?}: {e}"),
                    )
                })?;
                let seq: i64 = row.try_get("bundle_sequence")?;
                let streams: i64 = row.try_get("x509_streams")?;
                Ok(DeliveryRecord {
                    agent,
                    server_id: row.try_get("server_id")?,
                    bundle_sequence: u64::try_from(seq).unwrap_or(0),
                    x509_streams: u64::try_from(streams).unwrap_or(0),
                    reported_at: row.try_get("reported_at")?,
                    crl_digest: row.try_get("crl_digest")?,
                    policy_revision: u64::try_from(row.try_get::<i64, _>("policy_revision")?)
                        .unwrap_or(0),
                })
            })
            .collect()
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        if let Some((at, error)) = self
            .write_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            if at.elapsed() < WRITE_FAILURE_MEMORY {
                return Err(StoreError::WriteFailing(error.clone()));
            }
        }
        let mut w = self.begin_write().await?;
        w.health = None;
        sqlx::query("UPDATE audit_head SET seq = seq WHERE id = 1")
            .execute(&mut *w.tx)
            .await?;
        w.commit().await
    }

    async fn audit_head(&self) -> Result<Option<(i64, [u8; 32])>, StoreError> {
        let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let seq: i64 = row.try_get("seq")?;
        Ok(Some((
            seq,
            hash32(row.try_get("hash")?, "audit_head", &seq.to_string())?,
        )))
    }
}

/// Per-connection SQLite settings (WAL is persistent, the others are per connection).
async fn sqlite_pragmas(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in [
        "PRAGMA busy_timeout = 5000",
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = NORMAL",
        "PRAGMA foreign_keys = ON",
    ] {
        conn.execute(pragma).await?;
    }
    Ok(())
}

/// An I/O error on the SQLite file, naming it.
fn file_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(sqlx::Error::Configuration(
        format!("sqlite file {}: {e}", path.display()).into(),
    ))
}

/// Creates the SQLite file with mode 0600 if it does not exist (tightening the mode of an
/// existing one) and returns its absolute path.
fn create_private_file(path: &Path) -> Result<PathBuf, StoreError> {
    let io = |e| file_error(path, e);
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    restrict_mode(path)?;
    std::fs::canonicalize(path).map_err(io)
}

/// Removes group and other permissions from `path`, if it exists.
fn restrict_mode(path: &Path) -> Result<(), StoreError> {
    let io = |e| file_error(path, e);
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "datastore file was readable by others; setting mode 0600"
                );
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// Maps a unique-constraint violation to [`StoreError::AlreadyExists`].
fn map_unique<T>(
    result: Result<T, sqlx::Error>,
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    match result {
        Ok(v) => Ok(v),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(StoreError::AlreadyExists(what()))
        }
        Err(e) => Err(e.into()),
    }
}

fn ttl_secs(ttl: Option<Duration>) -> i64 {
    ttl.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn json_strings<'a>(items: impl Iterator<Item = &'a str>) -> Result<String, StoreError> {
    serde_json::to_string(&items.collect::<Vec<_>>())
        .map_err(|e| StoreError::Corrupt(format!("cannot encode a string list: {e}")))
}

fn entry_selectors_json(entry: &RegistrationEntry) -> Result<String, StoreError> {
    let selectors: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
    json_strings(selectors.iter().map(String::as_str))
}

fn corrupt(table: &str, id: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{table} row {id:?}: {what}"))
}

fn hash32(bytes: Vec<u8>, table: &str, id: &str) -> Result<[u8; 32], StoreError> {
    let len = bytes.len();
    <[u8; 32]>::try_from(bytes)
        .map_err(|_| corrupt(table, id, format_args!("hash is {len} bytes, not 32")))
}

fn bool01(v: i64, table: &str, id: &str, column: &str) -> Result<bool, StoreError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(corrupt(
            table,
            id,
            format_args!("{column} is {other}, not 0 or 1"),
        )),
    }
}

/// A policy revision row without its documents.
fn decode_policy_revision(row: &AnyRow) -> Result<PolicyRevision, StoreError> {
    let revision: i64 = row.try_get("revision")?;
    Ok(PolicyRevision {
        revision: u64::try_from(revision).unwrap_or(0),
        created_at: row.try_get("created_at")?,
        author: row.try_get("author")?,
        reason: row.try_get("reason")?,
        action: row.try_get("action")?,
        subject: row.try_get("subject")?,
        documents: Default::default(),
        owners: Default::default(),
    })
}

/// Decodes a registration entry, re-validating every field with the same parsers an operator's
/// request goes through ([`EntrySpec::validate`] in the entry's own trust domain).
fn decode_entry(row: &AnyRow) -> Result<RegistrationEntry, StoreError> {
    const T: &str = "registration_entries";
    let raw_id: String = row.try_get("id")?;
    let bad = |what: String| corrupt(T, &raw_id, what);
    let id = EntryId::from_str(&raw_id).map_err(|e| bad(e.to_string()))?;
    let spiffe_id_text: String = row.try_get("spiffe_id")?;
    let spiffe_id = SpiffeId::new(&spiffe_id_text)
        .map_err(|e| bad(format!("spiffe_id {spiffe_id_text:?}: {e}")))?;
    let strings = |column: &str| -> Result<Vec<String>, StoreError> {
        let text: String = row.try_get(column)?;
        serde_json::from_str(&text)
            .map_err(|e| bad(format!("{column} is not a JSON list of strings: {e}")))
    };
    let ttl = |column: &str| -> Result<u64, StoreError> {
        let secs: i64 = row.try_get(column)?;
        u64::try_from(secs).map_err(|_| bad(format!("{column} is negative ({secs})")))
    };
    let spec = EntrySpec {
        id: Some(id.to_string()),
        spiffe_id: spiffe_id_text.clone(),
        parent_id: row.try_get("parent_id")?,
        selectors: strings("selectors")?,
        x509_svid_ttl: ttl("x509_ttl")?,
        jwt_svid_ttl: ttl("jwt_ttl")?,
        dns_names: strings("dns_names")?,
        federates_with: strings("federates_with")?,
        admin: bool01(row.try_get("admin")?, T, &raw_id, "admin")?,
        hint: row.try_get("hint")?,
    };
    let created_at: i64 = row.try_get("created_at")?;
    let mut entry = spec
        .validate(spiffe_id.trust_domain(), created_at)
        .map_err(|e| bad(e.to_string()))?;
    if entry.id != id {
        return Err(bad("id changed on validation".to_owned()));
    }
    entry.updated_at = row.try_get("updated_at")?;
    entry.revision = row.try_get("revision")?;
    entry.owner = row.try_get("owner")?;
    if entry.revision < 1 {
        return Err(bad(format!("revision is {}", entry.revision)));
    }
    Ok(entry)
}

fn decode_agent(row: &AnyRow) -> Result<AgentRecord, StoreError> {
    let text: String = row.try_get("spiffe_id")?;
    let banned = bool01(row.try_get("banned")?, "agents", &text, "banned")?;
    let spiffe_id = SpiffeId::new(&text)
        .map_err(|e| corrupt("agents", &text, format!("spiffe_id {text:?}: {e}")))?;
    Ok(AgentRecord {
        attestation_type: row.try_get("attestation_type")?,
        serial: row.try_get("serial")?,
        expires_at: row.try_get("expires_at")?,
        created_at: row.try_get("created_at")?,
        banned,
        previous_serial: row.try_get("previous_serial")?,
        previous_until: row.try_get("previous_until")?,
        spiffe_id,
    })
}

fn decode_token(row: &AnyRow) -> Result<JoinTokenRecord, StoreError> {
    let id: String = row.try_get("id")?;
    Ok(JoinTokenRecord {
        hash: hash32(row.try_get("hash")?, "join_tokens", &id)?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        used_at: row.try_get("used_at")?,
        id,
    })
}

fn decode_ca_key(row: &AnyRow) -> Result<CaKeyRecord, StoreError> {
    const T: &str = "ca_keys";
    let id: String = row.try_get("id")?;
    let kind: String = row.try_get("kind")?;
    let Some(kind) = CaKeyKind::parse(&kind) else {
        return Err(corrupt(T, &id, format_args!("unknown kind {kind:?}")));
    };
    let state: String = row.try_get("state")?;
    let Some(state) = CaKeyState::parse(&state) else {
        return Err(corrupt(T, &id, format_args!("unknown state {state:?}")));
    };
    Ok(CaKeyRecord {
        kind,
        state,
        server_id: row.try_get("server_id")?,
        parent_id: row.try_get("parent_id")?,
        public_der: row.try_get("public_der")?,
        not_before: row.try_get("not_before")?,
        not_after: row.try_get("not_after")?,
        created_at: row.try_get("created_at")?,
        state_changed_at: row.try_get("state_changed_at")?,
        key_path: row.try_get("key_path")?,
        tainted_at: row.try_get("tainted_at")?,
        id,
    })
}

fn decode_audit(row: &AnyRow) -> Result<AuditRecord, StoreError> {
    let seq: i64 = row.try_get("seq")?;
    let id = seq.to_string();
    Ok(AuditRecord {
        seq,
        time: row.try_get("time")?,
        kind: row.try_get("kind")?,
        actor: row.try_get("actor")?,
        details: row.try_get("details")?,
        prev_hash: hash32(row.try_get("prev_hash")?, "audit_log", &id)?,
        hash: hash32(row.try_get("hash")?, "audit_log", &id)?,
    })
}

pub mod dump;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// Servers open the store inside spawned tasks, so the futures must be `Send`.
    #[test]
    fn open_futures_are_send() {
        assert_send(&SqlStore::open("sqlite:///nonexistent/x.db"));
        assert_send(&SqlStore::open_sqlite_in(Path::new("/nonexistent")));
    }

    #[test]
    fn passwords_are_not_echoed() {
        assert_eq!(redact_url("mysql://u:pw@host/db"), "mysql://u:***@host/db");
        assert_eq!(redact_url("mysql://host/db"), "mysql://host/db");
    }

    #[test]
    fn migrations_are_ordered_and_end_at_schema_version() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
        let expected: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }
}
