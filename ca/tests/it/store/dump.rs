//! A snapshot of the whole datastore restored into a fresh one holds the same rows and a
//! chain that verifies; a restore into a datastore that is not empty, or of a damaged dump,
//! writes nothing.

use meshid_ca::store::sql::dump::DumpLine;
use meshid_ca::store::Datastore as _;

use super::fixture::*;

async fn fill(f: &Fixture) {
    for n in 0..20 {
        f.store
            .create_entry(
                &entry(&format!("e{n}"), &agent_id(1), n),
                &ev("entry.created"),
            )
            .await
            .unwrap();
    }
    f.store
        .upsert_agent(&agent(1), &ev("agent.attested"))
        .await
        .unwrap();
    f.store
        .insert_ca_key(
            &ca_key("root-1", meshid_ca::store::CaKeyKind::X509Root, None, 1),
            &ev("ca.key.created"),
        )
        .await
        .unwrap();
    f.store.append_audit(&ev("custom")).await.unwrap();
}

async fn dump(f: &Fixture) -> Vec<DumpLine> {
    let mut lines = Vec::new();
    f.store
        .dump(|l| {
            lines.push(l);
            Ok(())
        })
        .await
        .unwrap();
    lines
}

pub async fn snapshot_and_restore(backend: Backend) {
    let Some(src) = Fixture::new(backend).await else {
        return;
    };
    fill(&src).await;
    let lines = dump(&src).await;
    let tables = lines
        .iter()
        .filter(|l| matches!(l, DumpLine::Table { .. }))
        .count();
    assert!(tables >= 10, "{tables} tables");
    assert!(!lines
        .iter()
        .any(|l| matches!(l, DumpLine::Table { name, .. } if name == "schema_migrations")));

    let Some(dst) = Fixture::new(backend).await else {
        return;
    };
    let version = src.store.schema_version().await.unwrap();
    // A damaged dump (a row of the wrong width) writes nothing.
    let mut bad = lines.clone();
    let at = bad
        .iter()
        .rposition(|l| matches!(l, DumpLine::Row(_)))
        .unwrap();
    bad[at] = DumpLine::Row(vec![]);
    assert!(dst
        .store
        .restore(version, bad.into_iter().map(Ok))
        .await
        .is_err());
    assert!(dst.store.is_empty().await.unwrap(), "nothing written");
    // Another schema version is refused.
    assert!(dst
        .store
        .restore(version - 1, lines.clone().into_iter().map(Ok))
        .await
        .is_err());
    let (t, rows) = dst
        .store
        .restore(version, lines.clone().into_iter().map(Ok))
        .await
        .unwrap();
    assert_eq!(t as usize, tables);
    assert!(rows > 40);
    assert_eq!(dump(&dst).await, lines, "the same rows, the same order");
    meshid_ca::store::verify_audit(&dst.store).await.unwrap();
    assert_eq!(dst.store.list_entries().await.unwrap().len(), 20);
    // The restored chain goes on.
    dst.store.append_audit(&ev("after.restore")).await.unwrap();
    meshid_ca::store::verify_audit(&dst.store).await.unwrap();
    // Not into a datastore that has data.
    let e = dst
        .store
        .restore(version, lines.into_iter().map(Ok))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
}
