//! Registration entries: CRUD, optimistic concurrency, listing, corrupt rows.

use meshid_ca::entry::EntryId;
use meshid_ca::store::{Datastore, StoreError};

use crate::store::fixture::{agent_id, agent_spiffe_id, entry, ev, fixture, Backend, NOW};

pub async fn entry_crud(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let e = entry("web", &agent_id(1), 1001);
    s.create_entry(&e, &ev("entry.created")).await.unwrap();
    assert_eq!(s.get_entry(&e.id).await.unwrap(), Some(e.clone()));

    let mut updated = e.clone();
    updated.selectors = vec![meshid_ca::entry::Selector::parse("unix:uid:0").unwrap()];
    updated.dns_names.clear();
    updated.federates_with.clear();
    updated.x509_svid_ttl = None;
    updated.admin = !e.admin;
    updated.hint = String::new();
    updated.updated_at = NOW + 10;
    updated.revision = 2;
    s.update_entry(&updated, &ev("entry.updated"))
        .await
        .unwrap();
    assert_eq!(s.get_entry(&e.id).await.unwrap(), Some(updated.clone()));

    let deleted = s.delete_entry(&e.id, &ev("entry.deleted")).await.unwrap();
    assert_eq!(deleted, updated);
    assert_eq!(s.get_entry(&e.id).await.unwrap(), None);
    assert!(s.list_entries().await.unwrap().is_empty());
}

pub async fn entry_already_exists(backend: Backend) {
    let fx = fixture!(backend);
    let e = entry("dup", &agent_id(1), 1);
    fx.store
        .create_entry(&e, &ev("entry.created"))
        .await
        .unwrap();
    let other = entry("dup", &agent_id(2), 2);
    let err = fx
        .store
        .create_entry(&other, &ev("entry.created"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::AlreadyExists(ref what) if what.contains("dup")),
        "{err:?}"
    );
    assert_eq!(fx.store.get_entry(&e.id).await.unwrap(), Some(e));
}

pub async fn entry_revision_conflict(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let e = entry("rev", &agent_id(1), 1);
    s.create_entry(&e, &ev("entry.created")).await.unwrap();

    // Two admins both load revision 1; the first update wins, the second must reload.
    let mut first = e.clone();
    first.hint = "first".to_owned();
    first.revision = 2;
    let mut second = e.clone();
    second.hint = "second".to_owned();
    second.revision = 2;
    s.update_entry(&first, &ev("entry.updated")).await.unwrap();
    let err = s
        .update_entry(&second, &ev("entry.updated"))
        .await
        .unwrap_err();
    match err {
        StoreError::RevisionConflict {
            id,
            expected,
            found,
        } => {
            assert_eq!((id.as_str(), expected, found), ("rev", 1, 2));
        }
        other => panic!("expected RevisionConflict, got {other:?}"),
    }
    // Skipping ahead is a conflict too.
    let mut ahead = first.clone();
    ahead.revision = 5;
    assert!(matches!(
        s.update_entry(&ahead, &ev("entry.updated")).await,
        Err(StoreError::RevisionConflict {
            expected: 4,
            found: 2,
            ..
        })
    ));
    assert_eq!(s.get_entry(&e.id).await.unwrap().unwrap().hint, "first");

    second.revision = 3;
    s.update_entry(&second, &ev("entry.updated")).await.unwrap();
    let stored = s.get_entry(&e.id).await.unwrap().unwrap();
    assert_eq!((stored.hint.as_str(), stored.revision), ("second", 3));
}

pub async fn entry_not_found(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let e = entry("ghost", &agent_id(1), 1);
    let id: EntryId = "ghost".parse().unwrap();
    assert_eq!(s.get_entry(&id).await.unwrap(), None);
    let mut up = e.clone();
    up.revision = 2;
    assert!(matches!(
        s.update_entry(&up, &ev("entry.updated")).await,
        Err(StoreError::NotFound(ref what)) if what.contains("ghost")
    ));
    assert!(matches!(
        s.delete_entry(&id, &ev("entry.deleted")).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn entries_by_parent(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    // Ids chosen so that byte order differs from a case-insensitive collation.
    let ids = ["b-2", "B-1", "a-3", "A_0", "z", "Z"];
    let mut all = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let parent = agent_id(if n % 2 == 0 { 1 } else { 2 });
        let e = entry(id, &parent, n as u32);
        s.create_entry(&e, &ev("entry.created")).await.unwrap();
        all.push(e);
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(s.list_entries().await.unwrap(), all);

    let by_parent = s.list_entries_by_parent(&agent_spiffe_id(1)).await.unwrap();
    let expected: Vec<_> = all
        .iter()
        .filter(|e| e.parent_id.to_string() == agent_id(1))
        .cloned()
        .collect();
    assert_eq!(by_parent, expected);
    assert_eq!(
        by_parent.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["a-3", "b-2", "z"]
    );
    assert_eq!(
        s.list_entries_by_parent(&agent_spiffe_id(2))
            .await
            .unwrap()
            .len(),
        3
    );
    assert!(s
        .list_entries_by_parent(&agent_spiffe_id(3))
        .await
        .unwrap()
        .is_empty());
}

pub async fn corrupt_entry_row_is_reported(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    let good = entry("good", &agent_id(1), 1);
    s.create_entry(&good, &ev("entry.created")).await.unwrap();
    for (id, column, value) in [
        ("sel", "selectors", r#"'["unix:uid:01"]'"#),
        ("nojson", "dns_names", "'not json'"),
        ("sid", "spiffe_id", "'http://example.org/x'"),
        ("fed", "federates_with", r#"'["example.org"]'"#),
        ("ttl", "x509_ttl", "-5"),
        ("adm", "admin", "7"),
        ("par", "parent_id", "'spiffe://elsewhere.org/agent'"),
    ] {
        let e = entry(id, &agent_id(2), 2);
        s.create_entry(&e, &ev("entry.created")).await.unwrap();
        fx.raw(&format!(
            "UPDATE registration_entries SET {column} = {value} WHERE id = '{id}'"
        ))
        .await;
        let err = s.get_entry(&e.id).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt(ref why) if why.contains(id)),
            "{column}: {err:?}"
        );
        // Listing fails loudly rather than silently dropping the row.
        assert!(matches!(
            s.list_entries().await,
            Err(StoreError::Corrupt(_))
        ));
        fx.raw(&format!(
            "DELETE FROM registration_entries WHERE id = '{id}'"
        ))
        .await;
    }
    // An invalid id in the table is reported too.
    fx.raw("UPDATE registration_entries SET id = 'bad id!' WHERE id = 'good'")
        .await;
    assert!(matches!(
        s.list_entries().await,
        Err(StoreError::Corrupt(ref why)) if why.contains("bad id!")
    ));
}

pub async fn get_entries_by_ids(backend: Backend) {
    let fx = fixture!(backend);
    let s = &fx.store;
    for i in 0..600 {
        s.create_entry(
            &entry(&format!("e{i:03}"), &agent_id(i % 2), i),
            &ev("entry.created"),
        )
        .await
        .unwrap();
    }
    let mut ids: Vec<EntryId> = (0..600)
        .step_by(3)
        .map(|i| format!("e{i:03}").parse().unwrap())
        .collect();
    ids.push("missing".parse().unwrap());
    let mut got: Vec<String> = s
        .get_entries(&ids)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    got.sort();
    let want: Vec<String> = (0..600).step_by(3).map(|i| format!("e{i:03}")).collect();
    assert_eq!(got, want, "more than one chunk of 500, unknown ids skipped");
    assert!(s.get_entries(&[]).await.unwrap().is_empty());
}
