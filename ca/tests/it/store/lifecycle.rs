//! Opening, migrating, restarting; URLs; file modes.

use std::os::unix::fs::PermissionsExt;

use meshid_ca::store::sql::{SqlStore, SCHEMA_VERSION};
use meshid_ca::store::verify_audit;
use meshid_ca::store::{CaKeyKind, CaKeyState, Datastore, StoreError};

use crate::store::fixture::{agent, agent_id, ca_key, entry, ev, fixture, token, Backend, NOW};

pub async fn restart_persistence(backend: Backend) {
    let mut fx = fixture!(backend);
    let entries: Vec<_> = (0..3)
        .map(|n| entry(&format!("p{n}"), &agent_id(1), n))
        .collect();
    for e in &entries {
        fx.store
            .create_entry(e, &ev("entry.created"))
            .await
            .unwrap();
    }
    let unused = token(1, NOW + 600);
    let used = token(2, NOW + 600);
    for t in [&unused, &used] {
        fx.store
            .create_join_token(t, &ev("token.created"))
            .await
            .unwrap();
    }
    fx.store
        .consume_join_token(&used.hash, NOW, &ev("token.used"))
        .await
        .unwrap();
    fx.store
        .upsert_agent(&agent(1), &ev("agent.attested"))
        .await
        .unwrap();
    let root = ca_key("root", CaKeyKind::X509Root, None, NOW);
    fx.store
        .insert_ca_key(&root, &ev("ca_key.created"))
        .await
        .unwrap();
    fx.store
        .set_ca_key_state("root", CaKeyState::Active, &ev("ca_key.activated"))
        .await
        .unwrap();
    let head = fx.store.audit_head().await.unwrap().unwrap();
    assert_eq!(head.0, 9);

    fx.restart().await;

    let s = &fx.store;
    assert_eq!(s.list_entries().await.unwrap(), entries);
    assert!(matches!(
        s.consume_join_token(&used.hash, NOW + 1, &ev("token.used"))
            .await,
        Err(StoreError::TokenRejected)
    ));
    assert_eq!(s.list_agents().await.unwrap(), vec![agent(1)]);
    let keys = s.list_ca_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0].state, &keys[0].public_der),
        (CaKeyState::Active, &root.public_der)
    );
    assert_eq!(s.audit_head().await.unwrap(), Some(head));
    assert_eq!(verify_audit(s).await.unwrap(), 9);

    // The chain keeps growing from the stored head.
    s.consume_join_token(&unused.hash, NOW + 1, &ev("token.used"))
        .await
        .unwrap();
    let next = s.append_audit(&ev("svid.x509.issued")).await.unwrap();
    assert_eq!(next.seq, 11);
    assert_eq!(verify_audit(s).await.unwrap(), 11);

    fx.restart().await;
    assert_eq!(verify_audit(&fx.store).await.unwrap(), 11);
    assert_eq!(
        fx.store
            .append_audit(&ev("svid.jwt.issued"))
            .await
            .unwrap()
            .seq,
        12
    );
}

pub async fn migrations_idempotent_on_reopen(backend: Backend) {
    let mut fx = fixture!(backend);
    fx.store
        .create_entry(&entry("m", &agent_id(1), 1), &ev("entry.created"))
        .await
        .unwrap();
    for _ in 0..3 {
        fx.restart().await;
    }
    let also_open = fx.open_again().await;
    assert_eq!(
        fx.raw_i64("SELECT COUNT(*) FROM schema_migrations").await,
        SCHEMA_VERSION
    );
    assert_eq!(
        fx.raw_i64("SELECT MAX(version) FROM schema_migrations")
            .await,
        SCHEMA_VERSION
    );
    assert_eq!(also_open.list_entries().await.unwrap().len(), 1);
    assert_eq!(verify_audit(&fx.store).await.unwrap(), 1);
}

pub async fn concurrent_open_migrates_once(backend: Backend) {
    // Several CA servers starting together on a fresh database.
    let fx = fixture!(backend);
    fx.raw(
        "DROP TABLE registration_entries; DROP TABLE agents; DROP TABLE join_tokens; \
            DROP TABLE ca_keys; DROP TABLE bundles; DROP TABLE audit_log; DROP TABLE audit_head; \
            DROP TABLE agent_deliveries; DROP TABLE revocations; DROP TABLE crls; \
            DROP TABLE policy_revisions; DROP TABLE federation_relationships; DROP TABLE ci_tokens; \
            DROP TABLE schema_migrations",
    )
    .await;
    let opens = (0..4).map(|_| {
        let url = fx.url.clone();
        async move { SqlStore::open(&url).await }
    });
    let stores: Vec<SqlStore> = futures_join_all(opens).await;
    assert_eq!(
        fx.raw_i64("SELECT COUNT(*) FROM schema_migrations").await,
        SCHEMA_VERSION
    );
    for s in &stores {
        s.append_audit(&ev("started")).await.unwrap();
    }
    assert_eq!(verify_audit(&stores[0]).await.unwrap(), 4);
}

/// Awaits every open concurrently (on separate tasks) and unwraps them.
async fn futures_join_all(
    opens: impl Iterator<
        Item = impl std::future::Future<Output = Result<SqlStore, StoreError>> + Send + 'static,
    >,
) -> Vec<SqlStore> {
    let tasks: Vec<_> = opens.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().unwrap());
    }
    out
}

