//! A store on either backend, raw SQL access to tamper with it, and builders for records.

use std::future::Future;
use std::time::Duration;

use meshid_ca::audit::AuditEvent;
use meshid_ca::entry::{EntrySpec, RegistrationEntry};
use meshid_ca::store::sql::SqlStore;
use meshid_ca::store::{
    AgentRecord, CaKeyKind, CaKeyRecord, CaKeyState, Datastore, JoinTokenRecord,
};
use spiffe::TrustDomain;
use sqlx::{AnyConnection, Connection, Row};

use crate::pg::{self, PgDatabase};

/// Which database a case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Keeps the database alive for the test.
enum Guard {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] PgDatabase),
}

/// An open store plus the URL it came from.
pub struct Fixture {
    pub store: SqlStore,
    pub url: String,
    _guard: Guard,
}

/// Runs a case with a time limit, so a deadlock fails the test instead of hanging the suite.
pub async fn bounded(case: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), case)
        .await
        .expect("test case timed out");
}

impl Fixture {
    /// A fresh, empty store; `None` when the backend is not available here (PostgreSQL
    /// binaries missing outside CI).
    pub async fn new(backend: Backend) -> Option<Self> {
        let (url, guard) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("meshid-ca.db").display());
                (url, Guard::Sqlite(dir))
            }
            Backend::Postgres => {
                let db = pg::fresh_database().await?;
                (db.url.clone(), Guard::Postgres(db))
            }
        };
        let store = SqlStore::open(&url).await.unwrap();
        assert_eq!(
            store.backend(),
            match backend {
                Backend::Sqlite => "sqlite",
                Backend::Postgres => "postgres",
            }
        );
        Some(Self {
            store,
            url,
            _guard: guard,
        })
    }

    /// Another store on the same database (a second CA server, or the same one restarted).
    pub async fn open_again(&self) -> SqlStore {
        SqlStore::open(&self.url).await.unwrap()
    }

    /// Closes the store and opens it again from its URL, as a restarted CA server does.
    pub async fn restart(&mut self) {
        self.store.close().await;
        self.store = self.open_again().await;
    }

    async fn raw_conn(&self) -> AnyConnection {
        sqlx::any::install_default_drivers();
        AnyConnection::connect(&self.url).await.unwrap()
    }

    /// Runs statements on the database behind the store's back (a separate connection).
    pub async fn raw(&self, sql: &str) {
        let mut conn = self.raw_conn().await;
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }

    /// The first column of the first row of a query, as an integer.
    pub async fn raw_i64(&self, sql: &str) -> i64 {
        let mut conn = self.raw_conn().await;
        let row = sqlx::query(sql).fetch_one(&mut conn).await.unwrap();
        let v: i64 = row.try_get(0).unwrap();
        conn.close().await.unwrap();
        v
    }

    /// The kinds of all audit records, in order.
    pub async fn audit_kinds(&self) -> Vec<String> {
        self.store
            .audit_records(0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.kind)
            .collect()
    }
}

/// Creates the fixture or returns from the case (PostgreSQL unavailable, already reported).
macro_rules! fixture {
    ($backend:expr) => {
        match crate::store::fixture::Fixture::new($backend).await {
            Some(fx) => fx,
            None => return,
        }
    };
}
pub(crate) use fixture;

pub const NOW: i64 = 1_700_000_000;

pub fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

pub fn ev(kind: &str) -> AuditEvent {
    AuditEvent::new(kind, "admin:uid=0", serde_json::json!({ "test": kind }))
}

pub fn agent_id(n: u32) -> String {
    format!("spiffe://example.org/meshid/agent/join_token/{n}")
}

/// [`agent_id`] parsed.
pub fn agent_spiffe_id(n: u32) -> spiffe::SpiffeId {
    spiffe::SpiffeId::new(agent_id(n)).unwrap()
}

/// A valid entry `id` under agent `parent`, with selectors and fields derived from `n`.
pub fn entry(id: &str, parent: &str, n: u32) -> RegistrationEntry {
    EntrySpec {
        id: Some(id.to_owned()),
        spiffe_id: format!("spiffe://example.org/workload/{id}"),
        parent_id: parent.to_owned(),
        selectors: vec![format!("unix:uid:{n}"), "unix:path:/usr/bin/app".to_owned()],
        x509_svid_ttl: 3600,
        jwt_svid_ttl: if n.is_multiple_of(2) { 0 } else { 300 },
        dns_names: vec![format!("w{n}.example.org"), "*.svc.example.org".to_owned()],
        federates_with: if n.is_multiple_of(2) {
            vec![]
        } else {
            vec!["other.org".to_owned(), "b.test".to_owned()]
        },
        admin: n.is_multiple_of(3),
        hint: format!("hint {n}"),
    }
    .validate(&td(), NOW)
    .unwrap()
}

pub fn token(n: u8, expires_at: i64) -> JoinTokenRecord {
    JoinTokenRecord {
        hash: [n; 32],
        id: format!("tok{n}"),
        created_at: NOW,
        expires_at,
        used_at: None,
    }
}

pub fn agent(n: u32) -> AgentRecord {
    AgentRecord {
        spiffe_id: agent_spiffe_id(n),
        attestation_type: "join_token".to_owned(),
        serial: format!("{n:04x}"),
        expires_at: NOW + 3600,
        created_at: NOW,
        banned: false,
        previous_serial: String::new(),
        previous_until: 0,
    }
}

pub fn ca_key(id: &str, kind: CaKeyKind, parent: Option<&str>, created_at: i64) -> CaKeyRecord {
    CaKeyRecord {
        id: id.to_owned(),
        kind,
        state: CaKeyState::Prepared,
        server_id: "ca-1".to_owned(),
        parent_id: parent.map(str::to_owned),
        public_der: vec![0x30, 0x03, 0x02, 0x01, id.len() as u8, 0x00, 0xff],
        not_before: created_at,
        not_after: created_at + 86_400,
        created_at,
        state_changed_at: created_at,
        key_path: String::new(),
        tainted_at: 0,
    }
}