pub async fn schema_too_new_is_refused(backend: Backend) {
    let fx = fixture!(backend);
    fx.store.close().await;
    fx.raw(&format!(
        "INSERT INTO schema_migrations (version, applied_at) VALUES ({}, 0)",
        SCHEMA_VERSION + 1
    ))
    .await;
    match SqlStore::open(&fx.url).await {
        Err(StoreError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

pub async fn unsupported_urls_are_refused() {
    for url in [
        "mysql://x",
        "sqlite:relative.db",
        "sqlite://",
        "sqlite://:memory:",
        "file:///tmp/x.db",
        "",
        "postgres:/x",
    ] {
        match SqlStore::open(url).await {
            Err(StoreError::UnsupportedUrl(_)) => {}
            other => panic!("{url:?}: expected UnsupportedUrl, got {other:?}"),
        }
    }
    // The error does not echo a password.
    let err = SqlStore::open("mysql://user:hunter2@db/x")
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

pub async fn sqlite_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = SqlStore::open_sqlite_in(dir.path()).await.unwrap();
    store
        .create_entry(&entry("f", &agent_id(1), 1), &ev("entry.created"))
        .await
        .unwrap();
    let db = dir.path().join("meshid-ca.db");
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(mode("meshid-ca.db"), 0o600);
    assert_eq!(mode("meshid-ca.db-wal"), 0o600);
    assert_eq!(mode("meshid-ca.db-shm"), 0o600);
    store.close().await;

    // An existing file that others can read is tightened on open, and the URL form works.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = SqlStore::open(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    assert_eq!(mode("meshid-ca.db"), 0o600);
    assert_eq!(store.list_entries().await.unwrap().len(), 1);
    assert_eq!(
        store.audit_records(0, 10).await.unwrap().len(),
        1,
        "the data written before is still there"
    );
}

pub async fn sqlite_missing_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let err = SqlStore::open_sqlite_in(&missing).await.unwrap_err();
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

pub async fn a_version_1_database_migrates_its_agents(backend: Backend) {
    // A database as version 1 left it: agents without the superseded-serial columns, CA keys
    // without their state-change time and key path.
    let blob = match backend {
        Backend::Sqlite => "X'3000'",
        Backend::Postgres => "decode('3000', 'hex')",
    };
    let fx = fixture!(backend);
    fx.raw(&format!(
        "ALTER TABLE agents DROP COLUMN previous_serial; \
         ALTER TABLE agents DROP COLUMN previous_until; \
         DROP TABLE agent_deliveries; DROP TABLE revocations; DROP TABLE crls; \
         DROP TABLE policy_revisions; DROP TABLE federation_relationships; DROP TABLE ci_tokens; \
         ALTER TABLE registration_entries DROP COLUMN owner; \
         ALTER TABLE ca_keys DROP COLUMN state_changed_at; \
         ALTER TABLE ca_keys DROP COLUMN key_path; \
         ALTER TABLE ca_keys DROP COLUMN tainted_at; \
         DELETE FROM schema_migrations WHERE version >= 2; \
         INSERT INTO agents (spiffe_id, attestation_type, serial, expires_at, created_at, banned) \
         VALUES ('spiffe://example.org/meshid/agent/join_token/old', 'join_token', 'abcd', 10, 1, 0); \
         INSERT INTO ca_keys (id, kind, state, server_id, parent_id, public_der, not_before, \
         not_after, created_at) VALUES ('jwt-old', 'jwt', 'retired', 'ca-1', NULL, {blob}, 1, 2, 1); \
         INSERT INTO registration_entries (id, spiffe_id, parent_id, selectors, x509_ttl, \
         jwt_ttl, dns_names, federates_with, admin, hint, created_at, updated_at, revision) \
         VALUES ('old', 'spiffe://example.org/old', 'spiffe://example.org/p', \
         '[\"unix:uid:1\"]', 0, 0, '[]', '[]', 0, '', 1, 1, 1)",
    ))
    .await;
    let store = SqlStore::open(&fx.url).await.unwrap();
    assert_eq!(
        fx.raw_i64("SELECT MAX(version) FROM schema_migrations")
            .await,
        SCHEMA_VERSION
    );
    let agent = store
        .get_agent(
            &spiffe::SpiffeId::new("spiffe://example.org/meshid/agent/join_token/old").unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            agent.serial.as_str(),
            agent.previous_serial.as_str(),
            agent.previous_until
        ),
        ("abcd", "", 0)
    );
    // An entry from before version 8 was made by hand: no owner.
    let entry = store
        .get_entry(&"old".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.owner, "");
    // A key's state change from before version 4 is unknown (0), never guessed.
    let keys = store.list_ca_keys().await.unwrap();
    assert_eq!(
        keys.iter()
            .map(|k| (k.id.as_str(), k.state_changed_at, k.key_path.as_str()))
            .collect::<Vec<_>>(),
        vec![("jwt-old", 0, "")]
    );
}

pub async fn killed_connections_leave_no_broken_one_behind() {
    // The database drops every connection of the store (a failover, a restart, an operator's
    // pg_terminate_backend) three times; each time writes work again at once, readiness's
    // write probe passes, and the audit chain is whole. (SQLite: the full-disk test in
    // tests/tests/e2e/security.rs.)
    let fx = fixture!(Backend::Postgres);
    let s = &fx.store;
    let mut written = 0;
    for round in 0..3u32 {
        fx.raw(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await;
        let mut results = Vec::new();
        for n in 0..10 {
            let r = s
                .upsert_agent(&agent(round * 100 + n), &ev("agent.attested"))
                .await;
            written += u32::from(r.is_ok());
            results.push(r.is_ok());
        }
        assert!(
            results[results.len() - 5..].iter().all(|ok| *ok),
            "writes still fail after the connections were killed: {results:?}"
        );
        s.probe_write().await.unwrap();
    }
    assert_eq!(verify_audit(s).await.unwrap(), u64::from(written));
}
